"""The shard-by-shard merge (tunebook.models.merge): the same weights as PEFT's merge_and_unload, the same outputs as the base
model with the adapter on it, whatever the shard size; a merged folder made from another adapter is not taken."""

import json
import shutil

import pytest
import torch

from tunebook.models.merge import MERGE_RECORD, made_from, merge_adapter, sixteen_bit_name


def random_adapter(base, folder, seed=0, **lora):
    """A PEFT LoRA adapter on `base` with random A and B (an adapter as training leaves it, without the training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_the_merge_equals_peft_merge_and_unload(tiny_smollm2, tmp_path, lora):
    peft_model = random_adapter(tiny_smollm2, tmp_path / "adapter", **lora)
    merge_adapter(tiny_smollm2, tmp_path / "adapter", tmp_path / "merged", "float32", max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()  # written shard by shard
    from safetensors.torch import load_file

    merged = {k: v for shard in shards for k, v in load_file(tmp_path / "merged" / shard).items()}
    expected = peft_model.merge_and_unload().state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], load_file(tiny_smollm2 / "model.safetensors")[k].float())]
    assert len(changed) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def test_the_merged_model_answers_as_the_base_model_with_the_adapter(tiny_smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = random_adapter(tiny_smollm2, tmp_path / "adapter", seed=1)
    (tmp_path / "adapter" / "generation_config.json").write_text('{"eos_token_id": [2], "pad_token_id": 2}')
    merge_adapter(tiny_smollm2, tmp_path / "adapter", tmp_path / "merged", "float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == [2]  # the adapter's, which 02 wrote
    merge_adapter(tiny_smollm2, tmp_path / "adapter", tmp_path / "merged_bf16", "bfloat16")  # the run's dtype, whatever the base's
    assert json.loads((tmp_path / "merged_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged_bf16").dtype == torch.bfloat16


def test_a_merged_folder_is_used_only_with_the_adapter_it_was_made_from(tiny_smollm2, tmp_path):
    random_adapter(tiny_smollm2, tmp_path / "adapter", seed=2)
    merge_adapter(tiny_smollm2, tmp_path / "adapter", tmp_path / "merged", "float32")
    assert made_from(tmp_path / "merged", tmp_path / "adapter")
    shutil.rmtree(tmp_path / "adapter")
    random_adapter(tiny_smollm2, tmp_path / "adapter", seed=3)  # 02 ran again: another adapter
    assert not made_from(tmp_path / "merged", tmp_path / "adapter")
    (tmp_path / "merged" / MERGE_RECORD).unlink()  # a merge that did not finish writes no record
    assert not made_from(tmp_path / "merged", tmp_path / "adapter")


def test_a_4bit_hub_model_is_merged_from_its_16bit_weights():
    assert sixteen_bit_name("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit") == "unsloth/Meta-Llama-3.1-8B-Instruct"
    assert sixteen_bit_name("unsloth/Llama-3.2-3B-Instruct-unsloth-bnb-4bit") == "unsloth/Llama-3.2-3B-Instruct"
    assert sixteen_bit_name("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"


def test_the_base_model_with_the_adapter_loads_as_the_merged_model(tiny_smollm2, tmp_path):
    """04 in a runtime without a merged copy scores the base model with the adapter on it: the same model."""
    from tunebook.models.load import load_for_inference

    random_adapter(tiny_smollm2, tmp_path / "adapter", seed=4)
    for file in tiny_smollm2.iterdir():  # 02 saves the tokenizer with the adapter
        if file.name.startswith("tokenizer") or file.name == "chat_template.jinja":
            shutil.copy2(file, tmp_path / "adapter" / file.name)
    merge_adapter(tiny_smollm2, tmp_path / "adapter", tmp_path / "merged", "float32")
    merged, _ = load_for_inference(str(tmp_path / "merged"), dtype="float32")
    with_adapter, tokenizer = load_for_inference(str(tiny_smollm2), adapter=str(tmp_path / "adapter"), dtype="float32")
    ids = tokenizer("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
