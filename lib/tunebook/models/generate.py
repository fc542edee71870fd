"""Batched greedy generation: prompts sorted by length, left-padded, generated batch by batch.

Sorting keeps the padding in each batch small; left padding lets every row's answer start right after its
prompt; each row stops at end-of-turn or a stop string; a batch that runs the GPU out of memory is retried at
half the size; results come back in the caller's order. Several processes share the work by whole batches of that
one sorted list (`shard_rows`), so every batch is the batch one process would generate. GGUF models generate through
llama.cpp, one at a time.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from tunebook.errors import TunebookError
from tunebook.models.families import render_prompt


@dataclass
class Generation:
    texts: list[str]
    seconds: float
    requests: list[dict] | None = None  # API baselines: each row's request outcome (status, attempts, error)
    rows: list[int] | None = None  # a shard's rows: the caller's index of each text, ascending; None = every row

    @property
    def examples_per_second(self) -> float:
        return len(self.texts) / self.seconds if self.seconds else 0.0


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    return [render_prompt(tokenizer, c) for c in conversations]


def label_sequences(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's token ids as the model writes it after the assistant turn starts, then end-of-turn."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]


def only_labels(sequences: list[list[int]], prompt_length: int):
    """A `prefix_allowed_tokens_fn` for generate(): every step may only continue one of the label
    sequences, so greedy decoding always ends on a complete, valid label (constrained decoding)."""

    def allowed(_batch_id, input_ids) -> list[int]:
        written = input_ids[prompt_length:].tolist()
        n = len(written)
        options = {s[n] for s in sequences if len(s) > n and s[:n] == written}
        return sorted(options) or [sequences[0][-1]]  # a finished label: only end-of-turn

    return allowed


def answer_token_budget(tokenizer, answers: list[str]) -> int:
    """max_new_tokens when the params leave it empty: the longest training answer in tokens, plus 25% and the
    end-of-turn token, so no taught answer is cut while a rambling model stops early."""
    longest = max((len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]), default=0)
    return max(8, -(-longest * 5 // 4) + 1)


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first stop string (generation stops after writing it)."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(cuts)] if cuts else text


def shard_rows(order: list[int], batch_size: int, shard: tuple[int, int]) -> list[int]:
    """The rows process `index` of `count` generates, in generation order: the sorted rows `order` cut into batches of
    `batch_size`, and batches index, index + count, index + 2 * count, ... of them. Whole batches, so each batch holds
    exactly the rows (and padding) it holds in one process; dealt round, so each process gets long and short prompts."""
    index, count = shard
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [row for batch in batches[index::count] for row in batch]


def merge_shards(shards: list[Generation], n: int) -> list[str]:
    """The texts of shards that together generated n rows, in the caller's order."""
    texts: list[str | None] = [None] * n
    for shard in shards:
        for row, text in zip(shard.rows, shard.texts):
            texts[row] = text
    missing = [row for row, text in enumerate(texts) if text is None]
    if missing:
        raise ValueError(f"no shard generated rows {missing} of {n}")
    return texts


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop_strings: list[str] = (),
    desc: str = "generate",
    labels: list[str] | None = None,
    reply_start: str = "",
    shard: tuple[int, int] = (0, 1),
    temperature: float = 0.0,
) -> Generation:
    """Greedy answers in the callers' order (sampled at `temperature` when it is above 0: pure sampling, no top-k or
    top-p; seed torch first for repeatable samples); with `labels`, decoding is constrained to exactly one of them;
    `reply_start` is written as the start of every answer (not returned), e.g. a JSON reply's opening.
    `shard` (index, count): generate only process index's share of count (`shard_rows`); `rows` then names the
    caller's index of each text.

    Each row stops at end-of-turn or at a stop string (finished rows wait as padding while the rest of the
    batch goes on). When the GPU runs out of memory the batch size is halved and the batch retried."""
    import torch

    prompts = [p + reply_start for p in render_prompts(tokenizer, conversations)]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    by_length = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: memory trouble shows at once
    order = shard_rows(by_length, batch_size, shard)
    texts: list[str] = [""] * len(prompts)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sequences = label_sequences(tokenizer, labels) if labels else None
    if sequences:
        max_new_tokens = max(len(s) for s in sequences)
    options = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn_ids(model, tokenizer))
    if temperature > 0:  # the model's own generation_config may hold top_k / top_p: switched off, so T alone shapes the samples
        options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    if stop_strings:
        options.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    started, done, size = time.time(), 0, batch_size
    while done < len(order):
        batch = order[done : done + size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        constraint = {"prefix_allowed_tokens_fn": only_labels(sequences, encoded["input_ids"].shape[1])} if sequences else {}
        try:
            with torch.inference_mode():
                out = model.generate(**encoded, **constraint, **options)
        except torch.OutOfMemoryError:
            out = None  # handled outside the except block, so the failed batch's tensors can be freed
        if out is None:
            del encoded
            torch.cuda.empty_cache()
            if size == 1:
                raise TunebookError(
                    f"{desc}: out of GPU memory generating for a single prompt of {lengths[batch[0]]} tokens. "
                    "Set evaluate.load_in_4bit: true, or lower model.max_seq_length."
                ) from None
            size //= 2
            print(f"{desc}: out of GPU memory; batch size now {size}", flush=True)
            continue
        new_tokens = out[:, encoded["input_ids"].shape[1] :]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            texts[i] = cut_at_stop(text, stop_strings).strip()
        done += len(batch)
        # Plain prints, not a widget bar: they show in notebooks and in papermill's headless log alike.
        print(f"{desc}: {done}/{len(order)} examples, batch size {size}, {time.time() - started:.0f}s", flush=True)
    seconds = time.time() - started
    if shard[1] == 1:
        return Generation(texts=texts, seconds=seconds)
    rows = sorted(order)
    return Generation(texts=[texts[i] for i in rows], seconds=seconds, rows=rows)


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's own (Llama 3 lists several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(i for i in configured if i is not None)})


def load_gguf(path: str, n_ctx: int):
    """A llama.cpp model (llama-cpp-python) for greedy generation; all layers on the GPU when the build has one."""
    import os

    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, n_threads=os.cpu_count(), n_gpu_layers=-1, seed=0, verbose=False)


