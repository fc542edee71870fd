"""When labels are few: classification rows written by a teacher for each label (stage 01), and the teacher as a judge
of long answers (04 and 05), for real: the teacher is llama-cpp-python's server with the embedded SmolLM2
(tests/servers.py), the student a tiny model of SmolLM2's shape. A 135M teacher writes poor rows and judges poorly, so
these tests check what is written, counted, cached and shown, not quality."""

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from servers import MODEL_ALIAS, FaultProxy, serving
from tunebook.analysis.analysis import analyze
from tunebook.dataset import labelled
from tunebook.dataset.build import build_dataset
from tunebook.evaluation.evaluate import evaluate
from tunebook.run.folder import open_run
from tunebook.run.rows import read_jsonl, write_jsonl

# Our own short news items, two topics: real training rows and real eval rows.
TRAIN = [
    (
        "t1",
        "Late goal lifts City past United",
        "A header in the 89th minute gave City a 2-1 win at home on Saturday, their fourth league win in a row.",
        "sports",
    ),
    ("t2", "How to keep basil fresh", "Trim the stems, stand the bunch in a glass of water and keep it on the counter, not in the fridge.", "cooking"),
]
EVAL = [
    (
        "e1",
        "Tennis star withdraws with wrist injury",
        "The second seed pulled out of the tournament hours before her opening match, citing pain in her wrist.",
        "sports",
    ),
    ("e2", "A simple bread for beginners", "Flour, water, salt and yeast are all you need; let the dough rise overnight and bake it in a hot pot.", "cooking"),
]
LABELS = {"sports": "matches, athletes and results", "cooking": "recipes and kitchen tips"}


def news_rows(rows) -> list[dict]:
    return [{"id": i, "title": t, "body": b, "label": label} for i, t, b, label in rows]


def labelled_params(write_params, tmp_path: Path, base_url: str, eval_file: str = "eval.jsonl", ngram: int = 8, real_rows: int = 0) -> Path:
    return write_params(f"""
run_name: news
output_dir: {tmp_path / "out"}
seed: 0
model: {{name: embedded:SmolLM2-135M-Instruct, max_seq_length: 512}}
data:
  train_path: {tmp_path / "train.jsonl"}
  eval_path: {tmp_path / eval_file}
  question_field: title
  passages_field: body
  answers_field: label
  labels: {json.dumps(LABELS)}
prompt:
  instruction: Classify the news item into exactly one topic. Reply with the topic label only.
  template: "{{instruction}}\\n\\nTopics: {{labels}}\\n\\nTitle: {{question}}\\n\\n{{passages}}"
synthesize:
  teacher: {{model: {MODEL_ALIAS}, base_url: "{base_url}", max_new_tokens: 60, cache_dir: {tmp_path / "cache"}}}
  labelled:
    examples_per_label: 2
    lengths: [short, long]
    tones: [neutral]
    subtopics: {{cooking: [bread, soup]}}
    style_examples: 0
    real_rows: {real_rows}
  # A 135M teacher writes stubs ("Sports" / "Cooking"): the lengths are open, so that some rows reach the label check.
  clean: {{min_question_chars: 1, min_passage_chars: 1, decontamination_ngram: {ngram}}}
evaluate: {{metric: classification}}
""")


@pytest.fixture
def proxy(llama_server):
    with serving(FaultProxy(llama_server, slow_seconds=0)) as p:
        yield p


