"""Stage 02: LoRA supervised fine-tuning with the loss on the answer tokens only.

Two backends, one recipe:
- unsloth: FastLanguageModel (4-bit or 16-bit loading, use_gradient_checkpointing="unsloth", padding-free
  or packed batches) on a CUDA GPU;
- hf: transformers + PEFT + TRL, on CPU or GPU.
Both train TRL's SFTTrainer on conversational prompt/completion rows with completion_only_loss, so only the
completion (the answer) carries loss; a check refuses to train when that masking is not in place. Outputs:
the LoRA adapter, a merged model (the adapter added to the base model's weights shard by shard, tunebook.models.merge, into the
run's weights folder: on Colab the runtime's own disk), the log history, throughput and peak GPU memory, and a loss plot; with
train.report_to, the losses in an experiment tracker too (tunebook.run.tracking), whose run 04 and 05 log to.

Checkpoints: every train.save_steps steps the Trainer saves the adapter, optimizer, scheduler, RNG states and its
state in <run>/checkpoints/checkpoint-N, beside params_key.json (the stage key and the params it hashes). Re-running
02 on an interrupted run (the notebook again, or `python -m tunebook run PARAMS --resume`) continues from the last
complete checkpoint, with the same total steps; the Trainer skips the batches already seen (same seed and data_seed),
so the run trains on what an uninterrupted one would. Checkpoints made with other params are never resumed: 02 stops
and names the keys that changed. Once the adapter and the merged model are saved, the checkpoints are removed.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from tunebook.colab.runtime import prepare_stage
from tunebook.errors import TunebookError
from tunebook.models.families import ChatFormat, chat_format, linear_layer_names, training_tokens
from tunebook.models.load import has_cuda, model_type, nf4_config, pick_backend, pick_dtype, prepare_tokenizer, resolve_model
from tunebook.models.merge import merge_for_run
from tunebook.models.patches import score_only_loss_positions
from tunebook.params.load import read_yaml
from tunebook.params.schema import Params
from tunebook.run import launch, tracking
from tunebook.run.files import fresh_tmp_dir, replace_dir, write_json_atomic
from tunebook.run.folder import Run
from tunebook.run.keys import stage_key, stage_values
from tunebook.run.outputs import FinetuneOutputs

STAGE = "02_finetune"
KEY_FILE = "params_key.json"  # in the checkpoints folder: which params its checkpoints were made with
# In the run folder while a launched training runs: the run its processes train (launch.hand_over), and the main one's record.
LAUNCHED_RUN, LAUNCHED_RECORD = "02_launched_run.json", "02_launched_record.json"


@dataclass
class TrainResult:
    log_history: list[dict]
    summary: FinetuneOutputs  # what 02 recorded


def finetune(run: Run) -> TrainResult:
    """Stage 02 on its run: in this process, or with train.num_processes > 1 on that many processes through
    `accelerate launch` (train_on_processes). Either way the same steps train and save (train_and_save)."""
    p = run.params
    checkpoints = run.dir / "checkpoints"
    prepare_stage(p, STAGE)
    with run.stage(STAGE) as outputs:
        resume_from = resume_point(checkpoints, p)  # before loading anything: changed params stop here
        checkpoints.mkdir(exist_ok=True)
        write_json_atomic(checkpoints / KEY_FILE, {"stage": STAGE, "key": stage_key(p, STAGE), "params": stage_values(p, STAGE)})
        result = train_on_processes(run, resume_from) if p.train.num_processes > 1 else train_and_save(run, resume_from)
        shutil.rmtree(checkpoints)  # the adapter is the result; checkpoints of a large model take gigabytes
        outputs.update(result.summary.as_json())
    return result


def train_and_save(run: Run, resume_from: Path | None, main_process: bool = True) -> TrainResult | None:
    """Train on the run's training split (from the checkpoint `resume_from`, if any), then save the adapter, the
    merged model and the log, and return what 02 records. In a launched training every process calls this and trains
    its share; only the main one tracks, saves and returns (the others return None)."""
    from datasets import load_from_disk

    p = run.params
    splits = load_from_disk(run.outputs_of("01_build_dataset").dataset_dir)
    trainer, backend = build_trainer(p, splits["train"], splits["eval"], run.dir / "checkpoints")
    resume_step = checkpoint_step(resume_from) if resume_from else 0
    # The tracker (train.report_to) gets the losses from the Trainer; what 04 and 05 need to reach its run is recorded.
    # Its callbacks log from the main process only; the set-up (TensorBoard's folder, the env) is the main one's too.
    with tracking.following(trainer, run.dir, p, resume_step) if main_process else nullcontext({}) as tracked:
        result, meter = train(trainer, p, resume_from)
    gathered = run.dir / "checkpoints" / "gathered"
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:
        # FSDP or DeepSpeed ZeRO (train.accelerate_config; not run by the tests: no GPUs): the weights lie in shards over
        # the processes. The Trainer's own save gathers the adapter, every process taking part; the main process then
        # merges it into the base model loaded on the CPU.
        trainer.save_model(str(gathered))
    if not main_process:
        return None
    # The adapter goes with the run; the merged model to the run's weights folder (on Colab, the runtime's own disk),
    # merged shard by shard from the base model's files once the trained model is let go (tunebook.models.merge).
    adapter_dir, merged_dir = run.dir / "adapter", p.weights_dir / "merged"
    save_adapter(gathered if sharded else trainer.model, trainer.model, trainer.processing_class, trainer.chat_format, adapter_dir)
    # Restored from the checkpoint on a resume, so it holds every logged step once.
    history = trainer.state.log_history
    (run.dir / "train_log.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    # After a resume the Trainer's training_loss sums only this session's losses but divides by all the steps.
    train_loss = result.training_loss if resume_from is None else mean_logged_loss(history)
    recorded = FinetuneOutputs(
        backend=backend,
        family=trainer.chat_format.family,
        stop_ids=list(trainer.chat_format.stop_ids),
        trained_prompt=trainer.trained_prompt,
        loss_example=trainer.loss_example,
        batching=batching_in_use(trainer.args),
        adapter_dir=str(adapter_dir),
        merged_dir=str(merged_dir),
        train_log=str(run.dir / "train_log.json"),
        steps=result.global_step,
        resumed_from_step=resume_step,
        train_examples=len(splits["train"]),
        train_seconds=round(meter.seconds, 1),
        train_loss=None if train_loss is None else round(train_loss, 4),
        tracker=tracked or None,
        num_processes=trainer.args.world_size,
        **meter.summary(),
    )
    del trainer
    gc.collect()
    merge_for_run(p, adapter_dir, merged_dir)
    return TrainResult(log_history=history, summary=recorded)


def train_on_processes(run: Run, resume_from: Path | None) -> TrainResult:
    """train_and_save on train.num_processes processes through `accelerate launch` (DDP, or the accelerate config's
    FSDP or DeepSpeed), their output streamed here: `python -m tunebook.training.train` (main below) in each. The main process
    saves the outputs and writes its record to a file that is read back here."""
    p = run.params
    n, cuda = p.train.num_processes, has_cuda()
    config_file = checked_accelerate_config(p)
    launch.refuse_more_processes_than_gpus(n, "train.num_processes")
    # The processes read this run's params (which a notebook may hold changed from its params.yaml) and 01's outputs.
    run_file, record_file = run.dir / LAUNCHED_RUN, run.dir / LAUNCHED_RECORD
    launch.hand_over(run, run_file, record_file=str(record_file), resume_from=str(resume_from or ""))
    record_file.unlink(missing_ok=True)
    command = launch.accelerate_command("tunebook.training.train", [str(run_file)], n, cuda=cuda, config_file=config_file)
    print(f"Training on {n} {'GPUs' if cuda else 'CPU processes'} through accelerate launch{f' ({config_file})' if config_file else ''}.", flush=True)
    try:
        launch.run_streaming(command, f"Training on {n} processes")
        recorded = FinetuneOutputs.from_json(json.loads(record_file.read_text(encoding="utf-8")), f"The record of the launched training ({record_file})")
    finally:
        run_file.unlink(missing_ok=True)
        record_file.unlink(missing_ok=True)
    return TrainResult(log_history=json.loads(Path(recorded.train_log).read_text(encoding="utf-8")), summary=recorded)


def checked_accelerate_config(p: Params) -> str | None:
    """train.accelerate_config, once it is known to exist and to launch train.num_processes processes."""
    path = p.train.accelerate_config
    if not path:
        return None
    config = read_yaml(path, "accelerate config (train.accelerate_config)") or {}
    if config.get("num_processes") != p.train.num_processes:
        raise TunebookError(
            f"train.accelerate_config {path} launches num_processes: {config.get('num_processes')}, but train.num_processes is "
            f"{p.train.num_processes}: set both to the number of GPUs to train on."
        )
    return path


def main(argv: list[str] | None = None) -> None:
    """One process of a launched training (train_on_processes), given the file launch.hand_over wrote: the run (opened
    to read 01's outputs; the stage itself is the launching process's), the checkpoint to resume from (empty: step 0)
    and the file the main process writes 02's record to. The other processes print nothing: the cell or terminal
    shows one log."""
    (run_file,) = argv if argv is not None else sys.argv[1:]
    run, request = launch.take_over(Path(run_file))
    record_file, checkpoint = request["record_file"], request["resume_from"]
    if pick_backend(run.params.model.backend, model_type=model_type(run.params.model.name)) == "unsloth":
        import unsloth  # noqa: F401  (before transformers and trl, which PartialState does not import but training does)
    from accelerate import PartialState

    main_process = PartialState(cpu=not has_cuda()).is_main_process
    if not main_process:  # the main process's progress bars and warnings say it all
        from datasets.utils.logging import disable_progress_bar
        from transformers.utils import logging as transformers_logging

        disable_progress_bar()
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    with open(os.devnull, "w") as silent, redirect_stdout(sys.stdout if main_process else silent):
        result = train_and_save(run, Path(checkpoint) if checkpoint else None, main_process)
    if result is not None:
        write_json_atomic(Path(record_file), result.summary.as_json())


def build_trainer(p: Params, train_rows, eval_rows, output_dir: Path):
    """The train stage's SFTTrainer for prompt/completion rows (a `datasets.Dataset` each), checked and ready:
    (trainer, backend). Benchmarks call this too, so they time exactly what 02 runs."""
    backend = pick_backend(p.model.backend, model_type=model_type(p.model.name))
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)
    _check_trl(backend)
    _check_gpu_only_knobs(p, backend)
    model, tokenizer, peft_config = (_unsloth_model if backend == "unsloth" else _hf_model)(p)
    fmt = chat_format(tokenizer, getattr(model, "generation_config", None), p.model.enable_thinking)
    train_ds = tokenized(train_rows, tokenizer, fmt)
    eval_ds = tokenized(eval_rows.select(range(min(len(eval_rows), p.train.eval_loss_examples))), tokenizer, fmt)
    steps = _total_steps(p, len(train_ds))
    trainer = _trainer(p, backend, model, tokenizer, peft_config, train_ds, eval_ds, output_dir, steps)
    trained_ids = _check_labels(trainer, len(train_ds), fmt)
    trainer.chat_format = fmt
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    trainer.loss_example = {"text": decode(train_ds[0]["input_ids"]), "trained": decode(trained_ids)}
    print(f"The first training example as trained: {trainer.loss_example['text']!r}; loss on {trainer.loss_example['trained']!r}")
    # 04 checks that each model it scores is prompted with exactly these ids (no train/inference template drift).
    trainer.trained_prompt = {
        "id": train_rows[0].get("id"),
        "prompt": train_rows[0]["prompt"],
        "prompt_ids": train_ds[0]["input_ids"][: train_ds[0]["completion_mask"].index(1)],
    }
    return trainer, backend


def tokenized(rows, tokenizer, fmt: ChatFormat):
    """Prompt/completion rows as token ids with a completion mask: the prompt exactly as generation renders it, then
    the answer and the family's end-of-turn token (families.training_tokens, which refuses template text in the
    answer). TRL takes pre-tokenized rows as they are."""
    from datasets import Dataset

    encoded = []
    for row in rows:
        prompt_ids, completion_ids = training_tokens(tokenizer, fmt, row["prompt"], row["completion"])
        encoded.append({"input_ids": prompt_ids + completion_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)})
    return Dataset.from_list(encoded)


def train(trainer, p: Params, resume_from: Path | None = None):
    """Run the trainer with a throughput meter, from step 0 or from the checkpoint `resume_from`; an out-of-memory
    error becomes one message naming the knobs."""
    import torch

    meter = throughput_meter()
    trainer.add_callback(meter)
    device = "cuda" if has_cuda() else "cpu"
    resuming = f", resuming at step {checkpoint_step(resume_from)} from {resume_from}" if resume_from else ""
    args = trainer.args
    if args.world_size > 1:
        batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        print(f"{args.world_size} processes x batch {batch} x accumulation {accumulation} = global batch {args.world_size * batch * accumulation}.")
    print(
        f"Training, {len(trainer.train_dataset)} rows, {trainer.args.max_steps if trainer.args.max_steps > 0 else 'all'} steps, device {device}, batching {batching_in_use(trainer.args)}{resuming}."
    )
    try:
        # The same call on both backends (Unsloth's notebooks resume this way too).
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise TunebookError(out_of_memory_message(p)) from None
    return result, meter


def resume_point(checkpoints: Path, p: Params) -> Path | None:
    """The last complete checkpoint in `checkpoints` to resume from (None: train from step 0). Checkpoints made with
    other params, or with no record of their params, stop 02 with the ways out; nothing is deleted."""
    last = last_checkpoint(checkpoints)
    if last is None:
        return None
    key_file = checkpoints / KEY_FILE
    restart = f"delete or move {checkpoints} to train from step 0"
    if not key_file.is_file():
        raise TunebookError(f"{checkpoints} holds {last.name} but no {KEY_FILE} saying which params made it, so it cannot be resumed safely: {restart}.")
    saved = json.loads(key_file.read_text(encoding="utf-8"))
    if saved["key"] != stage_key(p, STAGE):
        old, new = saved["params"], stage_values(p, STAGE)

        def shown(values: dict, k: str) -> str:
            return json.dumps(values[k]) if k in values else "(absent)"

        changed = [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in sorted(old.keys() | new.keys()) if shown(old, k) != shown(new, k)]
        raise TunebookError(
            f"The checkpoints in {checkpoints} (last: {last.name}) were made with other params than this run's; changed: "
            f"{'; '.join(changed) or 'none named (the key scheme changed)'}. Nothing was resumed or deleted. Either restore "
            f"those params (the run folder keeps its earlier ones as params.<time>.yaml) to continue from step {checkpoint_step(last)}, "
            f"or {restart} with the new ones."
        )
    return last


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint-N. The Trainer writes trainer_state.json last, so a runtime lost in the middle of
    a save leaves a folder without it (or with it half written), which is passed over."""

    def complete(folder: Path) -> bool:
        try:
            return "global_step" in json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False

    done = [d for d in checkpoints.glob("checkpoint-*") if d.name.removeprefix("checkpoint-").isdigit() and complete(d)]
    return max(done, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def mean_logged_loss(log_history: list[dict]) -> float | None:
    """The mean training loss per step from the logged losses, each weighted by the steps since the previous log."""
    train_points, _ = loss_curves(log_history)
    total, last = 0.0, 0
    for step, loss in train_points:
        total, last = total + loss * (step - last), step
    return total / last if last else None


def throughput_meter(warmup_fraction: float = 0.2):
    """A Trainer callback that measures steady-state training tokens/s and peak GPU memory.

    It times each optimizer step (from the end of one to the end of the next) with the tokens that went in
    (the Trainer's non-padding count), and leaves out the first `warmup_fraction` of the steps (compilation,
    allocator growth) and any step followed by an evaluation or a checkpoint save; it counts the saves."""
    import torch
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class ThroughputMeter(TrainerCallback):
        def __init__(self):
            self.steps: list[tuple[float, int, bool]] = []  # (seconds, tokens, an evaluation or a save ran in it) per step
            self.seconds = 0.0
            self.saves = 0

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.started = self._last_time = time.perf_counter()
            self._last_tokens = state.num_input_tokens_seen
            self._evaluated = False
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_evaluate(self, args, state, control, **kwargs):
            self._evaluated = True  # evaluation runs after on_step_end: it lands in the next step's interval

        def on_save(self, args, state, control, **kwargs):
            self._evaluated = True  # so does a checkpoint save
            self.saves += 1

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            self.steps.append((now - self._last_time, tokens - self._last_tokens, self._evaluated))
            self._last_time, self._last_tokens, self._evaluated = now, tokens, False

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

        def tokens_per_second(self) -> float | None:
            warm = max(1, round(len(self.steps) * warmup_fraction))
            kept = [(s, t) for s, t, evaluated in self.steps[warm:] if not evaluated]
            seconds = sum(s for s, _ in kept)
            return sum(t for _, t in kept) / seconds if kept and seconds else None

        def summary(self) -> dict:
            rate = self.tokens_per_second()
            out = {"tokens_per_second": round(rate, 1) if rate else None, "measured_steps": len(self.steps), "checkpoints_written": self.saves}
            if torch.cuda.is_available():
                out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            return out

    return ThroughputMeter()


def batching_in_use(args) -> str:
    if getattr(args, "packing", False):
        return "packed"
    return "padding_free" if getattr(args, "padding_free", False) else "padded"


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
            f"TRL {trl.__version__} cannot train on a CPU-only torch (its fused LM-head loss needs Triton). Install TRL 1.16 or newer: pip install 'trl>=1.16'."
        )


