import types

import pytest

from tunebook.config import validate_params
from tunebook.errors import TunebookError
from tunebook.train import _check_labels, _check_trl, _hf_model, _total_steps, _trainer, loss_curves, out_of_memory_message


def params(**train):
    return validate_params({"data": {"train_path": "x.jsonl"}, "train": train})


def test_total_steps_from_epochs_batch_and_accumulation():
    assert _total_steps(params(batch_size=8, epochs=1), 200) == 25
    assert _total_steps(params(batch_size=8, grad_accum=2, epochs=3), 200) == 38
    assert _total_steps(params(max_steps=7), 200) == 7


def test_loss_curves_split_train_and_eval_logs():
    history = [{"loss": 2.0, "step": 5}, {"eval_loss": 1.9, "step": 5}, {"loss": 1.5, "step": 10}, {"train_runtime": 3.0, "step": 10}]
    assert loss_curves(history) == ([(5, 2.0), (10, 1.5)], [(5, 1.9)])


def test_trl_1_15_on_cpu_is_stopped_with_the_fix(monkeypatch):
    import torch
    import trl

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(trl, "__version__", "1.15.0")
    with pytest.raises(TunebookError, match="pip install 'trl>=1.16'"):
        _check_trl("hf")


def test_all_masked_training_set_fails_loudly(capsys):
    with pytest.raises(TunebookError, match="answer masked out"):
        _check_labels(types.SimpleNamespace(train_dataset=[]), 10)
    _check_labels(types.SimpleNamespace(train_dataset=[1] * 8), 10)
    assert "2 of 10 training examples" in capsys.readouterr().out


def test_out_of_memory_message_names_the_knobs_and_their_values():
    message = out_of_memory_message(params(batch_size=16, lora_r=64))
    for knob in ("train.batch_size=16", "train.grad_accum", "model.max_seq_length=1024", "model.load_in_4bit", "train.lora_r=64", "--resume"):
        assert knob in message


def test_neftune_trains_with_noisy_embeddings(tmp_path):
    """One real optimizer step with NEFTune on: the noise hook is on the embeddings during training only."""
    from datasets import Dataset

    p = params(max_steps=1, batch_size=2, neftune_noise_alpha=5.0)
    row = {"prompt": [{"role": "user", "content": "Capital of France?"}], "completion": [{"role": "assistant", "content": "Paris"}]}
    model, tokenizer, lora = _hf_model(p)
    trainer = _trainer(p, model, tokenizer, lora, Dataset.from_list([row] * 4), Dataset.from_list([row]), tmp_path, steps=1)
    assert trainer.args.neftune_noise_alpha == 5.0
    embeddings = trainer.model.get_input_embeddings()
    seen = []
    embeddings.register_forward_hook(lambda module, args, output: seen.append(getattr(module, "neftune_noise_alpha", None)))
    trainer.train()
    assert seen and seen[0] == 5.0  # set by the Trainer while training
    assert not hasattr(embeddings, "neftune_noise_alpha")  # and removed after training (clean eval and saving)
