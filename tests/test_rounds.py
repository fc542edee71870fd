"""Self-improvement rounds for real, on a few rows and a tiny model of SmolLM2's shape: `python -m tunebook rounds` is
killed while round 1 trains and started again; a round whose filter keeps nothing stops with one message; unlabelled
questions are kept by agreement and the judge (llama-cpp-python's server with the embedded SmolLM2). A random-weight
model answers nonsense, so these tests check the bookkeeping (what is sampled, kept, trained, resumed, compared and
said), not learning."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from servers import MODEL_ALIAS
from tunebook import cli
from tunebook.metrics import loose_normalize
from tunebook.run.folder import Run, adopt_stage
from tunebook.run.rows import read_jsonl, write_jsonl
from tunebook.scale import rounds
from tunebook.training.train import checkpoint_step, last_checkpoint

# min_score 0 keeps every answer that is not empty: a random-weight model's answers, so that round 1 has rows to train on.
ROUNDS = """run_name: {name}
output_dir: {out}
seed: 0
model: {{name: "{model}", max_seq_length: 384}}
data: {{train_path: {data}, group_field: article, eval_size: 4, max_train_examples: 6, passage_max_chars: 120}}
train: {{max_steps: 2, batch_size: 2, save_steps: 1, eval_steps: 2, eval_loss_examples: 2, logging_steps: 1}}
evaluate: {{models: [base, finetuned], batch_size: 12, max_new_tokens: 6}}
rounds: {rounds}
"""
STAGES_RUN = ("01_build_dataset", "02_finetune", "04_evaluate")


def write_rounds(tmp_path, model, name="tiny", **rounds):
    settings = {"count": 2, "samples": 2, "temperature": 1.0, "min_score": 0.0, "stages": "01,02,04"} | rounds
    text = ROUNDS.format(name=name, out=tmp_path / "outputs", model=model, data=ROOT / "data" / "minipedia_rag_qa.jsonl", rounds=json.dumps(settings))
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def state(folder):
    return json.loads((folder / "rounds.json").read_text())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_smollm2):
    """The rounds run once, killed (SIGTERM, as a lost runtime) once round 1 has written its first checkpoint, and run
    again: (folder, first exit code, (second exit code, its output), round 0's manifest and round 1's grow record before
    the restart)."""
    tmp = tmp_path_factory.mktemp("rounds")
    params = write_rounds(tmp, tiny_smollm2)
    folder = tmp / "outputs" / "tiny"
    command = [sys.executable, "-m", "tunebook", "rounds", str(params)]
    log_path = tmp / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while (last := last_checkpoint(folder / "round-1" / "checkpoints")) is None or checkpoint_step(last) < 1:
            assert first.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(60)
    before = {
        "round-0": (folder / "round-0" / "manifest.json").read_text(),
        "grow": (folder / "round-1" / "grow" / "grow.json").read_text(),
        "state": state(folder),
    }
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # started again as the same command, here (a process start less)
        code = cli.main(["rounds", str(params)])
    return folder, first.returncode, (code, printed.getvalue()), before


def test_a_killed_round_resumes_where_it_stopped(killed_and_resumed):
    folder, first_code, (code, printed), before = killed_and_resumed
    assert first_code == 143  # SIGTERM, recorded as an interruption
    assert before["state"]["runs"]["round-1"]["status"] == "interrupted"
    assert code == 0, printed[-3000:]
    # Round 0 and round 1's grow step are not done again; round 1's 02 goes on from its checkpoint.
    assert (folder / "round-0" / "manifest.json").read_text() == before["round-0"]
    assert (folder / "round-1" / "grow" / "grow.json").read_text() == before["grow"]
    assert "round-1: grow step done already" in printed
    trained = Run.load(folder / "round-1").outputs_of("02_finetune")
    assert trained.resumed_from_step == 1 and trained.steps == 2
    assert all(Run.load(folder / "round-1").status(s) == "complete" for s in STAGES_RUN)


def test_rounds_record_kept_share_metric_and_early_stop(killed_and_resumed):
    folder, _, (_, printed), _ = killed_and_resumed
    runs = state(folder)["runs"]
    grown = json.loads((folder / "round-1" / "grow" / "grow.json").read_text())
    samples = read_jsonl(folder / "round-1" / "grow" / "samples.jsonl")
    # Every training question sampled twice; a kept answer is a training row beside round 0's (mode add).
    first_train = read_jsonl(folder / "round-0" / "dataset" / "train.jsonl")
    assert grown["questions"] == len(first_train) and len(samples) == 2 * len(first_train) == grown["samples"]
    kept = [x for x in samples if x["kept"]]
    assert grown["kept"] == len(kept) and {x["dropped_by"] for x in samples} <= {None, "empty", "same answer kept already", "beyond rounds.keep_per_question 1"}
    assert grown["kept_share"] == round(len({x["id"] for x in kept}) / len(first_train), 4) == runs["round-1"]["kept_share"]
    train = read_jsonl(folder / "round-1" / "grow" / "train.jsonl")
    assert len(train) == len(first_train) + len(kept) and {x["output"] for x in kept} <= {r["answers"][0] for r in train}
    # Every round is scored on round 0's eval rows; the base model once, in round 0.
    eval_ids = [e["id"] for e in read_jsonl(folder / "round-0" / "dataset" / "eval.jsonl")]
    assert sorted(e["id"] for e in read_jsonl(folder / "round-1" / "dataset" / "eval.jsonl")) == sorted(eval_ids)
    assert [r["model"] for r in json.loads((folder / "round-1" / "metrics.json").read_text())] == ["finetuned"]
    for name in ("round-0", "round-1"):
        finetuned = next(r for r in json.loads((folder / name / "metrics.json").read_text()) if r["model"] == "finetuned")
        assert runs[name]["metric"] == finetuned["exact_match"]
    # A random-weight model's exact match does not improve: the loop stops after round 1 and says so.
    said = "Stopped after round-1: its fine-tuned model's exact_match on the eval rows"
    assert said in printed and state(folder)["stopped"].startswith(said)
    assert runs["round-2"]["status"] == "not run (stopped)" and not (folder / "round-2").exists()
    # compare: the rounds side by side, with the kept share; the rounds table as 05 shows it.
    comparison = (folder / "comparison.md").read_text()
    assert "kept_share" in comparison and "round-0" in comparison and "round-1" in comparison
    table = rounds.rounds_table(folder)
    assert list(table.index) == ["round-0", "round-1", "round-2"] and table.loc["round-1", "kept"] == len(kept)
    assert rounds.grow_table(Run.load(folder / "round-1")).loc["answers kept"].iloc[0] == len(kept)


def test_a_round_that_keeps_nothing_stops_with_one_message(killed_and_resumed, tiny_smollm2, tmp_path, capsys):
    """Exact match 1.0 against the gold answers: a random-weight model's answers never have it."""
    folder = killed_and_resumed[0]
    params = write_rounds(tmp_path, tiny_smollm2, name="strict", min_score=1.0)
    opened = rounds.open_rounds(params)
    first = opened.run(0)
    for stage in STAGES_RUN:  # round 0 is the same run: copied, as a sweep copies a stage of the same key
        adopt_stage(first, Run.load(folder / "round-0"), stage)
    code = cli.main(["rounds", str(params)])
    printed = capsys.readouterr()
    assert code == 2 and "Traceback" not in printed.err
    error = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: round-1 kept no answer: none of the ")
    assert "has exact_match 1.0 or more against the gold answers" in error[0] and "lower rounds.min_score" in error[0]
    samples = read_jsonl(tmp_path / "outputs" / "strict" / "round-1" / "grow" / "samples.jsonl")
    assert samples and not any(x["kept"] for x in samples)
    assert state(tmp_path / "outputs" / "strict")["runs"]["round-1"]["status"] == "nothing kept"
    assert not (tmp_path / "outputs" / "strict" / "round-1" / "manifest.json").exists()  # nothing was trained


