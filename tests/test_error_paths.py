"""Bad input as a new user gives it: every class ends in one message that names what, where and what is allowed, exit
code 2 and no traceback, before anything in an existing run folder changes. Through the CLI (`python -m tunebook` in a
subprocess) and through papermill (run/notebooks.py's execute_stage, the notebooks' path); real components throughout. The seconds
until each message appears are printed at the end (with -s); the 10-second target is bench/bad_inputs.py's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from tunebook.errors import TunebookError
from tunebook.run.folder import Run, open_run
from tunebook.run.notebooks import execute_stage

SMOKE = ROOT / "params" / "smoke.yaml"
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_times():
    yield
    print("\nseconds until the message appears:")
    for name, seconds in TIMES.items():
        print(f"  {seconds:6.2f}  {name}")


def tunebook(name: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tunebook", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    TIMES[name] = time.monotonic() - started
    return result


def refused(result: subprocess.CompletedProcess, name: str) -> str:
    """The one message of a refused command: exit code 2, `error: ...` on stderr, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr.removeprefix("error: ").rstrip("\n")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def existing(tmp_path) -> Run:
    """A run folder of params/smoke.yaml with a finished 01 (recorded by the real stage context), as a user has one."""
    run = open_run(SMOKE, [f"output_dir={tmp_path / 'out'}"])
    with run.stage("01_build_dataset") as outputs:
        outputs["note"] = "an earlier build"
    return run


def smoke(run_or_dir, *args) -> list[str]:
    out = run_or_dir.dir.parent if isinstance(run_or_dir, Run) else run_or_dir
    return ["run", SMOKE, "--set", f"output_dir={out}", *args]


