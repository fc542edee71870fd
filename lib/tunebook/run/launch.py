"""Several processes through accelerate: `accelerate launch` runs a tunebook module on N processes (DDP over NCCL on
GPUs, gloo on a CPU; FSDP or DeepSpeed through an accelerate config file), and its output is streamed line by line
into the notebook cell or terminal that started it.

The launched module ends an error of ours with one line `tunebook error: <message>` (worker_main) and exits 2; the
caller raises that message, so a bad input in a worker reads as it would in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

from tunebook.errors import TunebookError
from tunebook.params.load import validate_params
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import Run

ERROR_PREFIX = "tunebook error: "


def free_port() -> int:
    """A free TCP port for the processes' rendezvous: two launches at once on one machine (a parallel sweep) would
    both take accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(module: str, args: list[str], num_processes: int, *, cuda: bool, config_file: str | None = None) -> list[str]:
    """The `accelerate launch` command line: every value given, so accelerate prints no defaults it filled in."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    if config_file:
        command += ["--config_file", config_file]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        # --multi_gpu is accelerate's only launcher of several local processes (torchrun), on a CPU too: its --cpu
        # launcher starts one process, whatever --num_processes says. A CPU process then asks for the CPU itself
        # (PartialState(cpu=True)): gloo.
        if num_processes > 1:
            command += ["--multi_gpu"]
        elif not cuda:
            command += ["--cpu"]
        if not cuda:
            command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // num_processes))]
    return command + ["-m", module, *args]


def refuse_more_processes_than_gpus(num_processes: int, key: str) -> None:
    """One process per GPU: on a GPU machine, each process past the last GPU would stop with CUDA's "invalid device
    ordinal" deep in a traceback; said here first, naming the knob."""
    import torch

    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise TunebookError(f"{key} is {num_processes}, but {gpus} GPU(s) are visible here and each process takes one: set {key} to {gpus} or fewer.")


def run_streaming(command: list[str], what: str) -> None:
    """Run `command`, printing its output as it comes; a failure raises one TunebookError naming `what` (the worker's
    own message when it printed one). Ctrl-C or SIGTERM here stops the processes first."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    tail: deque[str] = deque(maxlen=30)
    ours = []  # kept apart from the tail: torchrun's own failure report after them is longer than 30 lines
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
            if ERROR_PREFIX in line:
                ours.append(line.rstrip("\n").split(ERROR_PREFIX, 1)[1])
        code = process.wait()
    except BaseException:  # KeyboardInterrupt, errors.Terminated: the launcher and its processes go down with us
        stop(process)
        raise
    if code:
        if ours:
            raise TunebookError(ours[-1])
        shown = "\n".join(tail)
        raise TunebookError(f"{what} failed (exit code {code}) in `{' '.join(command)}`; its last lines:\n{shown}")


def stop(process: subprocess.Popen, wait: float = 30.0) -> None:
    """SIGINT to the launcher's process group (the workers stop as after Ctrl-C), then SIGKILL if they linger."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def hand_over(run: Run, path: Path, **request) -> None:
    """Write what launched processes need to open this run: its folder and the params this process holds (a notebook
    may hold them changed from the folder's params.yaml), with the caller's `request`, as one JSON file."""
    write_json_atomic(path, {"run_dir": str(run.dir), "params": run.params.model_dump(mode="json"), **request})


def take_over(path: Path) -> tuple[Run, dict]:
    """In a launched process: the run and the request that hand_over wrote to `path`."""
    request = json.loads(path.read_text(encoding="utf-8"))
    params = validate_params(request.pop("params"), source=str(path))
    return Run(params=params, dir=Path(request.pop("run_dir"))), request


def worker_main(main) -> None:
    """Run a launched module's `main()`: an error of ours becomes one line the caller reads (run_streaming), exit 2."""
    try:
        main()
    except TunebookError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        sys.exit(2)
