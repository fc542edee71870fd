"""Bad inputs a new user makes, each run as the user would run it, with the message they see and the seconds until it
appears (the command's wall time: every case stops before any model is loaded).

    python bench/bad_inputs.py [--only NAME ...]

Results: bench/results/bad_inputs.json and .md. Every case runs in a fresh scratch folder; the ones against an
existing run folder also check that nothing in it changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRAIN = ROOT / "data" / "minipedia_rag_qa.jsonl"
DEAD = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
ROW = {"id": "1", "article": "A", "question": "Who?", "passages": ["Ann wrote it."], "answers": ["Ann"]}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# name -> (command after `python -m tunebook`, {file name: content} written to the scratch folder first[, environment]).
# "{tmp}" in the command and the environment is the scratch folder. Runs go to {tmp}/out.
OUT = "--set output_dir={tmp}/out"
CASES = {
    "params file missing": ("check params/nope.yaml", {}),
    "params not YAML": ("check {tmp}/p.yaml", {"p.yaml": "run_name: [unclosed\n"}),
    "params not UTF-8": ("check {tmp}/p.yaml", {"p.yaml": b"run_name: caf\xe9\n"}),
    "params is a list": ("check {tmp}/p.yaml", {"p.yaml": "- a\n- b\n"}),
    "key typo": ("check params/default.yaml --set train.lerning_rate=1e-4", {}),
    "wrong type": ("check params/default.yaml --set train.lora_r=sixteen", {}),
    "out of range": ("check params/default.yaml --set train.warmup_ratio=1.5", {}),
    "unknown choice": ("check params/default.yaml --set model.backend=vllm", {}),
    "eval_size 1.5": ("check params/default.yaml --set data.eval_size=1.5", {}),
    "duplicate YAML key": ("check {tmp}/p.yaml", {"p.yaml": f"data:\n  train_path: {TRAIN}\ntrain:\n  lora_r: 8\n  lora_r: 64\n"}),
    "target_modules: 5": ("check params/default.yaml --set train.target_modules=5", {}),
    "--set without =": ("check params/default.yaml --set train.lora_r", {}),
    "--stages empty": ("run params/default.yaml --stages '' " + OUT, {}),
    "--stages unknown": ("run params/default.yaml --stages 9 " + OUT, {}),
    "a sweep file given to run": ("run params/sweep_lora.yaml " + OUT, {}),
    "both train_path and documents_path": ("check params/default.yaml --set synthesize.documents_path={tmp}", {}),
    "train_path missing": ("check params/default.yaml --set data.train_path={tmp}/nope.jsonl", {}),
    "train_path is a folder": ("check params/default.yaml --set data.train_path={tmp}/d.jsonl", {"d.jsonl/x": ""}),
    "train_path not UTF-8": ("check params/default.yaml --set data.train_path={tmp}/t.jsonl", {"t.jsonl": b'{"question": "caf\xe9"}\n'}),
    "train_path bad JSON line": ("check params/default.yaml --set data.train_path={tmp}/t.jsonl", {"t.jsonl": jsonl([ROW]) + "{oops\n"}),
    "train_path row lacks a field": (
        "check params/default.yaml --set data.train_path={tmp}/t.jsonl",
        {"t.jsonl": jsonl([ROW, {k: v for k, v in ROW.items() if k != "answers"}])},
    ),
    "train_path empty answers": ("check params/default.yaml --set data.train_path={tmp}/t.jsonl", {"t.jsonl": jsonl([ROW, {**ROW, "id": "2", "answers": []}])}),
    "train_path unsupported type": ("check params/default.yaml --set data.train_path={tmp}/t.txt", {"t.txt": "hello\n"}),
    "train_path CSV missing column": ("check params/default.yaml --set data.train_path={tmp}/t.csv", {"t.csv": "id,question\n1,Who?\n"}),
    "eval_path is the training file": ("check params/default.yaml --set data.eval_path=" + str(TRAIN), {}),
    "eval_path missing": ("check params/default.yaml --set data.eval_path={tmp}/e.jsonl", {}),
    "retrieval corpus missing": ("check params/default.yaml --set data.retrieval.corpus_path={tmp}/c.jsonl", {}),
    "retrieval corpus without its text field": (
        "check params/default.yaml --set data.retrieval.corpus_path={tmp}/c.jsonl",
        {"c.jsonl": '{"id": "1", "body": "x"}\n'},
    ),
    "relabels file with a bad mark": (
        "check params/default.yaml --set data.relabels_path={tmp}/r.jsonl",
        {"r.jsonl": '{"id": "1", "prediction": "a", "mark": "fine"}\n'},
    ),
    "relabels file missing": ("check params/default.yaml --set data.relabels_path={tmp}/r.jsonl", {}),
    "documents folder missing": ("check params/faq_from_docs.yaml --set synthesize.documents_path={tmp}/docs", {}),
    "unknown hub model, offline": ("check params/default.yaml --set model.name=nobody/no-such-model", {}),
    "model folder without config.json": ("check params/default.yaml --set model.name={tmp}/m", {"m/README.md": "x"}),
    "model folder without chat template": ("check params/default.yaml --set model.name={tmp}/m", {"m/config.json": "{}", "m/tokenizer_config.json": "{}"}),
    "unknown embedded model": ("check params/default.yaml --set model.name=embedded:Nope", {}),
    "not a model name": ("check params/default.yaml --set 'model.name=my model'", {}),
    "backend unsloth on a CPU": ("check params/default.yaml --set model.backend=unsloth", {}),
    "evaluate.backend unsloth on a CPU": ("check params/default.yaml --set evaluate.backend=unsloth", {}),
    "API key variable unset": (
        "check params/default.yaml --set 'evaluate.api_baselines=[{label: gpt, model: gpt-4o-mini, api_key_env: TUNEBOOK_UNSET_KEY}]'",
        {},
    ),
    "API endpoint not running": (
        "check params/default.yaml --set 'evaluate.api_baselines=[{label: local, base_url: \"" + DEAD + "\", model: x, api_key_env: null}]'",
        {},
    ),
    "teacher endpoint not running": (
        "check params/faq_from_docs.yaml --set synthesize.teacher.base_url=" + DEAD + " --set synthesize.teacher.api_key_env=null",
        {},
    ),
    "max_steps 0": ("check params/default.yaml --set train.max_steps=0", {}),
    "an empty stop string": ("check params/default.yaml --set 'evaluate.stop_strings=[\"\"]'", {}),
    "template without {question}": ("check params/default.yaml --set 'prompt.template=\"Passages: {passages}\"'", {}),
    "group_field is the id field": ("check params/default.yaml --set data.group_field=id", {}),
    "negative seed": ("check params/default.yaml --set seed=-1", {}),
    "a quantize method twice": ("check params/default.yaml --set 'quantize.methods=[gguf_q8_0, gguf_q8_0]'", {}),
    "base_url without http": ("check params/default.yaml --set 'evaluate.api_baselines=[{label: local, base_url: localhost:8000/v1, model: x}]'", {}),
    "model cache under a file": ("check params/default.yaml", {"f": "a file"}, {"TUNEBOOK_CACHE": "{tmp}/f/cache"}),
    "prepare-model into a cache under a file": ("prepare-model", {"f": "a file"}, {"TUNEBOOK_CACHE": "{tmp}/f/cache"}),
    "output_dir under a file": ("check params/default.yaml --set output_dir={tmp}/f/out", {"f": "a file"}),
    "run folder exists": ("run params/smoke.yaml --set output_dir={tmp}/out", {"out/smoke/manifest.json": '{"run_name": "smoke", "stages": {}}'}),
    "score: file missing": ("score {tmp}/p.jsonl", {}),
    "score: a folder": ("score {tmp}", {}),
    "score: row without gold": ("score {tmp}/p.jsonl", {"p.jsonl": '{"prediction": "a"}\n'}),
    "score: --jsonl-out in a missing folder": (
        "score {tmp}/p.jsonl --jsonl-out {tmp}/no/such/s.jsonl",
        {"p.jsonl": '{"prediction": "a", "gold_answers": ["a"]}\n'},
    ),
    "compare: no run folders": ("compare {tmp}", {}),
    "sweep: a variant with a missing file": (
        "sweep {tmp}/s.yaml",
        {"s.yaml": f"run_name: s\ndata:\n  train_path: {TRAIN}\nsweep:\n  variants:\n    - {{name: a, set: {{data.eval_path: /nope.jsonl}}}}\n"},
    ),
}


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return digest.hexdigest()


def run_case(name: str, command: str, files: dict, environment: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        for rel, content in files.items():
            path = Path(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        existing = Path(tmp, "out")
        before = folder_hash(existing) if existing.exists() else None
        env = {k: v for k, v in os.environ.items() if k != "TUNEBOOK_UNSET_KEY"} | {"HF_HUB_OFFLINE": "1"}
        env |= {k: v.replace("{tmp}", tmp) for k, v in (environment or {}).items()}
        started = time.time()
        done = subprocess.run(
            f"{sys.executable} -m tunebook {command.replace('{tmp}', tmp)}", shell=True, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
        )
        seconds = time.time() - started
        message = done.stderr.strip().replace(tmp, "<tmp>")
        return {
            "case": name, "command": f"python -m tunebook {command}", "exit_code": done.returncode, "seconds": round(seconds, 2),
            "message": message.removeprefix("error: "), "traceback": "Traceback" in done.stderr,
            "run_folder_unchanged": None if before is None else folder_hash(existing) == before,
        }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| # | bad input | exit | s | what the user sees |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, start=1):
        text = r["message"].replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {i} | {r['case']} | {r['exit_code']} | {r['seconds']:.1f} | {text[:400]} |")
    slow = [r["case"] for r in rows if r["seconds"] >= 10]
    lines += ["", f"{len(rows)} cases; slowest {max(r['seconds'] for r in rows):.1f} s; {len(slow)} at 10 s or more; "
              f"{sum(r['traceback'] for r in rows)} with a traceback; {sum(r['exit_code'] == 0 for r in rows)} accepted."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="Case names to run (default: all)")
    args = parser.parse_args()
    rows = [run_case(name, *CASES[name]) for name in (args.only or CASES)]
    for r in rows:
        print(f"{r['seconds']:5.1f}s  rc={r['exit_code']}  {r['case']}: {r['message'][:160]!r}")
    if not args.only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bad_inputs.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (RESULTS / "bad_inputs.md").write_text(markdown(rows), encoding="utf-8")


if __name__ == "__main__":
    main()