def test_unlabelled_questions_are_kept_by_agreement_and_the_judge(killed_and_resumed, llama_server, tiny_smollm2, tmp_path):
    """Questions without answers, sampled near-greedily (so the samples agree), then judged by the teacher: an answer is
    kept when both pass, and becomes a training row of the round (rounds.mode replace: the round's only rows)."""
    folder = killed_and_resumed[0]
    questions = tmp_path / "questions.jsonl"
    write_jsonl(questions, [{"id": f"u{i}", "question": f"What is item {i}?", "passages": [f"Item {i} is a small red box."]} for i in range(2)])
    teacher = f'{{model: {MODEL_ALIAS}, base_url: "{llama_server}", max_new_tokens: 16, cache_dir: {tmp_path / "cache"}}}'
    params = write_rounds(
        tmp_path, tiny_smollm2, name="unlabelled", questions_path=str(questions), min_agreement=0.5, judge_min_score=1, temperature=0.05, mode="replace"
    )
    params.write_text(params.read_text() + f"synthesize: {{teacher: {teacher}}}\n")
    opened = rounds.open_rounds(params)
    first = opened.run(0)
    for stage in STAGES_RUN:
        adopt_stage(first, Run.load(folder / "round-0"), stage)
    rounds.export_eval_rows(opened, first)
    grown = rounds.grow(opened, 1)
    samples = read_jsonl(tmp_path / "outputs" / "unlabelled" / "round-1" / "grow" / "samples.jsonl")
    assert grown["questions"] == 2 and len(samples) == 4 and all(x["id"].startswith("unlabelled-u") for x in samples)
    for x in samples:
        if x["answer"].strip():
            assert x["agreement"] == sum(loose_normalize(y["answer"]) == loose_normalize(x["answer"]) for y in samples if y["id"] == x["id"]) / 2
        judged = "judge_score" in x
        assert judged == (x["dropped_by"] not in ("empty", "agreement below 0.5") and bool(x["answer"].strip()))
        assert x["kept"] == (judged and x["judge_score"] is not None and x["judge_score"] >= 1 and x["dropped_by"] is None)
    train = read_jsonl(tmp_path / "outputs" / "unlabelled" / "round-1" / "grow" / "train.jsonl")
    added = [r for r in train if r["id"].startswith("unlabelled-")]
    assert added == train  # rounds.mode replace: the kept answers alone, without round 0's rows
    number = {r["id"]: r["id"].split("~")[0].removeprefix("unlabelled-u") for r in added}
    assert len(added) == grown["kept"] and all(r["passages"] == [f"Item {number[r['id']]} is a small red box."] for r in added)


def test_a_rounds_file_is_run_by_the_rounds_command(tmp_path, capsys):
    """Run as one run, a rounds file would write into the folder that holds its rounds; `rounds` without rounds says so."""
    assert cli.main(["run", str(ROOT / "params" / "squad_rag_rounds.yaml"), "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "has rounds.count 2: run it with `python -m tunebook rounds" in err and "round-0/params.yaml" in err
    assert not (tmp_path / "squad_rag_rounds").exists()
    assert cli.main(["rounds", str(ROOT / "params" / "squad_rag.yaml"), "--set", f"output_dir={tmp_path}"]) == 2
    assert "rounds.count is 0, so there is no round to run" in capsys.readouterr().err
