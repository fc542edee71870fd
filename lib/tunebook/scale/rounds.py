"""Self-improvement rounds (ReST, rejection-sampling fine-tuning): the model's own checked answers become its next
training rows, with no new human labels.

    python -m tunebook rounds params/squad_rag_rounds.yaml [--set KEY=VALUE] [--notebooks]

Round 0 is the params' plain run: supervised fine-tuning on its rows. Then each round r of rounds.count:
1. grow: round r-1's fine-tuned model answers the questions (the training split's, or rounds.questions_path's)
   rounds.samples times at rounds.temperature, through the batched generator (tunebook.models.generate: Unsloth's or
   transformers' model on a GPU, the CPU here);
2. improve: a filter keeps the good answers, at most rounds.keep_per_question per question: against the gold answers
   (rounds.min_score), or for unlabelled questions by the teacher's judge score (tunebook.evaluation.judge) and/or the agreement
   among the question's samples;
3. a run of its own trains the base model on round 0's training rows plus the kept answers (rounds.mode add; replace:
   the kept answers alone) and scores it on round 0's eval rows, exported once, so every round is scored on the same
   real rows. Each round starts from the base model, as ReST-EM does, so that no round's mistakes are trained twice.

The rounds live in <output_dir>/<run_name>/round-<r>/, each a run folder (stages, manifest, outputs), with rounds.json
beside them (each round's stages, kept share and metric, and why the loop stopped) and the comparison of `compare`
(the metric round by round, with the kept share). A round's grow step writes round-<r>/grow/: every sample with its
scores (samples.jsonl), the round's training rows (train.jsonl) and grow.json; its samples are written a slice of
questions at a time, so a killed grow goes on where it stopped. Stages run in this process (what a notebook cell
running the rounds does too), or with --notebooks through papermill as `run` and `sweep` run them. Finished stages are
skipped, an interrupted one runs again (02 from its last checkpoint), and the loop stops early, saying why, when the
kept share or the eval metric stops improving (rounds.early_stop).
"""

from __future__ import annotations

import copy
import gc
import json
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tunebook.errors import TunebookError
from tunebook.metrics import SCORERS, SUMMARY_KEYS, loose_normalize
from tunebook.params.load import read_params, validate_params
from tunebook.params.schema import Params
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import Run, save_params
from tunebook.run.rows import read_jsonl, write_jsonl
from tunebook.scale.sweep import bring_stage, prepare_run, record_stage, stage_cell

GROW = "grow"
SLICE = 64  # questions sampled (and their samples written) at a time: a killed grow loses at most one slice


class RoundsError(TunebookError):
    """The rounds cannot go on: nothing kept, a failed stage, a round made with other settings."""


def round_name(number: int) -> str:
    return f"round-{number}"


def gold_score_key(metric: str) -> str:
    """The per-answer score rounds.min_score applies to: exact match (classification: the exact label), ROUGE-L for faq."""
    return "rouge_l" if metric == "faq" else "exact_match"


@dataclass
class Rounds:
    """The rounds of one params file: its params (validated), the raw params each round's own are made from, the folder
    that holds the rounds, and rounds.json's state."""

    params: Params
    raw: dict
    source: str
    folder: Path
    state: dict

    @property
    def metric_key(self) -> str:
        return SUMMARY_KEYS[self.params.evaluate.metric][0]

    def record(self, name: str) -> dict:
        return self.state["runs"].setdefault(name, {"stages": {}})

    def save(self) -> None:
        write_json_atomic(self.folder / "rounds.json", self.state)

    def run(self, number: int) -> Run:
        """Round `number`'s run (its params made from the file's: round_params)."""
        return Run(params=round_params(self, number), dir=self.folder / round_name(number))


