"""Stage 05's static report, report.html, and the pieces of it the answer browser shows too.

One self-contained page (no kernel, no network): the category table, base → fine-tuned, the confusion matrices, then
every answer (item_html: its category, its change against the reference model, the gold highlighted in the passages,
a character diff to the closest gold, a retrieval-miss flag), filtered by plain JavaScript in the page. All model text
and passages are HTML-escaped.

The vocabulary the page and the analysis share lives here, the lower module (tunebook.analysis.analysis imports this one to
write report.html; this one imports no other module of stage 05): the category names and their meanings, the change
names, and the facts of a row the page shows (gold_in_passages, confusion_column, gold_missing).
"""

from __future__ import annotations

import difflib
import html
import re

from tunebook.metrics import answer_in_passages

# A wrong answer's category (tunebook.analysis.analysis.categorize picks it, in this order) and what it means.
CATEGORIES = ("request_failed", "empty", "normalization", "too_verbose", "truncated", "wrong")
CATEGORY_MEANING = {
    "request_failed": "the API request failed after its retries: not the model's answer",
    "empty": "no answer at all",
    "normalization": "right answer, different width / case / punctuation / spacing",
    "too_verbose": "contains the right answer plus extra words",
    "truncated": "only part of the right answer",
    "wrong": "a different answer",
}

# An answer against the same question's answer of its reference model (tunebook.analysis.analysis.change).
CHANGES = ("fixed", "broken", "still_wrong", "both_right")


def gold_in_passages(row: dict) -> bool | None:
    """Whether any gold answer occurs in the passages (loosely normalized); None when there are no passages or the
    answer is yes / no.
    A question whose passages lack every gold is a retrieval miss, not the model's error."""
    return answer_in_passages(row["passages"], row["gold_answers"])  # 01 counts and flags its rows the same way


def confusion_column(row: dict, labels: list[str]) -> str:
    """The confusion-matrix column of a classification answer: its label, or "(invalid)" for free text."""
    predicted = row["prediction"].strip()
    return predicted if predicted in labels else "(invalid)"


def gold_missing(predictions: dict[str, list[dict]]) -> dict:
    """The eval questions none of whose gold answers is in their passages (RAG-QA metrics; the same for every model)."""
    questions = {r["id"]: r for rows in predictions.values() for r in rows}
    ids = [i for i, r in questions.items() if r.get("gold_in_passages") is False]
    return {"rows": len(ids), "of": len(questions), "ids": ids}


# ---- rendering: one item renderer shared by the answer browser (tunebook.analysis.browser) and the static report ----

CSS = """
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
    scores = [f"{name} {row[key]:.2f}" for key, name in shown.items() if key in row]
    if "judge_score" in row:  # evaluate.judge: the teacher's rubric score, 1-5 (none when its reply held no score)
        scores.append(f"judge {row['judge_score'] if row['judge_score'] is not None else 'no score'}/5")
    return " · ".join(scores)


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
        f"<style>{CSS}</style></head><body><h1>Error analysis · run {html.escape(run_name)}</h1>",
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
