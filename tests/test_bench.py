"""The parts of bench/train_throughput.py that run on CPU: its fixed-length rows and its report."""
import importlib.util

from conftest import ROOT
from tunebook.config import DEFAULT_MODEL
from tunebook.models import load_tokenizer

spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
train_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_throughput)


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
