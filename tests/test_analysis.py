import json

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


def rows_of(*rights: int, prefix: str = "") -> list[dict]:
    return [
        {"id": str(i), "question": f"{prefix}question {i}", "gold_answers": ["Ada"], "prediction": "Ada" if right else "Bob is wrong here",
         "exact_match": right, "category": "correct" if right else "wrong", "passages": ["Ada wrote it."]}
        for i, right in enumerate(rights)
    ]


def test_changes_against_the_reference_model():
    from tunebook.analysis import mark_changes, reference_model

    assert [reference_model(m, ["base", "finetuned", "gguf_q8_0"]) for m in ("base", "finetuned", "gguf_q8_0")] == [None, "base", "finetuned"]
    assert reference_model("gpt-4o-mini", ["base", "gpt-4o-mini"]) is None
    base, tuned = rows_of(0, 1, 0, 1), rows_of(1, 0, 0, 1)
    mark_changes(base, tuned, "base")
    assert [r["change"] for r in tuned] == ["fixed", "broken", "still_wrong", "both_right"]
    page = report_html("r", {"base": base, "finetuned": tuned}, [], None)
    assert 'data-change="broken"' in page and 'id="f-change"' in page and "broken vs base" in page


def test_browser_filters_steps_and_exports_marks_without_losing_earlier_ones(tmp_path):
    from tunebook.analysis import browser, read_marks

    marks = tmp_path / "relabels.jsonl"
    marks.write_text(json.dumps({"model": "finetuned", "id": "9", "question": "q", "gold_answers": ["x"], "prediction": "y", "mark": "gold_wrong"}) + "\n")
    tuned = rows_of(0, 1, 0, 0)
    tuned[2]["question"] = "Who painted it?"
    widget = browser({"finetuned": tuned}, marks)
    (model, category, changed, search), (previous, following, position), (gold_wrong, acceptable, export, saved) = (box.children for box in widget.children[:3])
    assert position.value == "1 of 3"  # the wrong answers
    following.click()
    assert position.value == "2 of 3" and "Who painted it?" in widget.children[3].value
    acceptable.click()
    assert saved.value == "marked: also acceptable"
    search.value = "painted"
    assert position.value == "1 of 1"
    category.value = "all answers"
    search.value = ""
    assert position.value == "1 of 4"
    export.click()
    written = read_marks(marks)
    assert set(written) == {("finetuned", "9"), ("finetuned", "2")} and written[("finetuned", "2")]["mark"] == "also_acceptable"
    assert saved.value == f"2 mark(s) saved to {marks}"


def test_category_and_length_plots():
    from tunebook.analysis import length_vs_correctness, plot_categories, plot_length_vs_correctness

    tuned = rows_of(1, 1, 0)
    assert length_vs_correctness(tuned) == [{"words": "1", "answers": 2, "right": 1.0}, {"words": "4-5", "answers": 1, "right": 0.0}]
    assert plot_length_vs_correctness({"finetuned": tuned}).axes[0].get_ylabel() == "share right"
    counts = [{"model": "finetuned", "correct": 2, "empty": 0, "normalization": 0, "too_verbose": 0, "truncated": 0, "wrong": 1, "n": 3}]
    assert len(plot_categories(counts).axes[0].patches) == 6
