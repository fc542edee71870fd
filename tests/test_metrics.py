import json

import pytest

from tunebook.metrics import mean_scores, normalize_answer, score


def test_normalization_follows_squad():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple") == "apple"


def test_scores_are_max_over_golds():
    s = score("Denver Broncos won the game", ["Denver Broncos", "Broncos"])
    assert s["exact_match"] == 0.0 and s["partial_match"] == 1.0
    assert s["f1"] == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert score("broncos", ["Denver Broncos", "Broncos"])["exact_match"] == 1.0


def test_partial_match_empty_gold_and_empty_prediction():
    assert score("", ["x"]) == {"exact_match": 0.0, "partial_match": 0.0, "f1": 0.0}
    assert score("anything", ["the"])["partial_match"] == 0.0  # gold normalizes to empty: partial falls back to EM


def test_mean_scores():
    rows = [score("a b", ["a b"]), score("c", ["d"])]
    assert mean_scores(rows) == {"exact_match": 0.5, "partial_match": 0.5, "f1": 0.5}


def test_parity_with_official_squad_v1_1_script(shared_datasets):
    cases = [json.loads(line) for line in (shared_datasets / "metric_reference" / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 75
    for case in cases:
        got = score(case["prediction"], case["gold_answers"])
        assert got["exact_match"] == case["squad_v1_1_em"], case["case_id"]
        assert got["f1"] == pytest.approx(case["squad_v1_1_f1"], abs=1e-6), case["case_id"]
        assert normalize_answer(case["prediction"]) == case["normalized_prediction"], case["case_id"]
