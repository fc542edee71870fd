import json

import pytest

from tunebook.metrics import faq_score, normalize_answer, rouge_l, score, score_predictions


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


def test_summary_is_the_mean_of_the_example_scores():
    rows, summary = score_predictions("squad", ["a b", "c"], [["a b"], ["d"]])
    assert summary == {"exact_match": 0.5, "partial_match": 0.5, "f1": 0.5}
    assert [r["right"] for r in rows] == [True, False]


def test_classification_counts_invalid_outputs_as_wrong():
    labels = ["sports", "movie", "it"]
    rows, summary = score_predictions("classification", ["sports", "movie", "it", "a film"], [["sports"], ["movie"], ["movie"], ["movie"]], labels)
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert summary["accuracy"] == 0.5 and summary["invalid_rate"] == 0.25
    # per-class F1: sports 1; movie 0.5 (precision 1, recall 1/3); it 0 (only a false positive)
    assert summary["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_rouge_l_and_faq_scores():
    assert rouge_l("Use apt-get to install packages.", "Use apt-get to install packages.") == 1.0
    # longest common subsequence "the cat on the mat": 5 of 6 and 5 of 7 tokens
    assert rouge_l("the cat sat on the mat", "the cat was lying on the mat") == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    assert faq_score("nothing in common", ["Debian uses dpkg."]) == {"rouge_l": 0.0, "f1": 0.0}


def test_faq_summary_has_embedding_similarity():
    golds = [["Install packages with apt-get install or the aptitude program."], ["Debian releases get code names from Toy Story characters."]]
    rows, summary = score_predictions("faq", ["You install packages with apt-get install.", ""], golds)
    assert set(summary) == {"rouge_l", "embedding_similarity", "f1"}
    assert rows[0]["embedding_similarity"] > 0.6 and rows[1]["embedding_similarity"] == 0.0  # empty answer: no credit
    assert rows[0]["right"] is True and rows[1]["right"] is False


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
