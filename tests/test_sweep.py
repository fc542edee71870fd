"""Sweeps without running notebooks: grid and variant expansion, stage keys, copying a shared stage, the comparison
table's best marks and sort order."""

import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from tunebook.analysis.compare import best_rows, sort_table, to_markdown
from tunebook.errors import TunebookError
from tunebook.evaluation.evaluate import untrained_key
from tunebook.params.load import validate_params
from tunebook.params.schema import ParamsError
from tunebook.run.folder import Run, adopt_stage, open_run
from tunebook.run.keys import stage_key
from tunebook.scale.sweep import expand, prepare_run

BASE = "run_name: lora\noutput_dir: out\ndata:\n  train_path: rows.jsonl\n"


def test_every_variant_at_every_grid_point(write_params, tmp_path):
    path = write_params(
        BASE
        + "sweep:\n  stages: '01,02,04'\n  variants:\n    - {name: short, set: {train.epochs: 1}}\n    - {name: long, set: {train.epochs: 3, train.learning_rate: 1.0e-4}}\n"
        "  grid:\n    train.lora_r: [16, 64]\n    train.target_modules: {all: all-linear, qv: [q_proj, v_proj]}\n"
    )
    sweep_params, runs = expand(path)
    assert sweep_params.sweep.stages == ["01_build_dataset", "02_finetune", "04_evaluate"]
    assert [r.name for r in runs] == [f"{v}.lora_r-{r}.{t}" for v in ("short", "long") for r in (16, 64) for t in ("all", "qv")]
    last = runs[-1]
    assert last.changes == {"train.epochs": 3, "train.learning_rate": 1e-4, "train.lora_r": 64, "train.target_modules": ["q_proj", "v_proj"]}
    assert (last.params.train.epochs, last.params.train.lora_r, last.params.train.target_modules) == (3, 64, ["q_proj", "v_proj"])
    assert runs[0].params.train.learning_rate == 2e-4  # a key no variant sets keeps the file's value
    assert last.params.run_name == last.name and last.params.run_dir == (tmp_path / "out" / "lora" / last.name).resolve()
    assert all(r.params.sweep.grid == {} for r in runs)  # each run's params.yaml is a plain run


