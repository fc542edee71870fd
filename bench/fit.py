"""The fit check's predictions (tunebook.checks.fit) against measured peaks: training and evaluation through tunebook's own code
on random-weight models of real shapes, each case in its own process.

    python bench/fit.py make-models --models DIR [--tokenizers DIR] [--tiny] [--shapes NAME ...]
    python bench/fit.py run --models DIR [--tiny] [--only CASE ...] [--results FILE] [--copy-to DIR]
    python bench/fit.py seed-hub-cache DIR     # bench/configs/*.json as a hub cache, for `check --machine` offline
    python bench/fit.py params-table --machine colab-t4   # every params/*.yaml against a machine, one row each
    python bench/fit.py docs                              # docs/fit.md's tables: that, and each Colab file on its machine

Models: the public architectures' config.json written from their published hyperparameters (bench/configs/, one per
hub id), filled with random bfloat16 weights (built on the GPU when there is one) and saved with the family's real
tokenizer (`make tokenizers`: $TUNEBOOK_CACHE/tokenizers). --tiny: the same architectures with hidden size 64 and two
layers, to prove the code path on a CPU (memory there is the process's RSS and is not compared).

Cases (CASES): every params/colab_*.yaml as shipped, training and evaluation, on its model's shape (float16 where the
file is meant for a T4, which has no bfloat16), plus Llama-3.2-1B on the hf backend at 1,024 tokens and Gemma-3-1B in
4-bit at 1,024 tokens. Training: `tunebook.training.train.build_trainer` + `train` (what notebook 02 runs; Unsloth where it is
installed, as backend auto picks) for 2 optimizer steps on rows of exactly the case's length (the worst case the fit
check assumes: every row model.max_seq_length long), then for the cases marked merge, 02's save of the adapter and
the merged model. Evaluation: `tunebook.models.load.load_for_inference` + `tunebook.models.generate.generate` (what 04 runs: the
static KV cache, batches of evaluate.batch_size) over two batches of prompts of the case's length; random weights never
write end-of-turn, so every row generates all max_new_tokens.

Measured: torch's max_memory_allocated and max_memory_reserved over the case, and what nvidia-smi shows, which is what
a machine's limit is about: the reserved peak plus the process's memory outside torch's allocator (the CUDA context,
cuBLAS workspaces, bitsandbytes' paged memory), read at the end as used device memory (cudaMemGetInfo) minus
memory_reserved. The prediction is compared with that figure (and its tensors alone with max_memory_allocated). The
merge's RAM: the process's peak RSS (VmHWM, reset before the save through /proc/self/clear_refs) and its sampled
anonymous memory; the prediction is compared with the peak RSS. Writes bench/results/fit.json (merged with earlier
cases) and fit.md beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "bench" / "configs"
GIB = 1024**3
TOKENIZER_VERSION = "3.7.2"

# shape name: (bench/configs file, the family's tokenizer package)
SHAPES = {
    "llama32-1b": ("unsloth--Llama-3.2-1B-Instruct", "llama3_2"),
    "llama32-3b": ("unsloth--Llama-3.2-3B-Instruct", "llama3_2"),
    "llama31-8b": ("unsloth--Meta-Llama-3.1-8B-Instruct", "llama3_1"),
    "qwen3-4b": ("unsloth--Qwen3-4B", "qwen3"),
    "gemma3-1b": ("unsloth--gemma-3-1b-it", "gemma3"),
    "gemma3-4b": ("unsloth--gemma-3-4b-it", "gemma3"),
}
# A vision-language checkpoint's processor files, as the public repository has them (gemma-3-4b-it): Unsloth loads its
# processor (image processor + tokenizer) with the model.
GEMMA3_IMAGE = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}
EXTRA_FILES = {
    "gemma3-4b": {"preprocessor_config.json": GEMMA3_IMAGE, "processor_config.json": {"image_seq_length": 256, "processor_class": "Gemma3Processor"}}
}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}


@dataclass(frozen=True)
class Case:
    kind: str  # train or eval
    params: str  # params/<name>.yaml
    shape: str
    length: int  # training rows' tokens, or eval prompts' tokens
    overrides: list[str] = field(default_factory=list)
    merge: bool = False  # measure 02's save (adapter + merged model) too


T4 = ["model.dtype=float16"]  # what a T4 computes in (no bfloat16)
CASES = {
    "train_colab_t4": Case("train", "colab_t4", "llama31-8b", 2048, T4),
    "train_colab_l4": Case("train", "colab_l4", "llama32-3b", 2048, [], merge=True),
    "train_colab_qwen3": Case("train", "colab_qwen3", "qwen3-4b", 2048, T4),
    "train_colab_gemma3": Case("train", "colab_gemma3", "gemma3-4b", 2048),
    "train_llama32_1b_hf_s1024": Case(
        "train",
        "colab_l4",
        "llama32-1b",
        1024,
        ["model.backend=hf", "train.batch_size=8", "train.grad_accum=1", "train.lora_r=16", "train.lora_alpha=32", "train.optimizer=adamw_torch"],
        merge=True,
    ),
    "train_gemma3_1b_4bit_s1024": Case("train", "colab_gemma3", "gemma3-1b", 1024, ["model.load_in_4bit=true"]),
    "eval_colab_t4": Case("eval", "colab_t4", "llama31-8b", 2000, T4),
    "eval_colab_l4": Case("eval", "colab_l4", "llama32-3b", 2000),
    "eval_colab_qwen3": Case("eval", "colab_qwen3", "qwen3-4b", 512, T4),
    "eval_colab_gemma3": Case("eval", "colab_gemma3", "gemma3-4b", 1024),
}
TRAIN_STEPS = 2
CPU_SETTINGS = ["train.optimizer=adamw_torch", "model.dtype=auto"]  # --tiny on a CPU: no 8-bit optimizer, no float16 there
TRAIN_SETTINGS = ["train.eval_steps=1000", "train.eval_loss_examples=1", "train.save_steps=1000", "train.warmup_ratio=0", "train.logging_steps=1"]
WORDS = (
    "river stone garden window market silver engine harbor forest yellow number letter summer winter castle bridge "
    "planet copper valley signal orange ticket doctor pencil mirror basket rocket island candle thunder meadow "
    "lantern saddle harvest compass feather blanket granite velvet orchard trumpet"
).split()


# ---------------------------------------------------------------------------------------------- models
def default_tokenizers() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook")) / "tokenizers"


def shape_config(shape: str, tiny: bool) -> dict:
    config = json.loads((CONFIGS / f"{SHAPES[shape][0]}.json").read_text())
    if not tiny:
        return config
    if "text_config" in config:  # a vision-language model: a tiny text model and a tiny vision tower
        return {
            **config,
            "text_config": {**config["text_config"], **TINY_TEXT},
            "vision_config": {**config["vision_config"], **TINY_VISION},
            "mm_tokens_per_image": 4,
        }
    return {**config, **TINY_TEXT}


def make_models(models: Path, tokenizers: Path, shapes: list[str], tiny: bool) -> None:
    """Random-weight bfloat16 checkpoints of each shape with the family's real tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    for name in shapes:
        target = models / name
        if (target / "config.json").exists():
            continue
        started = time.time()
        config = shape_config(name, tiny)
        models.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=models))  # renamed into place once complete
        (tmp / "config.json").write_text(json.dumps(config))
        loaded = AutoConfig.from_pretrained(tmp)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(loaded, dtype=torch.bfloat16)
        eos = config.get("eos_token_id")
        model.generation_config = GenerationConfig(eos_token_id=eos, bos_token_id=config.get("bos_token_id"), pad_token_id=config.get("pad_token_id"))
        model.save_pretrained(tmp, max_shard_size="5GB")
        source = tokenizers / f"{SHAPES[name][1]}-{TOKENIZER_VERSION}"
        for file in source.iterdir():  # the tokenizer files as the family ships them
            shutil.copy2(file, tmp / file.name)
        for file, content in EXTRA_FILES.get(name, {}).items():
            (tmp / file).write_text(json.dumps(content, indent=2))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tmp.rename(target)
        print(f"{name}: {sum(f.stat().st_size for f in target.glob('*.safetensors')) / GIB:.1f} GiB in {time.time() - started:.0f}s", flush=True)


