"""Evaluation speed: the workbook's generation engine (`tunebook.models.generate.generate`, what notebook 04 runs)
against one-at-a-time generation, side by side in one run on one machine.

    python bench/eval_throughput.py cpu                            # SmolLM2-135M, the default eval set
    python bench/eval_throughput.py make-model --models DIR        # GPU: Llama-3-8B shape, random bf16 weights
    python bench/eval_throughput.py gpu --models DIR [--only CASE ...]

CPU (float32, one process, the default params' 100 eval prompts, SmolLM2-135M-Instruct as downloaded):
- one_at_a_time: transformers `generate()` per prompt with 32 new tokens, stopping at end-of-turn only: an
  evaluation loop as usually written (and the workbook's own fixed budget before this engine).
- one_at_a_time_same_budget: the engine with batch size 1, so the same token budget and stop strings as the
  workbook: what batching alone adds.
- workbook: the engine as 04 runs it with params/default.yaml (batches of 16 sorted by length, left padding,
  the budget derived from the training answers, stop at a line break).
- prefill_bound: one forward pass over each prompt, no generation: no evaluation can be faster.
GPU (each case its own process; bf16): 1,000 RAG-QA prompts of 550-650 tokens (the default data's passages)
and 32 new tokens; random weights never write end-of-turn, so every row gets all 32.
- hf_one_at_a_time / unsloth_one_at_a_time: one prompt at a time (timed on the first 48 prompts).
- hf_batched_64: plain transformers, batches of 64 in the given order with left padding (the issue's baseline).
- prefill_bound: forward passes over the prompts in sorted batches of 64 (the workbook's loaded model), no
  generation.
- workbook_hf_<b> / workbook_unsloth_<b>: the engine at batch size b on the hf and unsloth backends.
- agreement_hf / agreement_unsloth: SmolLM2 (real weights, bf16) on the default eval set, the engine at batch
  size 1 against batch 64: the share of identical greedy answers.
Results merge into bench/results/eval_throughput.json (and .md beside it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from train_throughput import machine, make_models, smollm2_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
GPU_PROMPTS, GPU_NEW_TOKENS, GPU_ONE_AT_A_TIME = 1000, 32, 48
BATCHES = (64, 128, 256)
GPU_CASES = [
    "hf_one_at_a_time",
    "unsloth_one_at_a_time",
    "hf_batched_64",
    "prefill_bound",
    *(f"workbook_{backend}_{b}" for backend in ("hf", "unsloth") for b in BATCHES),
    "agreement_hf",
    "agreement_unsloth",
]


# ---------------------------------------------------------------------------------------------- prompts
def default_eval_set(*overrides: str) -> tuple[list[list[dict]], object]:
    """The default params' eval prompts (stage 01 built into a scratch folder) and the run."""
    from tunebook.dataset.build import build_dataset, load_split
    from tunebook.run.folder import open_run

    run = open_run(ROOT / "params/default.yaml", [f"output_dir={tempfile.mkdtemp()}", *overrides])
    build_dataset(run)
    return [e["prompt"] for e in load_split(run, "eval")], run


def rag_prompts(tokenizer, n: int, seed: int = 0) -> list[list[dict]]:
    """n RAG-QA prompts of 550-650 tokens: a question with its passages, then other articles' passages, the last
    one cut at a word so the prompt ends up at its drawn length."""
    from tunebook.dataset.build import read_jsonl

    rows = read_jsonl(ROOT / "data/minipedia_rag_qa.jsonl")
    pool = [p for r in rows for p in r["passages"]]
    rng = random.Random(seed)

    def message(row, passages):
        body = "\n\n".join(f"[{k}] {p}" for k, p in enumerate(passages, 1))
        return [{"role": "user", "content": f"Answer from the passages.\n\nPassages:\n{body}\n\nQuestion: {row['question']}"}]

    def length(conversation):
        return len(tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=False))

    prompts = []
    for i in range(n):
        row, target = rows[i % len(rows)], rng.randint(550, 650)
        passages = list(row["passages"])
        while length(message(row, passages)) < target:
            passages.append(rng.choice(pool))
        words = passages[-1].split()
        low, high = 0, len(words)  # the most words of the last passage that keep the prompt within its target
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if length(message(row, passages[:-1] + [" ".join(words[:middle])])) <= target else (low, middle - 1)
        prompts.append(message(row, passages[:-1] + [" ".join(words[:low])]))
    return prompts


# ---------------------------------------------------------------------------------------------- timing
def timed(fn) -> tuple[object, float]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def one_at_a_time(model, tokenizer, conversations, max_new_tokens: int) -> list[str]:
    """The evaluation loop as usually written: one prompt, generate(), decode, next."""
    import torch

    from tunebook.models.generate import render_prompts

    texts = []
    for prompt in render_prompts(tokenizer, conversations):
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return texts


