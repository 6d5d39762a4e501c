"""Rendering on Ray (Ray Core actors): each actor loads the model once and renders one job at a time.

Ray places the actors (one GPU each on a GPU cluster; one CPU and one torch thread each otherwise) and restarts an
actor whose process dies (`max_restarts=-1`: a worker killed mid-job is replaced, reloading its model). The driver
hands each idle actor the next job and waits on the results with `ray.wait`; the job of an actor that died is
recorded as a failed attempt and tried again, as any failed job is. Only the driver writes files, so nodes need no
shared folder, and the subjects and learned relations the jobs use travel to each actor with its start. The LoRA files
the requests name are put in Ray's object store once and travel with each job that uses them as references: an actor
fetches a file's bytes only the first time it meets them (render.lora_copy).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path

from engines.batch.render import (
    JobOutcome,
    lora_copy,
    pack_library,
    pack_loras,
    render_job,
    unpack_library,
    worker_name,
)
from engines.types import InputError, ModelSpec
from engines.types.batch import LOCAL_RAY, BatchJob, BatchOptions


class BatchWorker:
    """The body of a Ray actor: a private studio (its own empty library, filled from the payload) and the model."""

    def __init__(self, studio_class: type, spec: ModelSpec, payload: dict, threads: int | None) -> None:
        if threads:  # one torch thread per CPU actor: actors share the cores instead of fighting over them
            import torch

            torch.set_num_threads(threads)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"troupe-worker-{os.getpid()}-"))  # the pid: whose folder it is
        self.studio = studio_class(spec, self.scratch / "library")
        unpack_library(self.studio, payload, self.scratch)
        self.studio.bundle  # noqa: B018 - load the model now, once, not inside the first job's time
        self.name = worker_name()

    def ready(self) -> str:
        return self.name

    def close(self) -> None:
        """Remove this actor's private folder (library, LoRA copies): ray.kill ends the process with no clean-up."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def render(self, job: BatchJob, loras: dict | None = None) -> JobOutcome:
        """One job; `loras` holds its LoRA files as the request's path → (sha256, object reference to the bytes)."""
        import ray

        try:
            for path, (digest, ref) in (loras or {}).items():
                if path not in self.studio.lora_copies:
                    fetch = lambda ref=ref: ray.get(ref)  # noqa: E731 - only when this actor has no copy yet
                    self.studio.lora_copies[path] = lora_copy(self.scratch / "loras", path, digest, fetch)
        except Exception as error:  # noqa: BLE001 - the job's failure, recorded and retried like any other
            return JobOutcome(job.key, worker=self.name, error=f"the LoRA files did not reach this worker: {error}")
        return render_job(self.studio, job, self.scratch, self.name)


def connect(options: BatchOptions) -> bool:
    """Join the Ray the options name (or the one this process already runs); True if this call started Ray."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'ray>=2.10'") from None
    if ray.is_initialized():
        return False
    if options.ray == LOCAL_RAY:
        ray.init(num_cpus=options.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=options.ray, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise InputError(f"cannot join the Ray cluster at {options.ray}: {error}") from None
    return True


def actor_plan(spec: ModelSpec, workers: int | None) -> tuple[int, dict, int | None]:
    """(how many actors, their resources, torch threads): GPU actors where the cluster has GPUs and the model is not
    pinned to the CPU, else single-threaded CPU actors."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    kind, have = ("GPU", gpus) if gpus and spec.device != "cpu" else ("CPU", cpus)
    if workers is not None and workers > have:  # the extra actors would wait for resources, and the batch with them
        raise InputError(f"--workers {workers}: the Ray cluster has {have} {kind}s, one per worker")
    if kind == "GPU":
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}, None
    return workers or cpus, {"num_cpus": 1}, 1


def worker_spec(spec: ModelSpec, resources: dict) -> ModelSpec:
    """The model spec an actor loads: a GPU actor sees only the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), as
    cuda:0, so "cuda:N" becomes "cuda" there; "auto" already finds that GPU."""
    if resources.get("num_gpus") and spec.device.startswith("cuda:"):
        return dataclasses.replace(spec, device="cuda")
    return spec


def start_actors(studio, pending: list[BatchJob], options: BatchOptions) -> tuple[list, object]:
    """The actors, started and ready, and the payload they were built from (kept alive: Ray rebuilds a restarted
    actor from the same arguments)."""
    import ray

    count, resources, threads = actor_plan(studio.model_spec, options.workers)
    with tempfile.TemporaryDirectory(prefix="troupe-pack-") as scratch:
        payload = ray.put(pack_library(studio, pending, Path(scratch)))
    actor_class = ray.remote(BatchWorker).options(max_restarts=-1, **resources)
    spec = worker_spec(studio.model_spec, resources)
    actors = [actor_class.remote(type(studio), spec, payload, threads) for _ in range(count)]
    try:  # a model that cannot load is one error now, not the same failure recorded for every job
        ray.get([actor.ready.remote() for actor in actors])
    except ray.exceptions.RayActorError as error:
        cause = str(getattr(error, "cause", None) or error).splitlines()[-1]
        cause = cause.split("InputError: ", 1)[-1]  # the worker's one-line message, without its type's module path
        raise InputError(f"the Ray workers could not start: {cause}") from None
    return actors, payload


def run_on_ray(studio, pending: list[BatchJob], ledger, options: BatchOptions) -> int:
    """Render `pending` on Ray actors, settling each outcome in `ledger`; returns the number of actors."""
    import ray

    started_here = connect(options)
    try:
        actors, _payload = start_actors(studio, pending, options)
        shipped = {path: (digest, ray.put(data)) for path, (digest, data) in pack_loras(pending).items()}
        ledger.start()
        dispatch(actors, deque(pending), ledger, shipped)
        # an actor that died mid-job took its folder's clean-up with it; a restarting one is waited for a minute at most
        ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=60)
        for actor in actors:
            ray.kill(actor)
        return len(actors)
    finally:
        if started_here:
            ray.shutdown()


def dispatch(actors: list, queue: deque, ledger, shipped: dict | None = None) -> None:
    """Give each idle actor the next job until every job is settled. An actor whose job was lost is restarted by Ray
    (reloading its model); it gets work again once a `ready` call, retried by Ray until the restart is done, returns.
    Work in flight: ref → (actor, job), or (actor, None) for such a readiness call. `shipped`: LoRA path → (sha256,
    object reference), of which each job takes the files it names."""
    import ray

    idle, running = list(actors), {}
    while queue or any(job is not None for _, job in running.values()):
        if not idle and not running:
            raise RuntimeError("every Ray worker is gone")
        while queue and idle:
            actor, job = idle.pop(), queue.popleft()
            loras = {lora.path: shipped[lora.path] for lora in job.request.loras if lora.path in (shipped or {})}
            running[actor.render.remote(job, loras)] = (actor, job)
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, job = running.pop(ref)
        try:
            outcome = ray.get(ref)
            idle.append(actor)
        except ray.exceptions.RayError as error:  # the worker died mid-job, or is still coming back
            if not isinstance(error, ray.exceptions.ActorDiedError):  # not for good: wait until it is back
                running[actor.ready.options(max_task_retries=-1).remote()] = (actor, None)
            outcome = JobOutcome(job.key if job else "", error=f"worker lost: {type(error).__name__}")
        if job is not None and ledger.settle(job, outcome):
            queue.append(job)