def seed_hub_cache(cache: Path) -> None:
    """bench/configs/<org>--<name>.json as the hub cache's config.json of <org>/<name> (HF_HUB_CACHE=DIR), so that
    `python -m tunebook check params/colab_t4.yaml --machine colab-t4` reads the shipped params' models offline."""
    revision = "0" * 40
    for config in sorted(CONFIGS.glob("*.json")):
        repo = cache / f"models--{config.stem}"
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copy2(config, repo / "snapshots" / revision / "config.json")
    print(f"{len(list(CONFIGS.glob('*.json')))} configs in {cache}: HF_HUB_CACHE={cache} python -m tunebook check PARAMS --machine NAME")


def offline_hub_cache() -> Path:
    """bench/configs as the hub cache of this process (HF_HUB_CACHE, set before huggingface_hub is imported: it reads
    the variable once), so the shipped params' hub models are predicted offline; the same cache for later calls."""
    if "TUNEBOOK_BENCH_HUB_CACHE" not in os.environ:
        cache = Path(tempfile.mkdtemp())
        seed_hub_cache(cache)
        os.environ["HF_HUB_CACHE"] = os.environ["TUNEBOOK_BENCH_HUB_CACHE"] = str(cache)
    return Path(os.environ["TUNEBOOK_BENCH_HUB_CACHE"])