def open_rounds(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Rounds:
    """The params file read and checked for rounds, and rounds.json's state (created or read back)."""
    raw = read_params(params_path, overrides)
    params = validate_params(raw, source=str(params_path))
    s = params.rounds
    if not s.count:
        raise RoundsError(
            f"{params_path}: rounds.count is 0, so there is no round to run. Set it (e.g. --set rounds.count=2), or run the file once with `python -m tunebook run`."
        )
    if s.questions_path and not Path(s.questions_path).is_file():
        raise RoundsError(f"rounds.questions_path: {s.questions_path} is not a file (questions in data's format and field names).")
    folder = params.run_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rounds.json"
    state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"runs": {}}
    names = [round_name(r) for r in range(s.count + 1)]
    state.update(params_file=str(Path(params_path).resolve()), overrides=list(overrides), stages=s.stages, order=names, settings=s.model_dump(mode="json"))
    state.pop("stopped", None)  # said again below if it still holds
    rounds = Rounds(params, raw, str(params_path), folder, state)
    for name in names:
        record = rounds.record(name)
        if record.get("status") in ("not run (stopped)", "not trained (early stop)", "nothing kept"):
            record["status"] = "pending"  # decided again in this call
    return rounds


def round_params(rounds: Rounds, number: int) -> Params:
    """Round `number`'s params: the file's, in its own folder (round-<number>), with no rounds of its own. From round 1
    on, its rows are its grow step's train.jsonl and round 0's exported eval rows, in tunebook's own question/passages
    form (passages already retrieved, cut and normalized), the labels and the answer budget round 0 used, and the base
    model not scored again (round 0 scored it on the same rows)."""
    raw = copy.deepcopy(rounds.raw)
    raw.pop("rounds", None)
    raw.update(run_name=round_name(number), output_dir=str(rounds.folder))
    if "03_quantize" not in rounds.params.rounds.stages:  # no quantized copies are made, so none is scored
        raw.setdefault("evaluate", {})["models"] = [m for m in rounds.params.evaluate.models if m != "quantized"]
    if number == 0:
        return validate_params(raw, source=f"{rounds.source} (round 0)")
    first = Run(params=round_params(rounds, 0), dir=rounds.folder / round_name(0))
    built = first.outputs_of("01_build_dataset")
    data = raw.get("data") or {}
    raw["data"] = {
        "format": "qa",
        "train_path": str(rounds.folder / round_name(number) / GROW / "train.jsonl"),
        "eval_path": str(rounds.folder / "eval.jsonl"),
        "id_field": "id",
        "question_field": "question",
        "passages_field": "passages",
        "answers_field": "answers",
        "group_field": "group",
        "labels": built.labels or None,
        "allow_eval_overlap": data.get("allow_eval_overlap", False),
    }
    raw["synthesize"] = {"teacher": (raw.get("synthesize") or {}).get("teacher", {})}  # evaluate.judge's teacher
    evaluate = raw.setdefault("evaluate", {})
    evaluate["models"] = [m for m in first.params.evaluate.models if m != "base"]
    evaluate["max_new_tokens"] = rounds.state.get("max_new_tokens") or first.params.evaluate.max_new_tokens
    return validate_params(raw, source=f"{rounds.source} (round {number})")


