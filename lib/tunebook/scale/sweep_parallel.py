"""Sweeps side by side, on Ray: `python -m tunebook sweep PARAMS --parallel N [--ray-address ADDRESS]`.

Every stage still to do of every run is one Ray task, and the ObjectRefs passed between them order them: a run's
stage waits for the run's previous one; a stage that an earlier run of the sweep does with the same key (its
leader) waits for the leader's and copies it; a run's 04 waits for the 04 of the first run with its untrained key
(evaluate.untrained_key), which scores the base model once for all of them. Ray's scheduler is the pool: a task
that executes a notebook asks for a share (a GPU per process it starts, and cores // N CPUs), and Ray gives it
CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS, which the notebook's kernel inherits; a task that only copies asks for
nothing. The tasks return records and never write sweep.json: this process (the driver) does, as results come in.
"""

from __future__ import annotations

import os
import signal
import time

from tunebook.errors import TunebookError, sigterm_raises
from tunebook.evaluation.evaluate import untrained_key
from tunebook.run.folder import Run, process_state
from tunebook.run.keys import stage_key
from tunebook.run.notebooks import stop_stage
from tunebook.scale.sweep import Sweep, bring_stage, find_donor, finish_sweep, open_sweep, prepare_run, record_stage

DONE = ("ran", "reused")


def run_sweep_parallel(
    params_path: str, overrides: list[str], *, parallel: int, ray_address: str | None = None, rerun: bool = False, dry_run: bool = False
) -> int:
    """The sweep's runs side by side, at most `parallel` stages executing at once (on a cluster: as many as it has
    room for); 0 when all finished, 1 when some failed, 130 when interrupted."""
    ray = import_ray()
    sweep = open_sweep(params_path, overrides, dry_run=dry_run)
    if sweep is None:
        return 0
    todo = {}
    for number, r in enumerate(sweep.runs, start=1):
        print(f"\n##### [{number}/{len(sweep.runs)}] {r.name}", flush=True)
        todo[r.name] = prepare_run(sweep.members[r.name], sweep.stages, sweep.record(r.name), rerun)
    sweep.save()
    started = time.time()
    cpus, use_gpus = start_ray(ray, sweep, todo, parallel, ray_address)
    pending: dict = {}  # ObjectRef -> (run name, stage)
    try:
        with sigterm_raises():  # again: ray.init sets a SIGTERM handler of its own
            try:
                submit(ray, sweep, todo, cpus, use_gpus, pending)
                collect(ray, sweep, todo, pending)
            except KeyboardInterrupt as e:
                stop(ray, sweep, todo, pending, e)
                print("\nSweep interrupted. Run the same command again to finish the missing stages.", flush=True)
                return 130
    finally:
        ray.shutdown()
    return finish_sweep(sweep, started)


def import_ray():
    # Ray's log de-duplication would fold the same line of two runs into one; no usage statistics are sent.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise TunebookError(
            "sweep --parallel and --ray-address run the sweep on Ray, which is not installed: pip install 'ray>=2.60' (or pip install -e '.[scale]')."
        ) from None
    return ray


def processes(run: Run, stage: str) -> int:
    """GPUs a stage's notebook uses: one per process it launches (train / evaluate.num_processes), else one."""
    return {"02_finetune": run.params.train.num_processes, "04_evaluate": run.params.evaluate.num_processes}.get(stage, 1)


