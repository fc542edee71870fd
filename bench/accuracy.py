"""Accuracy benchmark on CPU: every recipe's base vs fine-tuned model, on the shared real-data samples.

Each recipe runs through the real pipeline (`python -m tunebook run params/<recipe>.yaml`, all five notebooks)
with the CPU caps below (training rows, one epoch, eval rows) so that the whole benchmark fits a stated budget
of about 80 minutes on a 2-core CPU with the embedded SmolLM2-135M-Instruct. Train and eval rows are disjoint
(each recipe's own seeded split). The uncapped recipes are for a GPU; their results are in bench/README.md.

    python bench/accuracy.py [--only livedoor_genre ...] [--readme [bench/README.md]]

Writes bench/results/accuracy.json (every metric, timings, the exact overrides) and accuracy.md (the table
bench/README.md shows; --readme refreshes it there, between the accuracy-table markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MARKERS = ("<!-- accuracy-table:start -->\n", "\n<!-- accuracy-table:end -->")
OUTPUT_DIR = ROOT / "outputs" / "bench"

# Fine-tuned (and base) models are scored; quantized copies are left to the quantize benchmarks.
COMMON = ["evaluate.models=[base,finetuned]"]
HOTPOT_CAPS = ["train.epochs=1", "data.max_train_examples=48", "data.max_eval_examples=40", "evaluate.max_new_tokens=128", "train.eval_loss_examples=8"]
# name: (recipe, CPU caps). Caps keep each run near 10 minutes; see each recipe for its full settings.
RUNS = {
    "squad_rag": ("squad_rag", ["train.epochs=1", "data.max_train_examples=128", "data.max_eval_examples=100"]),
    "jaqket_rag": ("jaqket_rag", ["train.epochs=1", "data.max_train_examples=48", "data.max_eval_examples=60"]),
    "hotpotqa_raft": ("hotpotqa_raft", HOTPOT_CAPS),
    "hotpotqa_answer_only": ("hotpotqa_raft", [*HOTPOT_CAPS, "data.raft.cot=false"]),
    "livedoor_genre": ("livedoor_genre", ["train.epochs=2", "data.max_train_examples=96", "train.eval_loss_examples=8"]),
    "debian_faq": ("debian_faq", ["train.epochs=1", "data.max_train_examples=64", "evaluate.max_new_tokens=192"]),
}
SHOWN = {"exact_match": "EM", "f1": "F1", "accuracy": "accuracy", "macro_f1": "macro-F1", "rouge_l": "ROUGE-L", "embedding_similarity": "emb. sim."}


def run_one(name: str) -> dict:
    """Run one recipe through the pipeline, unless a complete run with exactly these params is there already
    (so an interrupted benchmark goes on where it stopped, and only changed recipes run again)."""
    from tunebook.params.load import dump_params, load_params

    recipe, caps = RUNS[name]
    overrides = [*COMMON, *caps, f"output_dir={OUTPUT_DIR}", f"run_name={name}"]
    command = [sys.executable, "-m", "tunebook", "run", f"params/{recipe}.yaml", "--overwrite"]
    command += [arg for o in overrides for arg in ("--set", o)]
    run_dir = OUTPUT_DIR / name
    previous = _complete_run(run_dir, dump_params(load_params(ROOT / "params" / f"{recipe}.yaml", overrides)))
    if previous:
        print(f"\n##### {name}: a complete run with the same params is in {run_dir}; reusing it", flush=True)
        seconds = previous
    else:
        print(f"\n##### {name}: {' '.join(command[1:])}", flush=True)
        started = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        seconds = time.time() - started
    from tunebook.run.folder import Run

    run = Run.load(run_dir)
    splits = {row["split"]: row for row in run.outputs_of("01_build_dataset").table}
    metrics = {row["model"]: row for row in json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))}
    return {
        "name": name,
        "recipe": f"params/{recipe}.yaml",
        "command": "python -m tunebook run " + " ".join(command[4:]),
        "metric": _metric(run_dir),
        "train_examples": splits["train"]["examples"],
        "eval_examples": splits["eval"]["examples"],
        "seconds": round(seconds, 1),
        "train_seconds": run.outputs_of("02_finetune").train_seconds,
        "base": metrics["base"],
        "finetuned": metrics["finetuned"],
    }


def _complete_run(run_dir: Path, params_yaml: str) -> float | None:
    """Seconds the earlier run took, when it is complete and used exactly `params_yaml`; else None."""
    from tunebook.params.schema import STAGES

    manifest_file, params_file = run_dir / "manifest.json", run_dir / "params.yaml"
    if not (manifest_file.exists() and params_file.exists()) or params_file.read_text(encoding="utf-8") != params_yaml:
        return None
    stages = json.loads(manifest_file.read_text(encoding="utf-8"))["stages"]
    if not all(stages.get(s, {}).get("status") == "complete" for s in STAGES):
        return None
    from datetime import datetime

    return (datetime.fromisoformat(stages[STAGES[-1]]["finished"]) - datetime.fromisoformat(stages[STAGES[0]]["started"])).total_seconds()


def _metric(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "params.yaml").read_text(encoding="utf-8"))["evaluate"]["metric"]


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(results: dict) -> str:
    lines = [
        "| run | train / eval rows | metric | base | fine-tuned | minutes |",
        "|---|---|---|---|---|---|",
    ]

    def cell(row: dict, keys: list[str]) -> str:
        return " · ".join(f"{SHOWN[k]} {row[k]:.2f}" for k in keys)

    for r in results["runs"]:
        keys = [k for k in r["finetuned"] if k in SHOWN]  # the metric's own order
        hit = f" (retrieval hit rate {r['finetuned']['retrieval_hit_rate']:.2f})" if "retrieval_hit_rate" in r["finetuned"] else ""
        lines.append(
            f"| {r['name']} | {r['train_examples']} / {r['eval_examples']} | {r['metric']}{hit} | {cell(r['base'], keys)} | {cell(r['finetuned'], keys)} | {r['seconds'] / 60:.1f} |"
        )
    lines.append(f"\n{results['machine']}; total {results['total_seconds'] / 60:.0f} min. Produced by `python bench/accuracy.py` (`make bench-accuracy`).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="Run only these (default: all)")
    parser.add_argument(
        "--readme", type=Path, nargs="?", const=ROOT / "bench" / "README.md", help="Refresh the accuracy table in this file (default: bench/README.md)"
    )
    args = parser.parse_args()
    import torch

    runs = [run_one(name) for name in (args.only or RUNS)]
    results = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "model": "embedded:SmolLM2-135M-Instruct",
        "common_overrides": COMMON,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "total_seconds": round(sum(r["seconds"] for r in runs), 1),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(results)
    (RESULTS / "accuracy.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    if args.readme:
        from tunebook.cli import replace_section

        replace_section(args.readme, MARKERS, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