def test_rows_written_per_label_cleaned_checked_and_decontaminated(proxy, write_params, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", news_rows(TRAIN))
    write_jsonl(tmp_path / "eval.jsonl", news_rows(EVAL))
    built = build_dataset(open_run(labelled_params(write_params, tmp_path, proxy.base_url)))
    s = built.summary.synthetic
    rows = read_jsonl(Path(s["rows_jsonl"]))
    assert s["requests"] == 4 and s["failed_requests"] == 0 and len(rows) == 4 - s["unparsed_replies"]
    # What each request asked for is kept on its row: lengths in turn, the one tone, cooking's sub-topics in turn.
    for r in rows:
        k = int(r["id"].rsplit("-", 1)[1]) - 1
        assert r["attributes"]["length"] == ["short", "long"][k] and r["attributes"]["tone"] == "neutral"
        if r["label"] == "cooking":
            assert r["attributes"]["subtopic"] == ["bread", "soup"][k]
    # The funnel: each step's count is the rows it marked, per label too.
    steps = s["steps"]
    assert [r["step"] for r in steps] == [
        "parsed from the teacher's replies",
        "length",
        "near duplicate of a real training row",
        "near duplicate within its label",
        "near duplicate of another label's row",
        "shares an n-gram with an eval text",
        "label not confirmed by the teacher",
    ]
    for before, after in zip(steps, steps[1:]):
        assert after["kept"] == before["kept"] - after["removed"] and after["removed"] == sum(r["dropped_by"] == after["step"] for r in rows)
    table = labelled.label_table(built)
    assert list(table.index) == list(LABELS) and table["written"].sum() == len(rows) and table["kept"].sum() == steps[-1]["kept"]
    # The label check: the teacher's label, without seeing the row's; a row it does not confirm is dropped and counted.
    checked = [r for r in rows if "checked_label" in r]
    assert len(checked) == steps[-2]["kept"] >= 2
    assert all((r["dropped_by"] == "label not confirmed by the teacher") == (r["checked_label"] != r["label"]) for r in checked)
    assert steps[-1]["removed"] >= 1  # a 135M teacher answers most checks with the label it read first
    kept = [r for r in rows if r["dropped_by"] is None]
    assert kept, "the 135M teacher confirmed no row here: the test needs one"
    # Training rows are the kept rows only (real_rows: 0), labelled; eval rows are the real ones.
    assert sorted(e["id"] for e in built.train) == sorted(r["id"] for r in kept)
    assert all(e["completion"][0]["content"] == e["answers"][0] and e["attributes"] for e in built.train)
    assert sorted(e["id"] for e in built.eval) == ["e1", "e2"]
    shown = labelled.sample_rows(built, per_label=3)
    assert isinstance(shown, pd.DataFrame) and set(shown["label"]) <= set(LABELS) and len(shown) == len(rows)
    assert built.teacher_table()["teacher"]["rows asked for"] == 4

    # An eval text that a row the label check saw repeats (n-grams as long as its words allow): the row is dropped by
    # decontamination and counted, and no reply is asked again. One real training row is mixed in (real_rows: 1).
    copied = next(r for r in checked if r["dropped_by"] is not None)
    write_jsonl(tmp_path / "eval2.jsonl", [*news_rows(EVAL), {"id": "e4", "title": copied["question"], "body": copied["passage"], "label": copied["label"]}])
    sent = len(proxy.bodies)
    ngram = min(8, len(f"{copied['question']} {copied['passage']}".split()))
    rebuilt = build_dataset(open_run(labelled_params(write_params, tmp_path, proxy.base_url, "eval2.jsonl", ngram, real_rows=1)))
    again = rebuilt.summary.synthetic
    rows_again = read_jsonl(Path(again["rows_jsonl"]))
    assert {r["id"]: r["dropped_by"] for r in rows_again}[copied["id"]] == "shares an n-gram with an eval text"
    assert again["steps"][5]["removed"] == sum(r["dropped_by"] == "shares an n-gram with an eval text" for r in rows_again) >= 1
    assert copied["id"] not in {e["id"] for e in rebuilt.train}
    real = [e for e in rebuilt.train if not e["id"].startswith("teacher-")]
    assert len(real) == 1 == again["real_rows"] and real[0]["id"] in {"t1", "t2"}
    assert len(rebuilt.train) == again["steps"][-1]["kept"] + 1
    assert len(proxy.bodies) == sent and again["teacher"]["requests"] == 0  # every reply came from the cache


FAQ = [
    ("q1", "How do I install a package with Tidepool?", "To install a package, run tide add NAME.", "Run tide add NAME."),
    ("q2", "How often is a stable Reef release published?", "Reef publishes a new stable release every nine months.", "Every nine months."),
    ("q3", "How do I remove a package with Tidepool?", "To remove a package, run tide drop NAME.", "Run tide drop NAME."),
    ("q4", "What does error code 42 mean?", "Error code 42 means that the package database is locked.", "The package database is locked."),
    ("q5", "How long is a stable release supported?", "Each stable release receives security updates for three years.", "Three years."),
]


def test_the_judge_scores_answers_in_04_and_05_and_caches_its_replies(proxy, tiny_smollm2, write_params, tmp_path):
    write_jsonl(tmp_path / "faq.jsonl", [{"id": i, "question": q, "passages": [p], "answers": [a]} for i, q, p, a in FAQ])
    run = open_run(
        write_params(f"""
run_name: faq_judge
output_dir: {tmp_path / "out"}
seed: 0
model: {{name: "{tiny_smollm2}", max_seq_length: 256}}
data: {{train_path: {tmp_path / "faq.jsonl"}, eval_size: 3}}
synthesize:
  teacher: {{model: {MODEL_ALIAS}, base_url: "{proxy.base_url}", max_new_tokens: 40, cache_dir: {tmp_path / "cache"}}}
evaluate: {{metric: faq, models: [base], judge: true, batch_size: 4, max_new_tokens: 8}}
""")
    )
    build_dataset(run)
    table = evaluate(run)
    row = table[0]
    assert {"rouge_l", "embedding_similarity", "judge_score"} <= set(row)
    predictions = read_jsonl(Path(run.outputs_of("04_evaluate").predictions["base"]))
    scores = [p["judge_score"] for p in predictions]
    assert len(scores) == 3 and all(s is None or 1 <= s <= 5 for s in scores)
    assert all(s == 1 for p, s in zip(predictions, scores) if not p["prediction"].strip())  # empty: the worst, unasked
    scored = [s for s in scores if s is not None]
    assert row["judge_score"] == pytest.approx(sum(scored) / len(scored) if scored else 0.0, abs=1e-4)
    assert row.get("judge_unscored", 0) == scores.count(None)
    asked = sum(bool(p["prediction"].strip()) for p in predictions)
    assert len(proxy.bodies) == asked
    assert "judge_score" in pd.DataFrame(table).set_index("model").columns  # 04's table, as the notebook shows it

    result = analyze(run)  # 05: the scores per model, and each answer's in the report
    judged = result["judge"][0]
    assert judged["model"] == "base" and sum(judged[str(s)] for s in range(1, 6)) + judged["unscored"] == judged["n"] == 3
    assert json.loads((run.dir / "analysis.json").read_text())["judge"] == result["judge"]
    assert "judge " in (run.dir / "report.html").read_text()

    evaluate(run)  # scored again: every judge reply comes from the cache
    assert len(proxy.bodies) == asked


def test_the_teachers_label_and_the_attributes_asked_for(write_params, tmp_path):
    """How a classification reply is read (the label named, loosely; never a guess between two), and what each request
    asks for (every value in turn, evenly)."""
    labels = ["sports", "e-sports", "cooking"]
    assert labelled.parse_label('{"label": "cooking"}', labels) == "cooking"
    assert labelled.parse_label('{"label": "E-Sports."}', labels) == "e-sports"
    assert labelled.parse_label("It is about e-sports, I think", labels) == "e-sports"  # the longest label it holds
    assert labelled.parse_label('{"label": "sports or cooking"}', labels) is None
    assert labelled.parse_label('{"title": "no label here"}', labels) is None
    assert labelled.parse_example('{"title": "T", "body": {"text": "nested", "more": ["parts"]}}', "title", "body") == {
        "question": "T",
        "passage": "nested parts",
    }
    write_jsonl(tmp_path / "eval.jsonl", news_rows(EVAL))
    p = open_run(labelled_params(write_params, tmp_path, "http://127.0.0.1:9/v1")).params
    asked = [labelled.attributes(p, "cooking", k) for k in range(4)]
    assert [a["length"] for a in asked] == ["short", "long"] * 2 and [a["subtopic"] for a in asked] == ["bread", "soup"] * 2
    assert labelled.attributes(p, "sports", 0)["subtopic"] is None  # the teacher picks one and names it
    from tunebook.colab import runtime
    from tunebook.params.load import load_params

    teacher_recipe = load_params(ROOT / "params" / "livedoor_teacher.yaml")
    assert "synthesize.labelled" in runtime.groups_for(teacher_recipe, "01_build_dataset")["documents"]
    judged = teacher_recipe.model_copy(update={"evaluate": teacher_recipe.evaluate.model_copy(update={"metric": "faq", "judge": True})})
    assert "evaluate.judge" in runtime.groups_for(judged, "04_evaluate")["documents"]
