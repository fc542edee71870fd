"""API baselines against real servers (tests/servers.py): llama-cpp-python's OpenAI-compatible server with the
embedded SmolLM2 GGUF on loopback, and a fault-injecting reverse proxy in front of it."""

import json
from pathlib import Path

import pytest

from servers import MODEL_ALIAS, FaultProxy, free_port, serving
from tunebook.analysis.analysis import analyze
from tunebook.dataset.build import build_dataset, load_split, read_jsonl
from tunebook.errors import TunebookError
from tunebook.evaluation.evaluate import evaluate
from tunebook.params.schema import ApiBaselineParams
from tunebook.run.folder import open_run
from tunebook.teacher import endpoint
from tunebook.teacher.endpoint import generate_api

ROOT = Path(__file__).resolve().parents[1]

FRANCE = "What is the capital of France? Answer in one word."
JAPAN = "What is the capital of Japan? Answer in one word."


def chat(*prompts: str) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


@pytest.fixture
def proxy(llama_server):
    with serving(FaultProxy(llama_server, slow_seconds=5)) as p:
        yield p


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(endpoint, "WAIT_INITIAL", 0.01)
    monkeypatch.setattr(endpoint, "WAIT_MAX", 0.05)


def baseline(base_url: str, **kwargs) -> ApiBaselineParams:
    return ApiBaselineParams(**{"label": "smol-api", "base_url": base_url, "model": MODEL_ALIAS, "api_key_env": None, **kwargs})


def test_answers_every_row_in_order(llama_server, capsys):
    prompts = [FRANCE, "What is 2 + 2?", "Name a color.", JAPAN, "Say hello.", "Name a fruit."]
    gen = generate_api(baseline(llama_server, concurrency=3), chat(*prompts), max_new_tokens=12)
    assert len(gen.texts) == len(gen.requests) == len(prompts)
    assert all(t and t == t.strip() for t in gen.texts)
    assert all(r["status"] == "ok" and r["attempts"] == 1 and r["http_statuses"] == [200] and r["error"] is None for r in gen.requests)
    # Order: each capital sits in its own question's slot.
    assert "Paris" in gen.texts[0] and "Paris" not in gen.texts[3]
    assert "Tokyo" in gen.texts[3] and "Tokyo" not in gen.texts[0]
    assert gen.seconds > 0
    assert "smol-api: 6/6 answered, 0 failed, 0 retries" in capsys.readouterr().out


def test_sends_greedy_limits_and_cuts_at_stop_strings(proxy):
    essay = "Write a long essay about the history of Rome."
    stops = ["XQ1", "XQ2", "XQ3", "XQ4", "Paris"]  # the 5th is past OpenAI's limit of 4: cut on our side
    gen = generate_api(baseline(proxy.base_url), chat(essay), max_new_tokens=4)
    assert 0 < len(gen.texts[0].split()) <= 4
    gen = generate_api(baseline(proxy.base_url), chat(FRANCE), max_new_tokens=12, stop_strings=stops)
    assert gen.texts[0] and "Paris" not in gen.texts[0] and gen.requests[0]["status"] == "ok"
    sent = proxy.bodies[-1]
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["stop"]) == (MODEL_ALIAS, 0, 12, stops[:4])
    # The server honours `stop` itself too: asked to list, one line comes back.
    gen = generate_api(baseline(proxy.base_url), chat("List three colors, one per line."), max_new_tokens=24, stop_strings=["\n"])
    assert gen.texts[0] and "\n" not in gen.texts[0]


def test_faults_are_retried_recorded_and_no_row_is_lost(proxy, capsys):
    prompts = [
        FRANCE,
        "FAIL-ALWAYS What is 2 + 2?",
        "RATE-LIMITED Name a color.",
        "SLOW Say hello.",
        "BAD-REQUEST Say goodbye.",
        "FAIL-ALWAYS Name a fruit.",
        JAPAN,
    ]
    params = baseline(proxy.base_url, concurrency=3, max_retries=2, timeout_seconds=3)
    gen = generate_api(params, chat(*prompts), max_new_tokens=8)
    texts, records = gen.texts, gen.requests
    assert len(texts) == len(records) == len(prompts)
    for i in (1, 5):
        assert records[i]["status"] == "failed" and texts[i] == ""
        assert records[i]["attempts"] == 3 and records[i]["http_statuses"] == [500, 500, 500]
        assert records[i]["error"].startswith("InternalServerError HTTP 500")
    assert records[2]["status"] == "ok" and records[2]["http_statuses"] == [429, 200] and texts[2]
    assert records[2]["seconds"] >= 1.0  # the server's Retry-After: 1 outweighs the (tiny) backoff
    assert records[3]["status"] == "ok" and records[3]["http_statuses"] == ["timeout", 200] and texts[3]
    assert records[3]["seconds"] >= 3.0
    assert records[4]["status"] == "failed" and records[4]["attempts"] == 1 and texts[4] == ""
    assert records[4]["error"].startswith("BadRequestError HTTP 400")
    for i in (0, 6):
        assert records[i]["status"] == "ok" and records[i]["attempts"] == 1 and texts[i]
    assert "Paris" in texts[0] and "Tokyo" in texts[6]
    # What the server saw matches the records: no hidden retries inside the openai client.
    assert proxy.hits_for("FAIL-ALWAYS") == [3, 3] and proxy.hits_for("BAD-REQUEST") == [1]
    assert proxy.hits_for("RATE-LIMITED") == [2] and proxy.hits_for("SLOW") == [2]
    assert "smol-api: 4/7 answered, 3 failed (HTTP 500 x2, HTTP 400 x1), 6 retries" in capsys.readouterr().out


