"""Command line: run the notebooks headless, score a predictions file, list the params, cache a model.

    python -m tunebook run params/default.yaml [--stages 04,05] [--set train.max_steps=10] [--resume | --overwrite]
    python -m tunebook score predictions.jsonl [--jsonl-out scored.jsonl] [--metric squad|hotpot|japanese|classification|faq]
    python -m tunebook params [--update-readme README.md]
    python -m tunebook prepare-model [NAME]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from tunebook.config import DEFAULT_MODEL, load_params, schema_markdown
from tunebook.errors import TunebookError
from tunebook.metrics import SCORERS
from tunebook.runs import STAGES, Run, save_params

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebook", description="tunebook: fine-tune a small LLM for one task.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="Execute the numbered notebooks with papermill into outputs/<run>/.")
    run.add_argument("params", help="A params YAML, e.g. params/default.yaml")
    run.add_argument("--stages", help="Comma-separated stage numbers to (re)run, e.g. 04,05 (default: all)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a params key (repeatable)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="Run only the stages of an existing run that are not complete")
    mode.add_argument("--overwrite", action="store_true", help="Move an existing run folder aside (renamed, kept) and start over")

    score = sub.add_parser("score", help="Score a JSONL of predictions (fields: prediction, gold_answers).")
    score.add_argument("file")
    score.add_argument("--jsonl-out", help="Write one scored row per input row here, in order")
    score.add_argument("--metric", choices=list(SCORERS), default="squad", help="Scoring rules (default: squad)")

    params_cmd = sub.add_parser("params", help="List every params key with its default and meaning (markdown).")
    params_cmd.add_argument("--update-readme", metavar="README", help="Rewrite the generated params table inside this file")

    prepare = sub.add_parser("prepare-model", help="Materialize an embedded model in the cache (done on first use anyway).")
    prepare.add_argument("name", nargs="?", default=DEFAULT_MODEL)

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_pipeline(args.params, args.overrides, args.stages, resume=args.resume, overwrite=args.overwrite)
        if args.command == "score":
            return score_file(args.file, args.jsonl_out, args.metric)
        if args.command == "params":
            if args.update_readme:
                return update_readme_table(Path(args.update_readme))
            print(schema_markdown())
            return 0
        from tunebook.models import materialize_embedded

        print(materialize_embedded(args.name))
        return 0
    except TunebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def select_stages(spec: str | None) -> list[str]:
    if not spec:
        return list(STAGES)
    chosen = []
    for item in spec.split(","):
        matches = [s for s in STAGES if s.startswith(item.strip().zfill(2))] if item.strip() else []
        if len(matches) != 1:
            raise TunebookError(f"--stages {spec!r}: '{item}' is not a stage. Stages: {', '.join(s[:2] + ' (' + s[3:] + ')' for s in STAGES)}.")
        chosen.append(matches[0])
    return [s for s in STAGES if s in chosen]


def run_pipeline(params_path: str, overrides: list[str], stages_spec: str | None, *, resume: bool = False, overwrite: bool = False) -> int:
    params = load_params(params_path, overrides)  # fail on a typo before anything starts
    stages = select_stages(stages_spec)
    run_dir = params.run_dir
    existing = Run(params=params, dir=run_dir)
    done = [s for s in STAGES if existing.status(s) == "complete"] if run_dir.exists() else []
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
            run_dir.rename(aside)
            print(f"Moved the existing run folder to {aside}")
            done = []
        elif resume:
            stages = [s for s in stages if s not in done]
        elif not stages_spec:
            raise TunebookError(
                f"Run folder {run_dir} already exists (complete stages: {', '.join(s[:2] for s in done) or 'none'}). "
                "Nothing was changed. Use --resume to run the missing stages, --stages 04,05 to re-run some, "
                "--overwrite to move it aside and start over, or --set run_name=NEW for a new run."
            )
    params_file = save_params(params)
    if not stages:
        print(f"All stages of {run_dir} are complete; nothing to do.")
        return 0
    import papermill as pm

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    executed = run_dir / "notebooks"
    executed.mkdir(exist_ok=True)
    started = time.time()
    for number, stage in enumerate(stages, start=1):
        print(f"\n=== [{number}/{len(stages)}] {stage} → {executed / (stage + '.ipynb')}", flush=True)
        stage_started = time.time()
        try:
            pm.execute_notebook(
                str(NOTEBOOKS / f"{stage}.ipynb"),
                str(executed / f"{stage}.ipynb"),
                parameters={"params_path": str(params_file), "overrides": []},
                cwd=str(NOTEBOOKS),
                kernel_name=_kernel_name(),
                log_output=True,
                progress_bar=False,
            )
        except pm.PapermillExecutionError as e:
            raise TunebookError(
                f"Stage {stage} failed: {e.ename}: {e.evalue}\nThe executed notebook with the full traceback: {executed / (stage + '.ipynb')}"
            ) from None
        print(f"=== {stage} done in {time.time() - stage_started:.0f}s", flush=True)
    print(f"\nRun {params.run_name} finished in {time.time() - started:.0f}s: {run_dir}")
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        print(_markdown_table(json.loads(metrics.read_text(encoding="utf-8"))))
    return 0


README_MARKERS = ("<!-- params-table:start -->\n", "\n<!-- params-table:end -->")


def update_readme_table(readme: Path) -> int:
    replace_section(readme, README_MARKERS, schema_markdown())
    print(f"updated the params table in {readme}")
    return 0


def replace_section(path: Path, markers: tuple[str, str], content: str) -> None:
    """Replace the text between two marker lines of a file (the README's generated tables)."""
    text = path.read_text(encoding="utf-8")
    start, end = markers
    if start not in text or end not in text:
        raise TunebookError(f"{path} has no {start.strip()} ... {end.strip()} markers.")
    head, rest = text.split(start, 1)
    path.write_text(head + start + content + end + rest.split(end, 1)[1], encoding="utf-8")


def _kernel_name() -> str:
    """The kernel `make setup` registers for this environment, else the default python3 (Colab, GPU hosts)."""
    from jupyter_client.kernelspec import KernelSpecManager

    return "tunebook" if "tunebook" in KernelSpecManager().find_kernel_specs() else "python3"


def score_file(path: str, jsonl_out: str | None, metric: str = "squad") -> int:
    from tunebook.data import read_jsonl
    from tunebook.metrics import score_predictions

    source = Path(path)
    if not source.is_file():
        raise TunebookError(f"Predictions file not found: {source}")
    if jsonl_out and Path(jsonl_out).resolve() == source.resolve():
        raise TunebookError("--jsonl-out must not be the input file (it would be overwritten).")
    predictions, golds = [], []
    for number, row in enumerate(read_jsonl(source), start=1):
        prediction, gold = row.get("prediction"), row.get("gold_answers")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(prediction, str) or not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
            raise TunebookError(f"{source} row {number}: needs 'prediction' (text) and 'gold_answers' (a non-empty list of texts).")
        predictions.append(prediction)
        golds.append(gold)
    if not predictions:
        raise TunebookError(f"{source}: no rows to score.")
    # Classification: the labels are the gold labels seen in the file.
    rows, summary = score_predictions(metric, predictions, golds, labels=sorted({g[0] for g in golds}))
    print(f"n={len(rows)}  " + "  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    if jsonl_out:
        tmp = Path(jsonl_out + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        shutil.move(tmp, jsonl_out)
    return 0


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