def test_grid_alone_names_runs_by_key_and_value(write_params, tmp_path):
    (tmp_path / "b.jsonl").write_text("")
    path = write_params(BASE + "sweep:\n  grid:\n    data.train_path: [rows.jsonl, b.jsonl]\n    train.neftune_noise_alpha: [null, 5]\n")
    _, runs = expand(path, ["seed=7"])
    assert [r.name for r in runs] == [f"train_path-{f}.neftune_noise_alpha-{n}" for f in ("rows.jsonl", "b.jsonl") for n in ("none", "5")]
    # Paths in a sweep resolve against the params file's folder, like the file's own keys; --set applies to every run.
    assert {r.params.data.train_path for r in runs} == {str(tmp_path / "rows.jsonl"), str(tmp_path / "b.jsonl")}
    assert {r.params.seed for r in runs} == {7}


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("  grid:\n    train.lora_rank: [8, 16]\n", r"sweep run 'lora_rank-8'.*unknown key 'train.lora_rank'. Did you mean 'train.lora_r'"),
        ("  grid:\n    train.lora_r: [8, -1]\n", r"sweep run 'lora_r--1'.*'train.lora_r': Input should be greater than or equal to 1"),
        ("  grid:\n    train.lora_r: []\n", r"sweep.grid.train.lora_r has no values"),
        ("  grid:\n    run_name: [a, b]\n", r"cannot vary \['run_name'\]"),
        (
            "  grid:\n    train.lora_r: [8]\n  variants:\n    - {name: a, set: {train.lora_r: 4}}\n",
            r"variant 'a' sets \['train.lora_r'\], which sweep.grid varies too",
        ),
        ("  variants:\n    - {name: a}\n    - {name: a}\n", r"names must be distinct: \['a'\]"),
        ("  variants:\n    - {name: a b}\n", r"sweep.variants.0.name"),
        ("  stages: [1, 7]\n  variants:\n    - {name: a}\n", r"'7' is not a stage"),
        ("  grid:\n    train.lora_r.x: [1]\n", r"'train.lora_r': Input should be a valid integer \(got \{'x': 1\}\)"),
        ("  grid:\n    train.lora_r: {'r 8': 8}\n", r"value names \['r 8'\] must be usable in a folder name"),
        ("  stages: ['01']\n", r"no sweep.grid or sweep.variants: nothing to sweep"),
    ],
)
def test_a_wrong_sweep_is_one_message_before_anything_runs(write_params, tmp_path, sweep, message):
    path = write_params(BASE + "sweep:\n" + sweep)
    with pytest.raises(ParamsError, match="(?s)" + message):
        expand(path)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_wrong_sweep_without_traceback(write_params):
    path = write_params(BASE + "sweep:\n  grid:\n    train.lora_rank: [8]\n")
    result = subprocess.run([sys.executable, "-m", "tunebook", "sweep", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Did you mean 'train.lora_r'" in result.stderr and "Traceback" not in result.stderr


def test_a_sweep_file_is_not_run_as_one_run(write_params):
    path = write_params(BASE + "sweep:\n  grid:\n    train.lora_r: [8]\n")
    result = subprocess.run([sys.executable, "-m", "tunebook", "run", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and f"has a sweep section: run it with `python -m tunebook sweep {path}`" in result.stderr
    with pytest.raises(TunebookError, match="has a sweep section"):
        open_run(path)  # what each notebook does first


def params(**sections):
    raw = {"data": {"train_path": "/x/rows.jsonl"}}
    for key, value in sections.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return validate_params(raw)


STAGES = ("01_build_dataset", "02_finetune", "03_quantize", "04_evaluate")


def keys(p):
    return [stage_key(p, s) for s in STAGES]


@pytest.mark.parametrize(
    "change, same_up_to",
    [
        ({"train__lora_r": 64}, "01_build_dataset"),  # a LoRA sweep shares the dataset
        ({"model__dtype": "bfloat16"}, "01_build_dataset"),  # read from 02 on
        ({"quantize__group_size": 64}, "02_finetune"),
        ({"evaluate__batch_size": 4}, "03_quantize"),
        ({"evaluate__metric": "faq"}, None),  # 01 reads the metric (a classification run's labels)
        ({"prompt__instruction": "Answer."}, None),
        ({"seed": 1}, None),
    ],
)
def test_stage_keys_change_from_the_first_stage_that_reads_a_key(change, same_up_to):
    base = params()
    changed = validate_params({**base.model_dump(mode="json"), **change}) if "seed" in change else params(**change)
    shared = STAGES.index(same_up_to) + 1 if same_up_to else 0
    assert keys(base)[:shared] == keys(changed)[:shared]
    assert keys(base)[shared:] != keys(changed)[shared:] and all(a != b for a, b in zip(keys(base)[shared:], keys(changed)[shared:]))


def test_untrained_rows_share_a_key_across_training_and_quantization_changes():
    base = untrained_key(params())
    assert untrained_key(params(train__lora_r=64, quantize__group_size=64, evaluate__models=["base"])) == base
    assert untrained_key(params(evaluate__max_new_tokens=9)) != base
    assert untrained_key(params(model__name="HuggingFaceTB/SmolLM2-360M-Instruct")) != base
    # Where a run lives and how it was launched are not what it computes.
    assert untrained_key(validate_params({**params().model_dump(mode="json"), "run_name": "other", "output_dir": "/elsewhere"})) == base


def test_adopted_stage_copies_files_and_points_at_the_copies(write_params, tmp_path):
    donor = open_run(write_params(BASE, "a.yaml"), ["run_name=donor"])
    run = open_run(write_params(BASE, "b.yaml"), ["run_name=taker"])
    (donor.dir / "dataset").mkdir()
    (donor.dir / "dataset" / "train.jsonl").write_text('{"q": 1}\n')
    with donor.stage("01_build_dataset") as outputs:
        outputs.update(train_jsonl=str(donor.dir / "dataset" / "train.jsonl"), counts={"rows": [str(donor.dir / "dataset")]}, n=1)
    with run.stage("01_build_dataset"):
        pass
    with run.stage("02_finetune"):
        pass
    adopt_stage(run, donor, "01_build_dataset")
    entry = run.manifest()["stages"]["01_build_dataset"]
    assert entry["status"] == "complete" and entry["reused_from"] == "donor" and entry["key"] == donor.key_of("01_build_dataset")
    assert entry["outputs"] == {"train_jsonl": str(run.dir / "dataset" / "train.jsonl"), "counts": {"rows": [str(run.dir / "dataset")]}, "n": 1}
    assert (run.dir / "dataset" / "train.jsonl").read_text() == '{"q": 1}\n'
    assert run.status("02_finetune") == "stale"  # built on the dataset it had before


def test_best_marks_and_sort_directions():
    table = pd.DataFrame(
        {"run": ["a", "b", "c"], "train.lora_r": [16, 64, 8], "f1": [0.5, 0.7, 0.7], "eval_loss": [1.2, 0.9, 1.5], "exact_match": [0.3, 0.3, 0.3]}
    )
    assert best_rows(table) == {"f1": [1, 2], "eval_loss": [1]}  # ties are all marked; a column where all tie is not
    assert list(sort_table(table)["run"]) == ["a", "b", "c"]  # by the first metric (exact_match): all tie, order kept
    assert list(sort_table(table, "f1")["run"]) == ["b", "c", "a"]  # best first
    assert list(sort_table(table, "eval_loss")["run"]) == ["b", "a", "c"]  # lower loss first
    assert list(sort_table(table, "eval_loss", best_first=False)["run"]) == ["c", "a", "b"]
    assert list(sort_table(table, "train.lora_r")["run"]) == ["c", "a", "b"]
    markdown = to_markdown(table)
    assert "**0.7**" in markdown and "**0.9**" in markdown and "**0.3**" not in markdown
    assert "Best f1: b, c (0.7)" in markdown and "Best eval_loss: b (0.9)" in markdown
    prompts = table.assign(**{"prompt.instruction": ["Answer.\nShort|exact", "x" * 200, None]})
    rows = to_markdown(prompts).split("\n\n")[0].splitlines()
    assert len(rows) == 5 and "Answer. Short\\|exact" in rows[2] and "x" * 79 + "…" in rows[3]  # one line per run
    with pytest.raises(TunebookError, match="--sort accuracy: no such column. Columns: run, train.lora_r, f1, eval_loss, exact_match"):
        sort_table(table, "accuracy")


def test_a_finished_run_with_changed_params_is_left_as_it_is(write_params, tmp_path):
    _, runs = expand(write_params(BASE + "sweep:\n  stages: '01,02'\n  grid:\n    train.lora_r: [16]\n"))
    finished = Run(params=runs[0].params, dir=runs[0].params.run_dir)
    finished.dir.mkdir(parents=True)
    for stage in ("01_build_dataset", "02_finetune"):
        with finished.stage(stage):
            pass
    before = finished.manifest_path.read_text()
    _, runs = expand(write_params(BASE + "train:\n  epochs: 3\nsweep:\n  stages: '01,02'\n  grid:\n    train.lora_r: [16]\n"))
    changed = Run(params=runs[0].params, dir=runs[0].params.run_dir)
    record = {"stages": {}}
    assert prepare_run(changed, ["01_build_dataset", "02_finetune"], record, rerun=False) == []
    assert record["status"] == "outdated" and "02_finetune finished with other params" in record["error"]
    assert finished.manifest_path.read_text() == before


def test_the_shipped_lora_sweep_shares_its_dataset_and_base_evaluation():
    sweep_params, runs = expand(ROOT / "params" / "sweep_lora.yaml")
    assert [r.name for r in runs] == ["r16.all-linear", "r16.attention", "r64.all-linear", "r64.attention"]
    assert sweep_params.sweep.stages == ["01_build_dataset", "02_finetune", "04_evaluate"]
    assert len({stage_key(r.params, "01_build_dataset") for r in runs}) == 1
    assert len({untrained_key(r.params) for r in runs}) == 1
    assert len({stage_key(r.params, "02_finetune") for r in runs}) == 4
    assert {(r.params.train.lora_alpha / r.params.train.lora_r) for r in runs} == {2}
