from tunebook.analysis import categorize, highlight, item_html, report_html, transitions


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
