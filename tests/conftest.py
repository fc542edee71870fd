import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEBOOK_SHARED", ROOT.parent / "shared"))

# `make test` runs the suite on two pytest-xdist workers, one per core: each worker and every process it starts (the
# CLI, papermill's kernels) computes on one thread, so the two never fight over the cores. Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_spec = importlib.util.spec_from_file_location("family_matrix", ROOT / "bench" / "family_matrix.py")
family_matrix = importlib.util.module_from_spec(_spec)
sys.modules["family_matrix"] = family_matrix  # its dataclasses look their module up
_spec.loader.exec_module(family_matrix)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """pytest-xdist's --dist loadgroup: a module's tests stay on one worker (its module fixtures are built once), and
    the modules that read the session's smoke run share one worker (it is built once)."""
    smoke_modules = {item.module.__name__ for item in items if {"smoke_run", "recipe_runs"} & set(item.fixturenames)}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("smoke_run" if module in smoke_modules else module))


def pytest_configure(config):
    """Stop, rather than build the smoke run once per worker, where pytest-xdist cannot group: pytest 9.2 ignores the
    group suffix it writes into each node id (pytest-xdist issue 1386)."""
    from packaging.version import Version

    if config.getoption("dist", "no") == "loadgroup" and Version(pytest.__version__) >= Version("9.2.0.dev0"):
        raise pytest.UsageError(
            f"pytest-xdist's --dist loadgroup does not group tests under pytest {pytest.__version__} (pytest-xdist issue 1386): install requirements.txt's pytest<9.2"
        )


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


# A test of what happens without a GPU (a CPU-only refusal or fallback): skipped, and said so, on a GPU machine.
CPU_ONLY = pytest.mark.skipif(gpu_present(), reason="holds on a CPU-only machine; a CUDA GPU is present")


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets beside the checkout (real public samples); tests that need it skip without it."""
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server with the embedded SmolLM2 GGUF on loopback: its /v1 URL."""
    from servers import llama_server_at

    with llama_server_at(tmp_path_factory.mktemp("llama_server") / "stderr.log") as base_url:
        yield base_url


@pytest.fixture
def write_params(tmp_path):
    """Write a params YAML into tmp_path and return its path."""

    def write(text: str, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def finetuned_record(**fields) -> dict:
    """What a real 02 records, for tests that fake stage 02: the fields they name, placeholders for the rest."""
    from tunebook.run.outputs import FinetuneOutputs

    placeholders = dict(
        backend="hf", family="SmolLM2", stop_ids=[2], adapter_dir="adapter", merged_dir="merged", train_log="train_log.json", steps=1, train_examples=1
    )
    return FinetuneOutputs(**{**placeholders, "train_seconds": 0.0, "train_loss": None, **fields}).as_json()


@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory) -> Path:
    """A tiny random-weight model of SmolLM2's architecture with its real tokenizer (hidden 64, 2 layers; bench/
    family_matrix.py): for tests of the orchestration around the model (sweeps), where the real one only adds minutes."""
    return family_matrix.tiny_model("smollm2", tmp_path_factory.mktemp("tiny") / "smollm2")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """params/smoke.yaml through the CLI, all five notebooks, once per test session: (run folder, completed process)."""
    out = tmp_path_factory.mktemp("outputs")
    command = [sys.executable, "-m", "tunebook", "run", "params/smoke.yaml", "--set", f"output_dir={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "smoke", result


# Small runs of two more recipes beside the smoke run (same output folder, so 05's run picker lists all three): the
# error analysis must work for classification (confusion matrix) and HotpotQA/RAFT (final-answer lines) too.
RECIPE_RUNS = {
    "livedoor_genre": ["data.eval_size=18", "data.max_train_examples=16", "train.max_steps=2", "train.grad_accum=1", "train.eval_loss_examples=4"],
    "hotpotqa_raft": [
        "data.eval_size=6",
        "data.max_train_examples=4",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.eval_loss_examples=2",
        "evaluate.max_new_tokens=24",
    ],
}


@pytest.fixture(scope="session")
def recipe_runs(smoke_run):
    """params/livedoor_genre.yaml and params/hotpotqa_raft.yaml cut to a few examples and training steps, no quantized
    copies, through the CLI and all five notebooks, on the real data samples in ../shared: {name: run folder}."""
    if not (SHARED / "datasets").is_dir():
        pytest.skip(f"{SHARED / 'datasets'} is not present")
    out = smoke_run[0].parent
    for name, overrides in RECIPE_RUNS.items():
        sets = [a for o in [*overrides, "quantize.methods=[]", f"output_dir={out}"] for a in ("--set", o)]
        result = subprocess.run([sys.executable, "-m", "tunebook", "run", f"params/{name}.yaml", *sets], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {name: out / name for name in RECIPE_RUNS}
