import json

import pytest

from tunebook.errors import TunebookError
from tunebook.run.folder import open_run


@pytest.fixture
def run(write_params, tmp_path):
    return open_run(write_params("data:\n  train_path: rows.jsonl\noutput_dir: out\n"))


def test_open_run_writes_resolved_params(run, tmp_path):
    assert run.dir == (tmp_path / "out" / "default").resolve()
    assert (run.dir / "params.yaml").read_text().count("train_path") == 1


def test_stage_records_outputs_and_next_stage_reads_them_by_name(run):
    from tunebook.run.outputs import AnalysisOutputs

    with run.stage("05_error_analysis") as outputs:
        outputs.update(AnalysisOutputs(report_html="report.html", analysis_json="analysis.json").as_json())
    assert run.status("05_error_analysis") == "complete"
    assert run.outputs_of("05_error_analysis") == AnalysisOutputs(report_html="report.html", analysis_json="analysis.json")
    assert run.manifest()["stages"]["05_error_analysis"]["seconds"] >= 0


def test_recorded_outputs_from_another_tunebook_read_by_name_or_stop_clearly(run):
    """A key a newer tunebook added is ignored; one an older tunebook did not write reads as its default, or, when
    later stages cannot do without it, stops with the stage to re-run."""
    with run.stage("04_evaluate") as outputs:
        outputs.update(metrics_json="m.json", metrics_csv="m.csv", predictions={"base": "b.jsonl"}, labels=[], added_later=1)
    evaluated = run.outputs_of("04_evaluate")
    assert evaluated.predictions == {"base": "b.jsonl"} and evaluated.untrained_key is None and evaluated.reused == {}
    with run.stage("05_error_analysis") as outputs:
        outputs["report_html"] = "report.html"
    with pytest.raises(TunebookError, match=r"05_error_analysis .* records no analysis_json .* re-run that stage"):
        run.outputs_of("05_error_analysis")


def test_every_stage_has_its_outputs_record():
    from tunebook.params.schema import STAGES
    from tunebook.run.outputs import BY_STAGE

    assert list(BY_STAGE) == list(STAGES)


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


def test_build_once_keeps_the_first_finished_copy_and_leaves_no_temp_folder(tmp_path):
    from tunebook.run.files import build_once

    entry = tmp_path / "cache" / "model-v1"
    with build_once(entry) as first, build_once(entry) as second:  # two processes building the same entry
        assert first != second and first.parent == second.parent == entry.parent
        (first / "weights").write_text("first")
        (second / "weights").write_text("second")
    assert (entry / "weights").read_text() == "second"  # the inner block finished first
    with pytest.raises(RuntimeError), build_once(tmp_path / "cache" / "broken") as building:
        (building / "half").write_text("written")
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model-v1"]
