"""Baseline rows from an OpenAI-compatible chat endpoint (the GPT-3.5 / GPT-4 rows of a paper's table).

Each conversation is one chat request, `concurrency` of them in flight at once. 429s, 5xx, timeouts and lost
connections are retried with exponential backoff and jitter; every row keeps a record of its attempts, and a row
that still fails becomes "" with its error recorded, so no row is ever dropped and the scores stay comparable.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable

import openai
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from tunebook.errors import TunebookError
from tunebook.models.generate import Generation, cut_at_stop
from tunebook.params.schema import ApiBaselineParams, TeacherParams

WAIT_INITIAL = 0.5  # seconds before the first retry; doubles each time, with jitter (tests make these small)
WAIT_MAX = 20.0
RETRY_AFTER_MAX = 60.0  # a server's Retry-After is honoured up to this, so one header cannot stall a run
PROGRESS_EVERY = 25


def _retryable(error: BaseException) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)  # includes APITimeoutError


def _wait(state) -> float:
    # Backoff with jitter, but never shorter than the server's Retry-After.
    wait = wait_random_exponential(multiplier=WAIT_INITIAL, max=WAIT_MAX)(state)
    error = state.outcome.exception()
    if isinstance(error, openai.APIStatusError):
        try:
            wait = max(wait, min(float(error.response.headers.get("retry-after", 0)), RETRY_AFTER_MAX))
        except ValueError:
            pass  # an HTTP date instead of seconds: the backoff is enough
    return wait


def _outcome(error: BaseException) -> int | str:
    if isinstance(error, openai.APIStatusError):
        return error.status_code
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    return "connection error" if isinstance(error, openai.APIConnectionError) else type(error).__name__


def _describe(error: BaseException, secret: str | None) -> str:
    status = f" HTTP {error.status_code}" if isinstance(error, openai.APIStatusError) else ""
    message = str(error).replace(secret, "***") if secret else str(error)  # error bodies may echo the key back
    return f"{type(error).__name__}{status}: {message[:300]}"


def generate_api(
    baseline: ApiBaselineParams | TeacherParams,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    stop_strings: list[str] = (),
    desc: str = "api",
    options: dict | None = None,
    on_answer: Callable[[int, str, dict], None] | None = None,
) -> Generation:
    """Answers `conversations` through `baseline`'s endpoint, in the caller's order, with a record per row.

    `options` are extra request fields (temperature, response_format); `on_answer(index, text, record)` is called
    as each row finishes, so a caller can keep answers before the whole batch is done."""
    key = None
    if baseline.api_key_env:
        key = os.environ.get(baseline.api_key_env)
        if not key:  # check before any request, so a missing key is one clear message, not N failed rows
            raise TunebookError(
                f"'{baseline.label}' reads its key from the environment variable {baseline.api_key_env}, "
                f"which is not set. Set it before running: `export {baseline.api_key_env}=...` in a shell, or in Colab "
                f"add a secret named {baseline.api_key_env} and run `os.environ['{baseline.api_key_env}'] = "
                f"google.colab.userdata.get('{baseline.api_key_env}')`. Or set api_key_env to empty for a local server."
            )
    # Our own retries (not the client's) so that every attempt is counted and recorded.
    client = openai.OpenAI(base_url=baseline.base_url, api_key=key or "none", timeout=baseline.timeout_seconds, max_retries=0)
    options = {"model": baseline.model, "temperature": 0, "max_tokens": max_new_tokens, **(options or {})}
    if any(stop_strings):
        options["stop"] = [s for s in stop_strings if s][:4]  # OpenAI accepts at most 4; the rest are cut below

    def answer(messages: list[dict]) -> tuple[str, dict]:
        outcomes, start = [], time.perf_counter()
        record = {"status": "ok", "attempts": 0, "error": None, "seconds": 0.0, "http_statuses": outcomes}

        def attempt() -> str:
            try:
                response = client.chat.completions.create(messages=messages, **options)
                text = response.choices[0].message.content or ""
                if response.usage:
                    record["usage"] = {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens}
            except Exception as error:
                outcomes.append(_outcome(error))
                raise
            outcomes.append(200)
            return text

        retrying = Retrying(retry=retry_if_exception(_retryable), stop=stop_after_attempt(baseline.max_retries + 1), wait=_wait, reraise=True)
        try:
            text = cut_at_stop(retrying(attempt), stop_strings).strip()
        except Exception as error:  # a failed row stays in the table as "" with its error; the run goes on
            text, record["status"], record["error"] = "", "failed", _describe(error, key)
        record.update(attempts=len(outcomes), seconds=round(time.perf_counter() - start, 3))
        return text, record

    start = time.perf_counter()
    texts, records = [""] * len(conversations), [None] * len(conversations)
    with ThreadPoolExecutor(max_workers=baseline.concurrency) as pool:
        futures = {pool.submit(answer, c): i for i, c in enumerate(conversations)}
        for done, future in enumerate(as_completed(futures), 1):
            texts[futures[future]], records[futures[future]] = future.result()
            if on_answer:
                on_answer(futures[future], texts[futures[future]], records[futures[future]])
            if done % PROGRESS_EVERY == 0 and done < len(conversations):
                print(f"{desc} {baseline.label}: {done}/{len(conversations)} rows", flush=True)
    failed = [r for r in records if r["status"] == "failed"]
    last = [r["http_statuses"][-1] for r in failed]
    causes = Counter(f"HTTP {o}" if isinstance(o, int) else o for o in last)
    detail = f" ({', '.join(f'{c} x{n}' for c, n in causes.most_common())})" if failed else ""
    retries = sum(r["attempts"] - 1 for r in records)
    print(f"{baseline.label}: {len(records) - len(failed)}/{len(records)} answered, {len(failed)} failed{detail}, {retries} retries", flush=True)
    return Generation(texts=texts, seconds=time.perf_counter() - start, requests=records)
