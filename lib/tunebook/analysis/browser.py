"""Stage 05's answer browser: an ipywidgets view over one run's answers, a picker over every finished run in the same
output folder, and the relabel marks it saves (relabels.jsonl, which 01 reads back through data.read_relabels).

browser() reads as its steps: the Colab note, the controls, the handlers of each control, their wiring, the first
draw, the layout. What the handlers compute (the answers the filters keep, their change against the compared model,
a mark, the confusion grid) are module functions. Each answer is drawn by tunebook.analysis.report's item_html, the same as in
report.html.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tunebook.analysis.analysis import change, confusion_matrix, is_right, load_predictions, reference_model
from tunebook.analysis.report import CATEGORIES, CHANGES, CSS, confusion_column, item_html
from tunebook.params.drive import on_colab
from tunebook.run.folder import Run, is_run_folder, open_run

# What the category filter's choices beyond the categories themselves keep.
_KEPT_BY = {
    "all wrong": lambda r: r["category"] != "correct",
    "all answers": lambda r: True,
    "retrieval miss": lambda r: r.get("gold_in_passages") is False,
}
_KEY_STEPS = {"ArrowRight": 1, "j": 1, "ArrowLeft": -1, "k": -1}


def run_browser(run: Run):
    """browser() over this run's answers, with a picker for every finished run in the same output folder."""
    import ipywidgets as w

    runs = {**finished_runs(run.dir.parent), run.dir.name: run}
    picker = w.Dropdown(options=sorted(runs), value=run.dir.name, description="run")
    holder = w.VBox()

    def show(*_):
        picked = runs[picker.value]
        labels = picked.outputs_of("04_evaluate").labels
        holder.children = [browser(load_predictions(picked), picked.dir / "relabels.jsonl", labels)]

    picker.observe(show, names="value")
    show()
    return w.VBox([picker, holder])


def finished_runs(output_dir: Path) -> dict[str, Run]:
    """The runs in output_dir whose evaluation (04) is complete, by run name (folders moved aside are left out)."""
    runs = {}
    for manifest in sorted(Path(output_dir).glob("*/manifest.json")):
        stages = json.loads(manifest.read_text(encoding="utf-8")).get("stages", {})
        if stages.get("04_evaluate", {}).get("status") == "complete" and is_run_folder(manifest.parent):
            runs[manifest.parent.name] = open_run(manifest.parent / "params.yaml")
    return runs


