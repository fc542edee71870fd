from tunebook.evaluate import models_to_evaluate
from tunebook.quantize import dir_size_mb, size_table
from tunebook.runs import open_run


def test_dir_size_mb(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 2**19)
    assert dir_size_mb(tmp_path) == 1.5


def test_skipped_variants_are_listed_not_evaluated(write_params, tmp_path, capsys):
    run = open_run(write_params("data:\n  train_path: rows.jsonl\noutput_dir: out\nmodel:\n  name: org/not-local\n"))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"x" * 2**20)
    with run.stage("02_finetune") as outputs:
        outputs["merged_dir"] = str(merged)
    with run.stage("03_quantize") as outputs:
        outputs["variants"] = [
            {"name": "int8_weight_only", "method": "int8_weight_only", "bits": 8, "status": "ok", "dir": str(merged), "size_mb": 1.0},
            {"name": "gptq", "method": "gptq", "bits": 4, "status": "skipped", "reason": "needs a GPU"},
        ]
    assert models_to_evaluate(run) == [("base", "org/not-local"), ("finetuned", str(merged)), ("int8_weight_only", str(merged))]
    assert "gptq: not evaluated, quantization was skipped (needs a GPU)" in capsys.readouterr().out
    sizes = size_table(run)
    assert sizes[0] == {"model": "finetuned", "size_mb": 1.0, "status": "ok"}  # a hub base has no local size
    assert sizes[-1]["status"] == "skipped: needs a GPU"
