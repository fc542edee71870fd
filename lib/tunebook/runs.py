"""The run folder `outputs/<run_name>/` and its manifest: which stage ran, when, and what it produced.

Each notebook opens the run, does its stage inside `run.stage(...)` and records its outputs there; the next
notebook finds them with `run.outputs_of(...)`. A stage that fails is marked failed (never complete), and
re-running a stage marks the stages after it stale.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tunebook.config import Params, dump_params, load_params
from tunebook.errors import TunebookError

STAGES = ("01_build_dataset", "02_finetune", "03_quantize", "04_evaluate", "05_error_analysis")


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

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Mark `name` running; yield a dict the stage fills with its outputs; mark it complete or failed."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name}")
        manifest = self.manifest()
        later = [s for s in STAGES[STAGES.index(name) + 1 :] if manifest["stages"].get(s, {}).get("status") == "complete"]
        if manifest["stages"].get(name, {}).get("status") == "complete":
            print(f"Re-running {name}: its previous outputs in {self.dir} will be replaced when it succeeds.")
        for stage in later:
            manifest["stages"][stage]["status"] = "stale"
        if later:
            print(f"Stages {', '.join(later)} are now marked stale: re-run them to use the new {name} outputs.")
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
            "outputs": outputs,
        }
        self._write_manifest(manifest)


def open_run(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """Load params, create the run folder if needed, and keep the resolved params in it as params.yaml."""
    params = load_params(params_path, overrides)
    return Run(params=params, dir=save_params(params).parent)


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