def browser(predictions: dict[str, list[dict]], marks_path: Path | None = None, labels: list[str] = ()):
    """An ipywidgets browser over one run's answers. Pick a model and the model to compare it with; filter by category,
    change against that model (fixed / broken / still wrong / both right), text and, for classification, a clicked
    confusion-matrix cell; step with the buttons or the keyboard (→ ← or j k, pointer over the answer). Marking an
    item "gold is wrong" or "also acceptable" saves the marks at once to `marks_path` as JSONL (earlier marks kept)."""
    note = _colab_note()
    names = list(predictions)
    ui = _controls(predictions, marks_path)
    state = {"items": [], "index": 0, "marks": read_marks(marks_path), "cell": None}

    def refresh(*_):
        """The answers the filters keep, shown from the first."""
        moves = _changes_against(predictions, ui.model.value, ui.against.value)
        state["items"] = _kept_answers(
            predictions[ui.model.value], moves, ui.against.value, ui.category.value, ui.changed.value, state["cell"], ui.search.value, labels
        )
        state["index"] = 0
        ui.cell_label.value = f"cell: {state['cell'][0]} → {state['cell'][1]}" if state["cell"] else ""
        ui.clear_cell.layout.display = None if state["cell"] else "none"
        show()

    def show():
        """The current answer, where it is among those kept, and its mark."""
        items = state["items"]
        ui.position.value = f"{state['index'] + 1} of {len(items)}" if items else "no answers match"
        mark = state["marks"].get((ui.model.value, items[state["index"]]["id"]), {}).get("mark") if items else None
        ui.saved.value = f"marked: {mark.replace('_', ' ')} ({len(state['marks'])} mark(s) in {marks_path})" if mark else ""
        ui.view.value = f"<style>{CSS}</style>" + (item_html(items[state["index"]], ui.model.value, labels=labels) if items else "")

    def step(delta: int):
        if state["items"] and delta:
            state["index"] = (state["index"] + delta) % len(state["items"])
            show()

    def save_mark(kind: str):
        """Mark the current answer and write every mark at once."""
        if state["items"]:
            row = state["items"][state["index"]]
            state["marks"][(ui.model.value, row["id"])] = _mark(ui.model.value, row, kind)
            write_marks(marks_path, state["marks"])
            show()

    def pick_cell(gold: str, column: str):
        state["cell"] = (gold, column)
        if ui.category.value == "all answers":
            refresh()
        ui.category.value = "all answers"  # a diagonal cell holds right answers

    def clear_cell(_):
        state["cell"] = None
        refresh()

    def pick_model(*_):
        """Compare the model picked with its reference model by default; draw its confusion matrix."""
        default = reference_model(ui.model.value, names)
        ui.against.options = [("nothing", ""), *((m, m) for m in names if m != ui.model.value)]
        ui.against.value = default or ""
        state["cell"] = None
        if labels:
            _draw_confusion_grid(ui.cells, confusion_matrix(predictions[ui.model.value], labels), labels, pick_cell)
        refresh()

    def pick_change(*_):
        if ui.changed.value in ("fixed", "both_right") and ui.category.value == "all wrong":
            ui.category.value = "all answers"  # those answers are right: "all wrong" would hide every one
        else:
            refresh()

    ui.model.observe(pick_model, names="value")
    ui.changed.observe(pick_change, names="value")
    for control in (ui.against, ui.category, ui.search):
        control.observe(refresh, names="value")
    ui.previous.on_click(lambda _: step(-1))
    ui.following.on_click(lambda _: step(1))
    ui.gold_wrong.on_click(lambda _: save_mark("gold_wrong"))
    ui.acceptable.on_click(lambda _: save_mark("also_acceptable"))
    ui.clear_cell.on_click(clear_cell)
    _step_by_keyboard(ui.view, step)
    pick_model()
    return _layout(ui, note)


def _colab_note():
    """Off Colab an empty line. On Colab, which draws third-party widgets (ipyevents, the keyboard stepping) only through
    its custom widget manager: that manager enabled, and a note on the keys."""
    import ipywidgets as w

    note = w.HTML()
    if on_colab():
        from google.colab import output

        output.enable_custom_widget_manager()
        note.value = (
            "<small>Colab: keyboard stepping needs Colab's custom widget manager (enabled by this cell). If the keys "
            "do nothing, click the answer first, or step with the buttons.</small>"
        )
    return note


def _controls(predictions: dict[str, list[dict]], marks_path: Path | None) -> SimpleNamespace:
    """The browser's widgets, not yet wired: the filters, stepping, marks, the confusion cell picked, the confusion
    grid and the answer."""
    import ipywidgets as w

    misses = any(r.get("gold_in_passages") is False for rows in predictions.values() for r in rows)
    return SimpleNamespace(
        model=w.Dropdown(options=list(predictions), description="model"),
        against=w.Dropdown(description="against"),
        category=w.Dropdown(options=["all wrong", *CATEGORIES, "correct", "all answers", *(["retrieval miss"] if misses else [])], description="category"),
        changed=w.Dropdown(options=[("any", ""), *((c.replace("_", " "), c) for c in CHANGES)], description="change"),
        search=w.Text(description="search", placeholder="question, answer, passage", continuous_update=False),
        previous=w.Button(description="◀ previous"),
        following=w.Button(description="next ▶"),
        gold_wrong=w.Button(description="gold is wrong", disabled=marks_path is None),
        acceptable=w.Button(description="also acceptable", disabled=marks_path is None),
        position=w.Label(),
        saved=w.Label(),
        cell_label=w.Label(),
        clear_cell=w.Button(description="✕ clear cell", layout=w.Layout(width="auto")),
        cells=w.GridBox(),
        view=w.HTML(),
    )


