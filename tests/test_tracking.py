"""Experiment tracking (train.report_to, tunebook.run.tracking): 02's losses, 04's metrics and 05's counts in one tracker
run, read back with TensorBoard's own reader; a missing tracker package named at preflight with its pip install."""

import importlib.util
import json

import pytest

from conftest import ROOT
from tunebook.checks import preflight
from tunebook.errors import TunebookError
from tunebook.params.load import load_params
from tunebook.run import tracking
from tunebook.run.folder import open_run
from tunebook.run.outputs import AnalysisOutputs, EvaluateOutputs, FinetuneOutputs

METRICS = [
    {"model": "base", "exact_match": 0.0, "f1": 0.125, "n": 8, "peak_memory_mb": 900.5, "bits": 16},
    {"model": "finetuned", "exact_match": 0.5, "f1": 0.625, "n": 8, "peak_memory_mb": None, "bits": 32},
]
COUNTS = [
    {"model": "base", "correct": 0, "empty": 1, "too_verbose": 5, "wrong": 2, "n": 8},
    {"model": "finetuned", "correct": 4, "empty": 0, "too_verbose": 1, "wrong": 3, "n": 8},
]


def events(log_dir):
    """TensorBoard's own reader over a log dir (every event file in it, as TensorBoard shows one run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def points(accumulator, tag):
    return [(e.step, pytest.approx(e.value)) for e in accumulator.Scalars(tag)]


def text(accumulator, tag):
    return accumulator.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def without(package, monkeypatch):
    """find_spec as if `package` were not installed (whether or not it is here)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == package else real(name, *a, **k))


def finished_run(tmp_path, tracker: dict | None, metrics=METRICS, reused_from=None):
    """A run folder whose 02, 04 and 05 are complete (recorded through Run.stage, no model): 02 with `tracker`."""
    params = tmp_path / "p.yaml"
    params.write_text(f"run_name: t\noutput_dir: {tmp_path / 'out'}\ndata: {{train_path: x.jsonl}}\n", encoding="utf-8")
    run = open_run(params)
    if tracker == TENSORBOARD:
        tracker = {**tracker, "log_dir": str(run.dir / "tensorboard")}
    with run.stage("02_finetune") as out:
        recorded = FinetuneOutputs(
            backend="hf", family="chatml", stop_ids=[2], adapter_dir="adapter", merged_dir="merged", train_log="train_log.json",
            steps=2, train_examples=4, train_seconds=1.0, train_loss=1.5, tracker=tracker,
        )  # fmt: skip
        out.update(recorded.as_json())
    if reused_from:
        manifest = run.manifest()
        manifest["stages"]["02_finetune"]["reused_from"] = reused_from
        run._write_manifest(manifest)
    log_evaluation(run, metrics)
    (run.dir / "analysis.json").write_text(json.dumps({"category_counts": COUNTS, "base_vs_finetuned": {"fixed": 4, "broken": 0}}), encoding="utf-8")
    with run.stage("05_error_analysis") as out:
        out.update(AnalysisOutputs(report_html=str(run.dir / "report.html"), analysis_json=str(run.dir / "analysis.json")).as_json())
    return run


