"""When labels are few, measured: teacher-written rows for classification, and self-improvement rounds.

    python bench/labels_few.py [--tiny] [--only livedoor_real livedoor_teacher livedoor_teacher_no_check squad_rounds]
                               [--model NAME] [--datasets DIR] [--out DIR] [--results DIR] [--copy-to DIR]
    python bench/labels_few.py report bench/results/labels_few.json     # its .md written again from the JSON

The embedded SmolLM2-135M-Instruct is the student and, run locally through transformers (tunebook.teacher.client's local
path, no server), the teacher. Training uses Unsloth where it is installed with a GPU (model.backend auto), else
transformers + PEFT. Each case runs in its own process (`python bench/labels_few.py case NAME ...`), its stages as the
notebooks run them (the library calls each notebook makes), on the shipped recipes:
- livedoor_real: params/livedoor_genre.yaml: the base model and the model trained on the real rows;
- livedoor_teacher: params/livedoor_teacher.yaml: the model trained on the teacher's rows only (label check on);
- livedoor_teacher_no_check: the same without the label check (what the check costs or saves with a 135M teacher);
- squad_rounds: params/squad_rag_rounds.yaml through `tunebook.scale.rounds`: exact match after plain SFT (round 0), round 1
  and round 2, with the kept share of each round (the loop may stop early, and says so).
The three livedoor cases are scored on the same 90 real eval rows (the same file, seed and eval_size; checked: the eval
ids' hash must match), and every squad round on round 0's 300 eval rows. GPU sizes (about 8 minutes on one H100):
livedoor as the recipes say (360 real training rows or 40 teacher rows per genre, 5 epochs); squad with its training
rows capped at 300 and 2 epochs a round, 4 samples per question. --tiny: a few rows and steps, to run end to end on a
CPU (the squad rounds then keep every answer that is not empty: two training steps teach no exact one). Writes
labels_few.json and .md (--tiny: labels_few.tiny.json and .md) in --results (default bench/results), keeping the cases
of an earlier call that --only left out (the GPU run fits two calls of the device tool's 10 minutes). The shared data
samples are read from --datasets (default ../shared/datasets beside the repository); --model names the model that is
both student and teacher (default the embedded SmolLM2-135M-Instruct; on the GPU machine its plain copy, $SMOLLM2_HF).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
RESULTS = ROOT / "bench" / "results"
LIVEDOOR = "livedoor_news/livedoor_news.stratified_sample.jsonl"
SQUAD = "squad_v1.1/squad_dev_v1.1.sample.jsonl"
STAGES = ("01_build_dataset", "02_finetune", "04_evaluate")

# name: (recipe, overrides on a GPU, overrides with --tiny)
LIVEDOOR_TINY = ["data.max_train_examples=16", "data.max_eval_examples=18", "train.max_steps=2", "train.grad_accum=1", "train.eval_loss_examples=4"]
TEACHER_TINY = [*LIVEDOOR_TINY, "synthesize.labelled.examples_per_label=2", "synthesize.teacher.max_new_tokens=96"]
CASES = {
    "livedoor_real": ("livedoor_genre", ["evaluate.models=[base,finetuned]"], ["evaluate.models=[base,finetuned]", *LIVEDOOR_TINY]),
    "livedoor_teacher": ("livedoor_teacher", ["evaluate.models=[finetuned]"], ["evaluate.models=[finetuned]", *TEACHER_TINY]),
    "livedoor_teacher_no_check": (
        "livedoor_teacher",
        ["evaluate.models=[finetuned]", "synthesize.labelled.label_check=false"],
        ["evaluate.models=[finetuned]", "synthesize.labelled.label_check=false", *TEACHER_TINY],
    ),
    "squad_rounds": (
        "squad_rag_rounds",
        ["data.max_train_examples=300", "train.epochs=2", "evaluate.batch_size=64", "rounds.stages=01,02,04"],
        [
            "data.max_train_examples=12",
            "data.eval_size=8",
            "train.max_steps=2",
            "train.grad_accum=1",
            "train.eval_loss_examples=4",
            "rounds.samples=2",
            "rounds.min_score=0",  # 2 steps teach no exact answer: keep every answer that is not empty, so the rounds run
            "rounds.stages=01,02,04",
        ],
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", help="(internal) case NAME: run one case in this process")
    parser.add_argument("--tiny", action="store_true", help="a few rows and steps: end to end on a CPU")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run these cases only")
    parser.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"), help="the shared data samples' folder")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "labels_few"), help="where the runs are made")
    parser.add_argument("--results", default=str(RESULTS), help="where labels_few.json and .md are written (cases of an earlier call kept)")
    parser.add_argument("--copy-to", help="a folder the results are copied to as well")
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="the student and the (local) teacher")
    args = parser.parse_args()
    if args.what and args.what[0] == "report":  # the table again from a results file (e.g. one brought back from the GPU machine)
        results = json.loads(Path(args.what[1]).read_text(encoding="utf-8"))
        Path(args.what[1]).with_suffix(".md").write_text(markdown(results) + "\n", encoding="utf-8")
        return 0
    if args.what:
        result = run_case(args.what[1], args.tiny, Path(args.datasets), Path(args.out), args.model)
        (Path(args.out) / f"{args.what[1]}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        return 0
    stem, where = "labels_few.tiny" if args.tiny else "labels_few", Path(args.results)
    earlier = where / f"{stem}.json"  # cases run by an earlier call (--only) are kept: one call may not hold them all
    results = json.loads(earlier.read_text(encoding="utf-8")) if earlier.exists() else {"cases": {}}
    results.update(environment=environment(), tiny=args.tiny)
    for name in args.only or list(CASES):
        part = Path(args.out) / f"{name}.json"
        part.unlink(missing_ok=True)
        command = [
            sys.executable,
            __file__,
            "case",
            name,
            "--datasets",
            args.datasets,
            "--out",
            args.out,
            "--model",
            args.model,
            *(["--tiny"] if args.tiny else []),
        ]
        print(f"\n##### {name}: {' '.join(command[1:])}", flush=True)
        case_started = time.time()
        done = subprocess.run(command, cwd=ROOT)
        if part.exists():
            results["cases"][name] = json.loads(part.read_text(encoding="utf-8"))
        else:
            results["cases"][name] = {"error": f"the case's process ended with exit code {done.returncode} and wrote no result"}
        results["cases"][name]["process_seconds"] = round(time.time() - case_started, 1)
    results["seconds"] = round(sum(c.get("process_seconds", 0) for c in results["cases"].values()), 1)
    results["checks"] = same_eval_rows(results["cases"])
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{stem}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(results)
    (where / f"{stem}.md").write_text(table + "\n", encoding="utf-8")
    print(f"\n{table}\n\nWritten: {where / (stem + '.json')}, {where / (stem + '.md')}")
    if args.copy_to:  # e.g. the device tool's $OUT, emptied before each call
        for suffix in (".json", ".md"):
            shutil.copy2(where / (stem + suffix), Path(args.copy_to) / (stem + suffix))
    return 0


# ------------------------------------------------------------------------------------------- one case


def run_case(name: str, tiny: bool, datasets: Path, out: Path, model: str) -> dict:
    recipe, gpu, cpu = CASES[name]
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, and a fresh teacher cache: measured from nothing
    data = datasets / (SQUAD if recipe == "squad_rag_rounds" else LIVEDOOR)
    common = [f"data.train_path={data}", f"output_dir={out}", f"run_name={name}", "quantize.methods=[]", f"model.name={model}"]
    common += [f"synthesize.teacher.model={model}", f"synthesize.teacher.cache_dir={folder}.teacher"]
    shutil.rmtree(f"{folder}.teacher", ignore_errors=True)
    overrides = [*common, *(cpu if tiny else gpu)]
    started = time.time()
    try:
        result = rounds_case(recipe, overrides, folder) if recipe == "squad_rag_rounds" else livedoor_case(recipe, overrides)
    except Exception as e:  # noqa: BLE001  (recorded: a case that fails is a result, e.g. a teacher whose rows were all dropped)
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"recipe": f"params/{recipe}.yaml", "overrides": overrides, **result, "seconds": round(time.time() - started, 1)}


def livedoor_case(recipe: str, overrides: list[str]) -> dict:
    from tunebook.dataset.build import build_dataset
    from tunebook.evaluation.evaluate import evaluate
    from tunebook.run.folder import open_run
    from tunebook.training.train import finetune

    run = open_run(ROOT / "params" / f"{recipe}.yaml", overrides)
    built = build_dataset(run)
    finetune(run)
    table = {row["model"]: row for row in evaluate(run)}
    finetuned = run.outputs_of("02_finetune")
    result = {
        "train_rows": len(built.train),
        "eval_rows": len(built.eval),
        "eval_ids_sha256": ids_hash([e["id"] for e in built.eval]),
        "backend": finetuned.backend,
        "steps": finetuned.steps,
        "stage_seconds": stage_seconds(run),
        "accuracy": {m: row["accuracy"] for m, row in table.items()},
        "macro_f1": {m: row["macro_f1"] for m, row in table.items()},
    }
    s = built.summary.synthetic
    if s:
        result["teacher_rows"] = {
            "asked": s["requests"],
            "kept": s["steps"][-1]["kept"],
            "steps": {r["step"]: r["removed"] for r in s["steps"][1:]},
            "kept_per_label": {r["label"]: r["kept"] for r in s["per_label"]},
            "teacher": {k: s["teacher"][k] for k in ("requests", "cache_hits", "failed", "completion_tokens", "seconds")},
        }
    return result


def rounds_case(recipe: str, overrides: list[str], folder: Path) -> dict:
    from tunebook.run.folder import Run
    from tunebook.run.rows import read_jsonl
    from tunebook.scale.rounds import RoundsError, run_rounds

    error = None
    try:
        run_rounds(ROOT / "params" / f"{recipe}.yaml", overrides)
    except RoundsError as e:  # a round that kept nothing: the rounds before it are results
        error = str(e)
    state = json.loads((folder / "rounds.json").read_text(encoding="utf-8"))
    per_round = {}
    for name in state["order"]:
        record = state["runs"].get(name, {})
        row = {k: record.get(k) for k in ("status", "questions", "samples", "kept", "kept_share", "train_rows")}
        if (folder / name / "metrics.json").exists():
            metrics = {r["model"]: r for r in json.loads((folder / name / "metrics.json").read_text(encoding="utf-8"))}
            row |= {f"{m}_{k}": metrics[m][k] for m in metrics for k in ("exact_match", "f1")}
            run = Run.load(folder / name)
            row |= {"backend": run.outputs_of("02_finetune").backend, "stage_seconds": stage_seconds(run)}
        if (folder / name / "grow" / "grow.json").exists():
            row["grow_seconds"] = json.loads((folder / name / "grow" / "grow.json").read_text(encoding="utf-8"))["seconds"]
        per_round[name] = row
    eval_rows = [json.loads(line)["id"] for line in (folder / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    first = Run.load(folder / "round-0")
    result = {
        "train_rows": len(read_jsonl(first.dir / "dataset" / "train.jsonl")),
        "eval_rows": len(eval_rows),
        "eval_ids_sha256": ids_hash(eval_rows),
        "rounds": per_round,
        "stopped": state.get("stopped"),
    }
    return result | ({"error": error} if error else {})


def stage_seconds(run) -> dict:
    stages = run.manifest()["stages"]
    return {s[:2]: stages[s].get("seconds") for s in STAGES if s in stages}


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- report


def same_eval_rows(cases: dict) -> dict:
    """The livedoor cases must be scored on the same eval rows: their ids' hashes, and whether they agree."""
    hashes = {n: c.get("eval_ids_sha256") for n, c in cases.items() if n.startswith("livedoor") and c.get("eval_ids_sha256")}
    return {"livedoor_eval_ids": hashes, "livedoor_same_eval_rows": len(set(hashes.values())) <= 1}


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    for package in ("transformers", "trl", "peft", "unsloth"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001  (not installed)
            info[package] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    return info


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(results: dict) -> str:
    env, cases = results["environment"], results["cases"]
    lines = [
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, unsloth {env['unsloth'] or 'not installed'}; commit {env['commit']}"
        + ("; --tiny (a few rows and steps: the pipeline, not the numbers)" if results["tiny"] else "")
        + f"; {results['seconds'] / 60:.1f} min in all.",
        "",
        "livedoor genres (9 classes), the same eval rows each time"
        + ("" if results["checks"]["livedoor_same_eval_rows"] else " — CHECK FAILED: the eval rows differ")
        + ":",
        "",
        "| model | train rows | accuracy | macro-F1 | backend | minutes |",
        "|---|---|---|---|---|---|",
    ]
    real = cases.get("livedoor_real", {})
    if "accuracy" in real:
        lines.append(f"| base model | – | {real['accuracy']['base']:.3f} | {real['macro_f1']['base']:.3f} | – | – |")
    for name, label in (
        ("livedoor_teacher", "teacher rows only (label check)"),
        ("livedoor_teacher_no_check", "teacher rows only (no label check)"),
        ("livedoor_real", "real rows"),
    ):
        case = cases.get(name)
        if not case:
            continue
        if "accuracy" not in case:
            lines.append(f"| {label} | – | failed: {case.get('error', '?')[:120]} | | | {case.get('seconds', 0) / 60:.1f} |")
            continue
        kept = f" (of {case['teacher_rows']['asked']} written)" if "teacher_rows" in case else ""
        lines.append(
            f"| {label} | {case['train_rows']}{kept} | {case['accuracy']['finetuned']:.3f} | {case['macro_f1']['finetuned']:.3f} | {case['backend']} | {case['seconds'] / 60:.1f} |"
        )
    for name in ("livedoor_teacher", "livedoor_teacher_no_check"):
        rows = cases.get(name, {}).get("teacher_rows")
        if rows:
            lines += ["", f"{name}: teacher rows kept per genre: " + ", ".join(f"{k} {v}" for k, v in rows["kept_per_label"].items())]
            lines.append("dropped by step: " + ", ".join(f"{k} {v}" for k, v in rows["steps"].items()))
    squad = cases.get("squad_rounds", {})
    if "rounds" in squad:
        lines += [
            "",
            f"squad_rag self-improvement rounds ({squad['train_rows']} training questions, {squad['eval_rows']} eval rows, the same each round):",
            "",
            "| round | exact match | F1 | kept share | answers kept | training rows | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in squad["rounds"].items():
            cells = [r.get("finetuned_exact_match"), r.get("finetuned_f1"), r.get("kept_share")]
            em, f1, share = ("–" if x is None else f"{x:.3f}" for x in cells)
            lines.append(
                f"| {name} | {em} | {f1} | {share} | {r.get('kept') if r.get('kept') is not None else '–'} | {r.get('train_rows') or '–'} | {r.get('status')} |"
            )
        base = squad["rounds"].get("round-0", {}).get("base_exact_match")
        if base is not None:
            lines.append(f"\nBase model exact match: {base:.3f}.")
        if squad.get("stopped"):
            lines.append(f"\n{squad['stopped']}")
        if squad.get("error") and squad["error"] != squad.get("stopped"):
            lines.append(f"\n{squad['error']}")
    elif squad:
        lines += ["", f"squad_rounds failed: {squad.get('error')}"]
    command = "python bench/labels_few.py" + (" --tiny" if results["tiny"] else " --model $SMOLLM2_HF")
    lines += ["", f"Produced by `{command}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
