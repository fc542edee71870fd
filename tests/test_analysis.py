from tunebook.analysis import (
    categorize, closest_gold, confusion_matrix, diff_html, gold_in_passages, highlight, is_right, item_html, report_html, transitions,
)


def test_categories():
    assert categorize("", ["Paris"]) == "empty"
    assert categorize("ＰＡＲＩＳ。", ["Paris"]) == "normalization"
    assert categorize("a=b", ["a ＝ b"]) == "normalization"
    assert categorize("The answer is Paris, France.", ["Paris"]) == "too_verbose"
    assert categorize("Bonaparte", ["Napoleon Bonaparte"]) == "truncated"
    assert categorize("London", ["Paris"]) == "wrong"


def test_transitions():
    base = [{"id": "1", "exact_match": 0}, {"id": "2", "exact_match": 1}, {"id": "3", "exact_match": 0}, {"id": "4", "exact_match": 1}]
    tuned = [{"id": "1", "exact_match": 1}, {"id": "2", "exact_match": 0}, {"id": "3", "exact_match": 0}, {"id": "4", "exact_match": 1}]
    assert transitions(base, tuned) == {"fixed": 1, "broken": 1, "still_wrong": 1, "both_right": 1}


def test_highlight_marks_gold_and_escapes():
    assert highlight("Ada <b>Lovelace</b> wrote", ["lovelace"]) == "Ada &lt;b&gt;<mark>Lovelace</mark>&lt;/b&gt; wrote"


def test_model_text_is_escaped_in_the_report():
    row = {
        "id": "1", "question": "Q<i>?", "gold_answers": ["x"], "prediction": "<script>alert(1)</script>",
        "passages": ["<img src=x onerror=alert(1)> x"], "category": "wrong", "f1": 0.0, "exact_match": 0,
    }
    page = report_html("r", {"finetuned": [row]}, [{"model": "finetuned", "wrong": 1}], None)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page
    assert "&lt;script&gt;" in item_html(row)


def test_confusion_matrix_counts_and_report_table():
    rows = [
        {"gold_answers": ["sports"], "prediction": "sports"},
        {"gold_answers": ["sports"], "prediction": "movie"},
        {"gold_answers": ["movie"], "prediction": "a <b>film</b>"},
    ]
    counts = confusion_matrix(rows, ["sports", "movie"])
    assert counts == {"sports": {"sports": 1, "movie": 1, "(invalid)": 0}, "movie": {"sports": 0, "movie": 0, "(invalid)": 1}}
    page = report_html("r", {}, [], None, {"finetuned": counts})
    assert "Confusion matrices" in page and "<td>sports</td>" in page


def test_right_uses_the_metric_s_rule():
    assert is_right({"right": True, "exact_match": 0}) and not is_right({"right": False})
    assert is_right({"exact_match": 1})  # prediction files written before `right` existed


def test_diff_against_the_closest_gold_is_escaped():
    golds = ["roughly 21.5 kilograms", "21.5 kilograms"]
    assert closest_gold("21.7 kilograms of rock", golds) == "21.5 kilograms"
    assert diff_html("21.7 kilograms of rock", "21.5 kilograms") == "21.<del>5</del><ins>7</ins> kilograms<ins> of rock</ins>"
    assert diff_html("<b>Ada</b>", "Ada") == "<ins>&lt;b&gt;</ins>Ada<ins>&lt;/b&gt;</ins>"


def test_retrieval_miss_is_flagged_not_blamed_on_the_model():
    row = {"question": "Q", "gold_answers": ["Ｐａｒｉｓ"], "prediction": "Lyon", "category": "wrong", "passages": ["Lyon is big."]}
    assert gold_in_passages(row) is False
    assert 'class="miss">retrieval miss' in item_html(row) and 'data-miss="1"' in item_html(row)
    assert gold_in_passages({**row, "passages": ["The capital is paris."]}) is True  # width and case do not matter
    assert gold_in_passages({**row, "passages": []}) is None  # no passages (classification): no flag
    assert "Diff to the closest gold" in item_html(row) and "Diff" not in item_html({**row, "category": "correct"})
