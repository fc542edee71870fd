"""Stage 03: quantized copies of the merged fine-tuned model, each with its bits, size on disk and time.

Methods (`quantize.methods`):
- int8_weight_only: torchao int8 weight-only through transformers' TorchAoConfig (CPU and GPU).
- gguf_q8_0, gguf_q4_k_m: llama.cpp's own converter (convert_hf_to_gguf.py) writes an f16 GGUF, and llama.cpp's
  quantizer (llama_model_quantize, through llama-cpp-python) makes the copy; 04 scores it with llama-cpp-python.
  The converter comes from llama-cpp-python's source distribution on PyPI, which carries llama.cpp: it is
  fetched once into the cache, so no git clone or download from GitHub is needed (Unsloth's
  save_pretrained_gguf clones llama.cpp, which fails offline and behind many firewalls). Beside each GGUF copy goes
  an Ollama Modelfile (`quantized/<copy>.Modelfile`, tunebook.quantizing.ollama).
- bnb_nf4, bnb_int8: bitsandbytes 4-bit NF4 with double quantization, or LLM.int8(), applied as the merged model
  loads and saved (CUDA GPU).
- gptq_w4a16, awq_w4a16: 4-bit weights in groups of `quantize.group_size`, calibrated by llm-compressor on
  training rows (prompt + answer), saved in the compressed-tensors format that transformers loads.
A method that cannot run here is listed as skipped with the reason, never dropped silently.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tunebook.colab.runtime import prepare_stage
from tunebook.errors import TunebookError
from tunebook.models.load import dir_size_mb, saved_bits
from tunebook.models.merge import merged_model
from tunebook.params.schema import QUANTIZE_METHODS
from tunebook.quantizing.ollama import write_modelfile
from tunebook.run.files import build_once, fresh_tmp_dir, replace_dir
from tunebook.run.folder import Run
from tunebook.run.outputs import QuantizedCopy, QuantizeOutputs


class Skipped(Exception):
    """This method cannot run here; the message says why (and what would make it run)."""


def quantize(run: Run) -> list[QuantizedCopy]:
    # In the run's weights folder: the run folder, or on Colab with the run on Drive this runtime's own disk.
    folder = run.params.weights_dir / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / F16_GGUF
    f16.unlink(missing_ok=True)  # a leftover of an interrupted run may belong to an older fine-tuned model
    prepare_stage(run.params, "03_quantize")
    with run.stage("03_quantize") as outputs:
        merged_dir = str(merged_model(run))  # rebuilt from the base model and the adapter where 02 ran elsewhere
        variants = []
        if not run.params.quantize.methods:
            print("quantize.methods is empty: no copies to make (04 scores the base and fine-tuned models).")
        for method in run.params.quantize.methods:
            bits, fmt = QUANTIZE_METHODS[method].bits, QUANTIZE_METHODS[method].format
            target = folder / (f"{method}.gguf" if fmt == "gguf" else method)
            started = time.time()
            try:
                QUANTIZERS[method](run, merged_dir, target)
            except Skipped as e:
                variants.append(QuantizedCopy(name=method, method=method, bits=bits, format=fmt, status="skipped", reason=str(e)))
                print(f"{method}: skipped ({e})")
                continue
            except Exception as e:  # one method failing must not lose the others: recorded, shown, and 04 skips it
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                variants.append(QuantizedCopy(name=method, method=method, bits=bits, format=fmt, status="failed", reason=reason))
                print(f"{method}: FAILED ({reason})")
                continue
            variants.append(
                QuantizedCopy(
                    name=method,
                    method=method,
                    bits=bits,
                    format=fmt,
                    status="ok",
                    path=str(target),
                    size_mb=dir_size_mb(target),
                    seconds=round(time.time() - started, 1),
                )
            )
            print(f"{method}: {variants[-1].size_mb} MB in {variants[-1].seconds} s")
        f16.unlink(missing_ok=True)  # the GGUF copies' shared 16-bit intermediate is not kept
        outputs.update(QuantizeOutputs(variants=variants).as_json())
    return variants


def copy_on_disk(run: Run, variant: QuantizedCopy) -> str:
    """A copy 03 made, on this machine's disk: where 03 put it, or made again (same method, same merged model) in the
    run's weights folder where 03 ran elsewhere (a fresh Colab runtime keeps only what is on Drive)."""
    if Path(variant.path).exists():
        return variant.path
    folder = run.params.weights_dir / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(variant.path).name
    print(f"{variant.name}: 03 made it on another machine's disk ({variant.path}); making it again here, in {target}.", flush=True)
    QUANTIZERS[variant.method](run, str(merged_model(run)), target)
    (folder / F16_GGUF).unlink(missing_ok=True)
    return str(target)


