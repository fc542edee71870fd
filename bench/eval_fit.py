"""Evaluation fit of the Colab params: stage 04's generation under T4 / L4 memory caps.

    python bench/eval_fit.py make-models --models DIR [--tokenizers DIR]   # random weights of real shapes
    python bench/eval_fit.py run --models DIR [--only CASE ...]

Each case (its own process, so peak memory is its own) caps the GPU with torch.cuda.set_per_process_memory_fraction
(14.5 GiB for a 15 GiB T4, 21.5 GiB for a 22.5 GiB L4, as bench/train_throughput.py's training fit does), builds
the eval split with stage 01 from the params file itself (the default RAG-QA data, the params' prompt settings,
the model's real Llama-3.1 / 3.2 tokenizer and chat template) and runs stage 04 (`tunebook.evaluation.evaluate.evaluate`,
what notebook 04 calls: `load_for_inference` then the batched generator) on the base model, which is a
random-weight checkpoint of the model's real shape (Llama-3-8B for colab_t4, loaded in 4-bit NF4 as its
evaluate.load_in_4bit asks, float16 as a T4 has no bfloat16; Llama-3.2-3B in bfloat16 for colab_l4). The
params' evaluate.batch_size and max_new_tokens are kept; random weights never write end-of-turn, so every row
generates all max_new_tokens (the worst case; each batch's generated length is recorded to show it).

Cases:
- t4_hf / l4_hf: the params as they are, evaluate.backend auto (= transformers in 04).
- t4_unsloth / l4_unsloth: the same with evaluate.backend=unsloth.
- t4_hf_halving / l4_hf_halving: a deliberately large batch (evaluate.batch_size=256 over 256 eval prompts,
  data.eval_size=256) under the same cap: 04 must catch the out-of-memory error, halve the batch and finish.

Every attempted batch is recorded (rows, prompt tokens, new tokens, out of memory or not), so a halving shows
as the sizes tried. Peak memory is torch's max_memory_allocated / max_memory_reserved over load and generation.
Writes bench/results/eval_fit.json (merged with earlier cases; --results elsewhere) and eval_fit.md beside it.

On the GPU machine (/work/shared/gpu/README.md), after `bash .gpu/c1/install.sh`, with the tokenizers packed here by
`tar -cJf .gpu/evalfit/tok.tar.xz -C ~/.cache/tunebook/tokenizers llama3_1-3.7.2 llama3_2-3.7.2` and carried:
    source /root/g/env.sh && mkdir -p /root/g/tok && tar -xJf .gpu/evalfit/tok.tar.xz -C /root/g/tok
    python bench/eval_fit.py make-models --models /root/g/efm --tokenizers /root/g/tok
    python bench/eval_fit.py run --models /root/g/efm --copy-to $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"

# The real tokenizers of the models the Colab params name (`make tokenizers`, as bench/family_matrix.py uses).
TOKENIZERS = {"llama3-8b": "llama3_1-3.7.2", "llama32-3b": "llama3_2-3.7.2", "tiny": "llama3_1-3.7.2"}
SHAPES = {
    **SHAPES,
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
HALVING = ["data.eval_size=256", "evaluate.batch_size=256"]
CASES = {
    # name: (params file, model shape, memory cap GiB, dtype the GPU would use, extra overrides)
    "t4_hf": ("colab_t4", "llama3-8b", 14.5, "float16", []),
    "l4_hf": ("colab_l4", "llama32-3b", 21.5, "bfloat16", []),
    "t4_hf_halving": ("colab_t4", "llama3-8b", 14.5, "float16", HALVING),
    "t4_unsloth": ("colab_t4", "llama3-8b", 14.5, "float16", ["evaluate.backend=unsloth"]),
    "l4_unsloth": ("colab_l4", "llama32-3b", 21.5, "bfloat16", ["evaluate.backend=unsloth"]),
    "l4_hf_halving": ("colab_l4", "llama32-3b", 21.5, "bfloat16", HALVING),
    "cpu_smoke": ("colab_t4", "tiny", None, "float32", ["data.eval_size=20", "evaluate.batch_size=8", "evaluate.max_new_tokens=4"]),
}


def default_tokenizers() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook")) / "tokenizers"


# ---------------------------------------------------------------------------------------------- models
def make_models(models: Path, tokenizers: Path, shapes: tuple[str, ...]) -> None:
    """Random-weight bf16 checkpoints of each shape with the real tokenizer, built on the GPU when there is one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    for name in shapes:
        target = models / name
        if (target / "config.json").exists():
            continue
        started = time.time()
        source = tokenizers / TOKENIZERS[name]
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = LlamaConfig(
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **SHAPES[name],
        )
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
        model.save_pretrained(target, max_shard_size="5GB")
        for file in source.iterdir():  # the tokenizer files as published (save_pretrained would rewrite them)
            shutil.copy2(file, target / file.name)
        del model
        torch.set_default_dtype(torch.float32)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{name}: {sum(f.stat().st_size for f in target.glob('*.safetensors')) / 2**30:.1f} GiB in {time.time() - started:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------- one case
def record_batches(model, log: list[dict]) -> None:
    """Wrap this model's generate() to log each batch 04 tries: rows, prompt tokens, new tokens, out of memory."""
    import torch

    inner = model.generate

    def generate(*args, **kwargs):
        ids = kwargs["input_ids"]
        entry = {"rows": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1])}
        log.append(entry)
        try:
            out = inner(*args, **kwargs)
        except torch.OutOfMemoryError:
            entry["out_of_memory"] = True
            raise
        entry["new_tokens"] = int(out.shape[1] - ids.shape[1])
        return out

    model.generate = generate


