"""Stage 04 split over processes (`evaluate.num_processes`): one model scores N eval prompts on 1 process, then on P
processes through `accelerate launch` (one per GPU; CPU processes over gloo without one), in one run folder, through
the real stage; the times side by side, and whether the answers are the same.

    python bench/eval_split.py --prompts 1000 --processes 2 --model DIR     # GPUs: e.g. eval_throughput.py make-model's Llama-3-8B shape
    python bench/eval_split.py --prompts 16 --processes 2 --batch-size 4    # CPU: the embedded SmolLM2, a few minutes

The prompts: the default data's rows (a question and its three passages, about 560 tokens), taken in turn with their
passages rotated once per pass, so that more than its 504 rows are all different. Per case: `seconds` (04's
generation time; for P processes from the first one starting to generate to the last one finishing), `load_seconds`,
`stage_seconds` (the stage's wall time, launch and loading included) and the peak memory of the largest process.
Results merge into bench/results/eval_split.json (and .md beside it) under the machine's kind (cpu, or the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"


def eval_rows(n: int) -> list[dict]:
    """n rows of the default data, each different: row i is row i % 504 with its passages rotated i // 504 places."""
    from tunebook.run.rows import read_jsonl

    rows = read_jsonl(ROOT / "data/minipedia_rag_qa.jsonl")
    made = []
    for i in range(n):
        row, turn = dict(rows[i % len(rows)]), i // len(rows)
        shift = turn % len(row["passages"])
        made.append(row | {"id": f"{row['id']}-{turn}", "passages": row["passages"][shift:] + row["passages"][:shift]})
    return made


def overrides(args, folder: Path) -> list[str]:
    return [
        f"output_dir={folder}",
        f"model.name={args.model}",
        f"data.eval_path={folder / 'eval.jsonl'}",
        "data.allow_eval_overlap=true",  # the eval rows are training rows: only their speed is measured
        "data.max_train_examples=16",
        "evaluate.models=[base]",
        f"evaluate.batch_size={args.batch_size}",
        f"evaluate.max_new_tokens={args.new_tokens}",
    ]


def case(args, folder: Path, processes: int) -> dict:
    """04 on `processes` processes in this process's run folder: its metrics row's times, the stage's wall time, answers."""
    from tunebook.evaluation.evaluate import evaluate
    from tunebook.run.folder import open_run
    from tunebook.run.rows import read_jsonl

    run = open_run(ROOT / "params/default.yaml", [*overrides(args, folder), f"evaluate.num_processes={processes}"])
    started = time.time()
    [row] = evaluate(run)
    stage_seconds = time.time() - started
    answers = [[r["id"], r["output"]] for r in read_jsonl(run.dir / "predictions/base.jsonl")]
    keys = ("seconds", "examples_per_second", "load_seconds", "peak_memory_mb")
    return {"processes": processes, **{k: row[k] for k in keys}, "stage_seconds": round(stage_seconds, 1), "answers": answers}


def measure(args) -> dict:
    """Stage 01 once, then each case in its own process; the one-process case sees one GPU only (else device_map auto
    would spread the model over all of them)."""
    from tunebook.dataset.build import build_dataset
    from tunebook.run.folder import open_run
    from tunebook.run.rows import write_jsonl

    folder = Path(tempfile.mkdtemp(prefix="eval_split-"))
    write_jsonl(folder / "eval.jsonl", eval_rows(args.prompts))
    build_dataset(open_run(ROOT / "params/default.yaml", overrides(args, folder)))
    cases = {}
    for processes in (1, args.processes):
        out = folder / f"case_{processes}.json"
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]} if processes == 1 else {})}
        command = [sys.executable, __file__, *sys.argv[1:], "--case", str(processes), "--folder", str(folder), "--case-out", str(out)]
        subprocess.run(command, env=env, check=True)
        # Other work on the machine skews the comparison (a process of 2 threads waits on a busy core): said beside it.
        cases[f"processes_{processes}"] = json.loads(out.read_text()) | {"load_average_after": round(os.getloadavg()[0], 2)}
    answers = [c.pop("answers") for c in cases.values()]
    one, split = cases.values()
    return {
        "setup": {"prompts": args.prompts, "model": str(args.model), "batch_size": args.batch_size, "new_tokens": args.new_tokens},
        "cases": cases,
        "generation_ratio": round(split["seconds"] / one["seconds"], 3),
        "stage_ratio": round(split["stage_seconds"] / one["stage_seconds"], 3),
        "same_answers": answers[0] == answers[1],
        "machine": machine(),
    }


def report(results: dict) -> str:
    lines = ["# Stage 04 on several processes (bench/eval_split.py)", ""]
    for kind, result in results.items():
        setup = result["setup"]
        lines += [
            f"## {kind}: {setup['prompts']} prompts, batch size {setup['batch_size']}, {setup['new_tokens']} new tokens at most",
            "",
            f"Model {setup['model']}; commit {result['machine']['commit']}.",
            "",
            "| processes | generation s | examples/s | load s | stage s (launch and loading included) | peak memory MB (largest process) | load average after |",
            "|---|---|---|---|---|---|---|",
        ]
        for case in result["cases"].values():
            lines.append(
                f"| {case['processes']} | {case['seconds']} | {case['examples_per_second']} | {case['load_seconds']} | {case['stage_seconds']} "
                f"| {case['peak_memory_mb']} | {case['load_average_after']} |"
            )
        lines += [
            "",
            f"Split / one process: {result['generation_ratio']}x the generation time, {result['stage_ratio']}x the stage's. "
            f"Same answers: {'yes' if result['same_answers'] else 'NO'}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="model.name: a folder, a hub id or the embedded model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--results", type=Path, default=RESULTS / "eval_split.json", help="JSON to merge into (.md beside it)")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one case, in a process of its own (measure)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.case_out.write_text(json.dumps(case(args, args.folder, args.case)))
        return
    result = measure(args)
    kind = result["machine"]["gpu"] or "cpu"
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results[kind] = result
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.results.with_suffix(".md").write_text(report(results))
    print(report({kind: result}))


if __name__ == "__main__":
    main()