@contextmanager
def read_only(folder: Path):
    """A folder nobody may write in: chmod for a user, the immutable attribute for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip(f"cannot make {folder} read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# --- params: legal types without a legal meaning, repeated keys, union types --------------------------------------

RULES = "Run `python -m tunebook params` to list every key with its meaning."


def test_empty_stages_run_nothing(existing):
    before = snapshot(existing.dir)
    message = refused(tunebook("--stages ''", *smoke(existing, "--stages", "")), "--stages ''")
    assert message == (
        "--stages '' must name at least one stage, e.g. 04,05 (stages: 01 (build_dataset), 02 (finetune), 03 (quantize), "
        "04 (evaluate), 05 (error_analysis)); leave --stages out to run them all."
    )
    assert refused(tunebook("--stages ','", *smoke(existing, "--stages", ",")), "--stages ','").startswith("--stages ',' must name at least one stage")
    assert snapshot(existing.dir) == before


@pytest.mark.parametrize(
    "setting, problem",
    [
        ("data.eval_size=1.5", "data.eval_size must be a fraction between 0 and 1 (e.g. 0.2) or a whole number of rows (e.g. 50); got 1.5."),
        ("train.max_steps=0", "train.max_steps must be -1 (run the full train.epochs) or a number of steps of at least 1; got 0."),
        ("train.target_modules=5", "train.target_modules must be 'all-linear' or a list of layer names such as [q_proj, v_proj]; got 5."),
        (
            'evaluate.stop_strings=["\\n", ""]',
            "evaluate.stop_strings must be a list of non-empty strings, e.g. [\"\\n\"] (an empty one would cut every answer to nothing); got ['\\n', ''].",
        ),
        (
            "data.group_field=id",
            "data.group_field is data.id_field ('id'): every row would be a group of its own, the same as no group. Name the column that rows share (e.g. the source article), or leave group_field empty.",
        ),
        ("seed=-1", "seed must be a whole number from 0 to 4294967295; got -1."),
        ("train.lora_r=true", "train.lora_r must be a number, not true or false; got true."),
    ],
)
def test_a_value_without_a_legal_meaning_is_refused(existing, setting, problem):
    before = snapshot(existing.dir)
    message = refused(tunebook(f"--set {setting}", *smoke(existing, "--stages", "02", "--set", setting)), f"--set {setting}")
    assert message == f"{SMOKE}: 1 problem(s) in the params:\n  - {problem}\n{RULES}"
    assert snapshot(existing.dir) == before


def test_a_key_given_twice_in_a_params_file(existing, tmp_path):
    text = SMOKE.read_text(encoding="utf-8").replace("  batch_size: 4\n", "  batch_size: 4\n  lora_r: 8\n  batch_size: 2\n")
    path = tmp_path / "twice.yaml"
    path.write_text(text.replace("output_dir: ../outputs", f"output_dir: {existing.dir.parent}"), encoding="utf-8")
    first = text.splitlines().index("  batch_size: 4") + 1
    before = snapshot(existing.dir)
    message = refused(tunebook("a params key given twice", "run", path, "--resume"), "a params key given twice")
    assert message == f"{path}: key 'train.batch_size' is given twice, on lines {first} and {first + 2}; keep one (YAML would silently use the last)."
    assert snapshot(existing.dir) == before


def test_a_key_given_twice_in_a_run_folders_params_yaml(existing):
    params = existing.dir / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8") + "seed: 1\n", encoding="utf-8")  # seed: is in it already
    lines = [n for n, line in enumerate(params.read_text(encoding="utf-8").splitlines(), start=1) if line.startswith("seed:")]
    before = snapshot(existing.dir)
    message = refused(
        tunebook("a key given twice in <run>/params.yaml (compare)", "compare", existing.dir.parent), "a key given twice in <run>/params.yaml (compare)"
    )
    assert message == f"{params}: key 'seed' is given twice, on lines {lines[0]} and {lines[1]}; keep one (YAML would silently use the last)."
    assert snapshot(existing.dir) == before


# --- the file system: one message naming the operation, the path and why ---------------------------------------------


def test_output_dir_under_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    message = refused(tunebook("output_dir under a file", *smoke(blocker / "outputs")), "output_dir under a file")
    assert message.endswith(
        f"- output_dir: {blocker} is a file, so the output folder {blocker}/outputs cannot be created under it: set output_dir to a folder you can write."
    ), message  # the preflight's, before anything runs
    assert blocker.read_text() == "a file, not a folder\n"


def test_output_dir_read_only(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    with read_only(folder):
        message = refused(tunebook("output_dir read-only", *smoke(folder)), "output_dir read-only")
    assert message.endswith(
        f"- output_dir: {folder} is not writable, so the output folder {folder} cannot be written: set output_dir to a folder you can write."
    ), message
    assert not any(folder.iterdir())


def test_a_read_only_run_folder_is_said_before_a_kernel_starts(existing):
    before = snapshot(existing.dir)
    with read_only(existing.dir):
        message = refused(tunebook("run folder read-only", *smoke(existing, "--stages", "01")), "run folder read-only")
    assert message == (
        f"Cannot create a file in the run folder {existing.dir}: permission denied (the folder or file is read-only for you). "
        "The stages write their outputs there."
    )
    assert snapshot(existing.dir) == before


@pytest.fixture
def predictions(tmp_path) -> Path:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"prediction": "Paris", "gold_answers": ["Paris"]}\n', encoding="utf-8")
    return path


def test_score_into_a_missing_folder(predictions, tmp_path):
    out = tmp_path / "missing" / "scored.jsonl"
    message = refused(tunebook("score --jsonl-out in a missing folder", "score", predictions, "--jsonl-out", out), "score --jsonl-out in a missing folder")
    assert message == f"--jsonl-out {out}: the folder {out.parent} does not exist. Create the folder first, or write the scored rows elsewhere."
    assert not (tmp_path / "missing").exists()


def test_score_a_folder(tmp_path):
    message = refused(tunebook("score a folder", "score", tmp_path), "score a folder")
    assert message == f"{tmp_path} is a folder, not a predictions file: give a JSONL file (e.g. <run>/predictions/finetuned.jsonl)."


def test_score_into_a_read_only_folder(predictions, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    with read_only(folder):
        message = refused(tunebook("score --jsonl-out read-only", "score", predictions, "--jsonl-out", folder / "s.jsonl"), "score --jsonl-out read-only")
    assert message == f"Cannot write --jsonl-out {folder / 's.jsonl'}: permission denied (the folder or file is read-only for you)."
    assert not any(folder.iterdir())


def test_a_full_disk(predictions):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    message = refused(
        tunebook("score --jsonl-out on a full disk (ENOSPC)", "score", predictions, "--jsonl-out", "/dev/full"), "score --jsonl-out on a full disk (ENOSPC)"
    )
    assert re.fullmatch(r"Cannot write /dev/full: no space left on the disk \(\d+ MB free where /dev/full is\)\.", message), message
    assert Path("/dev/full").is_char_device()  # written in place, never replaced by a file


def test_a_params_file_that_is_a_folder(tmp_path):
    message = refused(tunebook("a folder as the params file", "run", tmp_path), "a folder as the params file")
    assert message == f"{tmp_path} is a folder, not a params file."


# --- interrupted stages: recorded with the time, never silently left `running` ---------------------------------------


def start(tmp_path, *args) -> subprocess.Popen:
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "tunebook", *map(str, args)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def running_entry(run_dir: Path, stage: str, process: subprocess.Popen, log: Path) -> dict:
    """Wait until the stage runs in its kernel (its pid recorded) and has been at work for a second."""
    deadline = time.monotonic() + 120
    while True:
        manifest = run_dir / "manifest.json"
        entry = json.loads(manifest.read_text())["stages"].get(stage, {}) if manifest.exists() else {}
        if entry.get("status") == "running" and entry.get("pid"):
            time.sleep(1)
            return entry
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_sigterm_to_the_command_marks_the_stage_interrupted(tmp_path):
    out = tmp_path / "out"
    first = start(tmp_path, *smoke(out, "--stages", "01,02"))
    entry = running_entry(out / "smoke", "02_finetune", first, tmp_path / "first.log")
    assert entry["pid"] != first.pid and entry["host"]  # the kernel's process, recorded with the host

    # The same run from a second command meanwhile: refused, nothing changed.
    before = snapshot(out / "smoke")
    message = refused(tunebook("a second command on a running stage", *smoke(out, "--resume")), "a second command on a running stage")
    assert message == (
        f"Stage 02_finetune of run 'smoke' is running now in process {entry['pid']} (started {entry['started']}), on this run folder "
        f"({out / 'smoke'}). Nothing was changed. Wait for it to finish, or stop it (kill {entry['pid']}) and run again."
    )
    assert snapshot(out / "smoke") == before

    signalled = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 143
    TIMES["SIGTERM to `run` during 02 (to exit)"] = time.monotonic() - signalled
    log = (tmp_path / "first.log").read_text()
    after = json.loads((out / "smoke" / "manifest.json").read_text())["stages"]["02_finetune"]
    assert after["status"] == "interrupted" and after["started"] == entry["started"] and after["pid"] == entry["pid"]
    assert after["reason"] == "SIGTERM to the command running its notebook"
    assert log.rstrip().endswith(
        f"Stage 02_finetune was interrupted at {after['interrupted']} (SIGTERM to the command running its notebook); "
        f"recorded in {out / 'smoke' / 'manifest.json'}.\n`python -m tunebook run {SMOKE} --resume` runs the stages that are not complete "
        "(02 continues from its last checkpoint)."
    ), log[-2000:]
    assert "Traceback" not in log
    assert not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).status() == psutil.STATUS_ZOMBIE  # the kernel is stopped


def test_a_hard_kill_is_found_and_the_stage_re_run(tmp_path):
    """SIGKILL to the command and its kernel (a lost machine): the next --resume says so and runs the stage again."""
    out = tmp_path / "out"
    first = start(tmp_path, *smoke(out, "--stages", "01,02"))
    entry = running_entry(out / "smoke", "02_finetune", first, tmp_path / "first.log")
    psutil.Process(entry["pid"]).kill()
    first.kill()
    first.wait(30)
    psutil.wait_procs([p for p in psutil.process_iter() if p.pid == entry["pid"]], timeout=30)
    assert json.loads((out / "smoke" / "manifest.json").read_text())["stages"]["02_finetune"]["status"] == "running"

    started = time.monotonic()
    resumed = subprocess.Popen(
        [sys.executable, "-m", "tunebook", *map(str, smoke(out, "--resume", "--stages", "02"))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first_line = resumed.stdout.readline()
    TIMES["--resume after a hard kill during 02 (the note)"] = time.monotonic() - started
    rest, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, rest[-3000:]
    pattern = (
        r"Stage 02_finetune was interrupted at (\S+) \(its process " + str(entry["pid"]) + r" is gone; the time is its last write to the run "
        r"folder\); re-running it\.\n"
    )
    assert re.fullmatch(pattern, first_line), first_line
    assert re.fullmatch(pattern, first_line).group(1) >= entry["started"]
    assert "Re-running 02_finetune." in rest  # the kernel's stage context: said once, not twice
    assert json.loads((out / "smoke" / "manifest.json").read_text())["stages"]["02_finetune"]["status"] == "complete"


def test_sigterm_to_the_kernel_through_papermill(tmp_path):
    """The notebook's kernel itself gets SIGTERM: its stage context records it; papermill's error says interrupted."""
    out = tmp_path / "out"
    first = start(tmp_path, *smoke(out, "--stages", "01,02"))
    entry = running_entry(out / "smoke", "02_finetune", first, tmp_path / "first.log")
    signalled = time.monotonic()
    os.kill(entry["pid"], signal.SIGTERM)
    assert first.wait(60) == 2
    TIMES["SIGTERM to the kernel during 02 (to exit)"] = time.monotonic() - signalled
    log = (tmp_path / "first.log").read_text()
    notebook = out / "smoke" / "notebooks" / "02_finetune.ipynb"
    assert log.rstrip().endswith(
        f"error: Stage 02_finetune was interrupted in its kernel (Terminated: SIGTERM), and recorded so; the executed notebook up to there: {notebook}"
    ), log[-2000:]
    assert "Traceback" not in log.split("Ending Cell")[0]  # papermill logs the cells' output; the command adds none
    after = json.loads((out / "smoke" / "manifest.json").read_text())["stages"]["02_finetune"]
    assert after["status"] == "interrupted" and after["reason"] == "SIGTERM" and after["interrupted"] >= entry["started"]


# --- the notebooks' path: papermill shows a TunebookError's message ---------------------------------------------------


def test_papermill_shows_a_repeated_key_in_the_run_params(existing):
    params = existing.dir / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8") + "run_name: smoke\n", encoding="utf-8")
    lines = [n for n, line in enumerate(params.read_text(encoding="utf-8").splitlines(), start=1) if line.startswith("run_name:")]
    before = {k: v for k, v in snapshot(existing.dir).items() if not k.startswith("notebooks/")}
    started = time.monotonic()
    with pytest.raises(TunebookError) as e:
        execute_stage("01_build_dataset", params, existing.dir)
    TIMES["papermill: a key given twice in <run>/params.yaml"] = time.monotonic() - started
    assert str(e.value) == (
        f"Stage 01_build_dataset failed: ParamsError: {params}: key 'run_name' is given twice, on lines {lines[0]} and {lines[1]}; keep one "
        f"(YAML would silently use the last).\nThe executed notebook with the full traceback: {existing.dir / 'notebooks' / '01_build_dataset.ipynb'}"
    )
    assert {k: v for k, v in snapshot(existing.dir).items() if not k.startswith("notebooks/")} == before  # only the executed notebook is new


def test_papermill_shows_a_file_system_error_in_a_stage(existing):
    (existing.dir / "notebooks").mkdir()  # papermill writes the executed notebook there; the run folder itself is locked
    before = {k: v for k, v in snapshot(existing.dir).items() if not k.startswith("notebooks/")}
    started = time.monotonic()
    with read_only(existing.dir), pytest.raises(TunebookError) as e:
        execute_stage("01_build_dataset", existing.dir / "params.yaml", existing.dir)
    TIMES["papermill: a read-only run folder in 01"] = time.monotonic() - started
    assert str(e.value) == (
        f"Stage 01_build_dataset failed: FileSystemError: Cannot write {existing.dir / 'manifest.json'}: permission denied (the folder or file "
        f"is read-only for you). The run folder must be writable to run a stage in it.\nThe executed notebook with the full traceback: "
        f"{existing.dir / 'notebooks' / '01_build_dataset.ipynb'}"
    )
    assert {k: v for k, v in snapshot(existing.dir).items() if not k.startswith("notebooks/")} == before


def test_the_stage_context_records_ctrl_c_and_sigterm_in_process(existing):
    from tunebook.errors import Terminated

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with existing.stage("02_finetune"):
            entry = existing.manifest()["stages"]["02_finetune"]
            assert (entry["status"], entry["pid"]) == ("running", os.getpid()) and entry["host"] and entry["process_started"]
            os.kill(os.getpid(), signal.SIGTERM)  # becomes an exception here, not the end of the process
            time.sleep(10)
    entry = existing.manifest()["stages"]["02_finetune"]
    assert (entry["status"], entry["reason"], entry["pid"]) == ("interrupted", "SIGTERM", os.getpid()) and entry["interrupted"] >= entry["started"]
    assert signal.getsignal(signal.SIGTERM) is handler  # set for the stage only
    with pytest.raises(KeyboardInterrupt):
        with existing.stage("02_finetune"):
            raise KeyboardInterrupt
    assert existing.manifest()["stages"]["02_finetune"]["reason"] == "Ctrl-C (SIGINT)"


def test_a_stage_left_running_on_another_machine_is_said_and_taken_as_interrupted(existing, capsys):
    """A Colab runtime that was lost: the next runtime has another host name and cannot look for the process."""
    manifest = json.loads(existing.manifest_path.read_text())
    manifest["stages"]["02_finetune"] = {
        "status": "running",
        "started": "2026-01-01T00:00:00+00:00",
        "pid": 4321,
        "host": "lost-runtime",
        "process_started": 1.0,
    }
    existing.manifest_path.write_text(json.dumps(manifest))
    run = open_run(existing.dir / "params.yaml")
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"Stage 02_finetune was interrupted at \S+ \(it ran in process 4321 on lost-runtime, not on this machine \(.+\): taken as a lost "
        r"machine or runtime; the time is its last write to the run folder\)\.\n",
        out,
    ), out
    assert run.status("02_finetune") == "interrupted" and run.status("01_build_dataset") == "complete"