def generate_gguf(
    llm,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    stop_strings: list[str] = (),
    desc: str = "generate",
    labels: list[str] | None = None,
) -> Generation:
    """Greedy answers from a GGUF model, one prompt at a time (llama-cpp-python has no batched API).

    Prompts are rendered and tokenized by the Hugging Face tokenizer, so llama.cpp sees exactly the token ids the
    transformers models see; with `labels`, a grammar allows only those labels (constrained decoding)."""
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_string("root ::= " + " | ".join(json.dumps(label, ensure_ascii=False) for label in labels), verbose=False) if labels else None
    if labels:
        max_new_tokens = max(len(s) for s in label_sequences(tokenizer, labels))
    texts = []
    started = time.time()
    for number, prompt in enumerate(render_prompts(tokenizer, conversations), start=1):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, grammar=grammar, stop=list(stop_strings) or None)
        texts.append(out["choices"][0]["text"].strip())
        if number % 25 == 0 or number == len(conversations):
            print(f"{desc}: {number}/{len(conversations)} examples, {time.time() - started:.0f}s", flush=True)
    return Generation(texts=texts, seconds=time.time() - started)


def gguf_runs_on_gpu() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (pip's default build is CPU only)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@contextmanager
def peak_memory(gpu: bool = True):
    """Peak memory while the block runs: CUDA allocator peak when a GPU runs it, else the process's sampled RSS."""
    import torch

    result = {"mb": 0.0}
    if gpu and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    import psutil

    process = psutil.Process()
    stop = threading.Event()
    samples = [process.memory_info().rss]

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        samples.append(process.memory_info().rss)
        result["mb"] = max(samples) / 2**20
