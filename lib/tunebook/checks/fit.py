"""Fit check: each stage's peak GPU memory, system RAM, local disk and Google Drive use, predicted from the model's
config.json and the params before anything loads, against a machine's limits (`python -m tunebook check PARAMS
--machine NAME`; the preflight runs it for the machine it is on). docs/fit.md explains it for users.

What each figure counts (bytes; every constant below says where it comes from):
- weights: the 16-bit (or float32) tensors in the compute dtype; with 4-bit loading, the decoder's linear layers as
  bitsandbytes NF4 with double quantization (models.nf4_config, Unsloth's loader) and the rest (embeddings, LM head,
  norms, a vision tower Unsloth skips) in 16-bit;
- LoRA: r x (in + out) per adapted linear layer; the adapter, its gradients and AdamW's two moments (or
  bitsandbytes' 8-bit states) plus the foreach step's temporary; float32 on Unsloth (float32 mixed precision) and on
  transformers + PEFT over a 16-bit base (PEFT's autocast_adapter_dtype), bfloat16 under TRL's QLoRA cast;
- activations for train.batch_size x model.max_seq_length tokens (or the longest rows 01 measured): on Unsloth's
  own Llama/Qwen kernels Unsloth's measured bytes per token (unsloth_zoo.block_swap), its checkpoints offloaded to
  pinned RAM; elsewhere one decoder layer's tensors as transformers + PEFT save them for its backward, counted
  tensor by tensor in layer_bytes(), plus one checkpointed input per layer (transformers' gradient checkpointing) or
  Unsloth's GPU staging buffers; TRL's fused LM head scores only the answer tokens in tiles of 4,096 x 32,768;
- evaluation: the weights, transformers' static KV cache for evaluate.batch_size x (prompt + new tokens) (sliding
  layers hold their window only), the prefill's largest tensors and the next-token logits;
- each quantization method its own peak; RAM for loading, training, merging, GGUF conversion and calibration; the
  run's files on the local disk, and on Drive when colab.drive_dir keeps the run there;
- on a GPU, the CUDA context and the caching allocator's slack on top of the tensors: what nvidia-smi shows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunebook.errors import TunebookError
from tunebook.params.schema import QUANTIZE_METHODS, STAGES, Params

GIB = 1024**3

# bitsandbytes NF4 with double quantization: 4-bit codes, an 8-bit absmax per 64 weights, and a float32 absmax per
# 256 of those (bitsandbytes' blocksize 64 and nested blocksize 256).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# A CUDA process's own memory outside torch's allocator (the context with lazily loaded kernels, cuBLAS and cuDNN
# handles): 0.3-0.6 GiB on current drivers; bench/fit.py measures it as nvidia-smi's figure minus torch's reserved.
CUDA_CONTEXT = 0.5 * GIB
# torch's caching allocator keeps freed blocks; tensors of other sizes (activations of each step, each eval batch's
# KV cache and prefill) cannot always reuse them, so reserved memory runs above allocated: counted as this share of
# everything but the weights, which are allocated once at load.
ALLOCATOR_SLACK = 0.25
# Unsloth's measured activation memory with its offloaded checkpointing: 42 bytes per token and hidden unit on
# Llama-3.1-8B in 4-bit (unsloth_zoo/block_swap.py, _ACTIVATION_BYTES_PER_TOKEN_HIDDEN). Carried to other shapes in
# proportion to the widths a layer's backward holds, w = 2h + q + 2kv + 3i (14h for Llama-3.1-8B): 3 bytes per unit of w.
UNSLOTH_BYTES_PER_WIDTH = 42 / 14
# Families Unsloth trains with its own kernels (FastLanguageModel's fast path); others (Gemma 3 among them) go through
# its compiled transformers modules, counted like transformers' layers (layer_bytes) with Unsloth's offloading.
UNSLOTH_FAST = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "cohere"}
# Families Unsloth (and pick_dtype) refuse to run in float16: on a GPU without bfloat16 Unsloth loads them in 16-bit and
# computes in float32 (unsloth/models/loader.py FORCE_FLOAT32); transformers computes in float32 throughout.
FLOAT32_ON_FLOAT16_GPUS = {"gemma3", "gemma3_text"}
# TRL's fused LM head (trl.trainer.utils.add_fused_lm_head): hidden states in tiles of 4,096 tokens x 32,768 words.
LOSS_TILE_TOKENS, LOSS_TILE_WORDS = 4096, 32768
# Unsloth's fast inference (evaluate.backend unsloth) grows its KV buffers in steps of this many tokens (llama.py).
UNSLOTH_KV_INCREMENT = 512
# Resident memory of a tunebook process before any model: torch, transformers, TRL, datasets imported (0.55 GiB
# measured on a CPU) plus tokenizer and data; a CUDA process adds the CUDA libraries' host memory and Unsloth.
PROCESS_RAM = {"cpu": 1.0 * GIB, "cuda": 3.0 * GIB}
# llama.cpp's converter and quantizer (03's GGUF copies) convert one tensor at a time: float32 (4 bytes) and float16 (2)
# copies of the largest tensor, in a python process of its own (torch and numpy imported).
GGUF_BYTES_PER_PARAM, GGUF_PROCESS = 6, 0.5 * GIB
# 02's merge (tunebook.models.merge) reads the base model a tensor at a time and writes shards of merge.MAX_SHARD_BYTES: about
# two shards are held at once, with the adapter's deltas, whatever the model's size.
MERGE_SHARDS_HELD = 2
# What a run writes to Drive besides the adapter and checkpoints (dataset, predictions, reports, cards): the data
# files about three times over, and a little more.
DRIVE_DATA_COPIES, DRIVE_EXTRA = 3, 100 * 2**20
WARN_WITHIN = 0.10  # a figure within 10% of its limit is a warning
NEW_TOKENS_UNKNOWN = 64  # evaluate.max_new_tokens empty and 01 not run: new tokens per answer assumed


class FitUnknown(TunebookError):
    """The model's shape cannot be read here (hub unreachable and no cached config, a config without a key, ...)."""


