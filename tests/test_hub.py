"""Model cards and `python -m tunebook push` on a finished run made by hand in seconds (every stage recorded, small
files standing in for the models): the cards' metadata and tables, a dry run, a push through a real HTTP server on
loopback that speaks the Hub's API (tests/hub_server.py; no client patched: HF_ENDPOINT points the client at it), and
one clear message for each kind of bad input. tests/test_share_smoke.py does the same on the real smoke run."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import ROOT
from hub_server import fake_hub
from tunebook.analysis.model_card import artifacts, cards, write_cards
from tunebook.run.folder import Run, open_run
from tunebook.run.outputs import AnalysisOutputs, DatasetOutputs, EvaluateOutputs, FinetuneOutputs, QuantizedCopy, QuantizeOutputs

TOKEN = "hf_tunebookFakeToken9f3c1e7b2a"  # distinctive: the grep in test_share_smoke.py looks for it
METRICS = [
    {"model": "base", "exact_match": 0.0, "partial_match": 0.42, "f1": 0.156, "n": 8, "seconds": 3.1, "bits": 16, "size_mb": 260.0},
    {"model": "finetuned", "exact_match": 0.5, "partial_match": 0.5, "f1": 0.541, "n": 8, "seconds": 2.2, "bits": 32, "size_mb": 517.0},
    {"model": "int8_weight_only", "exact_match": 0.375, "partial_match": 0.5, "f1": 0.5, "n": 8, "seconds": 2.5, "bits": 8, "size_mb": 214.0},
    {"model": "gguf_q8_0", "exact_match": 0.25, "partial_match": 0.375, "f1": 0.45, "n": 8, "seconds": 1.1, "bits": 8, "size_mb": 138.0},
]
COUNTS = [
    {"model": m, "correct": c, "empty": 0, "normalization": 0, "too_verbose": v, "truncated": 0, "wrong": 8 - c - v, "n": 8}
    for m, c, v in (("base", 0, 3), ("finetuned", 4, 1), ("int8_weight_only", 3, 1), ("gguf_q8_0", 2, 2))
]


def files(folder: Path, contents: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def finished_run(tmp_path: Path, with_04: bool = True) -> Run:
    """A run whose five stages are recorded complete, with small stand-ins for its models."""
    params = tmp_path / "p.yaml"
    params.write_text(
        f"run_name: handmade\noutput_dir: out\ndata:\n  train_path: {ROOT / 'data' / 'minipedia_rag_qa.jsonl'}\n"
        'prompt:\n  system: Reply with the answer only.\nquantize:\n  methods: [int8_weight_only, gguf_q8_0, bnb_nf4]\nevaluate:\n  stop_strings: ["\\n"]\n',
        encoding="utf-8",
    )
    run = open_run(params)
    d = run.dir
    files(
        d / "adapter",
        {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"\0weights" * 200, "tokenizer.json": b"{}", "README.md": b"PEFT's own card"},
    )
    files(d / "merged", {"config.json": b"{}", "model.safetensors": b"\0merged" * 300, "generation_config.json": b"{}"})
    files(d / "quantized" / "int8_weight_only", {"config.json": b"{}", "pytorch_model.bin": b"\0int8" * 100})
    files(d / "quantized", {"gguf_q8_0.gguf": b"GGUF\0" * 100, "gguf_q8_0.Modelfile": b"FROM ./gguf_q8_0.gguf\nPARAMETER temperature 0\n"})
    with run.stage("01_build_dataset") as o:
        o.update(DatasetOutputs(str(d / "dataset"), "train.jsonl", "eval.jsonl", [], [], {}).as_json())
    with run.stage("02_finetune") as o:
        o.update(
            FinetuneOutputs("hf", "ChatML (SmolLM2 and others)", [2], str(d / "adapter"), str(d / "merged"), "train_log.json", 2, 16, 12.0, 1.25).as_json()
        )
    with run.stage("03_quantize") as o:
        variants = [
            QuantizedCopy("int8_weight_only", "int8_weight_only", 8, "transformers", "ok", path=str(d / "quantized" / "int8_weight_only"), size_mb=0.1),
            QuantizedCopy("gguf_q8_0", "gguf_q8_0", 8, "gguf", "ok", path=str(d / "quantized" / "gguf_q8_0.gguf"), size_mb=0.1),
            QuantizedCopy("bnb_nf4", "bnb_nf4", 4, "transformers", "skipped", reason="bitsandbytes quantization needs a CUDA GPU"),
        ]
        o.update(QuantizeOutputs(variants).as_json())
    if not with_04:
        return run
    (d / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    with run.stage("04_evaluate") as o:
        o.update(EvaluateOutputs(str(d / "metrics.json"), str(d / "metrics.csv"), {}, []).as_json())
    (d / "analysis.json").write_text(json.dumps({"category_counts": COUNTS, "base_vs_finetuned": {"fixed": 4, "broken": 0}}), encoding="utf-8")
    with run.stage("05_error_analysis") as o:
        o.update(AnalysisOutputs(str(d / "report.html"), str(d / "analysis.json")).as_json())
    return run


@pytest.fixture
def run(tmp_path) -> Run:
    return finished_run(tmp_path)


# The commands' own Hugging Face home: no token saved by `hf auth login` on this machine is found, nothing is written
# to the real one (removed when the test process exits).
HF_HOME = tempfile.TemporaryDirectory(prefix="tunebook-test-hf-home-")


def tunebook(*args, env: dict | None = None):
    """python -m tunebook ARGS with no HF_* variable but `env`'s."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": HF_HOME.name} | (env or {})
    return subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=environment)