def params_table(machine_name: str) -> str:
    """`check --machine` over every shipped params file, one markdown row each (hub models' configs from bench/configs)."""
    offline_hub_cache()
    from tunebook.checks.fit import check_fit, machine_named
    from tunebook.params.load import load_params
    from tunebook.params.schema import STAGES

    machine = machine_named(machine_name)
    lines = [
        f"| params | model | peak GPU GiB (of {machine.gpu / GIB:.1f}) | peak RAM GiB (of {machine.ram / GIB:.1f}) | disk GiB | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted((ROOT / "params").glob("*.yaml")):
        p = load_params(path)
        report = check_fit(p, list(STAGES), machine)
        if report.unknown:
            lines.append(f"| {path.name} | {p.model.name} | | | | not predicted: {report.unknown} |")
            continue

        def peak(resource: str, report=report) -> str:
            rows = [r for r in report.rows if r.need.resource == resource]
            top = max(rows, key=lambda r: r.need.bytes, default=None)
            return f"{top.need.bytes / GIB:.1f} ({top.need.stage} {top.need.what})" if top else ""

        bad = report.problems + report.warnings
        verdict = "; ".join(
            f"{r.verdict}: {r.need.stage} {r.need.what} {r.need.resource} {r.need.bytes / GIB:.1f}" + (f" ({r.fix})" if r.verdict == "does not fit" else "")
            for r in bad
        )
        lines.append(f"| {path.name} | {p.model.name} | {peak('GPU')} | {peak('RAM')} | {peak('disk')} | {verdict or 'fits'} |")
    return "\n".join(lines)


# Each Colab params file and the machine it is made for (its header says which).
COLAB_MACHINES = {
    "colab_t4.yaml": "colab-t4",
    "colab_qwen3.yaml": "colab-t4",
    "colab_chat.yaml": "colab-t4",
    "colab_my_data.yaml": "colab-t4",
    "colab_l4.yaml": "colab-l4",
    "colab_gemma3.yaml": "colab-l4",
}
DOCS = ROOT / "docs" / "fit.md"
PARAMS_MARKERS = ("<!-- fit-params-table:start -->\n", "\n<!-- fit-params-table:end -->")
COLAB_MARKERS = ("<!-- fit-colab-tables:start -->\n", "\n<!-- fit-colab-tables:end -->")


def colab_tables() -> str:
    """`check PARAMS --machine M` for each Colab params file on its own machine (hub models' configs from bench/configs)."""
    offline_hub_cache()
    from tunebook.checks.fit import check_fit, machine_named
    from tunebook.params.load import load_params
    from tunebook.params.schema import STAGES

    shipped = sorted(p.name for p in (ROOT / "params").glob("colab_*.yaml"))
    unknown = sorted(set(shipped) - set(COLAB_MACHINES))
    if unknown:
        raise SystemExit(f"bench/fit.py COLAB_MACHINES does not name the machine of {unknown}")
    parts = []
    for name in shipped:
        report = check_fit(load_params(ROOT / "params" / name), list(STAGES), machine_named(COLAB_MACHINES[name]))
        parts.append(f"`python -m tunebook check params/{name} --machine {COLAB_MACHINES[name]}`:\n\n{report.table()}")
    return "\n\n".join(parts)


def update_docs() -> None:
    """docs/fit.md's two generated parts: every params file on a Colab T4, and each Colab file on its machine."""
    from tunebook.cli import replace_section

    replace_section(DOCS, PARAMS_MARKERS, params_table("colab-t4"))
    replace_section(DOCS, COLAB_MARKERS, colab_tables())
    print(f"updated {DOCS}")


# ---------------------------------------------------------------------------------------------- rows
def sized_text(tokenizer, render, target: int, seed: int) -> tuple[str, int]:
    """A user message of random words whose rendering (render(text) -> token ids) is as close to `target` tokens as
    a word allows, not over it, and that length."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(4 * target)]
    low, high = 1, len(words)
    while low < high:  # the most words whose rendering fits
        mid = (low + high + 1) // 2
        if len(render(" ".join(words[:mid]))) <= target:
            low = mid
        else:
            high = mid - 1
    text = " ".join(words[:low])
    return text, len(render(text))


def training_rows(tokenizer, n: int, length: int, fmt) -> tuple[list[dict], int, int]:
    """n prompt/completion rows of at most `length` tokens as 02 tokenizes them, the longest row, the longest answer."""
    from tunebook.models.families import training_tokens

    answer = [{"role": "assistant", "content": "copper harbor"}]
    rows, longest, answer_tokens = [], 0, 0

    def render(text):
        prompt, completion = training_tokens(tokenizer, fmt, [{"role": "user", "content": text}], answer)
        return prompt + completion

    for i in range(n):
        text, tokens = sized_text(tokenizer, render, length, i)
        rows.append({"prompt": [{"role": "user", "content": text}], "completion": answer})
        longest = max(longest, tokens)
        answer_tokens = len(training_tokens(tokenizer, fmt, rows[-1]["prompt"], answer)[1])
    return rows, longest, answer_tokens


def eval_prompts(tokenizer, n: int, length: int) -> tuple[list[list[dict]], int]:
    """n conversations whose generation prompt is at most `length` tokens, and the longest."""
    from tunebook.models.generate import render_prompts

    def render(text):
        return tokenizer(render_prompts(tokenizer, [[{"role": "user", "content": text}]])[0], add_special_tokens=False)["input_ids"]

    out, longest = [], 0
    for i in range(n):
        text, tokens = sized_text(tokenizer, render, length, 1000 + i)
        out.append([{"role": "user", "content": text}])
        longest = max(longest, tokens)
    return out, longest


# ---------------------------------------------------------------------------------------------- measuring
class RamPeak:
    """The process's peak RSS over a block (VmHWM after resetting it) and its sampled peak anonymous memory."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.anon, self.stop = [status("RssAnon")], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.05):
            self.anon.append(status("RssAnon"))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_rss, self.peak_anon = status("VmHWM"), max(self.anon)


def status(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where there is none)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def gpu_figures() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()  # the CUDA context and anything not in torch's allocator
    reserved = torch.cuda.max_memory_reserved()
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(reserved / GIB, 3),
        "outside_torch_gib": round(outside / GIB, 3),
        "nvidia_smi_peak_gib": round((reserved + outside) / GIB, 3),
    }