# ---------------------------------------------------------------------------------------------------- machines
@dataclass(frozen=True)
class Machine:
    """A machine's limits. gpu: memory one process can fill, CUDA context included (what torch reports as the device's
    total; None = no GPU); ram: system memory; disk: free local disk for the run; drive: free Google Drive (Colab)."""

    name: str
    gpu_name: str | None
    gpu: float | None
    bfloat16: bool
    ram: float
    disk: float
    drive: float | None
    cpus: int
    has_unsloth: bool = True  # Colab's install and the GPU machine have it: backend auto means Unsloth there
    note: str = ""


# GPU totals as torch and its out-of-memory messages report them ("X GiB total capacity"); RAM as Colab shows it and
# issue 32 lists it; disk: a fresh runtime's free space, approximately; Drive: the free tier's 15 GB, shared with
# Gmail and Photos (less if those hold anything).
MACHINES = {
    "colab-t4": Machine("colab-t4", "Tesla T4", 14.75 * GIB, False, 12.7 * GIB, 78 * GIB, 15 * GIB, 2, note="Colab free tier"),
    "colab-l4": Machine("colab-l4", "NVIDIA L4", 22.17 * GIB, True, 53 * GIB, 190 * GIB, 15 * GIB, 12, note="Colab, paid"),
    "colab-a100": Machine("colab-a100", "NVIDIA A100-SXM4-40GB", 39.39 * GIB, True, 83 * GIB, 150 * GIB, 15 * GIB, 12, note="Colab, paid"),
    "h100": Machine("h100", "NVIDIA H100 80GB HBM3", 79.1 * GIB, True, 128 * GIB, 64 * GIB, None, 16, note="one H100 80 GB, 128 GiB RAM"),
}
MACHINE_NAMES = (*MACHINES, "cpu")


def machine_named(name: str | None, output_dir: str = ".") -> Machine:
    """A machine from the table, `cpu` (this machine's RAM and disk, no GPU), or None: this machine as detected."""
    if name is None:
        return this_machine(output_dir)
    if name == "cpu":
        return replace(this_machine(output_dir, gpu=False), name="cpu")
    if name not in MACHINES:
        raise TunebookError(f"--machine {name!r} is not a machine the fit check knows: {', '.join(MACHINE_NAMES)}.")
    return MACHINES[name]


def this_machine(output_dir: str = ".", gpu: bool = True) -> Machine:
    """This machine's limits: its first GPU (torch's total), bfloat16 on it (or on this CPU), RAM, free disk where the
    run folders go, and free Drive when Colab has it mounted."""
    import psutil

    from tunebook.models.load import cpu_computes_bfloat16, has_cuda, has_unsloth
    from tunebook.params.drive import DRIVE_MOUNT, on_colab

    existing = Path(output_dir)
    while not existing.exists():
        existing = existing.parent
    drive = shutil.disk_usage(DRIVE_MOUNT).free if on_colab() and Path(DRIVE_MOUNT, "MyDrive").is_dir() else None
    common = dict(
        ram=psutil.virtual_memory().total, disk=shutil.disk_usage(existing).free, drive=drive, cpus=psutil.cpu_count(logical=False) or os.cpu_count() or 1
    )
    if gpu and has_cuda():
        import torch

        props = torch.cuda.get_device_properties(0)
        return Machine("this machine", props.name, props.total_memory, torch.cuda.is_bf16_supported(), has_unsloth=has_unsloth(), **common)
    return Machine("this machine", None, None, cpu_computes_bfloat16(), has_unsloth=False, **common)


