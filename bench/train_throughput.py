"""Training throughput and memory on one GPU: the workbook's train stage against raw Unsloth and against
transformers + PEFT + bitsandbytes, padded against padding-free and packed batches, and the Colab params'
fit under T4 / L4 memory caps.

    python bench/train_throughput.py make-models --models DIR     # random-weight checkpoints of real shapes
    python bench/train_throughput.py run --models DIR [--only speed batching fit]

Cases (each in its own process, so peak memory is its own and no library patches leak between them):
- speed: Llama-3-8B shape with random weights, QLoRA r=16 on all linear layers, batch 4 x 2048 tokens, for
  (a) the workbook's train stage (`tunebook.training.train.build_trainer` + `train`, what notebook 02 runs),
  (b) a minimal raw Unsloth script (FastLanguageModel + get_peft_model + TRL's SFTTrainer on text rows, as in
  Unsloth's notebooks) and (c) transformers + PEFT + bitsandbytes 4-bit with gradient checkpointing
  (transformers' Trainer). Same rows, same optimizer (AdamW), same steps.
- batching: the default params on the default data's real variable-length examples (SmolLM2, all 404
  training rows, one epoch) with train.batching padded, padding_free and packed.
- fit: params/colab_t4.yaml and colab_l4.yaml (and the alternative model each names) for 20 steps on random
  weights of the model's shape, under torch.cuda.set_per_process_memory_fraction caps of 14.5 GiB (T4, in
  float16) and 21.5 GiB (L4), every row max_seq_length tokens long (the worst case).

Steady-state tokens/s come from the workbook's own meter (`tunebook.training.train.throughput_meter`, used in all three
speed setups as the measuring instrument): non-padding tokens over the wall time of the optimizer steps after
the first 20%, leaving out steps that contained an evaluation. Peak memory is torch's max_memory_reserved.
Writes bench/results/train_throughput.json (every case, merged with earlier cases; --results elsewhere) and
train_throughput.md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"

# Real shapes (config.json of meta-llama/Meta-Llama-3-8B and Llama-3.2-3B), filled with random weights.
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False
    ),
    "llama32-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
}
SPEED_STEPS, SPEED_BATCH, SPEED_LENGTH, SPEED_RANK = 25, 4, 2048, 16
FIT_STEPS = 20
FITS = {
    # name: (params file, shape of its model, memory cap GiB, dtype the GPU would use, extra overrides)
    "t4_llama3_8b_4bit": ("colab_t4", "llama3-8b", 14.5, "float16", []),
    "t4_llama32_3b_4bit": ("colab_t4", "llama32-3b", 14.5, "float16", []),
    "l4_llama32_3b_16bit": ("colab_l4", "llama32-3b", 21.5, "bfloat16", []),
    "l4_llama3_8b_4bit": ("colab_l4", "llama3-8b", 21.5, "bfloat16", ["model.load_in_4bit=true"]),
}
CASES = {
    "speed": ["speed_workbook", "speed_raw_unsloth", "speed_hf_peft"],
    "batching": ["batching_padded", "batching_padding_free", "batching_packed", "batching_packed_2048", "batching_3b_padded", "batching_3b_padding_free"],
    "fit": list(FITS),
}


# ---------------------------------------------------------------------------------------------- models
def make_models(models: Path, shapes: tuple[str, ...] = tuple(SHAPES)) -> None:
    """Random-weight bf16 checkpoints of each shape, with SmolLM2's tokenizer (ids fit in the 128k vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    for name in shapes:
        shape, target = SHAPES[name], models / name
        if (target / "config.json").exists():
            continue
        started = time.time()
        config = LlamaConfig(
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
        model.save_pretrained(target, max_shard_size="5GB")
        tokenizer.save_pretrained(target)
        del model
        torch.cuda.empty_cache()
        print(f"{name}: {sum(f.stat().st_size for f in target.glob('*.safetensors')) / 2**30:.1f} GiB in {time.time() - started:.0f}s", flush=True)


def smollm2_path() -> str:
    from tunebook.models.load import resolve_model

    return os.environ.get("SMOLLM2_HF") or resolve_model("embedded:SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------------------------- rows
def fixed_length_rows(tokenizer, n: int, length: int, seed: int = 0) -> list[dict]:
    """n prompt/completion conversations of exactly `length` tokens under the tokenizer's chat template:
    a user message of random single-token words and a short assistant answer."""
    rng = random.Random(seed)
    words = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower() and len(t) > 3]
    words.sort()
    rows = []
    for _ in range(n):
        answer = {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(8))}
        picked = [rng.choice(words) for _ in range(length)]
        size = length // 2
        for _ in range(20):
            prompt = [{"role": "user", "content": " ".join(picked[:size])}]
            tokens = len(tokenizer.apply_chat_template(prompt + [answer], tokenize=True, return_dict=False))
            if tokens == length:
                break
            size += length - tokens
        if tokens != length:
            raise RuntimeError(f"could not build a row of exactly {length} tokens (got {tokens})")
        rows.append({"prompt": prompt, "completion": [answer]})
    return rows


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------- cases
def _workbook_params(overrides: list[str], params_file: str = "default"):
    from tunebook.params.load import load_params

    return load_params(ROOT / "params" / f"{params_file}.yaml", overrides)