def plain_batched(model, tokenizer, conversations, batch_size: int, max_new_tokens: int) -> list[str]:
    """Batches in the given order, left padding: batching without the engine's sorting or budget."""
    import torch

    from tunebook.models.generate import render_prompts

    prompts, texts = render_prompts(tokenizer, conversations), []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def prefill(model, tokenizer, conversations, batch_size: int) -> None:
    """Forward passes over the prompts (sorted, left-padded), keeping only the last position's logits."""
    import torch

    from tunebook.models.generate import render_prompts

    prompts = sorted(render_prompts(tokenizer, conversations), key=len, reverse=True)
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            model(**encoded, logits_to_keep=1)


def speed(n: int, seconds: float, **extra) -> dict:
    return {
        "examples": n,
        "seconds": round(seconds, 2),
        "seconds_per_example": round(seconds / n, 4),
        "seconds_per_1000": round(1000 * seconds / n, 1),
        "examples_per_second": round(n / seconds, 2),
        **extra,
    }


# ---------------------------------------------------------------------------------------------- CPU
def cpu(results_path: Path) -> None:
    import torch

    from tunebook.evaluation.evaluate import answer_budget
    from tunebook.models.generate import generate
    from tunebook.models.load import load_for_inference
    from tunebook.params.schema import DEFAULT_MODEL

    conversations, run = default_eval_set()
    p = run.params.evaluate
    model, tokenizer = load_for_inference(DEFAULT_MODEL, dtype="float32")
    budget = answer_budget(run)
    n = len(conversations)
    cases = {}
    _, seconds = timed(lambda: prefill(model, tokenizer, conversations, 1))
    cases["prefill_bound"] = speed(n, seconds)
    naive, seconds = timed(lambda: one_at_a_time(model, tokenizer, conversations, 32))
    cases["one_at_a_time"] = speed(n, seconds, max_new_tokens=32)
    same, seconds = timed(lambda: generate(model, tokenizer, conversations, batch_size=1, max_new_tokens=budget, stop_strings=p.stop_strings).texts)
    cases["one_at_a_time_same_budget"] = speed(n, seconds, max_new_tokens=budget, stop_strings=p.stop_strings)
    batched, seconds = timed(
        lambda: generate(model, tokenizer, conversations, batch_size=p.batch_size, max_new_tokens=budget, stop_strings=p.stop_strings).texts
    )
    cases["workbook"] = speed(n, seconds, batch_size=p.batch_size, max_new_tokens=budget, stop_strings=p.stop_strings)
    cases["workbook"]["agreement_with_one_at_a_time_same_budget"] = sum(a == b for a, b in zip(batched, same)) / n
    base = cases["one_at_a_time"]["seconds"]
    for c in cases.values():
        c["speedup_over_one_at_a_time"] = round(base / c["seconds"], 2)
    info = {"model": "SmolLM2-135M-Instruct (float32)", "threads": torch.get_num_threads(), "eval_set": f"params/default.yaml, {n} prompts"}
    merge(results_path, "cpu", {"setup": info, "cases": cases})


# ---------------------------------------------------------------------------------------------- GPU
def gpu_case(name: str, models: Path) -> dict:
    from tunebook.evaluation.evaluate import answer_budget
    from tunebook.models.generate import generate
    from tunebook.models.load import load_for_inference

    if name.startswith("agreement_"):
        conversations, run = default_eval_set(f"model.name={smollm2_path()}")
        model, tokenizer = load_for_inference(smollm2_path(), dtype="bfloat16", backend=name.split("_")[1], max_seq_length=1024)
        options = dict(max_new_tokens=answer_budget(run), stop_strings=run.params.evaluate.stop_strings)
        one = generate(model, tokenizer, conversations, batch_size=1, **options).texts
        batched = generate(model, tokenizer, conversations, batch_size=64, **options).texts
        differ = [{"one_at_a_time": a, "batched": b} for a, b in zip(one, batched) if a != b]
        return {"examples": len(one), "agreement": round(1 - len(differ) / len(one), 4), "differences": differ[:10]}
    path = str(models / "llama3-8b")
    if name.startswith("hf_"):  # the baselines: transformers as a user loads it, stock SDPA attention
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda"), AutoTokenizer.from_pretrained(path)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one; this tokenizer has none
    else:
        backend = "unsloth" if "unsloth" in name else "hf"
        model, tokenizer = load_for_inference(path, dtype="bfloat16", backend=backend, max_seq_length=1024)
    conversations = rag_prompts(tokenizer, GPU_PROMPTS)
    if name.endswith("one_at_a_time"):
        sample = conversations[:GPU_ONE_AT_A_TIME]
        one_at_a_time(model, tokenizer, sample[:2], GPU_NEW_TOKENS)  # warm-up
        _, seconds = timed(lambda: one_at_a_time(model, tokenizer, sample, GPU_NEW_TOKENS))
        return speed(len(sample), seconds, timed_on=f"the first {len(sample)} of {GPU_PROMPTS} prompts")
    warm = conversations[:8]
    if name == "hf_batched_64":
        plain_batched(model, tokenizer, warm, 8, GPU_NEW_TOKENS)
        _, seconds = timed(lambda: plain_batched(model, tokenizer, conversations, 64, GPU_NEW_TOKENS))
        return speed(len(conversations), seconds)
    if name == "prefill_bound":
        prefill(model, tokenizer, warm, 8)
        _, seconds = timed(lambda: prefill(model, tokenizer, conversations, 64))
        return speed(len(conversations), seconds)
    batch = int(name.rsplit("_", 1)[1])
    generate(model, tokenizer, warm, batch_size=8, max_new_tokens=GPU_NEW_TOKENS)
    _, seconds = timed(lambda: generate(model, tokenizer, conversations, batch_size=batch, max_new_tokens=GPU_NEW_TOKENS))
    return speed(len(conversations), seconds, batch_size=batch)