# ---------------------------------------------------------------------------------------------------- model shape
# Defaults of the config classes (transformers' LlamaConfig, Qwen3Config, Gemma3TextConfig, SiglipVisionConfig ...)
# for the keys a config.json may leave out; the rest must be in the file.
CONFIG_DEFAULTS = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False, "head_dim": 128},
    "gemma3_text": {
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "tie_word_embeddings": True,
    },
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """What the predictions need of a model, read from its config.json (never its weights)."""

    name: str
    source: str  # where the config was read
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    sliding_window: int | None = None
    sliding_layers: int = 0
    norms_per_layer: int = 2  # RMSNorms in a decoder layer (Gemma 3: four)
    qk_norm: bool = False  # RMSNorm on queries and keys (Qwen3, Gemma 3)
    vision_params: int = 0  # a vision tower loaded with the text model (Gemma 3 4B and up)
    vision_linears: tuple[tuple[int, int, int], ...] = ()  # (in, out, count): what all-linear adapts there
    prequantized: bool = False  # a bitsandbytes 4-bit checkpoint
    skipped: tuple[str, ...] = ()  # its modules left in 16-bit (Unsloth's dynamic 4-bit)
    checkpoint_bytes: float = 2.0  # bytes per weight of the checkpoint's 16/32-bit tensors

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a decoder layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def skipped_params(self) -> int:
        """Linear weights a pre-quantized checkpoint keeps in 16-bit (llm_int8_skip_modules naming layers.N.proj)."""
        sizes = self.linears()
        return sum(math.prod(sizes[name.rsplit(".", 1)[-1]]) for name in self.skipped if name.rsplit(".", 1)[-1] in sizes and ".layers." in f".{name}")

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Everything but the decoder's linear layers: embeddings, LM head, norms, vision tower."""
        norms = (self.norms_per_layer * self.layers + 1) * self.hidden + (2 * self.head_dim * self.layers if self.qk_norm else 0)
        return self.embed_params * (1 if self.tied else 2) + norms + self.vision_params

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single weight (the embedding matrix, or an MLP projection)."""
        return max(self.embed_params, self.hidden * self.intermediate)

    def full_layers(self) -> int:
        return self.layers - self.sliding_layers

    def kv_bytes(self, batch: int, tokens: int, dtype_bytes: float) -> float:
        """K and V of every layer for `batch` rows of `tokens`; a sliding-window layer keeps its window only."""
        per_token = 2 * self.kv_dim * dtype_bytes
        sliding = min(tokens, self.sliding_window or tokens)
        return batch * per_token * (self.full_layers() * tokens + self.sliding_layers * sliding)


def model_shape(name: str) -> Shape:
    """The shape of model.name from its config alone: a local folder's config.json, the embedded model's (its
    materialized folder, or the GGUF's own metadata), or a hub id's config.json (the local hub cache first, else one
    request for that file). FitUnknown when it cannot be read."""
    from tunebook.models.load import EMBEDDED, HUB_ID

    if name.startswith("embedded:"):
        if name not in EMBEDDED:
            raise FitUnknown(f"unknown embedded model {name!r}")
        return _embedded_shape(name)
    folder = Path(name)
    if folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():
            raise FitUnknown(f"{folder} has no config.json")
        return shape_from_config(json.loads(config.read_text(encoding="utf-8")), name, str(config))
    if not HUB_ID.match(name):
        raise FitUnknown(f"{name!r} is neither a local folder nor a hub id")
    config, where = hub_config(name)
    return shape_from_config(config, name, where)


HUB_TIMEOUT = 5.0


def hub_config(repo: str) -> tuple[dict, str]:
    """A hub model's config.json (and where it came from): the local hub cache, else one GET of that file alone within
    HUB_TIMEOUT (no retries), never the weights."""
    from huggingface_hub import get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8")), "the local hub cache"
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise FitUnknown(f"{repo}: HF_HUB_OFFLINE is set and its config.json is not in the local hub cache")
    url = hf_hub_url(repo, "config.json")
    try:
        response = get_session().get(url, headers=build_hf_headers(), timeout=HUB_TIMEOUT, follow_redirects=True)
    except Exception:  # no network, DNS, timeout: many exception types, one answer
        raise FitUnknown(f"{repo}: the hub could not be reached and its config.json is not in the local hub cache") from None
    if response.status_code in (401, 403):
        raise FitUnknown(f"{repo}: the hub refused its config.json ({response.status_code}: a gated model needs a token)")
    if response.status_code != 200:
        raise FitUnknown(f"{repo}: the hub answered {response.status_code} for its config.json")
    return response.json(), url


def shape_from_config(config: dict, name: str = "", source: str = "") -> Shape:
    """A Shape from a config.json's contents (a text model, or a vision-language model's text_config)."""
    if config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts"):
        raise FitUnknown(f"{name}: mixture-of-experts models are not predicted")
    text = config.get("text_config") or config
    model_type = text.get("model_type") or config.get("model_type", "")
    if model_type == "gemma3":
        model_type = "gemma3_text"
    values = {**CONFIG_DEFAULTS.get(model_type, {}), **{k: v for k, v in text.items() if v is not None}}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in values]
    if missing:
        raise FitUnknown(f"{name}: its config ({source}) has no {', '.join(missing)}")
    heads = values["num_attention_heads"]
    layers = values["num_hidden_layers"]
    window = values.get("sliding_window") if (values.get("use_sliding_window", True) and model_type.startswith("gemma")) else None
    layer_types = values.get("layer_types")
    if window and layer_types:
        sliding = sum(t == "sliding_attention" for t in layer_types)
    elif window and values.get("sliding_window_pattern"):
        sliding = layers - layers // values["sliding_window_pattern"]
    else:
        sliding = 0
    tied = values.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    vision = config.get("vision_config")
    vision_params, vision_linears = _vision_tower(vision, values["hidden_size"]) if vision else (0, ())
    quant = config.get("quantization_config") or {}
    prequantized = bool(quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type"))
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return Shape(
        name=name,
        source=source,
        model_type=model_type,
        vocab=values["vocab_size"],
        hidden=values["hidden_size"],
        intermediate=values["intermediate_size"],
        layers=layers,
        heads=heads,
        kv_heads=values.get("num_key_value_heads") or heads,
        head_dim=values.get("head_dim") or values["hidden_size"] // heads,
        tied=bool(tied),
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        norms_per_layer=4 if model_type.startswith("gemma3") or model_type == "gemma2" else 2,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        vision_params=vision_params,
        vision_linears=vision_linears,
        prequantized=prequantized,
        skipped=tuple(quant.get("llm_int8_skip_modules") or ()) if prequantized else (),
        checkpoint_bytes=4.0 if dtype == "float32" else 2.0,
    )


def _vision_tower(vision: dict, text_hidden: int) -> tuple[int, tuple]:
    """Parameters of a SigLIP-style vision tower and its projector, and its linear layers (in, out, count)."""
    v = {**CONFIG_DEFAULTS["siglip_vision_model"], **vision}
    d, i, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    per_layer = 4 * (d * d + d) + 2 * d * i + i + d + 4 * d  # q, k, v, out with biases; fc1, fc2; two layer norms
    params = n * per_layer + 3 * v["patch_size"] ** 2 * d + patches * d + d * text_hidden + 2 * d
    return params, ((d, d, 4 * n), (d, i, n), (i, d, n))


def _embedded_shape(name: str) -> Shape:
    """The embedded model's shape: its materialized folder's config, else the GGUF's metadata (read, not its tensors)."""
    import importlib.util

    from tunebook.models.load import EMBEDDED, MATERIALIZED_VERSION, cache_dir

    folder = cache_dir() / "models" / f"{name.split(':', 1)[1]}-{MATERIALIZED_VERSION}"
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")), name, str(folder / "config.json"))
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FitUnknown(f"{name} needs the package {package.replace('_', '-')}")
    from gguf import GGUFReader

    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    reader = GGUFReader(gguf)
    fields = reader.fields

    def value(key):
        f = fields[key]
        return f.parts[f.data[0]][0].item() if len(f.data) == 1 else len(f.data)

    arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
    config = {
        "model_type": arch,
        "vocab_size": value("tokenizer.ggml.tokens"),
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    return shape_from_config(config, name, str(gguf))


# ---------------------------------------------------------------------------------------------------- how the run runs
@dataclass(frozen=True)
class Setup:
    """How the params run on a machine: where, which backend, which dtypes."""

    machine: Machine
    gpu: bool
    backend: str  # 02's: unsloth or hf
    dtype: str  # the compute dtype pick_dtype gives there
    weight_bytes: float  # bytes per weight of the 16-bit (or float32) tensors on the device
    act_bytes: float  # bytes per activation element
    train_4bit: bool


def setup_for(p: Params, shape: Shape, machine: Machine) -> Setup:
    """What pick_backend and pick_dtype choose on that machine (models.py), without asking this one."""
    gpu = machine.gpu is not None
    requested = p.model.backend
    from tunebook.models.families import unsloth_hazard

    auto_unsloth = requested == "auto" and gpu and machine.has_unsloth and not unsloth_hazard(shape.model_type)
    backend = "unsloth" if requested == "unsloth" or auto_unsloth else "hf"
    float32_family = shape.model_type in FLOAT32_ON_FLOAT16_GPUS
    if p.model.dtype != "auto":
        dtype = p.model.dtype
    elif gpu:
        dtype = "bfloat16" if machine.bfloat16 else "float32" if float32_family else "float16"
    else:
        dtype = "bfloat16" if machine.bfloat16 else "float32"
    act = 4.0 if dtype == "float32" else 2.0
    # Unsloth loads those families in 16-bit and computes in float32 on a GPU without bfloat16 (see above).
    weight = 2.0 if (backend == "unsloth" and gpu and dtype == "float32" and float32_family) else act
    return Setup(machine, gpu, backend, dtype, weight, act, gpu and (p.model.load_in_4bit or shape.prequantized))


def weight_bytes(shape: Shape, setup: Setup, four_bit: bool) -> float:
    """The model's weights on the device: NF4 decoder linears (those a pre-quantized checkpoint skipped in 16-bit) and
    16-bit (or float32) everything else, or all in the compute dtype."""
    wb = setup.weight_bytes
    if not four_bit:
        return shape.params * wb
    kept = shape.skipped_params
    return (shape.linear_params - kept) * NF4_BYTES + (kept + shape.other_params) * wb


def lora_params(shape: Shape, r: int, targets) -> int:
    """LoRA parameters: r x (in + out) per adapted linear layer; all-linear adapts the decoder's (and a vision tower's)."""
    sizes = shape.linears()
    names = LINEARS if targets == "all-linear" else [t for t in targets if t in sizes]
    text = shape.layers * sum(r * sum(sizes[n]) for n in names)
    vision = sum(r * (a + b) * count for a, b, count in shape.vision_linears) if targets == "all-linear" else 0
    return text + vision


def layer_bytes(shape: Shape, act: float, adapted: tuple[str, ...] = ()) -> tuple[float, float]:
    """Bytes per token of one decoder layer as transformers + PEFT keep it for the backward: (saved, backward extra).

    Counted from transformers' decoder layer (LlamaDecoderLayer; Gemma 3's has four norms and query/key norms): each
    RMSNorm keeps its float32 input (4h) and its normalized and weighted outputs; attention keeps the rotated queries,
    the keys and values copied out to every query head (repeat_kv, as transformers does when a padding mask is
    present), its output and that output made contiguous; the residual sum and the layer's output; the MLP keeps gate,
    act(gate), up and their product (4i). `adapted`: the linear layers whose LoRA input PEFT casts to the adapter's
    dtype, which autocast casts back: one more copy of each one's input. The backward adds the output's gradient and
    three MLP-sized gradients."""
    h, q, i = shape.hidden, shape.q_dim, shape.intermediate
    norms = shape.norms_per_layer * (4 + 2 * act) * h
    qk_norms = (4 + 2 * act) * (q + shape.kv_dim) if shape.qk_norm else 0
    attention = act * (3 * q + 2 * q)
    lora_inputs = act * sum(shape.linears()[name][0] for name in adapted)
    saved = norms + qk_norms + attention + act * (2 * h + 4 * i) + lora_inputs
    return saved, act * (h + 3 * i)


def unsloth_fast_bytes(shape: Shape, act: float) -> float:
    """Bytes per token of Unsloth's own kernels with its offloaded checkpointing, from its measured 42 B per token and
    hidden unit on Llama-3.1-8B, carried over by the layer widths."""
    width = 2 * shape.hidden + shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate
    return UNSLOTH_BYTES_PER_WIDTH * width * act / 2


# ---------------------------------------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class Lengths:
    """Token lengths the predictions use: the longest training row, the longest eval prompt, new tokens per answer, and
    where they come from (model.max_seq_length as a bound, or 01's measured rows)."""

    train: int
    prompt: int
    new_tokens: int
    answer: int
    source: str


def bound_lengths(p: Params) -> Lengths:
    """The worst case the params allow: rows of model.max_seq_length tokens, answers of evaluate.max_new_tokens."""
    new = p.evaluate.max_new_tokens or NEW_TOKENS_UNKNOWN
    return Lengths(
        p.model.max_seq_length, p.model.max_seq_length, new, min(new, p.model.max_seq_length), f"rows up to model.max_seq_length {p.model.max_seq_length}"
    )


def measured_lengths(p: Params) -> Lengths | None:
    """The longest rows 01 built for this run (its manifest's token counts), or None before 01 has run."""
    from tunebook.run.folder import Run

    run = Run(params=p, dir=p.run_dir)
    try:
        if not run.manifest_path.is_file() or run.status("01_build_dataset") != "complete":
            return None
        lengths = run.outputs_of("01_build_dataset").lengths
    except (TunebookError, OSError, ValueError, KeyError):
        return None
    train, evals = lengths.get("train") or [0], lengths.get("eval") or [0]
    new = p.evaluate.max_new_tokens or NEW_TOKENS_UNKNOWN
    return Lengths(max(train), max(evals), new, min(new, max(train)), "the longest rows 01 built")


@dataclass(frozen=True)
class Need:
    """One predicted peak: the stage, what runs, the resource, bytes, how they add up, and the knobs that lower it."""

    stage: str
    what: str
    resource: str  # GPU, RAM, disk, Drive
    bytes: float
    parts: str
    knobs: tuple[str, ...] = ()
    tensors: float | None = None  # on a GPU: the tensors alone (torch's allocated), before slack and context

    @property
    def key(self) -> tuple[str, str, str]:
        return self.stage, self.what, self.resource


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _parts(**parts: float) -> str:
    return " + ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items() if v >= 0.05 * GIB)


def _gpu_total(tensors: float, weights: float) -> float:
    """Allocated tensors plus the allocator's slack on everything but the weights, plus the CUDA context."""
    return tensors + ALLOCATOR_SLACK * (tensors - weights) + CUDA_CONTEXT


def predict(p: Params, shape: Shape, machine: Machine, stages, lengths: Lengths | None = None) -> list[Need]:
    """Every predicted peak of the stages to run, on that machine."""
    setup = setup_for(p, shape, machine)
    lengths = lengths or bound_lengths(p)
    needs: list[Need] = []
    if "02_finetune" in stages:
        needs += train_needs(p, shape, setup, lengths)
    if "03_quantize" in stages:
        needs += quantize_needs(p, shape, setup, lengths)
    if "04_evaluate" in stages:
        needs += evaluate_needs(p, shape, setup, lengths)
    needs += storage_needs(p, shape, setup, stages)
    return needs


def train_needs(p: Params, shape: Shape, setup: Setup, lengths: Lengths) -> list[Need]:
    """02: training's peak (GPU, or RAM on a CPU), the process's RAM, and the merge's RAM."""
    batch, _ = p.train.per_process_batch()
    tokens = batch * lengths.train
    act = setup.act_bytes
    n_lora = lora_params(shape, p.train.lora_r, p.train.target_modules)
    # float32 adapters (Unsloth; PEFT over a 16-bit base), bfloat16 under TRL's QLoRA cast (hf backend, 4-bit base)
    lora_b = 2.0 if (setup.backend == "hf" and setup.train_4bit) else 4.0
    optimizer = 2.0 if p.train.optimizer != "adamw_torch" else 3 * lora_b  # 8-bit states; or two moments + foreach temp
    lora = n_lora * (2 * lora_b + optimizer)
    # PEFT casts each adapted layer's input to the adapter's dtype (a copy wherever the two differ; Unsloth's own
    # kernels do not go through PEFT's forward)
    adapted = LINEARS if p.train.target_modules == "all-linear" else tuple(t for t in p.train.target_modules if t in LINEARS)
    cast = adapted if ("bfloat16" if lora_b == 2 else "float32") != setup.dtype else ()
    answer_rows = batch * lengths.answer
    loss = min(answer_rows, LOSS_TILE_TOKENS) * min(shape.vocab, LOSS_TILE_WORDS) * 4 + answer_rows * shape.hidden * (act + 4)
    head = 2 * tokens * shape.hidden * act + loss  # the final hidden states and their gradient, the fused head's tiles
    train_knobs = ("train.batch_size", "model.load_in_4bit", "train.optimizer", "train.lora_r", "model.max_seq_length")
    needs = []
    if setup.gpu:
        weights = weight_bytes(shape, setup, setup.train_4bit)
        biggest = max(a * b for a, b in shape.linears().values())
        if setup.backend == "unsloth" and shape.model_type in UNSLOTH_FAST:
            activations = tokens * unsloth_fast_bytes(shape, act)
            dequant = 2 * biggest * setup.weight_bytes if setup.train_4bit else 0  # fast_dequantize's buffers
        else:
            saved, backward = layer_bytes(shape, act, cast)
            # transformers keeps each layer's input for the recompute; Unsloth offloads them to pinned RAM and keeps
            # the last layer's input and two staging buffers on the GPU.
            checkpoints = (3 if setup.backend == "unsloth" else shape.layers) * tokens * shape.hidden * act
            activations = tokens * (saved + backward) + checkpoints
            dequant = biggest * setup.weight_bytes if setup.train_4bit else 0  # bitsandbytes dequantizes one weight per matmul
        tensors = weights + lora + activations + head + dequant
        needs.append(
            Need(
                "02",
                "train",
                "GPU",
                _gpu_total(tensors, weights),
                _parts(weights=weights, LoRA_and_optimizer=lora, activations=activations + head + dequant, overhead=_gpu_total(tensors, weights) - tensors),
                train_knobs,
                tensors,
            )
        )
        pinned = shape.layers * tokens * shape.hidden * act if setup.backend == "unsloth" else 0  # offloaded checkpoints
        ram = PROCESS_RAM["cuda"] + pinned + shape.largest_tensor * shape.checkpoint_bytes
        needs.append(
            Need("02", "train", "RAM", ram, _parts(process=PROCESS_RAM["cuda"], offloaded_checkpoints=pinned), ("train.batch_size", "model.max_seq_length"))
        )
    else:
        weights = shape.params * setup.weight_bytes
        saved, backward = layer_bytes(shape, act, cast)
        activations = tokens * (shape.layers * saved + backward)  # no gradient checkpointing on a CPU (train.py)
        ram = PROCESS_RAM["cpu"] + weights + lora + activations + head
        needs.append(
            Need(
                "02",
                "train",
                "RAM",
                ram,
                _parts(process=PROCESS_RAM["cpu"], weights=weights, LoRA_and_optimizer=lora, activations=activations + head),
                ("train.batch_size", "model.max_seq_length", "train.lora_r"),
            )
        )
    # the merge runs once the trainer is released: the saved adapter is all of training it holds
    needs.append(Need("02", "merge", "RAM", merge_ram(shape, setup, n_lora * lora_b), merge_parts(shape, setup)))
    return needs


def merged_bytes(shape: Shape, setup: Setup) -> float:
    """02's merged model on disk: the base model's weights plus the adapter, in the run's dtype (16-bit on a GPU, also
    for a 4-bit base, which is merged from its 16-bit original)."""
    return shape.params * (2.0 if setup.gpu else setup.weight_bytes)


def merge_ram(shape: Shape, setup: Setup, lora: float = 0.0) -> float:
    """Peak RAM of 02's merge (tunebook.models.merge, after the trained model is released): the process, about two output
    shards, the adapter, and one tensor's float32 delta."""
    from tunebook.models.merge import MAX_SHARD_BYTES

    process = PROCESS_RAM["cuda" if setup.gpu else "cpu"]
    return process + min(MERGE_SHARDS_HELD * MAX_SHARD_BYTES, merged_bytes(shape, setup)) + lora + shape.largest_tensor * 4


def merge_parts(shape: Shape, setup: Setup) -> str:
    from tunebook.models.merge import MAX_SHARD_BYTES

    return f"shard by shard: about {MERGE_SHARDS_HELD} shards of {_gib(MAX_SHARD_BYTES)} GiB held, of {_gib(merged_bytes(shape, setup))} GiB merged"


def quantize_needs(p: Params, shape: Shape, setup: Setup, lengths: Lengths) -> list[Need]:
    """03: each method's own peak."""
    needs = []
    sixteen = shape.params * (2.0 if setup.gpu else setup.weight_bytes)
    largest = shape.largest_tensor * 2
    other = shape.other_params * (2.0 if setup.gpu else setup.weight_bytes)
    process = PROCESS_RAM["cuda" if setup.gpu else "cpu"]
    drop = ("quantize.methods",)
    for method in p.quantize.methods:
        if method.startswith("gguf"):
            ram = PROCESS_RAM["cpu"] + GGUF_PROCESS + shape.largest_tensor * GGUF_BYTES_PER_PARAM
            needs.append(Need("03", method, "RAM", ram, "llama.cpp converts and quantizes one tensor at a time", drop))
            continue
        if method.startswith("bnb") and not setup.gpu:
            continue  # skipped on a CPU (bitsandbytes needs a GPU)
        if method == "int8_weight_only" or method == "bnb_int8":
            weights = shape.linear_params * 1.0 + other
        elif method == "bnb_nf4":
            weights = shape.linear_params * NF4_BYTES + other
        else:  # gptq / awq: the 16-bit model, one layer's Hessians (in x in, float32) and one sample's activations
            hessians = 4 * (3 * shape.hidden**2 + shape.q_dim**2 + 2 * shape.hidden**2 + shape.intermediate**2)
            sample = lengths.train * (3 * shape.intermediate + 3 * shape.hidden) * 2
            cache = p.quantize.calibration_examples * lengths.train * shape.hidden * 2  # llm-compressor's intermediates, on the CPU
            if setup.gpu:
                needs.append(Need("03", method, "GPU", _gpu_total(sixteen + hessians + sample, sixteen), _parts(weights=sixteen, Hessians=hessians), drop))
                needs.append(Need("03", method, "RAM", process + cache, _parts(process=process, calibration_cache=cache), ("quantize.calibration_examples",)))
            else:
                needs.append(
                    Need("03", method, "RAM", process + sixteen + hessians + sample + cache, _parts(weights=sixteen, calibration=cache + hessians), drop)
                )
            continue
        if setup.gpu:
            # loaded in 16-bit a tensor at a time and quantized on the GPU; saved from there (safetensors: one shard)
            needs.append(Need("03", method, "GPU", _gpu_total(weights + largest, weights), _parts(weights=weights), drop))
            saved = weights if method.startswith("bnb") else largest  # torch's pickling (int8_weight_only) goes tensor by tensor
            needs.append(Need("03", method, "RAM", process + saved, _parts(process=process, saving=saved), drop))
        else:
            needs.append(Need("03", method, "RAM", process + weights + largest, _parts(weights=weights), drop))
    return needs


def evaluate_needs(p: Params, shape: Shape, setup: Setup, lengths: Lengths) -> list[Need]:
    """04: each model it scores, generating evaluate.batch_size prompts at a time."""
    needs = []
    models = [m for m in p.evaluate.models if m != "quantized"]
    if "quantized" in p.evaluate.models:
        models += [m for m in p.quantize.methods if not (m.startswith("bnb") and not setup.gpu)]
    for model in models:
        needs.append(eval_need(p, shape, setup, lengths, model))
    return needs


def eval_need(p: Params, shape: Shape, setup: Setup, lengths: Lengths, model: str) -> Need:
    batch, prompt, new = p.evaluate.batch_size, lengths.prompt, lengths.new_tokens
    act = setup.act_bytes
    if model.startswith("gguf"):  # llama.cpp on the CPU, one prompt at a time (the pip build has no GPU)
        bits = 8.5 if model == "gguf_q8_0" else 4.85
        file = shape.params * bits / 8
        context = shape.kv_bytes(1, p.model.max_seq_length + new, 2) + 512 * shape.vocab * 4  # KV cache, logits buffer
        return Need("04", model, "RAM", PROCESS_RAM["cpu"] + file + context, _parts(model_file=file, KV_cache_and_buffers=context), ("quantize.methods",))
    full_precision = model in ("base", "finetuned")
    prequantized = shape.prequantized if model == "base" else (model == "finetuned" and setup.backend == "hf" and setup.train_4bit)
    four_bit = setup.gpu and ((full_precision and (p.evaluate.load_in_4bit or prequantized)) or model in ("bnb_nf4", "gptq_w4a16", "awq_w4a16"))
    if model in ("int8_weight_only", "bnb_int8"):
        weights = shape.linear_params * 1.0 + shape.other_params * setup.weight_bytes
    else:
        weights = weight_bytes(shape, setup, four_bit)
    unsloth = full_precision and setup.gpu and p.evaluate.backend == "unsloth"
    if unsloth:  # the prefill's KV tuples and Unsloth's decode buffers, grown in steps of 512 tokens
        kv = shape.kv_bytes(batch, prompt, act) + shape.kv_bytes(batch, prompt + 1 + UNSLOTH_KV_INCREMENT, act)
    else:  # transformers' static cache, sized for the prompt and every new token
        kv = shape.kv_bytes(batch, prompt + new, act)
    tokens = batch * prompt
    # The prefill's largest moment: gate, act(gate) and up of the MLP alive at once, the hidden states and residual, and
    # the attention mask (boolean, and additive in the compute dtype inside SDPA); then the next-token logits.
    prefill = tokens * (3 * shape.intermediate + 3 * shape.hidden) * act + tokens * (prompt + new) * (1 + act) + batch * shape.vocab * (4 + act)
    dequant = max(a * b for a, b in shape.linears().values()) * setup.weight_bytes if four_bit else 0
    tensors = weights + kv + prefill + dequant
    knobs = ("evaluate.batch_size",) + (("evaluate.load_in_4bit",) if full_precision else ("quantize.methods",))
    if not setup.gpu:
        ram = PROCESS_RAM["cpu"] + tensors
        return Need("04", model, "RAM", ram, _parts(weights=weights, KV_cache=kv, prefill=prefill), knobs)
    return Need(
        "04",
        model,
        "GPU",
        _gpu_total(tensors, weights),
        _parts(weights=weights, KV_cache=kv, prefill=prefill + dequant, overhead=_gpu_total(tensors, weights) - tensors),
        knobs,
        tensors,
    )


def storage_needs(p: Params, shape: Shape, setup: Setup, stages) -> list[Need]:
    """The run's files at their peak on the local disk where the weights go, and on Drive when colab.drive_dir keeps
    the run there (Colab): the dataset and reports, the adapter and checkpoints; the base model's download, the merged
    model and 03's copies stay on the local disk unless colab.weights_to_drive."""
    files = disk_items(p, shape, setup, stages)
    drive_on = bool(p.colab.drive_dir) and setup.machine.drive is not None
    on_drive = {"data, predictions, reports", "adapter", "checkpoints"} | ({"merged", "quantized_copies"} if p.colab.weights_to_drive else set())
    local = {k: v for k, v in files.items() if not (drive_on and k in on_drive) and k != "data, predictions, reports"}
    needs = []
    if local:
        needs.append(Need("02-03", "run files", "disk", sum(local.values()), _parts(**local), ("quantize.methods",)))
    if drive_on:
        kept = {k: v for k, v in files.items() if k in on_drive}
        knobs = ("train.save_total_limit", "colab.weights_to_drive", "train.lora_r", "colab.drive_dir")
        needs.append(Need("01-05", "run files", "Drive", sum(kept.values()), _parts(**kept), knobs))
    return needs


def disk_items(p: Params, shape: Shape, setup: Setup, stages) -> dict[str, float]:
    """What the run writes, by kind (bytes at its peak)."""
    items: dict[str, float] = {}
    later = set(stages)
    from tunebook.models.load import HUB_ID

    name = p.model.name
    if HUB_ID.match(name) and not Path(name).is_dir() and later & {"02_finetune", "03_quantize", "04_evaluate"}:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "model.safetensors.index.json"), str) and not isinstance(
            try_to_load_from_cache(name, "model.safetensors"), str
        ):
            kept = shape.skipped_params
            items["download"] = (
                (shape.linear_params - kept) * NF4_BYTES + (kept + shape.other_params) * 2 if shape.prequantized else shape.params * shape.checkpoint_bytes
            )
    data = [Path(f) for f in (p.data.train_path, p.data.eval_path) if f and Path(f).is_file()]
    items["data, predictions, reports"] = DRIVE_DATA_COPIES * sum(f.stat().st_size for f in data) + DRIVE_EXTRA
    if "02_finetune" in later:
        n_lora = lora_params(shape, p.train.lora_r, p.train.target_modules)
        lora_b = 2.0 if (setup.backend == "hf" and setup.train_4bit) else 4.0
        states = 2.0 if p.train.optimizer != "adamw_torch" else 2 * lora_b
        items["checkpoints"] = (p.train.save_total_limit + 1) * n_lora * (lora_b + states)  # one more while the oldest goes
        items["adapter"] = n_lora * lora_b
        if shape.prequantized:  # merged from the 16-bit original (tunebook.models.merge), downloaded for it
            items["16-bit original"] = shape.params * 2.0
        items["merged"] = merged_bytes(shape, setup)
    if "03_quantize" in later:
        sixteen = shape.params * 2.0
        items["quantized_copies"] = sum(QUANTIZE_METHODS[m].disk_share for m in p.quantize.methods) * sixteen
    return items


