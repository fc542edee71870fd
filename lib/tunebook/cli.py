"""Command line: run the notebooks headless (one run or a sweep), compare runs, score a predictions file, list the
params, cache a model.

    python -m tunebook run params/default.yaml [--stages 04,05] [--set train.max_steps=10] [--resume | --overwrite]
    python -m tunebook check params/default.yaml [--stages 04,05] [--set KEY=VALUE] [--machine colab-t4]
    python -m tunebook sweep params/sweep_lora.yaml [--set KEY=VALUE] [--rerun] [--dry-run] [--parallel N] [--ray-address ADDRESS]
    python -m tunebook rounds params/squad_rag_rounds.yaml [--set KEY=VALUE] [--notebooks]
    python -m tunebook compare outputs/sweep_lora [outputs/default ...] [--model finetuned] [--sort f1] [--out DIR]
    python -m tunebook score predictions.jsonl [--jsonl-out scored.jsonl] [--metric METRIC]
    python -m tunebook params [--update-docs [docs/params.md]]
    python -m tunebook prepare-model [NAME]
    python -m tunebook card outputs/default [--license apache-2.0]
    python -m tunebook push outputs/default --repo user/name [--what adapter,merged,gguf_q8_0] [--dry-run] [--public]
    python -m tunebook home [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tunebook.checks.fit import MACHINE_NAMES
from tunebook.errors import Terminated, TunebookError, file_system_error, is_file_system_error, signal_name, sigterm_raises
from tunebook.metrics import SCORERS
from tunebook.params.load import load_params
from tunebook.params.reference import schema_markdown
from tunebook.params.schema import DEFAULT_MODEL, STAGES, stage_names
from tunebook.run.folder import Run, interruption_note, move_aside, refuse_sweep, save_params
from tunebook.run.keys import stage_key, stage_values
from tunebook.run.notebooks import execute_stage
from tunebook.run.rows import write_jsonl

PARAMS_DOC = "docs/params.md"  # the params reference page, its table generated from the schema (a test checks it)


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

    check = sub.add_parser("check", help="The preflight alone: check params, data files, model, endpoints, output folder and disk in seconds.")
    check.add_argument("params", help="A params YAML, e.g. params/default.yaml")
    check.add_argument("--stages", help="Check for these stages only, e.g. 04,05 (default: all)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a params key (repeatable)")
    check.add_argument(
        "--machine",
        choices=MACHINE_NAMES,
        help="Only the fit check, for this machine instead of the one it runs on: each stage's predicted GPU memory, RAM and disk against its limits (docs/fit.md)",
    )

    sweep = sub.add_parser("sweep", help="Expand a params file's sweep section into runs and execute them (stages shared across runs run once).")
    sweep.add_argument("params", help="A params YAML with a sweep: section, e.g. params/sweep_lora.yaml")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a params key of every run (repeatable)")
    sweep.add_argument("--rerun", action="store_true", help="Also re-run finished runs (their folders are moved aside, renamed, kept)")
    sweep.add_argument("--dry-run", action="store_true", help="List the runs and what each changes, run nothing")
    sweep.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        metavar="N",
        help="Execute up to N stages at once on Ray, each on its own GPU or cores/N CPUs (default 1: one after the other)",
    )
    sweep.add_argument("--ray-address", metavar="ADDRESS", help="Run the sweep's stages on this Ray cluster (auto: the one this machine is part of)")

    rounds = sub.add_parser(
        "rounds", help="Self-improvement rounds: round 0 (plain SFT), then rounds.count rounds that train on the model's own checked answers."
    )
    rounds.add_argument("params", help="A params YAML with rounds.count > 0, e.g. params/squad_rag_rounds.yaml")
    rounds.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a params key (repeatable)")
    rounds.add_argument("--notebooks", action="store_true", help="Execute each stage's notebook with papermill (default: the stages in this process)")

    compare = sub.add_parser("compare", help="One table of runs: the params that differ, metrics and losses, best marked; overlaid loss curves.")
    compare.add_argument("runs", nargs="+", help="Run folders, or folders of runs (a sweep's folder)")
    compare.add_argument(
        "--model", default="finetuned", help="Which row of each run's metrics to compare: finetuned (default), base, a quantized variant, or all"
    )
    compare.add_argument("--sort", help="Column to sort by (default: the first metric, best first)")
    compare.add_argument("--out", help="Folder for comparison.csv, comparison.md and loss_curves.png (default: the runs' common folder)")

    score = sub.add_parser("score", help="Score a JSONL of predictions (fields: prediction, gold_answers).")
    score.add_argument("file")
    score.add_argument("--jsonl-out", help="Write one scored row per input row here, in order")
    score.add_argument("--metric", choices=list(SCORERS), default="squad", help="Scoring rules (default: squad)")

    params_cmd = sub.add_parser("params", help="List every params key with its default and meaning (markdown).")
    params_cmd.add_argument(
        "--update-docs",
        "--update-readme",
        nargs="?",
        const=PARAMS_DOC,
        metavar="FILE",
        help=f"Rewrite the generated params table inside this file (default: {PARAMS_DOC})",
    )

    prepare = sub.add_parser("prepare-model", help="Materialize an embedded model in the cache (done on first use anyway).")
    prepare.add_argument("name", nargs="?", default=DEFAULT_MODEL)

    card = sub.add_parser("card", help="(Re)write the Hugging Face model cards of a finished run (and a GGUF copy's Ollama Modelfile where it is missing).")
    card.add_argument("run", help="A run folder, e.g. outputs/default")
    card.add_argument("--license", help="License id for the cards' metadata (default: the base model's, else unknown)")

    push = sub.add_parser("push", help="Upload a finished run's models to the Hugging Face Hub, one private repo each (token: HF_TOKEN).")
    push.add_argument("run", help="A run folder, e.g. outputs/default")
    push.add_argument("--repo", required=True, help="user/name: the merged model goes there, the adapter to user/name-adapter, a copy to user/name-<copy>")
    push.add_argument("--what", help="Comma-separated: adapter, merged and/or quantized copies by name, e.g. adapter,gguf_q8_0 (default: all the run has)")
    push.add_argument("--dry-run", action="store_true", help="List the repos, files and sizes that would be uploaded; upload nothing")
    push.add_argument("--public", action="store_true", help="Create the repos public (default: private)")
    push.add_argument("--license", help="License id for the cards' metadata (default: the base model's, else unknown)")

    home_cmd = sub.add_parser(
        "home", help="Print the repository tunebook.colab.home names; --write rewrites the Colab badges and links, the set-up cells and [project.urls] from it."
    )
    home_cmd.add_argument(
        "--write", action="store_true", help="Rewrite the notebooks, README.md, docs/ and pyproject.toml (for a fork, after editing lib/tunebook/colab/home.py)"
    )

    args = parser.parse_args(argv)
    # Every error a user can cause ends here as one message and exit code 2, never a traceback: ours (TunebookError)
    # and the file system's (a folder that cannot be created, no permission, a full disk). A SIGTERM is handled like
    # Ctrl-C, so a stage being run is recorded as interrupted.
    with sigterm_raises():
        try:
            return _command(args)
        except TunebookError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if not is_file_system_error(e):
                raise
            print(f"error: {file_system_error(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"\nInterrupted ({signal_name(e)}).", file=sys.stderr)
            return interrupted_code(e)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def interrupted_code(interrupt: KeyboardInterrupt) -> int:
    return 143 if isinstance(interrupt, Terminated) else 130  # 128 + the signal's number, as a shell reports it


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_pipeline(args.params, args.overrides, args.stages, resume=args.resume, overwrite=args.overwrite)
    if args.command == "check" and args.machine:
        from tunebook.checks.fit import fit_command

        return fit_command(load_params(args.params, args.overrides), select_stages(args.stages), args.machine)
    if args.command == "check":
        from tunebook.checks.fit import fit_command
        from tunebook.checks.preflight import check_or_stop

        params = load_params(args.params, args.overrides)
        checks = check_or_stop(params, select_stages(args.stages), args.params)
        print("No problems found.")
        if any(c.what == "fits this machine" and c.result == "ok" for c in checks):  # a warning printed its table already
            print()
            return fit_command(params, select_stages(args.stages), None)
        return 0
    if args.command == "sweep" and (args.parallel > 1 or args.ray_address):
        from tunebook.scale.sweep_parallel import run_sweep_parallel

        return run_sweep_parallel(args.params, args.overrides, parallel=args.parallel, ray_address=args.ray_address, rerun=args.rerun, dry_run=args.dry_run)
    if args.command == "sweep":
        from tunebook.scale.sweep import run_sweep

        return run_sweep(args.params, args.overrides, rerun=args.rerun, dry_run=args.dry_run)
    if args.command == "rounds":
        from tunebook.scale.rounds import run_rounds

        return run_rounds(args.params, args.overrides, notebooks=args.notebooks)
    if args.command == "compare":
        from tunebook.analysis.compare import compare_command

        return compare_command(args.runs, args.model, args.sort, args.out)
    if args.command == "score":
        return score_file(args.file, args.jsonl_out, args.metric)
    if args.command == "params":
        if args.update_docs:
            return update_params_table(Path(args.update_docs))
        print(schema_markdown())
        return 0
    if args.command == "card":
        return write_cards_command(args.run, args.license)
    if args.command == "push":
        from tunebook.sharing.hub import push

        what = [w.strip() for w in args.what.split(",") if w.strip()] if args.what is not None else None
        push(args.run, args.repo, what, dry_run=args.dry_run, public=args.public, license=args.license)
        return 0
    if args.command == "home":
        from tunebook.colab import home
        from tunebook.colab.runtime import write_home

        print(f"{home.URL} (branch {home.BRANCH})")
        for path in write_home() if args.write else []:
            print(f"rewrote {path}")
        return 0
    from tunebook.models.load import materialize_embedded

    print(materialize_embedded(args.name))
    return 0


def write_cards_command(run_dir: str, license: str | None) -> int:
    from tunebook.analysis.model_card import artifacts, write_cards
    from tunebook.quantizing.ollama import modelfile_path, write_modelfile

    if not (Path(run_dir) / "params.yaml").is_file():
        raise TunebookError(f"{run_dir} is not a run folder (no params.yaml): give a folder like outputs/<run>.")
    run = Run.load(run_dir)
    for artifact in artifacts(run):
        if artifact.library == "gguf" and not modelfile_path(artifact.path).exists():  # a run made before 03 wrote them
            print(f"wrote {write_modelfile(run, artifact.path)}")
    for path in write_cards(run, license=license):
        print(f"wrote {path}")
    return 0


def select_stages(spec: str | None) -> list[str]:
    if spec is None:  # --stages "" names no stage: refused below, not taken as all of them
        return list(STAGES)
    try:
        return stage_names(spec)
    except ValueError as e:
        if str(e).startswith("must"):
            raise TunebookError(f"--stages {spec!r} {e}; leave --stages out to run them all.") from None
        raise TunebookError(f"--stages {spec!r}: {e}.") from None


def run_pipeline(params_path: str, overrides: list[str], stages_spec: str | None, *, resume: bool = False, overwrite: bool = False) -> int:
    from tunebook.checks.preflight import check_or_stop

    params = load_params(params_path, overrides)  # fail on a typo before anything starts
    refuse_sweep(params, params_path)
    stages = select_stages(stages_spec)
    run_dir = params.run_dir
    existing = Run(params=params, dir=run_dir)
    existing.refuse_if_running()
    done = [s for s in STAGES if existing.status(s) == "complete"] if run_dir.exists() else []
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            print(f"Moved the existing run folder to {move_aside(run_dir)}")
            done = []
        elif resume:
            stale = changed_stages(existing, done)
            if stale:
                # A complete stage made with other params would be kept silently: re-run it and what follows it.
                print(
                    f"Stage {stale[0]} is complete but was made with other params ({', '.join(stale_keys(existing, stale[0]))}): re-running it and the stages after it."
                )
                done = done[: done.index(stale[0])]
            stages = [s for s in stages if s not in done]
        elif stages_spec is None:
            left = [s for s in STAGES if existing.status(s) in ("running", "interrupted")]
            raise TunebookError(
                f"Run folder {run_dir} already exists (complete stages: {', '.join(s[:2] for s in done) or 'none'}"
                f"{'; interrupted: ' + ', '.join(s[:2] for s in left) if left else ''}). "
                "Nothing was changed. Use --resume to run the missing stages, --stages 04,05 to re-run some, "
                "--overwrite to move it aside and start over, or --set run_name=NEW for a new run."
            )
    # A stage left running by a process that is gone (killed, a lost machine): said, and re-run when chosen.
    for stage, note in existing.settle_interrupted().items():
        print(f"{note}; re-running it." if stage in stages else f"{note}; `--stages {stage[:2]}` or --resume re-runs it.")
    if not stages:
        print(f"All stages of {run_dir} are complete; nothing to do.")
        return 0
    check_or_stop(params, stages, params_path)  # before anything is written
    params_file = save_params(params)
    refuse_unwritable(params_file.parent)
    started = time.time()
    for number, stage in enumerate(stages, start=1):
        print(f"\n=== [{number}/{len(stages)}] {stage} → {run_dir / 'notebooks' / (stage + '.ipynb')}", flush=True)
        stage_started = time.time()
        try:
            execute_stage(stage, params_file, params_file.parent)
        except KeyboardInterrupt as e:
            entry = existing.manifest()["stages"].get(stage, {})
            state = interruption_note(stage, entry) if entry.get("status") == "interrupted" else f"Stage {stage} was interrupted ({signal_name(e)})"
            print(
                f"\n{state}; recorded in {existing.manifest_path}.\n"
                f"`python -m tunebook run {params_path} --resume` runs the stages that are not complete"
                f"{' (02 continues from its last checkpoint)' if stage == '02_finetune' else ''}.",
                file=sys.stderr,
                flush=True,
            )
            return interrupted_code(e)
        print(f"=== {stage} done in {time.time() - stage_started:.0f}s", flush=True)
    print(f"\nRun {params.run_name} finished in {time.time() - started:.0f}s: {run_dir}")
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        import pandas as pd

        print(pd.DataFrame(json.loads(metrics.read_text(encoding="utf-8"))).to_markdown(index=False))
    return 0


def changed_stages(run: Run, done: list[str]) -> list[str]:
    """Complete stages whose recorded params key differs from the current params' (runs older than keys: none)."""
    return [s for s in done if run.key_of(s) is not None and run.key_of(s) != stage_key(run.params, s)]