def run_gpu_case(name: str, models: Path) -> dict:
    import torch

    started = time.time()
    try:
        torch.cuda.reset_peak_memory_stats()
        result = {**gpu_case(name, models), "ok": True, "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    except Exception as e:  # a failed case is recorded with its reason, never dropped
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def gpu(models: Path, names: list[str], results_path: Path) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    cases = results.get("gpu", {}).get("cases", {})
    scratch = Path(tempfile.mkdtemp())
    for name in names:
        print(f"\n##### {name}", flush=True)
        out = scratch / f"{name}.json"
        completed = subprocess.run([sys.executable, __file__, "gpu-one", name, "--models", str(models), "--out", str(out)])
        cases[name] = (
            json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"process exited with {completed.returncode} before writing a result"}
        )
        print(json.dumps(cases[name])[:600], flush=True)
    base, bound = cases.get("hf_one_at_a_time", {}), cases.get("prefill_bound", {})
    for c in cases.values():
        if c.get("ok") and "seconds_per_example" in c:
            c["speedup_over_hf_one_at_a_time"] = round(base["seconds_per_example"] / c["seconds_per_example"], 2) if base.get("ok") else None
            c["times_prefill_bound"] = round(c["seconds_per_example"] / bound["seconds_per_example"], 2) if bound.get("ok") else None
    setup = {"model": "Llama-3-8B shape, random weights, bfloat16", "prompts": f"{GPU_PROMPTS} RAG-QA prompts of 550-650 tokens", "new_tokens": GPU_NEW_TOKENS}
    merge(results_path, "gpu", {"setup": setup, "cases": cases})


# ---------------------------------------------------------------------------------------------- results
def merge(results_path: Path, part: str, value: dict) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results[part] = {**value, "machine": machine()}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    results_path.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = []
    for part in results:  # cpu, gpu, and any earlier GPU run kept under its own name (ratios stay within a run)
        title, reference = ("CPU", "one_at_a_time") if part == "cpu" else (f"GPU ({part})", "hf_one_at_a_time")
        r, m = results[part], results[part]["machine"]
        lines += [
            f"## {title}",
            "",
            "; ".join(f"{k}: {v}" for k, v in r["setup"].items()) + ".",
            "",
            f"{m.get('gpu') or 'CPU'}; torch {m.get('torch')}, transformers {m.get('transformers')}, unsloth {m.get('unsloth')}, commit {m.get('commit')}.",
            "",
            *([r["note"], ""] if r.get("note") else []),
            "| case | s / example | s / 1,000 | examples / s | vs one at a time | x prefill bound | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        bound = r["cases"].get("prefill_bound", {}).get("seconds_per_example")
        for name, c in r["cases"].items():
            if not c.get("ok", True):
                lines.append(f"| {name} | failed: {c.get('error')} | | | | | |")
            elif "seconds_per_example" in c:
                base = r["cases"].get(reference, {}).get("seconds_per_example")
                notes = ", ".join(
                    f"{k} {v}"
                    for k, v in c.items()
                    if k in ("batch_size", "max_new_tokens", "timed_on", "agreement_with_one_at_a_time_same_budget", "peak_allocated_gb")
                )
                lines.append(
                    f"| {name} | {c['seconds_per_example']} | {c['seconds_per_1000']:,} | {c['examples_per_second']} | "
                    f"{base / c['seconds_per_example']:.2f}x | {c['seconds_per_example'] / bound:.2f} | {notes} |"
                    if base and bound
                    else f"| {name} | {c['seconds_per_example']} | | | | | |"
                )
            else:
                lines.append(f"| {name} | | | | | | agreement {c['agreement']} on {c['examples']} prompts |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS / "eval_throughput.json", help="JSON to merge into (.md beside it)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cpu", help="SmolLM2 on the default eval set, on this machine's CPU")
    make = sub.add_parser("make-model", help="write the random-weight Llama-3-8B-shaped checkpoint")
    make.add_argument("--models", type=Path, required=True)
    go = sub.add_parser("gpu", help="GPU cases, each in its own process")
    go.add_argument("--models", type=Path, required=True)
    go.add_argument("--only", nargs="+", choices=GPU_CASES, default=GPU_CASES)
    one = sub.add_parser("gpu-one", help="one GPU case in this process (used by gpu)")
    one.add_argument("name", choices=GPU_CASES)
    one.add_argument("--models", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "cpu":
        cpu(args.results)
    elif args.command == "make-model":
        make_models(args.models, ("llama3-8b",))
    elif args.command == "gpu":
        gpu(args.models, args.only, args.results)
    else:
        args.out.write_text(json.dumps(run_gpu_case(args.name, args.models), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
