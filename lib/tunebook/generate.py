"""Batched greedy generation: prompts sorted by length, left-padded, generated batch by batch.

Sorting keeps the padding in each batch small; left padding lets every row's answer start right after its
prompt; results come back in the caller's order.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Generation:
    texts: list[str]
    seconds: float

    @property
    def examples_per_second(self) -> float:
        return len(self.texts) / self.seconds if self.seconds else 0.0


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


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


def generate(model, tokenizer, conversations: list[list[dict]], *, batch_size: int, max_new_tokens: int, desc: str = "generate", labels: list[str] | None = None) -> Generation:
    """Greedy answers in the callers' order; with `labels`, decoding is constrained to exactly one of them."""
    import torch

    prompts = render_prompts(tokenizer, conversations)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: memory trouble shows at once
    texts: list[str] = [""] * len(prompts)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    started = time.time()
    n_batches = -(-len(order) // batch_size)
    sequences = label_sequences(tokenizer, labels) if labels else None
    if sequences:
        max_new_tokens = max(len(s) for s in sequences)
    for number, start in enumerate(range(0, len(order), batch_size), start=1):
        batch = order[start : start + batch_size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        constraint = {"prefix_allowed_tokens_fn": only_labels(sequences, encoded["input_ids"].shape[1])} if sequences else {}
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                **constraint,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[:, encoded["input_ids"].shape[1] :]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            texts[i] = text.strip()
        # Plain prints, not a widget bar: they show in notebooks and in papermill's headless log alike.
        print(f"{desc}: batch {number}/{n_batches}, {min(start + batch_size, len(order))}/{len(order)} examples, {time.time() - started:.0f}s", flush=True)
    return Generation(texts=texts, seconds=time.time() - started)


@contextmanager
def peak_memory():
    """Peak memory while the block runs: CUDA allocator peak on a GPU, else the process's sampled RSS."""
    import torch

    result = {"mb": 0.0}
    if torch.cuda.is_available():
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