def predicted(p, model: Path, kind: str, lengths) -> dict:
    """tunebook.checks.fit's figures for this case on this machine: what it is compared with."""
    from tunebook.checks.fit import model_shape, predict, this_machine

    machine = this_machine(str(model))
    stage = "02_finetune" if kind == "train" else "04_evaluate"
    needs = {n.key: n for n in predict(p, model_shape(str(model)), machine, [stage], lengths)}
    resource = "GPU" if machine.gpu else "RAM"
    main = needs[("02", "train", resource)] if kind == "train" else needs[("04", "base", resource)]
    out = {"predicted_gib": round(main.bytes / GIB, 3), "predicted_parts": main.parts}
    if main.tensors is not None:
        out["predicted_tensors_gib"] = round(main.tensors / GIB, 3)
    if kind == "train":
        out["predicted_merge_ram_gib"] = round(needs[("02", "merge", "RAM")].bytes / GIB, 3)
    return out


# ---------------------------------------------------------------------------------------------- one case
def case(name: str, models: Path, scratch: Path) -> dict:
    import torch

    from tunebook.checks.fit import Lengths
    from tunebook.models.load import pick_backend
    from tunebook.params.load import load_params

    c = CASES[name]
    path = models / c.shape
    settings = [f"model.name={path}", f"model.max_seq_length={max(c.length, 64)}", f"output_dir={scratch}", f"run_name={name}", *TRAIN_SETTINGS, *c.overrides]
    gpu = torch.cuda.is_available()
    p = load_params(ROOT / "params" / f"{c.params}.yaml", settings + [f"train.max_steps={TRAIN_STEPS}"] + ([] if gpu else CPU_SETTINGS))
    if c.kind == "train" and pick_backend(p.model.backend) == "unsloth":
        import unsloth  # noqa: F401  (before transformers loads a model, as 02 does; 04 generates without it)
    baseline_rss = status("VmRSS")
    result = {
        "kind": c.kind,
        "params": f"params/{c.params}.yaml",
        "shape": c.shape,
        "length": c.length,
        "overrides": c.overrides,
        "baseline_rss_gib": round(baseline_rss / GIB, 3),
    }
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    if c.kind == "train":
        result.update(train_case(p, path, scratch, c, result))
    else:
        result.update(eval_case(p, path, c))
    lengths = Lengths(
        result["train_tokens"], result.get("prompt_tokens", c.length), p.evaluate.max_new_tokens or 32, result.get("answer_tokens", 16), "the case's rows"
    )
    result.update(predicted(p, path, c.kind, lengths))
    if "nvidia_smi_peak_gib" in result:
        result["error"] = round(result["predicted_gib"] / result["nvidia_smi_peak_gib"] - 1, 3)
    if "merge_peak_rss_gib" in result:
        result["merge_error"] = round(result["predicted_merge_ram_gib"] / result["merge_peak_rss_gib"] - 1, 3)
    return result


