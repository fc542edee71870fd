import types

import pytest

from tunebook.config import validate_params
from tunebook.errors import TunebookError
from tunebook.train import _check_labels, _check_trl, _total_steps, loss_curves


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
