"""The fit check (tunebook.checks.fit): a prediction checked against a calculation written out by hand and against the peak
the project measured for the same configuration, the refusal with the knob that makes a run fit, the warning within
10% of a limit, the preflight stopping a run that cannot fit before any model loads, and `check --machine` reading a
hub model's config.json alone (from a loopback hub that records what is asked of it)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from servers import JsonHandler, answering
from tunebook.checks.fit import GIB, MACHINES, Machine, check_fit, fit_here, model_shape, predict
from tunebook.checks.preflight import PreflightError, check_or_stop
from tunebook.cli import main
from tunebook.params.load import load_params
from tunebook.params.schema import STAGES

CONFIGS = ROOT / "bench" / "configs"
TRAIN = ["02_finetune"]


def config_folder(tmp_path: Path, config: str | dict, name: str = "model") -> Path:
    """A model folder holding a config.json and the embedded model's tokenizer files, and no weights."""
    from tunebook.models.load import resolve_model

    folder = tmp_path / name
    folder.mkdir()
    data = config if isinstance(config, dict) else json.loads((CONFIGS / f"{config}.json").read_text())
    (folder / "config.json").write_text(json.dumps(data))
    for file in Path(resolve_model("embedded:SmolLM2-135M-Instruct")).iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, folder / file.name)
    return folder


def test_training_prediction_for_colab_t4_on_a_t4_is_the_hand_calculation(tmp_path):
    """params/colab_t4.yaml (Llama-3.1-8B, pre-quantized 4-bit, QLoRA r64 on all linear layers, 8-bit AdamW, 4 rows x
    2 accumulation x 2,048 tokens) on a T4: Unsloth, float16."""
    folder = config_folder(tmp_path, "unsloth--Meta-Llama-3.1-8B-Instruct-bnb-4bit")
    p = load_params(ROOT / "params" / "colab_t4.yaml", [f"model.name={folder}"])
    h, i, layers, vocab, q, kv = 4096, 14336, 32, 128256, 4096, 1024
    # weights: the 7 linear layers of each decoder layer in NF4 (4 bits, an 8-bit absmax per 64, a float32 one per 256
    # absmaxes), the untied embeddings and LM head and the 65 RMSNorms in float16
    linear = layers * (h * q + h * kv + h * kv + q * h + 3 * h * i)
    weights = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (2 * vocab * h + (2 * layers + 1) * h) * 2
    # LoRA r64: r x (in + out) per layer; float32 adapter + float32 gradient + 8-bit AdamW's two one-byte moments
    lora = layers * 64 * ((h + q) + (h + kv) + (h + kv) + (q + h) + (h + i) + (h + i) + (i + h))
    assert lora == 167_772_160
    state = lora * (4 + 4 + 2)
    # activations: Unsloth's 42 bytes per token and hidden unit on this very model, for 4 x 2,048 tokens
    tokens = 4 * 2048
    activations = tokens * 42 * h
    dequant = 2 * (h * i) * 2  # two float16 buffers of the largest weight for the 4-bit matmuls
    # the fused LM head: the final hidden states and their gradient, tiles of (4 rows x 32 answer tokens) x 32,768 words
    head = 2 * tokens * h * 2 + 128 * 32768 * 4 + 128 * h * (2 + 4)
    tensors = weights + state + activations + head + dequant
    expected = tensors + 0.25 * (tensors - weights) + 0.5 * GIB  # the allocator's slack on all but the weights; CUDA context
    need = {n.key: n for n in predict(p, model_shape(str(folder)), MACHINES["colab-t4"], TRAIN)}[("02", "train", "GPU")]
    assert need.bytes == pytest.approx(expected, rel=1e-9)
    assert need.tensors == pytest.approx(tensors, rel=1e-9)
    # The project measured this configuration under a 14.5 GiB cap (bench/train_throughput.py, on an H200): the tensors
    # against torch's peak allocated, and the figure without the CUDA context against its peak reserved.
    measured = json.loads((ROOT / "bench" / "results" / "train_throughput.json").read_text())["cases"]["t4_llama3_8b_4bit"]
    assert abs(tensors / GIB / measured["peak_allocated_gb"] - 1) < 0.15
    assert abs((need.bytes - 0.5 * GIB) / GIB / measured["peak_gpu_memory_gb"] - 1) < 0.15