def train_case(p, path: Path, scratch: Path, c: Case, result: dict) -> dict:
    from datasets import Dataset

    from tunebook.models.families import chat_format
    from tunebook.models.load import load_tokenizer
    from tunebook.models.merge import merge_for_run
    from tunebook.training.train import build_trainer, save_adapter, train

    tokenizer = load_tokenizer(str(path), p.model.chat_template, p.model.enable_thinking)
    batch, accumulation = p.train.per_process_batch()
    rows, longest, answer = training_rows(
        tokenizer, batch * accumulation * TRAIN_STEPS, c.length, chat_format(tokenizer, enable_thinking=p.model.enable_thinking)
    )
    started = time.time()
    trainer, backend = build_trainer(p, Dataset.from_list(rows), Dataset.from_list(rows[:1]), scratch / "checkpoints")
    load_seconds = time.time() - started
    train_result, meter = train(trainer, p)
    out = {
        "backend": backend,
        "dtype": p.model.dtype,
        "train_tokens": longest,
        "answer_tokens": answer,
        "batch": f"{batch} x {accumulation} x {longest}",
        "steps": train_result.global_step,
        "load_seconds": round(load_seconds, 1),
        "tokens_per_second": meter.summary().get("tokens_per_second"),
        **gpu_figures(),  # the training's peaks, before the save
        "peak_rss_gib": round(status("VmHWM") / GIB, 3),
    }
    if c.merge:  # as 02 saves (train.train_and_save): the adapter, the trainer let go, then the merge
        save_adapter(trainer.model, trainer.model, trainer.processing_class, trainer.chat_format, scratch / "adapter")
        del trainer
        gc.collect()
        out["rss_before_merge_gib"] = round(status("VmRSS") / GIB, 3)
        with RamPeak() as ram:
            started = time.time()
            merge_for_run(p, scratch / "adapter", scratch / "merged")
        out.update(
            merge_seconds=round(time.time() - started, 1),
            merge_peak_rss_gib=round(ram.peak_rss / GIB, 3),
            merge_peak_anon_gib=round(ram.peak_anon / GIB, 3),
            merged_gib=round(sum(f.stat().st_size for f in (scratch / "merged").glob("*.safetensors")) / GIB, 3),
        )
    return out