def _train_workbook(p, train_rows, eval_rows, out: Path) -> dict:
    from tunebook.training.train import batching_in_use, build_trainer, train

    started = time.time()
    trainer, backend = build_trainer(p, train_rows, eval_rows, out / "checkpoints")
    load_seconds = time.time() - started
    result, meter = train(trainer, p)

    return {
        "backend": backend,
        "batching": batching_in_use(trainer.args),
        "steps": result.global_step,
        "load_seconds": round(load_seconds, 1),
        "train_seconds": round(meter.seconds, 1),
        **meter.summary(),
    }


def speed_workbook(models: Path, out: Path) -> dict:
    from tunebook.models.load import load_tokenizer

    path = models / "llama3-8b"
    rows = fixed_length_rows(load_tokenizer(str(path)), SPEED_STEPS * SPEED_BATCH, SPEED_LENGTH)
    p = _workbook_params(
        [
            f"model.name={path}",
            "model.backend=unsloth",
            "model.load_in_4bit=true",
            f"model.max_seq_length={SPEED_LENGTH}",
            f"train.max_steps={SPEED_STEPS}",
            f"train.batch_size={SPEED_BATCH}",
            "train.grad_accum=1",
            f"train.lora_r={SPEED_RANK}",
            f"train.lora_alpha={SPEED_RANK}",
            "train.target_modules=all-linear",
            "train.eval_steps=100000",
            "train.eval_loss_examples=1",
            "train.warmup_ratio=0",
        ]
    )
    return _train_workbook(p, _dataset(rows), _dataset(rows[:1]), out)


def speed_raw_unsloth(models: Path, out: Path) -> dict:
    """What Unsloth's notebooks do, with nothing of the workbook but its meter."""
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel  # first: it patches transformers and TRL

    from tunebook.training.train import throughput_meter

    started = time.time()
    model, tokenizer = FastLanguageModel.from_pretrained(str(models / "llama3-8b"), max_seq_length=SPEED_LENGTH, dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model,
        r=SPEED_RANK,
        lora_alpha=SPEED_RANK,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    rows = fixed_length_rows(tokenizer, SPEED_STEPS * SPEED_BATCH, SPEED_LENGTH)
    texts = _dataset([{"text": tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)} for r in rows])
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=texts,
        args=SFTConfig(
            output_dir=str(out / "raw"),
            dataset_text_field="text",
            max_length=SPEED_LENGTH,
            per_device_train_batch_size=SPEED_BATCH,
            gradient_accumulation_steps=1,
            max_steps=SPEED_STEPS,
            learning_rate=2e-4,
            logging_steps=5,
            optim="adamw_torch",
            bf16=True,
            report_to="none",
            seed=3407,
            include_num_input_tokens_seen="non_padding",
            save_strategy="no",
        ),
    )
    meter = throughput_meter()
    trainer.add_callback(meter)
    load_seconds = time.time() - started
    result = trainer.train()
    return {"steps": result.global_step, "load_seconds": round(load_seconds, 1), "train_seconds": round(meter.seconds, 1), **meter.summary()}