def test_each_artifact_gets_a_card_with_the_hubs_metadata(run):
    assert [a.name for a in artifacts(run)] == ["adapter", "merged", "int8_weight_only", "gguf_q8_0"]  # bnb_nf4 was skipped
    written = write_cards(run)
    d = run.dir
    assert written == [
        d / "adapter" / "README.md",
        d / "merged" / "README.md",
        d / "quantized" / "int8_weight_only" / "README.md",
        d / "quantized" / "gguf_q8_0.README.md",
    ]
    libraries = {}
    for path, (artifact, card) in zip(written, cards(run)):
        loaded = ModelCard.load(path)
        meta = loaded.data.to_dict()
        libraries[artifact.name] = meta["library_name"]
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
        assert "tunebook" in meta["tags"] and meta["pipeline_tag"] == "text-generation" and "datasets" not in meta  # a local data file
        row = "finetuned" if artifact.kind != "quantized" else artifact.name
        own = next(r for r in METRICS if r["model"] == row)
        index = meta["model-index"][0]["results"][0]
        assert {m["type"]: m["value"] for m in index["metrics"]} == {k: own[k] for k in ("exact_match", "partial_match", "f1")}
        text = loaded.text
        assert f"| **{row}** (this model) |" in text  # its own metrics row, marked, in the whole table
        assert all(f"| {r['model']} |" in text or f"| **{r['model']}** (this model) |" in text for r in METRICS)
        assert (
            "| **" + row + "** (this model) | 0 |" in text or f"| **{row}** (this model) | {next(c for c in COUNTS if c['model'] == row)['correct']} |" in text
        )
        assert "Base → fine-tuned: 4 fixed, 0 broken." in text
        assert "r 16, alpha 32" in text and "Reply with the answer only." in text and "Question: {question}" in text
        assert str(card) == path.read_text(encoding="utf-8")
    assert libraries == {"adapter": "peft", "merged": "transformers", "int8_weight_only": "transformers", "gguf_q8_0": "gguf"}
    assert "PeftModel.from_pretrained" in (d / "adapter" / "README.md").read_text()
    gguf_card = (d / "quantized" / "gguf_q8_0.README.md").read_text()
    assert "ollama create handmade -f gguf_q8_0.Modelfile" in gguf_card and "gguf" in ModelCard.load(d / "quantized" / "gguf_q8_0.README.md").data.tags


def test_card_command_and_a_license_given(run):
    result = tunebook("card", run.dir, "--license", "mit")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 4
    assert ModelCard.load(run.dir / "merged" / "README.md").data.license == "mit"


