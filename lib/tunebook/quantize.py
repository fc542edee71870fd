"""Stage 03: quantized copies of the merged fine-tuned model, each with its size on disk.

int8_weight_only: torchao int8 weight-only quantization through transformers' TorchAoConfig. It runs on CPU and
GPU, saves with save_pretrained and loads back with from_pretrained, so stage 04 treats it like any model folder.
A method that cannot run here is reported as skipped with the reason, never dropped silently.
"""
from __future__ import annotations

import time
from pathlib import Path

from tunebook.runs import Run, fresh_tmp_dir, replace_dir

METHOD_BITS = {"int8_weight_only": 8}


def dir_size_mb(path: str | Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 1)


def quantize(run: Run) -> list[dict]:
    merged_dir = run.outputs_of("02_finetune")["merged_dir"]
    with run.stage("03_quantize") as outputs:
        variants = []
        for method in run.params.quantize.methods:
            target = run.dir / "quantized" / method
            started = time.time()
            try:
                QUANTIZERS[method](merged_dir, target)
            except (ImportError, NotImplementedError, RuntimeError) as e:
                variants.append({"name": method, "method": method, "bits": METHOD_BITS[method], "status": "skipped", "reason": str(e).splitlines()[0]})
                print(f"{method}: skipped ({variants[-1]['reason']})")
                continue
            variants.append(
                {
                    "name": method,
                    "method": method,
                    "bits": METHOD_BITS[method],
                    "status": "ok",
                    "dir": str(target),
                    "size_mb": dir_size_mb(target),
                    "seconds": round(time.time() - started, 1),
                }
            )
        outputs["variants"] = variants
    return variants


def _int8_weight_only(merged_dir: str, target: Path) -> None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:
        raise ImportError(f"torchao is not installed ({e}); pip install torchao") from None
    from transformers import TorchAoConfig

    from tunebook.models import load_for_inference

    model, tokenizer = load_for_inference(merged_dir, quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    tmp = fresh_tmp_dir(target)
    # torchao tensors are tensor subclasses that safetensors cannot hold; they save as a torch pickle.
    model.save_pretrained(str(tmp), safe_serialization=False)
    tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, target)


QUANTIZERS = {"int8_weight_only": _int8_weight_only}


def size_table(run: Run) -> list[dict]:
    """Size on disk of the base model, the merged fine-tuned model and every quantized variant."""
    from tunebook.models import resolve_model

    rows = []
    base = resolve_model(run.params.model.name)
    if Path(base).is_dir():
        rows.append({"model": "base", "size_mb": dir_size_mb(base), "status": "ok"})
    rows.append({"model": "finetuned", "size_mb": dir_size_mb(run.outputs_of("02_finetune")["merged_dir"]), "status": "ok"})
    for v in run.outputs_of("03_quantize")["variants"]:
        rows.append({"model": v["name"], "size_mb": v.get("size_mb"), "status": v["status"] if v["status"] == "ok" else f"skipped: {v['reason']}"})
    return rows

