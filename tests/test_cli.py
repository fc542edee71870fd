import json
import subprocess
import sys

import pytest

from conftest import ROOT
from tunebook.cli import select_stages
from tunebook.errors import TunebookError


def tunebook(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_select_stages():
    assert select_stages("4,05") == ["04_evaluate", "05_error_analysis"]
    assert len(select_stages(None)) == 5
    with pytest.raises(TunebookError, match="'9' is not a stage"):
        select_stages("9")


def test_score_reproduces_the_official_values(shared_datasets, tmp_path):
    out = tmp_path / "scored.jsonl"
    result = tunebook("score", shared_datasets / "metric_reference" / "cases.jsonl", "--jsonl-out", out)
    assert result.returncode == 0, result.stderr
    assert "n=75" in result.stdout
    cases = [json.loads(line) for line in (shared_datasets / "metric_reference" / "cases.jsonl").read_text().splitlines()]
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(cases)
    for case, row in zip(cases, scored):
        assert row["exact_match"] == case["squad_v1_1_em"], case["case_id"]
        assert row["f1"] == pytest.approx(case["squad_v1_1_f1"], abs=1e-6), case["case_id"]
        assert 0 <= row["partial_match"] <= 1


def test_score_bad_input_is_one_message(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prediction": "a", "gold_answers": ["a"]}\n{"prediction": "b"}\n')
    result = tunebook("score", bad)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad} row 2: needs 'prediction' (text) and 'gold_answers' (a non-empty list of texts)."


def test_params_typo_stops_before_anything_runs(tmp_path):
    result = tunebook("run", "params/smoke.yaml", "--set", f"output_dir={tmp_path}", "--set", "train.lerning_rate=1")
    assert result.returncode == 2
    assert "Did you mean 'train.learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_params_command_lists_every_key():
    result = tunebook("params")
    assert result.returncode == 0 and "| `train.lora_r` |" in result.stdout


def test_params_update_docs_rewrites_only_the_table_between_the_markers(tmp_path):
    """`params --update-docs FILE` (what docs/params.md is made with; without FILE, docs/params.md from the repository
    root) keeps the page's own text; a page without the markers is one message and stays as it was."""
    page = tmp_path / "params.md"
    page.write_text("# Intro\n\n<!-- params-table:start -->\nSTALE TABLE\n<!-- params-table:end -->\n\nAfter.\n", encoding="utf-8")
    result = tunebook("params", "--update-docs", page)
    assert result.returncode == 0, result.stderr
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Intro\n\n<!-- params-table:start -->\n| key | default | stage | meaning |")
    assert text.endswith("<!-- params-table:end -->\n\nAfter.\n")
    assert "STALE TABLE" not in text and "| `train.lora_r` |" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n", encoding="utf-8")
    result = tunebook("params", "--update-docs", bare)
    assert result.returncode == 2 and "has no <!-- params-table:start --> ... <!-- params-table:end --> markers" in result.stderr
    assert bare.read_text(encoding="utf-8") == "no markers\n"


def test_score_with_hotpot_rules(shared_datasets, tmp_path):
    out = tmp_path / "scored.jsonl"
    result = tunebook("score", shared_datasets / "metric_reference" / "cases.jsonl", "--metric", "hotpot", "--jsonl-out", out)
    assert result.returncode == 0, result.stderr
    cases = [json.loads(line) for line in (shared_datasets / "metric_reference" / "cases.jsonl").read_text().splitlines()]
    for case, row in zip(cases, (json.loads(line) for line in out.read_text().splitlines())):
        if case["hotpot_f1"] is not None:
            assert row["f1"] == pytest.approx(case["hotpot_f1"], abs=1e-6), case["case_id"]
