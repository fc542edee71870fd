"""Stage 02 checkpoints: a run killed while training (a lost Colab runtime) resumes from its last checkpoint, through the
CLI's --resume and through re-running the notebook, and trains what an uninterrupted run trains; checkpoints made with
other params are refused. Real runs of params/smoke.yaml cut to 6 short steps, killed with signals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT
from tunebook.errors import TunebookError
from tunebook.run.folder import Run, adopt_stage, open_run
from tunebook.training.train import checkpoint_step, last_checkpoint, resume_point

STEPS = 6
# 8 rows in batches of 2: 4 steps an epoch, so checkpoint-2 is mid-epoch and checkpoint-4 an epoch boundary.
QUICK = [
    f"train.max_steps={STEPS}", "train.save_steps=2", "train.batch_size=2", "train.eval_steps=3", "train.eval_loss_examples=2",
    "data.max_train_examples=8", "data.passage_max_chars=40", "model.max_seq_length=256",
    "train.answers_before_after=0",  # what is tested here is resuming; the smoke run shows the answers
]  # fmt: skip


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """01 and 02 uninterrupted through the CLI: the run the interrupted ones must match, and the 01 they adopt."""
    out = tmp_path_factory.mktemp("resume")
    command = [sys.executable, "-m", "tunebook", "run", "params/smoke.yaml", "--stages", "01,02", *sets(*QUICK, f"output_dir={out}", "run_name=reference")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "reference"


@pytest.fixture
def new_run(reference):
    """A run of the same params beside the reference, with its 01 copied from it (as a sweep does)."""

    def make(name: str) -> Run:
        run = open_run(ROOT / "params/smoke.yaml", [*QUICK, f"output_dir={reference.parent}", f"run_name={name}"])
        adopt_stage(run, Run(params=run.params, dir=reference), "01_build_dataset")
        return run

    return make


def start(command, log_path):
    log = open(log_path, "w")  # noqa: SIM115 (closed by the process's end)
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def cli(name, out, *args):
    return [sys.executable, "-m", "tunebook", "run", "params/smoke.yaml", *args, *sets(*QUICK, f"output_dir={out}", f"run_name={name}")]


def notebook(run: Run):
    """Notebook 02 through papermill, as the CLI runs it (run/notebooks.py's execute_stage)."""
    code = "import sys; from pathlib import Path; from tunebook.run.notebooks import execute_stage; execute_stage('02_finetune', Path(sys.argv[1]), Path(sys.argv[2]))"
    return [sys.executable, "-c", code, str(run.dir / "params.yaml"), str(run.dir)]


def kill_after_checkpoint(process, run: Run, step: int, log_path) -> None:
    """Wait until checkpoint-`step` is complete, then end it all as a lost runtime does: SIGTERM to the command's process
    group, and SIGKILL to the Jupyter kernel, which jupyter_client starts in a session of its own (killing the group
    alone leaves it training for another second, until ipykernel notices its parent is gone)."""
    deadline = time.time() + 300
    while (last := last_checkpoint(run.dir / "checkpoints")) is None or checkpoint_step(last) < step:
        assert process.poll() is None, f"ended before checkpoint-{step}:\n" + log_path.read_text()[-3000:]
        assert time.time() < deadline, f"no checkpoint-{step} after 300 s:\n" + log_path.read_text()[-3000:]
        time.sleep(0.1)
    descendants = psutil.Process(process.pid).children(recursive=True)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)
    psutil.wait_procs(descendants, timeout=30)
    assert last_checkpoint(run.dir / "checkpoints").name == f"checkpoint-{step}"


def logged(run_dir):
    """{step: training loss} and {step: eval loss} from train_log.json, after checking each step is logged once."""
    history = json.loads((run_dir / "train_log.json").read_text())
    train_steps = [h["step"] for h in history if "loss" in h]
    eval_steps = [h["step"] for h in history if "eval_loss" in h]
    assert train_steps == list(range(1, STEPS + 1)) and eval_steps == [3, 6]
    return {h["step"]: h["loss"] for h in history if "loss" in h}, {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}


