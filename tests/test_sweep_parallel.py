"""`sweep --parallel 2` on Ray's own local cluster (ray.init on this machine, started by the command; no Slurm, no
mocks): a 3-run sweep of the tiny SmolLM2-shaped model, killed (SIGTERM to the command) while the runs train and
started again with the same command, which finishes only what is missing."""

import json
import signal
import subprocess
import sys
import time
from datetime import datetime

import pandas as pd
import psutil
import pytest

from conftest import ROOT

pytest.importorskip("ray")

SWEEP = """run_name: side
output_dir: {out}
seed: 0
model: {{name: "{model}", max_seq_length: 768}}
data: {{train_path: {data}, group_field: article, eval_size: 4, max_train_examples: 8}}
train: {{max_steps: 2, batch_size: 2, eval_steps: 2, eval_loss_examples: 2, logging_steps: 1}}
evaluate: {{models: [base, finetuned], batch_size: 4, max_new_tokens: 8}}
sweep:
  stages: "01,02,04"
  grid:
    train.lora_r: {{r4: 4, r8: 8, r16: 16}}
"""
RUNS = ("r4", "r8", "r16")


def state(folder):
    path = folder / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def manifest(folder, run):
    path = folder / run / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def copies_recorded(folder):
    runs = state(folder)["runs"]
    return all("01_build_dataset" in runs.get(r, {}).get("stages", {}) for r in ("r8", "r16"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_smollm2):
    """The sweep killed while a run's 02 runs, then run again: (folder, first exit code, what the kill left, the
    second run's process, the executed 01 notebook's mtime after the first)."""
    tmp = tmp_path_factory.mktemp("parallel")
    params = tmp / "side.yaml"
    params.write_text(SWEEP.format(out=tmp / "outputs", data=ROOT / "data" / "minipedia_rag_qa.jsonl", model=tiny_smollm2))
    folder = tmp / "outputs" / "side"
    command = [sys.executable, "-m", "tunebook", "sweep", str(params), "--parallel", "2"]
    with open(tmp / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        # Killed while a 02 trains, once the other runs' copies of r4's 01 are recorded: those copies race r4's 02 starting.
        while not (copies_recorded(folder) and any(manifest(folder, r).get("02_finetune", {}).get("status") == "running" for r in RUNS)):
            assert first.poll() is None and time.monotonic() < deadline, (tmp / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        started = [(p.pid, p.create_time()) for p in psutil.Process(first.pid).children(recursive=True)]  # Ray's and the kernels
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=180)
    left = {
        "log": (tmp / "first.log").read_text(),
        "state": state(folder),
        "manifests": {r: manifest(folder, r) for r in RUNS},
        "kernels alive": [pid for pid, created in started if alive(pid, created) and "ipykernel" in " ".join(psutil.Process(pid).cmdline())],
        "others": started,
    }
    notebook_01 = (folder / "r4" / "notebooks" / "01_build_dataset.ipynb").stat().st_mtime
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return folder, first.returncode, left, second, notebook_01


def alive(pid, created):
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_killed_parallel_sweep_records_where_it_stopped(sweep):
    folder, first_code, left, _, _ = sweep
    assert first_code == 130, left["log"][-3000:]
    assert "On Ray, this machine (" in left["log"] and ", at most 2 at once: each stage that executes gets " in left["log"]
    runs = left["state"]["runs"]
    assert runs["r4"]["stages"]["01_build_dataset"]["how"] == "ran"
    assert [runs[r]["stages"]["01_build_dataset"].get("from") for r in ("r8", "r16")] == ["r4", "r4"]
    assert {runs[r]["status"] for r in RUNS} == {"interrupted"}
    stopped = {r: m["02_finetune"] for r, m in left["manifests"].items() if m.get("02_finetune", {}).get("status") == "interrupted"}
    assert stopped, left["manifests"]  # the stage that was training is recorded interrupted, with the reason it gives
    assert not [r for r, m in left["manifests"].items() if m.get("02_finetune", {}).get("status") == "running"]
    assert left["kernels alive"] == []  # the notebooks' kernels were stopped, none left behind
    deadline = time.monotonic() + 60  # Ray's own processes go down with its shutdown; the workers follow their raylet
    while [pid for pid, created in left["others"] if alive(pid, created)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid, created in left["others"] if alive(pid, created)] == []


def test_the_same_command_finishes_only_what_is_missing(sweep):
    folder, _, left, second, notebook_01 = sweep
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (folder / "r4" / "notebooks" / "01_build_dataset.ipynb").stat().st_mtime == notebook_01  # not executed again
    runs = state(folder)["runs"]
    assert {runs[r]["status"] for r in RUNS} == {"finished"}
    assert runs["r8"]["stages"]["01_build_dataset"] == left["state"]["runs"]["r8"]["stages"]["01_build_dataset"]  # from the first start
    assert [runs[r]["stages"][s]["how"] for r in RUNS for s in ("02_finetune", "04_evaluate")] == ["ran"] * 6


def test_runs_share_their_stages_and_two_train_at_once(sweep):
    folder, *_ = sweep
    manifests = {r: manifest(folder, r) for r in RUNS}
    assert [manifests[r]["01_build_dataset"].get("reused_from") for r in RUNS] == [None, "r4", "r4"]
    # The base model is scored once, by the first run's 04; the others wait for it and copy its row and answers.
    assert [manifests[r]["04_evaluate"]["outputs"]["reused"] for r in RUNS] == [{}, {"base": "r4"}, {"base": "r4"}]
    metrics = {r: {m["model"]: m for m in json.loads((folder / r / "metrics.json").read_text())} for r in RUNS}
    assert metrics["r8"]["base"] == metrics["r16"]["base"] == metrics["r4"]["base"]
    spans = [tuple(datetime.fromisoformat(manifests[r]["02_finetune"][k]) for k in ("started", "finished")) for r in RUNS]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert 1 <= len(overlapping) < 3  # trained side by side, never three at once (three pairs would share a moment)


def test_the_comparison_is_written_as_after_a_serial_sweep(sweep):
    folder, *_ = sweep
    table = pd.read_csv(folder / "comparison.csv")
    assert sorted(table["run"]) == sorted(RUNS)
    assert list(table.columns[:2]) == ["run", "train.lora_r"]
    for _, row in table.iterrows():
        finetuned = next(m for m in json.loads((folder / row["run"] / "metrics.json").read_text()) if m["model"] == "finetuned")
        assert (row["exact_match"], row["f1"]) == (finetuned["exact_match"], finetuned["f1"])
    assert (folder / "loss_curves.png").stat().st_size > 10_000


def test_parallel_must_be_a_positive_number(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tunebook", "sweep", "x.yaml", "--parallel", "0"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--parallel: '0' is not a whole number of at least 1" in result.stderr
