"""Stage 04: generate answers for the eval split with every model and score them.

Models: base (the params' model), finetuned (the merged model of 02), each quantized variant of 03 and each
API baseline (an OpenAI-compatible endpoint). Each is loaded, run through the batched generator (GGUF files
through llama.cpp, baselines through the API client), timed, measured for peak memory and freed before the
next; with evaluate.num_processes > 1 a transformers model generates in that many processes through `accelerate
launch` (one per GPU; `python -m tunebook.evaluation.evaluate` is one of them), each taking every N-th batch. Writes
predictions/<model>.jsonl, metrics.json (a list of rows with bits and size on disk) and metrics.csv (and the table to 02's tracker run, tunebook.run.tracking). The base and API rows do not depend on training: a sweep passes its other runs as `reuse_from`, and
a row one of them scored with the same data, prompt, model and evaluate params is copied, not generated again.
"""

from __future__ import annotations

import csv
import gc
import json
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from tunebook.colab.runtime import prepare_stage
from tunebook.dataset.build import load_split
from tunebook.errors import TunebookError
from tunebook.metrics import SUMMARY_KEYS, score_predictions
from tunebook.models.families import TemplateError, render_prompt, split_reasoning
from tunebook.models.generate import Generation, answer_token_budget, generate, generate_gguf, gguf_runs_on_gpu, load_gguf, merge_shards, peak_memory
from tunebook.models.load import dir_size_mb, has_cuda, load_for_inference, load_tokenizer, local_folder, pick_backend, saved_bits
from tunebook.models.merge import merged_model
from tunebook.params.schema import ApiBaselineParams
from tunebook.quantizing.quantize import copy_on_disk
from tunebook.run import tracking
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import Run, read_manifest
from tunebook.run.keys import first_read_by, params_key
from tunebook.run.launch import accelerate_command, hand_over, refuse_more_processes_than_gpus, run_streaming, take_over, worker_main
from tunebook.run.outputs import EvaluateOutputs
from tunebook.run.rows import read_jsonl, write_jsonl

TIMING_COLUMNS = ["n", "seconds", "examples_per_second", "load_seconds", "peak_memory_mb", "processes", "bits", "size_mb"]


class EvaluationFailed(TunebookError):
    """A model produced no answer at all: it is not scored, and 04 ends with this error once the others are written.
    `failures`: one record per such model (label, reason, its rows' file, n and timings); `table`: the rows written."""

    def __init__(self, message: str, failures: list[dict], table: list[dict]):
        super().__init__(message)
        self.failures, self.table = failures, table


def no_answers(predictions: list[str], outputs: list[str], requests: list[dict] | None) -> str | None:
    """Why a model produced no answer at all (every prediction empty), or None when it answered at least one row."""
    if not predictions or any(p.strip() for p in predictions):
        return None
    n = len(predictions)
    failed = [r for r in requests or [] if r["status"] != "ok"]
    if failed:
        first = failed[0]["error"]
        if len(failed) == n:
            return f"all {n} requests failed after their retries; the first error: {first}"
        return f"{len(failed)} of {n} requests failed (the first error: {first}) and the other {n - len(failed)} replies were empty"
    if requests:
        return f"all {n} replies were empty"
    if any(o.strip() for o in outputs):
        return f"all {n} outputs are empty once the <think> block and the part before prompt.final_answer_prefix are taken out"
    return f"all {n} outputs are empty"


def failure_message(failures: list[dict], scored: list[str]) -> str:
    """The error 04 ends with: each model that produced nothing, why, where its rows are; what was written for the others."""
    lines = []
    for f in failures:
        if f["format"] == "api":
            what, hint = f"API baseline at {f['path']}", "Is the endpoint up, and are its base_url, model and api_key_env in evaluate.api_baselines right?"
        else:
            what, hint = f"{f['format']} model {f['path']}", "Check model.chat_template, evaluate.stop_strings and evaluate.max_new_tokens."
        lines.append(
            f"{f['label']} ({what}) produced no answers: {f['reason'].rstrip('.')}. {hint} "
            f"It was not scored and has no row in metrics.json; its rows are in {f['file']}."
        )
    lines.append(
        f"The other models were scored and written (metrics.json, predictions/): {', '.join(scored)}."
        if scored
        else "No model was scored: metrics.json and metrics.csv were left as they were."
    )
    return "\n".join(lines)


