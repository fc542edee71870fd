"""Stage 05: why answers are wrong.

Every wrong answer gets one category (wrong = exact match 0; for long FAQ answers, ROUGE-L below
metrics.FAQ_RIGHT_ROUGE_L), checked in this order:
- request_failed: an API baseline's request failed after its retries (the row keeps the error);
- empty: the model said nothing;
- normalization: equal to a gold once width, case, punctuation and spacing are ignored (NFKC + casefold);
- too_verbose: the prediction contains a gold (right answer, extra words);
- truncated: a gold contains the prediction (part of the answer);
- wrong: none of the above.
Base vs fine-tuned: fixed / broken / still wrong / both right. Shown as tables and plots here, in the static
report.html (tunebook.analysis.report, which also holds the category and change names and their meanings, shared with this
module) and in the ipywidgets answer browser (tunebook.analysis.browser); the counts go to 02's tracker run too (tunebook.run.tracking).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tunebook.analysis.model_card import write_cards
from tunebook.analysis.report import CATEGORIES, CHANGES, confusion_column, gold_in_passages, gold_missing, report_html
from tunebook.colab.runtime import prepare_stage
from tunebook.dataset.build import load_split
from tunebook.evaluation.judge import judge_table
from tunebook.metrics import SPAN_METRICS, loose_normalize
from tunebook.run import tracking
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import Run
from tunebook.run.outputs import AnalysisOutputs


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
    files = run.outputs_of("04_evaluate").predictions
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
    prepare_stage(run.params, "05_error_analysis")
    with run.stage("05_error_analysis") as outputs:
        predictions = load_predictions(run)
        counts = category_counts(predictions)
        compare = transitions(predictions["base"], predictions["finetuned"]) if {"base", "finetuned"} <= predictions.keys() else None
        labels = run.outputs_of("04_evaluate").labels
        confusion = {m: confusion_matrix(rows, labels) for m, rows in predictions.items()} if labels else {}
        report = run.dir / "report.html"
        report.write_text(report_html(run.params.run_name, predictions, counts, compare, confusion, labels), encoding="utf-8")
        missing = gold_missing(predictions)
        if missing["rows"]:
            print(
                f"{missing['rows']} of {missing['of']} eval questions have no gold answer in their passages: their answers are flagged "
                "'retrieval miss' (not the model's fault); the browser's and report's category filter 'retrieval miss' lists them."
            )
        analysis = {"category_counts": counts, "base_vs_finetuned": compare, "confusion": confusion, "gold_missing": missing}
        judged = judge_table(predictions)  # evaluate.judge: the teacher's rubric scores, per model
        if judged:
            analysis["judge"] = judged
        write_json_atomic(run.dir / "analysis.json", analysis)
        # The Hugging Face model cards beside the adapter, the merged model and each copy, with these counts.
        if run.status("02_finetune") == "complete":
            cards = write_cards(run, analysis=analysis)
            shown = [str(c.relative_to(run.dir)) if c.is_relative_to(run.dir) else str(c) for c in cards]
            print(f"Model cards: {', '.join(shown)} (`python -m tunebook push` uploads them).")
        else:
            print("No model cards: the run has no fine-tuned model (02 is not complete).")
        outputs.update(AnalysisOutputs(report_html=str(report), analysis_json=str(run.dir / "analysis.json")).as_json())
    tracking.log_outputs(run, "05_error_analysis")  # the counts to 02's tracker run, when it trained with one
    return {"predictions": predictions, "counts": counts, "base_vs_finetuned": compare, "labels": labels, "confusion": confusion, "judge": judged}


def changes_table(compare: dict[str, int] | None):
    """analyze()'s base_vs_finetuned as a table: how many questions training fixed, broke, left wrong or left right."""
    import pandas as pd

    if compare is None:
        print("Base → fine-tuned needs both models' answers (evaluate.models lists base and finetuned): not in this run.")
        return None
    meaning = {
        "fixed": "wrong before training, right after",
        "broken": "right before training, wrong after",
        "still_wrong": "wrong before and after",
        "both_right": "right before and after",
    }
    total = sum(compare.values()) or 1
    rows = [{"change": k, "meaning": meaning[k], "questions": v, "share": f"{v / total:.0%}"} for k, v in compare.items()]
    return pd.DataFrame(rows).set_index("change")


def confusion_matrix(rows: list[dict], labels: list[str]) -> dict:
    """Classification: counts[gold][predicted] over the labels, plus an "(invalid)" column for outputs
    that are no label (free generation)."""
    columns = [*labels, "(invalid)"]
    counts = {gold: dict.fromkeys(columns, 0) for gold in labels}
    for r in rows:
        counts.setdefault(r["gold_answers"][0], dict.fromkeys(columns, 0))[confusion_column(r, labels)] += 1
    return counts


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
