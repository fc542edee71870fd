"""CPU compute dtype: float32 against bfloat16 for what `make run` spends its time on, side by side in one run.

    python bench/cpu_bfloat16.py          # both dtypes, each case in its own process

On a CPU with bfloat16 matrix instructions (AVX-512 BF16 or AMX; `tunebook.models.load.cpu_computes_bfloat16`)
`model.dtype: auto` computes in bfloat16; elsewhere in float32. Cases, on SmolLM2-135M-Instruct and the default
params' real rows (stage 01 built into a scratch folder):
- train: the workbook's train stage (`tunebook.training.train.build_trainer` + `train`, what notebook 02 runs) for
  TRAIN_STEPS optimizer steps with no evaluation; steady-state tokens/s from its own meter.
- prefill: one forward pass over the first PREFILL_PROMPTS eval prompts in one left-padded batch (reading the
  prompt is what evaluation on CPU waits on), best of PREFILL_REPEATS.
- agreement: greedy answers (the engine as 04 runs it) on the first AGREEMENT_PROMPTS eval prompts of the base
  model in each dtype: the share that are identical.
Writes bench/results/cpu_bfloat16.json and cpu_bfloat16.md beside it.
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

from eval_throughput import default_eval_set
from train_throughput import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
DTYPES = ("float32", "bfloat16")
TRAIN_STEPS, PREFILL_PROMPTS, PREFILL_REPEATS, AGREEMENT_PROMPTS = 5, 16, 3, 32


def train_case(dtype: str) -> dict:
    from datasets import load_from_disk

    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run
    from tunebook.training.train import build_trainer, train

    overrides = [f"output_dir={tempfile.mkdtemp()}", f"model.dtype={dtype}", f"train.max_steps={TRAIN_STEPS}", f"train.eval_steps={TRAIN_STEPS * 10}"]
    run = open_run(ROOT / "params/default.yaml", overrides)
    splits = load_from_disk(str(build_dataset(run).dataset_dir / "hf"))
    trainer, _ = build_trainer(run.params, splits["train"], splits["eval"], Path(tempfile.mkdtemp()))
    trainer.args.save_strategy = "no"
    _, meter = train(trainer, run.params)
    return {"tokens_per_second": meter.summary()["tokens_per_second"], "steps": TRAIN_STEPS, "batch_size": run.params.train.batch_size}


def prefill_case(dtype: str) -> dict:
    import torch

    from tunebook.models.generate import render_prompts
    from tunebook.models.load import load_for_inference

    conversations, run = default_eval_set()
    model, tokenizer = load_for_inference(run.params.model.name, dtype=dtype, max_seq_length=run.params.model.max_seq_length)
    tokenizer.padding_side = "left"
    encoded = tokenizer(render_prompts(tokenizer, conversations[:PREFILL_PROMPTS]), return_tensors="pt", padding=True, add_special_tokens=False)
    seconds = []
    for _ in range(PREFILL_REPEATS):
        started = time.perf_counter()
        with torch.inference_mode():
            model(**encoded)
        seconds.append(time.perf_counter() - started)
    return {"seconds": round(min(seconds), 2), "prompts": PREFILL_PROMPTS, "tokens_per_prompt": encoded["input_ids"].shape[1]}


def answers_case(dtype: str) -> dict:
    from tunebook.models.generate import generate
    from tunebook.models.load import load_for_inference

    conversations, run = default_eval_set()
    model, tokenizer = load_for_inference(run.params.model.name, dtype=dtype, max_seq_length=run.params.model.max_seq_length)
    texts = generate(model, tokenizer, conversations[:AGREEMENT_PROMPTS], batch_size=run.params.evaluate.batch_size, max_new_tokens=32).texts
    return {"texts": texts}


CASES = {"train": train_case, "prefill": prefill_case, "answers": answers_case}


def run_case(case: str, dtype: str) -> dict:
    """One case in its own process (threads, allocator and compiled kernels its own), its result as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "case", case, dtype, out.name], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "case"])
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.command == "case":
        case, dtype, out = ns.args
        Path(out).write_text(json.dumps(CASES[case](dtype)))
        return

    from tunebook.models.load import cpu_computes_bfloat16

    results = {case: {dtype: run_case(case, dtype) for dtype in DTYPES} for case in CASES}
    answers = results.pop("answers")
    same = sum(a == b for a, b in zip(answers["float32"]["texts"], answers["bfloat16"]["texts"]))
    train, prefill = results["train"], results["prefill"]
    summary = {
        "machine": {**machine(), "cpu_computes_bfloat16": cpu_computes_bfloat16(), "cpus": os.cpu_count()},
        "train": train,
        "train_speedup": round(train["bfloat16"]["tokens_per_second"] / train["float32"]["tokens_per_second"], 2),
        "prefill": prefill,
        "prefill_speedup": round(prefill["float32"]["seconds"] / prefill["bfloat16"]["seconds"], 2),
        "identical_greedy_answers": f"{same}/{AGREEMENT_PROMPTS}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_bfloat16.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# CPU compute dtype: float32 vs bfloat16 (`python bench/cpu_bfloat16.py`)",
        "",
        f"Machine: {os.cpu_count()} CPUs, bfloat16 instructions: {summary['machine']['cpu_computes_bfloat16']}, commit {summary['machine']['commit']}.",
        "",
        "| work | float32 | bfloat16 | bfloat16 / float32 |",
        "|---|---|---|---|",
        f"| train stage, tokens/s ({TRAIN_STEPS} steps, batch {train['float32']['batch_size']}) | {train['float32']['tokens_per_second']} | {train['bfloat16']['tokens_per_second']} | {summary['train_speedup']}x |",
        f"| prefill, s ({PREFILL_PROMPTS} prompts x {prefill['float32']['tokens_per_prompt']} tokens) | {prefill['float32']['seconds']} | {prefill['bfloat16']['seconds']} | {summary['prefill_speedup']}x faster |",
        f"| identical greedy answers, base model ({AGREEMENT_PROMPTS} eval prompts) | | | {summary['identical_greedy_answers']} |",
    ]
    (RESULTS / "cpu_bfloat16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
