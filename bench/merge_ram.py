"""Peak system RAM of 02's merge and 03's GGUF export, for a model of a real shape with random weights.

A free Colab runtime has about 12.7 GB of RAM; an 8B model is 16 GB in 16-bit. This builds a random-weight model from a
config (default bench/configs/unsloth--Meta-Llama-3.1-8B-Instruct.json, Llama-3.1-8B's shape, in 5 GB safetensors shards as the hub has it) and a
LoRA adapter with the params' rank and targets (default params/colab_t4.yaml: r 64 on every linear layer; random A and
B, no training), then runs, each in a process of its own:

- merge: tunebook.models.merge.merge_adapter, as 02 calls it (float16, the T4's dtype);
- gguf_f16: tunebook.quantizing.quantize.write_f16_gguf, llama.cpp's converter on the merged folder (03's GGUF export);
- gguf_q4_k_m: llama.cpp's quantizer on that file, as 03 calls it (skipped where llama-cpp-python is not installed).

Each case's peak is the largest resident memory of its process and every process under it (sampled every 0.1 s by
psutil, and the kernel's ru_maxrss of each), written with the limit to bench/results/merge_ram.json.

    python bench/merge_ram.py                 # 8B shape: about 53 GB of disk under --work, minutes per case
    python bench/merge_ram.py --cases merge --keep; ... --cases gguf_f16 --keep; ... --cases gguf_q4_k_m   (in parts)
    python bench/merge_ram.py --tiny          # SmolLM2's shape, hidden 64 (seconds): proves the script end to end
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))

LIMIT_GB = 12.0
BASE_SHARD_BYTES = 5 * 10**9


def build_base(config_file: Path, tokenizer: Path, dest: Path, seed: int = 0) -> Path:
    """A model folder with random weights of the config's shape, written shard by shard (never whole in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.from_pretrained(config_file)
    with torch.device("meta"):
        shapes = {name: (tuple(t.shape), t.dtype) for name, t in AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, (shape, _) in shapes.items():
        if current and size + math.prod(shape) * 2 > BASE_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += math.prod(shape) * 2
    shards.append(current)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            std = 1.0 if name.endswith("norm.weight") else 0.02
            tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    total = sum(math.prod(s) * 2 for s, _ in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    for file in tokenizer.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(file, tmp / file.name)
    tmp.rename(dest)
    return dest


def build_adapter(base: Path, params_file: Path, dest: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter folder for `base` with the params' rank, alpha and targets, random A and B (as training
    leaves them, without the training), in float32 as PEFT saves it; the base's tokenizer beside it, as 02 saves it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunebook.models.families import linear_layer_names
    from tunebook.params.load import load_params

    if (dest / "adapter_model.safetensors").exists():
        return dest
    p = load_params(params_file).train
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    targets = linear_layer_names(model) if p.target_modules == "all-linear" else p.target_modules
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            weights[f"base_model.model.{name}.lora_A.weight"] = torch.randn((p.lora_r, module.in_features), generator=generator) / module.in_features**0.5
            weights[f"base_model.model.{name}.lora_B.weight"] = torch.randn((module.out_features, p.lora_r), generator=generator) * 0.01
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": p.lora_r,
        "lora_alpha": p.lora_alpha,
        "lora_dropout": p.lora_dropout,
        "use_rslora": p.use_rslora,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for file in base.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
            shutil.copy2(file, tmp / file.name)
    tmp.rename(dest)
    return dest


def case(name: str, args) -> None:
    """One case, in this process (started by `measure`): building the model and adapter (not measured), or a measured one."""
    work = Path(args.work)
    if name == "build":
        import torch

        if args.tiny:
            from family_matrix import tiny_model

            base = tiny_model("smollm2", work / "base")
        else:
            from family_matrix import tokenizer_folder

            tokenizer = Path(args.tokenizer) if args.tokenizer else tokenizer_folder("llama3_1")
            if tokenizer is None or not (tokenizer / "tokenizer.json").exists():
                raise SystemExit("No Llama 3.1 tokenizer: run `make tokenizers`, or pass --tokenizer FOLDER (tokenizer.json, tokenizer_config.json)")
            base = build_base(Path(args.config), tokenizer, work / "base")
        build_adapter(base, Path(args.params), work / "adapter")
        print(json.dumps({"torch": torch.__version__, "base_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}))
        return
    if name == "merge":
        from tunebook.models.merge import merge_adapter

        out = work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        merge_adapter(work / "base", work / "adapter", out, args.dtype)
    elif name == "gguf_f16":
        from tunebook.quantizing.quantize import write_f16_gguf

        write_f16_gguf(work / "merged", work / "model.f16.gguf", Path(args.converter) if args.converter else None)
    elif name == "gguf_q4_k_m":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        if llama_cpp.llama_model_quantize(str(work / "model.f16.gguf").encode(), str(work / "model.q4_k_m.gguf").encode(), params) != 0:
            raise SystemExit("llama.cpp could not quantize the f16 GGUF")
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"ru_maxrss_gb": round(max(own.ru_maxrss, children.ru_maxrss) * 1024 / 1e9, 3)}))


def measure(name: str, args, work: Path) -> dict:
    """Run one case in a child process; its peak resident memory, the child and every process under it together. This
    process imports no torch: Linux carries the forking process's peak into the child's ru_maxrss, so it stays small."""
    keep = [a for a in sys.argv[1:] if a != "--keep"]
    command = [sys.executable, __file__, *keep, "--case", name, "--work", str(work)]
    started = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        try:
            tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"case {name} failed (exit {child.returncode})")
    reported = json.loads(out.strip().splitlines()[-1])
    if name == "build":
        return reported
    peak_gb = max(round(peak / 1e9, 3), reported["ru_maxrss_gb"])
    return {
        "case": name,
        "peak_rss_gb": peak_gb,
        "sampled_tree_rss_gb": round(peak / 1e9, 3),
        **reported,
        "seconds": round(time.time() - started, 1),
        "within_limit": peak_gb <= LIMIT_GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="SmolLM2's architecture at hidden 64 with its tokenizer: the script end to end in seconds")
    parser.add_argument("--config", default=str(ROOT / "bench" / "configs" / "unsloth--Meta-Llama-3.1-8B-Instruct.json"))
    parser.add_argument("--tokenizer", help="Folder with the model's tokenizer files (default: Llama 3.1's from `make tokenizers`)")
    parser.add_argument("--params", default=str(ROOT / "params" / "colab_t4.yaml"), help="LoRA rank, alpha and targets come from here")
    parser.add_argument("--dtype", default="float16", help="The merged model's dtype (a T4: float16)")
    parser.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py (default: the one tunebook caches from llama-cpp-python's sdist)")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "merge_ram"), help="Folder for the model, adapter and outputs (8B: about 50 GB)")
    parser.add_argument("--out", help="Results JSON (default bench/results/merge_ram.json, or merge_ram_tiny.json with --tiny)")
    parser.add_argument("--keep", action="store_true", help="Keep --work afterwards (to run the cases in several calls)")
    parser.add_argument("--cases", help="Comma-separated: merge, gguf_f16, gguf_q4_k_m (default all; each needs the one before it in --work)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a case, in the process `measure` started: --work is its folder
        return case(args.case, args)
    work = Path(args.work) / ("tiny" if args.tiny else Path(args.config).stem)
    work.mkdir(parents=True, exist_ok=True)
    built = measure("build", args, work)
    cases = args.cases.split(",") if args.cases else ["merge", "gguf_f16", "gguf_q4_k_m"]
    if "gguf_q4_k_m" in cases and importlib.util.find_spec("llama_cpp") is None:
        cases.remove("gguf_q4_k_m")
        print("gguf_q4_k_m: skipped (llama-cpp-python is not installed)")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("merge_ram_tiny.json" if args.tiny else "merge_ram.json")
    earlier = json.loads(out.read_text())["results"] if args.cases and out.exists() else []  # a run in parts: the other cases kept
    results = [r for r in earlier if r["case"] not in cases]
    for name in cases:
        results.append(measure(name, args, work))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "model": "tiny SmolLM2 shape" if args.tiny else Path(args.config).name,
        "base_bytes": built["base_bytes"],
        "params": Path(args.params).name,
        "dtype": args.dtype,
        "limit_gb": LIMIT_GB,
        "machine": f"{platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 1e9:.0f} GB RAM; torch {built['torch']}",
        "results": results,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
