"""What leaves the notebook, on the real smoke run (conftest's smoke_run: params/smoke.yaml through all five notebooks):
the model cards 05 wrote beside the adapter, the merged model and each quantized copy; the Ollama Modelfile 03 wrote
beside the GGUF copy, parsed and rendered as Ollama would; `push --dry-run`; a push of everything to a real HTTP
server on loopback that speaks the Hub's API (tests/hub_server.py), which must list every file of every artifact; and
no trace of the push's token anywhere in the output folder afterwards."""

import hashlib
import json
import re
import shutil
import socket
import subprocess
import time

import pytest
from huggingface_hub import ModelCard
from test_hub import TOKEN, tunebook
from test_ollama import CONVERSATION, harness, ollama_reads  # noqa: F401 - harness is a fixture

from hub_server import fake_hub
from tunebook.analysis.model_card import artifacts
from tunebook.quantizing.ollama import SUFFIX, modelfile_path
from tunebook.run.folder import Run

REPO = "tester/smoke"
# params/smoke.yaml's copies that a CPU makes (bnb_nf4 is skipped), each with its card beside it.
CARDS = {
    "adapter": ("adapter/README.md", "peft", "finetuned"),
    "merged": ("merged/README.md", "transformers", "finetuned"),
    "int8_weight_only": ("quantized/int8_weight_only/README.md", "transformers", "int8_weight_only"),
    "gguf_q8_0": ("quantized/gguf_q8_0.README.md", "gguf", "gguf_q8_0"),
    "gptq_w4a16": ("quantized/gptq_w4a16/README.md", "transformers", "gptq_w4a16"),
}


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_05_wrote_a_card_beside_the_adapter_the_merged_model_and_each_copy(smoke_run):
    run_dir, result = smoke_run
    metrics = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())}
    counts = {r["model"]: r for r in json.loads((run_dir / "analysis.json").read_text())["category_counts"]}
    assert [a.name for a in artifacts(Run.load(run_dir))] == list(CARDS)
    for name, (path, library, row) in CARDS.items():
        card = ModelCard.load(run_dir / path)
        meta = card.data.to_dict()
        assert meta["library_name"] == library and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct", name
        assert meta["license"] == "apache-2.0" and "tunebook" in meta["tags"], name
        results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
        assert results == {k: metrics[row][k] for k in ("exact_match", "partial_match", "f1")}, name  # its own row's scores
        marked = re.search(rf"^\| \*\*{row}\*\* \(this model\) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card.text, re.M)
        assert marked and float(marked.group(2)) == pytest.approx(metrics[row]["exact_match"], abs=5e-4), name  # bits, then the scores
        assert all(re.search(rf"^\| (\*\*)?{m}(\*\* \(this model\))? \|", card.text, re.M) for m in metrics), name  # the whole table
        errors = re.search(rf"^\| \*\*{row}\*\* \(this model\) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| 8 \|$", card.text, re.M)
        own = counts[row]
        assert errors and [int(g) for g in errors.groups()] == [own[c] for c in ("correct", "empty", "normalization", "too_verbose", "truncated", "wrong")]
        assert "r 16, alpha 32" in card.text and "2 steps (train.max_steps 2)" in card.text
    assert "PeftModel.from_pretrained" in (run_dir / "adapter" / "README.md").read_text()
    assert re.search(
        r"ollama create smoke -f (gguf_q8_0\.)?Modelfile", (run_dir / "quantized" / "gguf_q8_0.README.md").read_text()
    )  # (after a push: its repo's)
    executed = (run_dir / "notebooks" / "05_error_analysis.ipynb").read_text()
    assert "Model cards: adapter/README.md" in executed and "Dry run: nothing is uploaded" in executed  # push_repo empty: listed only


def test_03_wrote_a_modelfile_ollama_reads_as_the_tokenizer_prompts(smoke_run, harness):  # noqa: F811
    from tunebook.models.load import load_tokenizer

    run_dir, _ = smoke_run
    gguf = run_dir / "quantized" / "gguf_q8_0.gguf"
    modelfile = modelfile_path(gguf)
    assert modelfile.name == "gguf_q8_0" + SUFFIX and modelfile.exists()
    text = modelfile.read_text(encoding="utf-8")
    read = ollama_reads(harness, text, CONVERSATION, modelfile.parent)
    assert read["from_file"] == str(gguf)  # FROM ./gguf_q8_0.gguf, relative to the Modelfile's folder
    assert read["parameters"]["num_ctx"] == 768 and read["parameters"]["temperature"] == 0  # params/smoke.yaml's max_seq_length
    assert read["parameters"]["stop"][0] == "<|im_end|>"
    tokenizer = load_tokenizer(str(run_dir / "merged"))
    for messages in (CONVERSATION, CONVERSATION[1:]):
        prompt = ollama_reads(harness, text, messages, modelfile.parent)["prompt"]
        assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_ollama_create_and_one_answer(smoke_run, tmp_path):
    """With an Ollama binary on PATH: `ollama create` from the smoke run's Modelfile as it is, then one greedy answer."""
    ollama = shutil.which("ollama")
    if ollama is None:
        pytest.skip("no ollama binary: none installs from PyPI, npm or Debian here (see the README's Ollama section)")
    run_dir, _ = smoke_run
    modelfile = run_dir / "quantized" / ("gguf_q8_0" + SUFFIX)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "models"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([ollama, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([ollama, "list"], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        created = subprocess.run([ollama, "create", "tunebook-smoke", "-f", str(modelfile)], env=env, capture_output=True, text=True, timeout=300)
        assert created.returncode == 0, created.stderr
        answer = subprocess.run([ollama, "run", "tunebook-smoke", "What is the capital of France?"], env=env, capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_push_dry_run_lists_every_repo_and_file(smoke_run):
    run_dir, _ = smoke_run
    result = tunebook("push", run_dir, "--repo", REPO, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "5 private repo(s)" in out
    for artifact in artifacts(Run.load(run_dir)):
        repo = REPO if artifact.name == "merged" else f"{REPO}-{artifact.name}"
        block = out.split(f"\n{repo}  (", 1)[1].split("\ntester/", 1)[0]
        assert block.startswith(f"{artifact.name}, {artifact.library}): {len(artifact.files()) + 1} files")
        for path, _ in [("README.md", None), *artifact.files()]:
            assert re.search(rf"^    {re.escape(path)} +[\d.,]+ (B|KB|MB|GB)", block, re.M), (repo, path)


def test_push_lands_every_file_of_every_artifact(smoke_run):
    run_dir, _ = smoke_run
    with fake_hub(TOKEN) as hub:
        result = tunebook("push", run_dir, "--repo", REPO, env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    shared = artifacts(Run.load(run_dir))
    assert set(hub.repos) == {REPO if a.name == "merged" else f"{REPO}-{a.name}" for a in shared}
    assert all(r["private"] for r in hub.repos.values())
    for artifact in shared:
        landed = hub.files[REPO if artifact.name == "merged" else f"{REPO}-{artifact.name}"]
        assert set(landed) == {"README.md", *(p for p, _ in artifact.files())}, artifact.name
        for path, local in [("README.md", artifact.card_path), *artifact.files()]:
            assert (landed[path]["size"], landed[path]["sha256"]) == (local.stat().st_size, sha256(local)), (artifact.name, path)
    assert {p for p in hub.files[f"{REPO}-gguf_q8_0"]} == {"README.md", "gguf_q8_0.gguf", "Modelfile"}
    assert any(p.endswith(".safetensors") and "text" not in f for p, f in hub.files[REPO].items())  # the weights went by LFS
    assert set(hub.auth) == {f"Bearer {TOKEN}"}


def test_no_file_of_the_output_folder_holds_the_token(smoke_run):
    """After the push above (and the smoke run's own notebooks, executed and saved with their outputs)."""
    run_dir, _ = smoke_run
    needle = TOKEN.encode()
    searched, found = 0, []
    for path in sorted(p for p in run_dir.parent.rglob("*") if p.is_file()):
        searched += 1
        with open(path, "rb") as f:
            tail = b""
            for block in iter(lambda: f.read(2**22), b""):
                if needle in tail + block:
                    found.append(path)
                    break
                tail = block[-len(needle) :]
    assert searched > 50 and not found, found
