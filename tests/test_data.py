import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from tunebook.dataset.build import DataError, chat_prompt, class_labels, read_rows, retrieve_passages, split_examples, to_examples, with_chat
from tunebook.params.schema import DataParams, PromptParams, RetrievalParams

FIELDS = DataParams(train_path="x")
ROW = {"id": "r1", "question": "Who?", "passages": ["Ada wrote it.", "Other text."], "answers": ["Ada"]}


def test_reads_jsonl_json_csv_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps([ROW]), encoding="utf-8")
    pd.DataFrame([{**ROW, "passages": json.dumps(ROW["passages"]), "answers": "Ada"}]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame([ROW]).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        rows = read_rows(str(tmp_path / name), "train")
        [example] = to_examples(rows, FIELDS, name, nfkc=False)
        assert example["passages"] == ROW["passages"] and example["answers"] == ["Ada"], name


def test_missing_field_names_the_row(tmp_path):
    rows = [ROW, {"id": "r2", "question": "Q", "passages": ["p"]}]
    with pytest.raises(DataError, match=r"data.jsonl row 2: missing field\(s\) \['answers'\]"):
        to_examples(rows, FIELDS, "data.jsonl", nfkc=False)


def test_field_mapping_and_duplicate_ids():
    rows = [{"q": "Who?", "ctx": "Ada wrote it.", "gold": "Ada"}]
    fields = DataParams(train_path="x", question_field="q", passages_field="ctx", answers_field="gold", id_field=None)
    [example] = to_examples(rows, fields, "s", nfkc=False)
    assert example["passages"] == ["Ada wrote it."] and example["id"] == "1"
    with pytest.raises(DataError, match="duplicate id 'r1'"):
        to_examples([ROW, ROW], FIELDS, "s", nfkc=False)


def test_bad_files_get_one_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8 text .* line 1"):
        read_rows(str(bad), "train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROW) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_rows(str(broken), "train")
    with pytest.raises(DataError, match="Data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(DataError, match="no rows"):
        to_examples([], FIELDS, "empty.jsonl", nfkc=False)


def test_nfkc_normalizes_full_width():
    row = {**ROW, "answers": ["ＡＢＣ＝１"]}
    [example] = to_examples([row], FIELDS, "s", nfkc=True)
    assert example["answers"] == ["ABC=1"]


def test_split_is_deterministic_and_keeps_groups_together():
    examples = [{"id": str(i), "group": f"g{i // 4}"} for i in range(40)]
    train, evaluation = split_examples(examples, 0.25, seed=1)
    assert (train, evaluation) == split_examples(examples, 0.25, seed=1)
    assert len(evaluation) == 12  # whole groups of 4 until at least 10 rows
    assert not {e["group"] for e in train} & {e["group"] for e in evaluation}
    with pytest.raises(DataError, match="leaves no training rows"):
        split_examples(examples, 40, seed=1)


def test_prompt_holds_instruction_numbered_passages_and_question():
    prompt = PromptParams(system="Be brief.")
    [example] = to_examples([ROW], FIELDS, "s", nfkc=False)
    messages = chat_prompt(example, prompt)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert "[1] Ada wrote it.\n\n[2] Other text." in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Who?")
    assert with_chat(example, prompt)["completion"] == [{"role": "assistant", "content": "Ada"}]


def test_default_dataset_is_reproducible_and_sound(tmp_path):
    shipped = (ROOT / "data" / "minipedia_rag_qa.jsonl").read_bytes()
    subprocess.run([sys.executable, str(ROOT / "data" / "build_minipedia_rag_qa.py")], check=True, capture_output=True)
    assert (ROOT / "data" / "minipedia_rag_qa.jsonl").read_bytes() == shipped
    rows = [json.loads(line) for line in shipped.decode().splitlines()]
    assert len(rows) >= 400
    for row in rows:
        assert len(row["passages"]) == 3
        assert any(row["answers"][0] in p for p in row["passages"]), row["id"]


def test_dotted_fields_reach_into_nested_records():
    rows = [{"id": "1", "question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada", "Ada L."], "answer_start": [0, 0]}}]
    fields = DataParams(train_path="x", passages_field="context", answers_field="answers.text")
    [example] = to_examples(rows, fields, "s", nfkc=False)
    assert example["answers"] == ["Ada", "Ada L."]
    with pytest.raises(DataError, match=r"missing field\(s\) \['answers.text'\]"):
        to_examples([{**rows[0], "answers": {"answer_start": [0]}}], fields, "s", nfkc=False)


def test_template_places_labels_title_and_a_cut_passage():
    prompt = PromptParams(instruction="Pick a genre.", template="{instruction}\nGenres: {labels}\nTitle: {question}\n{passages}")
    row = {"id": "1", "title": "Striker scores", "body": "The striker scored twice on Sunday.", "label": "sports"}
    fields = DataParams(train_path="x", question_field="title", passages_field="body", answers_field="label", passage_max_chars=11)
    [example] = to_examples([row], fields, "s", nfkc=False)
    message = chat_prompt(example, prompt, ["movie", "sports"])[0]["content"]
    assert message == "Pick a genre.\nGenres: movie, sports\nTitle: Striker scores\n[1] The striker"


def test_template_placeholders_are_checked():
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['context'\]"):
        PromptParams(template="{instruction} {context}")
    with pytest.raises(ValueError, match="literal braces"):
        PromptParams(template="{instruction} {")


def test_class_labels_come_from_training_and_unknown_gold_is_named():
    train = [{"answers": ["sports"]}, {"answers": ["movie"]}]
    assert class_labels(train, [{"answers": ["movie"]}], DataParams(train_path="x")) == ["movie", "sports"]
    with pytest.raises(DataError, match=r"Gold label\(s\) \['peachy'\] are not among the training split's labels"):
        class_labels(train, [{"answers": ["peachy"]}], DataParams(train_path="x"))
    with pytest.raises(DataError, match=r"\['movie'\] are not among data.labels"):
        class_labels(train, [], DataParams(train_path="x", labels=["sports"]))


def test_retrieval_fills_passages_and_reports_gold_hits(tmp_path):
    corpus = [
        {"id": "apt", "text": "Use apt-get install to add packages to the system."},
        {"id": "names", "text": "Release code names come from Toy Story characters."},
        {"id": "kernel", "text": "The Linux kernel is packaged as linux-image."},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in corpus), encoding="utf-8")
    fields = DataParams(
        train_path="x",
        question_field="q",
        answers_field="a",
        retrieval=RetrievalParams(corpus_path=str(path), top_k=1, gold_id_field="doc"),
    )
    rows = [
        {"id": "1", "q": "How do I install packages?", "a": "apt-get install", "doc": "apt"},
        {"id": "2", "q": "Where do release code names come from?", "a": "Toy Story", "doc": "kernel"},
    ]
    examples = retrieve_passages(to_examples(rows, fields, "s", nfkc=False), fields)  # no passages field needed
    assert [e["doc_ids"] for e in examples] == [["apt"], ["names"]]
    assert examples[0]["passages"] == [corpus[0]["text"]]
    assert [e["gold_retrieved"] for e in examples] == [True, False]
    bad = DataParams(train_path="x", question_field="q", answers_field="a", retrieval=RetrievalParams(corpus_path=str(path), text_field="body"))
    with pytest.raises(DataError, match=r"docs.jsonl row 1: needs an id in 'id' and text in 'body'"):
        retrieve_passages(examples, bad)


