"""Stage 05: why answers are wrong.

Every wrong answer gets one category (wrong = exact match 0; for long FAQ answers, ROUGE-L below
metrics.FAQ_RIGHT_ROUGE_L), checked in this order:
- request_failed: an API baseline's request failed after its retries (the row keeps the error);
- empty: the model said nothing;
- normalization: equal to a gold once width, case, punctuation and spacing are ignored (NFKC + casefold);
- too_verbose: the prediction contains a gold (right answer, extra words);
- truncated: a gold contains the prediction (part of the answer);
- wrong: none of the above.
Base vs fine-tuned: fixed / broken / still wrong / both right. Shown as tables, an ipywidgets browser and a
static report.html (all model text and passages HTML-escaped).
"""

from __future__ import annotations

import difflib
import html
import json
import re
from collections import Counter
from pathlib import Path

from tunebook.config import on_colab
from tunebook.data import load_split
from tunebook.metrics import SPAN_METRICS, answer_in_passages, loose_normalize
from tunebook.runs import Run, is_run_folder, open_run, write_json_atomic

CATEGORIES = ("request_failed", "empty", "normalization", "too_verbose", "truncated", "wrong")
CATEGORY_MEANING = {
    "request_failed": "the API request failed after its retries: not the model's answer",
    "empty": "no answer at all",
    "normalization": "right answer, different width / case / punctuation / spacing",
    "too_verbose": "contains the right answer plus extra words",
    "truncated": "only part of the right answer",
    "wrong": "a different answer",
}


def categorize(prediction: str, golds: list[str]) -> str:
    """The error category of a prediction whose exact match is 0."""
    if not prediction.strip():
        return "empty"
    pred = loose_normalize(prediction)
    loose_golds = [g for g in (loose_normalize(g) for g in golds) if g]
    if any(pred == g for g in loose_golds):
        return "normalization"
    if any(g in pred for g in loose_golds):
        return "too_verbose"
    if pred and any(pred in g for g in loose_golds):
        return "truncated"
    return "wrong"


def is_right(row: dict) -> bool:
    # `right` is written by 04 for every metric; older prediction files only have exact_match.
    return bool(row.get("right", row.get("exact_match") == 1))


def load_predictions(run: Run) -> dict[str, list[dict]]:
    """Predictions per model, each row joined with its eval example (passages) and its category."""
    files = run.outputs_of("04_evaluate")["predictions"]
    passages = {e["id"]: e["passages"] for e in load_split(run, "eval")}
    spans = run.params.evaluate.metric in SPAN_METRICS  # a class label or a long FAQ answer is not expected in the passages
    result = {}
    for label, path in files.items():
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows:
            row["passages"] = passages.get(row["id"], [])
            row["gold_in_passages"] = gold_in_passages(row) if spans else None  # False: flagged "retrieval miss"
            if row.get("request", {}).get("status") == "failed":
                row["category"] = "request_failed"
            else:
                row["category"] = "correct" if is_right(row) else categorize(row["prediction"], row["gold_answers"])
        result[label] = rows
    for label, rows in result.items():
        reference = reference_model(label, list(result))
        if reference:
            mark_changes(result[reference], rows, reference)
    return result


def reference_model(label: str, labels: list[str]) -> str | None:
    """The model a model is compared with: fine-tuned with base, quantized copies and API rows with fine-tuned."""
    wanted = None if label == "base" else "base" if label == "finetuned" else "finetuned"
    return wanted if wanted in labels else None


CHANGES = ("fixed", "broken", "still_wrong", "both_right")


def change(right_before: bool, right_after: bool) -> str:
    return "fixed" if right_after and not right_before else "broken" if right_before and not right_after else "both_right" if right_after else "still_wrong"


def mark_changes(before: list[dict], after: list[dict], reference: str) -> None:
    """Give each row of `after` its change against the same question in `before`: fixed / broken / still_wrong / both_right."""
    before_by_id = {r["id"]: r for r in before}
    for row in after:
        if row["id"] in before_by_id:
            row["change"], row["reference"] = change(is_right(before_by_id[row["id"]]), is_right(row)), reference


def category_counts(predictions: dict[str, list[dict]]) -> list[dict]:
    table = []
    any_failed = any(r["category"] == "request_failed" for rows in predictions.values() for r in rows)
    shown = [c for c in CATEGORIES if c != "request_failed" or any_failed]  # the column only when an API row failed
    for label, rows in predictions.items():
        counts = Counter(r["category"] for r in rows)
        table.append({"model": label, "correct": counts["correct"], **{c: counts[c] for c in shown}, "n": len(rows)})
    return table