# ----------------------------------------------------------------------------------------------- torchao
def _int8_weight_only(run: Run, merged_dir: str, target: Path) -> None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:
        raise Skipped(f"torchao is not installed ({e}); pip install torchao") from None
    from transformers import TorchAoConfig

    from tunebook.models.load import load_for_inference

    model, tokenizer = load_for_inference(
        merged_dir,
        dtype=run.params.model.dtype,  # the layers torchao leaves unquantized (embeddings, norms) keep the run's dtype
        quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
        enable_thinking=run.params.model.enable_thinking,
    )
    tmp = fresh_tmp_dir(target)
    # torchao tensors are tensor subclasses that safetensors cannot hold; they save as a torch pickle.
    model.save_pretrained(str(tmp), safe_serialization=False)
    tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, target)


# ----------------------------------------------------------------------------------------------- bitsandbytes
def _bnb(load_in_4bit: bool):
    def quantize_bnb(run: Run, merged_dir: str, target: Path) -> None:
        from tunebook.models.load import has_cuda, load_for_inference, model_type, nf4_config

        if not has_cuda():
            raise Skipped("bitsandbytes quantization needs a CUDA GPU (the CPU install has no bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise Skipped(f"bitsandbytes is not installed ({e}); pip install bitsandbytes") from None
        if load_in_4bit:
            config = nf4_config(run.params.model.dtype, model_type(merged_dir))
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        model, tokenizer = load_for_inference(
            merged_dir, dtype=run.params.model.dtype, quantization_config=config, enable_thinking=run.params.model.enable_thinking
        )
        tmp = fresh_tmp_dir(target)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, target)

    return quantize_bnb


# ----------------------------------------------------------------------------------------------- llm-compressor
def _llm_compressor(algorithm: str):
    def quantize_w4a16(run: Run, merged_dir: str, target: Path) -> None:
        try:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
            from llmcompressor import oneshot
            from llmcompressor.modifiers.awq import AWQModifier
            from llmcompressor.modifiers.quantization import GPTQModifier
        except ImportError as e:
            raise Skipped(f"llm-compressor is not installed ({e}); pip install llmcompressor") from None
        from transformers import AutoModelForCausalLM

        from tunebook.models.load import has_cuda, load_tokenizer, model_type, pick_dtype
        from tunebook.models.patches import skip_memory_pinning

        p = run.params
        model = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=pick_dtype(p.model.dtype, model_type(merged_dir)), device_map="auto" if has_cuda() else None
        )
        _check_group_size(model, p.quantize.group_size)
        tokenizer = load_tokenizer(merged_dir, enable_thinking=p.model.enable_thinking)
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=algorithm == "gptq", strategy="group", group_size=p.quantize.group_size)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        modifier = GPTQModifier if algorithm == "gptq" else AWQModifier
        calibration = calibration_set(run, tokenizer)
        if not has_cuda():
            skip_memory_pinning()
        # The tokenizer as processor: llm-compressor would otherwise load the model's AutoProcessor, which for Gemma 3
        # is a multimodal processor a text-only copy cannot build.
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration,
            recipe=modifier(config_groups=groups, ignore=["lm_head"]),
            max_seq_length=p.model.max_seq_length,
            num_calibration_samples=len(calibration),
        )
        tmp = fresh_tmp_dir(target)
        model.save_pretrained(str(tmp), save_compressed=True)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, target)

    return quantize_w4a16