def test_relabel_marks_from_05_fix_the_next_build(tmp_path):
    """The default data with two marks from 05's browser: an accepted answer becomes a gold, a wrong gold's example goes."""
    from tunebook.analysis.browser import write_marks
    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run

    rows = [json.loads(line) for line in (ROOT / "data" / "minipedia_rag_qa.jsonl").read_text().splitlines()]
    accepted, wrong = rows[0], rows[1]
    marks = tmp_path / "relabels.jsonl"
    write_marks(
        marks,
        {
            ("finetuned", accepted["id"]): {"model": "finetuned", "id": accepted["id"], "prediction": "an answer of our own", "mark": "also_acceptable"},
            ("base", wrong["id"]): {"model": "base", "id": wrong["id"], "prediction": "x", "mark": "gold_wrong"},
            ("base", "no-such-id"): {"model": "base", "id": "no-such-id", "prediction": "y", "mark": "also_acceptable"},
        },
    )
    run = open_run(ROOT / "params/default.yaml", [f"output_dir={tmp_path / 'out'}", f"data.relabels_path={marks}", "data.max_train_examples=1000"])
    built = build_dataset(run)
    examples = {e["id"]: e for e in built.train + built.eval}
    assert examples[accepted["id"]]["answers"] == [*accepted["answers"], "an answer of our own"]
    assert wrong["id"] not in examples and len(examples) == len(rows) - 1
    assert built.summary.relabeled == {"answers_added": 1, "examples_dropped": 1, "marks_for_other_ids": 1}
    marks.write_text('{"id": "1", "mark": "looks odd"}\n')
    with pytest.raises(DataError, match=r"relabels.jsonl mark 1: expected id, prediction and mark"):
        build_dataset(open_run(ROOT / "params/default.yaml", [f"output_dir={tmp_path / 'out2'}", f"data.relabels_path={marks}"]))