def transitions(before: list[dict], after: list[dict]) -> dict[str, int]:
    """fixed / broken / still_wrong / both_right between two models' predictions on the same examples."""
    after_by_id = {r["id"]: r for r in after}
    counts = Counter()
    for b in before:
        a = after_by_id.get(b["id"])
        if a is None:
            continue
        counts[change(is_right(b), is_right(a))] += 1
    return {k: counts[k] for k in CHANGES}


def analyze(run: Run) -> dict:
    with run.stage("05_error_analysis") as outputs:
        predictions = load_predictions(run)
        counts = category_counts(predictions)
        compare = transitions(predictions["base"], predictions["finetuned"]) if {"base", "finetuned"} <= predictions.keys() else None
        labels = run.outputs_of("04_evaluate").get("labels") or []
        confusion = {m: confusion_matrix(rows, labels) for m, rows in predictions.items()} if labels else {}
        report = run.dir / "report.html"
        report.write_text(report_html(run.params.run_name, predictions, counts, compare, confusion, labels), encoding="utf-8")
        missing = gold_missing(predictions)
        if missing["rows"]:
            print(
                f"{missing['rows']} of {missing['of']} eval questions have no gold answer in their passages: their answers are flagged "
                "'retrieval miss' (not the model's fault); the browser's and report's category filter 'retrieval miss' lists them."
            )
        write_json_atomic(run.dir / "analysis.json", {"category_counts": counts, "base_vs_finetuned": compare, "confusion": confusion, "gold_missing": missing})
        outputs.update(report_html=str(report), analysis_json=str(run.dir / "analysis.json"))
    return {"predictions": predictions, "counts": counts, "base_vs_finetuned": compare, "labels": labels, "confusion": confusion}


def gold_missing(predictions: dict[str, list[dict]]) -> dict:
    """The eval questions none of whose gold answers is in their passages (RAG-QA metrics; the same for every model)."""
    questions = {r["id"]: r for rows in predictions.values() for r in rows}
    ids = [i for i, r in questions.items() if r.get("gold_in_passages") is False]
    return {"rows": len(ids), "of": len(questions), "ids": ids}


def confusion_matrix(rows: list[dict], labels: list[str]) -> dict:
    """Classification: counts[gold][predicted] over the labels, plus an "(invalid)" column for outputs
    that are no label (free generation)."""
    columns = [*labels, "(invalid)"]
    counts = {gold: dict.fromkeys(columns, 0) for gold in labels}
    for r in rows:
        counts.setdefault(r["gold_answers"][0], dict.fromkeys(columns, 0))[confusion_column(r, labels)] += 1
    return counts


