"""The teacher LLM that writes (and judges) training pairs: an OpenAI-compatible endpoint or a local model.

Every reply is kept in a disk cache (diskcache, keyed by model, prompt and options) the moment it arrives, so a rerun
or a crash never pays for a prompt twice and loses nothing. Failed requests are not cached: a rerun asks them again.
The tally counts requests, cache hits, failures, tokens, seconds and cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunebook.params.schema import TeacherParams

LOCAL_SLICE = 64  # local prompts generated (and cached) this many at a time, so a crash loses at most one slice


@dataclass
class Reply:
    text: str | None  # None: the request failed (error says why)
    error: str | None = None
    cached: bool = False


@dataclass
class Tally:
    requests: int = 0
    cache_hits: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "errors"} | {"first_errors": self.errors[:3]}


class Teacher:
    def __init__(self, params: TeacherParams):
        import diskcache

        from tunebook.models.load import cache_dir

        self.params = params
        self.cache = diskcache.Cache(str(Path(params.cache_dir) if params.cache_dir else cache_dir() / "teacher"))
        self.tally = Tally()
        self._local = None

    def key(self, messages: list[dict], json_start: str) -> str:
        p = self.params
        where = {"temperature": p.temperature} if p.base_url else {"local": True}  # not the URL: a moved server keeps its cache
        request = {"model": p.model, "messages": messages, "max_new_tokens": p.max_new_tokens, "json_mode": p.json_mode, "json_start": json_start, **where}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def ask(self, conversations: list[list[dict]], *, json_start: str = "{", desc: str = "teacher") -> list[Reply]:
        """Replies in the callers' order; cached ones are not asked again. `json_start` opens a local model's
        reply when json_mode is on (an endpoint gets response_format json_object instead)."""
        keys = [self.key(c, json_start) for c in conversations]
        replies: list[Reply | None] = [None] * len(conversations)
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is not None:
                replies[i] = Reply(hit["text"], cached=True)
        todo = [i for i, r in enumerate(replies) if r is None]
        self.tally.cache_hits += len(conversations) - len(todo)
        print(f"{desc}: {len(conversations) - len(todo)} of {len(conversations)} prompts answered from the cache", flush=True)
        started = time.perf_counter()
        if todo and self.params.base_url:
            self._ask_endpoint([conversations[i] for i in todo], [keys[i] for i in todo], todo, replies, desc)
        elif todo:
            self._ask_local([conversations[i] for i in todo], [keys[i] for i in todo], todo, replies, json_start, desc)
        self.tally.seconds += time.perf_counter() - started
        p = self.params
        self.tally.cost = (self.tally.prompt_tokens * p.price_per_million_input + self.tally.completion_tokens * p.price_per_million_output) / 1e6
        return replies

    def _keep(self, key: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.cache.set(key, {"text": text})
        self.tally.requests += 1
        self.tally.prompt_tokens += prompt_tokens
        self.tally.completion_tokens += completion_tokens

    def _ask_endpoint(self, conversations, keys, slots, replies, desc) -> None:
        from tunebook.teacher.endpoint import generate_api

        options = {"temperature": self.params.temperature}
        if self.params.json_mode:
            options["response_format"] = {"type": "json_object"}

        def on_answer(i: int, text: str, record: dict) -> None:
            if record["status"] == "ok":
                usage = record.get("usage") or {}
                self._keep(keys[i], text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                replies[slots[i]] = Reply(text)
            else:
                self.tally.requests += 1
                self.tally.failed += 1
                self.tally.errors.append(record["error"])
                replies[slots[i]] = Reply(None, error=record["error"])

        generate_api(self.params, conversations, max_new_tokens=self.params.max_new_tokens, desc=desc, options=options, on_answer=on_answer)

    def _ask_local(self, conversations, keys, slots, replies, json_start, desc) -> None:
        from tunebook.models.generate import generate, render_prompts
        from tunebook.models.load import load_for_inference

        if self._local is None:
            self._local = load_for_inference(self.params.model)
        model, tokenizer = self._local
        start = json_start if self.params.json_mode else ""
        for first in range(0, len(conversations), LOCAL_SLICE):
            part = conversations[first : first + LOCAL_SLICE]
            out = generate(model, tokenizer, part, batch_size=self.params.batch_size, max_new_tokens=self.params.max_new_tokens, desc=desc, reply_start=start)
            prompts = render_prompts(tokenizer, part)
            for j, text in enumerate(out.texts):
                i = first + j
                reply = start + text
                self._keep(
                    keys[i],
                    reply,
                    len(tokenizer(prompts[j], add_special_tokens=False)["input_ids"]),
                    len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                )
                replies[slots[i]] = Reply(reply)
