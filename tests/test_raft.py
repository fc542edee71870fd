import random

import pytest

from tunebook.dataset.build import DataError, raft_example, to_examples, with_chat
from tunebook.evaluation.evaluate import final_answer
from tunebook.params.schema import DataParams, PromptParams, RaftParams

# A HotpotQA-shaped row written for this test: [title, [sentences]] paragraphs and [title, sentence] facts.
ROW = {
    "id": "h1",
    "question": "Which river town hosts the annual kite fair?",
    "answer": "Windmere",
    "context": [
        ["Windmere", ["Windmere is a river town.", " It hosts an annual kite fair."]],
        ["Oakfield", ["Oakfield is a mining village."]],
        ["Lake Tarn", ["Lake Tarn freezes in winter."]],
        ["Kite flying", ["Kites were first flown in China."]],
        ["Brook Lane", ["Brook Lane is a short street."]],
    ],
    "supporting_facts": [["Windmere", 0], ["Windmere", 1]],
}
FIELDS = DataParams(train_path="x", passages_field="context", answers_field="answer", raft=RaftParams(enabled=True, distractors=2, oracle_drop=0.5))


def test_titled_paragraphs_become_passages_and_oracle_quotes():
    [example] = to_examples([ROW], FIELDS, "hotpot.jsonl", nfkc=False)
    assert example["passages"][0] == "Windmere: Windmere is a river town. It hosts an annual kite fair."
    assert example["oracle_titles"] == ["Windmere"]
    assert example["quotes"] == ["Windmere is a river town.", "It hosts an annual kite fair."]


def test_unknown_oracle_title_is_named():
    row = {**ROW, "supporting_facts": [["Atlantis", 0]]}
    with pytest.raises(DataError, match=r"hotpot.jsonl row 1: oracle passage\(s\) \['Atlantis'\]"):
        to_examples([row], FIELDS, "hotpot.jsonl", nfkc=False)


def test_eval_keeps_oracle_plus_k_distractors_with_reasoning_target():
    [example] = to_examples([ROW], FIELDS, "s", nfkc=False)
    out = raft_example(example, FIELDS.raft, random.Random(0), train=False, answer_prefix="Answer:")
    assert len(out["passages"]) == 3 and out["oracle_kept"]
    assert any(p.startswith("Windmere:") for p in out["passages"])
    assert out["target"] == (
        "The passages say: ##begin_quote## Windmere is a river town. ##end_quote## "
        "##begin_quote## It hosts an annual kite fair. ##end_quote##\nAnswer: Windmere"
    )
    assert with_chat(out, PromptParams())["completion"][0]["content"] == out["target"]
    assert "quotes" not in out and "titles" not in out


def test_training_rows_lose_the_oracle_at_rate_p():
    [example] = to_examples([ROW], FIELDS, "s", nfkc=False)
    rng = random.Random(1)
    rows = [raft_example(example, FIELDS.raft, rng, train=True, answer_prefix="Answer:") for _ in range(400)]
    dropped = [r for r in rows if not r["oracle_kept"]]
    assert 150 < len(dropped) < 250
    assert all(not any(p.startswith("Windmere:") for p in r["passages"]) and len(r["passages"]) == 2 for r in dropped)


def test_answer_only_variant():
    [example] = to_examples([ROW], FIELDS, "s", nfkc=False)
    raft = RaftParams(enabled=True, distractors=2, cot=False)
    assert raft_example(example, raft, random.Random(0), train=True, answer_prefix="Answer:")["target"] == "Windmere"


def test_final_answer_is_the_line_after_the_first_prefix():
    assert final_answer("The passages say: x\nAnswer: Windmere", "Answer:") == "Windmere"
    assert final_answer("Windmere", "Answer:") == "Windmere"
    assert final_answer("Answer: a\nAnswer: b\nThe passages say", "Answer:") == "a"
    assert final_answer("quotes...\nAnswer:", "Answer:") == ""
    assert final_answer("Answer: a", None) == "Answer: a"
