"""Stage 04 on several processes (evaluate.num_processes) through a real `accelerate launch`: on a CPU, processes over
gloo; the answers and scores must be those of one process."""

import pytest

from conftest import ROOT
from tunebook.dataset.build import build_dataset
from tunebook.errors import TunebookError
from tunebook.evaluation.evaluate import EvalModel, evaluate, generate_launched
from tunebook.run.folder import open_run
from tunebook.run.rows import read_jsonl

TIMINGS = ("seconds", "examples_per_second", "load_seconds", "peak_memory_mb", "processes")


def test_two_processes_give_the_one_process_predictions_and_metrics(tiny_smollm2, tmp_path, capsys):
    """The tiny SmolLM2-shaped model scores the smoke run's 8 eval questions in batches of 2: 4 batches, 2 for each
    process."""
    overrides = [f"output_dir={tmp_path}", f"model.name={tiny_smollm2}", "evaluate.models=[base]", "evaluate.batch_size=2", "evaluate.max_new_tokens=6"]
    run = open_run(ROOT / "params/smoke.yaml", overrides)
    build_dataset(run)
    [one] = evaluate(run)
    one_rows = read_jsonl(run.dir / "predictions/base.jsonl")
    capsys.readouterr()

    run = open_run(ROOT / "params/smoke.yaml", [*overrides, "evaluate.num_processes=2"])
    [two] = evaluate(run)
    out = capsys.readouterr().out
    assert "base [process 1/2]: 4/4 examples" in out and "base [process 2/2]: 4/4 examples" in out
    assert "base: 2 processes generated 4 + 4 rows" in out
    two_rows = read_jsonl(run.dir / "predictions/base.jsonl")
    assert len(two_rows) == 8 and any(r["output"] for r in one_rows)  # something to compare: not all empty
    for a, b in zip(one_rows, two_rows, strict=True):
        assert (a["id"], a["prediction"], a["output"]) == (b["id"], b["prediction"], b["output"])
    assert two_rows == one_rows  # and every score
    assert (one["processes"], two["processes"]) == (1, 2)
    assert {k: v for k, v in two.items() if k not in TIMINGS} == {k: v for k, v in one.items() if k not in TIMINGS}
    assert two["seconds"] > 0 and two["peak_memory_mb"] > 0
    assert not list(run.dir.glob(".04_evaluate-*"))  # the processes' part files are gone


def test_an_error_in_the_processes_reads_as_in_one_process(tiny_smollm2, tmp_path):
    """The processes' own message, not the launcher's report (torchrun's runs past the last 30 lines it keeps)."""
    run = open_run(ROOT / "params/smoke.yaml", [f"output_dir={tmp_path}", f"model.name={tiny_smollm2}", "evaluate.num_processes=2"])
    base = EvalModel("base", "base", "transformers", str(tiny_smollm2))
    with pytest.raises(TunebookError, match=r"^Stage 01_build_dataset is not run in run 'smoke' .*Run notebooks/01_build_dataset.ipynb first") as raised:
        generate_launched(run, base, [], n=8, backend="hf", max_new_tokens=4)
    assert "\n" not in str(raised.value)
    assert not list(run.dir.glob(".04_evaluate-*"))
