import json
import sys

from tunebook.analysis.analysis import categorize, confusion_matrix, is_right, transitions
from tunebook.analysis.report import closest_gold, diff_html, gold_in_passages, highlight, item_html, report_html


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
        "id": "1",
        "question": "Q<i>?",
        "gold_answers": ["x"],
        "prediction": "<script>alert(1)</script>",
        "passages": ["<img src=x onerror=alert(1)> x"],
        "category": "wrong",
        "f1": 0.0,
        "exact_match": 0,
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
    assert gold_in_passages({**row, "passages": []}) is None  # no passages: no flag
    assert gold_in_passages({**row, "gold_answers": ["yes"]}) is None  # HotpotQA yes/no: not a span of the passages
    assert 'data-miss="0"' in item_html(row, labels=["Paris", "Lyon"])  # classification: a label is not in the text
    assert "Diff to the closest gold" in item_html(row) and "Diff" not in item_html({**row, "category": "correct"})


def rows_of(*rights: int, prefix: str = "") -> list[dict]:
    return [
        {
            "id": str(i),
            "question": f"{prefix}question {i}",
            "gold_answers": ["Ada"],
            "prediction": "Ada" if right else "Bob is wrong here",
            "exact_match": right,
            "category": "correct" if right else "wrong",
            "passages": ["Ada wrote it."],
        }
        for i, right in enumerate(rights)
    ]


def test_changes_against_the_reference_model():
    from tunebook.analysis.analysis import mark_changes, reference_model

    assert [reference_model(m, ["base", "finetuned", "gguf_q8_0"]) for m in ("base", "finetuned", "gguf_q8_0")] == [None, "base", "finetuned"]
    assert reference_model("gpt-4o-mini", ["base", "gpt-4o-mini"]) is None
    base, tuned = rows_of(0, 1, 0, 1), rows_of(1, 0, 0, 1)
    mark_changes(base, tuned, "base")
    assert [r["change"] for r in tuned] == ["fixed", "broken", "still_wrong", "both_right"]
    page = report_html("r", {"base": base, "finetuned": tuned}, [], None)
    assert 'data-change="broken"' in page and 'id="f-change"' in page and "broken vs base" in page


def parts(widget):
    """The browser's controls by name (its layout: filters, stepping, marks, confusion cell, grid, answer)."""
    (model, against, category, changed, search), (previous, following, position), (gold_wrong, acceptable, saved), (cell, clear) = (
        box.children for box in widget.children[:4]
    )
    return dict(
        model=model,
        against=against,
        category=category,
        changed=changed,
        search=search,
        previous=previous,
        following=following,
        position=position,
        gold_wrong=gold_wrong,
        acceptable=acceptable,
        saved=saved,
        cell=cell,
        clear=clear,
        grid=widget.children[4],
        view=widget.children[5],
    )


def test_browser_filters_steps_and_saves_marks_without_losing_earlier_ones(tmp_path):
    from tunebook.analysis.browser import browser, read_marks

    marks = tmp_path / "relabels.jsonl"
    marks.write_text(json.dumps({"model": "finetuned", "id": "9", "question": "q", "gold_answers": ["x"], "prediction": "y", "mark": "gold_wrong"}) + "\n")
    tuned = rows_of(0, 1, 0, 0)
    tuned[2]["question"] = "Who painted it?"
    w = parts(browser({"finetuned": tuned}, marks))
    assert w["position"].value == "1 of 3"  # the wrong answers
    w["following"].click()
    assert w["position"].value == "2 of 3" and "Who painted it?" in w["view"].value
    w["acceptable"].click()
    written = read_marks(marks)  # saved at once, the earlier mark kept
    assert set(written) == {("finetuned", "9"), ("finetuned", "2")} and written[("finetuned", "2")]["mark"] == "also_acceptable"
    assert w["saved"].value == f"marked: also acceptable (2 mark(s) in {marks})"
    w["search"].value = "painted"
    assert w["position"].value == "1 of 1"
    w["category"].value = "all answers"
    w["search"].value = ""
    assert w["position"].value == "1 of 4"