def log_evaluation(run, metrics):
    (run.dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    with run.stage("04_evaluate") as out:
        out.update(EvaluateOutputs(metrics_json=str(run.dir / "metrics.json"), metrics_csv="", predictions={}, labels=[]).as_json())


TENSORBOARD = {"tracker": "tensorboard", "run_name": "t"}  # finished_run adds the log dir: the run's tensorboard/


def test_04_and_05_log_their_tables_to_the_tensorboard_run_of_02(tmp_path, capsys):
    run = finished_run(tmp_path, TENSORBOARD)
    assert tracking.log_outputs(run, "04_evaluate").startswith("TensorBoard (")
    tracking.log_outputs(run, "05_error_analysis")
    assert "Logged 9 values and the table 'eval/metrics'" in capsys.readouterr().out
    logged = events(run.dir / "tensorboard")
    assert points(logged, "eval/finetuned/exact_match") == [(2, 0.5)]  # at 02's last step
    assert points(logged, "eval/base/peak_memory_mb") == [(2, 900.5)]
    assert "eval/finetuned/peak_memory_mb" not in logged.Tags()["scalars"]  # no value, no point
    assert points(logged, "errors/base/too_verbose") == [(2, 5)] and points(logged, "errors/finetuned/correct") == [(2, 4)]
    assert points(logged, "errors/finetuned_vs_base/fixed") == [(2, 4)]
    assert "| finetuned |" in text(logged, "eval/metrics") and "too_verbose" in text(logged, "errors/category_counts")


def test_a_rerun_of_04_replaces_its_values_and_keeps_05s(tmp_path):
    run = finished_run(tmp_path, TENSORBOARD)
    tracking.log_outputs(run, "04_evaluate")
    tracking.log_outputs(run, "05_error_analysis")
    log_evaluation(run, [{**METRICS[0], "exact_match": 0.25}])
    tracking.log_outputs(run, "04_evaluate")
    logged = events(run.dir / "tensorboard")
    assert points(logged, "eval/base/exact_match") == [(2, 0.25)]
    assert "eval/finetuned/exact_match" not in logged.Tags()["scalars"]
    assert points(logged, "errors/finetuned/correct") == [(2, 4)]


def test_without_a_tracker_nothing_is_logged(tmp_path):
    run = finished_run(tmp_path, None)
    assert tracking.log_outputs(run, "04_evaluate") is None and not (run.dir / "tensorboard").exists()


def test_a_tracker_run_copied_from_another_run_of_a_sweep_is_not_logged_to(tmp_path, capsys):
    run = finished_run(tmp_path, {"tracker": "wandb", "run_name": "r4", "run_id": "abc", "project": "tunebook"}, reused_from="r4")
    assert tracking.log_outputs(run, "04_evaluate") is None
    assert "its wandb run is that run's" in capsys.readouterr().out


def test_a_failed_log_names_the_retry_and_loses_nothing(tmp_path, monkeypatch):
    run = finished_run(tmp_path, TENSORBOARD)

    def down(*args):
        raise ConnectionError("server down")

    monkeypatch.setitem(tracking.LOGGERS, "tensorboard", down)
    with pytest.raises(TunebookError, match=r"04_evaluate is complete .*ConnectionError: server down.*tracking.log_outputs\(run, '04_evaluate'\)"):
        tracking.log_outputs(run, "04_evaluate")
    assert run.status("04_evaluate") == "complete"


def test_a_missing_tracker_package_in_04_names_the_install(tmp_path, monkeypatch):
    run = finished_run(tmp_path, {"tracker": "mlflow", "run_name": "t", "run_id": "abc", "tracking_uri": "sqlite:///x.db"})
    without("mlflow", monkeypatch)
    with pytest.raises(TunebookError, match=r"mlflow is not installed\. pip install mlflow, then run `tracking.log_outputs"):
        tracking.log_outputs(run, "05_error_analysis")


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio", "tensorboard"])
def test_preflight_names_the_pip_install_of_a_missing_tracker(tracker, monkeypatch):
    without(tracker, monkeypatch)
    params = load_params(ROOT / "params/smoke.yaml", [f"train.report_to={tracker}"])
    with pytest.raises(preflight.PreflightError) as stopped:
        preflight.check_or_stop(params, ["02_finetune", "03_quantize", "04_evaluate", "05_error_analysis"], "smoke.yaml")
    assert f"- train.report_to is {tracker}, but {tracker} is not installed: pip install {tracker} (or set train.report_to: none)." in str(stopped.value)
    assert [c.what for c in preflight.preflight(params, ["01_build_dataset"])].count("train.report_to") == 1
    assert "train.report_to" not in [c.what for c in preflight.preflight(load_params(ROOT / "params/smoke.yaml"), ["02_finetune"])]


def test_02_without_the_tracker_package_stops_before_the_trainer_is_made(monkeypatch, tmp_path, tiny_smollm2):
    from datasets import Dataset

    from tunebook.training.train import build_trainer

    without("wandb", monkeypatch)
    params = load_params(ROOT / "params/smoke.yaml", ["train.report_to=wandb", f"model.name={tiny_smollm2}", "model.dtype=float32"])
    with pytest.raises(TunebookError, match=r"^train.report_to is wandb, but wandb is not installed: pip install wandb"):
        row = {"prompt": [{"role": "user", "content": "Capital of France?"}], "completion": [{"role": "assistant", "content": "Paris"}]}
        build_trainer(params, Dataset.from_list([row] * 2), Dataset.from_list([row]), tmp_path)


def test_preflight_passes_an_installed_tracker():
    checks = preflight.preflight(load_params(ROOT / "params/smoke.yaml", ["train.report_to=tensorboard"]), ["04_evaluate"])
    assert [(c.result, c.detail) for c in checks if c.what == "train.report_to"] == [("ok", "tensorboard installed")]


def test_tracking_uris_are_recorded_without_credentials():
    assert tracking.without_credentials("https://user:secret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert tracking.without_credentials("sqlite:////tmp/run/mlflow.db") == "sqlite:////tmp/run/mlflow.db"


def test_a_resumed_curve_holds_each_step_once(tmp_path):
    """02 resumed from the checkpoint at step 2 logs steps 3 and 4 again: the writer it gets purges them in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3, 4):  # 3 and 4 logged before the runtime was lost, after the last checkpoint
        first.add_scalar("train/loss", 10.0 - step, step)
    first.close()
    again = SummaryWriter(str(tmp_path), purge_step=3)
    for step in (3, 4, 5):
        again.add_scalar("train/loss", 1.0 / step, step)
    again.close()
    assert points(events(tmp_path), "train/loss") == [(1, 9.0), (2, 8.0), (3, 1 / 3), (4, 0.25), (5, 0.2)]


def test_a_run_with_tensorboard_holds_its_losses_metrics_and_counts(tmp_path, tiny_smollm2):
    """params/smoke.yaml with train.report_to=tensorboard (on the tiny SmolLM2-shaped model, no 03), through the stage
    functions: the Trainer's train and eval losses at their steps, 04's metrics and 05's counts at the last step."""
    from tunebook.analysis.analysis import analyze
    from tunebook.dataset.build import build_dataset
    from tunebook.evaluation.evaluate import evaluate
    from tunebook.training.train import finetune

    # float32: the tracker does not depend on the dtype, and the run not on whether this CPU computes bfloat16.
    overrides = [
        f"output_dir={tmp_path}",
        f"model.name={tiny_smollm2}",
        "model.dtype=float32",
        "train.report_to=tensorboard",
        "evaluate.models=[base,finetuned]",
    ]
    run = open_run(ROOT / "params/smoke.yaml", overrides)
    build_dataset(run)
    trained = finetune(run)
    table = evaluate(run)
    analysis = analyze(run)

    log_dir = run.dir / "tensorboard"
    assert trained.summary.tracker == {"tracker": "tensorboard", "run_name": "smoke", "log_dir": str(log_dir)}
    assert run.outputs_of("02_finetune").tracker["log_dir"] == str(log_dir)
    logged = events(log_dir)
    history = json.loads((run.dir / "train_log.json").read_text())
    assert points(logged, "train/loss") == [(h["step"], h["loss"]) for h in history if "loss" in h] and len(points(logged, "train/loss")) == 2
    assert points(logged, "eval/loss") == [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h] and len(points(logged, "eval/loss")) == 2
    for row in table:
        for metric in ("exact_match", "partial_match", "f1", "seconds"):
            assert points(logged, f"eval/{row['model']}/{metric}") == [(2, row[metric])]
    for row in analysis["counts"]:
        for category in ("correct", "empty", "too_verbose", "wrong"):
            assert points(logged, f"errors/{row['model']}/{category}") == [(2, row[category])]
    for change, count in analysis["base_vs_finetuned"].items():
        assert points(logged, f"errors/finetuned_vs_base/{change}") == [(2, count)]
    assert "| finetuned |" in text(logged, "eval/metrics") and "| finetuned |" in text(logged, "errors/category_counts")