def eval_case(p, path: Path, c: Case) -> dict:
    from tunebook.models.generate import generate
    from tunebook.models.load import load_for_inference

    started = time.time()
    model, tokenizer = load_for_inference(
        str(path),
        dtype=p.model.dtype,
        chat_template=p.model.chat_template,
        max_seq_length=p.model.max_seq_length,
        backend="hf",
        load_in_4bit=p.evaluate.load_in_4bit,
        enable_thinking=p.model.enable_thinking,
    )
    load_seconds = time.time() - started
    conversations, longest = eval_prompts(tokenizer, 2 * p.evaluate.batch_size, c.length)
    new = p.evaluate.max_new_tokens or 32
    generated = generate(model, tokenizer, conversations, batch_size=p.evaluate.batch_size, max_new_tokens=new)
    return {
        "backend": "hf",
        "dtype": p.model.dtype,
        "load_in_4bit": p.evaluate.load_in_4bit,
        "train_tokens": longest,
        "prompt_tokens": longest,
        "batch": f"{p.evaluate.batch_size} x ({longest} + {new})",
        "load_seconds": round(load_seconds, 1),
        "generate_seconds": round(generated.seconds, 1),
        **gpu_figures(),
        "peak_rss_gib": round(status("VmHWM") / GIB, 3),
    }


def run_case(name: str, models: Path, scratch: Path) -> dict:
    started = time.time()
    try:
        result = {**case(name, models, scratch), "ok": True}
    except Exception as e:  # a failed case is recorded with its reason, never dropped
        traceback.print_exc()
        text = str(e).strip()
        result = {"ok": False, "error_message": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}", **gpu_figures()}
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------- driver
def run(models: Path, names: list[str], results_path: Path, copy_to: Path | None, tiny: bool, timeout: float) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {"cases": {}}
    key = "tiny" if tiny else "cases"
    results.setdefault(key, {})
    for name in names:
        print(f"\n##### {name}", flush=True)
        scratch = Path(tempfile.mkdtemp(dir=models))
        out = scratch / "result.json"
        try:
            code = subprocess.run([sys.executable, __file__, "one", name, "--models", str(models), "--out", str(out)], timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"a timeout ({timeout:.0f} s)"
        results[key][name] = (
            json.loads(out.read_text()) if out.exists() else {"ok": False, "error_message": f"process ended with {code} before writing a result"}
        )
        results[key][name]["machine"] = machine()
        shutil.rmtree(scratch, ignore_errors=True)
        print(json.dumps(results[key][name]), flush=True)
        write(results, results_path)
        if copy_to:  # partial results survive a command cut off at its time limit
            write(results, copy_to / results_path.name)
    print(report(results))


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(report(results))


def _pct(x) -> str:
    return f"{x:+.0%}" if isinstance(x, (int, float)) else ""


def report(results: dict) -> str:
    lines = []
    for key, title in (("cases", "On the GPU"), ("tiny", "--tiny (CPU: the code path only; memory is the process's RSS, not compared)")):
        cases = results.get(key) or {}
        if not cases:
            continue
        lines += [
            f"{title}: predicted (tunebook.checks.fit) against measured peak GPU memory; measured = torch's peak reserved + the process's",
            "memory outside torch (nvidia-smi's view); alloc = torch's peak allocated against the predicted tensors.",
            "",
            "| case | params | shape | kind, backend, dtype | batch | predicted GiB | measured GiB | error | alloc pred / meas GiB | reserved GiB | outside torch GiB | merge RAM pred / meas GiB (error) | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in cases.items():
            if not c.get("ok"):
                lines.append(f"| {name} | | | | | | | failed: {c.get('error_message')} | | {c.get('peak_reserved_gib', '')} | | |")
                continue
            merge = f"{c['predicted_merge_ram_gib']} / {c['merge_peak_rss_gib']} ({_pct(c.get('merge_error'))})" if "merge_peak_rss_gib" in c else ""
            alloc = f"{c.get('predicted_tensors_gib', '')} / {c.get('peak_allocated_gib', '')}"
            lines.append(
                f"| {name} | {c['params']} | {c['shape']} | {c['kind']}, {c['backend']}, {c['dtype']} | {c['batch']} | {c['predicted_gib']} | "
                f"{c.get('nvidia_smi_peak_gib', '')} | {_pct(c.get('error'))} | {alloc} | {c.get('peak_reserved_gib', '')} | {c.get('outside_torch_gib', '')} | {merge} | {c.get('peak_rss_gib', '')} |"
            )
        errors = [abs(c["error"]) for c in cases.values() if c.get("ok") and "error" in c]
        merges = [abs(c["merge_error"]) for c in cases.values() if c.get("ok") and "merge_error" in c and key == "cases"]
        if errors:
            lines += ["", f"GPU: {sum(e <= 0.15 for e in errors)} of {len(errors)} predictions within 15% (largest error {max(errors):.0%})."]
        if merges:
            lines += [f"Merge RAM: {sum(e <= 0.20 for e in merges)} of {len(merges)} within 20% (largest error {max(merges):.0%})."]
        machines: dict[str, list[str]] = {}  # one line per machine and versions, with the commits its cases ran at
        for c in cases.values():
            m = dict(c.get("machine") or {})
            if m:
                commit = m.pop("commit", None)
                machines.setdefault(json.dumps(m, sort_keys=True), []).append(str(commit))
        for text, commits in sorted(machines.items()):
            m = json.loads(text)
            lines += [
                "",
                f"{m.get('gpu') or 'CPU'}; torch {m.get('torch')}, transformers {m.get('transformers')}, TRL {m.get('trl')}, unsloth {m.get('unsloth')}, "
                f"bitsandbytes {m.get('bitsandbytes')}; commit {', '.join(sorted(set(commits)))}.",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-models", help="random-weight checkpoints of the shapes with the real tokenizers")
    make.add_argument("--models", type=Path, required=True)
    make.add_argument("--tokenizers", type=Path, default=default_tokenizers(), help="folder holding <family>-3.7.2/ tokenizer folders")
    make.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    make.add_argument("--tiny", action="store_true", help="hidden size 64, two layers (a CPU run)")
    go = sub.add_parser("run", help="run cases, each in its own process, and write the results")
    go.add_argument("--models", type=Path, required=True)
    go.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    go.add_argument("--tiny", action="store_true", help="the tiny models (results under 'tiny')")
    go.add_argument("--results", type=Path, default=RESULTS / "fit.json", help="JSON to merge the cases into (.md beside it)")
    go.add_argument("--copy-to", type=Path, default=None, help="also write the results here after every case")
    go.add_argument("--case-timeout", type=float, default=300, help="seconds one case may take (default 300)")
    merge = sub.add_parser("merge", help="merge the cases of a results file (e.g. the GPU run's) into bench/results/fit.json")
    merge.add_argument("file", type=Path)
    seed = sub.add_parser("seed-hub-cache", help="bench/configs as a hub cache (HF_HUB_CACHE) for `check --machine` offline")
    seed.add_argument("cache", type=Path)
    table = sub.add_parser("params-table", help="every params/*.yaml against a machine (markdown)")
    table.add_argument("--machine", default="colab-t4")
    sub.add_parser("docs", help="write docs/fit.md's generated tables (every params file on a T4, each Colab file on its machine)")
    one = sub.add_parser("one", help="run one case in this process (used by run)")
    one.add_argument("name", choices=list(CASES))
    one.add_argument("--models", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "make-models":
        make_models(args.models, args.tokenizers, args.shapes, args.tiny)
    elif args.command == "run":
        run(args.models, args.only, args.results, args.copy_to, args.tiny, args.case_timeout)
    elif args.command == "merge":
        target = RESULTS / "fit.json"
        results = json.loads(target.read_text()) if target.exists() else {}
        for key, cases in json.loads(args.file.read_text()).items():
            results.setdefault(key, {}).update(cases)
        write(results, target)
        print(report(results))
    elif args.command == "seed-hub-cache":
        seed_hub_cache(args.cache)
    elif args.command == "params-table":
        print(params_table(args.machine))
    elif args.command == "docs":
        update_docs()
    else:
        args.out.write_text(json.dumps(run_case(args.name, args.models, args.out.parent), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
