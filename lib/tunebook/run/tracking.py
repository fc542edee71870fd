"""Experiment tracking: a run's train and eval loss (02), its metrics table (04) and its error counts (05) in one
tracker run, named after run_name.

`train.report_to` picks the tracker: tensorboard (event files in <run>/tensorboard/), trackio, wandb or mlflow. 02
passes it to the Trainer, which logs the losses as it trains, and records in its outputs (FinetuneOutputs.tracker)
what 04 and 05 need to reach the same run: the log dir, the wandb run id, the mlflow run id and tracking URI, the
trackio project and run name. 04 and 05 read that record (not the params: the tracker is the one 02 trained with) and
log their table there, at 02's last step, as scalars `eval/<model>/<column>` and `errors/<model>/<category>` and as
one table (markdown text in TensorBoard). API keys stay the trackers' own business (WANDB_API_KEY, `wandb login`,
MLFLOW_TRACKING_URI...): nothing here reads, records or prints one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from tunebook.errors import TunebookError
from tunebook.run.folder import Run

# train.report_to -> the PyPI package it needs (and the module it imports).
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
LOG_DIR = "tensorboard"  # in the run folder
# What 04 and 05 log: the table each recorded, the tag prefix of its scalars and the table's name.
LOGGED = {"04_evaluate": ("eval", "eval/metrics"), "05_error_analysis": ("errors", "errors/category_counts")}


def missing_package(report_to: str) -> str | None:
    """The one message for a chosen tracker whose package is not installed (None when it is, or with none)."""
    import importlib.util

    package = PACKAGES.get(report_to)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"train.report_to is {report_to}, but {package} is not installed: pip install {package} (or set train.report_to: none)."


def trainer_arguments(p) -> dict:
    """The Trainer's tracking arguments: the tracker, the run's name as the tracker's run name, and the project. A
    tracker whose package is missing stops here, with its pip install, before the Trainer fails on it less clearly."""
    problem = missing_package(p.train.report_to)
    if problem:
        raise TunebookError(problem)
    return {"report_to": p.train.report_to, "run_name": p.run_name, "project": p.train.tracker_project}


@contextmanager
def following(trainer, run_dir: Path, p, resume_step: int = 0) -> Iterator[dict]:
    """Around 02's training: the tracker set up for the Trainer's own callback, and a dict filled with what 04 and 05
    need to reach the same tracker run (empty with report_to none). TensorBoard writes into <run>/tensorboard/, cleared
    on a fresh start and, on a resume from step k, with the steps after k purged (the curve then holds each step once);
    wandb's project and mlflow's experiment are train.tracker_project; mlflow's tracking URI, when MLFLOW_TRACKING_URI is
    not set, a SQLite file in the run folder (MLflow's own default is relative to the notebook's folder)."""
    tracker = p.train.report_to
    record: dict = {}
    if tracker == "none":
        yield record
        return
    env = {"wandb": {"WANDB_PROJECT": p.train.tracker_project}, "mlflow": {"MLFLOW_EXPERIMENT_NAME": p.train.tracker_project}}.get(tracker, {})
    if tracker == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    writer = None
    if tracker == "tensorboard":
        log_dir = (Path(run_dir) / LOG_DIR).resolve()
        writer = _tensorboard_writer(trainer, log_dir, resume_step)
        record.update(tracker=tracker, run_name=p.run_name, log_dir=str(log_dir))
    else:
        trainer.add_callback(_recorder(tracker, record, p))
    failed = True
    try:
        yield record
        failed = False
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if writer is not None:
            writer.close()
        if tracker == "wandb":
            import wandb

            if wandb.run is not None:  # the Trainer leaves it open; 04 and 05 resume it by id
                wandb.finish(exit_code=1 if failed else 0)
    if record:
        print(f"Tracked in {where(record)}.")


def _tensorboard_writer(trainer, log_dir: Path, resume_step: int):
    """The SummaryWriter of the Trainer's TensorBoardCallback, opened here on the run's log dir."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if callback is None:
        raise TunebookError("train.report_to is tensorboard, but the Trainer has no TensorBoard callback (is tensorboard importable?).")
    if not resume_step and log_dir.exists():
        shutil.rmtree(log_dir)  # a fresh 02: the curves (and 04/05's values) of an earlier training are not this run's
    log_dir.mkdir(parents=True, exist_ok=True)
    # purge_step: TensorBoard hides the events at or after it in the earlier files: those steps are logged again.
    callback.tb_writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step or None)
    callback.logging_dir = str(log_dir)  # should the callback open another writer after training
    return callback.tb_writer


def _recorder(tracker: str, record: dict, p):
    """A Trainer callback run after the tracker's own (which starts the tracker run at train begin): records its id."""
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record.update(tracker=tracker, run_name=args.run_name)
            if tracker == "wandb":
                import wandb

                found = {"run_id": wandb.run.id, "project": wandb.run.project, "entity": wandb.run.entity, "url": wandb.run.url}
                record.update({k: v for k, v in found.items() if v})  # offline: no entity, no url
            elif tracker == "mlflow":
                import mlflow

                active = mlflow.active_run()
                record.update(run_id=active.info.run_id, experiment_id=active.info.experiment_id, tracking_uri=without_credentials(mlflow.get_tracking_uri()))
            elif tracker == "trackio":
                record["project"] = p.train.tracker_project

    return Recorder()


