import pytest

from conftest import finetuned_record
from tunebook.evaluation.evaluate import EvalModel, models_to_evaluate
from tunebook.models.load import dir_size_mb
from tunebook.params.schema import DEFAULT_MODEL
from tunebook.quantizing.quantize import Skipped, _check_group_size, size_table
from tunebook.run.folder import open_run


def test_dir_size_mb(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 2**19)
    assert dir_size_mb(tmp_path) == 1.5
    assert dir_size_mb(tmp_path / "a.bin") == 1.0  # a GGUF copy is one file


def test_skipped_and_failed_variants_are_listed_not_evaluated(write_params, tmp_path, capsys):
    run = open_run(write_params("data:\n  train_path: rows.jsonl\noutput_dir: out\nmodel:\n  name: org/not-local\n"))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"x" * 2**20)
    (merged / "config.json").write_text('{"dtype": "float32"}')
    gguf = tmp_path / "gguf_q8_0.gguf"
    gguf.write_bytes(b"x" * 2**19)
    with run.stage("02_finetune") as outputs:
        outputs.update(finetuned_record(merged_dir=str(merged)))
    with run.stage("03_quantize") as outputs:
        outputs["variants"] = [
            {"name": "gguf_q8_0", "method": "gguf_q8_0", "bits": 8, "format": "gguf", "status": "ok", "path": str(gguf), "size_mb": 0.5},
            {"name": "bnb_nf4", "method": "bnb_nf4", "bits": 4, "format": "transformers", "status": "skipped", "reason": "needs a GPU"},
            {"name": "awq_w4a16", "method": "awq_w4a16", "bits": 4, "format": "transformers", "status": "failed", "reason": "ValueError: boom"},
        ]
    assert models_to_evaluate(run) == [
        EvalModel("base", "base", "transformers", "org/not-local", None, None),
        EvalModel("finetuned", "finetuned", "transformers", str(merged), 32, 1.0),
        EvalModel("gguf_q8_0", "quantized", "gguf", str(gguf), 8, 0.5),
    ]
    assert [(m.untrained, m.full_precision) for m in models_to_evaluate(run)] == [(True, True), (False, True), (False, False)]
    out = capsys.readouterr().out
    assert "bnb_nf4: not evaluated, quantization skipped (needs a GPU)" in out
    assert "awq_w4a16: not evaluated, quantization failed (ValueError: boom)" in out
    sizes = size_table(run)
    assert sizes[0] == {"model": "finetuned", "bits": 32, "size_mb": 1.0, "status": "ok"}  # a hub base has no local size
    assert [s["status"] for s in sizes[1:]] == ["ok", "skipped: needs a GPU", "failed: ValueError: boom"]


def test_group_size_that_does_not_divide_the_layers_names_one_that_does():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576))
    with pytest.raises(Skipped, match=r"quantize.group_size 128 does not divide the layer widths \[576\]; set quantize.group_size: 64"):
        _check_group_size(model, 128)
    _check_group_size(model, 64)


def test_gguf_round_trip_on_cpu(tmp_path):
    """The embedded SmolLM2 through llama.cpp's converter and quantizer, then llama.cpp generation."""
    pytest.importorskip("llama_cpp")
    import llama_cpp

    from tunebook.models.generate import generate_gguf, load_gguf
    from tunebook.models.load import load_tokenizer, resolve_model
    from tunebook.quantizing.quantize import write_f16_gguf

    f16, q8 = tmp_path / "model.f16.gguf", tmp_path / "q8_0.gguf"
    write_f16_gguf(resolve_model(DEFAULT_MODEL), f16)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q8).encode(), params) == 0
    assert q8.stat().st_size < 0.6 * f16.stat().st_size
    llm = load_gguf(str(q8), n_ctx=256)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert llm.n_vocab() == len(tokenizer)
    text = " The capital, 1,234 people."
    assert llm.detokenize(tokenizer(text, add_special_tokens=False)["input_ids"]).decode() == text  # byte-level BPE, not "ĠThe"
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    assert "Paris" in generate_gguf(llm, tokenizer, question, max_new_tokens=12).texts[0]
    labels = generate_gguf(llm, tokenizer, question, max_new_tokens=12, labels=["sports", "politics"]).texts[0]
    assert labels in ("sports", "politics")  # the grammar allows nothing else
