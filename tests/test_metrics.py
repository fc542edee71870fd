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


def test_hotpot_parity_with_official_script(shared_datasets):
    from tunebook.metrics import hotpot_score

    cases = [json.loads(line) for line in (shared_datasets / "metric_reference" / "cases.jsonl").read_text().splitlines()]
    checked = 0
    for case in cases:
        if case["hotpot_em"] is None:
            continue
        got = hotpot_score(case["prediction"], case["gold_answers"])
        assert got["exact_match"] == case["hotpot_em"], case["case_id"]
        assert got["f1"] == pytest.approx(case["hotpot_f1"], abs=1e-6), case["case_id"]
        checked += 1
    assert checked >= 60


def test_hotpot_special_answers():
    from tunebook.metrics import hotpot_f1

    assert hotpot_f1("yes, they were", "yes") == 0.0
    assert hotpot_f1("yes", "yes") == 1.0
    assert hotpot_f1("no", "Norway") == 0.0


def test_jglue_char_f1_and_normalization():
    from tunebook.metrics import char_f1, jglue_normalize

    assert jglue_normalize("東京タワー。") == "東京タワー"
    assert char_f1("東京都", "東京") == pytest.approx(0.8)
    assert char_f1("東京。", "東京") == 1.0
    assert char_f1("", "") == 1.0 and char_f1("", "東京") == 0.0
    assert char_f1("大阪", "東京") == 0.0


def test_aio_normalization_handles_width_brackets_and_quotes():
    from tunebook.metrics import aio_normalize, japanese_score

    assert aio_normalize("ＡＢＣ（雑誌）") == "ABC"
    assert aio_normalize("「ハムレット」") == "ハムレット"
    assert aio_normalize("『ドラえもん』シリーズ") == "ドラえもん"
    assert aio_normalize("徳川家康、江戸幕府の初代将軍") == "徳川家康"
    assert aio_normalize("ａ＝ｂ") == "a=b"
    assert japanese_score("ＡＢＣ", ["ABC"])["exact_match"] == 1.0
    assert japanese_score("答えはABCです", ["ABC"]) == {"exact_match": 0.0, "partial_match": 1.0, "f1": pytest.approx(2 * 3 / 8 * 1 / (3 / 8 + 1))}


def test_classification_scores():
    from tunebook.metrics import classification_scores

    got = classification_scores(["a", "b", "a", "zzz"], ["a", "b", "b", "a"], ["a", "b"])
    assert got["accuracy"] == 0.5
    assert got["invalid_rate"] == 0.25
    # a: tp1 fp1 fn1 -> F1 0.5; b: tp1 fp0 fn1 -> F1 2/3
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
