import pytest

from tunebook.config import DEFAULT_MODEL
from tunebook.generate import generate, peak_memory
from tunebook.models import load_for_inference

CONVERSATIONS = [
    [{"role": "user", "content": "Passages:\n[1] The Nile flows north into the Mediterranean Sea.\n\nQuestion: Into which sea does the Nile flow?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a primary colour."}],
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_for_inference(DEFAULT_MODEL, dtype="float32")


def test_batched_equals_one_at_a_time_and_keeps_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, CONVERSATIONS, batch_size=3, max_new_tokens=8)
    single = [generate(model, tokenizer, [c], batch_size=1, max_new_tokens=8).texts[0] for c in CONVERSATIONS]
    assert batched.texts == single
    assert all(batched.texts) and batched.examples_per_second > 0


def test_peak_memory_is_measured():
    with peak_memory() as peak:
        block = bytearray(50 * 2**20)
    assert peak["mb"] > 50
    del block


def test_constrained_decoding_returns_only_labels(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    labels = ["sports-watch", "movie-enter", "it-life-hack"]
    question = [{"role": "user", "content": f"Pick the genre of 'The striker scored twice.' from: {', '.join(labels)}."}]
    constrained = generate(model, tokenizer, CONVERSATIONS + [question], batch_size=2, max_new_tokens=32, labels=labels)
    assert all(text in labels for text in constrained.texts), constrained.texts
    free = generate(model, tokenizer, CONVERSATIONS, batch_size=3, max_new_tokens=8)
    assert not any(text in labels for text in free.texts)  # without the constraint these prompts give no label
