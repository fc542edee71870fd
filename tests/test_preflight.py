"""The preflight: `python -m tunebook check`, and `run`, `sweep` and the notebooks' first cell, stop in seconds with
every problem at once, before any model is loaded, and leave an existing run folder as it was."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DEAD = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, so the connection is refused at once


def tunebook(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)


def folder_hash(folder) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode() + f.read_bytes() + str(f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """A run folder whose 01 is complete (the smoke params): what a bad re-run must not touch."""
    out = tmp_path_factory.mktemp("outputs")
    done = tunebook("run", "params/smoke.yaml", "--stages", "01", "--set", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_check_passes_the_default_params():
    done = tunebook("check", "params/default.yaml")
    assert done.returncode == 0, done.stderr
    assert "No problems found." in done.stdout and "data.train_path" in done.stdout and "fits this machine" in done.stdout


OFFLINE_RECIPES = sorted(p.name for p in (ROOT / "params").glob("*.yaml") if "embedded:" in p.read_text() and p.name != "sweep_lora.yaml")


@pytest.mark.parametrize("recipe", OFFLINE_RECIPES)
def test_every_offline_recipe_passes_its_preflight(recipe):
    """No false alarm on a shipped recipe: each one that runs here passes (the FAQ recipes' eval rows take their
    passages from the documents, so they have none of their own)."""
    from tunebook.checks.preflight import preflight
    from tunebook.params.load import load_params
    from tunebook.params.schema import STAGES

    params = load_params(str(ROOT / "params" / recipe), [])
    paths = [p for p in (params.data.train_path, params.data.eval_path, params.synthesize.documents_path) if p and "shared" in p]
    if any(not os.path.exists(p) for p in paths):
        pytest.skip(f"{recipe} reads {paths}, which is not present")
    problems = [c for c in preflight(params, STAGES) if c.result == "problem"]
    assert not problems, problems


def test_an_unwritable_model_cache_is_a_problem_before_the_conversion(tmp_path):
    (tmp_path / "f").write_text("a file")
    done = tunebook("check", "params/default.yaml", env=os.environ | {"TUNEBOOK_CACHE": str(tmp_path / "f" / "cache")})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / 'f'} is a file, so the model cache" in done.stderr and "TUNEBOOK_CACHE" in done.stderr
    done = tunebook("prepare-model", env=os.environ | {"TUNEBOOK_CACHE": str(tmp_path / "f" / "cache")})
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr and "Materializing" not in done.stdout, done.stdout + done.stderr


def test_the_corpus_and_relabel_files_are_checked_with_the_stages_own_readers(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "d1", "text": "Ann wrote it."}\n{"id": "d2", "body": "no text field"}\n')
    (tmp_path / "relabels.jsonl").write_text('{"id": "1", "prediction": "Ann", "mark": "fine"}\n')
    done = tunebook(
        "check", "params/default.yaml", "--set", f"data.retrieval.corpus_path={tmp_path}/corpus.jsonl", "--set", f"data.relabels_path={tmp_path}/relabels.jsonl"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"- data.retrieval.corpus_path: {tmp_path}/corpus.jsonl row 2: needs an id in 'id' and text in 'text'" in done.stderr
    assert f"- data.relabels_path: {tmp_path}/relabels.jsonl mark 1: expected id, prediction and mark" in done.stderr


def test_every_problem_at_once(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        '{"id": "1", "article": "A", "question": "q?", "passages": ["p"], "answers": ["a"]}\n{"id": "2", "article": "B", "question": "r?", "answers": ["b"]}\n'
    )
    done = tunebook(
        "check", "params/default.yaml",
        "--set", f"data.train_path={train}",
        "--set", "model.name=nobody/no-such-model",
        "--set", "model.backend=unsloth",
        "--set", f"evaluate.api_baselines=[{{label: gpt, base_url: '{DEAD}', model: x, api_key_env: TUNEBOOK_UNSET_KEY}}, "
                 f"{{label: local, base_url: '{DEAD}', model: x, api_key_env: null}}]",
        "--set", f"output_dir={train}/outputs",
        env={k: v for k, v in os.environ.items() if k != "TUNEBOOK_UNSET_KEY"} | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr
    assert "6 problem(s) found before anything ran; nothing was changed." in message, message
    assert f"{train} is a file, so the output folder" in message
    assert "row 2" in message and "passages" in message  # the bad row, named
    assert "nobody/no-such-model: HF_HUB_OFFLINE is set and the model is not in the local cache" in message
    assert "model.backend is 'unsloth' but no CUDA GPU is visible" in message
    assert "api_key_env names TUNEBOOK_UNSET_KEY, which is not set" in message
    assert f"{DEAD} could not be reached" in message


def test_eval_file_that_is_the_training_file_stops_run_and_keeps_the_run(built_run):
    before = folder_hash(built_run / "smoke")
    done = tunebook("run", "params/smoke.yaml", "--stages", "01", "--set", f"output_dir={built_run}", "--set", "data.eval_path=data/minipedia_rag_qa.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "data.eval_path is the training file" in done.stderr and "nothing was changed" in done.stderr
    assert folder_hash(built_run / "smoke") == before


def test_sweep_checks_every_run_before_the_first(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"run_name: s\noutput_dir: {tmp_path}/out\ndata:\n  train_path: {ROOT}/data/minipedia_rag_qa.jsonl\n"
        "sweep:\n  stages: ['01']\n  variants:\n    - {name: good, set: {}}\n"
        f"    - {{name: bad, set: {{data.eval_path: {tmp_path}/missing.jsonl}}}}\n"
    )
    done = tunebook("sweep", sweep)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"- bad: data.eval_path: {tmp_path}/missing.jsonl does not exist." in done.stderr
    assert not (tmp_path / "out").exists()


def test_notebook_first_cell_runs_the_preflight(built_run, tmp_path):
    """The notebook path: papermill on 01 with a bad eval file stops in its first cell, the run folder untouched."""
    before = folder_hash(built_run / "smoke")
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "01_build_dataset.ipynb"), str(tmp_path / "01.ipynb"), "--cwd", str(ROOT / "notebooks"),
         "-p", "params_path", str(ROOT / "params" / "smoke.yaml"), "-y", f"overrides: [output_dir={built_run}, data.eval_path={tmp_path}/missing.jsonl]"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    executed = json.loads((tmp_path / "01.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and errors[0]["ename"] == "PreflightError" and "missing.jsonl does not exist" in errors[0]["evalue"]
    assert folder_hash(built_run / "smoke") == before


def test_resume_reruns_a_complete_stage_whose_params_changed(built_run, tmp_path):
    """--resume keeps complete stages; one made with other params would be kept silently, so it is re-run."""
    shutil.copytree(built_run, tmp_path / "out")
    done = tunebook("run", "params/smoke.yaml", "--resume", "--stages", "01", "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.max_train_examples=12")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Stage 01_build_dataset is complete but was made with other params (data.max_train_examples: 16 -> 12)" in done.stdout
    manifest = json.loads((tmp_path / "out" / "smoke" / "manifest.json").read_text())
    assert len(manifest["stages"]["01_build_dataset"]["outputs"]["lengths"]["train"]) == 12
