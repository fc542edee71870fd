"""Inputs that used to give silently wrong results now stop the run or say so (issue 20): an eval split that repeats
training rows (01 stops, the run folder untouched), a model or API baseline that produced no answers (not scored; 04
writes the others, then fails), gold answers missing from their passages (01 warns and records them, 05 flags them).
Real stages through the CLI and papermill on a tiny run: 12 rows, 4 held out, the base model only, 4 new tokens."""

import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from servers import failing_endpoint, free_port
from tunebook.analysis.analysis import analyze
from tunebook.dataset.build import EvalOverlapError, build_dataset, eval_overlap, read_jsonl
from tunebook.evaluation.evaluate import EvaluationFailed, evaluate, no_answers
from tunebook.run.folder import open_run
from tunebook.run.notebooks import StageFailed, execute_stage

GOLD_REMOVED = ("q1", "q3")  # these rows' passages lose every gold answer: half of each article


def tunebook(*args):
    return subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def remove_golds(row: dict) -> dict:
    passages = row["passages"]
    for answer in sorted(row["answers"], key=len, reverse=True):
        passages = [re.sub(re.escape(answer), "[removed]", p, flags=re.IGNORECASE) for p in passages]
    return {**row, "passages": passages}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first 12 minipedia rows (3 articles of 4 questions); the q1 and q3 rows without their gold in the passages."""
    rows = read_jsonl(ROOT / "data/minipedia_rag_qa.jsonl")[:12]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(remove_golds(r) if r["id"].endswith(GOLD_REMOVED) else r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny(output_dir: Path, data_file: Path) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"data.train_path={data_file}",
        "data.eval_size=4",
        "data.max_train_examples=null",
        "evaluate.models=[base]",
        "evaluate.max_new_tokens=4",
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_file):
    """Stages 01 and 04 of params/smoke.yaml on data_file through the CLI, then 05's analysis (its notebook's run
    comparison wants a fine-tuned row): (run folder, the CLI's stderr, where papermill logs the cells' output, 05's output)."""
    out = tmp_path_factory.mktemp("outputs")
    result = tunebook("run", "params/smoke.yaml", "--stages", "01,04", *sets(*tiny(out, data_file)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        analyze(open_run(out / "smoke" / "params.yaml"))
    return out / "smoke", result.stderr, printed.getvalue()


BOOKKEEPING = re.compile(r"^(params(\.\d+)?\.yaml|notebooks/.*\.ipynb)$")  # what any command writes: its params, its notebook


def hashes(folder: Path, skip=BOOKKEEPING) -> dict[str, str]:
    """sha256 of every file in the run folder except the params and executed notebooks each command (re)writes."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if not skip.match(str(p.relative_to(folder)))}


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


# ---- (a) an eval split that repeats training rows ----


def test_eval_overlap_matches_ids_and_questions_with_their_answer():
    train = [
        {"qid": "t1", "q": "Who wrote Hamlet?", "a": ["Shakespeare"]},
        {"qid": "t2", "q": "aptitude", "a": "Use aptitude to install."},
        {"qid": "7", "q": "How tall is it?", "a": ["10 m"]},
    ]
    evaluation = [
        {"qid": "e1", "q": "  who WROTE hamlet ", "a": ["ｓｈａｋｅｓｐｅａｒｅ"]},  # case, width, spacing, punctuation ignored
        {"qid": "e2", "q": "Aptitude", "a": "Use apt-get instead."},  # the same heading with another answer: a different row
        {"qid": "7", "q": "Where is it?", "a": ["Paris"]},  # the same id, another question
        {"qid": "e4", "q": "Who painted it?", "a": ["Monet"]},
    ]
    found = eval_overlap(train, evaluation, id_field="qid", question_field="q", answers_field="a")
    assert [(o.eval_id, o.train_id, o.by) for o in found] == [("e1", "t1", ("question",)), ("7", "7", ("id",))]
    assert found[1].train_question == "How tall is it?"
    assert [o.eval_id for o in eval_overlap(train, evaluation, id_field=None, question_field="q", answers_field="a")] == ["row 1"]
    assert [o.eval_id for o in eval_overlap(train, evaluation, id_field="qid", question_field="q", answers_field="a", match_ids=False)] == ["e1"]
    # 01's examples (id, question, answers) with the defaults; rows without an id are compared by question only.
    assert eval_overlap([{"question": "Q?", "answers": ["x"]}], [{"question": "q", "answers": ["X"]}])[0].by == ("question",)


def test_overlap_through_the_cli_stops_before_01_and_leaves_the_run_folder_as_it_was(tiny_run, data_file, tmp_path):
    """The preflight of `run` stops it: the eval file is the training file, or a copy of some of its rows."""
    run_dir, *_ = tiny_run
    before = hashes(run_dir)
    result = tunebook("run", "params/smoke.yaml", "--stages", "01", *sets(*tiny(run_dir.parent, data_file), f"data.eval_path={data_file}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"- train/eval overlap: data.eval_path is the training file ({data_file}): every eval row would be a training row" in result.stderr
    copy = tmp_path / "eval.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(data_file)[:3]), encoding="utf-8")
    result = tunebook("run", "params/smoke.yaml", "--stages", "01", *sets(*tiny(run_dir.parent, data_file), f"data.eval_path={copy}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "- train/eval overlap: 3 of 3 eval rows repeat a training row (by id and question; e.g. eval id 'a-001-q1': "
        "'How deep is Lake Baikal at its deepest point?'), so their scores would count answers the model was trained on."
    ) in result.stderr
    assert "or set data.allow_eval_overlap: true." in result.stderr
    assert hashes(run_dir) == before  # the manifest too: nothing marked failed or stale, the dataset as it was


def test_allowed_overlap_is_noted_and_recorded(tmp_path, data_file, capsys):
    run = open_run(ROOT / "params/smoke.yaml", [*tiny(tmp_path, data_file), f"data.eval_path={data_file}", "data.allow_eval_overlap=true"])
    built = build_dataset(run)
    assert "Note: 12 of 12 eval rows repeat a training row (data.allow_eval_overlap: true" in capsys.readouterr().out
    assert built.summary.eval_overlap == {"rows": 12, "of": 12, "ids": [f"a-00{a}-q{q}" for a in (1, 2, 3) for q in (1, 2, 3, 4)], "allowed": True}


def test_rows_duplicated_across_the_split_are_overlap(tmp_path, data_file):
    """One file split by data.eval_size: rows that occur twice (another id, another article) land on both sides."""
    rows = read_jsonl(data_file)
    copies = [{**r, "id": f"copy-{r['id']}", "article": f"copy-{r['article']}"} for r in rows]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + copies), encoding="utf-8")
    run = open_run(ROOT / "params/smoke.yaml", tiny(tmp_path, tmp_path / "dup.jsonl"))
    with pytest.raises(EvalOverlapError) as error:
        build_dataset(run)
    lines = str(error.value).splitlines()
    assert lines[0] == (
        "4 of 4 eval rows repeat a training row (4 by question with the same gold answer; case, width, punctuation and "
        "spacing ignored), so their scores would count answers the model was trained on. For example:"
    )
    assert re.fullmatch(r"  - eval id '(copy-)?(a-00\d-q1)', training id '(copy-)?\2': .+", lines[1])
    assert lines[-1] == (
        f"data.train_path ({tmp_path / 'dup.jsonl'}) holds these rows more than once, and the copies fell on both sides "
        "of the data.eval_size split. Fix the file (remove the duplicate rows), or set data.allow_eval_overlap: true if the overlap is intended."
    )
    assert not (run.dir / "manifest.json").exists()  # stopped before the stage began


def test_ids_shared_by_numbering_alone_are_named(tmp_path, data_file):
    rows = read_jsonl(data_file)
    renumbered = [{**r, "id": str(i)} for i, r in enumerate(rows, 1)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renumbered[:8]), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({**r, "id": str(i)}) + "\n" for i, r in enumerate(renumbered[8:], 1)), encoding="utf-8")
    run = open_run(ROOT / "params/smoke.yaml", [*tiny(tmp_path, tmp_path / "train.jsonl"), f"data.eval_path={tmp_path / 'eval.jsonl'}"])
    with pytest.raises(EvalOverlapError, match=r"4 of 4 eval rows repeat a training row \(4 by id;") as error:
        build_dataset(run)
    assert str(error.value).splitlines()[-1] == (
        "4 of them share only the id (data.id_field 'id'), not the question: if the two files number their rows independently, "
        "their ids name different rows; then set data.id_field to empty (ids = row numbers)."
    )
    run = open_run(ROOT / "params/smoke.yaml", [*tiny(tmp_path, tmp_path / "train.jsonl"), f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.id_field=null"])
    assert build_dataset(run).summary.eval_overlap["rows"] == 0


# ---- (b) a model or API baseline that produced no answers ----


def dead_baseline(*labels: str, url: str | None = None) -> str:
    """evaluate.api_baselines: endpoints at closed ports (or `url`), no retries (each request fails at once)."""
    rows = [
        {"label": label, "base_url": url or f"http://127.0.0.1:{free_port()}/v1", "model": "none", "api_key_env": None, "max_retries": 0}
        for label in labels or ("dead-api",)
    ]
    return f"evaluate.api_baselines={json.dumps(rows)}"


def test_dead_api_baseline_is_not_scored_and_04_fails_through_the_cli(tiny_run, data_file):
    """An endpoint that is up (the preflight finds it listing its model) but fails every request."""
    run_dir, *_ = tiny_run
    before, metrics = hashes(run_dir), json.loads((run_dir / "metrics.json").read_text())
    with failing_endpoint() as url:
        baseline = dead_baseline(url=url)
        result = tunebook("run", "params/smoke.yaml", "--stages", "04", *sets(*tiny(run_dir.parent, data_file), baseline))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    failed = run_dir / "predictions" / "dead-api.failed.jsonl"
    assert (
        f"Stage 04_evaluate failed: EvaluationFailed: dead-api (API baseline at {url}) produced no answers: all 4 requests failed after "
        "their retries; the first error: InternalServerError HTTP 500: Error code: 500 - the model failed to load. Is the endpoint up, and are its base_url, model and api_key_env in evaluate.api_baselines right? "
        f"It was not scored and has no row in metrics.json; its rows are in {failed}."
    ) in result.stderr, result.stderr
    assert "The other models were scored and written (metrics.json, predictions/): base." in result.stderr
    # No row of zeros; base scored again, the same greedy answers; its predictions and everything before 04 as they were.
    after = json.loads((run_dir / "metrics.json").read_text())
    assert [r["model"] for r in after] == ["base"]
    assert {k: after[0][k] for k in ("exact_match", "partial_match", "f1", "n")} == {k: metrics[0][k] for k in ("exact_match", "partial_match", "f1", "n")}
    changed = {k for k, v in hashes(run_dir).items() if before.get(k) != v}
    assert changed == {"manifest.json", "metrics.json", "metrics.csv", "predictions/dead-api.failed.jsonl"}
    assert [r["request"]["status"] for r in read_jsonl(failed)] == ["failed"] * 4
    stages = manifest(run_dir)["stages"]
    assert stages["01_build_dataset"]["status"] == "complete" and stages["05_error_analysis"]["status"] == "stale"
    assert stages["04_evaluate"]["status"] == "failed" and "dead-api (API baseline at" in stages["04_evaluate"]["error"]


def test_nothing_scored_through_papermill_leaves_the_metrics_as_they_were(tiny_run):
    """The notebook path (run/notebooks.py's execute_stage, as `run` and a sweep execute a stage): only a dead baseline to score."""
    run_dir, *_ = tiny_run
    before = hashes(run_dir, skip=re.compile(BOOKKEEPING.pattern + "|^manifest.json$|^predictions/dead-api.failed.jsonl$"))
    with failing_endpoint() as url, pytest.raises(StageFailed) as error:
        execute_stage("04_evaluate", run_dir / "params.yaml", run_dir, {"overrides": ["evaluate.models=[]", dead_baseline(url=url)]})
    message = str(error.value)
    assert message.startswith("Stage 04_evaluate failed: EvaluationFailed: dead-api (API baseline at http://127.0.0.1:")
    assert "No model was scored: metrics.json and metrics.csv were left as they were." in message
    executed = nbformat.read(error.value.notebook, as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert [e["ename"] for e in errors] == ["EvaluationFailed"] and "produced no answers" in errors[0]["evalue"]
    assert hashes(run_dir, skip=re.compile(BOOKKEEPING.pattern + "|^manifest.json$|^predictions/dead-api.failed.jsonl$")) == before


def test_the_error_carries_each_failed_model_for_callers(tiny_run):
    """In-process callers of evaluate() (a bench, a script) get the failed models' records, not only a message."""
    run_dir, *_ = tiny_run
    run = open_run(run_dir / "params.yaml", ["evaluate.models=[]", dead_baseline("dead-a", "dead-b")])
    with pytest.raises(EvaluationFailed) as error:
        evaluate(run)
    assert [(f["label"], f["format"], f["n"], f["reason"].split(";")[0]) for f in error.value.failures] == [
        ("dead-a", "api", 4, "all 4 requests failed after their retries"),
        ("dead-b", "api", 4, "all 4 requests failed after their retries"),
    ]
    assert error.value.table == [] and str(error.value).count("produced no answers") == 2


def test_why_a_model_produced_no_answers():
    ok, failed = {"status": "ok", "error": None}, {"status": "failed", "error": "APIConnectionError: Connection error."}
    assert no_answers(["", "Paris"], ["", "Paris"], None) is None  # one answer is enough: scored, its empties counted in 05
    assert (
        no_answers(["", ""], ["", ""], [failed, ok])
        == "1 of 2 requests failed (the first error: APIConnectionError: Connection error.) and the other 1 replies were empty"
    )
    assert no_answers(["", ""], ["", ""], [ok, ok]) == "all 2 replies were empty"
    assert no_answers(["", ""], [" ", ""], None) == "all 2 outputs are empty"  # a local model that ends every answer at once
    assert no_answers(["", ""], ["<think>hm</think>", "Answer:"], None) == (
        "all 2 outputs are empty once the <think> block and the part before prompt.final_answer_prefix are taken out"
    )


# ---- (c) gold answers missing from their passages ----


def test_missing_golds_are_warned_about_in_01_recorded_and_flagged_in_05(tiny_run):
    run_dir, logged, printed = tiny_run
    dataset = run_dir / "dataset"
    assert (
        "Warning: 4 of 8 training rows (50.0%) have no gold answer in their passages (case, width, punctuation and spacing ignored), "
        "so the model is taught to answer without evidence. Check data.answers_field ('answers') and data.passages_field ('passages'). "
        f"They carry gold_in_passages: false in {dataset / 'train.jsonl'}."
    ) in logged
    assert (
        "Warning: 2 of 4 eval rows (50.0%) have no gold answer in their passages (case, width, punctuation and spacing ignored), "
        "so no model can read their answers there (05 flags them 'retrieval miss')."
    ) in logged
    outputs = manifest(run_dir)["stages"]["01_build_dataset"]["outputs"]
    for split in ("train", "eval"):
        rows = read_jsonl(dataset / f"{split}.jsonl")
        missing = [r["id"] for r in rows if r["gold_in_passages"] is False]
        assert missing == [r["id"] for r in rows if r["id"].endswith(GOLD_REMOVED)] and all(r["gold_in_passages"] for r in rows if r["id"] not in missing)
        assert outputs["gold_missing"][split] == {"rows": len(missing), "of": len(rows), "share": 0.5, "ids": missing}
    assert {r["split"]: r["gold_in_passages"] for r in outputs["table"]} == {"train": 4, "eval": 2}
    eval_missing = outputs["gold_missing"]["eval"]["ids"]
    assert json.loads((run_dir / "analysis.json").read_text())["gold_missing"] == {"rows": 2, "of": 4, "ids": eval_missing}
    report = (run_dir / "report.html").read_text()
    assert "2 of 4 eval questions have no gold answer in their passages" in report
    assert report.count('data-miss="1"') == 2  # the base model's answers to those two questions
    assert "2 of 4 eval questions have no gold answer in their passages: their answers are flagged 'retrieval miss'" in printed


def test_no_gold_check_for_labels_or_long_answers(tmp_path, data_file, capsys):
    run = open_run(ROOT / "params/smoke.yaml", [*tiny(tmp_path, data_file), "evaluate.metric=faq"])
    built = build_dataset(run)
    assert built.summary.gold_missing is None and "gold_in_passages" not in built.eval[0]
    assert "Warning" not in capsys.readouterr().out