# ---- rendering: one item renderer shared by the widget and the static report ----

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.item { border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin: .8em 0; }
.cat { display: inline-block; padding: .1em .5em; border-radius: 4px; background: #eee; font-size: .85em; }
.cat-wrong { background: #f8d0d0; } .cat-too_verbose { background: #fde9c4; } .cat-truncated { background: #e6d9f5; }
.cat-normalization { background: #d4ecd4; } .cat-empty { background: #ddd; } .cat-correct { background: #cfe8fc; }
.passage { color: #333; font-size: .9em; margin: .3em 0; } mark { background: #ffe066; }
.pred { font-family: monospace; background: #f6f6f6; padding: .1em .3em; }
.diff del { background: #f8d0d0; } .diff ins { background: #d4ecd4; text-decoration: none; }
.change { font-size: .85em; } .change-fixed { color: #137333; } .change-broken { color: #b3261e; font-weight: bold; }
.item.current { outline: 3px solid #1a73e8; } td.cell { cursor: pointer; }
.miss { display: inline-block; padding: .1em .5em; border-radius: 4px; background: #555; color: #fff; font-size: .85em; }
"""


def highlight(text: str, spans: list[str]) -> str:
    """HTML-escaped text with every occurrence of the spans wrapped in <mark>."""
    spans = sorted({s for s in spans if s.strip()}, key=len, reverse=True)
    if not spans:
        return html.escape(text)
    pattern = re.compile("|".join(re.escape(s) for s in spans), re.IGNORECASE)
    out, last = [], 0
    for m in pattern.finditer(text):
        out += [html.escape(text[last : m.start()]), f"<mark>{html.escape(m.group(0))}</mark>"]
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def closest_gold(prediction: str, golds: list[str]) -> str:
    """The gold answer most like the prediction (difflib's similarity ratio)."""
    return max(golds, key=lambda g: difflib.SequenceMatcher(None, prediction, g).ratio(), default="")


def diff_html(prediction: str, gold: str) -> str:
    """Character diff from the gold to the prediction: <del> what the prediction lacks, <ins> what it adds.
    Matches shorter than 3 characters inside changed text count as changed, so a sentence around the answer reads
    as one insertion rather than letters scattered over the gold."""
    pieces: list[list[str]] = []  # [equal, deleted, inserted] runs, merged
    for op, g1, g2, p1, p2 in difflib.SequenceMatcher(None, gold, prediction, autojunk=False).get_opcodes():
        if op == "equal" and (g2 - g1 >= 3 or (g1 == 0 and g2 == len(gold))):
            pieces.append([gold[g1:g2], "", ""])
        elif pieces and not pieces[-1][0]:
            pieces[-1][1] += gold[g1:g2]
            pieces[-1][2] += prediction[p1:p2]
        else:
            pieces.append(["", gold[g1:g2], prediction[p1:p2]])
    out = []
    for equal, deleted, inserted in pieces:
        out.append(html.escape(equal))
        out.append(f"<del>{html.escape(deleted)}</del>" if deleted else "")
        out.append(f"<ins>{html.escape(inserted)}</ins>" if inserted else "")
    return "".join(out)


def gold_in_passages(row: dict) -> bool | None:
    """Whether any gold answer occurs in the passages (loosely normalized); None when there are no passages or the
    answer is yes / no.
    A question whose passages lack every gold is a retrieval miss, not the model's error."""
    return answer_in_passages(row["passages"], row["gold_answers"])  # 01 counts and flags its rows the same way


def confusion_column(row: dict, labels: list[str]) -> str:
    """The confusion-matrix column of a classification answer: its label, or "(invalid)" for free text."""
    predicted = row["prediction"].strip()
    return predicted if predicted in labels else "(invalid)"


def item_html(row: dict, model: str = "", hidden: bool = False, labels: list[str] = ()) -> str:
    golds = " | ".join(html.escape(g) for g in row["gold_answers"])
    passages = "".join(f'<div class="passage">[{i}] {highlight(p, row["gold_answers"])}</div>' for i, p in enumerate(row["passages"], 1))
    head = f"<b>{html.escape(model)}</b> · " if model else ""
    if row.get("change"):
        head += f'<span class="change change-{row["change"]}">{row["change"].replace("_", " ")} vs {html.escape(row["reference"])}</span> · '
    # load_predictions sets the flag by the run's metric; a row without it: a class label is not expected in the text.
    miss = row["gold_in_passages"] is False if "gold_in_passages" in row else not labels and gold_in_passages(row) is False
    if miss:
        head += '<span class="miss">retrieval miss</span> <small>no gold answer is in the passages</small> · '
    diff = ""
    if row["category"] not in ("correct", "request_failed") and row["prediction"].strip() and row["gold_answers"]:
        diff = f'<br><b>Diff to the closest gold:</b> <span class="pred diff">{diff_html(row["prediction"], closest_gold(row["prediction"], row["gold_answers"]))}</span>'
    return (
        f'<div class="item" data-model="{html.escape(model)}" data-category="{row["category"]}" data-miss="{int(miss)}" data-change="{row.get("change", "")}"'
        + (f' data-gold="{html.escape(row["gold_answers"][0])}" data-pred="{html.escape(confusion_column(row, labels))}"' if labels else "")
        + f"{' hidden' if hidden else ''}>"
        f'{head}<span class="cat cat-{row["category"]}">{row["category"]}</span> <small>{html.escape(CATEGORY_MEANING.get(row["category"], ""))}</small>'
        f"<p><b>Q:</b> {html.escape(row['question'])}</p>"
        f'<p><b>Gold:</b> {golds}<br><b>Prediction:</b> <span class="pred">{html.escape(row["prediction"]) or "(empty)"}</span>'
        f" <small>{_scores(row)}</small>{diff}</p>{_full_output(row)}{passages}</div>"
    )


def _scores(row: dict) -> str:
    shown = {"f1": "F1", "rouge_l": "ROUGE-L", "embedding_similarity": "embedding sim."}
    return " · ".join(f"{name} {row[key]:.2f}" for key, name in shown.items() if key in row)


def _full_output(row: dict) -> str:
    """The model's whole output, when only its final-answer part was scored (reasoning outputs)."""
    if row.get("request", {}).get("status") == "failed":
        return f"<p><b>Request error</b> after {row['request']['attempts']} attempt(s): {html.escape(str(row['request']['error']))}</p>"
    reasoning = (
        f'<p class="reasoning"><b>Reasoning</b> (a &lt;think&gt; block, taken out before scoring): <span class="pred">{html.escape(row["reasoning"]) or "(empty)"}</span></p>'
        if "reasoning" in row
        else ""
    )
    output = row.get("output", row["prediction"])
    return reasoning + ("" if output == row["prediction"] else f'<p><b>Full output:</b> <span class="pred">{html.escape(output)}</span></p>')


def _table_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _confusion_html(model: str, counts: dict) -> str:
    columns = list(next(iter(counts.values())))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{html.escape(gold)}</td>"
        + "".join(
            f'<td class="cell" data-model="{html.escape(model)}" data-gold="{html.escape(gold)}" data-pred="{html.escape(c)}" '
            f'style="background:{"#cfe8fc" if c == gold else "#f8d0d0" if n else "#fff"}">{n}</td>'
            for c, n in row.items()
        )
        + "</tr>"
        for gold, row in counts.items()
    )
    return f"<h3>{html.escape(model)}</h3><table><tr><th>gold ↓ · predicted →</th>{head}</tr>{body}</table>"


# Client-side filters of the static report: plain JavaScript inside the page, so it works offline and headless.
# A confusion-matrix cell filters to its answers; j / k step through the shown answers.
_FILTER_JS = """
let cell = null, current = -1;
const $ = (id) => document.getElementById(id);
function applyFilters() {
  const model = $('f-model').value, category = $('f-category').value;
  const query = $('f-search').value.trim().toLowerCase(), change = $('f-change').value;
  let shown = 0;
  for (const item of document.querySelectorAll('.item')) {
    const c = item.dataset.category;
    const keep = (!model || item.dataset.model === model)
      && (category === '' || (category === 'all_wrong' ? c !== 'correct' : category === 'miss' ? item.dataset.miss === '1' : c === category))
      && (!change || item.dataset.change === change)
      && (!cell || (item.dataset.gold === cell.gold && item.dataset.pred === cell.pred))
      && (!query || item.textContent.toLowerCase().includes(query));
    item.hidden = !keep;
    item.classList.remove('current');
    shown += keep;
  }
  for (const head of document.querySelectorAll('h3[data-model]')) head.hidden = Boolean(model) && head.dataset.model !== model;
  $('shown').textContent = shown + ' shown';
  $('f-cell').hidden = !cell;
  $('f-cell-text').textContent = cell ? cell.gold + ' → ' + cell.pred : '';
  current = -1;
}
for (const id of ['f-model', 'f-category', 'f-change', 'f-search']) $(id).addEventListener('input', applyFilters);
$('f-change').addEventListener('input', () => {  // fixed and both-right answers are right: "all wrong" would hide them
  if (['fixed', 'both_right'].includes($('f-change').value) && $('f-category').value === 'all_wrong') { $('f-category').value = ''; applyFilters(); }
});
for (const td of document.querySelectorAll('td.cell')) td.addEventListener('click', () => {
  cell = {gold: td.dataset.gold, pred: td.dataset.pred};
  $('f-model').value = td.dataset.model;
  $('f-category').value = '';
  applyFilters();
  $('filters').scrollIntoView();
});
$('f-cell-clear').addEventListener('click', () => { cell = null; applyFilters(); });
document.addEventListener('keydown', (event) => {
  if (!['j', 'k'].includes(event.key) || event.target.closest('input, select, textarea')) return;
  const items = [...document.querySelectorAll('.item:not([hidden])')];
  if (!items.length) return;
  if (items[current]) items[current].classList.remove('current');
  current = Math.min(Math.max(current + (event.key === 'j' ? 1 : -1), 0), items.length - 1);
  items[current].classList.add('current');
  items[current].scrollIntoView({block: 'center'});
});
applyFilters();
"""


def _options(values: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(label)}</option>' for v, label in values)


def _missing_html(missing: dict) -> str:
    if not missing["rows"]:
        return ""
    return (
        f"<p>{missing['rows']} of {missing['of']} eval questions have no gold answer in their passages: their answers are flagged "
        '<span class="miss">retrieval miss</span> (not the model\'s fault; category filter "retrieval miss").</p>'
    )


def _filters_html(models: list[str]) -> str:
    categories = [
        ("all_wrong", "all wrong"),
        ("", "all answers"),
        *((c, c) for c in (*CATEGORIES, "correct")),
        ("miss", "retrieval miss (no gold in the passages)"),
    ]
    return (
        f'<div id="filters"><label>model <select id="f-model">{_options([("", "all"), *((m, m) for m in models)])}</select></label> '
        f'<label>category <select id="f-category">{_options(categories)}</select></label> '
        f'<label>against its reference model <select id="f-change">{_options([("", "any"), *((c, c.replace("_", " ")) for c in CHANGES)])}</select></label> '
        '<label>search <input id="f-search" type="search" placeholder="question, answer, passage"></label> '
        '<span id="f-cell" hidden>cell <b id="f-cell-text"></b> <button id="f-cell-clear">✕</button></span> <b id="shown"></b> '
        "<small>j / k: next / previous answer</small></div>"
    )


def report_html(
    run_name: str, predictions: dict[str, list[dict]], counts: list[dict], compare: dict | None, confusion: dict | None = None, labels: list[str] = ()
) -> str:
    """A self-contained page (no kernel, no network): tables, then every answer, filtered by model, category, text and
    (classification) a clicked confusion-matrix cell."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tunebook · {html.escape(run_name)} · error analysis</title>",
        f"<style>{_CSS}</style></head><body><h1>Error analysis · run {html.escape(run_name)}</h1>",
        "<h2>Answers per category</h2>",
        _table_html(counts),
        _missing_html(gold_missing(predictions)),
        "<ul>" + "".join(f"<li><b>{c}</b>: {html.escape(m)}</li>" for c, m in CATEGORY_MEANING.items()) + "</ul>",
    ]
    if compare:
        parts += ["<h2>Base → fine-tuned</h2>", _table_html([compare])]
    if confusion:
        parts += ["<h2>Confusion matrices</h2><p><small>Click a cell to list its answers.</small></p>"] + [_confusion_html(m, c) for m, c in confusion.items()]
    parts += ["<h2>Answers</h2>", _filters_html(list(predictions))]
    for label, rows in predictions.items():
        wrong = [r for r in rows if r["category"] != "correct"]
        parts.append(f'<h3 data-model="{html.escape(label)}">{html.escape(label)}: {len(wrong)} wrong of {len(rows)}</h3>')
        parts += [item_html(r, label, hidden=r["category"] == "correct", labels=labels) for r in rows]
    parts.append(f"<script>{_FILTER_JS}</script></body></html>")
    return "\n".join(parts)


def browser(predictions: dict[str, list[dict]], marks_path: Path | None = None, labels: list[str] = ()):
    """An ipywidgets browser over one run's answers. Pick a model and the model to compare it with; filter by category,
    change against that model (fixed / broken / still wrong / both right), text and, for classification, a clicked
    confusion-matrix cell; step with the buttons or the keyboard (→ ← or j k, pointer over the answer). Marking an
    item "gold is wrong" or "also acceptable" saves the marks at once to `marks_path` as JSONL (earlier marks kept)."""
    import ipywidgets as w
    from ipyevents import Event

    colab_note = w.HTML()
    if on_colab():
        # Colab draws third-party widgets (ipyevents, the keyboard stepping) only through its custom widget manager.
        from google.colab import output

        output.enable_custom_widget_manager()
        colab_note.value = (
            "<small>Colab: keyboard stepping needs Colab's custom widget manager (enabled by this cell). If the keys "
            "do nothing, click the answer first, or step with the buttons.</small>"
        )
    names = list(predictions)
    model = w.Dropdown(options=names, description="model")
    against = w.Dropdown(description="against")
    misses = any(r.get("gold_in_passages") is False for rows in predictions.values() for r in rows)
    category = w.Dropdown(options=["all wrong", *CATEGORIES, "correct", "all answers", *(["retrieval miss"] if misses else [])], description="category")
    changed = w.Dropdown(options=[("any", ""), *((c.replace("_", " "), c) for c in CHANGES)], description="change")
    search = w.Text(description="search", placeholder="question, answer, passage", continuous_update=False)
    prev_button, next_button = w.Button(description="◀ previous"), w.Button(description="next ▶")
    gold_wrong, acceptable = (w.Button(description=d, disabled=marks_path is None) for d in ("gold is wrong", "also acceptable"))
    position, saved, cell_label = w.Label(), w.Label(), w.Label()
    clear_cell = w.Button(description="✕ clear cell", layout=w.Layout(width="auto"))
    cells = w.GridBox()
    view = w.HTML()
    state = {"items": [], "index": 0, "marks": read_marks(marks_path), "cell": None}

    def changes() -> dict[str, str]:
        if not against.value:
            return {}
        before = {r["id"]: r for r in predictions[against.value]}
        return {r["id"]: change(is_right(before[r["id"]]), is_right(r)) for r in predictions[model.value] if r["id"] in before}

    def refresh(*_):
        wanted = {
            "all wrong": lambda r: r["category"] != "correct",
            "all answers": lambda r: True,
            "retrieval miss": lambda r: r.get("gold_in_passages") is False,
        }.get(category.value, lambda r: r["category"] == category.value)
        query, moves = search.value.strip().lower(), changes()
        state["items"] = [
            {**r, "change": moves[r["id"]], "reference": against.value}
            if r["id"] in moves
            else {k: v for k, v in r.items() if k not in ("change", "reference")}
            for r in predictions[model.value]
            if wanted(r)
            and (not changed.value or moves.get(r["id"]) == changed.value)
            and (not state["cell"] or (r["gold_answers"][0], confusion_column(r, labels)) == state["cell"])
            and (not query or query in " ".join([r["question"], r["prediction"], *r["gold_answers"], *r["passages"]]).lower())
        ]
        state["index"] = 0
        cell_label.value = f"cell: {state['cell'][0]} → {state['cell'][1]}" if state["cell"] else ""
        clear_cell.layout.display = None if state["cell"] else "none"
        show()

    def show():
        items = state["items"]
        position.value = f"{state['index'] + 1} of {len(items)}" if items else "no answers match"
        mark = state["marks"].get((model.value, items[state["index"]]["id"]), {}).get("mark") if items else None
        saved.value = f"marked: {mark.replace('_', ' ')} ({len(state['marks'])} mark(s) in {marks_path})" if mark else ""
        view.value = f"<style>{_CSS}</style>" + (item_html(items[state["index"]], model.value, labels=labels) if items else "")

    def step(delta: int):
        if state["items"] and delta:
            state["index"] = (state["index"] + delta) % len(state["items"])
            show()

    def mark(kind: str):
        if state["items"]:
            row = state["items"][state["index"]]
            state["marks"][(model.value, row["id"])] = {
                "model": model.value,
                "id": row["id"],
                "question": row["question"],
                "gold_answers": row["gold_answers"],
                "prediction": row["prediction"],
                "mark": kind,
            }
            write_marks(marks_path, state["marks"])
            show()

    def pick_cell(gold: str, column: str):
        state["cell"] = (gold, column)
        if category.value == "all answers":
            refresh()
        category.value = "all answers"  # a diagonal cell holds right answers

    def draw_cells():
        """Classification: the model's confusion matrix as buttons; a cell lists its answers."""
        if not labels:
            return
        columns = [*labels, "(invalid)"]
        grid = [w.Label("gold ↓ predicted →"), *(w.Label(c) for c in columns)]
        for gold, counts in confusion_matrix(predictions[model.value], labels).items():
            grid.append(w.Label(gold))
            for column in columns:
                button = w.Button(
                    description=str(counts[column]),
                    tooltip=f"{gold} → {column}",
                    layout=w.Layout(width="auto"),
                    button_style="info" if column == gold else "danger" if counts[column] else "",
                )
                button.on_click(lambda _, g=gold, c=column: pick_cell(g, c))
                grid.append(button)
        cells.children = grid
        cells.layout.grid_template_columns = f"repeat({len(columns) + 1}, auto)"

    def pick_model(*_):
        default = reference_model(model.value, names)
        against.options = [("nothing", ""), *((m, m) for m in names if m != model.value)]
        against.value = default or ""
        state["cell"] = None
        draw_cells()
        refresh()

    def clear(_):
        state["cell"] = None
        refresh()

    def pick_change(*_):
        if changed.value in ("fixed", "both_right") and category.value == "all wrong":
            category.value = "all answers"  # those answers are right: "all wrong" would hide every one
        else:
            refresh()

    model.observe(pick_model, names="value")
    changed.observe(pick_change, names="value")
    for control in (against, category, search):
        control.observe(refresh, names="value")
    prev_button.on_click(lambda _: step(-1))
    next_button.on_click(lambda _: step(1))
    gold_wrong.on_click(lambda _: mark("gold_wrong"))
    acceptable.on_click(lambda _: mark("also_acceptable"))
    clear_cell.on_click(clear)
    # ipyevents focuses the answer when the pointer is over it; the arrows then step instead of scrolling the page.
    keys = Event(source=view, watched_events=["keydown"], prevent_default_action=True)
    keys.on_dom_event(lambda event: step({"ArrowRight": 1, "j": 1, "ArrowLeft": -1, "k": -1}.get(event.get("key"), 0)))
    pick_model()
    return w.VBox(
        [
            w.HBox([model, against, category, changed, search], layout=w.Layout(flex_flow="row wrap")),
            w.HBox([prev_button, next_button, position]),
            w.HBox([gold_wrong, acceptable, saved]),
            w.HBox([cell_label, clear_cell]),
            cells,
            view,
            colab_note,
        ]
    )


def finished_runs(output_dir: Path) -> dict[str, Run]:
    """The runs in output_dir whose evaluation (04) is complete, by run name (folders moved aside are left out)."""
    runs = {}
    for manifest in sorted(Path(output_dir).glob("*/manifest.json")):
        stages = json.loads(manifest.read_text(encoding="utf-8")).get("stages", {})
        if stages.get("04_evaluate", {}).get("status") == "complete" and is_run_folder(manifest.parent):
            runs[manifest.parent.name] = open_run(manifest.parent / "params.yaml")
    return runs


def run_browser(run: Run):
    """browser() over this run's answers, with a picker for every finished run in the same output folder."""
    import ipywidgets as w

    runs = {**finished_runs(run.dir.parent), run.dir.name: run}
    picker = w.Dropdown(options=sorted(runs), value=run.dir.name, description="run")
    holder = w.VBox()

    def show(*_):
        picked = runs[picker.value]
        labels = picked.outputs_of("04_evaluate").get("labels") or []
        holder.children = [browser(load_predictions(picked), picked.dir / "relabels.jsonl", labels)]

    picker.observe(show, names="value")
    show()
    return w.VBox([picker, holder])


def read_marks(path: Path | None) -> dict[tuple[str, str], dict]:
    if path is None or not path.exists():
        return {}
    return {(m["model"], m["id"]): m for m in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())}


def write_marks(path: Path, marks: dict[tuple[str, str], dict]) -> None:
    """The marks as JSONL, one per (model, question), written whole and swapped in."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in marks.values()), encoding="utf-8")
    tmp.replace(path)


def plot_categories(counts: list[dict]):
    """Answers per category, one stacked bar per model."""
    import matplotlib.pyplot as plt

    columns = [c for c in ("correct", *CATEGORIES) if c in counts[0]]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * len(counts)))
    left = [0] * len(counts)
    for column in columns:
        values = [row[column] for row in counts]
        ax.barh([row["model"] for row in counts], values, left=left, label=column)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("answers")
    ax.legend(ncol=len(columns), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


LENGTH_BINS = ((1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 10**9))
LENGTH_LABELS = ["1", "2", "3", "4-5", "6-10", "11+"]


def length_vs_correctness(rows: list[dict]) -> list[dict]:
    """Share of right answers by prediction length in words (empty answers left out)."""
    table = []
    for (low, high), label in zip(LENGTH_BINS, LENGTH_LABELS):
        picked = [r for r in rows if low <= len(r["prediction"].split()) <= high]
        if picked:
            table.append({"words": label, "answers": len(picked), "right": sum(map(is_right, picked)) / len(picked)})
    return table


def plot_length_vs_correctness(predictions: dict[str, list[dict]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for label, rows in predictions.items():
        table = length_vs_correctness(rows)
        ax.plot([LENGTH_LABELS.index(t["words"]) for t in table], [t["right"] for t in table], marker="o", label=label)
    ax.set_xticks(range(len(LENGTH_LABELS)), LENGTH_LABELS)
    ax.set_xlabel("prediction length (words)")
    ax.set_ylabel("share right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
