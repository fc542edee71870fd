"""Patches to third-party internals, in one place: what each one changes, the release it was written against, and what
keeps it from acting where it does not fit.

- `score_only_loss_positions`: TRL 1.16's `trl.trainer.utils._use_triton`, so that 02 on a CPU projects only the
  positions that carry a loss through the LM head, as TRL does on CUDA (bench/cpu_lm_head.py). Guard: it steps aside
  unless `_use_triton` exists and the module's source uses it once, for that choice (another TRL keeps its behaviour).
- `use_grouped_query_sdpa`: an attention registered with transformers (`AttentionInterface`), so that 04 on a GPU hands
  grouped-query heads to SDPA as they are. Guard: models/load.py uses it only on CUDA, for a model that loaded with
  transformers' own SDPA attention (`config._attn_implementation == "sdpa"`).
- `keep_file_pipeline` (with `file_tokenizer_class` and the module's `__getattr__`, where pickle finds that class):
  transformers 5's `LlamaTokenizer(Fast)` replaces a byte-level BPE `tokenizer.json` pipeline and loses every space
  (transformers issues 45488 and 48206); such a tokenizer is loaded as its file has it. Guard: it acts only when the
  loaded tokenizer fails the round-trip probe (models/tokenizer_check.py) and the file's own pipeline passes it, so a
  transformers that fixes the class switches it off.
- `skip_memory_pinning`: llm-compressor 0.14's `IntermediatesCache.pin_memory`, which raises on a torch without an
  accelerator (03's GPTQ / AWQ on a CPU). Guard: quantizing/quantize.py calls it only without CUDA.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tunebook.models.tokenizer_check import PROBE, reproduces


def score_only_loss_positions() -> None:
    """Have TRL's fused LM head project only the positions that carry a loss on a CPU too, as it does on CUDA.

    TRL 1.16 projects only those positions where it has Triton (CUDA, XPU) and every position elsewhere, so that
    Neuron's compiler sees one shape. On a CPU that sends the whole prompt (99% of the default run's tokens) through
    the 49k-word head and back for nothing: the default run's train steps took 1.5x as long (bench/cpu_lm_head.py).
    The loss and the gradients are the same. Done only where that choice is the module's one use of `_use_triton`,
    so another TRL keeps its own behaviour rather than being sent to Triton kernels on a CPU."""
    import inspect

    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None or hasattr(decide, "wrapped"):  # not there, or done already
        return
    source = inspect.getsource(trl_utils)
    if source.count("_use_triton(") != 1 or "compact = _use_triton(" not in source:
        return

    def compact_on_cpu_too(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact_on_cpu_too.wrapped = decide
    trl_utils._use_triton = compact_on_cpu_too


def use_grouped_query_sdpa(model) -> None:
    """Switch the model to an inference attention for transformers: its SDPA attention, except that grouped-query heads (8 key/value
    heads for 32 query heads in Llama-3-8B) go to the kernel as they are (`enable_gqa`). transformers copies them
    out to one per query head whenever a padding mask is present, i.e. in every left-padded batch; skipping that
    copy made batched evaluation of an 8B model 1.45x faster on an H200 (bench/eval_throughput.py)."""
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        causal = attention_mask is None and query.shape[2] > 1
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("sdpa_gqa", sdpa_gqa)
    AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)
    model.set_attn_implementation("sdpa_gqa")


@functools.cache
def file_tokenizer_class() -> type:
    """The class of a tokenizer loaded from its tokenizer.json pipeline as is: transformers' TokenizersBackend, named
    so that save_pretrained writes `"tokenizer_class": "PreTrainedTokenizerFast"`, which transformers 4 and 5 both load
    from tokenizer.json unchanged (5 would write "TokenizersBackend", unknown to 4.x serving engines). Made on first
    use, so that importing this module does not import transformers."""
    from transformers import TokenizersBackend

    return type("PreTrainedTokenizerFast", (TokenizersBackend,), {"__module__": __name__, "__doc__": file_tokenizer_class.__doc__})


def __getattr__(name: str):
    if name == "PreTrainedTokenizerFast":  # where pickle (datasets' fingerprints, TRL's map) looks the class up
        return file_tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tokenizer_file(source: str) -> Path | None:
    """The tokenizer.json a tokenizer was loaded from: in its folder, or in the local hub cache (no download)."""
    folder = Path(source)
    if folder.is_dir():
        return folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "tokenizer.json")
    return Path(cached) if isinstance(cached, str) else None


def _has_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    children = component.get("pretokenizers") or component.get("decoders") or []
    return any(_has_byte_level(c) for c in children)


def keep_file_pipeline(tokenizer):
    """The tokenizer as loaded, or, where its class replaced a byte-level tokenizer.json pipeline that round-trips,
    that pipeline as the file has it, with the loaded tokenizer's special and added tokens, chat template and padding
    side kept. Said in one line."""
    if isinstance(tokenizer, file_tokenizer_class()) or reproduces(tokenizer, PROBE):
        return tokenizer  # the installed transformers keeps the file's pipeline: nothing to do
    path = tokenizer_file(tokenizer.name_or_path or "")
    if path is None:
        return tokenizer
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not (_has_byte_level(spec.get("pre_tokenizer")) and _has_byte_level(spec.get("decoder"))):
        return tokenizer
    kept = file_tokenizer_class().from_pretrained(str(path.parent), chat_template=tokenizer.chat_template)
    if not reproduces(kept, PROBE):
        return tokenizer  # the file itself does not round-trip: 01's check says so
    vocab = kept.get_vocab()
    missing = [t for t in tokenizer.added_tokens_decoder.values() if t.content not in vocab]
    if missing:
        kept.add_tokens(missing)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(kept, name, value)
    kept.padding_side = tokenizer.padding_side
    kept.model_max_length = tokenizer.model_max_length
    print(
        f"Tokenizer: {type(tokenizer).__name__} replaced the byte-level pipeline of {path} and lost its spaces "
        "(transformers issue 45488); loading tokenizer.json as is, and saving it that way with the model."
    )
    return kept


def skip_memory_pinning() -> None:
    """llm-compressor 0.14 pins cached activations for faster GPU transfers, and pinning raises on a torch without
    an accelerator (AWQ's smoothing step). Pinning is only a speed-up, so on CPU it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