def test_check_machine_refuses_what_does_not_fit_and_names_the_knob_that_fits(tmp_path, capsys):
    folder = config_folder(tmp_path, "unsloth--Meta-Llama-3.1-8B-Instruct-bnb-4bit")
    params = ROOT / "params" / "colab_t4.yaml"
    settings = [f"model.name={folder}", "train.batch_size=32", "train.grad_accum=1"]
    assert main(["check", str(params), "--machine", "colab-t4", "--stages", "02", *sum((["--set", s] for s in settings), [])]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"\| 02 +\| train +\| GPU +\|", out) and "does not fit" in out
    # the fix names the knob, its value, and the grad_accum that keeps the batch; the predictor agrees it fits there
    # and that the halving before it does not
    assert "train.batch_size 32 → 8, train.grad_accum 1 → 4 fits in" in err
    p = load_params(params, settings)
    t4 = MACHINES["colab-t4"]

    def train_gpu(batch: int) -> float:
        changed = load_params(params, [*settings, f"train.batch_size={batch}"])
        return {n.key: n for n in predict(changed, model_shape(str(folder)), t4, TRAIN)}[("02", "train", "GPU")].bytes

    assert train_gpu(8) <= t4.gpu < train_gpu(16) < train_gpu(p.train.batch_size)


def test_a_figure_within_ten_percent_of_its_limit_is_a_warning_and_over_it_a_problem(tmp_path):
    folder = config_folder(tmp_path, "unsloth--Llama-3.2-3B-Instruct")
    p = load_params(ROOT / "params" / "colab_l4.yaml", [f"model.name={folder}"])
    l4 = MACHINES["colab-l4"]
    need = check_fit(p, ["04_evaluate"], l4).rows[0].need
    assert (need.stage, need.what, need.resource) == ("04", "base", "GPU")
    tight = Machine("a GPU 5% larger than the need", "test GPU", need.bytes / 0.95, True, l4.ram, l4.disk, None, 12)
    report = check_fit(p, ["04_evaluate"], tight)
    assert report.rows[0].verdict == "tight" and report.warnings and not report.problems
    assert "within 10% of the limit" in report.rows[0].fix
    small = Machine("a GPU 5% smaller than the need", "test GPU", need.bytes * 0.95, True, l4.ram, l4.disk, None, 12)
    report = check_fit(p, ["04_evaluate"], small)
    assert report.rows[0].verdict == "does not fit" and report.rows[0].fix.startswith("evaluate.batch_size 16 → 8 fits in")


def test_the_preflight_stops_a_run_that_cannot_fit_this_machine_before_any_model_loads(tmp_path, capsys):
    """A model folder with a config and no weights, of a shape no machine's RAM or GPU holds (about 1.6 TB in 16-bit):
    the preflight stops the run with the fit table, where anything loading the model would have failed on the
    missing weights."""
    huge = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256, "num_attention_heads": 128}
    folder = config_folder(tmp_path, huge, "huge")
    params = load_params(ROOT / "params" / "default.yaml", [f"model.name={folder}", f"output_dir={tmp_path}/out"])
    with pytest.raises(PreflightError) as stopped:
        check_or_stop(params, list(STAGES), "params/default.yaml")
    assert "fits this machine: will not fit this machine" in str(stopped.value)
    out = capsys.readouterr().out
    assert "| 02      | train" in out and "does not fit" in out and "a smaller model" in out
    assert not list(folder.glob("*.safetensors"))


def test_the_default_run_fits_this_machine():
    """The embedded default run passes the preflight's fit check here (the suite runs it on every machine it runs on)."""
    result = fit_here(load_params(ROOT / "params" / "default.yaml"), list(STAGES))
    verdict, detail = result if isinstance(result, tuple) else ("ok", result)
    assert verdict in ("ok", "warning") and "02 train" in detail


def test_the_embedded_models_shape_comes_from_its_gguf_when_it_is_not_materialized(tmp_path, monkeypatch):
    materialized = model_shape("embedded:SmolLM2-135M-Instruct")
    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path))  # an empty cache: nothing materialized there
    from_gguf = model_shape("embedded:SmolLM2-135M-Instruct")
    assert from_gguf.source.endswith(".gguf") and materialized.source.endswith("config.json")
    fields = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "tied")
    assert {f: getattr(from_gguf, f) for f in fields} == {f: getattr(materialized, f) for f in fields}
    assert from_gguf.params == materialized.params == 134_515_008


