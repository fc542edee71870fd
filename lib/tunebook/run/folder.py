"""The run folder `outputs/<run_name>/` and its manifest: which stage ran, when, and what it produced.

Each notebook opens the run, does its stage inside `run.stage(...)` and records its outputs there; the next
notebook reads them by name with `run.outputs_of(...)` (the records in run/outputs.py). A stage that fails is
marked failed (never complete), and re-running a stage marks the stages after it stale. A finished stage records
its key (run/keys.py), so runs with the same key at a stage have the same outputs there (a sweep runs such a stage
once and copies it, `adopt_stage`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import psutil

from tunebook.errors import TunebookError, file_system_error, is_file_system_error, signal_name, sigterm_raises
from tunebook.params.load import dump_params, load_params, read_yaml
from tunebook.params.schema import STAGES, Params
from tunebook.run.files import fresh_tmp_dir, replace_dir, write_json_atomic
from tunebook.run.keys import stage_key
from tunebook.run.outputs import BY_STAGE


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    params: Params
    dir: Path

    @classmethod
    def load(cls, folder: str | Path) -> "Run":
        """A finished or running run folder opened only to read it (05's picker, compare, a sweep's shared rows): its
        own params.yaml, validated; nothing is written and no stage is settled."""
        folder = Path(folder).resolve()
        return cls(params=load_params(folder / "params.yaml"), dir=folder)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict:
        return read_manifest(self.dir, self.params.run_name)

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def status(self, stage: str) -> str:
        return self.manifest()["stages"].get(stage, {}).get("status", "missing")

    def outputs_of(self, stage: str):
        """What a finished stage recorded, as its run/outputs.py record; a clear error if it has not run (or failed)."""
        entry = self.manifest()["stages"].get(stage)
        if not entry or entry.get("status") != "complete":
            state = entry.get("status", "not run") if entry else "not run"
            raise TunebookError(
                f"Stage {stage} is {state} in run '{self.params.run_name}' ({self.dir}). "
                f"Run notebooks/{stage}.ipynb first, or `python -m tunebook run <params> --stages {stage[:2]}`."
            )
        return BY_STAGE[stage].from_json(entry["outputs"], f"Stage {stage} of run '{self.params.run_name}' ({self.dir})")

    def key_of(self, stage: str) -> str | None:
        """The params key a finished stage recorded (None for runs made before keys were recorded)."""
        return self.manifest()["stages"].get(stage, {}).get("key")

    def refuse_if_running(self) -> None:
        """A stage this run's manifest says is running, in a process alive on this machine (another notebook or
        command on the same run folder): stop here, before anything is written."""
        for stage, entry in self.manifest()["stages"].items():
            if entry.get("status") == "running" and process_state(entry) == "alive" and entry.get("pid") != os.getpid():
                raise TunebookError(
                    f"Stage {stage} of run '{self.params.run_name}' is running now in process {entry['pid']} (started {entry['started']}), "
                    f"on this run folder ({self.dir}). Nothing was changed. Wait for it to finish, or stop it (kill {entry['pid']}) and run again."
                )

    def settle_interrupted(self) -> dict[str, str]:
        """Stages the manifest says are running whose process is gone (killed, a lost machine or Colab runtime): marked
        interrupted; {stage: a sentence saying so}, for the caller to print (the entry records that it was said)."""
        if not self.manifest_path.exists():
            return {}
        manifest = self.manifest()
        notes = {}
        for stage, entry in manifest["stages"].items():
            state = process_state(entry) if entry.get("status") == "running" else None
            if state in ("gone", "elsewhere"):
                pid, host = entry.get("pid"), entry.get("host")
                reason = (
                    f"its process {pid} is gone"
                    if pid and state == "gone"
                    else f"it ran in process {pid} on {host}, not on this machine ({socket.gethostname()}): taken as a lost machine or runtime"
                    if pid
                    else "it was started by a tunebook that did not record its process"
                )
                entry.update(
                    status="interrupted", interrupted=self._last_write(entry), reason=reason + "; the time is its last write to the run folder", reported=True
                )
                notes[stage] = interruption_note(stage, entry)
        if notes:
            self._write_manifest(manifest)
        return notes

    def _last_write(self, entry: dict) -> str:
        """When the stage last wrote into the run folder: the best estimate of when a killed process stopped."""
        latest = max((f.stat().st_mtime for f in self.dir.rglob("*") if f.is_file()), default=time.time())
        return datetime.fromtimestamp(latest, timezone.utc).isoformat(timespec="seconds")

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Mark `name` running (with this process's id and host); yield a dict the stage fills with its outputs (its
        run/outputs.py record, `as_json()`); mark it complete, failed, or interrupted (Ctrl-C, a Jupyter interrupt,
        SIGTERM)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name}")
        self.refuse_if_running()
        for stage, note in self.settle_interrupted().items():
            print(f"{note}; re-running it." if stage == name else f"{note}.")
        manifest = self.manifest()
        previous = manifest["stages"].get(name, {})
        if previous.get("status") == "complete":
            print(f"Re-running {name}: its previous outputs in {self.dir} will be replaced when it succeeds.")
        elif previous.get("status") == "interrupted":  # said already when it was found gone (by open_run or the CLI)
            print(f"Re-running {name}." if previous.get("reported") else f"{interruption_note(name, previous)}; re-running it.")
        _mark_later_stale(manifest, name)
        started = time.time()
        manifest["stages"][name] = {"status": "running", "started": now(), **this_process()}
        try:
            self._write_manifest(manifest)
        except TunebookError as e:
            raise type(e)(f"{e} The run folder must be writable to run a stage in it.") from None
        outputs: dict = {}
        with sigterm_raises():
            try:
                yield outputs
            except KeyboardInterrupt as e:  # Ctrl-C, Jupyter's interrupt button, or a SIGTERM (errors.Terminated)
                self._finish(name, {"status": "interrupted", "interrupted": now(), "reason": signal_name(e)})
                raise
            except BaseException as e:
                shown = file_system_error(e) if is_file_system_error(e) else e
                self._finish(name, {"status": "failed", "finished": now(), "error": "".join(traceback.format_exception_only(type(shown), shown)).strip()})
                if shown is not e:
                    raise shown from e
                raise
        manifest = self.manifest()
        manifest["stages"][name] = {
            "status": "complete",
            "started": manifest["stages"][name]["started"],
            "finished": now(),
            "seconds": round(time.time() - started, 1),
            "key": stage_key(self.params, name),
            "outputs": outputs,
        }
        self._write_manifest(manifest)

    def _finish(self, name: str, entry: dict) -> None:
        manifest = self.manifest()
        running = manifest["stages"][name]
        keep = {k: running[k] for k in ("started", "pid", "host") if k in running} if entry["status"] == "interrupted" else {"started": running["started"]}
        manifest["stages"][name] = {"status": entry["status"], **keep, **{k: v for k, v in entry.items() if k != "status"}}
        self._write_manifest(manifest)


def read_manifest(run_dir: Path, run_name: str = "") -> dict:
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return {"run_name": run_name, "stages": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunebookError(f"{path} is not a readable manifest ({e}). Move it aside to start the run over; its stages' files are kept.") from None


def this_process() -> dict:
    """What a running stage records so a later process can tell whether it is still alive."""
    me = psutil.Process()
    return {"pid": me.pid, "host": socket.gethostname(), "process_started": round(me.create_time(), 2)}


def process_state(entry: dict) -> str:
    """Of a running stage's process: alive (on this machine), gone, or elsewhere (another machine: cannot be checked)."""
    pid = entry.get("pid")
    if not pid:
        return "gone"
    if entry.get("host") != socket.gethostname():
        return "elsewhere"
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - entry.get("process_started", process.create_time())) < 1
    except psutil.Error:
        alive = False
    return "alive" if alive else "gone"