def speed_hf_peft(models: Path, out: Path) -> dict:
    """transformers + PEFT + bitsandbytes 4-bit (NF4, double quant) with gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tunebook.training.train import throughput_meter

    started = time.time()
    path = str(models / "llama3-8b")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=SPEED_RANK, lora_alpha=SPEED_RANK, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = fixed_length_rows(tokenizer, SPEED_STEPS * SPEED_BATCH, SPEED_LENGTH)
    ids = _dataset([{"input_ids": tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)} for r in rows])
    trainer = Trainer(
        model=model,
        train_dataset=ids,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        args=TrainingArguments(
            output_dir=str(out / "hf"),
            per_device_train_batch_size=SPEED_BATCH,
            gradient_accumulation_steps=1,
            max_steps=SPEED_STEPS,
            learning_rate=2e-4,
            logging_steps=5,
            optim="adamw_torch",
            bf16=True,
            gradient_checkpointing=True,
            report_to="none",
            include_num_input_tokens_seen="non_padding",
            save_strategy="no",
            remove_unused_columns=False,
        ),
    )
    meter = throughput_meter()
    trainer.add_callback(meter)
    load_seconds = time.time() - started
    result = trainer.train()
    return {"steps": result.global_step, "load_seconds": round(load_seconds, 1), "train_seconds": round(meter.seconds, 1), **meter.summary()}


def _batching(batching: str, out: Path, extra: tuple[str, ...] = ()) -> dict:
    from datasets import load_from_disk

    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run

    overrides = [
        f"model.name={smollm2_path()}",
        "model.backend=unsloth",
        "data.max_train_examples=null",
        "train.epochs=1",
        "train.eval_steps=100000",
        "train.eval_loss_examples=1",
        f"train.batching={batching}",
        f"output_dir={out}",
        f"run_name=batching_{batching}",
        *extra,
    ]
    run = open_run(ROOT / "params" / "default.yaml", overrides)
    build_dataset(run)
    splits = load_from_disk(run.outputs_of("01_build_dataset").dataset_dir)
    return {"rows": len(splits["train"]), **_train_workbook(run.params, splits["train"], splits["eval"], out)}


def batching_padded(models: Path, out: Path) -> dict:
    return _batching("padded", out)


def batching_padding_free(models: Path, out: Path) -> dict:
    return _batching("padding_free", out)


def batching_packed(models: Path, out: Path) -> dict:
    return _batching("packed", out)


def batching_packed_2048(models: Path, out: Path) -> dict:
    """Packed rows of 2048 tokens: several of the default data's examples fit in each (at 768, mostly one)."""
    return _batching("packed", out, ("model.max_seq_length=2048",))


def _batching_3b(batching: str, models: Path, out: Path) -> dict:
    """The same default rows on a Llama-3.2-3B shape (random weights, 16-bit LoRA), where the GPU, not the
    host, bounds a step."""
    return _batching(batching, out, (f"model.name={models / 'llama32-3b'}", "model.load_in_4bit=false", f"run_name=batching_3b_{batching}"))


def batching_3b_padded(models: Path, out: Path) -> dict:
    return _batching_3b("padded", models, out)


def batching_3b_padding_free(models: Path, out: Path) -> dict:
    return _batching_3b("padding_free", models, out)


def fit(name: str, models: Path, out: Path) -> dict:
    import torch

    from tunebook.models.load import load_tokenizer

    params_file, shape, cap_gib, dtype, extra = FITS[name]
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(cap_gib / total_gib)
    p = _workbook_params(
        [
            f"model.name={models / shape}",
            f"model.dtype={dtype}",
            "model.backend=unsloth",
            *extra,
            f"train.max_steps={FIT_STEPS}",
            "train.eval_steps=10",
            "train.eval_loss_examples=8",
        ],
        params_file,
    )
    per_step = p.train.batch_size * p.train.grad_accum
    rows = fixed_length_rows(load_tokenizer(str(models / shape)), FIT_STEPS * per_step, p.model.max_seq_length)
    result = _train_workbook(p, _dataset(rows), _dataset(rows[:8]), out)
    return {
        "params": f"params/{params_file}.yaml",
        "shape": shape,
        "cap_gib": cap_gib,
        "dtype": dtype,
        "overrides": extra,
        "batch": f"{p.train.batch_size} x {p.train.grad_accum} x {p.model.max_seq_length}",
        "lora_r": p.train.lora_r,
        "load_in_4bit": p.model.load_in_4bit,
        "optimizer": p.train.optimizer,
        **result,
    }


def run_case(name: str, models: Path, out: Path) -> dict:
    import torch

    started = time.time()
    try:
        result = fit(name, models, out) if name in FITS else globals()[name](models, out)
        result["ok"] = True
    except Exception as e:  # a failed case is recorded with its reason, never dropped
        traceback.print_exc()
        oom = isinstance(e, torch.OutOfMemoryError) or "out of GPU memory" in str(e).lower() or "out of memory" in str(e).lower()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", "out_of_memory": oom}
    result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["seconds"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------- driver
def run(models: Path, groups: list[str], out: Path, results_path: Path) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {"cases": {}}
    for name in [case for group in groups for case in CASES.get(group, [group])]:
        print(f"\n##### {name}", flush=True)
        case_file = out / f"{name}.json"
        command = [sys.executable, __file__, "one", name, "--models", str(models), "--out", str(out)]
        completed = subprocess.run(command)
        if case_file.exists():
            results["cases"][name] = json.loads(case_file.read_text())
        else:
            results["cases"][name] = {"ok": False, "error": f"process exited with {completed.returncode} before writing a result"}
        print(json.dumps(results["cases"][name]), flush=True)
    results["machine"] = machine()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    results_path.with_suffix(".md").write_text(report(results))
    print(report(results))


def machine() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip():
        commit += "+uncommitted changes"
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "host": platform.node(), "commit": commit, **versions}