def calibration_set(run: Run, tokenizer):
    """Tokenized training rows (chat-formatted prompt + answer): calibration on the task's own text, which the
    reference write-up found helps GPTQ."""
    from datasets import Dataset

    from tunebook.dataset.build import load_split

    rows = load_split(run, "train")[: run.params.quantize.calibration_examples]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=run.params.model.max_seq_length)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def _check_group_size(model, group_size: int) -> None:
    import torch

    widths = sorted({m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")})
    uneven = [w for w in widths if w % group_size]
    if uneven:
        fits = [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)]
        raise Skipped(
            f"quantize.group_size {group_size} does not divide the layer widths {uneven}; set quantize.group_size: {fits[0] if fits else 'a divisor of ' + str(widths)}"
        )


# ----------------------------------------------------------------------------------------------- llama.cpp
F16_GGUF = "model.f16.gguf"
GGUF_TYPES = {"gguf_q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "gguf_q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _gguf(method: str):
    def quantize_gguf(run: Run, merged_dir: str, target: Path) -> None:
        try:
            import llama_cpp
        except ImportError as e:
            raise Skipped(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python") from None
        f16 = target.with_name(F16_GGUF)
        if not f16.exists():  # made once per 03 run, shared by the GGUF methods
            write_f16_gguf(merged_dir, f16)
            try:
                check_gguf_stop(f16, merged_dir, run.params.model.enable_thinking)
            except TunebookError:
                f16.unlink()
                raise
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, GGUF_TYPES[method])
        tmp = target.with_name(target.name + ".tmp")
        # llama.cpp logs a few lines per tensor (over a thousand for SmolLM2) through llama-cpp-python's handler,
        # which prints to sys.stderr: kept here, and shown only when the quantization fails.
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            failed = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0
        if failed:
            raise TunebookError(f"llama.cpp could not quantize {f16} to {method}. Its last messages:\n" + "\n".join(log.getvalue().splitlines()[-20:]))
        tmp.replace(target)
        fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log.getvalue())
        if fallback:
            print(
                f"{method}: llama.cpp stored {fallback[1]} of {fallback[2]} tensors in a wider type (q5_0, q6_K or q8_0): "
                "k-quants need rows a multiple of 256 wide, so this copy is larger than its nominal bits per weight."
            )
        try:  # `ollama create -f quantized/<copy>.Modelfile` then works as it is; a Modelfile is no reason to lose the copy
            print(f"{method}: Ollama Modelfile {write_modelfile(run, target)}")
        except Exception as e:
            print(f"{method}: no Ollama Modelfile ({type(e).__name__}: {e}); `python -m tunebook card {run.dir}` tries again")

    return quantize_gguf


def write_f16_gguf(model_dir: str | Path, out: Path, converter: Path | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py (`converter`: this one, else the cached one), run on a Hugging Face model
    folder. It reads the model's tensors lazily, one at a time (bench/merge_ram.py measures its memory)."""
    converter = converter or llama_cpp_converter()
    tmp = out.with_name(out.name + ".tmp")
    result = subprocess.run([sys.executable, str(converter), str(model_dir), "--outfile", str(tmp), "--outtype", "f16"], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise TunebookError(f"llama.cpp's converter failed on {model_dir}: {last[0]}")
    tmp.replace(out)


def check_gguf_stop(gguf_file: Path, model_dir: str, enable_thinking: bool) -> None:
    """The GGUF's EOS (or EOT) must be the model's end-of-turn token, or llama.cpp and Ollama would not stop where the
    fine-tuned model was taught to."""
    from gguf import GGUFReader

    from tunebook.models.load import load_tokenizer

    end_of_turn = load_tokenizer(model_dir, enable_thinking=enable_thinking).eos_token_id  # prepare_tokenizer made it EOS
    fields = GGUFReader(gguf_file).fields
    written = {key: int(fields[key].parts[fields[key].data[0]][0]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in fields}
    if end_of_turn not in written.values():
        raise TunebookError(
            f"llama.cpp's converter wrote {written or 'no EOS'} into {gguf_file.name}, not the end-of-turn id {end_of_turn}: the copy would not stop."
        )


def llama_cpp_converter() -> Path:
    """convert_hf_to_gguf.py (with its conversion package and gguf-py) from the installed llama-cpp-python
    version's source distribution, unpacked once into the cache."""
    from tunebook.models.load import cache_dir

    version = importlib.metadata.version("llama_cpp_python")
    folder = cache_dir() / "llama.cpp" / version
    converter = folder / "convert_hf_to_gguf.py"
    if converter.exists():
        return converter
    print(f"Fetching llama.cpp's converter from the llama-cpp-python {version} source distribution (once) ...")
    with tempfile.TemporaryDirectory() as download:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", download],
            capture_output=True,
            text=True,
        )
        archives = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if fetched.returncode != 0 or not archives:
            raise Skipped(f"could not fetch the llama-cpp-python {version} source distribution from the package index ({fetched.stderr.strip()[-200:]})")
        prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with build_once(folder) as tmp, tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=members, filter="data")
    return converter


QUANTIZERS = {  # how each of config.QUANTIZE_METHODS is made (tests/test_structure.py: the same names)
    "int8_weight_only": _int8_weight_only,
    "gguf_q8_0": _gguf("gguf_q8_0"),
    "gguf_q4_k_m": _gguf("gguf_q4_k_m"),
    "bnb_nf4": _bnb(load_in_4bit=True),
    "bnb_int8": _bnb(load_in_4bit=False),
    "gptq_w4a16": _llm_compressor("gptq"),
    "awq_w4a16": _llm_compressor("awq"),
}


def size_table(run: Run) -> list[dict]:
    """Bits, size on disk and status of the base model, the merged fine-tuned model and every quantized variant."""
    from tunebook.models.load import local_folder

    rows = []
    base = local_folder(run.params.model.name)
    if base:
        rows.append({"model": "base", "bits": saved_bits(base), "size_mb": dir_size_mb(base), "status": "ok"})
    merged = merged_model(run, build=False)
    if merged:
        rows.append({"model": "finetuned", "bits": saved_bits(merged), "size_mb": dir_size_mb(merged), "status": "ok"})
    for v in run.outputs_of("03_quantize").variants:
        status = v.status if v.status == "ok" else f"{v.status}: {v.reason}"
        rows.append({"model": v.name, "bits": v.bits, "size_mb": v.size_mb, "seconds": v.seconds, "status": status})
    return rows
