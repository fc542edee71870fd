from pathlib import Path

import pytest
import torch

from tunebook.dataset.build import build_dataset, load_split
from tunebook.errors import TunebookError
from tunebook.evaluation.evaluate import answer_budget
from tunebook.models.generate import Generation, answer_token_budget, cut_at_stop, end_of_turn_ids, generate, merge_shards, peak_memory, shard_rows
from tunebook.models.load import load_for_inference
from tunebook.models.patches import use_grouped_query_sdpa
from tunebook.params.schema import DEFAULT_MODEL
from tunebook.run.folder import open_run

ROOT = Path(__file__).resolve().parents[1]

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


def test_shards_take_whole_batches_in_turn_and_merge_back_in_order():
    """Several processes split the sorted rows by whole batches, dealt round: each batch holds what it holds in one process."""
    by_length = [5, 2, 7, 0, 1, 6, 3, 4, 8]  # the rows, longest prompt first: batches of 2 are [5, 2] [7, 0] [1, 6] [3, 4] [8]
    assert shard_rows(by_length, 2, (0, 1)) == by_length
    assert shard_rows(by_length, 2, (0, 2)) == [5, 2, 1, 6, 8]
    assert shard_rows(by_length, 2, (1, 2)) == [7, 0, 3, 4]
    assert shard_rows(by_length, 2, (2, 3)) == [1, 6]
    assert shard_rows(by_length[:2], 2, (1, 2)) == []  # more processes than batches: one has nothing to do
    shards = [Generation(texts=[f"answer {r}" for r in sorted(rows)], seconds=1.0, rows=sorted(rows)) for rows in ([5, 2, 1, 6, 8], [7, 0, 3, 4])]
    assert merge_shards(shards, 9) == [f"answer {r}" for r in range(9)]
    with pytest.raises(ValueError, match=r"no shard generated rows \[0, 3, 4, 7\] of 9"):
        merge_shards(shards[:1], 9)


def test_a_shard_generates_its_rows_as_one_process_does(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    whole = generate(model, tokenizer, CONVERSATIONS, batch_size=1, max_new_tokens=8)
    shards = [generate(model, tokenizer, CONVERSATIONS, batch_size=1, max_new_tokens=8, shard=(i, 2)) for i in range(2)]
    assert [len(s.rows) for s in shards] == [2, 1] and whole.rows is None
    assert [whole.texts[r] for r in shards[1].rows] == shards[1].texts
    assert merge_shards(shards, len(CONVERSATIONS)) == whole.texts


def test_grouped_query_sdpa_gives_the_same_answers(model_and_tokenizer):
    """The GPU inference attention (grouped-query heads passed to SDPA as they are), checked here on CPU in fp32:
    padded batches and single prompts give transformers' own answers. SmolLM2 has 9 query heads per 3 key/value heads."""
    model, tokenizer = model_and_tokenizer
    expected = generate(model, tokenizer, CONVERSATIONS, batch_size=3, max_new_tokens=8).texts
    use_grouped_query_sdpa(model)
    try:
        assert model.config._attn_implementation == "sdpa_gqa"
        assert generate(model, tokenizer, CONVERSATIONS, batch_size=3, max_new_tokens=8).texts == expected
        assert [generate(model, tokenizer, [c], batch_size=1, max_new_tokens=8).texts[0] for c in CONVERSATIONS] == expected
    finally:
        model.set_attn_implementation("sdpa")


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


def test_default_eval_set_batched_equals_one_at_a_time_in_fp32(model_and_tokenizer, tmp_path):
    """The engine's batches (sorted, left-padded, mixed finish times) change no greedy answer on the default eval
    prompts: every fifth row of the eval split (20 of 100, all prompt lengths), more than the default batch size."""
    model, tokenizer = model_and_tokenizer
    run = open_run(ROOT / "params/default.yaml", [f"output_dir={tmp_path}"])
    build_dataset(run)
    eval_split = load_split(run, "eval")
    conversations = [e["prompt"] for e in eval_split[::5]]
    budget = answer_budget(run)
    options = dict(max_new_tokens=budget, stop_strings=run.params.evaluate.stop_strings)
    batched = generate(model, tokenizer, conversations, batch_size=run.params.evaluate.batch_size, **options)
    single = generate(model, tokenizer, conversations, batch_size=1, **options)
    assert len(eval_split) == 100 and len(conversations) > run.params.evaluate.batch_size and 8 <= budget < 32
    assert batched.texts == single.texts
    assert len(set(batched.texts)) > 12  # real, varied answers


def test_answer_budget_covers_the_longest_answer_plus_a_quarter(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert answer_token_budget(tokenizer, ["Paris", long]) == -(-n * 5 // 4) + 1
    assert answer_token_budget(tokenizer, ["Paris"]) == 8  # never below 8


def test_stop_strings_end_each_row_and_are_cut(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    story = [{"role": "user", "content": "Write about the sea."}]
    free = generate(model, tokenizer, [story, CONVERSATIONS[1]], batch_size=2, max_new_tokens=40)
    stopped = generate(model, tokenizer, [story, CONVERSATIONS[1]], batch_size=2, max_new_tokens=40, stop_strings=[","])
    assert "," in free.texts[0] and "," not in stopped.texts[0]
    assert free.texts[0].startswith(stopped.texts[0])
    assert stopped.texts[1] == cut_at_stop(free.texts[1], [","]).strip()  # the other row is unaffected
    assert cut_at_stop("a.\nb||c", ["||", "\n"]) == "a."


def test_end_of_turn_ids_include_the_models_own(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert tokenizer.eos_token_id in end_of_turn_ids(model, tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 0]
    try:
        assert end_of_turn_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, 0})
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


class RunsOutOfMemoryAbove:
    """The real model, but generate() raises the GPU's out-of-memory error for batches larger than `limit`."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.batch_sizes = model, limit, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, input_ids, **kwargs):
        self.batch_sizes.append(len(input_ids))
        if len(input_ids) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model.generate(input_ids=input_ids, **kwargs)


def test_out_of_memory_halves_the_batch_and_loses_nothing(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    conversations = CONVERSATIONS * 3
    expected = generate(model, tokenizer, conversations, batch_size=9, max_new_tokens=6).texts
    flaky = RunsOutOfMemoryAbove(model, limit=2)
    assert generate(flaky, tokenizer, conversations, batch_size=9, max_new_tokens=6).texts == expected
    assert flaky.batch_sizes[:3] == [9, 4, 2] and set(flaky.batch_sizes[3:]) <= {2, 1}
    assert "out of GPU memory; batch size now 4" in capsys.readouterr().out
    with pytest.raises(TunebookError, match="out of GPU memory generating for a single prompt"):
        generate(RunsOutOfMemoryAbove(model, limit=0), tokenizer, conversations, batch_size=4, max_new_tokens=6)