def _check_gpu_only_knobs(p: Params, backend: str) -> None:
    if p.train.batching in ("padding_free", "packed") and backend != "unsloth":
        raise TunebookError(
            f"train.batching: {p.train.batching} needs the unsloth backend (a GPU with unsloth): with transformers' own "
            "attention, examples sharing a row would attend to each other. Use batching: padded or auto."
        )
    if p.train.optimizer != "adamw_torch" and not has_cuda():
        raise TunebookError(f"train.optimizer: {p.train.optimizer} is a bitsandbytes GPU optimizer; on CPU use adamw_torch.")


def _hf_model(p: Params):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from tunebook.models.load import load_tokenizer

    tokenizer = load_tokenizer(p.model.name, p.model.chat_template, p.model.enable_thinking)
    kwargs = {}
    if has_cuda() and p.model.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(p.model.dtype, model_type(p.model.name))
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(p.model.name),
        dtype=pick_dtype(p.model.dtype, model_type(p.model.name)),
        **({"device_map": "auto" if has_cuda() else None} | launched_placement(p, "hf")),
        **kwargs,
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
        dtype=pick_dtype(p.model.dtype, model_type(p.model.name)),
        load_in_4bit=p.model.load_in_4bit,
        **launched_placement(p, "unsloth"),
    )
    # Unsloth wants explicit names: "all-linear" is this architecture's own linear layers, read from the model.
    targets = linear_layer_names(model) if p.train.target_modules == "all-linear" else p.train.target_modules
    model = FastLanguageModel.get_peft_model(
        model,
        r=p.train.lora_r,
        lora_alpha=p.train.lora_alpha,
        lora_dropout=p.train.lora_dropout,
        target_modules=targets,
        use_rslora=p.train.use_rslora,
        use_gradient_checkpointing="unsloth",
        random_state=p.seed,
    )
    return model, prepare_tokenizer(tokenizer, p.model.name, p.model.chat_template, p.model.enable_thinking), None


