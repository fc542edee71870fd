"""Executing a stage's notebook headless with papermill (`python -m tunebook run`, sweeps): the kernel it runs in, and
stopping the stage in that kernel when the command running it is interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from tunebook.errors import Terminated, TunebookError, signal_name
from tunebook.run.files import write_json_atomic
from tunebook.run.folder import now, process_state, read_manifest

NOTEBOOKS = Path(__file__).resolve().parents[3] / "notebooks"


def stop_stage(run_dir: Path, stage: str, interrupt: KeyboardInterrupt, wait: float = 15.0) -> None:
    """The command running a stage's notebook was interrupted: the stage runs on in the notebook's kernel, a process
    of its own session (Ctrl-C and a SIGTERM to the command's group do not reach it). Send it SIGTERM, which its stage
    context turns into an interruption it records; a kernel that does not record one in `wait` seconds is killed and
    the stage is marked interrupted here."""
    for name in ("asyncio", "papermill"):  # papermill's abandoned tasks, finished at exit: the kernel's end, not news
        logging.getLogger(name).setLevel(logging.CRITICAL)
    manifest_path = Path(run_dir) / "manifest.json"
    entry = read_manifest(run_dir)["stages"].get(stage, {})
    if entry.get("status") != "running":
        return
    if process_state(entry) == "alive":
        try:
            os.kill(entry["pid"], signal.SIGTERM)
        except OSError:
            pass
        deadline = time.time() + wait
        while time.time() < deadline and read_manifest(run_dir)["stages"].get(stage, {}).get("status") == "running":
            time.sleep(0.1)
        try:  # recorded (or stuck): it must not write to the run folder later, nor report to papermill while it stops
            psutil.Process(entry["pid"]).kill()
        except psutil.Error:
            pass
    manifest = read_manifest(run_dir)
    current = manifest["stages"].get(stage, {})
    reason = f"{signal_name(interrupt)} to the command running its notebook"
    if current.get("status") == "running":
        current.update(status="interrupted", interrupted=now(), reason=reason)
    elif current.get("status") == "interrupted" and current.get("started") == entry.get("started"):
        current["reason"] = reason  # the kernel saw only the SIGTERM sent to it above
    else:
        return
    write_json_atomic(manifest_path, manifest)


class StageFailed(TunebookError):
    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def execute_stage(stage: str, params_file: Path, run_dir: Path, parameters: dict | None = None) -> Path:
    """Run notebooks/<stage>.ipynb headless with papermill into <run>/notebooks/<stage>.ipynb (returned). A failing
    cell raises StageFailed; the executed notebook, saved either way, holds the full traceback."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    executed = run_dir / "notebooks" / f"{stage}.ipynb"
    executed.parent.mkdir(exist_ok=True)
    try:
        with _interrupts_stop_the_stage(run_dir, stage), tempfile.TemporaryDirectory(prefix="tunebook-kernel-") as sockets:
            pm.execute_notebook(
                str(NOTEBOOKS / f"{stage}.ipynb"),
                str(executed),
                parameters={"params_path": str(params_file), "overrides": [], **(parameters or {})},
                cwd=str(NOTEBOOKS),
                kernel_name=_kernel_name(),
                log_output=True,
                progress_bar=False,
                config=local_kernel_sockets(sockets),
            )
    except pm.PapermillExecutionError as e:
        if e.ename in ("KeyboardInterrupt", "Terminated"):  # a signal to the kernel itself (Jupyter's interrupt, a kill)
            raise StageFailed(
                f"Stage {stage} was interrupted in its kernel ({e.ename}: {e.evalue}), and recorded so; the executed notebook up to there: {executed}", executed
            ) from None
        raise StageFailed(f"Stage {stage} failed: {e.ename}: {e.evalue}\nThe executed notebook with the full traceback: {executed}", executed) from None
    except KeyboardInterrupt as e:  # (stopped already by the signal handler; this is for an interruption raised otherwise)
        stop_stage(run_dir, stage, e)
        raise
    except DeadKernelError:  # killed from outside, or out of memory: its stage could record nothing
        manifest = read_manifest(run_dir)
        entry = manifest["stages"].get(stage, {})
        pid = f" (process {entry['pid']})" if entry.get("status") == "running" and entry.get("pid") else ""
        if entry.get("status") == "running":
            entry.update(status="interrupted", interrupted=now(), reason=f"its Jupyter kernel{pid} died")
            write_json_atomic(run_dir / "manifest.json", manifest)
        raise StageFailed(
            f"Stage {stage} failed: its Jupyter kernel{pid} died without a Python error (killed, or out of memory). "
            f"The executed notebook up to there: {executed}",
            executed,
        ) from None
    return executed


def local_kernel_sockets(folder: str):
    """The kernel's sockets as files in `folder`, a folder of its own (kernels started at once, by a parallel sweep or
    two tests, must never share a socket): over TCP, ipykernel warns at every start that its traffic is unencrypted.
    TCP where there are no Unix sockets."""
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc", "ip": str(Path(folder) / "kernel")}}) if os.name == "posix" else Config()


@contextmanager
def _interrupts_stop_the_stage(run_dir: Path, stage: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM to this process while a notebook runs: first stop the stage in the kernel (stop_stage), then
    raise here, so papermill's own clean-up finds the kernel done and the interruption recorded by the stage."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        interrupt = Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()
        if not stopping:  # a second Ctrl-C while the kernel is being stopped waits for it
            stopping.append(signum)
            stop_stage(run_dir, stage, interrupt)
        raise interrupt

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def _kernel_name() -> str:
    """The kernel `make setup` registers for this environment, else the default python3 (Colab, GPU hosts)."""
    from jupyter_client.kernelspec import KernelSpecManager

    return "tunebook" if "tunebook" in KernelSpecManager().find_kernel_specs() else "python3"
