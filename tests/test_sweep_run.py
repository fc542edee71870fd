"""A real sweep through the CLI and papermill, on a few rows and a tiny model of SmolLM2's shape: three variants, one of which fails in 02 (packed
batches need Unsloth). It is interrupted (SIGTERM) while its last run trains and started again; then the
comparison is checked against the runs' own metrics."""

import json
import signal
import subprocess
import sys
import time

import nbformat
import pandas as pd
import pytest

from conftest import ROOT

SWEEP = """run_name: tiny
output_dir: {out}
seed: 0
model: {{name: "{model}", max_seq_length: 768}}
data: {{train_path: {data}, group_field: article, eval_size: 6, max_train_examples: 8}}
train: {{max_steps: 2, batch_size: 2, eval_steps: 2, eval_loss_examples: 2, logging_steps: 1}}
evaluate: {{models: [base, finetuned], batch_size: 6, max_new_tokens: 8}}
sweep:
  stages: "01,02,04"
  variants:
    - {{name: r4, set: {{train.lora_r: 4}}}}
    - {{name: packed, set: {{train.batching: packed}}}}
    - {{name: r8, set: {{train.lora_r: 8}}}}
"""


def state(folder):
    path = folder / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def status(folder, run, stage):
    manifest = folder / run / "manifest.json"
    return json.loads(manifest.read_text())["stages"].get(stage, {}).get("status") if manifest.exists() else None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_smollm2):
    """The sweep run once, killed while r8 trains, and run again: (folder, first exit code, second run, r4's notebook mtimes)."""
    tmp = tmp_path_factory.mktemp("sweep")
    params = tmp / "tiny.yaml"
    params.write_text(SWEEP.format(out=tmp / "outputs", data=ROOT / "data" / "minipedia_rag_qa.jsonl", model=tiny_smollm2))
    folder = tmp / "outputs" / "tiny"
    command = [sys.executable, "-m", "tunebook", "sweep", str(params)]
    with open(tmp / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while status(folder, "r8", "02_finetune") != "running":
            assert first.poll() is None and time.monotonic() < deadline, (tmp / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    notebooks = {p.name: p.stat().st_mtime for p in (folder / "r4" / "notebooks").iterdir()}
    assert state(folder)["runs"]["r8"]["status"] == "interrupted"
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return folder, first.returncode, second, notebooks


def test_restart_finishes_only_the_missing_runs(sweep):
    folder, first_code, second, r4_notebooks = sweep
    assert first_code == 130
    assert "[1/3] r4\nAlready finished: skipped." in second.stdout
    assert {p.name: p.stat().st_mtime for p in (folder / "r4" / "notebooks").iterdir()} == r4_notebooks  # not executed again
    runs = state(folder)["runs"]
    assert [runs[r]["status"] for r in ("r4", "packed", "r8")] == ["finished", "failed", "finished"]
    assert runs["r8"]["stages"]["02_finetune"]["how"] == "ran" and status(folder, "r8", "04_evaluate") == "complete"


def test_shared_stages_run_once(sweep):
    folder, *_ = sweep
    runs = state(folder)["runs"]
    assert runs["r4"]["stages"]["01_build_dataset"]["how"] == "ran"
    for name in ("packed", "r8"):  # the dataset is built once; the others copy it
        assert runs[name]["stages"]["01_build_dataset"] == {"how": "reused", "from": "r4", "seconds": pytest.approx(0, abs=5)}
        assert not (folder / name / "notebooks" / "01_build_dataset.ipynb").exists()
        assert (folder / name / "dataset" / "eval.jsonl").read_text() == (folder / "r4" / "dataset" / "eval.jsonl").read_text()
    manifest = json.loads((folder / "r8" / "manifest.json").read_text())["stages"]
    assert manifest["01_build_dataset"]["outputs"]["eval_jsonl"] == str(folder / "r8" / "dataset" / "eval.jsonl")
    # The base model is scored once: r8's 04 copies r4's row and answers, and generates only its fine-tuned model's.
    assert manifest["04_evaluate"]["outputs"]["reused"] == {"base": "r4"}
    assert (folder / "r8" / "predictions" / "base.jsonl").read_text() == (folder / "r4" / "predictions" / "base.jsonl").read_text()
    metrics = {r: {m["model"]: m for m in json.loads((folder / r / "metrics.json").read_text())} for r in ("r4", "r8")}
    assert metrics["r8"]["base"] == metrics["r4"]["base"]
    executed = nbformat.read(folder / "r8" / "notebooks" / "04_evaluate.ipynb", as_version=4)
    assert "base: reused from run r4" in json.dumps([c.get("outputs", []) for c in executed.cells])


def test_failed_run_is_recorded_and_the_sweep_goes_on(sweep):
    folder, _, second, _ = sweep
    record = state(folder)["runs"]["packed"]
    assert "02_finetune failed: TunebookError: train.batching: packed needs the unsloth backend" in record["error"]
    executed = nbformat.read(record["notebook"], as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert [e.ename for e in errors] == ["TunebookError"]
    assert status(folder, "packed", "02_finetune") == "failed"
    assert second.returncode == 1 and "FAILED packed: Stage 02_finetune failed" in second.stdout
    assert second.stdout.index("FAILED packed") > second.stdout.index("[3/3] r8")  # r8 ran after the failure


def test_sweep_writes_the_comparison(sweep):
    folder, *_ = sweep
    table = pd.read_csv(folder / "comparison.csv")
    assert sorted(table["run"]) == ["r4", "r8"]  # the failed run has no metrics to compare
    assert list(table.columns[:2]) == ["run", "train.lora_r"]  # the only param that differs between them
    for _, row in table.iterrows():
        finetuned = next(m for m in json.loads((folder / row["run"] / "metrics.json").read_text()) if m["model"] == "finetuned")
        assert row["train.lora_r"] == int(row["run"][1:])
        assert (row["exact_match"], row["f1"]) == (finetuned["exact_match"], finetuned["f1"])
        assert row["eval_loss"] > 0 and row["train_seconds"] > 0
    assert "| run" in (folder / "comparison.md").read_text()
    assert (folder / "loss_curves.png").stat().st_size > 10_000


def test_compare_command(sweep, tmp_path):
    folder, *_ = sweep
    command = [sys.executable, "-m", "tunebook", "compare", str(folder / "r8"), str(folder / "r4"), "--model", "all", "--sort", "run", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert list(zip(table["run"], table["model"])) == [("r4", "base"), ("r4", "finetuned"), ("r8", "base"), ("r8", "finetuned")]
    assert table["eval_loss"].isna().tolist() == [True, False, True, False]  # training losses belong to the fine-tuned rows
    assert (tmp_path / "comparison.md").read_text().count("| r4 ") == 2
    wrong = subprocess.run([sys.executable, "-m", "tunebook", "compare", str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "nowhere: no such folder" in wrong.stderr and "Traceback" not in wrong.stderr
    wrong = subprocess.run([sys.executable, "-m", "tunebook", "compare", str(folder), "--sort", "f2"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--sort f2: no such column" in wrong.stderr