# ---------------------------------------------------------------------------------------------------- against limits
@dataclass(frozen=True)
class Row:
    need: Need
    limit: float | None
    verdict: str  # fits, tight, does not fit
    fix: str = ""


@dataclass
class FitReport:
    machine: Machine
    shape: Shape | None
    setup: Setup | None
    lengths: Lengths | None
    rows: list[Row] = field(default_factory=list)
    unknown: str | None = None  # why nothing could be predicted

    @property
    def problems(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "does not fit"]

    @property
    def warnings(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "tight"]

    def table(self) -> str:
        from tabulate import tabulate

        if self.unknown:
            return f"Fit on {self.machine.name}: not predicted ({self.unknown})."
        rows = [
            (r.need.stage, r.need.what, r.need.resource, _gib(r.need.bytes), "" if r.limit is None else _gib(r.limit), r.verdict, r.fix or r.need.parts)
            for r in self.rows
        ]
        return f"{self.heading()}\n" + tabulate(
            rows, headers=["stage", "what", "on", "GiB", "limit GiB", "verdict", "fix, or how it adds up"], tablefmt="github", disable_numparse=True
        )

    def heading(self) -> str:
        m, s, st = self.machine, self.shape, self.setup
        where = f"{m.gpu_name} ({_gib(m.gpu)} GiB)" if m.gpu else "no GPU"
        return (
            f"Fit on {m.name}: {where}, {_gib(m.ram)} GiB RAM, {_gib(m.disk)} GiB disk"
            + (f", {_gib(m.drive)} GiB Drive" if m.drive is not None else "")
            + f". {s.name} ({s.params / 1e9:.2f}B parameters, config from {s.source}), backend {st.backend}, {st.dtype}"
            + (", 4-bit" if st.train_4bit else "")
            + f"; {self.lengths.source}."
        )

    def summary(self) -> str:
        """One line: the tightest figures, or what does not fit and the fix."""
        if self.unknown:
            return f"not predicted: {self.unknown}"
        bad = self.problems or self.warnings
        if bad:
            return "; ".join(
                f"{r.need.stage} {r.need.what} {r.need.resource} {_gib(r.need.bytes)} of {_gib(r.limit)} GiB" + (f" ({r.fix})" if r.fix else "") for r in bad
            )
        shown = sorted((r for r in self.rows if r.limit), key=lambda r: -r.need.bytes / r.limit)[:2]
        return "fits: " + "; ".join(f"{r.need.stage} {r.need.what} {r.need.resource} {_gib(r.need.bytes)} of {_gib(r.limit)} GiB" for r in shown)