def launched_placement(p: Params, backend: str) -> dict:
    """from_pretrained's device_map in a process of a launched training on GPUs: a whole copy of the model on the
    process's own GPU (DDP, and Unsloth's DDP recipe), or for transformers with an accelerate config (FSDP, DeepSpeed)
    none, the framework sharding it. Empty (the backend's own placement) in one process or on a CPU."""
    if p.train.num_processes == 1 or not has_cuda():
        return {}
    if p.train.accelerate_config and backend == "hf":
        return {"device_map": None}
    from accelerate import PartialState

    return {"device_map": {"": PartialState().local_process_index}}


def _total_steps(p: Params, n_train: int) -> int:
    """The optimizer steps of the training, as the Trainer counts them in one process: batches of batch_size per epoch,
    grouped by grad_accum (a last, shorter group counts), times the epochs. Several processes take exactly as many."""
    if p.train.max_steps > 0:
        return p.train.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_train / p.train.batch_size) / p.train.grad_accum))
    return math.ceil(per_epoch * p.train.epochs)


def _trainer(p: Params, backend: str, model, tokenizer, peft_config, train_ds, eval_ds, output_dir: Path, steps: int):
    from trl import SFTConfig, SFTTrainer

    dtype = str(pick_dtype(p.model.dtype, model_type(p.model.name))).removeprefix("torch.")
    batching = {
        # auto on Unsloth: leave padding_free unset, and Unsloth picks padding-free or padded per GPU and data.
        "auto": {} if backend == "unsloth" else {"padding_free": False},
        "padded": {"padding_free": False},
        "padding_free": {"padding_free": True},
        "packed": {"packing": True},
    }[p.train.batching]
    # Several processes share out the global batch (batch_size x grad_accum) and take the steps one process would: the
    # Trainer would count an epoch's steps from each process's share of the rows, rounding differently.
    batch_size, grad_accum = p.train.per_process_batch()
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=p.train.epochs,
        max_steps=steps if p.train.num_processes > 1 else p.train.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=p.train.batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=p.train.learning_rate,
        lr_scheduler_type=p.train.lr_scheduler,
        warmup_steps=p.train.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=p.train.weight_decay,
        logging_steps=p.train.logging_steps,
        eval_strategy="steps",
        eval_steps=p.train.eval_steps or max(1, steps // 4),
        # Checkpoints to resume an interrupted run from; on resume the Trainer skips the batches already seen
        # (ignore_data_skip stays False) and restores the RNG states, so the data order is that of an unbroken run.
        save_strategy="steps",
        save_steps=p.train.save_steps,
        save_total_limit=p.train.save_total_limit,
        **tracking.trainer_arguments(p),  # report_to, run_name, project
        seed=p.seed,
        data_seed=p.seed,
        max_length=p.model.max_seq_length,
        completion_only_loss=True,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=not has_cuda(),  # transformers refuses bf16 without it on a machine with no GPU
        # Recomputing activations saves GPU memory; on CPU it only costs time.
        gradient_checkpointing=has_cuda(),
        # Gathered over the processes by the Trainer: the meter's tokens/s is the global rate.
        include_num_input_tokens_seen="non_padding",
        # DDP: every LoRA weight gets a gradient, and the search for unused ones breaks gradient checkpointing.
        ddp_find_unused_parameters=False,
        neftune_noise_alpha=p.train.neftune_noise_alpha,
        optim=p.train.optimizer,
        **batching,
    )
    if backend == "hf":
        score_only_loss_positions()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config)
    trainer.add_callback(_progress_printer())
    return trainer


