"""Stage 02 on two processes through the real `accelerate launch` (gloo DDP on this CPU), from the notebook run by the
CLI as a user runs it: the planned optimizer steps over the same global batch as one process, one process printing,
logging and saving, and a worker's error reaching the caller as one message. The tiny SmolLM2-shaped model keeps it
to seconds of training; the launch and its two processes are real."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from tunebook.errors import TunebookError
from tunebook.params.load import load_params
from tunebook.params.schema import ParamsError
from tunebook.run.folder import Run
from tunebook.training.train import checked_accelerate_config, finetune


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_smollm2):
    """params/smoke.yaml's 01 and 02 with train.num_processes=2 through the CLI: (run folder, completed process)."""
    out = tmp_path_factory.mktemp("ddp")
    sets = ["train.num_processes=2", "run_name=ddp", f"output_dir={out}", f"model.name={tiny_smollm2}"]
    command = [sys.executable, "-m", "tunebook", "run", "params/smoke.yaml", "--stages", "01,02", *[a for s in sets for a in ("--set", s)]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "ddp", result


def cell_output(run_dir) -> str:
    """What the executed notebook's cells printed: the launched processes' lines, streamed into the training cell."""
    notebook = json.loads((run_dir / "notebooks" / "02_finetune.ipynb").read_text(encoding="utf-8"))
    return "".join("".join(o.get("text", "")) for cell in notebook["cells"] for o in cell.get("outputs", []))


def test_two_processes_take_the_planned_steps_over_the_global_batch_and_one_writes(ddp_run):
    run_dir, _ = ddp_run
    run = Run.load(run_dir)
    recorded = run.outputs_of("02_finetune")
    assert recorded.steps == run.params.train.max_steps == 2
    assert recorded.num_processes == 2
    assert recorded.train_loss is not None
    shown = cell_output(run_dir)
    # smoke.yaml's batch of 4 x accumulation 1, shared out over the two processes.
    assert shown.count("2 processes x batch 2 x accumulation 1 = global batch 4.") == 1, shown
    # One process printed the checks and the progress; the Trainer logged each step once.
    assert shown.count("Loss on answer tokens only") == 1, shown
    assert re.findall(r"step (\d)/2  loss ", shown) == ["1", "2"], shown
    history = json.loads((run_dir / "train_log.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    # One adapter and one merged model, no leftovers of a second writer; the launched record is read and removed.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("adapter", "merged", "checkpoints", "02_"))) == ["adapter", "merged"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "merged" / "config.json").is_file()


def test_a_workers_error_reaches_the_caller_as_one_message(ddp_run, tmp_path):
    """train.batching: packed is refused in build_trainer, so in each launched process: the caller raises that message.
    The params are the run's in memory (a notebook's), not its params.yaml, which still says padded."""
    run_dir = shutil.copytree(ddp_run[0], tmp_path / "ddp")
    run = Run(params=load_params(run_dir / "params.yaml", ["train.batching=packed", f"output_dir={tmp_path}"]), dir=run_dir)
    with pytest.raises(TunebookError) as e:
        finetune(run)
    assert str(e.value).startswith("train.batching: packed needs the unsloth backend"), str(e.value)
    assert "Traceback" not in str(e.value)
    assert run.status("02_finetune") == "failed"
    assert not list(run_dir.glob("02_launched*"))  # the params and record files of the launch are cleared either way


def test_the_global_batch_is_shared_out_over_the_processes(write_params):
    def per_process(**train) -> tuple[int, int]:
        lines = "".join(f"  {k}: {v}\n" for k, v in train.items())
        return load_params(write_params(f"data:\n  train_path: x.jsonl\ntrain:\n{lines}")).train.per_process_batch()

    assert per_process(batch_size=8, grad_accum=4) == (8, 4)  # one process: as given
    assert per_process(batch_size=4, grad_accum=2, num_processes=2) == (4, 1)  # the accumulation first
    assert per_process(batch_size=4, grad_accum=1, num_processes=2) == (2, 1)  # then the batch
    assert per_process(batch_size=6, grad_accum=4, num_processes=8) == (3, 1)
    with pytest.raises(ParamsError) as e:
        per_process(batch_size=3, grad_accum=1, num_processes=2)
    assert "train.batch_size x train.grad_accum (3 x 1) cannot be shared out evenly over train.num_processes 2" in str(e.value)


def test_an_accelerate_config_must_launch_train_num_processes(write_params):
    params = write_params("data:\n  train_path: x.jsonl\ntrain:\n  num_processes: 4\n  accelerate_config: accelerate/fsdp.yaml\n")
    (params.parent / "accelerate").mkdir()
    shutil.copy(ROOT / "params" / "accelerate" / "fsdp.yaml", params.parent / "accelerate" / "fsdp.yaml")
    with pytest.raises(TunebookError, match=r"launches num_processes: 2, but train.num_processes is 4: set both"):
        checked_accelerate_config(load_params(params))
    assert checked_accelerate_config(load_params(params, ["train.num_processes=2"])) == str(params.parent / "accelerate" / "fsdp.yaml")


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero3"])
def test_the_shipped_accelerate_configs_are_read_by_accelerate(name):
    """Parsed by accelerate's own loader (unknown keys are refused there); not run: no machine with several GPUs."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "params" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes == 2 and config.distributed_type.value == {"fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