def limit_of(machine: Machine, resource: str) -> float | None:
    return {"GPU": machine.gpu, "RAM": machine.ram, "disk": machine.disk, "Drive": machine.drive}[resource]


def check_fit(p: Params, stages, machine: Machine, lengths: Lengths | None = None, shape: Shape | None = None) -> FitReport:
    """The predictions of the stages to run against the machine's limits, with a fix for each figure that does not fit."""
    stages = [s for s in stages if s in STAGES]
    try:
        shape = shape or model_shape(p.model.name)
    except FitUnknown as e:
        return FitReport(machine, None, None, None, unknown=str(e))
    # 01's measured rows, unless 01 is about to run again (with params that may differ from those it ran with)
    lengths = lengths or (None if "01_build_dataset" in stages else measured_lengths(p)) or bound_lengths(p)
    report = FitReport(machine, shape, setup_for(p, shape, machine), lengths)
    for need in predict(p, shape, machine, stages, lengths):
        limit = limit_of(machine, need.resource)
        if limit is None:
            continue
        if need.bytes > limit:
            report.rows.append(Row(need, limit, "does not fit", find_fix(p, shape, machine, stages, lengths, need, limit)))
        elif need.bytes > (1 - WARN_WITHIN) * limit:
            report.rows.append(Row(need, limit, "tight", f"within {WARN_WITHIN:.0%} of the limit; " + need.parts))
        else:
            report.rows.append(Row(need, limit, "fits"))
    return report


