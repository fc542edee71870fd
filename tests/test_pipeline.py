"""The five notebooks, executed headless by papermill on params/smoke.yaml (conftest's smoke_run): every stage for
real, on a few rows."""

import ast
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from conftest import ROOT
from tunebook.models.load import pick_dtype
from tunebook.params.schema import STAGES

REQUIRED_METRIC_KEYS = {"model", "exact_match", "partial_match", "f1", "n", "seconds", "peak_memory_mb", "bits", "size_mb"}
# params/smoke.yaml's quantized copies that run on a CPU; bnb_nf4 needs a GPU and is listed as skipped.
VARIANTS = ["int8_weight_only", "gguf_q8_0", "gptq_w4a16"]


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_reads_every_name_of_the_parameters_cell(notebook):
    """A value followed by a comment holding '=' is one papermill cannot read: it warns on every run and then calls
    the name an unknown parameter."""
    cell = next(c for c in nbformat.read(notebook, 4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert assigned and list(papermill.inspect_notebook(str(notebook))) == assigned


def tunebook(*args):
    return subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_all_stages_complete_with_executed_notebooks(smoke_run):
    run_dir, _ = smoke_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["complete"] * 5
    for stage in STAGES:
        executed = nbformat.read(run_dir / "notebooks" / f"{stage}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code"), stage


def test_the_run_prints_no_library_noise(smoke_run):
    """Start-up lines a user can do nothing about: the kernel's TCP warning (kernels run on local sockets), torchao's
    kernel-loading failures and torch's pytree deprecation notes."""
    _, result = smoke_run
    printed = result.stdout + result.stderr
    for noise in ("Kernel is running over TCP", "Failed to load", "pytree"):
        assert noise not in printed, noise
    assert "=== 05_error_analysis done" in printed  # the whole run's output was read


def test_metrics_table(smoke_run):
    run_dir, result = smoke_run
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["base", "finetuned", *VARIANTS]
    for row in rows:
        assert REQUIRED_METRIC_KEYS <= row.keys()
        assert row["n"] == 8 and 0 <= row["exact_match"] <= row["partial_match"] <= 1
        assert row["seconds"] > 0 and row["peak_memory_mb"] > 0
    trained_bits = torch.finfo(pick_dtype("auto")).bits  # model.dtype auto: the merged model keeps the training dtype
    assert [r["bits"] for r in rows] == [16, trained_bits, 8, 8, 4]  # the base model is stored in bf16
    assert all(r["size_mb"] > 0 for r in rows)
    assert (run_dir / "metrics.csv").read_text().startswith("model,exact_match,partial_match,f1,n,")
    assert re.search(r"^\| base +\|", result.stdout, re.M)


def test_artifacts_of_every_stage(smoke_run):
    run_dir, _ = smoke_run
    assert (run_dir / "dataset" / "hf" / "dataset_dict.json").exists()
    assert len((run_dir / "dataset" / "eval.jsonl").read_text().splitlines()) == 8
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "merged" / "config.json").exists()
    assert (run_dir / "quantized" / "int8_weight_only" / "config.json").exists()
    assert (run_dir / "quantized" / "gptq_w4a16" / "config.json").exists()
    assert (run_dir / "quantized" / "gguf_q8_0.gguf").exists()
    assert not (run_dir / "quantized" / "model.f16.gguf").exists()  # the converter's intermediate is removed
    variants = json.loads((run_dir / "manifest.json").read_text())["stages"]["03_quantize"]["outputs"]["variants"]
    skipped = {v["name"]: v["reason"] for v in variants if v["status"] == "skipped"}
    assert skipped == {"bnb_nf4": "bitsandbytes quantization needs a CUDA GPU (the CPU install has no bitsandbytes)"}
    for label in ("base", "finetuned", *VARIANTS):
        assert len((run_dir / "predictions" / f"{label}.jsonl").read_text().splitlines()) == 8


def test_report_counts_match_predictions(smoke_run):
    run_dir, _ = smoke_run
    from tunebook.analysis.analysis import categorize

    analysis = json.loads((run_dir / "analysis.json").read_text())
    report = (run_dir / "report.html").read_text()
    for counts in analysis["category_counts"]:
        rows = [json.loads(line) for line in (run_dir / "predictions" / f"{counts['model']}.jsonl").read_text().splitlines()]
        wrong = [r for r in rows if r["exact_match"] != 1]
        assert counts["correct"] == len(rows) - len(wrong)
        for category in ("empty", "normalization", "too_verbose", "truncated", "wrong"):
            assert counts[category] == sum(categorize(r["prediction"], r["gold_answers"]) == category for r in wrong)
        assert f"{counts['model']}: {len(wrong)} wrong of {len(rows)}" in report


def test_existing_run_is_not_overwritten(smoke_run):
    run_dir, _ = smoke_run
    before = (run_dir / "metrics.json").read_bytes()
    result = tunebook("run", "params/smoke.yaml", "--set", f"output_dir={run_dir.parent}")
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before
    resumed = tunebook("run", "params/smoke.yaml", "--set", f"output_dir={run_dir.parent}", "--resume")
    assert resumed.returncode == 0 and "nothing to do" in resumed.stdout


def test_rerun_of_later_stages(smoke_run):
    run_dir, _ = smoke_run
    result = tunebook("run", "params/smoke.yaml", "--set", f"output_dir={run_dir.parent}", "--stages", "05")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["05_error_analysis"]["status"] == "complete"
    assert manifest["stages"]["04_evaluate"]["status"] == "complete"


def test_failed_stage_is_reported_and_marked(tmp_path):
    """A stage that fails on what only it can see (here every prompt longer than max_seq_length, known once tokenized)."""
    result = tunebook("run", "params/smoke.yaml", "--set", f"output_dir={tmp_path}", "--set", "model.max_seq_length=32")
    assert result.returncode == 2
    assert "Stage 01_build_dataset failed" in result.stderr and "longer than model.max_seq_length=32" in result.stderr, result.stderr
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert manifest["stages"]["01_build_dataset"]["status"] == "failed"


def html_tables(cell) -> list[str]:
    return ["".join(o["data"]["text/html"]) for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]


def printed(cell) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def test_each_executed_notebook_says_what_it_needs_wrote_and_what_is_next(smoke_run):
    """The notebooks teach: each opens with what it needs, its runtime and time, and ends with a table of what this
    run's stage wrote (read from the manifest, each path on disk) and the next step; 02 and 04 show eval questions
    answered by the base and the fine-tuned model side by side; a section that does not apply says so in one line."""
    run_dir, _ = smoke_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for n, stage in enumerate(STAGES):
        executed = nbformat.read(run_dir / "notebooks" / f"{stage}.ipynb", as_version=4)
        markdown = [c.source for c in executed.cells if c.cell_type == "markdown"]
        assert all(word in markdown[1] for word in ("**needs**", "**runtime**", "**time**", "**writes**")), stage
        assert markdown[-2].startswith("## What this notebook wrote") and markdown[-1].startswith("## Next"), stage
        if n < 4:
            assert f"]({STAGES[n + 1]}.ipynb)" in markdown[-1], stage
        wrote = html_tables(executed.cells[-2])
        assert len(wrote) == 1, stage
        outputs = manifest["stages"][stage]["outputs"]
        for name in {
            "01_build_dataset": ["dataset_dir", "eval_jsonl"],
            "02_finetune": ["adapter_dir", "train_log"],
            "04_evaluate": ["metrics_csv"],
            "05_error_analysis": ["report_html"],
        }.get(stage, []):
            shown = str(Path(outputs[name]).relative_to(run_dir))
            assert f"<td>{shown}" in wrote[0], (stage, name, shown)
        assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"], stage
    finetune = nbformat.read(run_dir / "notebooks" / "02_finetune.ipynb", as_version=4)
    before_after = next(c for c in finetune.cells if c.cell_type == "code" and "answers_before_after" in c.source)
    table = html_tables(before_after)[0]
    rows = [json.loads(line) for line in (run_dir / "dataset" / "eval.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in sorted(rows, key=lambda r: r["n_tokens"])[:3]]
    assert all(html.escape(" ".join(q.split())[:40], quote=False) in table for q in questions) and "<th>base</th>" in table and "<th>finetuned</th>" in table
    assert table.count("✓") + table.count("✗") == 6
    evaluate = nbformat.read(run_dir / "notebooks" / "04_evaluate.ipynb", as_version=4)
    answers = html_tables(next(c for c in evaluate.cells if c.cell_type == "code" and "answers_table" in c.source))[0]
    predictions = [json.loads(line) for line in (run_dir / "predictions" / "finetuned.jsonl").read_text().splitlines()[:5]]
    assert answers.count("✓") == sum(bool(r["right"]) for r in predictions) + sum(
        bool(json.loads(line)["right"]) for line in (run_dir / "predictions" / "base.jsonl").read_text().splitlines()[:5]
    )
    confusions = next(c for c in evaluate.cells if c.cell_type == "code" and "plot_confusions" in c.source)
    assert printed(confusions).startswith("Not a classification run")
    built = nbformat.read(run_dir / "notebooks" / "01_build_dataset.ipynb", as_version=4)
    assert printed(next(c for c in built.cells if c.cell_type == "code" and "built.summary.synthetic" in c.source)).startswith("No teacher in this run")
