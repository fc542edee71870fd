"""The fine-tuned model as one folder: the base model's 16-bit weights with the LoRA adapter added in, shard by shard.

transformers + PEFT's `merge_and_unload` holds the whole model in memory (16 GB for an 8B model in 16-bit, more than
a free Colab runtime's 12.7 GB of RAM). Here, as Unsloth's merged save does, the base model's safetensors files are
read a tensor at a time: each weight the adapter trained gets B @ A x scale added (in float32, then cast to the
run's dtype), and the output is written in shards of at most MAX_SHARD_BYTES, each file closed before the next is
read, so the memory held is about two shards, whatever the model's size (bench/merge_ram.py measures it).

02 merges into the run's weights folder (params/schema.py's Params.weights_dir); a later stage on another machine or a fresh Colab
runtime, where that folder is gone, rebuilds it from the base model and the adapter kept with the run (`merged_model`).
A merged folder records the adapter it was made from (MERGE_RECORD), so one made from another adapter is never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

from tunebook.errors import TunebookError

MAX_SHARD_BYTES = 2 * 2**30
MERGE_RECORD = "tunebook_merge.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "training_args.bin", "adapter_model.bin")
# A pre-quantized bitsandbytes checkpoint (4-bit weights): the merge uses the 16-bit model it was made from.
BNB_SUFFIX = re.compile(r"-(unsloth-)?bnb-4bit$")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write base + adapter into `out_dir` (which must not exist; the caller swaps it into place) in `dtype` (float32,
    bfloat16 or float16): weights, config, the adapter folder's tokenizer and generation config, and MERGE_RECORD."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    out_dtype = getattr(torch, dtype)
    deltas = lora_deltas(adapter_dir, load_file(adapter_dir / "adapter_model.safetensors"))
    where = tensor_files(base_dir)
    missing = sorted(set(deltas) - set(where))
    if missing:
        raise TunebookError(
            f"The adapter in {adapter_dir} changes {len(missing)} weights that the base model in {base_dir} does not have (e.g. {missing[0]}): it was trained on another model."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(where, BYTES[dtype], max_shard_bytes)
    weight_map, total = {}, 0
    for number, names in enumerate(shards, start=1):
        shard_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        files = {}
        try:
            for name in names:
                file = where[name][0]
                if file not in files:
                    files[file] = safe_open(str(base_dir / file), framework="pt")
                tensor = files[file].get_tensor(name)
                if name in deltas:
                    tensor = tensor.float() + deltas.pop(name)()
                tensors[name] = tensor.to(out_dtype).contiguous()
        finally:
            files.clear()  # closes the files (their memory maps) before the next shard is read
        save_file(tensors, str(out_dir / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, shard_name)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for extra in sorted(adapter_dir.iterdir()):  # the tokenizer and generation config 02 saved with the adapter
        if extra.is_file() and extra.name not in ADAPTER_FILES:
            shutil.copy2(extra, out_dir / extra.name)
    if not (out_dir / "generation_config.json").exists() and (base_dir / "generation_config.json").exists():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    record = {"adapter_sha256": adapter_digest(adapter_dir), "base": str(base_dir), "dtype": dtype}
    (out_dir / MERGE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")


def lora_deltas(adapter_dir: Path, weights: dict) -> dict:
    """{base tensor name: a function giving B @ A x scale in float32} for every LoRA pair of a PEFT adapter; computed
    when its tensor is merged, so at most one delta is held at a time."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora"):
        raise TunebookError(f"{adapter_dir} is a DoRA adapter, which this merge does not handle.")
    if config.get("modules_to_save"):
        raise TunebookError(f"{adapter_dir} trains whole modules too (modules_to_save: {config['modules_to_save']}), which this merge does not handle.")
    alpha, patterns = config["lora_alpha"], config.get("alpha_pattern") or {}
    deltas = {}
    for key in weights:
        found = re.fullmatch(r"base_model\.model\.(.+)\.lora_(A|embedding_A)(?:\.weight)?", key)
        if not found:
            continue
        module, embedding = found[1], found[2] == "embedding_A"
        a = weights[key]
        b = weights[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        rank = a.shape[0]
        module_alpha = next((v for pattern, v in patterns.items() if re.search(rf"(^|\.){pattern}$", module)), alpha)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        transposed = embedding or config.get("fan_in_fan_out", False)

        def delta(a=a, b=b, scale=scale, transposed=transposed):
            d = (b.float() @ a.float()) * scale
            return d.T if transposed else d

        deltas[f"{module}.weight"] = delta
    if not deltas:
        raise TunebookError(f"{adapter_dir / 'adapter_model.safetensors'} holds no LoRA weights.")
    return deltas


def tensor_files(model_dir: Path) -> dict[str, tuple[str, int]]:
    """{tensor name: (safetensors file, element count)} of a model folder, in the files' order."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise TunebookError(f"{model_dir} has no safetensors weights (model.safetensors or an index): the merge reads those.")
    where = {}
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():
                where[name] = (file, math.prod(f.get_slice(name).get_shape()))
    return where


def plan_shards(where: dict[str, tuple[str, int]], element_bytes: int, max_shard_bytes: int) -> list[list[str]]:
    """The tensor names of each output shard: in order, at most max_shard_bytes each (one larger tensor alone)."""
    shards, size = [[]], 0
    for name, (_, count) in where.items():
        if shards[-1] and size + count * element_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += count * element_bytes
    return shards


def adapter_digest(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def made_from(merged_dir: Path, adapter_dir: Path) -> bool:
    """Whether a merged folder is complete and was made from this adapter (its record, written last, says so)."""
    record = Path(merged_dir) / MERGE_RECORD
    try:
        return json.loads(record.read_text(encoding="utf-8"))["adapter_sha256"] == adapter_digest(Path(adapter_dir))
    except (OSError, ValueError, KeyError):
        return False


def sixteen_bit_name(name: str) -> str:
    """The model whose 16-bit weights the merge adds the adapter to: the model itself, or for a pre-quantized
    bitsandbytes 4-bit hub model (Unsloth's -bnb-4bit uploads) the 16-bit model it was quantized from."""
    return BNB_SUFFIX.sub("", name)


def base_weights(name: str) -> Path:
    """The folder holding the base model's 16-bit safetensors: the embedded model materialized, a local folder, or a hub
    model's files in the hub cache (downloaded if this runtime has not got them yet)."""
    from tunebook.models.load import HUB_ID, resolve_model

    if name.startswith("embedded:") or Path(name).is_dir():
        folder = Path(resolve_model(name))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("quantization_config"):
            raise TunebookError(
                f"model.name {name} holds quantized weights ({config['quantization_config'].get('quant_method', 'quantized')}), and the merged model is "
                "made from the base model's 16-bit weights: point model.name at the 16-bit model (model.load_in_4bit quantizes it as it loads)."
            )
        return folder
    if not HUB_ID.match(name):
        raise TunebookError(f"model.name {name!r} is neither a local folder, an embedded model nor a hub id: the merge has no weights to start from.")
    from huggingface_hub import snapshot_download

    source = sixteen_bit_name(name)
    if source != name:
        print(f"{name} is 4-bit: the merged model is made from the 16-bit weights of {source}, as Unsloth's merged save does.", flush=True)
    return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json"]))


def merge_for_run(p, adapter_dir: Path, merged_dir: Path) -> None:
    """The run's base model + `adapter_dir` merged into `merged_dir` (swapped into place when complete), in the
    training dtype, as 02 and a later stage rebuilding it make it alike."""
    from tunebook.models.load import model_type, pick_dtype
    from tunebook.run.files import fresh_tmp_dir, replace_dir

    dtype = str(pick_dtype(p.model.dtype, model_type(p.model.name))).removeprefix("torch.")
    base = base_weights(p.model.name)
    tmp = fresh_tmp_dir(Path(merged_dir))
    merge_adapter(base, adapter_dir, tmp, dtype)
    replace_dir(tmp, Path(merged_dir))


def merged_model(run, build: bool = True) -> Path | None:
    """The merged fine-tuned model on this machine's disk: 02's, or (`build`) rebuilt from the base model and the
    run's adapter into the run's weights folder, where 02 made it elsewhere (a fresh Colab runtime); None when there is
    none and `build` is off. A folder made from another adapter is never used; one 02 recorded before merges were
    recorded is taken as it is."""
    finetuned = run.outputs_of("02_finetune")
    adapter, recorded, here = Path(finetuned.adapter_dir), Path(finetuned.merged_dir), run.params.weights_dir / "merged"
    if (recorded / "config.json").is_file() and not (recorded / MERGE_RECORD).exists():
        return recorded
    for folder in dict.fromkeys([recorded, here]):
        if made_from(folder, adapter):
            return folder
    if not build:
        return None
    print(f"The merged model 02 made ({recorded}) is not on this machine's disk: rebuilding it from the base model and the adapter into {here}.", flush=True)
    merge_for_run(run.params, adapter, here)
    return here
