"""The train stage on a CPU with TRL's fused LM head as shipped (every position projected through the head) against
the workbook's `tunebook.models.patches.score_only_loss_positions` (only the positions that carry a loss), side by side.

    python bench/cpu_lm_head.py          # both, each in its own process

On the default params and the default data's real rows (stage 01 built into a scratch folder), model.dtype auto:
TRAIN_STEPS optimizer steps and one evaluation of the eval-loss rows, with the workbook's own meter (steady-state
tokens/s) and the Trainer's losses, which must be the same in both. Writes bench/results/cpu_lm_head.json and
cpu_lm_head.md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
TRAIN_STEPS = 5
CASES = ("every_position", "loss_positions")


def train_case(case: str) -> dict:
    from datasets import load_from_disk

    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run
    from tunebook.training import train as stage

    if case == "every_position":
        stage.score_only_loss_positions = lambda: None  # TRL's own choice on a CPU
    overrides = [f"output_dir={tempfile.mkdtemp()}", f"train.max_steps={TRAIN_STEPS}", f"train.eval_steps={TRAIN_STEPS}"]
    run = open_run(ROOT / "params/default.yaml", overrides)
    splits = load_from_disk(str(build_dataset(run).dataset_dir / "hf"))
    trainer, _ = stage.build_trainer(run.params, splits["train"], splits["eval"], Path(tempfile.mkdtemp()))
    trainer.args.save_strategy = "no"
    started = time.perf_counter()
    _, meter = stage.train(trainer, run.params)
    seconds = time.perf_counter() - started
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    eval_log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    return {
        "tokens_per_second": meter.summary()["tokens_per_second"],
        "seconds": round(seconds, 1),
        "eval_seconds": round(eval_log["eval_runtime"], 2),
        "train_losses": losses,
        "eval_loss": round(eval_log["eval_loss"], 4),
        "steps": TRAIN_STEPS,
        "batch": f"{run.params.train.batch_size} x {run.params.train.grad_accum}",
        "eval_rows": run.params.train.eval_loss_examples,
    }


def cpu_name() -> str:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    return models[0] if models else "unknown CPU"


def run_case(case: str) -> dict:
    """One case in its own process (TRL patched or not, threads and allocator its own), its result as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "case", case, out.name], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "case"])
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.command == "case":
        case, out = ns.args
        Path(out).write_text(json.dumps(train_case(case)))
        return

    results = {case: run_case(case) for case in CASES}
    every, only = results["every_position"], results["loss_positions"]
    summary = {
        "machine": {**machine(), "cpus": os.cpu_count()},
        **results,
        "speedup_tokens_per_second": round(only["tokens_per_second"] / every["tokens_per_second"], 2),
        "speedup_eval": round(every["eval_seconds"] / only["eval_seconds"], 2),
        "same_losses": every["train_losses"] == only["train_losses"] and every["eval_loss"] == only["eval_loss"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_lm_head.json").write_text(json.dumps(summary, indent=2) + "\n")
    row = lambda name, r: f"| {name} | {r['tokens_per_second']} | {r['seconds']} | {r['eval_seconds']} | {r['train_losses']} | {r['eval_loss']} |"  # noqa: E731
    lines = [
        "# The train stage on a CPU: TRL's fused LM head on every position vs on the loss positions (`python bench/cpu_lm_head.py`)",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_name()}), torch {summary['machine']['torch']}, TRL {summary['machine']['trl']}, commit {summary['machine']['commit']}. "
        f"Default params, {TRAIN_STEPS} steps of batch {only['batch']}, one evaluation of {only['eval_rows']} rows.",
        "",
        "| LM head projects | train tokens/s | wall s | eval s | train losses | eval loss |",
        "|---|---|---|---|---|---|",
        row("every position (TRL 1.16 on a CPU)", every),
        row("loss positions only (the workbook)", only),
        "",
        f"Loss positions only: {summary['speedup_tokens_per_second']}x the tokens/s, evaluation {summary['speedup_eval']}x faster; same losses: {summary['same_losses']}.",
    ]
    (RESULTS / "cpu_lm_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