def test_unreachable_endpoint_fails_every_row_without_raising(monkeypatch, capsys):
    monkeypatch.setattr(endpoint, "PROGRESS_EVERY", 1)
    params = baseline(f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_seconds=2)
    gen = generate_api(params, chat("a", "b", "c"), max_new_tokens=4)
    assert gen.texts == ["", "", ""]
    for record in gen.requests:
        assert record["status"] == "failed" and record["attempts"] == 2
        assert record["http_statuses"] == ["connection error"] * 2
        assert record["error"].startswith("APIConnectionError")
    out = capsys.readouterr().out.splitlines()
    assert out == ["api smol-api: 1/3 rows", "api smol-api: 2/3 rows", "smol-api: 0/3 answered, 3 failed (connection error x3), 3 retries"]


@pytest.mark.parametrize("value", [None, ""])
def test_missing_key_is_one_clear_error_before_any_request(proxy, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TUNEBOOK_TEST_MISSING_KEY", raising=False)
    else:
        monkeypatch.setenv("TUNEBOOK_TEST_MISSING_KEY", value)
    params = baseline(proxy.base_url, api_key_env="TUNEBOOK_TEST_MISSING_KEY")
    with pytest.raises(TunebookError, match=r"smol-api.*TUNEBOOK_TEST_MISSING_KEY.*export TUNEBOOK_TEST_MISSING_KEY="):
        generate_api(params, chat(FRANCE), max_new_tokens=4)
    assert proxy.bodies == []


def test_api_key_is_sent_but_never_recorded_or_printed(proxy, monkeypatch, capsys):
    monkeypatch.setenv("TUNEBOOK_TEST_KEY", "sk-test-SECRET123")
    params = baseline(proxy.base_url, api_key_env="TUNEBOOK_TEST_KEY", max_retries=1)
    gen = generate_api(params, chat("FAIL-ALWAYS Say hi.", FRANCE), max_new_tokens=8)
    assert set(proxy.auth) == {"Bearer sk-test-SECRET123"}  # the key did go out, and the 500 body echoed it
    assert gen.requests[0]["status"] == "failed" and "***" in gen.requests[0]["error"]
    assert gen.requests[1]["status"] == "ok"
    captured = capsys.readouterr()
    assert "SECRET123" not in json.dumps(gen.requests) + captured.out + captured.err


def test_stage_04_and_05_count_and_show_failed_rows(llama_server, tmp_path):
    """An API baseline row in the real stages: 04 scores it next to the local models and counts the rows whose request
    failed; 05 files them as request_failed with their error. The server fails two eval questions' requests."""
    run = open_run(ROOT / "params/smoke.yaml", [f"output_dir={tmp_path}", "evaluate.models=[]"])
    build_dataset(run)
    questions = [e["question"] for e in load_split(run, "eval")]
    with serving(FaultProxy(llama_server, slow_seconds=0, fail_always=(questions[0], questions[3]))) as proxy:
        row = {"label": "smol-api", "base_url": proxy.base_url, "model": MODEL_ALIAS, "api_key_env": None, "max_retries": 1}
        run = open_run(ROOT / "params/smoke.yaml", [f"output_dir={tmp_path}", "evaluate.models=[]", f"evaluate.api_baselines=[{json.dumps(row)}]"])
        table = evaluate(run)
    assert [(r["model"], r["n"], r["failed_requests"]) for r in table] == [("smol-api", 8, 2)]
    assert "failed_requests" in (run.dir / "metrics.csv").read_text().splitlines()[0]
    rows = read_jsonl(run.dir / "predictions/smol-api.jsonl")
    assert [r["question"] for r in rows] == questions  # every row, in order
    failed = [r for r in rows if r["request"]["status"] == "failed"]
    assert [r["question"] for r in failed] == [questions[0], questions[3]] and all(r["prediction"] == "" for r in failed)
    result = analyze(run)
    assert result["counts"][0]["request_failed"] == 2
    assert (run.dir / "report.html").read_text().count("Request error</b> after 2 attempt(s): InternalServerError HTTP 500") == 2