def run_rounds(params_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, notebooks: bool = False) -> int:
    """Round 0, then each round: grow, improve, train, score; stops early when asked to (see the module docstring).
    Returns 0; a round that keeps nothing, or a stage that fails, ends with a RoundsError once the comparison of the
    finished rounds is written."""
    rounds = open_rounds(params_path, overrides)
    s = rounds.params.rounds
    print(f"Rounds {rounds.params.run_name}: round 0 and {s.count} self-improvement round(s) in {rounds.folder}", flush=True)
    current = None
    try:
        for number in range(s.count + 1):
            current = rounds.record(round_name(number))
            print(f"\n##### {round_name(number)}", flush=True)
            if number and not grow_round(rounds, number):
                break
            run = rounds.run(number)
            run_stages(rounds, run, notebooks)
            if number == 0:
                export_eval_rows(rounds, run)
            if number and stop_for_metric(rounds, number):
                break
    except BaseException as e:
        if current is not None and current.get("status") in (None, "pending", "running"):
            current["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        rounds.save()
        if isinstance(e, RoundsError):  # the rounds finished so far, compared; the error says why the loop stopped
            mark_not_run(rounds)
            summarize(rounds, say_stop=False)
        raise
    mark_not_run(rounds)
    summarize(rounds)
    return 0


def mark_not_run(rounds: Rounds) -> None:
    """The rounds after a stop, marked so (a later call with the loop going on runs them)."""
    for name in rounds.state["order"]:
        record = rounds.record(name)
        if rounds.state.get("stopped") and record.get("status") in (None, "pending"):
            record["status"] = "not run (stopped)"
    rounds.save()


def grow_round(rounds: Rounds, number: int) -> bool:
    """Round `number`'s grow step (done already with the same settings: read back), recorded in rounds.json; False when
    the kept share stopped improving (early stop, said). Nothing kept is a RoundsError."""
    s, record = rounds.params.rounds, rounds.record(round_name(number))
    grown = grow(rounds, number)
    record.update({k: grown[k] for k in ("questions", "samples", "kept", "kept_questions", "kept_share", "train_rows")})
    rounds.save()
    if not grown["kept"]:
        record["status"] = "nothing kept"
        rounds.state["stopped"] = nothing_kept_message(rounds, number, grown)
        raise RoundsError(rounds.state["stopped"])
    earlier = rounds.record(round_name(number - 1)).get("kept_share")
    if s.early_stop and earlier is not None and grown["kept_share"] <= earlier + s.min_improvement:
        record["status"] = "not trained (early stop)"
        rounds.state["stopped"] = (
            f"Stopped before training {round_name(number)}: its model kept answers for {grown['kept_share']:.1%} of the questions, no more than "
            f"{round_name(number - 1)}'s {earlier:.1%} (rounds.min_improvement {s.min_improvement}). Set rounds.early_stop: false to go on regardless."
        )
        print(rounds.state["stopped"], flush=True)
        return False
    return True


def stop_for_metric(rounds: Rounds, number: int) -> bool:
    """Whether the eval metric stopped improving after round `number` (early stop: said and recorded)."""
    s, key = rounds.params.rounds, rounds.metric_key
    now, before = rounds.record(round_name(number))["metric"], rounds.record(round_name(number - 1)).get("metric")
    if not s.early_stop or number == s.count or before is None or now > before + s.min_improvement:
        return False
    rounds.state["stopped"] = (
        f"Stopped after {round_name(number)}: its fine-tuned model's {key} on the eval rows, {now:.4f}, is no better than {round_name(number - 1)}'s "
        f"{before:.4f} (rounds.min_improvement {s.min_improvement}). Set rounds.early_stop: false to go on regardless."
    )
    print(rounds.state["stopped"], flush=True)
    return True


def nothing_kept_message(rounds: Rounds, number: int, grown: dict) -> str:
    s = rounds.params.rounds
    previous = round_name(number - 1)
    if s.questions_path:
        rule = " and ".join(
            x
            for x in (
                f"a judge score of at least {s.judge_min_score}" if s.judge_min_score is not None else "",
                f"an agreement of at least {s.min_agreement:.0%} among a question's samples" if s.min_agreement is not None else "",
            )
            if x
        )
        fix = "lower rounds.judge_min_score or rounds.min_agreement"
    else:
        rule = f"{gold_score_key(rounds.params.evaluate.metric)} {s.min_score} or more against the gold answers (rounds.min_score; the best was {grown['best_score']:.2f})"
        fix = "lower rounds.min_score"
    return (
        f"{round_name(number)} kept no answer: none of the {grown['samples']} answers {previous}'s model gave to {grown['questions']} questions "
        f"({s.samples} each, temperature {s.temperature}) has {rule}, so there is nothing to train {round_name(number)} on. "
        f"The answers are in {grown['samples_jsonl']}. To go on: {fix}, raise rounds.samples or rounds.temperature, or train round 0 more."
    )


def run_stages(rounds: Rounds, run: Run, notebooks: bool) -> None:
    """Bring a round's stages to complete (sweep.prepare_run's checks; finished stages skipped): in this process, or
    each stage's notebook through papermill. A failed stage, or a round made with other params, is a RoundsError."""
    from tunebook.checks.preflight import check_or_stop

    name, stages = run.dir.name, rounds.params.rounds.stages
    record = rounds.record(name)
    todo = prepare_run(run, stages, record, rerun=False)
    save_params(run.params)  # also for a finished round: its folder says what it is (compare, 05's picker)
    rounds.save()
    if record.get("status") == "outdated":
        raise RoundsError(
            f"{run.dir} finished {record['error'].removeprefix('stages ')}. Nothing was changed: give the rounds another run_name, or move "
            f"{rounds.folder} aside, to run them with the params as they are now."
        )
    if todo and not notebooks:  # each notebook runs its own preflight
        check_or_stop(run.params, todo, f"{rounds.source} ({name})")
    members = {r: Run(params=run.params, dir=rounds.folder / r) for r in rounds.state["order"] if (rounds.folder / r / "manifest.json").exists()}
    for stage in todo:
        result = bring_stage(run, stage, members) if notebooks else run_here(run, stage, members)
        record_stage(record, stage, result)
        if result["how"] == "failed":
            rounds.save()
            raise RoundsError(f"{name}: {result['error']}" + (f" (executed notebook: {result['notebook']})" if result.get("notebook") else ""))
        if stage == "04_evaluate":  # recorded at once, so that 05 of this round shows it
            record["metric"] = finetuned_metric(run, rounds.metric_key)
        rounds.save()
    record.update(status="finished", metric=finetuned_metric(run, rounds.metric_key))
    rounds.save()


def run_here(run: Run, stage: str, members: dict[str, Run]) -> dict:
    """One stage in this process, as its notebook runs it: {how: ran | failed, seconds, error}. An interruption is
    raised (its stage records it)."""
    started = time.time()
    print(f"=== {run.dir.name} {stage} (in this process)", flush=True)
    others = [str(other.dir) for other in members.values() if other.dir != run.dir]
    try:
        stage_function(stage)(run, others)
    except Exception as e:  # noqa: BLE001  (recorded in rounds.json, then the rounds stop with it)
        if not isinstance(e, TunebookError):
            traceback.print_exc()
        error = f"Stage {stage} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return {"how": "failed", "seconds": round(time.time() - started, 1), "error": error, "notebook": None}
    finally:
        free_memory()
    print(f"=== {run.dir.name} {stage} done in {time.time() - started:.0f}s", flush=True)
    return {"how": "ran", "seconds": round(time.time() - started, 1)}


def stage_function(stage: str):
    """What a stage's notebook calls, as f(run, other run folders)."""
    if stage == "01_build_dataset":
        from tunebook.dataset.build import build_dataset

        return lambda run, others: build_dataset(run)
    if stage == "02_finetune":
        from tunebook.training.train import finetune

        return lambda run, others: finetune(run)
    if stage == "03_quantize":
        from tunebook.quantizing.quantize import quantize

        return lambda run, others: quantize(run)
    if stage == "04_evaluate":
        from tunebook.evaluation.evaluate import evaluate

        return lambda run, others: evaluate(run, others)
    from tunebook.analysis.analysis import analyze

    return lambda run, others: analyze(run)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def export_eval_rows(rounds: Rounds, first: Run) -> None:
    """Round 0's eval rows as the later rounds read them (eval.jsonl: id, question, passages, answers, group), and the
    answer budget it scored with, so every round is scored on the same rows in the same way."""
    from tunebook.dataset.build import load_split
    from tunebook.evaluation.evaluate import answer_budget

    rows = load_split(first, "eval")
    if any(not e["passages"] for e in rows):
        raise RoundsError(
            "Rounds need question/passages rows: round 0's rows are conversations (data.format messages, sharegpt or alpaca), whose prompts the rounds cannot rebuild."
        )
    write_jsonl(rounds.folder / "eval.jsonl", [qa_row(e, e["answers"]) for e in rows])
    if not rounds.params.evaluate.max_new_tokens and "max_new_tokens" not in rounds.state:
        rounds.state["max_new_tokens"] = answer_budget(first)
    rounds.save()


def qa_row(example: dict, answers: list[str], row_id: str | None = None) -> dict:
    return {"id": row_id or example["id"], "question": example["question"], "passages": example["passages"], "answers": answers, "group": example["group"]}


def finetuned_metric(run: Run, key: str) -> float:
    rows = json.loads(Path(run.outputs_of("04_evaluate").metrics_json).read_text(encoding="utf-8"))
    row = next((r for r in rows if r["model"] == "finetuned"), None)
    if row is None:
        raise RoundsError(f"{run.dir}: 04 scored no fine-tuned model, and the rounds compare it: keep finetuned in evaluate.models.")
    return row[key]


# ---------------------------------------------------------------------------------------------------- grow


def grow_settings(rounds: Rounds, number: int, previous: Run) -> dict:
    """What a grow step's samples and kept answers depend on: the rounds' settings, the seed, and the models and rows
    they come from (the previous round's 02, round 0's 01). A grow made with other settings is not reused."""
    s = rounds.params.rounds
    first = rounds.run(0)
    keys = ("samples", "temperature", "max_questions", "questions_path", "min_score", "judge_min_score", "min_agreement", "keep_per_question", "mode")
    made = previous.manifest()["stages"]["02_finetune"]
    return {k: getattr(s, k) for k in keys} | {
        "seed": rounds.params.seed,
        "round": number,
        "model": {"run": previous.dir.name, "key": made.get("key"), "finished": made.get("finished")},
        "rows": first.key_of("01_build_dataset"),
    }


def grow(rounds: Rounds, number: int) -> dict:
    """Round `number`'s grow step: its record (grow.json), made now or read back."""
    name = round_name(number)
    folder = rounds.folder / name / GROW
    previous = rounds.run(number - 1)
    if previous.status("02_finetune") != "complete":
        raise RoundsError(f"{name} samples {previous.dir.name}'s fine-tuned model, and its 02_finetune is {previous.status('02_finetune')}.")
    settings = grow_settings(rounds, number, previous)
    done = folder / "grow.json"
    if done.exists():
        record = json.loads(done.read_text(encoding="utf-8"))
        if record["settings"] == settings:
            print(f"{name}: grow step done already ({record['kept']} answers kept for {record['kept_share']:.1%} of {record['questions']} questions).")
            return record
        changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
        raise RoundsError(
            f"{name}'s grow step ({done}) was made with other settings or from another model ({', '.join(changed)} changed). Nothing was changed: "
            f"give the rounds another run_name, or move {rounds.folder / name} and the rounds after it aside, to grow it again."
        )
    folder.mkdir(parents=True, exist_ok=True)
    partial, marker = folder / "samples.partial.jsonl", folder / "grow.partial.json"
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")) != settings:
        partial.unlink(missing_ok=True)  # samples of a killed grow with other settings: not these
    write_json_atomic(marker, settings)
    first = rounds.run(0)
    questions = ask_questions(rounds, first)
    started = time.time()
    outputs = sample_answers(rounds, previous, questions, partial, number)
    samples, kept = improve(rounds, questions, outputs)
    write_jsonl(folder / "samples.jsonl", samples)
    base = [] if rounds.params.rounds.mode == "replace" else [qa_row(e, [e["completion"][0]["content"]]) for e in training_rows(first)]
    train = base + [qa_row(q, [k["output"]], row_id=f"{q['id']}~{name}-{k['k']}") for q, k in kept]
    write_jsonl(folder / "train.jsonl", train)
    scores = [x["score"] for x in samples if x.get("score") is not None]
    record = {
        "settings": settings,
        "questions": len(questions),
        "samples": len(samples),
        "kept": len(kept),
        "kept_questions": len({q["id"] for q, _ in kept}),
        "kept_share": round(len({q["id"] for q, _ in kept}) / len(questions), 4),
        "best_score": max(scores, default=0.0),
        "dropped": {why: sum(x["dropped_by"] == why for x in samples) for why in dict.fromkeys(x["dropped_by"] for x in samples) if why},
        "train_rows": len(train),
        "seconds": round(time.time() - started, 1),
        "samples_jsonl": str(folder / "samples.jsonl"),
        "train_jsonl": str(folder / "train.jsonl"),
    }
    write_json_atomic(done, record)
    partial.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    print(
        f"{name}: {previous.dir.name}'s model kept {len(kept)} of {len(samples)} answers, for {record['kept_questions']} of {len(questions)} questions "
        f"({record['kept_share']:.1%}); {len(train)} training rows ({rounds.params.rounds.mode})",
        flush=True,
    )
    return record


def training_rows(first: Run) -> list[dict]:
    from tunebook.dataset.build import load_split

    return load_split(first, "train")


def ask_questions(rounds: Rounds, first: Run) -> list[dict]:
    """The questions each round asks, with their prompts as round 0 rendered them: round 0's training rows (their gold
    answers kept), or rounds.questions_path's, read with data's fields and retrieved as round 0's were (no answers);
    at most rounds.max_questions of them, the same seeded pick every round."""
    p, s = rounds.params, rounds.params.rounds
    if s.questions_path:
        questions = unlabelled_questions(rounds, first)
    else:
        questions = training_rows(first)
        if any(not e["passages"] for e in questions):
            raise RoundsError(
                "Rounds need question/passages rows: round 0's rows are conversations (data.format messages, sharegpt or alpaca), whose prompts the rounds cannot rebuild."
            )
    if s.max_questions and s.max_questions < len(questions):
        picked = sorted(random.Random(p.seed).sample(range(len(questions)), s.max_questions))
        questions = [questions[i] for i in picked]
    return questions


def unlabelled_questions(rounds: Rounds, first: Run) -> list[dict]:
    from tunebook.dataset.build import chat_prompt, document_fields, read_rows, retrieve_passages, to_examples

    p = rounds.params
    fields = p.data
    if p.synthesize.documents_path:  # round 0's documents' chunks are the corpus
        fields = document_fields(fields, first.dir / "dataset" / "chunks.jsonl")
    # Questions to ask, not rows to split or score: no group, no gold document needed.
    fields = fields.model_copy(update={"group_field": None, "retrieval": fields.retrieval.model_copy(update={"gold_id_field": None})})
    rows = to_examples(
        read_rows(p.rounds.questions_path, "train"), fields, f"rounds.questions_path {p.rounds.questions_path}", p.data.nfkc, answers_required=False
    )
    if any("context" in e for e in rows):
        raise RoundsError(f"rounds.questions_path {p.rounds.questions_path}: the rounds ask question/passages rows, and these are conversations.")
    if fields.retrieval.corpus_path:
        rows = retrieve_passages(rows, fields)
    labels = first.outputs_of("01_build_dataset").labels
    return [{**e, "id": f"unlabelled-{e['id']}", "prompt": chat_prompt(e, p.prompt, labels)} for e in rows]


def sample_answers(rounds: Rounds, previous: Run, questions: list[dict], partial: Path, number: int) -> dict[str, list[str]]:
    """{question id: its rounds.samples outputs}, sampled from the previous round's fine-tuned model a slice of
    questions at a time (each slice seeded and appended to `partial`, so a killed grow goes on where it stopped)."""
    import torch

    from tunebook.evaluation.evaluate import EvalModel, constrained_labels, load_to_generate
    from tunebook.models.generate import generate
    from tunebook.models.load import pick_backend

    p, s = rounds.params, rounds.params.rounds
    done = {row["id"]: row["outputs"] for row in read_jsonl(partial)} if partial.exists() else {}
    todo = [i for i, q in enumerate(questions) if q["id"] not in done]
    if done:
        print(f"{round_name(number)}: {len(done)} questions sampled already ({partial}); sampling the other {len(todo)}")
    if not todo:
        return done
    backend = "hf" if p.evaluate.backend == "auto" else pick_backend(p.evaluate.backend, "evaluate.backend")
    merged = previous.outputs_of("02_finetune").merged_dir
    model, tokenizer = load_to_generate(previous, EvalModel("finetuned", "finetuned", "transformers", merged), backend=backend)
    labels = constrained_labels(previous, previous.outputs_of("01_build_dataset").labels)
    budget = rounds.state.get("max_new_tokens") or p.evaluate.max_new_tokens
    try:
        for start in range(0, len(todo), SLICE):
            part = [questions[i] for i in todo[start : start + SLICE]]
            torch.manual_seed(p.seed + number * 1_000_003 + todo[start])  # the slice's own seed: the same after a resume
            out = generate(
                model,
                tokenizer,
                [q["prompt"] for q in part for _ in range(s.samples)],
                batch_size=p.evaluate.batch_size,
                max_new_tokens=budget,
                stop_strings=p.evaluate.stop_strings,
                desc=f"{round_name(number)} samples",
                labels=labels,
                temperature=s.temperature,
            )
            rows = [{"id": q["id"], "outputs": out.texts[j * s.samples : (j + 1) * s.samples]} for j, q in enumerate(part)]
            with open(partial, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            done.update({row["id"]: row["outputs"] for row in rows})
    finally:
        del model
        free_memory()
    return done


def improve(rounds: Rounds, questions: list[dict], outputs: dict[str, list[str]]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """Every sample scored and marked kept or dropped (dropped_by: why), and the kept ones as (question, sample), at most
    rounds.keep_per_question distinct answers per question, best first."""
    from tunebook.evaluation.evaluate import final_answer
    from tunebook.models.families import split_reasoning

    p, s = rounds.params, rounds.params.rounds
    samples = []
    for q in questions:
        texts = outputs[q["id"]]
        answers = [final_answer(split_reasoning(t)[1].strip(), p.prompt.final_answer_prefix) for t in texts]
        loose = [loose_normalize(a) for a in answers]
        for k, (text, answer) in enumerate(zip(texts, answers)):
            sample = {"id": q["id"], "question": q["question"], "k": k, "output": split_reasoning(text)[1].strip(), "answer": answer, "dropped_by": None}
            if not answer.strip():
                sample["dropped_by"] = "empty"
            elif s.questions_path:
                sample["agreement"] = loose.count(loose[k]) / len(texts)
            else:
                sample["score"] = SCORERS[p.evaluate.metric](answer, q["answers"])[gold_score_key(p.evaluate.metric)]
            samples.append(sample)
    alive = [x for x in samples if x["dropped_by"] is None]
    if s.questions_path:
        if s.min_agreement is not None:
            for x in alive:
                if x["agreement"] < s.min_agreement:
                    x["dropped_by"] = f"agreement below {s.min_agreement}"
        if s.judge_min_score is not None:
            judge_samples(rounds, questions, [x for x in alive if x["dropped_by"] is None])
    else:
        for x in alive:
            if x["score"] < s.min_score:
                x["dropped_by"] = f"score below {s.min_score}"
    by_id, kept = {q["id"]: q for q in questions}, []
    for q in questions:
        passing = [x for x in samples if x["id"] == q["id"] and x["dropped_by"] is None]
        passing.sort(key=lambda x: -(x.get("score") if x.get("score") is not None else x.get("judge_score") or x.get("agreement") or 0))
        chosen = {}
        for x in passing:
            key = loose_normalize(x["output"])
            if key in chosen or len(chosen) >= s.keep_per_question:
                x["dropped_by"] = "same answer kept already" if key in chosen else f"beyond rounds.keep_per_question {s.keep_per_question}"
                continue
            chosen[key] = x
        kept += [(by_id[q["id"]], x) for x in chosen.values()]
    for x in samples:
        x["kept"] = x["dropped_by"] is None
    return samples, kept


def judge_samples(rounds: Rounds, questions: list[dict], samples: list[dict]) -> None:
    """The teacher's judge score on each sample (judge_score), dropping those below rounds.judge_min_score; a sample it
    gives no score is dropped too (an answer nobody vouched for is not trained on)."""
    from tunebook.evaluation.judge import UNLABELLED_RUBRIC, judge_answers
    from tunebook.teacher.client import Teacher

    s = rounds.params.rounds
    by_id = {q["id"]: q for q in questions}
    teacher = Teacher(rounds.params.synthesize.teacher)
    items = [{"question": by_id[x["id"]]["question"], "answer": x["answer"], "passages": by_id[x["id"]]["passages"]} for x in samples]
    for x, score in zip(samples, judge_answers(teacher, items, UNLABELLED_RUBRIC, desc="rounds judge")):
        x["judge_score"] = score
        if score is None or score < s.judge_min_score:
            x["dropped_by"] = "no judge score" if score is None else f"judge score below {s.judge_min_score}"


# ---------------------------------------------------------------------------------------------------- tables


def rounds_table(folder: str | Path):
    """One row per round of a rounds folder (rounds.json): status, questions asked, answers kept, kept share, training
    rows, the eval metric and each stage's cell (ran / reused / failed)."""
    import pandas as pd

    state = json.loads((Path(folder) / "rounds.json").read_text(encoding="utf-8"))
    rows = []
    for name in state["order"]:
        record = state["runs"].get(name, {})
        row = {"round": name, "status": record.get("status", "pending")}
        row |= {k: record.get(k) for k in ("questions", "kept", "kept_share", "train_rows", "metric")}
        row |= {stage[:2]: stage_cell(record.get("stages", {}).get(stage)) for stage in state["stages"]}
        rows.append(row)
    return pd.DataFrame(rows).set_index("round")


def is_round(run: Run) -> bool:
    """Whether a run is a self-improvement round after round 0 (its rows were grown from the last round's model)."""
    return (run.dir / GROW / "grow.json").is_file()


def in_rounds(run: Run) -> bool:
    """Whether a run is one of the rounds of a rounds folder (round 0 too)."""
    return (run.dir.parent / "rounds.json").is_file()


def grow_table(run: Run):
    """01 of a round: the questions asked, the samples and why each dropped one was dropped, what was kept."""
    import pandas as pd

    record = json.loads((run.dir / GROW / "grow.json").read_text(encoding="utf-8"))
    counts = {"questions asked": record["questions"], "answers sampled": record["samples"]}
    counts |= {f"dropped: {why}": n for why, n in record["dropped"].items()}
    counts |= {"answers kept": record["kept"], "questions with an answer kept": record["kept_questions"], "kept share": record["kept_share"]}
    return pd.Series(counts | {"training rows": record["train_rows"]}, name=run.dir.name).to_frame()


def summarize(rounds: Rounds, say_stop: bool = True) -> None:
    """The rounds table, the comparison of the finished rounds (compare: comparison.md / .csv beside them), and why
    the loop stopped, if it did."""
    from tunebook.analysis.compare import find_runs, write_comparison

    print(f"\nRounds in {rounds.folder}:\n{rounds_table(rounds.folder).to_markdown()}")
    finished = [
        rounds.folder / n for n in rounds.state["order"] if (rounds.folder / n / "manifest.json").exists() and (rounds.folder / n / "params.yaml").exists()
    ]
    scored = [f for f in finished if Run.load(f).status("04_evaluate") == "complete"]
    if scored:
        import matplotlib

        matplotlib.use("Agg")
        write_comparison(find_runs(scored), rounds.folder)
    if say_stop and rounds.state.get("stopped"):
        print(f"\n{rounds.state['stopped']}")