def without_credentials(uri: str) -> str:
    """A tracking URI with any user:password@ taken out, so the record never holds a secret."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def where(record: dict) -> str:
    """The tracker run in words, for messages."""
    tracker = record["tracker"]
    if tracker == "tensorboard":
        return f"TensorBoard ({record['log_dir']}; view it with `tensorboard --logdir {record['log_dir']}`)"
    if tracker == "wandb":
        return f"wandb run {record['run_id']} ({record.get('url') or record['project']})"
    if tracker == "mlflow":
        return f"mlflow run {record['run_id']} ({record['tracking_uri']})"
    return f"trackio run {record['run_name']} of project {record['project']} (`trackio show --project {record['project']}`)"


def scalars(prefix: str, table: list[dict]) -> dict[str, float]:
    """Every numeric value of a table with a `model` column, as `<prefix>/<model>/<column>`."""
    return {
        f"{prefix}/{row['model']}/{column}": float(value)
        for row in table
        for column, value in row.items()
        if column != "model" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def markdown_table(table: list[dict]) -> str:
    from tabulate import tabulate

    columns = list(dict.fromkeys(k for row in table for k in row))
    return tabulate([[row.get(c, "") for c in columns] for row in table], headers=columns, tablefmt="github")


def log_outputs(run: Run, stage: str) -> str | None:
    """Log what 04 (metrics.json) or 05 (analysis.json) recorded to the tracker run 02 recorded: its scalars at 02's
    last step and its table. Where it went, or None when 02 recorded no tracker (report_to none, or not fine-tuned
    here). The stages call it once they are complete; a failure here loses none of their outputs, and calling this
    again (in a notebook cell) logs them."""
    if run.status("02_finetune") != "complete" or not run.outputs_of("02_finetune").tracker:
        return None
    finetuned = run.outputs_of("02_finetune")
    record = finetuned.tracker
    prefix, title = LOGGED[stage]
    table, values = _recorded_table(run, stage)
    donor = run.manifest()["stages"]["02_finetune"].get("reused_from")  # a sweep copied 02 from another run
    if record["tracker"] != "tensorboard" and donor:
        print(f"02 was copied from run {donor}: its {record['tracker']} run is that run's, so this run's {stage} is not logged to it.")
        return None
    if missing_package(record["tracker"]):
        package = PACKAGES[record["tracker"]]
        raise TunebookError(
            f"{stage} is complete, but its table cannot be logged to the {record['tracker']} run 02 trained with: {package} is not installed. "
            f"pip install {package}, then run `tracking.log_outputs(run, {stage!r})` in a cell."
        )
    values = {**scalars(prefix, table), **values}
    try:
        LOGGERS[record["tracker"]](record, stage, values, title, table, finetuned.steps)
    except TunebookError:
        raise
    except Exception as e:  # a tracker's own errors (a server down, a run deleted): many types, one answer
        raise TunebookError(
            f"{stage} is complete (its outputs are written), but logging them to {where(record)} failed: {type(e).__name__}: {e}. "
            f"Fix that and run `tracking.log_outputs(run, {stage!r})` in a cell (nothing needs re-running)."
        ) from None
    print(f"Logged {len(values)} values and the table {title!r} to {where(record)}, at step {finetuned.steps}.")
    return where(record)


def _recorded_table(run: Run, stage: str) -> tuple[list[dict], dict[str, float]]:
    """The stage's table as it wrote it, and the values beside it (05: fixed / broken against base)."""
    if stage == "04_evaluate":
        return json.loads(Path(run.outputs_of(stage).metrics_json).read_text(encoding="utf-8")), {}
    analysis = json.loads(Path(run.outputs_of(stage).analysis_json).read_text(encoding="utf-8"))
    compare = analysis.get("base_vs_finetuned") or {}
    return analysis["category_counts"], {f"errors/finetuned_vs_base/{k}": float(v) for k, v in compare.items()}


def _log_tensorboard(record: dict, stage: str, values: dict, title: str, table: list[dict], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(record["log_dir"])
    for old in log_dir.glob(f"events.out.tfevents.*.{stage}"):  # a re-run stage replaces its values, as its files
        old.unlink()
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=f".{stage}")
    try:
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.add_text(title, markdown_table(table), global_step=step)
    finally:
        writer.close()


def _log_wandb(record: dict, stage: str, values: dict, title: str, table: list[dict], step: int) -> None:
    import wandb

    columns = list(dict.fromkeys(k for row in table for k in row))
    run = wandb.init(id=record["run_id"], project=record["project"], entity=record.get("entity") or None, resume="must")
    try:
        # The Trainer plots every value against train/global_step: 02's last step, as in TensorBoard.
        run.log({**values, title: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in table]), "train/global_step": step})
    finally:
        run.finish()


def _log_mlflow(record: dict, stage: str, values: dict, title: str, table: list[dict], step: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or record["tracking_uri"])
    now = int(time.time() * 1000)
    client.log_batch(record["run_id"], metrics=[Metric(tag, value, now, step) for tag, value in values.items()])
    client.log_text(record["run_id"], markdown_table(table), f"{title}.md")


def _log_trackio(record: dict, stage: str, values: dict, title: str, table: list[dict], step: int) -> None:
    import pandas as pd
    import trackio

    trackio.init(project=record["project"], name=record["run_name"], resume="must")
    try:
        trackio.log({**values, title: trackio.Table(dataframe=pd.DataFrame(table))}, step=step)
    finally:
        trackio.finish()


LOGGERS = {"tensorboard": _log_tensorboard, "wandb": _log_wandb, "mlflow": _log_mlflow, "trackio": _log_trackio}