def interruption_note(stage: str, entry: dict) -> str:
    return f"Stage {stage} was interrupted at {entry.get('interrupted') or 'an unknown time'} ({entry.get('reason', 'no reason recorded')})"


def _mark_later_stale(manifest: dict, name: str) -> None:
    later = [s for s in STAGES[STAGES.index(name) + 1 :] if manifest["stages"].get(s, {}).get("status") == "complete"]
    for stage in later:
        manifest["stages"][stage]["status"] = "stale"
    if later:
        print(f"Stages {', '.join(later)} are now marked stale: re-run them to use the new {name} outputs.")


def adopt_stage(run: Run, donor: Run, stage: str) -> None:
    """Make `stage` of `run` the finished stage of `donor` (same key): copy the files its outputs name into this run,
    pointing the recorded paths at the copies, and record it complete, reused from the donor."""
    entry = donor.manifest()["stages"][stage]
    source, target = str(donor.dir.resolve()), run.dir.resolve()
    tops: set[str] = set()

    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and value.startswith(source + os.sep):
            relative = Path(value).relative_to(source)
            tops.add(relative.parts[0])
            return str(target / relative)
        return value

    outputs = moved(entry["outputs"])
    for top in sorted(tops):
        src = Path(source) / top
        if src.is_dir():
            tmp = fresh_tmp_dir(target / top)
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            replace_dir(tmp, target / top)
        else:
            shutil.copy2(src, target / (top + ".tmp"))
            os.replace(target / (top + ".tmp"), target / top)
    manifest = run.manifest()
    _mark_later_stale(manifest, stage)
    manifest["stages"][stage] = {**entry, "outputs": outputs, "reused_from": donor.dir.name, "finished": now()}
    run._write_manifest(manifest)


