"""Stage 04: generate answers for the eval split with every model and score them.

Models: base (the params' model), finetuned (the merged model of 02) and each quantized variant of 03. Each
is loaded, run through the batched generator, timed, measured for peak memory and freed before the next.
Writes predictions/<model>.jsonl, metrics.json (a list of rows) and metrics.csv.
"""
from __future__ import annotations

import csv
import gc
import json
import time

from tunebook.data import load_split
from tunebook.generate import generate, peak_memory
from tunebook.metrics import SCORERS, mean_scores
from tunebook.models import load_for_inference
from tunebook.runs import Run, write_json_atomic

METRIC_COLUMNS = ["model", "exact_match", "partial_match", "f1", "n", "seconds", "examples_per_second", "load_seconds", "peak_memory_mb"]


def final_answer(output: str, prefix: str | None) -> str:
    """The scored part of an output: the rest of the line after the first `prefix` (reasoning outputs; a model
    may ramble on after its answer), else the whole output."""
    if prefix and prefix in output:
        rest = output.split(prefix, 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else ""
    return output


def models_to_evaluate(run: Run) -> list[tuple[str, str]]:
    """(label, model path or id) in table order."""
    wanted = run.params.evaluate.models
    models = []
    if "base" in wanted:
        models.append(("base", run.params.model.name))
    if "finetuned" in wanted:
        models.append(("finetuned", run.outputs_of("02_finetune")["merged_dir"]))
    if "quantized" in wanted:
        for v in run.outputs_of("03_quantize")["variants"]:
            if v["status"] == "ok":
                models.append((v["name"], v["dir"]))
            else:
                print(f"{v['name']}: not evaluated, quantization was skipped ({v['reason']}).")
    return models


def evaluate(run: Run) -> list[dict]:
    p = run.params
    examples = load_split(run, "eval")
    models = models_to_evaluate(run)
    score = SCORERS[p.evaluate.metric]
    with run.stage("04_evaluate") as outputs:
        predictions_dir = run.dir / "predictions"
        predictions_dir.mkdir(exist_ok=True)
        table, files = [], {}
        for label, source in models:
            with peak_memory() as peak:
                started = time.time()
                model, tokenizer = load_for_inference(source, dtype=p.model.dtype)
                load_seconds = time.time() - started
                result = generate(
                    model, tokenizer, [e["prompt"] for e in examples],
                    batch_size=p.evaluate.batch_size, max_new_tokens=p.evaluate.max_new_tokens, desc=label,
                )
            del model
            gc.collect()
            rows = []
            for e, text in zip(examples, result.texts):
                answer = final_answer(text, p.prompt.final_answer_prefix)
                rows.append({"id": e["id"], "question": e["question"], "gold_answers": e["answers"], "prediction": answer, "output": text, **score(answer, e["answers"])})
            path = predictions_dir / f"{label}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            files[label] = str(path)
            means = mean_scores(rows)
            table.append(
                {
                    "model": label,
                    **{k: round(v, 4) for k, v in means.items()},
                    "n": len(rows),
                    "seconds": round(result.seconds, 2),
                    "examples_per_second": round(result.examples_per_second, 3),
                    "load_seconds": round(load_seconds, 2),
                    "peak_memory_mb": round(peak["mb"], 1),
                }
            )
            print(f"{label}: EM {means['exact_match']:.3f}  partial {means['partial_match']:.3f}  F1 {means['f1']:.3f}  ({result.seconds:.1f}s)")
        write_json_atomic(run.dir / "metrics.json", table)
        with open(run.dir / "metrics.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(table)
        outputs.update(metrics_json=str(run.dir / "metrics.json"), metrics_csv=str(run.dir / "metrics.csv"), predictions=files)
    return table


def plot_metrics(table: list[dict]):
    import matplotlib.pyplot as plt

    labels = [r["model"] for r in table]
    keys = ("exact_match", "partial_match", "f1")
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(labels))], [r[key] for r in table], width, label=key)
    ax.set_xticks([x + width for x in range(len(labels))], labels)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig
