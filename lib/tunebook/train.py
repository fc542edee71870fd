"""Stage 02: LoRA supervised fine-tuning with the loss on the answer tokens only.

Two backends, one recipe:
- unsloth: FastLanguageModel (4-bit loading, use_gradient_checkpointing="unsloth") on a CUDA GPU;
- hf: transformers + PEFT + TRL, on CPU or GPU.
Both train TRL's SFTTrainer on conversational prompt/completion rows, so only the completion (the
answer) carries loss. Outputs: the LoRA adapter, a merged model, the log history and a loss plot.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from tunebook.config import Params
from tunebook.errors import TunebookError
from tunebook.models import has_cuda, pick_backend, pick_dtype, resolve_model
from tunebook.runs import Run, fresh_tmp_dir, replace_dir

# What "all-linear" means for Unsloth, which wants explicit names (Llama/Qwen/Mistral/Gemma naming).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainResult:
    log_history: list[dict]
    summary: dict


def finetune(run: Run) -> TrainResult:
    p = run.params
    dataset_dir = run.outputs_of("01_build_dataset")["dataset_dir"]
    backend = pick_backend(p.model.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)
    _check_trl(backend)
    from datasets import load_from_disk

    import torch

    with run.stage("02_finetune") as outputs:
        splits = load_from_disk(dataset_dir)
        train_ds = splits["train"].select_columns(["prompt", "completion"])
        eval_ds = splits["eval"].select(range(min(len(splits["eval"]), p.train.eval_loss_examples))).select_columns(["prompt", "completion"])
        model, tokenizer, peft_config = (_unsloth_model if backend == "unsloth" else _hf_model)(p)
        steps = _total_steps(p, len(train_ds))
        trainer = _trainer(p, model, tokenizer, peft_config, train_ds, eval_ds, run.dir / "checkpoints", steps)
        _check_labels(trainer, len(train_ds))
        print(f"Training {backend} backend, {len(train_ds)} examples, {steps} steps, device {'cuda' if has_cuda() else 'cpu'}.")
        started = time.time()
        try:
            result = trainer.train()
        except torch.OutOfMemoryError:
            raise TunebookError(out_of_memory_message(p)) from None
        seconds = time.time() - started
        adapter_dir, merged_dir = run.dir / "adapter", run.dir / "merged"
        _save(backend, trainer.model, tokenizer, adapter_dir, merged_dir)
        history = trainer.state.log_history
        (run.dir / "train_log.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
        outputs.update(
            backend=backend,
            adapter_dir=str(adapter_dir),
            merged_dir=str(merged_dir),
            train_log=str(run.dir / "train_log.json"),
            steps=result.global_step,
            train_examples=len(train_ds),
            train_seconds=round(seconds, 1),
            train_loss=round(result.training_loss, 4),
            tokens_per_second=round(trainer.state.num_input_tokens_seen / seconds, 1) if trainer.state.num_input_tokens_seen else None,
        )
    return TrainResult(log_history=history, summary=outputs)


def out_of_memory_message(p: Params) -> str:
    """What to turn when training runs out of GPU memory, with the values in use."""
    return (
        f"Out of GPU memory while training {p.model.name} (train.batch_size={p.train.batch_size}, "
        f"model.max_seq_length={p.model.max_seq_length}, model.load_in_4bit={str(p.model.load_in_4bit).lower()}, "
        f"train.lora_r={p.train.lora_r}). Turn these, in this order: halve train.batch_size and double train.grad_accum "
        "(same effective batch); lower model.max_seq_length (01 reports the token lengths); set model.load_in_4bit: true; "
        "lower train.lora_r. Nothing of this run's earlier stages was lost: re-run with --resume."
    )


def _check_trl(backend: str) -> None:
    import trl

    if backend == "hf" and not has_cuda() and trl.__version__.startswith("1.15."):
        raise TunebookError(
            f"TRL {trl.__version__} cannot train on a CPU-only torch (its fused LM-head loss needs Triton). "
            "Install TRL 1.16 or newer: pip install 'trl>=1.16'."
        )


def _hf_model(p: Params):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from tunebook.models import load_tokenizer

    tokenizer = load_tokenizer(p.model.name)
    kwargs = {}
    if has_cuda() and p.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=pick_dtype(p.model.dtype)
        )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(p.model.name), dtype=pick_dtype(p.model.dtype), device_map="auto" if has_cuda() else None, **kwargs
    )
    lora = LoraConfig(
        r=p.train.lora_r,
        lora_alpha=p.train.lora_alpha,
        lora_dropout=p.train.lora_dropout,
        target_modules=p.train.target_modules,
        use_rslora=p.train.use_rslora,
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, lora


def _unsloth_model(p: Params):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve_model(p.model.name),
        max_seq_length=p.model.max_seq_length,
        dtype=pick_dtype(p.model.dtype),
        load_in_4bit=p.model.load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=p.train.lora_r,
        lora_alpha=p.train.lora_alpha,
        lora_dropout=p.train.lora_dropout,
        target_modules=ALL_LINEAR if p.train.target_modules == "all-linear" else p.train.target_modules,
        use_rslora=p.train.use_rslora,
        use_gradient_checkpointing="unsloth",
        random_state=p.seed,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


def _total_steps(p: Params, n_train: int) -> int:
    if p.train.max_steps > 0:
        return p.train.max_steps
    return max(1, math.ceil(math.ceil(n_train / p.train.batch_size) / p.train.grad_accum * p.train.epochs))


def _trainer(p: Params, model, tokenizer, peft_config, train_ds, eval_ds, output_dir: Path, steps: int):
    from trl import SFTConfig, SFTTrainer

    dtype = str(pick_dtype(p.model.dtype)).removeprefix("torch.")
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=p.train.epochs,
        max_steps=p.train.max_steps,
        per_device_train_batch_size=p.train.batch_size,
        per_device_eval_batch_size=p.train.batch_size,
        gradient_accumulation_steps=p.train.grad_accum,
        learning_rate=p.train.learning_rate,
        lr_scheduler_type=p.train.lr_scheduler,
        warmup_steps=p.train.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=p.train.weight_decay,
        logging_steps=p.train.logging_steps,
        eval_strategy="steps",
        eval_steps=p.train.eval_steps or max(1, steps // 4),
        save_strategy="no",
        report_to="none",
        seed=p.seed,
        data_seed=p.seed,
        max_length=p.model.max_seq_length,
        completion_only_loss=True,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        # Recomputing activations saves GPU memory; on CPU it only costs time.
        gradient_checkpointing=has_cuda(),
        include_num_input_tokens_seen=True,
        neftune_noise_alpha=p.train.neftune_noise_alpha,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config)
    trainer.add_callback(_progress_printer())
    return trainer


def _progress_printer():
    """One plain line per log step: visible in a notebook and in papermill's headless log (a widget bar is not)."""
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    class ProgressPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "train_runtime" in logs:
                return
            elapsed = time.time() - self.started
            left = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            values = "  ".join(f"{k} {logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if isinstance(logs.get(k), (int, float)))
            print(f"step {state.global_step}/{state.max_steps}  {values}  elapsed {elapsed:.0f}s  left ~{left:.0f}s", flush=True)

    return ProgressPrinter()


def _check_labels(trainer, n_train: int) -> None:
    """Fail loudly when the answer tokens were all masked away (e.g. truncated by max_seq_length)."""
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise TunebookError("Every training example has its answer masked out (no loss tokens). Check model.max_seq_length and the chat template.")
    if kept < n_train:
        print(f"Note: {n_train - kept} of {n_train} training examples had no answer tokens left and were dropped.")


def _save(backend: str, model, tokenizer, adapter_dir: Path, merged_dir: Path) -> None:
    adapter_tmp, merged_tmp = fresh_tmp_dir(adapter_dir), fresh_tmp_dir(merged_dir)
    model.save_pretrained(str(adapter_tmp))
    tokenizer.save_pretrained(str(adapter_tmp))
    if backend == "unsloth":
        model.save_pretrained_merged(str(merged_tmp), tokenizer, save_method="merged_16bit")
    else:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_tmp))
        tokenizer.save_pretrained(str(merged_tmp))
    replace_dir(adapter_tmp, adapter_dir)
    replace_dir(merged_tmp, merged_dir)


def loss_curves(log_history: list[dict]):
    """(train_steps, train_loss, eval_steps, eval_loss) from a Trainer log history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, evals


def plot_loss(log_history: list[dict]):
    import matplotlib.pyplot as plt

    train, evals = loss_curves(log_history)
    fig, ax = plt.subplots(figsize=(7, 3))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    return fig