def find_fix(p: Params, shape: Shape, machine: Machine, stages, lengths: Lengths, need: Need, limit: float) -> str:
    """The first knob, in the need's order, whose values (searched with the same predictor) bring it under the limit
    with room to spare (below the warning line), else just under it."""
    for ceiling in ((1 - WARN_WITHIN) * limit, limit):
        for knob in need.knobs:
            for value, extra in candidates(p, knob):
                try:
                    changed = with_values(p, {knob: value, **extra})
                except (ValueError, TunebookError):
                    continue
                shorter = replace(lengths, train=min(lengths.train, value), prompt=min(lengths.prompt, value)) if knob == "model.max_seq_length" else lengths
                again = {n.key: n for n in predict(changed, shape, machine, stages, shorter)}.get(need.key)
                if again is None or again.bytes <= ceiling:
                    fits = f": nothing goes to {need.resource}" if again is None else f" fits in {_gib(again.bytes)} GiB"
                    also = "".join(f", {k} {_value(p, k)} → {_shown(v)}" for k, v in extra.items())
                    return f"{knob} {_value(p, knob)} → {_shown(value)}{also}{fits}"
    if need.knobs == ("quantize.methods",) or need.stage == "03":
        return f"leave {need.what} out of quantize.methods, or use a larger machine"
    return "no knob of these params makes it fit: a larger machine" + (" (more RAM)" if need.resource == "RAM" else "") + ", or a smaller model"