def test_browser_compares_any_two_models_and_steps_by_keyboard():
    from ipyevents import Event
    from ipywidgets import Widget

    from tunebook.analysis.browser import browser

    base, tuned, copy = rows_of(0, 1, 0, 1), rows_of(1, 0, 0, 1), rows_of(1, 1, 0, 0)
    w = parts(browser({"base": base, "finetuned": tuned, "int8": copy}, None))
    w["model"].value = "int8"
    assert w["against"].value == "finetuned"  # its reference by default
    w["changed"].value = "broken"
    assert w["position"].value == "1 of 1" and "question 3" in w["view"].value and "broken vs finetuned" in w["view"].value
    w["against"].value = "base"
    assert w["position"].value == "1 of 1" and "question 3" in w["view"].value and "broken vs base" in w["view"].value
    w["changed"].value = "fixed"
    assert w["position"].value == "1 of 1" and "fixed vs base" in w["view"].value
    w["changed"].value, w["category"].value = "", "all answers"
    keys = next(e for e in Widget.widgets.values() if isinstance(e, Event) and e.source is w["view"])
    for key, expected in (("ArrowRight", "2 of 4"), ("j", "3 of 4"), ("k", "2 of 4"), ("ArrowLeft", "1 of 4"), ("x", "1 of 4")):
        keys._dom_handlers({"type": "keydown", "key": key})
        assert w["position"].value == expected, key
    assert w["gold_wrong"].disabled  # no marks file given


def test_confusion_cells_list_their_answers():
    from tunebook.analysis.browser import browser

    labels = ["sports", "movie"]
    rows = [
        {
            "id": str(i),
            "question": f"article {i}",
            "gold_answers": [gold],
            "prediction": pred,
            "exact_match": int(gold == pred),
            "category": "correct" if gold == pred else "wrong",
            "passages": [],
        }
        for i, (gold, pred) in enumerate([("sports", "sports"), ("sports", "movie"), ("sports", "movie"), ("movie", "film"), ("movie", "movie")])
    ]
    w = parts(browser({"finetuned": rows}, None, labels))
    grid = w["grid"].children
    assert [c.value for c in grid[:4]] == ["gold ↓ predicted →", "sports", "movie", "(invalid)"]
    assert [b.description for b in grid[5:8]] == ["1", "2", "0"] and grid[6].tooltip == "sports → movie"
    grid[6].click()
    assert w["position"].value == "1 of 2" and w["cell"].value == "cell: sports → movie" and w["category"].value == "all answers"
    grid[5].click()  # the diagonal: right answers
    assert w["position"].value == "1 of 1" and "article 0" in w["view"].value
    grid[11].click()  # movie → (invalid)
    assert "article 3" in w["view"].value
    w["clear"].click()
    assert w["position"].value == "1 of 5" and w["cell"].value == ""
    page = report_html("r", {"finetuned": rows}, [], None, {"finetuned": confusion_matrix(rows, labels)}, labels)
    assert 'data-gold="sports" data-pred="movie"' in page and '<td class="cell" data-model="finetuned" data-gold="movie" data-pred="(invalid)"' in page


def test_finished_runs_lists_evaluated_runs_only(write_params, tmp_path):
    import shutil

    from tunebook.analysis.browser import finished_runs
    from tunebook.run.folder import open_run

    def make_run(name: str, evaluated: bool):
        run = open_run(write_params(f"run_name: {name}\noutput_dir: out\ndata:\n  train_path: rows.jsonl\n", f"{name}.yaml"))
        with run.stage("01_build_dataset"):
            pass
        if evaluated:
            with run.stage("04_evaluate") as outputs:
                outputs.update(predictions={})
        return run

    done = make_run("done", True)
    make_run("half", False)
    shutil.copytree(done.dir, done.dir.with_name("done.replaced-20261121-120000"))  # moved aside by --overwrite
    assert list(finished_runs(tmp_path / "out")) == ["done"]


def test_category_and_length_plots():
    from tunebook.analysis.analysis import length_vs_correctness, plot_categories, plot_length_vs_correctness

    tuned = rows_of(1, 1, 0)
    assert length_vs_correctness(tuned) == [{"words": "1", "answers": 2, "right": 1.0}, {"words": "4-5", "answers": 1, "right": 0.0}]
    assert plot_length_vs_correctness({"finetuned": tuned}).axes[0].get_ylabel() == "share right"
    counts = [{"model": "finetuned", "correct": 2, "empty": 0, "normalization": 0, "too_verbose": 0, "truncated": 0, "wrong": 1, "n": 3}]
    assert len(plot_categories(counts).axes[0].patches) == 6


def test_browser_on_colab_enables_its_custom_widget_manager(monkeypatch):
    """Colab draws ipyevents (the keyboard stepping) only after enable_custom_widget_manager(); the cell calls it."""
    import types

    from tunebook.analysis.browser import browser

    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("enabled"))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    widget = browser({"finetuned": rows_of(0, 1)}, None)
    assert calls == ["enabled"] and "buttons" in widget.children[-1].value
