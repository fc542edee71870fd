"""Sweeps: one params file with a `sweep:` section becomes many runs, executed stage by stage with papermill.

    python -m tunebook sweep params/sweep_lora.yaml

The runs live in <output_dir>/<run_name>/<run>/, named from the variant and grid values (all-linear.lora_r-16),
and sweep.json beside them records what happened to each. A run's stage whose key (every params value read up to
that stage, run/keys.py's stage_key) matches a stage another run of the sweep finished is copied from it, not run again:
the LoRA variants share one dataset build, and 04 copies the base model's scores (evaluate.reusable_rows). Finished
runs are skipped (unless --rerun), an interrupted sweep picks up where it stopped, and a failed run is recorded
with its executed notebook and error while the sweep goes on.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook.checks.preflight import check_sweep
from tunebook.errors import sigterm_raises
from tunebook.params.load import read_params, validate_params
from tunebook.params.overrides import apply_setting
from tunebook.params.schema import Params, ParamsError
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import Run, adopt_stage, move_aside, save_params
from tunebook.run.keys import stage_key
from tunebook.run.notebooks import StageFailed, execute_stage


@dataclass
class SweepRun:
    name: str
    changes: dict[str, Any]  # dotted params key -> the value this run gives it
    params: Params


def expand(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Params, list[SweepRun]]:
    """The sweep's own params and its runs: every variant at every grid point, each validated as a params file."""
    path = Path(params_path)
    raw = read_params(path, overrides)
    sweep_params = validate_params(raw, source=str(path))
    sweep = sweep_params.sweep
    if not sweep.grid and not sweep.variants:
        raise ParamsError(f"{path} has no sweep.grid or sweep.variants: nothing to sweep. `python -m tunebook run {path}` runs it once.")
    axes = [[(v.name, v.set) for v in sweep.variants]] if sweep.variants else []
    for key, values in sweep.grid.items():
        named = values.items() if isinstance(values, dict) else [(f"{key.rsplit('.', 1)[-1]}-{_slug(v)}", v) for v in values]
        axes.append([(name, {key: value}) for name, value in named])
    runs = []
    for combination in itertools.product(*axes):
        name = ".".join(part for part, _ in combination)
        changes = {k: v for _, change in combination for k, v in change.items()}
        run_raw = {k: copy.deepcopy(v) for k, v in raw.items() if k != "sweep"}
        for key, value in changes.items():
            apply_setting(run_raw, key, value, base=path.resolve().parent, source=f"{path} sweep run '{name}':")
        run_raw.update(run_name=name, output_dir=str(sweep_params.run_dir.resolve()))
        runs.append(SweepRun(name, changes, validate_params(run_raw, source=f"{path} (sweep run '{name}')")))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise ParamsError(
            f"{path}: two sweep runs would share a folder name ({sorted({n for n in names if names.count(n) > 1})}); name the grid values with a mapping {{name: value}}."
        )
    return sweep_params, runs


def _slug(value: Any) -> str:
    text = "_".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "empty"


@dataclass
class Sweep:
    """A sweep ready to run: its runs, their folders, and sweep.json's state (saved by `save`)."""

    params: Params
    runs: list[SweepRun]
    folder: Path
    state: dict
    members: dict[str, Run]  # run name -> its run folder

    @property
    def stages(self) -> list[str]:
        return self.params.sweep.stages

    def record(self, name: str) -> dict:
        return self.state["runs"][name]

    def save(self) -> None:
        write_json_atomic(self.folder / "sweep.json", self.state)