def start_ray(ray, sweep: Sweep, todo: dict[str, list[str]], parallel: int, address: str | None) -> tuple[int, bool]:
    """Start a local Ray sized so that at most `parallel` stages execute at once, or join the cluster at `address`
    (its GPUs, or on a cluster without any its CPUs shared out `parallel` ways, decide how many): (the CPUs each
    executing task asks for, whether it asks for GPUs too)."""
    need = max((processes(sweep.members[name], s) for name, stages in todo.items() for s in stages), default=1)
    if address:
        ray.init(address=address)
        resources = ray.cluster_resources()
        cores, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        cpus = max(1, cores // gpus if gpus else cores // parallel)
        where = f"the Ray cluster at {address} ({cores} CPUs, {gpus} GPUs)"
    else:
        import torch

        cores, gpus = os.cpu_count() or 1, torch.cuda.device_count()
        cpus = max(1, cores // parallel)
        where = f"this machine ({cores} CPUs, {gpus} GPUs)"
    if gpus and need > gpus:
        raise TunebookError(f"A stage of this sweep launches {need} processes, one GPU each (train / evaluate.num_processes), and {where} has {gpus} GPUs.")
    if not address:
        # The tasks pass small records only: the object store needs little memory.
        try:
            ray.init(num_cpus=cpus * parallel, num_gpus=min(gpus, need * parallel), include_dashboard=False, object_store_memory=100 * 2**20)
        except Exception as e:  # noqa: BLE001  (Ray raises a bare Exception when its processes start too slowly)
            raise TunebookError(f"Ray could not start on this machine ({e}); nothing was run. Try again when the machine is less busy.") from None
        where += f", at most {min(parallel, gpus // need) if gpus else parallel} at once"
    print(f"\nOn Ray, {where}: each stage that executes gets {'a GPU per process and ' if gpus else ''}{cpus} CPU(s).", flush=True)
    return cpus, bool(gpus)


def submit(ray, sweep: Sweep, todo: dict[str, list[str]], cpus: int, use_gpus: bool, pending: dict) -> None:
    """One task per run and stage to do, in sweep order, each given the ObjectRefs it waits for."""
    task = ray.remote(stage_task)
    refs = {}
    leaders: dict[tuple[str, str], str] = {}  # (stage, key) -> the first run that does it
    base_scorers: dict[str, str] = {}  # untrained key -> the first run whose 04 scores those rows
    for r in sweep.runs:
        run = sweep.members[r.name]
        previous = None
        for stage in todo[r.name]:
            leader = leaders.setdefault((stage, stage_key(run.params, stage)), r.name)
            waits = [refs[leader, stage]] if leader != r.name else []
            if stage == "04_evaluate" and ("base" in run.params.evaluate.models or run.params.evaluate.api_baselines):
                scorer = base_scorers.setdefault(untrained_key(run.params), r.name)
                waits += [refs[scorer, stage]] if scorer != r.name else []
            share = {"num_cpus": cpus, "num_gpus": processes(run, stage) if use_gpus else 0}
            copies = leader != r.name or find_donor(run, stage, sweep.members) is not None
            options = {"num_cpus": 0, "num_gpus": 0} if copies else share
            ref = task.options(name=f"{r.name}:{stage}", max_retries=0, **options).remote(
                run, stage, sweep.members, share if copies else None, previous, *waits
            )
            refs[r.name, stage] = previous = ref
            pending[ref] = (r.name, stage)


def stage_task(run: Run, stage: str, members: dict[str, Run], share: dict | None, previous: dict | None, *waited: dict) -> dict:
    """One stage of one run, in a Ray worker, once the tasks it waits for are done (`waited`: their records, only
    waited for): skipped when the run's previous stage did not finish; copied from a run that finished it with the
    same key; else executed. A task that asked Ray for nothing to copy its leader's stage (`share` given) executes
    it, when the leader did not finish it, in a task of its own that asks for the share, as the serial sweep would."""
    if previous is not None and previous["how"] not in DONE:
        return {"how": "skipped", "seconds": 0}
    # Ray starts its workers with SIGINT blocked; the kernel, and the processes it launches (launch.stop stops them
    # with SIGINT), would inherit that.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if share is not None and find_donor(run, stage, members) is None:
        import ray

        return ray.get(ray.remote(stage_task).options(name=f"{run.dir.name}:{stage}", max_retries=0, **share).remote(run, stage, members, None, None))
    return bring_stage(run, stage, members)


def collect(ray, sweep: Sweep, todo: dict[str, list[str]], pending: dict) -> None:
    """Record each stage's result in sweep.json as it arrives."""
    total = len(pending)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # the timeout keeps Ctrl-C and SIGTERM prompt
        for ref in ready:
            name, stage = pending.pop(ref)
            result = outcome(ray, ref, stage, sweep.members[name], sweep.record(name))
            record_result(sweep, todo, name, stage, result)
            said = f"reused from {result['from']}" if result["how"] == "reused" else f"{result['how']} in {result['seconds']:.0f}s"
            print(f"--- [{total - len(pending)}/{total}] {name} {stage}: {said}" + (f" ({result['error']})" if "error" in result else ""), flush=True)


def record_result(sweep: Sweep, todo: dict[str, list[str]], name: str, stage: str, result: dict) -> None:
    """A stage's result into sweep.json (saved); a run whose last stage is done is finished."""
    record = sweep.record(name)
    record_stage(record, stage, result)
    if stage == todo[name][-1] and record["status"] == "running":
        record["status"] = "finished"
    sweep.save()


def outcome(ray, ref, stage: str, run: Run, record: dict) -> dict:
    """The task's record; a task Ray could not finish (its worker died) fails its run like a failed notebook."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        if record.get("status") == "failed":  # a later stage of a run that failed already (Ray passes the error on)
            return {"how": "skipped", "seconds": 0}
        error = f"Stage {stage} failed: its Ray task ended with {type(e).__name__}: {str(e).strip().splitlines()[0]}"
        return {"how": "failed", "seconds": 0, "error": error, "notebook": str(run.dir / "notebooks" / f"{stage}.ipynb")}


def stop(ray, sweep: Sweep, todo: dict[str, list[str]], pending: dict, interrupt: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM to the driver: stop the notebooks' kernels on this machine (each records its stage
    interrupted, put down to this signal), then cancel every task not done: Ray raises a KeyboardInterrupt in a
    running one, which stops its kernel (on another node of a cluster) as execute_stage does. Stages that finished
    meanwhile are recorded; the runs not done are interrupted."""
    if not pending:
        return
    names = list(dict.fromkeys(name for name, _ in pending.values()))
    stop_kernels_here(sweep, names, interrupt)
    for ref in pending:
        ray.cancel(ref)
    ray.wait(list(pending), num_returns=len(pending), timeout=60)
    stop_kernels_here(sweep, names, interrupt)  # one started while the tasks were being cancelled
    for ref, (name, stage) in pending.items():
        try:
            result = ray.get(ref, timeout=0)
        except ray.exceptions.RayError:  # cancelled, or still stopping
            continue
        if result["how"] in DONE:  # anything else is the interruption's doing: the manifest says so
            record_result(sweep, todo, name, stage, result)
    for name in names:
        if sweep.record(name)["status"] == "running":
            sweep.record(name)["status"] = "interrupted"
    sweep.save()


def stop_kernels_here(sweep: Sweep, names: list[str], interrupt: KeyboardInterrupt) -> None:
    for name in names:
        run = sweep.members[name]
        for stage, entry in run.manifest()["stages"].items():
            if entry.get("status") == "running" and process_state(entry) == "alive":
                stop_stage(run.dir, stage, interrupt)
