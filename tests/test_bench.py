"""The parts of the GPU benchmarks that run on CPU: bench/train_throughput.py's fixed-length rows and report,
bench/eval_throughput.py's prompts and report, bench/eval_split.py's eval rows and report, and bench/fit.py's prompts,
hub-cache seeding and report."""

import importlib.util
import json
import sys
from pathlib import Path

from conftest import ROOT
from tunebook.models.load import load_tokenizer
from tunebook.params.schema import DEFAULT_MODEL

spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
train_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_throughput)
sys.modules["train_throughput"] = train_throughput  # eval_throughput imports it as a sibling script
spec = importlib.util.spec_from_file_location("eval_throughput", ROOT / "bench" / "eval_throughput.py")
eval_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_throughput)
spec = importlib.util.spec_from_file_location("eval_split", ROOT / "bench" / "eval_split.py")
eval_split = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_split)
spec = importlib.util.spec_from_file_location("fit_bench", ROOT / "bench" / "fit.py")
fit_bench = importlib.util.module_from_spec(spec)
sys.modules["fit_bench"] = fit_bench  # its dataclasses look their module up there
spec.loader.exec_module(fit_bench)


def test_fixed_length_rows_are_exactly_as_long_as_asked():
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    rows = train_throughput.fixed_length_rows(tokenizer, 3, 300)
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)) for r in rows]
    assert lengths == [300, 300, 300]
    assert len({r["prompt"][0]["content"] for r in rows}) == 3  # different rows, not one repeated


def test_report_shows_ratios_and_failures():
    cases = {
        "speed_workbook": {"ok": True, "tokens_per_second": 10000.0, "peak_gpu_memory_gb": 7.1, "peak_allocated_gb": 6.0},
        "speed_raw_unsloth": {"ok": True, "tokens_per_second": 10200.0, "peak_gpu_memory_gb": 7.0, "peak_allocated_gb": 6.0},
        "speed_hf_peft": {"ok": True, "tokens_per_second": 6000.0, "peak_gpu_memory_gb": 14.0, "peak_allocated_gb": 13.0},
        "t4_llama3_8b_4bit": {"ok": False, "error": "TunebookError: Out of GPU memory", "out_of_memory": True},
    }
    text = train_throughput.report({"cases": cases})
    assert "Workbook / raw Unsloth: 0.98x; workbook / transformers+PEFT: 1.67x." in text
    assert "| t4_llama3_8b_4bit |" in text and "out of memory" in text


def test_eval_prompts_are_550_to_650_tokens_and_distinct():
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    prompts = eval_throughput.rag_prompts(tokenizer, 20)
    lengths = [len(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False)) for p in prompts]
    assert all(540 <= n <= 650 for n in lengths) and 570 < sum(lengths) / len(lengths) < 630
    assert len({p[0]["content"] for p in prompts}) == 20


def test_eval_report_gives_ratios_within_a_run_and_shows_failures():
    cases = {
        "hf_one_at_a_time": eval_throughput.speed(10, 5.0),
        "hf_batched_64": {"ok": False, "error": "ValueError: no pad token"},
        "prefill_bound": eval_throughput.speed(1000, 20.0),
        "workbook_hf_256": eval_throughput.speed(1000, 25.0, batch_size=256),
        "agreement_hf": {"ok": True, "examples": 100, "agreement": 0.9},
    }
    text = eval_throughput.report({"gpu": {"setup": {"new_tokens": 32}, "cases": cases, "machine": {"gpu": "H200"}}})
    assert "| workbook_hf_256 | 0.025 | 25.0 | 40.0 | 20.00x | 1.25 | batch_size 256 |" in text
    assert "| hf_batched_64 | failed: ValueError: no pad token |" in text and "agreement 0.9 on 100 prompts" in text


def test_split_bench_rows_are_all_different_past_the_data_and_its_report_says_what_was_measured():
    rows = eval_split.eval_rows(1010)  # the data has 504 rows: two passes and two rows of a third
    assert len({r["id"] for r in rows}) == 1010 and len({(r["question"], tuple(r["passages"])) for r in rows}) == 1010
    assert sorted(rows[504]["passages"]) == sorted(rows[0]["passages"]) and rows[504]["question"] == rows[0]["question"]
    case = {"seconds": 10.0, "examples_per_second": 1.6, "load_seconds": 2.0, "peak_memory_mb": 900.0, "stage_seconds": 14.0, "load_average_after": 0.5}
    result = {
        "setup": {"prompts": 16, "model": "m", "batch_size": 4, "new_tokens": 8},
        "cases": {"processes_1": {"processes": 1, **case}, "processes_2": {"processes": 2, **case, "seconds": 5.5}},
        "generation_ratio": 0.55,
        "stage_ratio": 0.8,
        "same_answers": True,
        "machine": {"commit": "abc1234"},
    }
    text = eval_split.report({"cpu": result})
    assert "| 2 | 5.5 | 1.6 | 2.0 | 14.0 | 900.0 | 0.5 |" in text
    assert "Split / one process: 0.55x the generation time, 0.8x the stage's. Same answers: yes." in text


def test_fit_bench_prompts_are_as_long_as_asked_and_its_configs_read_as_the_hub_cache(tmp_path, monkeypatch):
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    conversations, longest = fit_bench.eval_prompts(tokenizer, 3, 300)
    rendered = [len(tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)) for c in conversations]
    assert max(rendered) == longest and all(290 <= n <= 300 for n in rendered) and len({c[0]["content"] for c in conversations}) == 3
    fit_bench.seed_hub_cache(tmp_path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache("unsloth/Qwen3-4B", "config.json", cache_dir=tmp_path)
    assert json.loads(Path(cached).read_text())["model_type"] == "qwen3"


def test_fit_bench_report_counts_predictions_within_the_targets_and_shows_failures():
    ok = {"ok": True, "params": "params/colab_l4.yaml", "shape": "llama32-3b", "kind": "train", "backend": "unsloth", "dtype": "auto", "batch": "4 x 2 x 2048"}
    cases = {
        "close": {
            **ok,
            "predicted_gib": 9.0,
            "nvidia_smi_peak_gib": 10.0,
            "error": -0.1,
            "predicted_merge_ram_gib": 7.7,
            "merge_peak_rss_gib": 7.0,
            "merge_error": 0.1,
        },
        "far": {**ok, "predicted_gib": 13.0, "nvidia_smi_peak_gib": 10.0, "error": 0.3},
        "broken": {"ok": False, "error_message": "OutOfMemoryError: CUDA out of memory", "peak_reserved_gib": 14.1},
    }
    text = fit_bench.report({"cases": cases})
    assert "GPU: 1 of 2 predictions within 15% (largest error 30%)." in text and "Merge RAM: 1 of 1 within 20%" in text
    assert "| close | params/colab_l4.yaml | llama32-3b | train, unsloth, auto | 4 x 2 x 2048 | 9.0 | 10.0 | -10% |" in text
    assert "| broken | | | | | | | failed: OutOfMemoryError: CUDA out of memory |" in text