def _progress_printer():
    """One plain line per log step: visible in a notebook and in papermill's headless log (a widget bar is not)."""
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    class ProgressPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.time(), state.global_step  # a resumed run starts past step 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The Trainer calls it in every process of a launched training: one prints.
            if not logs or "train_loss" in logs or not state.is_world_process_zero:  # train_loss: the end-of-training summary
                return
            elapsed = time.time() - self.started
            left = elapsed / max(state.global_step - self.first_step, 1) * (state.max_steps - state.global_step)
            values = "  ".join(f"{k} {logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if isinstance(logs.get(k), (int, float)))
            print(f"step {state.global_step}/{state.max_steps}  {values}  elapsed {elapsed:.0f}s  left ~{left:.0f}s", flush=True)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                print(f"checkpoint saved at step {state.global_step} in {args.output_dir}", flush=True)

    return ProgressPrinter()


def _check_labels(trainer, n_train: int, fmt: ChatFormat) -> list[int]:
    """Fail loudly unless the loss falls on the answer tokens and the end-of-turn token, and on nothing else: some
    answer tokens must carry loss (a row whose answer was cut off by max_seq_length has none), the prompt tokens must
    not, and in a batch as the collator makes it (where pad == end of turn could mask the stop) every row's trained
    tokens must end with the family's end-of-turn token, or the model never learns to stop."""
    counts = supervised_tokens(trainer.train_dataset)
    trained, total = sum(t for t, _ in counts), sum(n for _, n in counts)
    if trained == 0:
        raise TunebookError("Every training example has its answer masked out (no loss tokens). Check model.max_seq_length and the chat template.")
    if all(t == n for t, n in counts):
        raise TunebookError(
            "The loss covers the prompt tokens too, not only the answers: completion-only masking is off. Train on prompt/completion rows from 01."
        )
    if not trainer.args.packing and len(counts) < n_train:
        print(f"Note: {n_train - len(counts)} of {n_train} training examples had no answer tokens left and were dropped.")
    print(f"Loss on answer tokens only: {trained:,} of {total:,} tokens ({trained / total:.1%}); each answer ends with {fmt.end_of_turn!r} ({fmt.family}).")
    return _check_collated_stop(trainer, fmt)


def _check_collated_stop(trainer, fmt: ChatFormat, rows: int = 4) -> list[int]:
    """The first example's trained token ids in a batch as the collator makes it, after checking every answer in
    the batch ends with the end-of-turn token."""
    import torch

    first = trainer.train_dataset.select(range(min(rows, len(trainer.train_dataset))))
    labels = trainer.data_collator([first[i] for i in range(len(first))])["labels"]
    # The last token of each run of trained positions: one run per row when padded, several when padding-free.
    trained = labels != -100
    run_ends = trained & ~torch.nn.functional.pad(trained[:, 1:], (0, 1), value=False)
    ends = labels[run_ends].tolist()
    answered = sum(t > 0 for t, _ in supervised_tokens(first))
    if len(ends) < answered or any(e != fmt.end_of_turn_id for e in ends):
        raise TunebookError(
            f"In a training batch the loss does not end each answer with the {fmt.family} end-of-turn token "
            f"{fmt.end_of_turn!r} (id {fmt.end_of_turn_id}; last trained tokens: {ends}), so the model would never learn to "
            "stop. This happens when the pad token is the end-of-turn token and the collator masks pad ids: set a distinct pad token."
        )
    first_end = int(torch.nonzero(run_ends[0]).flatten()[0])
    return [int(t) for t, on in zip(labels[0][: first_end + 1], trained[0][: first_end + 1]) if on]


def supervised_tokens(dataset) -> list[tuple[int, int]]:
    """(tokens that carry loss, tokens) per row of a tokenized training set, from whichever mask it holds."""
    columns = dataset.column_names
    if "labels" in columns:
        return [(sum(label != -100 for label in row), len(row)) for row in dataset["labels"]]
    for mask in ("completion_mask", "assistant_masks"):
        if mask in columns:
            return [(sum(row), len(row)) for row in dataset[mask]]
    raise TunebookError(f"Cannot check the loss masking: the tokenized training set has none of labels, completion_mask, assistant_masks (columns: {columns}).")


def save_adapter(trained, model, tokenizer, fmt: ChatFormat, adapter_dir: Path) -> None:
    """The LoRA adapter (`trained`: the PEFT model, or the folder a sharded training gathered it into) with the
    tokenizer and a generation config that stops at the family's end of turn, which the merged model takes over."""
    adapter_tmp = fresh_tmp_dir(adapter_dir)
    if isinstance(trained, Path):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(trained / name, adapter_tmp / name)
    else:
        trained.save_pretrained(str(adapter_tmp))
    tokenizer.save_pretrained(str(adapter_tmp))
    write_stop_tokens(adapter_tmp, fmt, tokenizer.pad_token_id, getattr(model, "generation_config", None))
    replace_dir(adapter_tmp, adapter_dir)


def write_stop_tokens(model_dir: Path, fmt: ChatFormat, pad_token_id: int | None, base=None) -> None:
    """The family's end-of-turn set in the generation_config.json saved with the adapter (and so the merged model), which
    vLLM, Ollama's importer and llama.cpp's converter read: a served copy stops where the fine-tuned model was taught to.
    `base`: the base model's generation config, whose other settings are kept."""
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.eos_token_id = list(fmt.stop_ids)
    config.pad_token_id = pad_token_id
    config.save_pretrained(model_dir)


def loss_curves(log_history: list[dict]):
    """(train_steps, train_loss, eval_steps, eval_loss) from a Trainer log history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, evals


def summary_table(summary: FinetuneOutputs):
    """What 02 recorded, as a two-column table for the notebook (the manifest keeps the same values)."""
    import pandas as pd

    rows = [
        ("backend", summary.backend),
        ("chat format", summary.family),
        ("batching", summary.batching),
        ("training examples", summary.train_examples),
        ("optimizer steps", summary.steps),
        ("resumed from step", summary.resumed_from_step or None),
        ("processes", summary.num_processes if summary.num_processes > 1 else None),
        ("mean training loss", summary.train_loss),
        ("training seconds", summary.train_seconds),
        ("tokens per second (steady state)", summary.tokens_per_second),
        ("peak GPU memory (GB)", summary.peak_gpu_memory_gb),
        ("checkpoints written", summary.checkpoints_written),
    ]
    return pd.DataFrame([(k, str(v)) for k, v in rows if v is not None], columns=["", "value"]).set_index("")


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


if __name__ == "__main__":
    launch.worker_main(main)