def case(name: str, models: Path, scratch: Path) -> dict:
    import torch

    from tunebook.dataset.build import build_dataset, load_split
    from tunebook.evaluation import evaluate as stage04
    from tunebook.models.families import render_prompt
    from tunebook.models.load import load_tokenizer
    from tunebook.run.folder import open_run

    params_file, shape, cap_gib, dtype, extra = CASES[name]
    gpu = torch.cuda.is_available()
    if gpu and cap_gib:
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(cap_gib / total_gib)
    if "evaluate.backend=unsloth" in extra:
        import unsloth  # noqa: F401  (before transformers' models load, as a Colab session running 02 first has it)
    path = models / shape
    run = open_run(
        ROOT / "params" / f"{params_file}.yaml",
        [
            f"model.name={path}",
            f"model.dtype={dtype}",
            f"output_dir={scratch}",
            f"run_name={name}",
            "evaluate.models=[base]",
            *extra,
        ],
    )
    build_dataset(run)  # stage 01: the eval split rendered from the default RAG-QA data with the params' prompt
    p = run.params
    tokenizer = load_tokenizer(str(path), p.model.chat_template, p.model.enable_thinking)
    lengths = sorted(len(tokenizer(render_prompt(tokenizer, e["prompt"]), add_special_tokens=False)["input_ids"]) for e in load_split(run, "eval"))

    batches: list[dict] = []
    load_for_inference = stage04.load_for_inference

    def loading(*args, **kwargs):  # 04's own loader; only the returned model's generate() is watched
        model, tok = load_for_inference(*args, **kwargs)
        record_batches(model, batches)
        return model, tok

    stage04.load_for_inference = loading
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        table = stage04.evaluate(run)
    except stage04.EvaluationFailed as e:  # random weights may write only special tokens: the run is timed all the same
        table = e.failures
    row = table[0]
    done = [b for b in batches if not b.get("out_of_memory")]
    return {
        "params": f"params/{params_file}.yaml",
        "shape": shape,
        "cap_gib": cap_gib,
        "dtype": dtype,
        "overrides": extra,
        "backend": "unsloth" if "evaluate.backend=unsloth" in extra else "hf",
        "load_in_4bit": p.evaluate.load_in_4bit,
        "batch_size": p.evaluate.batch_size,
        "max_new_tokens": p.evaluate.max_new_tokens,
        "prompts": row["n"],
        "prompt_tokens": {"min": lengths[0], "median": statistics.median(lengths), "max": lengths[-1]},
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None,
        "peak_memory_mb_04": row["peak_memory_mb"],
        "halved": any(b.get("out_of_memory") for b in batches),
        "out_of_memory_at": [b["rows"] for b in batches if b.get("out_of_memory")],
        "batch_used": max((b["rows"] for b in done), default=None),
        "batches_generated": len(done),
        "every_row_full_budget": all(b["new_tokens"] == p.evaluate.max_new_tokens for b in done),
        "generate_seconds": row["seconds"],
        "prompts_per_second": row.get("examples_per_second") or round(row["n"] / row["seconds"], 3),
        "load_seconds": row["load_seconds"],
        "batches": batches,
    }