class ConfigOnlyHub:
    """A loopback hub that serves one repo's config.json, answers 404 to anything else, and records every path."""

    def __init__(self, repo: str, config: dict):
        self.requests: list[str] = []
        hub = self

        class Handler(JsonHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                if self.path.split("?")[0] == f"/{repo}/resolve/main/config.json":
                    self.reply(200, config)
                else:
                    self.reply(404, {"error": "not found"})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def check_in_a_process(endpoint: str, cache: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT / "lib")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "tunebook", "check", *args], env=env, capture_output=True, text=True, timeout=120)
    return done, time.time() - started


def test_check_reads_a_hub_models_config_json_alone_in_seconds(tmp_path):
    repo = "unsloth/Llama-3.2-3B-Instruct"
    hub = ConfigOnlyHub(repo, json.loads((CONFIGS / "unsloth--Llama-3.2-3B-Instruct.json").read_text()))
    with answering(hub.server):
        done, seconds = check_in_a_process(hub.url, tmp_path / "cache", str(ROOT / "params" / "colab_l4.yaml"), "--machine", "colab-l4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{repo} (3.21B parameters, config from {hub.url}/{repo}/resolve/main/config.json)" in done.stdout
    assert re.search(r"\| 02 +\| train", done.stdout) and re.search(r"\| 04 +\| base", done.stdout)
    files = [r.split("?")[0] for r in hub.requests if "/resolve/" in r]  # (besides the client's own /api/ calls)
    assert files == [f"/{repo}/resolve/main/config.json"]  # the config alone: no weights, no index, no tokenizer
    assert seconds < 5, f"check took {seconds:.1f} s"


def test_check_says_in_one_line_when_the_hub_is_unreachable_and_nothing_is_cached(tmp_path):
    from servers import free_port

    done, _ = check_in_a_process(f"http://127.0.0.1:{free_port()}", tmp_path / "cache", str(ROOT / "params" / "colab_t4.yaml"), "--machine", "colab-t4")
    assert done.returncode == 0
    assert done.stdout.strip() == (
        "Fit on colab-t4: not predicted (unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit: the hub could not be reached and its "
        "config.json is not in the local hub cache)."
    )


def test_once_01_has_run_the_check_uses_the_longest_rows_it_built(tmp_path):
    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run

    run = open_run(ROOT / "params" / "default.yaml", [f"output_dir={tmp_path}", "data.max_train_examples=40", "data.eval_size=20"])
    build_dataset(run)
    lengths = run.outputs_of("01_build_dataset").lengths
    cpu = Machine("a CPU", None, None, False, 64 * GIB, 100 * GIB, None, 2, has_unsloth=False)
    after = check_fit(run.params, ["02_finetune", "04_evaluate"], cpu)
    assert (after.lengths.train, after.lengths.prompt) == (max(lengths["train"]), max(lengths["eval"]))
    assert after.lengths.source == "the longest rows 01 built" and after.lengths.train < run.params.model.max_seq_length
    again = check_fit(run.params, ["01_build_dataset", "02_finetune"], cpu)  # 01 about to run again: the params' bound
    assert again.lengths.train == run.params.model.max_seq_length
    train = {r.need.key: r.need.bytes for r in after.rows}[("02", "train", "RAM")]
    assert train < {r.need.key: r.need.bytes for r in again.rows}[("02", "train", "RAM")]


def test_every_colab_params_file_fits_its_machine_as_shipped():
    """Each params/colab_*.yaml against the Colab machine its header names (bench/fit.py COLAB_MACHINES; the models'
    configs from bench/configs): nothing does not fit. docs/fit.md's tables are `python bench/fit.py docs`."""
    import importlib.util

    from tunebook.checks.fit import shape_from_config
    from tunebook.params.schema import STAGES

    spec = importlib.util.spec_from_file_location("fit_bench", ROOT / "bench" / "fit.py")
    fit_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_bench)
    assert set(fit_bench.COLAB_MACHINES) == {p.name for p in (ROOT / "params").glob("colab_*.yaml")}
    for name, machine in fit_bench.COLAB_MACHINES.items():
        p = load_params(ROOT / "params" / name)
        config = ROOT / "bench" / "configs" / (p.model.name.replace("/", "--") + ".json")
        shape = shape_from_config(json.loads(config.read_text()), p.model.name, str(config))
        report = check_fit(p, list(STAGES), MACHINES[machine], shape=shape)
        assert report.rows and not report.problems, (name, report.table())