def final_answer(output: str, prefix: str | None) -> str:
    """The scored part of an output: the rest of the line after the first `prefix` (reasoning outputs; a model
    may ramble on after its answer), else the whole output."""
    if prefix and prefix in output:
        rest = output.split(prefix, 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else ""
    return output


@dataclass(frozen=True)
class EvalModel:
    """One model 04 scores. role: base (the params' model), finetuned (02's merged model), quantized (a copy from 03)
    or api (a baseline endpoint); kind: how it loads and generates (transformers, adapter: the base model with the
    adapter on it through transformers, gguf through llama.cpp, api)."""

    label: str
    role: str
    kind: str
    path: str  # a folder, a GGUF file, a hub id or an endpoint URL
    bits: int | None = None
    size_mb: float | None = None
    baseline: ApiBaselineParams | None = None

    @property
    def untrained(self) -> bool:
        """Its rows do not depend on training: a sweep's runs share them (evaluate.untrained_key)."""
        return self.role in ("base", "api")

    @property
    def full_precision(self) -> bool:
        """Loaded as trained: evaluate.backend and evaluate.load_in_4bit apply (a quantized copy loads as saved)."""
        return self.role in ("base", "finetuned")


def models_to_evaluate(run: Run) -> list[EvalModel]:
    """The models to score, in table order."""
    wanted = run.params.evaluate.models
    models = []
    if "base" in wanted:
        name = run.params.model.name
        local = local_folder(name)
        models.append(EvalModel("base", "base", "transformers", name, saved_bits(local) if local else None, dir_size_mb(local) if local else None))
    if "finetuned" in wanted:
        merged = merged_model(run, build=False)
        if merged:
            models.append(EvalModel("finetuned", "finetuned", "transformers", str(merged), saved_bits(merged), dir_size_mb(merged)))
        else:  # a fresh Colab runtime: the merged model was on 02's runtime's disk; the base model is here anyway
            adapter = run.outputs_of("02_finetune").adapter_dir
            print(f"finetuned: scored as the base model with the adapter ({adapter}); the merged model is not on this machine's disk.")
            models.append(EvalModel("finetuned", "finetuned", "adapter", adapter, training_bits(run.params), None))
    if "quantized" in wanted:
        for v in run.outputs_of("03_quantize").variants:
            if v.status == "ok":
                models.append(EvalModel(v.name, "quantized", v.format, copy_on_disk(run, v), v.bits, v.size_mb))
            else:
                print(f"{v.name}: not evaluated, quantization {v.status} ({v.reason}).")
    models += [EvalModel(b.label, "api", "api", b.base_url, baseline=b) for b in run.params.evaluate.api_baselines]
    return models


def training_bits(p) -> int:
    """Bits per weight of the fine-tuned model as trained (the merged model is saved in the training dtype)."""
    import torch

    from tunebook.models.load import model_type, pick_dtype

    return torch.finfo(pick_dtype(p.model.dtype, model_type(p.model.name))).bits


def answer_budget(run: Run) -> int:
    """evaluate.max_new_tokens, or when empty the budget derived from the training answers' lengths."""
    p = run.params
    if p.evaluate.max_new_tokens:
        return p.evaluate.max_new_tokens
    answers = [turn["content"] for e in load_split(run, "train") for turn in e["completion"]]
    budget = answer_token_budget(load_tokenizer(p.model.name, p.model.chat_template, p.model.enable_thinking), answers)
    print(f"max_new_tokens: {budget} (the longest training answer + 25%; set evaluate.max_new_tokens to fix it)")
    return budget


def untrained_key(params) -> str:
    """The key of the rows that do not depend on training (base model, API baselines): every value outside the sections
    of 02 and 03 (the model section counts whole: 04 loads the base model with its dtype), and not the list of models."""
    return params_key(params, lambda key: first_read_by(key.split(".")[0]) not in ("02_finetune", "03_quantize") and key != "evaluate.models")


def reusable_rows(run: Run, reuse_from: list[str]) -> dict[str, dict]:
    """{label: {run, row, file}} of base / API rows that other finished runs scored under this run's untrained key."""
    key, found = untrained_key(run.params), {}
    for folder in map(Path, reuse_from):
        entry = read_manifest(folder)["stages"].get("04_evaluate", {})
        if entry.get("status") != "complete":
            continue
        evaluated = EvaluateOutputs.from_json(entry["outputs"], f"Stage 04_evaluate of {folder}")
        if evaluated.untrained_key != key:
            continue
        for row in json.loads(Path(evaluated.metrics_json).read_text(encoding="utf-8")):
            file = evaluated.predictions.get(row["model"])
            if row["model"] in evaluated.untrained_labels and row["model"] not in found and file and Path(file).exists():
                found[row["model"]] = {"run": folder.name, "row": row, "file": file}
    return found


def evaluate(run: Run, reuse_from: list[str] = ()) -> list[dict]:
    """Every model: its rows reused from another run, or generated, then scored (or, with no answer at all, set aside as
    failed); then metrics.json / metrics.csv, and the stage fails if a model produced nothing."""
    p = run.params
    examples = load_split(run, "eval")
    models = models_to_evaluate(run)
    reusable = reusable_rows(run, reuse_from)
    labels = run.outputs_of("01_build_dataset").labels
    hit_rate = _retrieval_hit_rate(examples)
    max_new_tokens = answer_budget(run)
    # Base and fine-tuned models generate through transformers unless evaluate.backend asks for Unsloth; quantized
    # copies are saved in transformers' quantization formats (or GGUF) and load through transformers (llama.cpp).
    backend = "hf" if p.evaluate.backend == "auto" else pick_backend(p.evaluate.backend, "evaluate.backend")
    if p.evaluate.num_processes > 1 and any(m.kind in ("transformers", "adapter") for m in models):
        refuse_more_processes_than_gpus(p.evaluate.num_processes, "evaluate.num_processes")
    prepare_stage(p, "04_evaluate")
    with run.stage("04_evaluate") as outputs:
        predictions_dir = run.dir / "predictions"
        predictions_dir.mkdir(exist_ok=True)
        table, files, reused, failures = [], {}, {}, []
        for m in models:
            path = predictions_dir / f"{m.label}.jsonl"
            if m.label in reusable:
                shutil.copy2(reusable[m.label]["file"], path)
                table.append(reusable[m.label]["row"])
                files[m.label], reused[m.label] = str(path), reusable[m.label]["run"]
                print(f"{m.label}: reused from run {reused[m.label]} (same data, prompt, model and evaluate params)")
                continue
            generated = generate_with(run, m, examples, labels, backend=backend, max_new_tokens=max_new_tokens)
            failure = set_aside_if_silent(m, examples, generated, predictions_dir / f"{m.label}.failed.jsonl")
            if failure:
                failures.append(failure)
                continue
            table.append(score_and_write(run, m, examples, labels, generated, path, hit_rate))
            files[m.label] = str(path)
        if table or not failures:  # when nothing was scored, the last complete evaluation's tables stay
            write_metrics(run.dir, table)
        if failures:
            raise EvaluationFailed(failure_message(failures, [row["model"] for row in table]), failures, table)
        recorded = EvaluateOutputs(
            metrics_json=str(run.dir / "metrics.json"),
            metrics_csv=str(run.dir / "metrics.csv"),
            predictions=files,
            labels=labels,
            untrained_key=untrained_key(p),
            untrained_labels=[m.label for m in models if m.untrained],
            reused=reused,
        )
        outputs.update(recorded.as_json())
    tracking.log_outputs(run, "04_evaluate")  # to 02's tracker run, when it trained with one
    return table


@dataclass
class Generated:
    """A model's outputs on the eval split, split into reasoning and answer, with its timings."""

    result: Generation
    reasonings: tuple
    answers: list[str]
    load_seconds: float
    peak_memory_mb: float | None
    processes: int = 1  # processes that generated it: evaluate.num_processes for a transformers model, else 1


def generate_with(run: Run, m: EvalModel, examples: list[dict], labels: list[str], *, backend: str, max_new_tokens: int) -> Generated:
    """Load the model, generate the eval split's answers in batches, free it; timed and memory-measured. A transformers
    model with evaluate.num_processes > 1 generates in that many launched processes (generate_launched)."""
    p = run.params
    if m.kind in ("transformers", "adapter") and p.evaluate.num_processes > 1:
        return generate_launched(run, m, labels, n=len(examples), backend=backend, max_new_tokens=max_new_tokens)
    conversations, stops = [e["prompt"] for e in examples], p.evaluate.stop_strings
    # llama.cpp from pip runs on the CPU even on a GPU machine: then its memory is the process's RSS.
    with peak_memory(gpu=m.kind != "gguf" or gguf_runs_on_gpu()) as peak:
        started = time.time()
        if m.kind == "api":
            from tunebook.teacher.endpoint import generate_api  # the HTTP client only when a baseline is listed

            model, load_seconds = None, 0.0
            result = generate_api(m.baseline, conversations, max_new_tokens=max_new_tokens, stop_strings=stops, desc=m.label)
        elif m.kind == "gguf":
            # The fine-tuned model's tokenizer (saved with the adapter) renders the prompts, so llama.cpp sees the same tokens.
            tokenizer = load_tokenizer(run.outputs_of("02_finetune").adapter_dir, p.model.chat_template, p.model.enable_thinking)
            check_trained_prompt(run, tokenizer, m.label)
            model = load_gguf(m.path, n_ctx=p.model.max_seq_length + max_new_tokens)
            load_seconds = time.time() - started
            constrain = constrained_labels(run, labels)
            result = generate_gguf(model, tokenizer, conversations, max_new_tokens=max_new_tokens, stop_strings=stops, desc=m.label, labels=constrain)
        else:
            model, tokenizer = load_to_generate(run, m, backend=backend)
            load_seconds = time.time() - started
            result = generate_answers(run, model, tokenizer, examples, labels, max_new_tokens=max_new_tokens, desc=m.label)
    del model
    gc.collect()
    return as_generated(run, result, load_seconds, peak["mb"] if m.kind != "api" else None)


def constrained_labels(run: Run, labels: list[str]) -> list[str] | None:
    """The labels decoding is held to (classification with evaluate.constrain_labels), else None: free generation."""
    p = run.params.evaluate
    return labels if p.metric == "classification" and p.constrain_labels else None


def load_to_generate(run: Run, m: EvalModel, *, backend: str, device=None):
    """A transformers-kind model and its tokenizer as 04 generates with them, checked against 02's training prompt.
    `device`: the one device a launched process loads onto (None: load_for_inference's placement)."""
    p = run.params
    model, tokenizer = load_for_inference(
        p.model.name if m.kind == "adapter" else m.path,
        adapter=m.path if m.kind == "adapter" else None,
        dtype=p.model.dtype,
        chat_template=p.model.chat_template,
        max_seq_length=p.model.max_seq_length,
        backend=backend if m.full_precision else "hf",
        load_in_4bit=p.evaluate.load_in_4bit and m.full_precision,
        enable_thinking=p.model.enable_thinking,
        device=device,
    )
    check_trained_prompt(run, tokenizer, m.label)
    return model, tokenizer


def generate_answers(
    run: Run, model, tokenizer, examples: list[dict], labels: list[str], *, max_new_tokens: int, desc: str, shard: tuple[int, int] = (0, 1)
) -> Generation:
    """The eval split's outputs from a loaded transformers model, in batches of evaluate.batch_size (`shard`: one
    launched process's share, generate.shard_rows)."""
    p = run.params
    return generate(
        model,
        tokenizer,
        [e["prompt"] for e in examples],
        batch_size=p.evaluate.batch_size,
        max_new_tokens=max_new_tokens,
        stop_strings=p.evaluate.stop_strings,
        desc=desc,
        labels=constrained_labels(run, labels),
        shard=shard,
    )


def as_generated(run: Run, result: Generation, load_seconds: float, peak_memory_mb: float | None, processes: int = 1) -> Generated:
    """Outputs split into reasoning and scored answer: a reasoning block is never part of the answer (taken out
    before scoring, kept beside it)."""
    reasonings, replies = zip(*map(split_reasoning, result.texts)) if result.texts else ((), ())
    answers = [final_answer(reply.strip(), run.params.prompt.final_answer_prefix) for reply in replies]
    peak = round(peak_memory_mb, 1) if peak_memory_mb is not None else None
    return Generated(result, reasonings, answers, round(load_seconds, 2), peak, processes)


def generate_launched(run: Run, m: EvalModel, labels: list[str], *, n: int, backend: str, max_new_tokens: int) -> Generated:
    """A transformers model's outputs from evaluate.num_processes processes through `accelerate launch` (one per GPU):
    each loads the model on its own device, generates its share of the batches (generate.shard_rows) and writes them
    to a part file in a temporary folder of the run (generate_part); merged here in the eval split's order.

    seconds: from the first process starting to generate (its model loaded) to the last one finishing, the launch's
    generation wall time (start-up and loading left out, as one process's seconds leave out loading); load_seconds and
    peak memory: the largest of the processes'."""
    processes = run.params.evaluate.num_processes
    with tempfile.TemporaryDirectory(prefix=f".04_evaluate-{m.label}-", dir=run.dir) as folder:
        job = Path(folder)
        model = {k: v for k, v in asdict(m).items() if k != "baseline"}
        hand_over(run, job / "job.json", model=model, labels=labels, backend=backend, max_new_tokens=max_new_tokens)
        launched = time.time()
        command = accelerate_command("tunebook.evaluation.evaluate", [str(job)], processes, cuda=has_cuda())
        run_streaming(command, f"{m.label}: generating on {processes} processes")
        launch_seconds = time.time() - launched
        parts = [json.loads((job / f"part-{i}.json").read_text(encoding="utf-8")) for i in range(processes)]
    shards = [Generation(texts=part["texts"], seconds=part["seconds"], rows=part["rows"]) for part in parts]
    seconds = max(part["finished"] for part in parts) - min(part["started"] for part in parts)
    result = Generation(texts=merge_shards(shards, n), seconds=seconds)
    print(
        f"{m.label}: {processes} processes generated {' + '.join(str(len(s.rows)) for s in shards)} rows in {seconds:.1f}s "
        f"({launch_seconds:.1f}s with start-up and loading)"
    )
    load_seconds = max(part["load_seconds"] for part in parts)
    return as_generated(run, result, load_seconds, max(part["peak_memory_mb"] for part in parts), processes)


def generate_part(job: Path) -> None:
    """One process of generate_launched (`python -m tunebook.evaluation.evaluate JOB_FOLDER` under accelerate launch): the model
    on this process's device, its share of the batches generated, written to JOB_FOLDER/part-<process index>.json."""
    from accelerate import PartialState

    state = PartialState(cpu=not has_cuda())  # without a GPU, CPU processes over gloo (launch.accelerate_command)
    try:
        run, request = take_over(job / "job.json")
        m = EvalModel(**request["model"])
        shard = (state.process_index, state.num_processes)
        examples = load_split(run, "eval")
        with peak_memory() as peak:
            started = time.time()
            model, tokenizer = load_to_generate(run, m, backend=request["backend"], device=state.device)
            loaded = time.time()
            desc = f"{m.label} [process {shard[0] + 1}/{shard[1]}]"
            result = generate_answers(run, model, tokenizer, examples, request["labels"], max_new_tokens=request["max_new_tokens"], desc=desc, shard=shard)
            finished = time.time()
        part = dict(rows=result.rows, texts=result.texts, seconds=result.seconds, load_seconds=loaded - started, started=loaded, finished=finished)
        write_json_atomic(job / f"part-{state.process_index}.json", part | {"peak_memory_mb": peak["mb"]})
    finally:
        state.destroy_process_group()


def set_aside_if_silent(m: EvalModel, examples: list[dict], generated: Generated, failed_path: Path) -> dict | None:
    """A model that produced no answer at all is not scored (a row of zeros would read as a model that answers
    everything wrong): its rows go to <label>.failed.jsonl beside an earlier good predictions file, and its record is
    returned. None when it answered at least one row (then an old failed file is removed)."""
    result = generated.result
    reason = no_answers(generated.answers, result.texts, result.requests)
    if not reason:
        failed_path.unlink(missing_ok=True)
        return None
    write_jsonl(
        failed_path,
        (
            {"id": e["id"], "question": e["question"], "gold_answers": e["answers"], "prediction": "", "output": text}
            | ({"request": request} if request else {})
            for e, text, request in zip(examples, result.texts, result.requests or [None] * len(examples))
        ),
    )
    print(f"{m.label}: FAILED, not scored: {reason.rstrip('.')}.")
    return {
        "label": m.label,
        "format": m.kind,
        "path": m.path,
        "reason": reason,
        "file": str(failed_path),
        "n": len(examples),
        "seconds": round(result.seconds, 2),
        "load_seconds": generated.load_seconds,
        "peak_memory_mb": generated.peak_memory_mb,
        "processes": generated.processes,
    }


def score_and_write(run: Run, m: EvalModel, examples: list[dict], labels: list[str], generated: Generated, path: Path, hit_rate: dict) -> dict:
    """Score every answer, write the model's predictions file, and return its metrics row."""
    result, answers = generated.result, generated.answers
    scores, summary = score_predictions(run.params.evaluate.metric, answers, [e["answers"] for e in examples], labels)
    if run.params.evaluate.judge:  # the teacher's rubric score per answer, beside the metric's (cached with its replies)
        from tunebook.evaluation.judge import judge_metric

        judged, judge_summary = judge_metric(run.params.synthesize.teacher, examples, answers, run.params.evaluate.judge_rubric, m.label)
        for s, score in zip(scores, judged):
            s["judge_score"] = score
        summary |= judge_summary
    rows = [
        {
            "id": e["id"],
            "question": e["question"],
            "gold_answers": e["answers"],
            "prediction": answer,
            "output": text,
            **({"reasoning": r} if r is not None else {}),
            **s,
        }
        for e, text, answer, r, s in zip(examples, result.texts, answers, generated.reasonings, scores)
    ]
    if any(r is not None for r in generated.reasonings):
        print(
            f"{m.label}: {sum(r is not None for r in generated.reasonings)} of {len(rows)} outputs held a <think> block, taken out before scoring (predictions: 'reasoning')."
        )
    if result.requests:  # API rows keep their request's outcome, so a failed request shows as one
        for row, request in zip(rows, result.requests):
            row["request"] = request
    failed = {"failed_requests": sum(r["status"] != "ok" for r in result.requests)} if result.requests else {}
    write_jsonl(path, rows)
    print(f"{m.label}: " + "  ".join(f"{k} {v:.3f}" for k, v in summary.items()) + f"  ({result.seconds:.1f}s)")
    if failed.get("failed_requests"):
        print(
            f"{m.label}: {failed['failed_requests']} of {len(rows)} requests failed after their retries and are scored as empty "
            "answers (failed_requests in metrics.json; 05 files them as request_failed, with their errors)."
        )
    return {
        "model": m.label,
        **{k: round(v, 4) for k, v in summary.items()},
        **hit_rate,
        "n": len(rows),
        "seconds": round(result.seconds, 2),
        "examples_per_second": round(result.examples_per_second, 3),
        "load_seconds": generated.load_seconds,
        "peak_memory_mb": generated.peak_memory_mb,
        "processes": generated.processes,
        "bits": m.bits,
        "size_mb": m.size_mb,
        **failed,
    }


def write_metrics(run_dir: Path, table: list[dict]) -> None:
    write_json_atomic(run_dir / "metrics.json", table)
    with open(run_dir / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        columns = list(dict.fromkeys(k for row in table for k in row)) or ["model", *TIMING_COLUMNS]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def check_trained_prompt(run: Run, tokenizer, label: str) -> None:
    """Stop unless this model's tokenizer prompts the first training example with exactly the token ids 02 trained
    on: a changed chat template, enable_thinking or date header would score the model on prompts it never saw."""
    if run.status("02_finetune") != "complete":
        return
    finetuned = run.outputs_of("02_finetune")
    trained = finetuned.trained_prompt
    if not trained:  # a run fine-tuned before 02 recorded it
        return
    ids = tokenizer(render_prompt(tokenizer, trained["prompt"]), add_special_tokens=False)["input_ids"]
    if ids != trained["prompt_ids"]:
        at = next((i for i, (a, b) in enumerate(zip(ids, trained["prompt_ids"])) if a != b), min(len(ids), len(trained["prompt_ids"])))
        raise TemplateError(
            f"{label}: the evaluation prompt differs from the training prompt from token {at} on ({tokenizer.decode(ids[at : at + 12])!r} "
            f"instead of {tokenizer.decode(trained['prompt_ids'][at : at + 12])!r}; {finetuned.family} template). model.chat_template or "
            "model.enable_thinking changed since 02, or the saved tokenizer differs: re-run 02, or set them back."
        )


def _retrieval_hit_rate(examples: list[dict]) -> dict:
    """Share of eval questions whose gold document was retrieved (a column only when retrieval was used)."""
    flags = [e["gold_retrieved"] for e in examples if "gold_retrieved" in e]
    return {"retrieval_hit_rate": round(sum(flags) / len(flags), 4)} if flags else {}


def shorten(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def marked(answer: str, right: bool) -> str:
    return f"{'✓' if right else '✗'} {shorten(answer, 120) if answer.strip() else '(empty)'}"


def side_by_side(examples: list[dict], answers: dict[str, list[str]], right: dict[str, list[bool]]):
    """One row per question: its gold answers and each model's answer marked ✓ (right, as 04 counts it) or ✗."""
    import pandas as pd

    rows = [
        {"question": shorten(e["question"]), "gold": shorten(" | ".join(e["answers"]), 80), **{m: marked(answers[m][i], right[m][i]) for m in answers}}
        for i, e in enumerate(examples)
    ]
    return pd.DataFrame(rows)


def answers_before_after(run: Run, n: int | None = None):
    """02's look at what training changed: the n (train.answers_before_after) shortest eval questions, the quickest to
    read, answered by the base model and by the fine-tuned one, greedy as 04 generates (04 scores every question). One
    load: the base model with 02's adapter on it; the base answers come with the adapter switched off.

    Shown, not written: 02 has saved its work when this runs, so a failure here (say, the training backend's patches
    in this kernel) is said in one line and does not stop the run; 04 loads the same models in a fresh process."""
    p = run.params
    n = p.train.answers_before_after if n is None else n
    if n == 0:
        print("train.answers_before_after is 0: no answers shown here (04 scores every eval question).")
        return None
    try:
        return generated_before_after(run, n)
    except Exception as e:  # noqa: BLE001 (any failure of a display-only step is reported, not raised)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"The answers before and after training could not be shown here ({type(e).__name__}: {reason}). 02's outputs are saved; 04 scores every question."
        )
        return None


def generated_before_after(run: Run, n: int):
    p = run.params
    rows = load_split(run, "eval")
    shortest = sorted(range(len(rows)), key=lambda i: rows[i].get("n_tokens", len(str(rows[i]["prompt"]))))[:n]
    examples = [rows[i] for i in sorted(shortest)]
    labels = run.outputs_of("01_build_dataset").labels
    adapter = run.outputs_of("02_finetune").adapter_dir
    if has_cuda():  # what training left in torch's cache goes back before the base model loads
        import torch

        torch.cuda.empty_cache()
    model, tokenizer = load_to_generate(run, EvalModel("finetuned", "finetuned", "adapter", adapter), backend="hf")
    budget = answer_budget(run)
    answers, right = {}, {}
    for label in ("base", "finetuned"):
        with model.disable_adapter() if label == "base" else nullcontext():
            result = generate_answers(run, model, tokenizer, examples, labels, max_new_tokens=budget, desc=label)
        answers[label] = as_generated(run, result, 0.0, None).answers
        scores, _ = score_predictions(p.evaluate.metric, answers[label], [e["answers"] for e in examples], labels)
        right[label] = [s["right"] for s in scores]
    del model
    gc.collect()
    return side_by_side(examples, answers, right)


def answers_table(run: Run, n: int = 5, models: tuple[str, ...] = ("base", "finetuned")):
    """04's predictions of the first n eval questions side by side: base and fine-tuned by default (any scored model
    label can be named), each answer marked as 04 scored it."""
    files = run.outputs_of("04_evaluate").predictions
    shown = [m for m in models if m in files]
    if not shown:
        print(f"None of {', '.join(models)} was scored in this run (evaluate.models): no answers to show.")
        return None
    predictions = {m: read_jsonl(Path(files[m]))[:n] for m in shown}
    first = predictions[shown[0]]
    examples = [{"question": r["question"], "answers": r["gold_answers"]} for r in first]
    return side_by_side(
        examples,
        {m: [r["prediction"] for r in rows] for m, rows in predictions.items()},
        {m: [bool(r.get("right")) for r in rows] for m, rows in predictions.items()},
    )


def plot_metrics(table: list[dict], metric: str = "squad"):
    import matplotlib.pyplot as plt

    labels = [r["model"] for r in table]
    keys = SUMMARY_KEYS[metric]
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(labels))], [r[key] for r in table], width, label=key)
    ax.set_xticks([x + width for x in range(len(labels))], labels)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_confusions(run: Run):
    """Classification runs: one confusion matrix per model (rows: gold, columns: predicted); else None."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    evaluated = run.outputs_of("04_evaluate")
    labels = evaluated.labels
    if not labels:
        print(f"Not a classification run (evaluate.metric {run.params.evaluate.metric}): no confusion matrix.")
        return None
    files = evaluated.predictions
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 5.5), squeeze=False)
    for ax, (model, path) in zip(axes[0], files.items()):
        rows = read_jsonl(Path(path))
        ConfusionMatrixDisplay.from_predictions(
            [r["gold_answers"][0] for r in rows], [r["prediction"].strip() for r in rows], labels=labels, ax=ax, colorbar=False, xticks_rotation=60
        )
        ax.set_title(model)
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # one process of generate_launched
    worker_main(lambda: generate_part(Path(sys.argv[1])))