def open_sweep(params_path: str, overrides: list[str], *, dry_run: bool = False) -> Sweep | None:
    """The runs listed, checked (preflight) and their state read from sweep.json; None for --dry-run."""
    sweep_params, runs = expand(params_path, overrides)
    stages = sweep_params.sweep.stages
    folder = sweep_params.run_dir.resolve()
    print(f"Sweep {sweep_params.run_name}: {len(runs)} runs x stages {', '.join(s[:2] for s in stages)} in {folder}")
    for r in runs:
        print(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.changes.items()))
    if dry_run:
        return None
    check_sweep({r.name: r.params for r in runs}, stages, params_path)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "sweep.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {"runs": {}}
    state.update(params_file=str(Path(params_path).resolve()), overrides=overrides, stages=stages, order=[r.name for r in runs])
    for r in runs:
        state["runs"].setdefault(r.name, {"stages": {}})["changes"] = r.changes
    return Sweep(sweep_params, runs, folder, state, {r.name: Run(params=r.params, dir=folder / r.name) for r in runs})


def run_sweep(params_path: str, overrides: list[str], *, rerun: bool = False, dry_run: bool = False) -> int:
    """Execute every run of the sweep, one after the other; 0 when all finished, 1 when some failed, 130 when interrupted."""
    sweep = open_sweep(params_path, overrides, dry_run=dry_run)
    if sweep is None:
        return 0
    started = time.time()
    # A kill (SIGTERM) stops the sweep like Ctrl-C: the stage running is recorded interrupted and the state is saved.
    with sigterm_raises():
        for number, r in enumerate(sweep.runs, start=1):
            print(f"\n##### [{number}/{len(sweep.runs)}] {r.name}", flush=True)
            try:
                _run_one(sweep.members[r.name], sweep, rerun)
            except KeyboardInterrupt:
                sweep.record(r.name)["status"] = "interrupted"
                sweep.save()
                print(f"\nSweep interrupted during {r.name}. Run the same command again to finish the missing runs.")
                return 130
    return finish_sweep(sweep, started)


def finish_sweep(sweep: Sweep, started: float) -> int:
    """The stage table, the comparison of the finished runs and the failures; 1 when some run failed."""
    state = sweep.state
    state["seconds_last_invocation"] = round(time.time() - started, 1)
    sweep.save()
    print(f"\nSweep {sweep.params.run_name} done in {time.time() - started:.0f}s: {sweep.folder / 'sweep.json'}")
    print(stage_table(state))
    failed = [name for name in state["order"] if state["runs"][name].get("status") == "failed"]
    finished = [sweep.folder / name for name in state["order"] if state["runs"][name].get("status") == "finished"]
    if finished and "04_evaluate" in sweep.stages:
        from tunebook.analysis.compare import write_comparison

        write_comparison(finished, sweep.folder)
    for name in failed:
        print(f"FAILED {name}: {state['runs'][name]['error']}\n  executed notebook: {state['runs'][name]['notebook']}")
    return 1 if failed else 0


def _run_one(run: Run, sweep: Sweep, rerun: bool) -> None:
    """Bring one run's stages to complete: skip finished ones, copy shared ones, execute the rest."""
    record = sweep.record(run.dir.name)
    todo = prepare_run(run, sweep.stages, record, rerun)
    sweep.save()
    for stage in todo:
        result = bring_stage(run, stage, sweep.members)
        record_stage(record, stage, result)
        sweep.save()
        if result["how"] == "failed":
            return
    if todo:
        record["status"] = "finished"
        sweep.save()


def prepare_run(run: Run, stages: list[str], record: dict, rerun: bool) -> list[str]:
    """The checks before a run's stages start (--rerun, outdated, running elsewhere, interrupted): its stages still
    to do, in order, with its params saved; none when it is finished or outdated (so noted in its sweep.json record)."""
    if rerun and run.dir.exists() and all(run.status(s) == "complete" for s in stages):
        print(f"--rerun: moved the finished run to {move_aside(run.dir)}")
        record["stages"] = {}
    changed = [s for s in stages if run.status(s) == "complete" and run.key_of(s) not in (None, stage_key(run.params, s))]
    if changed:
        record.update(status="outdated", error=f"stages {', '.join(changed)} finished with other params than the sweep file's now")
        print(
            f"Skipped: {run.dir} finished {', '.join(changed)} with other params than the sweep file gives it now. "
            "Nothing was changed; --rerun moves it aside and runs it again, or give the sweep another run_name."
        )
        return []
    run.refuse_if_running()
    for stage, note in run.settle_interrupted().items():
        print(f"{note}; re-running it." if stage in stages else f"{note}.")
    todo = [s for s in stages if run.status(s) != "complete"]
    if not todo:
        record["status"] = "finished"
        print("Already finished: skipped.")
        return []
    record.update(status="running", error=None, notebook=None)
    save_params(run.params)
    return todo


