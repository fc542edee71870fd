"""The run folder `outputs/<run_name>/` and its manifest: which stage ran, when, and what it produced.

Each notebook opens the run, does its stage inside `run.stage(...)` and records its outputs there; the next
notebook finds them with `run.outputs_of(...)`. A stage that fails is marked failed (never complete), and
re-running a stage marks the stages after it stale. A finished stage records its key: a hash of every params
value read up to that stage, so runs with the same key at a stage have the same outputs there (a sweep runs
such a stage once and copies it, `adopt_stage`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from tunebook.colab import install_for_stage
from tunebook.config import STAGES, Params, dump_params, load_params, on_colab, read_yaml
from tunebook.errors import TunebookError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
# The stage that first reads each params key (the most specific prefix wins; keys not listed: 01).
FIRST_READ_BY = {
    "model.backend": "02_finetune",
    "model.dtype": "02_finetune",
    "model.load_in_4bit": "02_finetune",
    "train": "02_finetune",
    "quantize": "03_quantize",
    "evaluate": "04_evaluate",
    "evaluate.metric": "01_build_dataset",  # 01 collects a classification run's labels
}
WHERE_KEYS = ("run_name", "output_dir", "sweep", "colab")  # where a run lives and how it was launched, not what it computes


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    params: Params
    dir: Path

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"run_name": self.params.run_name, "stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def status(self, stage: str) -> str:
        return self.manifest()["stages"].get(stage, {}).get("status", "missing")

    def outputs_of(self, stage: str) -> dict:
        """What a finished stage recorded; a clear error if it has not run (or failed)."""
        entry = self.manifest()["stages"].get(stage)
        if not entry or entry.get("status") != "complete":
            state = entry.get("status", "not run") if entry else "not run"
            raise TunebookError(
                f"Stage {stage} is {state} in run '{self.params.run_name}' ({self.dir}). "
                f"Run notebooks/{stage}.ipynb first, or `python -m tunebook run <params> --stages {stage[:2]}`."
            )
        return entry["outputs"]

    def key_of(self, stage: str) -> str | None:
        """The params key a finished stage recorded (None for runs made before keys were recorded)."""
        return self.manifest()["stages"].get(stage, {}).get("key")

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Mark `name` running; yield a dict the stage fills with its outputs; mark it complete or failed."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name}")
        if on_colab():
            install_for_stage(self.params, name)
        manifest = self.manifest()
        if manifest["stages"].get(name, {}).get("status") == "complete":
            print(f"Re-running {name}: its previous outputs in {self.dir} will be replaced when it succeeds.")
        _mark_later_stale(manifest, name)
        started = time.time()
        manifest["stages"][name] = {"status": "running", "started": _now()}
        self._write_manifest(manifest)
        outputs: dict = {}
        try:
            yield outputs
        except BaseException as e:
            manifest = self.manifest()
            manifest["stages"][name] = {
                "status": "failed",
                "started": manifest["stages"][name]["started"],
                "finished": _now(),
                "error": "".join(traceback.format_exception_only(type(e), e)).strip(),
            }
            self._write_manifest(manifest)
            raise
        manifest = self.manifest()
        manifest["stages"][name] = {
            "status": "complete",
            "started": manifest["stages"][name]["started"],
            "finished": _now(),
            "seconds": round(time.time() - started, 1),
            "key": stage_key(self.params, name),
            "outputs": outputs,
        }
        self._write_manifest(manifest)


def _mark_later_stale(manifest: dict, name: str) -> None:
    later = [s for s in STAGES[STAGES.index(name) + 1 :] if manifest["stages"].get(s, {}).get("status") == "complete"]
    for stage in later:
        manifest["stages"][stage]["status"] = "stale"
    if later:
        print(f"Stages {', '.join(later)} are now marked stale: re-run them to use the new {name} outputs.")


def params_values(params: Params, keep: Callable[[str], bool]) -> dict:
    """The flattened params values whose dotted keys `keep` accepts (where-keys never count): what params_key hashes."""
    flat = flatten(params.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if keep(k) and not is_under(k, WHERE_KEYS)}


def params_key(params: Params, keep: Callable[[str], bool]) -> str:
    """A short hash of the params values whose dotted keys `keep` accepts."""
    return hashlib.sha256(json.dumps(params_values(params, keep), sort_keys=True).encode()).hexdigest()[:16]


def stage_key(params: Params, stage: str) -> str:
    """The key of a stage's outputs: every params value read by this stage or an earlier one."""
    return params_key(params, lambda key: _read_by(key, stage))


def stage_values(params: Params, stage: str) -> dict:
    """The flattened params values stage_key hashes, to name the keys that differ between two keys."""
    return params_values(params, lambda key: _read_by(key, stage))


def _read_by(key: str, stage: str) -> bool:
    return STAGES.index(first_read_by(key)) <= STAGES.index(stage)


def first_read_by(key: str) -> str:
    prefixes = [p for p in FIRST_READ_BY if is_under(key, (p,))]
    return FIRST_READ_BY[max(prefixes, key=len)] if prefixes else STAGES[0]


def is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


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
    manifest["stages"][stage] = {**entry, "outputs": outputs, "reused_from": donor.dir.name, "finished": _now()}
    run._write_manifest(manifest)


class StageFailed(TunebookError):
    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def execute_stage(stage: str, params_file: Path, run_dir: Path, parameters: dict | None = None) -> Path:
    """Run notebooks/<stage>.ipynb headless with papermill into <run>/notebooks/<stage>.ipynb (returned). A failing
    cell raises StageFailed; the executed notebook, saved either way, holds the full traceback."""
    import papermill as pm

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    executed = run_dir / "notebooks" / f"{stage}.ipynb"
    executed.parent.mkdir(exist_ok=True)
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / f"{stage}.ipynb"),
            str(executed),
            parameters={"params_path": str(params_file), "overrides": [], **(parameters or {})},
            cwd=str(NOTEBOOKS),
            kernel_name=_kernel_name(),
            log_output=True,
            progress_bar=False,
        )
    except pm.PapermillExecutionError as e:
        raise StageFailed(f"Stage {stage} failed: {e.ename}: {e.evalue}\nThe executed notebook with the full traceback: {executed}", executed) from None
    return executed


def _kernel_name() -> str:
    """The kernel `make setup` registers for this environment, else the default python3 (Colab, GPU hosts)."""
    from jupyter_client.kernelspec import KernelSpecManager

    return "tunebook" if "tunebook" in KernelSpecManager().find_kernel_specs() else "python3"


def open_run(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """Load params, create the run folder if needed, and keep the resolved params in it as params.yaml."""
    params = load_params(params_path, overrides)
    refuse_sweep(params, params_path)
    return Run(params=params, dir=save_params(params).parent)


def refuse_sweep(params: Params, params_path: str | Path) -> None:
    """A sweep file names many runs; run as one, it would write into the folder that holds them."""
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
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dump_params(params)
    params_file = run_dir / "params.yaml"
    if params_file.exists() and params_file.read_text(encoding="utf-8") != resolved:
        # The manifest's earlier stages may have used it.
        shutil.copy2(params_file, run_dir / f"params.{int(params_file.stat().st_mtime)}.yaml")
    if not params_file.exists() or params_file.read_text(encoding="utf-8") != resolved:
        params_file.write_text(resolved, encoding="utf-8")
    return params_file


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder into place, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