def open_run(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """Load params, create the run folder if needed, and keep the resolved params in it as params.yaml. A stage that
    was left running by a process that is gone is marked interrupted (and said so)."""
    params = load_params(params_path, overrides)
    refuse_sweep(params, params_path)
    run = Run(params=params, dir=params.run_dir.resolve())
    # A stage running now in another process is refused by Run.stage, not here: 05's run picker opens every finished
    # run of the folder, busy or not.
    for note in run.settle_interrupted().values():
        print(f"{note}.")
    save_params(params)
    return run


def refuse_sweep(params: Params, params_path: str | Path) -> None:
    """A sweep file (or a rounds file) names many runs; run as one, it would write into the folder that holds them."""
    if params.rounds.count:
        raise TunebookError(
            f"{params_path} has rounds.count {params.rounds.count}: run it with `python -m tunebook rounds {params_path}`. "
            f"Each round is a run of its own, opened with the params.yaml in its folder, e.g. {params.run_dir}/round-0/params.yaml."
        )
    if params.sweep.grid or params.sweep.variants:
        raise TunebookError(
            f"{params_path} has a sweep section: run it with `python -m tunebook sweep {params_path}`. "
            f"One of its runs opens with the params.yaml in its folder, e.g. {params.run_dir}/<run>/params.yaml."
        )


def is_run_folder(folder: Path) -> bool:
    """A run folder with its own params; False for one that --overwrite / --rerun moved aside (its params name another)."""
    params = folder / "params.yaml"
    return (folder / "manifest.json").is_file() and params.is_file() and (read_yaml(params) or {}).get("run_name") == folder.name


def move_aside(run_dir: Path) -> Path:
    """Rename a run folder out of the way (kept, never deleted) so the run can start over."""
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.rename(aside)
    return aside


def save_params(params: Params) -> Path:
    """Write the resolved params to <run>/params.yaml; an earlier, different version is kept beside it."""
    run_dir = params.run_dir.resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if not is_file_system_error(e):
            raise
        raise file_system_error(e, what="the run folder", hint=f"Set output_dir (now {params.output_dir}) to a folder you can write to.") from None
    resolved = dump_params(params)
    params_file = run_dir / "params.yaml"
    if params_file.exists() and params_file.read_text(encoding="utf-8") != resolved:
        # The manifest's earlier stages may have used it.
        shutil.copy2(params_file, run_dir / f"params.{int(params_file.stat().st_mtime)}.yaml")
    if not params_file.exists() or params_file.read_text(encoding="utf-8") != resolved:
        params_file.write_text(resolved, encoding="utf-8")
    return params_file