def find_donor(run: Run, stage: str, members: dict[str, Run]) -> Run | None:
    """Another run of the sweep that finished `stage` with the same key: its outputs are this run's too."""
    key = stage_key(run.params, stage)
    return next((other for other in members.values() if other is not run and other.status(stage) == "complete" and other.key_of(stage) == key), None)


def bring_stage(run: Run, stage: str, members: dict[str, Run]) -> dict:
    """Copy `stage` from a donor, else execute its notebook: {how: reused|ran|failed, seconds, from | error, notebook}.
    An interruption (KeyboardInterrupt) is raised, with the stage recorded interrupted in the run's manifest."""
    donor = find_donor(run, stage, members)
    return reuse_stage(run, donor, stage) if donor else run_stage_notebook(run, stage, members)


def reuse_stage(run: Run, donor: Run, stage: str) -> dict:
    started = time.time()
    adopt_stage(run, donor, stage)
    print(f"=== {run.dir.name} {stage}: reused from {donor.dir.name} (same params up to this stage)", flush=True)
    return {"how": "reused", "from": donor.dir.name, "seconds": round(time.time() - started, 1)}


def run_stage_notebook(run: Run, stage: str, members: dict[str, Run]) -> dict:
    """Execute `stage`'s notebook in `run` (run/notebooks.py's execute_stage; 04 may reuse the other members' untrained rows). A
    failure is printed and returned for the sweep's record, and the sweep goes on."""
    started = time.time()
    print(f"=== {run.dir.name} {stage} → {run.dir / 'notebooks' / (stage + '.ipynb')}", flush=True)
    others = [str(other.dir) for other in members.values() if other is not run]
    try:
        execute_stage(stage, run.dir / "params.yaml", run.dir, {"reuse_from": others} if stage == "04_evaluate" else None)
    except Exception as e:  # noqa: BLE001  (a dead kernel too: the sweep records it and goes on)
        notebook = getattr(e, "notebook", run.dir / "notebooks" / f"{stage}.ipynb")
        error = str(e).split("\n")[0] if isinstance(e, StageFailed) else f"Stage {stage} failed: {type(e).__name__}: {e}"
        print(f"=== {run.dir.name} {error}\n    executed notebook: {notebook}\n    the sweep goes on with the other runs", flush=True)
        return {"how": "failed", "seconds": round(time.time() - started, 1), "error": error, "notebook": str(notebook)}
    print(f"=== {run.dir.name} {stage} done in {time.time() - started:.0f}s", flush=True)
    return {"how": "ran", "seconds": round(time.time() - started, 1)}


def record_stage(record: dict, stage: str, result: dict) -> None:
    """A stage's result into its run's record in sweep.json; a failed stage fails its run."""
    record["stages"][stage] = {k: v for k, v in result.items() if k not in ("error", "notebook")}
    if result["how"] == "failed":
        record.update(status="failed", error=result["error"], notebook=result["notebook"])


def stage_table(state: dict) -> str:
    """Markdown: one row per run, one column per stage (ran Ns / reused ← X / failed Ns / skipped), and the run's status."""
    import pandas as pd

    rows = []
    for name in state["order"]:
        record = state["runs"][name]
        row = {"run": name, "status": record.get("status", "pending")}
        row |= {stage: stage_cell(record["stages"].get(stage)) for stage in state["stages"]}
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def stage_cell(result: dict | None) -> str:
    if not result:
        return ""
    if result["how"] == "reused":
        return f"reused ← {result['from']}"
    if result["how"] == "skipped":  # the run's previous stage did not finish (a parallel sweep)
        return "skipped"
    return f"{result['how']} {result['seconds']:.0f}s"