def test_dry_run_lists_repos_files_and_sizes_and_uploads_nothing(run):
    before = sorted(p.relative_to(run.dir) for p in run.dir.rglob("*"))
    result = tunebook("push", run.dir, "--repo", "someone/handmade", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Dry run: nothing is uploaded" in out and "4 private repo(s)" in out
    for repo, artifact in (("someone/handmade-adapter", "adapter"), ("someone/handmade", "merged"), ("someone/handmade-int8_weight_only", "int8_weight_only")):
        assert f"{repo}  ({artifact}," in out
    assert "someone/handmade-gguf_q8_0  (gguf_q8_0, gguf): 3 files" in out
    for line in (r"adapter_model\.safetensors +1\.6 KB", r"Modelfile +46 B", r"gguf_q8_0\.gguf +500 B", r"README\.md +\d\.\d KB  \(model card\)"):
        assert re.search(rf"^    {line}$", out, re.M), line
    assert re.search(r"\nIn all: 14 files, \d+\.\d KB\.$", out.rstrip())
    assert sorted(p.relative_to(run.dir) for p in run.dir.rglob("*")) == before  # no card written, nothing else either


def test_push_lands_every_file_on_a_loopback_hub(run):
    with fake_hub(TOKEN) as hub:
        result = tunebook("push", run.dir, "--repo", "tester/handmade", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"})
        assert result.returncode == 0, result.stdout + result.stderr
    uploads = {a.name: a for a in artifacts(run)}
    expected = {
        "tester/handmade-adapter": uploads["adapter"],
        "tester/handmade": uploads["merged"],
        "tester/handmade-int8_weight_only": uploads["int8_weight_only"],
        "tester/handmade-gguf_q8_0": uploads["gguf_q8_0"],
    }
    assert set(hub.repos) == set(expected) and all(r["private"] for r in hub.repos.values())
    for repo, artifact in expected.items():
        landed = hub.files[repo]
        assert set(landed) == {"README.md", *(p for p, _ in artifact.files())}, repo
        for path, local in artifact.files():
            assert landed[path]["size"] == local.stat().st_size, (repo, path)
        assert landed["README.md"]["text"] == artifact.card_path.read_text(encoding="utf-8")  # the run keeps the card it pushed
    assert hub.files["tester/handmade-gguf_q8_0"]["Modelfile"]["text"].startswith("FROM ./gguf_q8_0.gguf")
    assert "sha256" in hub.files["tester/handmade"]["model.safetensors"] and "text" not in hub.files["tester/handmade"]["model.safetensors"]  # by LFS
    assert set(hub.auth) == {f"Bearer {TOKEN}"}, [r for r in hub.requests if not r[2]]
    card = ModelCard.load(run.dir / "quantized" / "gguf_q8_0.README.md")
    assert card.data.base_model == "tester/handmade" and card.data.base_model_relation == "quantized"  # linked to the merged model pushed beside it
    assert "hf download tester/handmade-gguf_q8_0" in card.text
    assert "adapter" in result.stdout and "tester/handmade-gguf_q8_0" in result.stdout
    # Pushed again: the repos exist (409 from the Hub), are kept, and get a new commit each.
    with fake_hub(TOKEN) as hub:
        hub.repos["tester/handmade-adapter"], hub.files["tester/handmade-adapter"] = {"private": True}, {}
        again = tunebook(
            "push",
            run.dir,
            "--repo",
            "tester/handmade",
            "--what",
            "adapter",
            "--public",
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"},
        )
        assert again.returncode == 0, again.stderr
    assert set(hub.files) == {"tester/handmade-adapter"} and "README.md" in hub.files["tester/handmade-adapter"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--what", "adapter,lora"], {}, "--what lora: the run has no such model. Choose from: adapter, merged, int8_weight_only, gguf_q8_0."),
        (["--what", "bnb_nf4"], {}, "--what bnb_nf4: 03 did not make it (skipped: bitsandbytes quantization needs a CUDA GPU)"),
        (["--repo", "handmade"], {}, "--repo 'handmade' is not a Hub repo name (it needs the namespace"),
        (["--repo", "a/b--c"], {}, "is not a Hub repo name"),
        ([], {}, "No Hugging Face token: set HF_TOKEN"),
        ([], {"HF_TOKEN": "hf_wrong"}, "refused the token (401 Unauthorized) while checking the token"),
        (
            [],
            {"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"},
            "The Hugging Face Hub cannot be reached: HF_HUB_OFFLINE is set (checking the token). Nothing was uploaded.",
        ),
        ([], {"HF_TOKEN": TOKEN, "HF_ENDPOINT": "closed"}, "The Hugging Face Hub cannot be reached at http://127.0.0.1:"),
    ],
)
def test_bad_input_is_one_message(run, args, env, message):
    repo = [] if "--repo" in args else ["--repo", "tester/handmade"]
    with fake_hub(TOKEN) as hub:
        env = {"HF_ENDPOINT": hub.url, **env}
        if env["HF_ENDPOINT"] == "closed":
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
        result = tunebook("push", run.dir, *repo, *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not hub.repos  # one line; nothing created


def test_offline_the_default_hub_cannot_be_reached(run):
    """Where huggingface.co does not resolve (this machine, CI): the same one message for the real Hub."""
    try:
        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("huggingface.co resolves here: this checks the offline message")
    except OSError:
        pass
    result = tunebook("push", run.dir, "--repo", "tester/handmade", env={"HF_TOKEN": TOKEN})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: The Hugging Face Hub cannot be reached at https://huggingface.co (") and "Nothing was uploaded." in result.stderr


def test_a_failure_after_some_repos_says_which_were_pushed(run):
    with fake_hub(TOKEN) as hub:
        hub.refuse_commits_to = "tester/handmade-int8_weight_only"
        result = tunebook("push", run.dir, "--repo", "tester/handmade", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"})
    assert result.returncode == 2, result.stderr
    assert "answered 500 while uploading int8_weight_only to tester/handmade-int8_weight_only" in result.stderr, result.stderr
    assert "Pushed before that: tester/handmade-adapter, tester/handmade; pushing again updates those repos." in result.stderr
    assert set(hub.files["tester/handmade"]) and not hub.files["tester/handmade-int8_weight_only"]


def test_a_run_without_evaluation_is_refused(tmp_path):
    run = finished_run(tmp_path, with_04=False)
    for args in (["push", run.dir, "--repo", "tester/handmade", "--dry-run"], ["card", run.dir]):
        result = tunebook(*args)
        assert result.returncode == 2 and "has no complete evaluation (04 is not run)" in result.stderr and "--stages 04,05" in result.stderr, result.stderr
    assert tunebook("push", tmp_path, "--repo", "tester/x", "--dry-run").stderr.startswith(f"error: {tmp_path} is not a run folder")
