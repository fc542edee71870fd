"""Training rows in the formats people already have (data.format): OpenAI messages, ShareGPT and Alpaca files become
the same prompt/completion rows as question/passages/answers rows, run through the stages, and a row that does not fit
is named by file and row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tunebook.dataset.build import build_dataset, data_format, read_rows, row_format, to_examples, with_chat
from tunebook.params.load import load_params
from tunebook.params.schema import DataParams, ParamsError, PromptParams
from tunebook.run.folder import open_run
from tunebook.run.rows import DataError

DEFAULT = ROOT / "params" / "default.yaml"
SMOKE = ROOT / "params" / "smoke.yaml"
EXAMPLES = ROOT / "data" / "examples"
FIELDS = DataParams(train_path="x")
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_chat_files(rows: list[dict], folder: Path) -> dict[str, Path]:
    """Rows with prompt/completion messages (01's) written as one file per chat format, their id and article kept:
    the user turn is the rendered prompt, the assistant turn the training answer."""
    files = {"messages": [], "sharegpt": [], "alpaca": []}
    for r in rows:
        turns = r["prompt"] + r["completion"]
        keep = {"id": r["id"], "article": r["group"]}
        files["messages"].append({**keep, "messages": turns})
        files["sharegpt"].append({**keep, "conversations": [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in turns]})
        [user] = r["prompt"]  # the default params have no system prompt
        files["alpaca"].append({**keep, "instruction": user["content"], "input": "", "output": r["completion"][0]["content"]})
    paths = {}
    for fmt, written in files.items():
        paths[fmt] = folder / f"default_{fmt}.jsonl"
        paths[fmt].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written), encoding="utf-8")
    return paths


def built_rows(run_dir: Path, split: str) -> list[dict]:
    """A split as 01 wrote it, reduced to what 02 trains on and 04 prompts with."""
    rows = [json.loads(line) for line in (run_dir / "dataset" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: r[k] for k in ("id", "group", "prompt", "completion", "n_tokens")} for r in rows]


def test_the_default_rows_as_messages_sharegpt_and_alpaca_build_the_same_dataset(tmp_path, capsys):
    """params/default.yaml's rows (every row of its file, rendered as 01 renders them) written in each chat format give
    stage 01 the same train and eval rows, prompt and completion token for token, as the qa file does."""
    p = load_params(DEFAULT)
    assert p.data.format == "auto" and row_format(read_rows(p.data.train_path, "train"), p.data) == "qa"  # the default reads as it always did
    rendered = [with_chat(e, p.prompt) for e in to_examples(read_rows(p.data.train_path, "train"), p.data, "default", p.data.nfkc)]
    files = as_chat_files(rendered, tmp_path)
    build_dataset(open_run(DEFAULT, [f"output_dir={tmp_path / 'qa'}"]))
    expected = {split: built_rows(tmp_path / "qa" / "default", split) for split in ("train", "eval")}
    assert len(expected["train"]) == p.data.max_train_examples and len(expected["eval"]) == p.data.eval_size
    for fmt, path in files.items():
        # alpaca explicitly, the other two detected (auto)
        chosen = [f"data.format={fmt}"] if fmt == "alpaca" else []
        build_dataset(open_run(DEFAULT, [f"output_dir={tmp_path / fmt}", f"data.train_path={path}", *chosen]))
        for split in ("train", "eval"):
            assert built_rows(tmp_path / fmt / "default", split) == expected[split], (fmt, split)
        manifest = json.loads((tmp_path / fmt / "default" / "manifest.json").read_text())
        assert manifest["stages"]["01_build_dataset"]["outputs"].get("gold_missing") is None  # no passages: nothing to find the answer in
    printed = capsys.readouterr().out
    assert f"data.format auto: {files['messages']} holds messages rows" in printed and f"{files['sharegpt']} holds sharegpt rows" in printed


def test_each_format_reads_its_turns(tmp_path):
    rows = {fmt: read_rows(str(EXAMPLES / f"{fmt}.jsonl"), "train") for fmt in ("messages", "sharegpt", "alpaca")}
    fields = DataParams(train_path="x", group_field="topic")
    examples = {fmt: to_examples(r, fields, fmt, nfkc=False) for fmt, r in rows.items()}
    assert {fmt: row_format(r, FIELDS) for fmt, r in rows.items()} == {"messages": "messages", "sharegpt": "sharegpt", "alpaca": "alpaca"}
    chat = {fmt: [with_chat(e, PromptParams()) for e in ex] for fmt, ex in examples.items()}
    assert [e["prompt"] for e in chat["messages"]] == [e["prompt"] for e in chat["sharegpt"]]  # the same conversations
    two_turns = chat["messages"][2]  # c03: a system turn, an exchange of context, then the question
    assert [t["role"] for t in two_turns["prompt"]] == ["system", "user", "assistant", "user"]
    assert two_turns["completion"] == [{"role": "assistant", "content": "The Atlantic Ocean"}]
    assert two_turns["answers"] == ["The Atlantic Ocean"] and two_turns["question"] == (
        "user: Which ocean lies between Africa and Australia?\nassistant: The Indian Ocean\nuser: And which one lies west of Europe?"
    )
    assert chat["messages"][0]["question"] == "Which country has Lisbon as its capital?"  # one user turn: as it is
    assert two_turns["passages"] == [] and two_turns["group"] == "geography" and two_turns["id"] == "c03"
    first, second = chat["alpaca"][:2]
    assert first["prompt"] == [{"role": "user", "content": "Which country has Lisbon as its capital?"}]  # empty input: the instruction alone
    assert second["prompt"] == [{"role": "user", "content": "Answer in a few words.\n\nName the longest river in South America."}]
    assert chat["alpaca"][2]["prompt"][0] == {"role": "system", "content": "You answer in as few words as possible."}
    # prompt.system goes to rows without a system turn of their own, and never replaces one
    with_system = [with_chat(e, PromptParams(system="Be brief.")) for e in examples["sharegpt"][:3]]
    assert with_system[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert with_system[2]["prompt"][0]["content"] == "You answer in as few words as possible."
    assert sum(t["role"] == "system" for t in with_system[2]["prompt"]) == 1


def test_every_file_type_holds_every_format(tmp_path):
    """Alpaca in a CSV (a quoted cell keeps its line break, a blank system cell is no system turn), messages in Parquet,
    ShareGPT in a JSON list: the same examples as from the JSONL files."""
    import pandas as pd

    fields = DataParams(train_path="x", group_field="topic")
    expected = {fmt: to_examples(read_rows(str(EXAMPLES / f"{fmt}.jsonl"), "train"), fields, fmt, nfkc=False) for fmt in ("messages", "sharegpt", "alpaca")}
    rows = {fmt: [json.loads(line) for line in (EXAMPLES / f"{fmt}.jsonl").read_text(encoding="utf-8").splitlines()] for fmt in expected}
    pd.DataFrame(rows["alpaca"]).to_csv(tmp_path / "alpaca.csv", index=False)
    pd.DataFrame(rows["messages"]).to_parquet(tmp_path / "messages.parquet")
    (tmp_path / "sharegpt.json").write_text(json.dumps(rows["sharegpt"]), encoding="utf-8")
    for fmt, name in (("alpaca", "alpaca.csv"), ("messages", "messages.parquet"), ("sharegpt", "sharegpt.json")):
        assert to_examples(read_rows(str(tmp_path / name), "train"), fields, fmt, nfkc=False) == expected[fmt], name
    assert "\nFollow-up: " in expected["alpaca"][2]["question"]


def test_other_shapes_of_the_same_turns():
    """OpenAI content parts, ShareGPT's user/assistant names and a system field beside the turns, NFKC, row numbers as
    ids, and a CSV's blank cells."""
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Ｑ1 "}, {"type": "text", "text": "why?"}]},
            {"role": "assistant", "content": " Ａ "},
        ]
    }
    [e] = to_examples([parts], DataParams(train_path="x", format="messages"), "s", nfkc=True)
    assert e["context"] == [{"role": "user", "content": "Q1 why?"}] and e["answers"] == ["A"] and e["id"] == "1"
    row = {"system": "Terse.", "conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    [e] = to_examples([row], FIELDS, "s", nfkc=False)
    assert e["context"] == [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Q"}]
    [e] = to_examples([{"instruction": "Do it.", "input": "", "output": "Done", "system": ""}], FIELDS, "s", nfkc=False)
    assert e["context"] == [{"role": "user", "content": "Do it."}]


@pytest.mark.parametrize("family", ["smollm2", "llama3_1", "qwen2_5", "qwen3", "gemma3"])
def test_a_conversation_trains_on_its_last_answer_in_every_family(family):
    """A conversation with a system turn and an earlier exchange, through each family's real template: the prompt is the
    whole conversation as generation renders it, the completion the last answer and the end of turn alone."""
    from test_families import tokenizer_of

    from tunebook.models.families import chat_format, training_text

    tokenizer = tokenizer_of(family)
    fmt = chat_format(tokenizer)
    examples = to_examples(read_rows(str(EXAMPLES / "messages.jsonl"), "train"), FIELDS, "messages", nfkc=False)
    row = with_chat(examples[2], PromptParams())  # c03: system, user, assistant, user -> assistant
    prompt, completion = training_text(tokenizer, fmt, row["prompt"], row["completion"])
    assert completion == "The Atlantic Ocean" + fmt.end_of_turn
    assert all(t["content"] in prompt for t in row["prompt"]) and prompt.index("The Indian Ocean") < prompt.index("And which one lies west")


def test_a_qa_file_with_the_configured_fields_stays_qa():
    """auto names qa whenever the first row has data.question_field and data.answers_field, whatever else it holds
    (livedoor's rows are Alpaca-like, mapped with question_field / answers_field)."""
    row = {"question": "Who?", "passages": ["Ada wrote it."], "answers": ["Ada"], "instruction": "x", "output": "y", "messages": []}
    assert row_format([row], FIELDS) == "qa"
    assert (
        row_format([{"title": "t", "label": "l", "instruction": "x", "output": "y"}], DataParams(train_path="x", question_field="title", answers_field="label"))
        == "qa"
    )
    assert row_format([{"something": "else"}], FIELDS) == "qa"  # then qa's own check names the missing fields
    with pytest.raises(DataError, match=r"missing field\(s\) \['question', 'answers', 'passages'\]"):
        to_examples([{"something": "else"}], FIELDS, "s", nfkc=False)


TURN = {"role": "user", "content": "Q"}
ANSWER = {"role": "assistant", "content": "A"}
GOOD = {"messages": [TURN, ANSWER]}


@pytest.mark.parametrize(
    "fmt, bad, message",
    [
        ("messages", {"messages": [TURN]}, r"rows.jsonl row 2: no assistant turn"),
        ("messages", {"messages": [{"role": "system", "content": "S"}, ANSWER]}, r"rows.jsonl row 2: no user turn before the last assistant turn"),
        ("messages", {"messages": [TURN, ANSWER, TURN]}, r"rows.jsonl row 2: messages turn 3 \(user\) comes after the last assistant turn"),
        (
            "messages",
            {"messages": [TURN, {"role": "tool", "content": "x"}, ANSWER]},
            r"rows.jsonl row 2, messages turn 2: unknown role 'tool' in 'role'; messages roles are system, user, assistant",
        ),
        ("messages", {"messages": [TURN, {"role": "assistant", "content": "  "}]}, r"rows.jsonl row 2, messages turn 2 \(assistant\): empty content"),
        (
            "messages",
            {"messages": [TURN, {"role": "assistant", "content": 42}]},
            r"rows.jsonl row 2, messages turn 2 \(assistant\): content must be text .*got int 42",
        ),
        ("messages", {"messages": "Q A"}, r"rows.jsonl row 2: 'messages' must be a non-empty list of turns, got str"),
        ("messages", {"messages": [TURN, "A"]}, r"rows.jsonl row 2, messages turn 2: expected an object with 'role' and 'content', got str"),
        ("messages", {"messages": [TURN, {"role": "assistant"}]}, r"rows.jsonl row 2, messages turn 2: needs 'role' and 'content'"),
        (
            "messages",
            {"messages": [TURN, {"role": "system", "content": "S"}, ANSWER]},
            r"rows.jsonl row 2: messages turn 2 is a system turn after the first turn",
        ),
        ("messages", {"conversations": []}, r"rows.jsonl row 2: no 'messages' field"),
        ("messages", ["Q", "A"], r"rows.jsonl row 2: expected an object .*got list"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
            r"row 2, conversations turn 2: unknown role 'bot' in 'from'; sharegpt roles are system, human, user, gpt, assistant",
        ),
        ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}]}, r"rows.jsonl row 2: no assistant turn"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "A"}]},
            r"row 2, conversations turn 1 \(human\): empty content",
        ),
        ("alpaca", {"instruction": "Do it.", "input": ""}, r"rows.jsonl row 2: missing field\(s\) \['output'\]"),
        ("alpaca", {"instruction": "Do it.", "output": ""}, r"rows.jsonl row 2, field 'output': empty content"),
        ("alpaca", {"instruction": ["Do it."], "output": "Done"}, r"rows.jsonl row 2, field 'instruction': content must be text, got list"),
        ("alpaca", {"instruction": "Do it.", "input": 3, "output": "Done"}, r"rows.jsonl row 2, field 'input': content must be text, got int"),
        ("alpaca", "Do it.", r"rows.jsonl row 2: expected an object .*got str"),
    ],
)
def test_a_row_that_does_not_fit_is_named_by_file_and_row(fmt, bad, message):
    first = {"messages": GOOD, "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}}
    first["alpaca"] = {"instruction": "Q", "output": "A"}
    with pytest.raises(DataError, match=message):
        to_examples([first[fmt], bad], DataParams(train_path="x", format=fmt), "rows.jsonl", nfkc=False)


def test_a_bad_row_stops_the_run_with_one_line_and_no_traceback(tmp_path):
    """Through the CLI: the preflight names the file and the row (a JSONL line that is not an object, its line)."""
    cases = {
        "no_assistant.jsonl": ([GOOD, {"messages": [TURN]}], "no_assistant.jsonl row 2: no assistant turn"),
        "not_object.jsonl": ([GOOD, ["Q", "A"]], "not_object.jsonl line 2: expected a JSON object, got list"),
    }
    for name, (rows, message) in cases.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tunebook",
                "check",
                str(SMOKE),
                "--stages",
                "01",
                "--set",
                f"data.train_path={tmp_path / name}",
                "--set",
                "data.group_field=null",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr, done.stderr


def test_params_a_chat_format_cannot_honour_are_refused(write_params, tmp_path):
    base = "data:\n  format: messages\n  train_path: rows.jsonl\n"
    for extra, named in [
        ("  raft:\n    enabled: true\n    cot: false\n", "data.format messages: data.raft builds prompts from each row's passages"),
        ("  retrieval:\n    corpus_path: docs.jsonl\n", "data.format messages: data.retrieval puts retrieved passages"),
        ("prompt:\n  template: 'Q: {question}'\n", "data.format messages: prompt.template shape the user message"),
    ]:
        with pytest.raises(ParamsError, match=named):
            load_params(write_params(base + extra))
    documents = "data:\n  format: sharegpt\nsynthesize:\n  documents_path: docs\n"
    with pytest.raises(ParamsError, match="data.format sharegpt: synthesize.documents_path has a teacher write question/answer rows"):
        load_params(write_params(documents))
    assert load_params(write_params(base + "prompt:\n  system: Be brief.\n")).prompt.system == "Be brief."  # prompt.system still applies
    # auto finds the format in 01, which refuses the same, and an eval file prompted another way
    p = load_params(write_params("data:\n  train_path: rows.jsonl\n  retrieval:\n    corpus_path: docs.jsonl\n"))
    with pytest.raises(DataError, match="rows.jsonl: data.format messages: data.retrieval puts"):
        data_format(p, [GOOD], [])
    p = load_params(write_params("data:\n  train_path: rows.jsonl\n  eval_path: eval.jsonl\n"))
    qa_row = {"question": "Q", "passages": ["p"], "answers": ["A"]}
    with pytest.raises(DataError, match=r"eval.jsonl\) holds qa rows, but data.train_path's .*rows.jsonl\) are messages rows"):
        data_format(p, [GOOD], [qa_row])
    assert (
        data_format(p, [GOOD], [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]) == "messages"
    )  # chat formats prompt alike


def test_the_preflight_compares_chat_eval_rows_with_training_rows(tmp_path):
    from tunebook.checks.preflight import no_overlap

    (tmp_path / "eval.jsonl").write_text((EXAMPLES / "sharegpt.jsonl").read_text(encoding="utf-8").split("\n", 1)[0] + "\n", encoding="utf-8")
    p = load_params(SMOKE, [f"data.train_path={EXAMPLES / 'messages.jsonl'}", f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.group_field=topic"])
    with pytest.raises(Exception, match=r"1 of 1 eval rows repeat a training row \(by id and question; e.g. eval id 'c01'"):
        no_overlap(p)


def example_overrides(fmt: str, out: Path, explicit: bool = True) -> list[str]:
    """params/smoke.yaml on an example file (data/examples), its topics as the split groups."""
    chosen = [f"data.format={fmt}"] if explicit else []
    return [f"output_dir={out}", f"data.train_path={EXAMPLES / f'{fmt}.jsonl'}", "data.group_field=topic", *chosen]


def test_a_messages_file_runs_every_notebook(tmp_path, tiny_smollm2):
    """01 -> 05 through the CLI and the notebooks (papermill) on the smoke params and the messages example: 04 scores the
    base, fine-tuned and int8 models against each eval row's last assistant turn, and 05 marks no retrieval miss. The
    model is a tiny one of SmolLM2's shape and tokenizer: the rows' path through the stages is under test, not answers."""
    overrides = [*example_overrides("messages", tmp_path), "quantize.methods=[int8_weight_only]", f"model.name={tiny_smollm2}"]
    sets = [a for o in overrides for a in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "tunebook", "run", str(SMOKE), *sets], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["model"] for m in metrics] == ["base", "finetuned", "int8_weight_only"]
    assert all({"exact_match", "f1", "partial_match"} <= m.keys() for m in metrics)
    eval_rows = [json.loads(line) for line in (run_dir / "dataset" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(eval_rows) == 8 and {r["group"] for r in eval_rows} < {"geography", "kitchen", "numbers", "words", "sky", "animals"}
    predictions = [json.loads(line) for line in (run_dir / "predictions" / "finetuned.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = {r["id"]: [r["completion"][0]["content"]] for r in eval_rows}
    assert {p["id"]: p["gold_answers"] for p in predictions} == gold
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["gold_missing"]["rows"] == 0 and 'class="miss"' not in (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_sharegpt_and_alpaca_files_build_their_dataset(fmt, tmp_path, capsys):
    """Stage 01 on the smoke params, ShareGPT detected (auto), Alpaca named. 02 -> 05 read only the prompt / completion
    rows (and answers), which the messages run above takes through every stage, and which the test of the default rows
    shows are the same whatever the format (a full 01 -> 04 run of each takes about two minutes here)."""
    run = open_run(SMOKE, example_overrides(fmt, tmp_path, explicit=fmt == "alpaca"))
    built = build_dataset(run)
    assert len(built.train) == 16 and len(built.eval) == 8
    assert all(e["passages"] == [] and e["completion"] == [{"role": "assistant", "content": e["answers"][0]}] for e in built.train + built.eval)
    assert all(e["prompt"][-1]["role"] == "user" and "gold_in_passages" not in e for e in built.train + built.eval)
    assert run.status("01_build_dataset") == "complete" and built.summary.gold_missing is None
    if fmt == "sharegpt":
        assert f"data.format auto: {EXAMPLES / 'sharegpt.jsonl'} holds sharegpt rows" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_the_example_params_take_rows_with_nothing_but_their_turns(fmt, tmp_path):
    """params/example_<fmt>.yaml as a user copies it: pointed at a file whose rows hold only the format's own keys (no
    id, no topic), 01 builds the dataset, the rows numbered and split by row."""
    own = {"messages": {"messages"}, "sharegpt": {"conversations", "system"}, "alpaca": {"instruction", "input", "output", "system"}}[fmt]
    rows = [json.loads(line) for line in (EXAMPLES / f"{fmt}.jsonl").read_text(encoding="utf-8").splitlines()]
    bare = tmp_path / "my_rows.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k in own}) + "\n" for r in rows), encoding="utf-8")
    run = open_run(ROOT / "params" / f"example_{fmt}.yaml", [f"output_dir={tmp_path}", f"data.train_path={bare}"])
    built = build_dataset(run)
    assert len(built.train) == 16 and len(built.eval) == 8
    assert sorted(int(e["id"]) for e in built.train + built.eval) == list(range(1, 25))
    assert all(e["group"] == e["id"] for e in built.train + built.eval)