def run_case(name: str, models: Path, scratch: Path) -> dict:
    import torch

    started = time.time()
    try:
        result = {**case(name, models, scratch), "ok": True}
    except Exception as e:  # a failed case is recorded with its reason, never dropped
        traceback.print_exc()
        text = str(e).strip()
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}",
            "out_of_memory": isinstance(e, torch.OutOfMemoryError) or "out of gpu memory" in text.lower(),
        }
        if torch.cuda.is_available():
            result.update(
                peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2)
            )
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------- driver
def run(models: Path, names: list[str], results_path: Path, copy_to: Path | None) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {"cases": {}}
    scratch = Path(tempfile.mkdtemp())
    for name in names:
        print(f"\n##### {name}", flush=True)
        out = scratch / f"{name}.json"
        completed = subprocess.run([sys.executable, __file__, "one", name, "--models", str(models), "--out", str(out)])
        results["cases"][name] = (
            json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"process exited with {completed.returncode} before writing a result"}
        )
        results["cases"][name]["machine"] = machine()
        print(json.dumps({k: v for k, v in results["cases"][name].items() if k != "batches"}), flush=True)
        write(results, results_path)
        if copy_to:  # partial results survive a command cut off at its time limit
            write(results, copy_to / results_path.name)
    print(report(results))


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(report(results))


def report(results: dict) -> str:
    lines = [
        "Stage 04 (tunebook.evaluation.evaluate.evaluate: load_for_inference + the batched generator) on random weights of the",
        "Colab params' model shapes, under a per-process GPU memory cap; prompts are stage 01's eval split of the params",
        "(default RAG-QA data, real Llama-3 tokenizer and chat template); every row generates all max_new_tokens.",
        "",
        "| case | params | shape | cap GiB | dtype | 4-bit | backend | prompts (tokens min/median/max) | batch_size -> used | halved | peak alloc GiB | peak reserved GiB | gen s | prompts/s | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in results["cases"].items():
        params, shape, cap, dtype, _ = CASES.get(name, ("?", "?", "?", "?", []))
        if not c.get("ok"):
            lines.append(
                f"| {name} | params/{params}.yaml | {shape} | {cap} | {dtype} | | | | | | {c.get('peak_allocated_gib', '')} | {c.get('peak_reserved_gib', '')} | failed: {c.get('error')} | | |"
            )
            continue
        t = c["prompt_tokens"]
        halved = "OOM at " + ", ".join(map(str, c["out_of_memory_at"])) + f", then {c['batch_used']}" if c["halved"] else "no"
        lines.append(
            f"| {name} | {c['params']} | {shape} | {cap} | {dtype} | {c['load_in_4bit']} | {c['backend']} | {c['prompts']} ({t['min']}/{t['median']}/{t['max']}) | "
            f"{c['batch_size']} -> {c['batch_used']} | {halved} | {c['peak_allocated_gib']} | {c['peak_reserved_gib']} | {c['generate_seconds']} | {c['prompts_per_second']} | {c['load_seconds']} |"
        )
    if results.get("note"):
        lines += ["", results["note"]]
    machines = {json.dumps(c.get("machine"), sort_keys=True) for c in results["cases"].values() if c.get("machine")}
    for m in map(json.loads, sorted(machines)):
        lines += [
            "",
            f"{m.get('gpu') or 'CPU'}; torch {m.get('torch')}, transformers {m.get('transformers')}, unsloth {m.get('unsloth')}, bitsandbytes {m.get('bitsandbytes')}, commit {m.get('commit')}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-models", help="write random-weight checkpoints with the real tokenizers")
    make.add_argument("--models", type=Path, required=True)
    make.add_argument("--tokenizers", type=Path, default=default_tokenizers(), help="folder holding llama3_1-3.7.2/ and llama3_2-3.7.2/")
    make.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["llama3-8b", "llama32-3b"])
    go = sub.add_parser("run", help="run cases, each in its own process, and write the results")
    go.add_argument("--models", type=Path, required=True)
    go.add_argument("--only", nargs="+", choices=list(CASES), default=[c for c in CASES if c != "cpu_smoke"])
    go.add_argument("--results", type=Path, default=RESULTS / "eval_fit.json", help="JSON to merge the cases into (.md beside it)")
    go.add_argument("--copy-to", type=Path, default=None, help="also write the results here after every case")
    one = sub.add_parser("one", help="run one case in this process (used by run)")
    one.add_argument("name", choices=list(CASES))
    one.add_argument("--models", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "make-models":
        make_models(args.models, args.tokenizers, tuple(args.shapes))
    elif args.command == "run":
        run(args.models, args.only, args.results, args.copy_to)
    else:
        args.out.write_text(json.dumps(run_case(args.name, args.models, Path(tempfile.mkdtemp())), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
