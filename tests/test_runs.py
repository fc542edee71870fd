import json

import pytest

from tunebook.errors import TunebookError
from tunebook.runs import open_run


@pytest.fixture
def run(write_params, tmp_path):
    return open_run(write_params("data:\n  train_path: rows.jsonl\noutput_dir: out\n"))


def test_open_run_writes_resolved_params(run, tmp_path):
    assert run.dir == (tmp_path / "out" / "default").resolve()
    assert (run.dir / "params.yaml").read_text().count("train_path") == 1


def test_stage_records_outputs_and_next_stage_reads_them(run):
    with run.stage("01_build_dataset") as outputs:
        outputs["dataset_dir"] = "somewhere"
    assert run.status("01_build_dataset") == "complete"
    assert run.outputs_of("01_build_dataset") == {"dataset_dir": "somewhere"}
    assert run.manifest()["stages"]["01_build_dataset"]["seconds"] >= 0


def test_failed_stage_is_never_complete(run):
    with pytest.raises(ZeroDivisionError):
        with run.stage("02_finetune"):
            raise ZeroDivisionError("division by zero")
    entry = json.loads(run.manifest_path.read_text())["stages"]["02_finetune"]
    assert entry["status"] == "failed" and "ZeroDivisionError" in entry["error"]
    with pytest.raises(TunebookError, match="02_finetune is failed"):
        run.outputs_of("02_finetune")


def test_missing_stage_says_what_to_run(run):
    with pytest.raises(TunebookError, match="Run notebooks/01_build_dataset.ipynb first"):
        run.outputs_of("01_build_dataset")


def test_rerun_marks_later_stages_stale(run):
    for stage in ("01_build_dataset", "02_finetune"):
        with run.stage(stage):
            pass
    with run.stage("01_build_dataset"):
        pass
    assert run.status("01_build_dataset") == "complete"
    assert run.status("02_finetune") == "stale"


def test_changed_params_keep_the_earlier_version(write_params, run):
    path = write_params("data:\n  train_path: rows.jsonl\noutput_dir: out\n")
    open_run(path, ["train.max_steps=3"])
    kept = list(run.dir.glob("params.*.yaml"))
    assert len(kept) == 1 and "max_steps: -1" in kept[0].read_text()
    assert "max_steps: 3" in (run.dir / "params.yaml").read_text()