def _value(p: Params, key: str):
    node = p
    for part in key.split("."):
        node = getattr(node, part)
    return _shown(node)


def _shown(value) -> str:
    if value is None:
        return "empty"
    return str(value).lower() if isinstance(value, bool) else str(value) if not isinstance(value, list) else "[" + ", ".join(value) + "]"


def candidates(p: Params, knob: str):
    """(value, other keys set with it) to try for a knob, most useful first."""
    if knob == "train.batch_size":
        b, ga = p.train.batch_size, p.train.grad_accum
        while b > 1:
            b //= 2
            yield b, {"train.grad_accum": ga * p.train.batch_size // b}  # the same effective batch
    elif knob == "evaluate.batch_size":
        b = p.evaluate.batch_size
        while b > 1:
            b //= 2
            yield b, {}
    elif knob in ("model.load_in_4bit", "evaluate.load_in_4bit"):
        if not _value(p, knob) == "true":
            yield True, {}
    elif knob == "train.optimizer":
        if p.train.optimizer == "adamw_torch":
            yield "adamw_8bit", {}
    elif knob == "train.lora_r":
        r = p.train.lora_r
        while r > 8:
            r //= 2
            yield r, {"train.lora_alpha": max(1, p.train.lora_alpha * r // p.train.lora_r)}
    elif knob == "model.max_seq_length":
        n = p.model.max_seq_length
        while n > 256:
            n //= 2
            yield n, {}
    elif knob == "quantize.calibration_examples":
        n = p.quantize.calibration_examples
        while n > 16:
            n //= 2
            yield n, {}
    elif knob == "train.save_total_limit":
        n = p.train.save_total_limit
        while n > 1:
            n //= 2
            yield n, {}
    elif knob == "colab.weights_to_drive" and p.colab.weights_to_drive:
        yield False, {}
    elif knob == "colab.drive_dir" and p.colab.drive_dir:
        yield "", {}


def with_values(p: Params, values: dict) -> Params:
    """A copy of the params with dotted keys set (validated as the schema validates an assignment)."""
    changed = p.model_copy(deep=True)
    for key, value in values.items():
        *path, last = key.split(".")
        node = changed
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return changed


# ---------------------------------------------------------------------------------------------------- entry points
def fit_command(p: Params, stages, machine_name: str | None) -> int:
    """`check PARAMS [--machine NAME]`: the fit table for that machine (this one by default); what does not fit stops
    with its fix."""
    machine = machine_named(machine_name, p.output_dir)
    report = check_fit(p, stages, machine)
    print(report.table())
    if report.problems:
        raise TunebookError(f"{len(report.problems)} figure(s) do not fit {machine.name}: {report.summary()}")
    return 0


def fit_here(p: Params, stages) -> str | tuple[str, str]:
    """The preflight's check on this machine: GPU memory, RAM, the local disk where the weights go and, on Colab,
    Drive. Problems raise (the table printed first), figures within 10% of a limit warn, and a model whose config cannot
    be read here is a warning."""
    report = check_fit(p, stages, this_machine(str(p.weights_dir)))
    if report.unknown:
        return "warning", f"not predicted: {report.unknown}"
    if report.problems or report.warnings:
        print(report.table())
    if report.problems:
        raise TunebookError(f"will not fit this machine ({report.machine.gpu_name or 'no GPU'}): {report.summary()}")
    if report.warnings:
        return "warning", report.summary()
    return report.summary()