def _changes_against(predictions: dict[str, list[dict]], model: str, against: str) -> dict[str, str]:
    """Each of the model's answers' change against the same question's answer of `against`, by id ({} for none)."""
    if not against:
        return {}
    before = {r["id"]: r for r in predictions[against]}
    return {r["id"]: change(is_right(before[r["id"]]), is_right(r)) for r in predictions[model] if r["id"] in before}


def _kept_answers(
    rows: list[dict], moves: dict[str, str], against: str, category: str, wanted_change: str, cell: tuple[str, str] | None, search: str, labels: list[str]
) -> list[dict]:
    """The rows the filters keep (category, change, confusion cell, text), each with its change against `against` or
    with none."""
    kept = _KEPT_BY.get(category, lambda r: r["category"] == category)
    query = search.strip().lower()
    return [
        {**r, "change": moves[r["id"]], "reference": against} if r["id"] in moves else {k: v for k, v in r.items() if k not in ("change", "reference")}
        for r in rows
        if kept(r)
        and (not wanted_change or moves.get(r["id"]) == wanted_change)
        and (not cell or (r["gold_answers"][0], confusion_column(r, labels)) == cell)
        and (not query or query in " ".join([r["question"], r["prediction"], *r["gold_answers"], *r["passages"]]).lower())
    ]


def _mark(model: str, row: dict, kind: str) -> dict:
    """One line of relabels.jsonl: "gold_wrong" or "also_acceptable" for a model's answer to a question."""
    return {
        "model": model,
        "id": row["id"],
        "question": row["question"],
        "gold_answers": row["gold_answers"],
        "prediction": row["prediction"],
        "mark": kind,
    }


def _draw_confusion_grid(cells, counts: dict, labels: list[str], pick_cell) -> None:
    """Classification: the model's confusion matrix as buttons in `cells`; a cell lists its answers."""
    import ipywidgets as w

    columns = [*labels, "(invalid)"]
    grid = [w.Label("gold ↓ predicted →"), *(w.Label(c) for c in columns)]
    for gold, row in counts.items():
        grid.append(w.Label(gold))
        grid += [_cell_button(gold, column, row[column], pick_cell) for column in columns]
    cells.children = grid
    cells.layout.grid_template_columns = f"repeat({len(columns) + 1}, auto)"


def _cell_button(gold: str, column: str, count: int, pick_cell):
    import ipywidgets as w

    button = w.Button(
        description=str(count),
        tooltip=f"{gold} → {column}",
        layout=w.Layout(width="auto"),
        button_style="info" if column == gold else "danger" if count else "",
    )
    button.on_click(lambda _: pick_cell(gold, column))
    return button


def _step_by_keyboard(view, step) -> None:
    """→ ← and j k step through the answers. ipyevents focuses the answer when the pointer is over it; the arrows then
    step instead of scrolling the page."""
    from ipyevents import Event

    keys = Event(source=view, watched_events=["keydown"], prevent_default_action=True)
    keys.on_dom_event(lambda event: step(_KEY_STEPS.get(event.get("key"), 0)))


def _layout(ui: SimpleNamespace, note):
    import ipywidgets as w

    return w.VBox(
        [
            w.HBox([ui.model, ui.against, ui.category, ui.changed, ui.search], layout=w.Layout(flex_flow="row wrap")),
            w.HBox([ui.previous, ui.following, ui.position]),
            w.HBox([ui.gold_wrong, ui.acceptable, ui.saved]),
            w.HBox([ui.cell_label, ui.clear_cell]),
            ui.cells,
            ui.view,
            note,
        ]
    )


def read_marks(path: Path | None) -> dict[tuple[str, str], dict]:
    if path is None or not path.exists():
        return {}
    return {(m["model"], m["id"]): m for m in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())}


def write_marks(path: Path, marks: dict[tuple[str, str], dict]) -> None:
    """The marks as JSONL, one per (model, question), written whole and swapped in."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in marks.values()), encoding="utf-8")
    tmp.replace(path)