def report(results: dict) -> str:
    cases = results["cases"]

    def rate(name):
        c = cases.get(name, {})
        return c.get("tokens_per_second") if c.get("ok") else None

    def ratio(a, b):
        return f"{rate(a) / rate(b):.2f}x" if rate(a) and rate(b) else "n/a"

    def row(name, label):
        c = cases.get(name)
        if not c:
            return None
        if not c.get("ok"):
            return f"| {label} | failed: {c.get('error')} | | |"
        return f"| {label} | {c['tokens_per_second']:,.0f} | {c.get('peak_gpu_memory_gb')} | {c.get('peak_allocated_gb')} |"

    m = results.get("machine", {})
    lines = [
        f"GPU: {m.get('gpu')}; torch {m.get('torch')}, transformers {m.get('transformers')}, TRL {m.get('trl')}, unsloth {m.get('unsloth')}, commit {m.get('commit')}.",
        "",
    ]
    lines += [
        "Llama-3-8B shape (random weights), QLoRA r=16 all linear layers, batch 4 x 2048 tokens:",
        "",
        "| setup | tokens/s | peak reserved GiB | peak allocated GiB |",
        "|---|---|---|---|",
    ]
    lines += filter(
        None,
        [
            row("speed_workbook", "(a) workbook train stage"),
            row("speed_raw_unsloth", "(b) raw Unsloth"),
            row("speed_hf_peft", "(c) transformers + PEFT + bnb 4-bit"),
        ],
    )
    lines += [
        "",
        f"Workbook / raw Unsloth: {ratio('speed_workbook', 'speed_raw_unsloth')}; workbook / transformers+PEFT: {ratio('speed_workbook', 'speed_hf_peft')}.",
        "",
    ]
    lines += [
        "Default data (SmolLM2-135M, 404 real variable-length rows, one epoch), workbook train stage:",
        "",
        "| train.batching | tokens/s | peak reserved GiB | peak allocated GiB |",
        "|---|---|---|---|",
    ]
    lines += filter(None, [row(f"batching_{b}", b) for b in ("padded", "padding_free", "packed")])
    lines += [
        "",
        f"padding_free / padded: {ratio('batching_padding_free', 'batching_padded')}; packed / padded: {ratio('batching_packed', 'batching_padded')}.",
        "",
    ]
    lines += [
        "Colab params, 20 steps under a memory cap, every row max_seq_length tokens:",
        "",
        "| case | params | model shape | cap GiB | dtype | batch x accum x length | result | peak reserved GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in FITS:
        c = cases.get(name)
        if c:
            verdict = f"{c['steps']} steps, fits" if c.get("ok") else ("out of memory" if c.get("out_of_memory") else f"failed: {c.get('error')}")
            lines.append(
                f"| {name} | {c.get('params', FITS[name][0])} | {FITS[name][1]} | {FITS[name][2]} | {FITS[name][3]} | {c.get('batch', '')} | {verdict} | {c.get('peak_gpu_memory_gb', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-models", help="write random-weight checkpoints of each shape")
    make.add_argument("--models", type=Path, required=True)
    go = sub.add_parser("run", help="run cases, each in its own process, and write the results")
    go.add_argument("--models", type=Path, required=True)
    go.add_argument("--only", nargs="+", choices=[*CASES, *(c for cases in CASES.values() for c in cases)], default=list(CASES), help="groups or single cases")
    go.add_argument("--out", type=Path, default=Path("/tmp/train_throughput"), help="scratch folder for the runs")
    go.add_argument("--results", type=Path, default=RESULTS / "train_throughput.json", help="JSON to merge the cases into (.md beside it)")
    one = sub.add_parser("one", help="run one case in this process (used by run)")
    one.add_argument("name")
    one.add_argument("--models", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "make-models":
        make_models(args.models)
    elif args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.models, args.only, args.out, args.results)
    else:
        result = run_case(args.name, args.models, args.out / args.name)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