def stale_keys(run: Run, stage: str) -> list[str]:
    saved = run.dir / "params.yaml"
    if not saved.is_file():
        return ["params.yaml is missing"]
    old, new = stage_values(load_params(saved), stage), stage_values(run.params, stage)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] or ["unknown keys"]


def refuse_unwritable(run_dir: Path) -> None:
    """A run folder the stages cannot write to (read-only, a full disk): said now, not after a kernel has started."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as e:
        if not is_file_system_error(e):
            raise
        raise file_system_error(
            e, operation="create", what="a file in the run folder", shown_path=run_dir, hint="The stages write their outputs there."
        ) from None


PARAMS_MARKERS = ("<!-- params-table:start -->\n", "\n<!-- params-table:end -->")


def update_params_table(page: Path) -> int:
    replace_section(page, PARAMS_MARKERS, schema_markdown())
    print(f"updated the params table in {page}")
    return 0


def replace_section(path: Path, markers: tuple[str, str], content: str) -> None:
    """Replace the text between two marker lines of a file (the generated tables of docs/params.md and bench/README.md)."""
    text = path.read_text(encoding="utf-8")
    start, end = markers
    head, _, rest = text.partition(start)
    if not rest or end not in rest:
        raise TunebookError(f"{path} has no {start.strip()} ... {end.strip()} markers (on lines of their own, in that order).")
    path.write_text(head + start + content + end + rest.split(end, 1)[1], encoding="utf-8")


def score_file(path: str, jsonl_out: str | None, metric: str = "squad") -> int:
    from tunebook.metrics import score_predictions
    from tunebook.models.families import split_reasoning
    from tunebook.run.rows import read_jsonl

    source = Path(path)
    if source.is_dir():
        raise TunebookError(f"{source} is a folder, not a predictions file: give a JSONL file (e.g. <run>/predictions/finetuned.jsonl).")
    if not source.exists():
        raise TunebookError(f"Predictions file not found: {source}")
    if jsonl_out:
        out = Path(jsonl_out)
        if out.resolve() == source.resolve():
            raise TunebookError("--jsonl-out must not be the input file (it would be overwritten).")
        if out.is_dir():
            raise TunebookError(f"--jsonl-out {out} is a folder: give a file name in it, e.g. {out / 'scored.jsonl'}.")
        if not out.parent.is_dir():  # checked before scoring, not after
            blocker = next((p for p in out.parents if p.exists()), None)
            why = f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir() else f"the folder {out.parent} does not exist"
            raise TunebookError(f"--jsonl-out {out}: {why}. Create the folder first, or write the scored rows elsewhere.")
    predictions, golds = [], []
    for number, row in enumerate(read_jsonl(source), start=1):
        prediction, gold = row.get("prediction"), row.get("gold_answers")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(prediction, str) or not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
            raise TunebookError(f"{source} row {number}: needs 'prediction' (text) and 'gold_answers' (a non-empty list of texts).")
        predictions.append(split_reasoning(prediction)[1].strip())  # a <think> block is never part of the answer
        golds.append(gold)
    if not predictions:
        raise TunebookError(f"{source}: no rows to score.")
    # Classification: the labels are the gold labels seen in the file.
    rows, summary = score_predictions(metric, predictions, golds, labels=sorted({g[0] for g in golds}))
    print(f"n={len(rows)}  " + "  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    if jsonl_out:
        out = Path(jsonl_out)
        if out.is_symlink() or (out.exists() and not out.is_file()):  # /dev/stdout, a pipe, a link: written in place, never replaced
            write_jsonl(out, rows)
            return 0
        tmp = Path(jsonl_out + ".tmp")
        try:
            write_jsonl(tmp, rows)
        except BaseException as e:
            tmp.unlink(missing_ok=True)  # a half-written file (a full disk) is not left behind
            if is_file_system_error(e):
                raise file_system_error(e, what="--jsonl-out", shown_path=out) from None
            raise
        shutil.move(tmp, jsonl_out)
    return 0