def outputs_02(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["02_finetune"]["outputs"]


def assert_trained_as_the_reference(run_dir, reference, resumed_from):
    """Finished, resumed at `resumed_from`, every step once, the same losses as the uninterrupted run, checkpoints gone."""
    outputs = outputs_02(run_dir)
    assert outputs["resumed_from_step"] == resumed_from and outputs["steps"] == STEPS
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists() and (run_dir / "merged" / "config.json").exists()
    assert not (run_dir / "checkpoints").exists()
    (train, evals), (train_ref, evals_ref) = logged(run_dir), logged(reference)
    # Same data order, dropout/RNG and optimizer state as the uninterrupted run: CPU kernels with the same thread count.
    assert train == pytest.approx(train_ref, rel=1e-4) and evals == pytest.approx(evals_ref, rel=1e-4)
    assert outputs["train_loss"] == pytest.approx(outputs_02(reference)["train_loss"], abs=1e-3)


def test_reference_run_removes_its_checkpoints_and_counts_them(reference):
    outputs = outputs_02(reference)
    assert outputs["resumed_from_step"] == 0 and outputs["checkpoints_written"] == 3  # steps 2, 4, 6
    assert not (reference / "checkpoints").exists()
    logged(reference)


def test_cli_resume_continues_from_the_last_checkpoint(new_run, reference, tmp_path):
    name = "cli"
    run = new_run(name)
    log = tmp_path / "killed.log"
    kill_after_checkpoint(start(cli(name, reference.parent, "--stages", "02"), log), run, 4, log)
    assert run.status("02_finetune") == "interrupted"  # the command's SIGTERM handler records it (the kernel was SIGKILLed)
    first_01 = run.manifest()["stages"]["01_build_dataset"]

    resumed = subprocess.run(cli(name, reference.parent, "--stages", "01,02", "--resume"), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[1/1] 02_finetune" in resumed.stdout and run.manifest()["stages"]["01_build_dataset"] == first_01  # 01 is kept
    assert f"resuming at step 4 from {run.dir / 'checkpoints' / 'checkpoint-4'}" in resumed.stdout + resumed.stderr
    assert_trained_as_the_reference(run.dir, reference, resumed_from=4)
    assert outputs_02(run.dir)["checkpoints_written"] == 1  # this session's: step 6


def test_notebook_rerun_resumes_twice_without_losing_or_repeating_a_step(new_run, reference, tmp_path):
    """Kill papermill after checkpoint 2, re-run the notebook, kill it after checkpoint 4, re-run it to the end."""
    run = new_run("notebook")
    kill_after_checkpoint(start(notebook(run), tmp_path / "1.log"), run, 2, tmp_path / "1.log")
    kill_after_checkpoint(start(notebook(run), tmp_path / "2.log"), run, 4, tmp_path / "2.log")
    assert "resuming at step 2" in (tmp_path / "2.log").read_text()
    final = subprocess.run(notebook(run), cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resuming at step 4" in final.stdout + final.stderr
    assert_trained_as_the_reference(run.dir, reference, resumed_from=4)


def test_changed_params_are_refused_and_the_checkpoints_kept(new_run, reference, tmp_path):
    name = "changed"
    run = new_run(name)
    log = tmp_path / "killed.log"
    kill_after_checkpoint(start(cli(name, reference.parent, "--stages", "02"), log), run, 2, log)
    checkpoints = run.dir / "checkpoints"
    before = {str(f.relative_to(checkpoints)): f.stat().st_mtime_ns for f in checkpoints.rglob("*")}

    changed = subprocess.run(
        [*cli(name, reference.parent, "--stages", "01,02", "--resume"), "--set", "train.learning_rate=0.001"], cwd=ROOT, capture_output=True, text=True
    )
    assert changed.returncode == 2
    error = changed.stderr.split("error: ", 1)[1]
    assert "train.learning_rate: 0.0002 -> 0.001" in error and "Nothing was resumed or deleted" in error
    assert "restore those params (the run folder keeps its earlier ones as params.<time>.yaml) to continue from step 2" in error
    assert list(
        run.dir.glob("params.*.yaml")
    )  # the params it was started with, kept by save_params and f"delete or move {checkpoints} to train from step 0" in error
    assert "Traceback" not in changed.stderr
    assert {str(f.relative_to(checkpoints)): f.stat().st_mtime_ns for f in checkpoints.rglob("*")} == before
    assert run.status("02_finetune") == "failed"

    # The same checkpoints without the record of their params: refused too (a copy, in-process).
    bare = shutil.copytree(checkpoints, tmp_path / "bare")
    (bare / "params_key.json").unlink()
    with pytest.raises(TunebookError, match=r"holds checkpoint-2 but no params_key.json .* delete or move .* to train from step 0"):
        resume_point(bare, run.params)
    # A checkpoint cut off in the middle of its save (no trainer_state.json yet) is passed over.
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4", ignore=shutil.ignore_patterns("trainer_state.json"))
    assert resume_point(checkpoints, run.params) == checkpoints / "checkpoint-2"
