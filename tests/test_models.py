import pytest

from tunebook.errors import TunebookError
from tunebook.config import DEFAULT_MODEL as DEFAULT_MODEL_NAME
from tunebook.models import load_tokenizer, materialize_embedded, pick_backend, resolve_model


def test_embedded_default_is_a_plain_trainable_folder():
    folder = materialize_embedded(DEFAULT_MODEL_NAME)
    assert (folder / "model.safetensors").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()
    tokenizer = load_tokenizer(DEFAULT_MODEL_NAME)
    assert tokenizer.chat_template and tokenizer.pad_token


@pytest.mark.parametrize(
    "name, message",
    [
        ("embedded:NoSuchModel", "Unknown embedded model"),
        ("not a model id!", "neither a local folder"),
        ("./missing-folder", "not a model folder"),
    ],
)
def test_bad_model_names_get_one_clear_message(name, message):
    with pytest.raises(TunebookError, match=message):
        resolve_model(name)


def test_unreachable_hub_model_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunebookError, match="Could not load model 'nobody-here/no-such-model'"):
        load_tokenizer("nobody-here/no-such-model")


def test_unsloth_without_gpu_stops_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TunebookError, match="Unsloth needs a GPU"):
        pick_backend("unsloth")
    assert pick_backend("auto") == "hf"
