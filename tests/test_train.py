import types

import pytest

from conftest import CPU_ONLY
from tunebook.errors import TunebookError
from tunebook.params.load import validate_params
from tunebook.training.train import _check_labels, _check_trl, _hf_model, _total_steps, _trainer, build_trainer, loss_curves, out_of_memory_message, train


def params(**train):
    return validate_params({"data": {"train_path": "x.jsonl"}, "train": train})


def test_total_steps_from_epochs_batch_and_accumulation():
    assert _total_steps(params(batch_size=8, epochs=1), 200) == 25
    assert _total_steps(params(batch_size=8, grad_accum=2, epochs=3), 200) == 39  # 13 steps an epoch (the 25th batch alone), as the Trainer counts
    assert _total_steps(params(max_steps=7), 200) == 7


def test_loss_curves_split_train_and_eval_logs():
    history = [{"loss": 2.0, "step": 5}, {"eval_loss": 1.9, "step": 5}, {"loss": 1.5, "step": 10}, {"train_runtime": 3.0, "step": 10}]
    assert loss_curves(history) == ([(5, 2.0), (10, 1.5)], [(5, 1.9)])


@CPU_ONLY
def test_trl_1_15_on_cpu_is_stopped_with_the_fix(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.15.0")
    with pytest.raises(TunebookError, match="pip install 'trl>=1.16'"):
        _check_trl("hf")


ROW = {"prompt": [{"role": "user", "content": "Capital of France?"}], "completion": [{"role": "assistant", "content": "Paris"}]}


def rows(n, row=ROW):
    from datasets import Dataset

    return Dataset.from_list([row] * n)


def test_loss_is_on_answer_tokens_only(tmp_path, capsys):
    trainer, backend = build_trainer(params(max_steps=1, batch_size=2), rows(4), rows(1), tmp_path)
    assert backend == "hf"
    out = capsys.readouterr().out
    assert "Loss on answer tokens only:" in out
    labels = trainer.train_dataset[0]["labels"]
    assert labels[0] == -100 and labels[-1] != -100  # prompt masked, answer (+ end of turn) trained


def test_all_masked_training_set_fails_loudly(tmp_path):
    """Answers cut off by max_seq_length leave no loss tokens: refuse to train rather than learn nothing."""
    long_prompt = dict(ROW, prompt=[{"role": "user", "content": "word " * 200}])
    p = validate_params({"data": {"train_path": "x.jsonl"}, "model": {"max_seq_length": 64}, "train": {"max_steps": 1}})
    with pytest.raises(TunebookError, match="answer masked out"):
        build_trainer(p, rows(4, long_prompt), rows(1), tmp_path)


def test_loss_on_prompt_tokens_fails_loudly():
    from datasets import Dataset

    unmasked = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 3, "labels": [[5, 6, 7]] * 3})
    with pytest.raises(TunebookError, match="prompt tokens too"):
        _check_labels(types.SimpleNamespace(train_dataset=unmasked, args=types.SimpleNamespace(packing=False)), 3, fmt=None)


def test_throughput_meter_reports_steady_tokens_per_second(tmp_path):
    """Six real steps: the first is warm-up and the step with the evaluation in it is left out."""
    trainer, _ = build_trainer(params(max_steps=6, batch_size=2, eval_steps=3, warmup_ratio=0.0), rows(12), rows(2), tmp_path)
    result, meter = train(trainer, params())
    assert result.global_step == 6 and len(meter.steps) == 6
    assert [evaluated for _, _, evaluated in meter.steps] == [False, False, False, True, False, False]
    assert all(tokens > 0 for _, tokens, _ in meter.steps)
    kept = [meter.steps[i] for i in (1, 2, 4, 5)]
    assert meter.tokens_per_second() == pytest.approx(sum(t for _, t, _ in kept) / sum(s for s, _, _ in kept))
    assert meter.summary()["tokens_per_second"] > 0


@pytest.mark.parametrize("batching", ["padding_free", "packed"])
def test_padding_free_and_packing_need_unsloth(tmp_path, batching):
    with pytest.raises(TunebookError, match=f"train.batching: {batching} needs the unsloth backend"):
        build_trainer(params(batching=batching), rows(2), rows(1), tmp_path)


@CPU_ONLY
def test_8bit_optimizers_are_refused_on_cpu(tmp_path):
    with pytest.raises(TunebookError, match="adamw_8bit is a bitsandbytes GPU optimizer"):
        build_trainer(params(optimizer="adamw_8bit"), rows(2), rows(1), tmp_path)


def test_out_of_memory_message_names_the_knobs_and_their_values():
    message = out_of_memory_message(params(batch_size=16, lora_r=64))
    for knob in ("train.batch_size=16", "train.grad_accum", "model.max_seq_length=1024", "model.load_in_4bit", "train.lora_r=64", "--resume"):
        assert knob in message


def test_neftune_trains_with_noisy_embeddings(tmp_path):
    """One real optimizer step with NEFTune on: the noise hook is on the embeddings during training only."""
    p = params(max_steps=1, batch_size=2, neftune_noise_alpha=5.0)
    model, tokenizer, lora = _hf_model(p)
    trainer = _trainer(p, "hf", model, tokenizer, lora, rows(4), rows(1), tmp_path, steps=1)
    assert trainer.args.neftune_noise_alpha == 5.0
    embeddings = trainer.model.get_input_embeddings()
    seen = []
    embeddings.register_forward_hook(lambda module, args, output: seen.append(getattr(module, "neftune_noise_alpha", None)))
    trainer.train()
    assert seen and seen[0] == 5.0  # set by the Trainer while training
    assert not hasattr(embeddings, "neftune_noise_alpha")  # and removed after training (clean eval and saving)


def test_on_a_cpu_the_fused_head_projects_only_the_loss_positions_with_the_same_loss_and_gradients(tiny_smollm2, monkeypatch):
    """TRL projects every position through the LM head on a CPU; score_only_loss_positions has it project the answer
    positions alone (a third faster on the default run, bench/cpu_lm_head.py) with the same loss and gradients."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from tunebook.models.patches import score_only_loss_positions

    shipped = getattr(trl_utils._use_triton, "wrapped", trl_utils._use_triton)  # an earlier build_trainer may have set it
    monkeypatch.setattr(trl_utils, "_use_triton", shipped)
    projected, apply = [], trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda hidden, *rest: projected.append(len(hidden)) or apply(hidden, *rest))
    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]  # the answer: the last three tokens of each row

    def loss_and_gradients():
        model = AutoModelForCausalLM.from_pretrained(tiny_smollm2, dtype=torch.float32)
        trl_utils.add_fused_lm_head(model)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    every_loss, every_grads = loss_and_gradients()
    score_only_loss_positions()
    assert trl_utils._use_triton(torch.device("cpu"))
    loss, grads = loss_and_gradients()
    assert projected == [2 * 23, 2 * 3]  # every shifted position, then the six that carry a loss
    torch.testing.assert_close(loss, every_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, every_grads[name], msg=name)
