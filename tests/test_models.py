import pytest

from conftest import CPU_ONLY
from tunebook.errors import TunebookError
from tunebook.models.load import load_tokenizer, materialize_embedded, pick_backend, resolve_model
from tunebook.params.schema import DEFAULT_MODEL as DEFAULT_MODEL_NAME


def test_embedded_default_is_a_plain_trainable_folder():
    folder = materialize_embedded(DEFAULT_MODEL_NAME)
    assert (folder / "model.safetensors").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()
    tokenizer = load_tokenizer(DEFAULT_MODEL_NAME)
    assert tokenizer.chat_template and tokenizer.pad_token
    # The GGUF's own special tokens (its end of turn ends generation), whatever the transformers version.
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    text = "Born 1,234 years ago — naïve café"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


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
    with pytest.raises(TunebookError, match="nobody-here/no-such-model: HF_HUB_OFFLINE is set and the model is not in the local cache"):
        load_tokenizer("nobody-here/no-such-model")


@CPU_ONLY
def test_unsloth_without_gpu_stops_clearly():
    with pytest.raises(TunebookError, match="Unsloth needs a GPU"):
        pick_backend("unsloth")
    assert pick_backend("auto") == "hf"


def test_dtype_follows_the_gpu(monkeypatch):
    import torch

    from tunebook.models.load import pick_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    assert pick_dtype("auto") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # an L4, A100, H100
    assert pick_dtype("auto") is torch.bfloat16
    assert pick_dtype("float32") is torch.float32  # an explicit choice wins


def test_cpu_computes_in_bfloat16_only_with_bfloat16_instructions(monkeypatch):
    import torch

    from tunebook.models.load import pick_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # an AVX2 CPU: bfloat16 is emulated
    assert pick_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # Cooper Lake, Sapphire Rapids, Zen 4
    assert pick_dtype("auto") is torch.bfloat16
    assert pick_dtype("float32") is torch.float32 and pick_dtype("bfloat16") is torch.bfloat16


def test_named_chat_template_without_unsloth_is_explained():
    from tunebook.models.load import has_unsloth

    if has_unsloth():
        pytest.skip("unsloth is installed")
    with pytest.raises(TunebookError, match="model.chat_template 'llama-3.1' uses Unsloth's templates"):
        load_tokenizer(DEFAULT_MODEL_NAME, chat_template="llama-3.1")
