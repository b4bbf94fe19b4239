"""`RayRunner`: a stage's parts on a Ray cluster (`--runner ray`).

CPU stages run each part as a Ray task; model stages (`UsesAccelerator.needs_actor()`:
embed, neighbours, local-model annotation) run their parts on a pool of long-lived actors
that load the model (or index) once, one part per actor at a time; the pool is kept
across consecutive model stages. Every part runs `execute_part` on a worker, which writes
its files and then its marker; the driver keeps at most `runner.max_in_flight` parts
submitted and calls `done` as each finishes.

A part whose worker died (killed, out of memory, node lost) is submitted again, up to
`runner.part_retries` times: files are written atomically and a part counts only once
its marker exists, so a retried part never duplicates output. An error raised by the
stage itself (a bug, bad data) is not retried: the parts in flight are cancelled and
the stage's exception is raised on the driver.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from megapairs.config import PipelineConfig
from megapairs.pipeline.runner import BaseRunner, PartDone, PartOrder
from megapairs.pipeline.stage import (
    Stage,
    UsesAccelerator,
    execute_part,
    holds_worker_state,
    no_progress,
    release_worker_state,
)
from megapairs.runs import RunDir

log = logging.getLogger(__name__)

# object store of a Ray started here: parts pass only counts, so a small one suffices
# (Ray's default takes 30% of the machine's memory)
OBJECT_STORE_BYTES = 384 * 1024**2
LOOPBACK = "127.0.0.1"
# seconds to let cancelled tasks stop before their workers are killed
CANCEL_GRACE_S = 10.0
# driver environment that workers need: object storage, model hub, thread counts
FORWARDED_PREFIXES = ("AWS_", "HF_", "TRANSFORMERS_", "MEGAPAIRS_")
FORWARDED_NAMES = ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")


class PartFailed(RuntimeError):
    """A part whose worker kept dying: its retries are used up."""


def import_ray() -> ModuleType:
    """The `ray` module, or a RuntimeError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("the Ray runner needs Ray: pip install 'megapairs[ray]'") from err
    return ray


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables that Ray workers get too (credentials, endpoints, hub)."""
    env = os.environ if environ is None else environ
    return {
        k: v for k, v in env.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES
    }


def bind_to_loopback() -> None:
    """Make a Ray started here listen on 127.0.0.1 only. Ray takes the address of the
    interface that routes to the internet (and maps an explicit 127.0.0.1 onto it), which
    a private single-machine Ray does not need and should not expose. Uses Ray's own
    address lookup hook; a Ray without it keeps its default."""
    try:
        import ray._private.services as services
    except ImportError:  # pragma: no cover - a Ray whose internals moved
        return
    if hasattr(services, "node_ip_address_from_perspective"):
        services.node_ip_address_from_perspective = lambda address=None: LOOPBACK


def start_private_ray(num_cpus: int, runtime_env: dict[str, Any] | None = None) -> None:
    """A Ray of this process only, on loopback, with a small object store and no
    dashboard; never one that `ray start` left running on this machine."""
    import ray

    bind_to_loopback()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a private Ray
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env=runtime_env or {},
    )


def local_cpus() -> int:
    """CPUs this process may use (its affinity, so a container's limit counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def unpicklable_attributes(obj: object) -> list[str]:
    """Names of `obj`'s attributes that cloudpickle cannot serialize."""
    from ray import cloudpickle

    bad = []
    for name, value in vars(obj).items():
        try:
            cloudpickle.dumps(value)
        except Exception:
            bad.append(name)
    return bad


# worker side ----------------------------------------------------------------------


def run_part_on_worker(stage: Stage, run: RunDir, part: str, config_key: str) -> dict[str, Any]:
    """Run and commit one part in a Ray worker. A worker process keeps the state (model,
    index) of one stage of one run at a time, so a long-lived worker does not pile them up."""
    if not holds_worker_state(stage, run, config_key):
        release_worker_state()  # another stage's (the cache holds one at most here)
        free_accelerator_memory()
    return execute_part(stage, run, part, config_key, no_progress)


def free_accelerator_memory() -> None:
    """Hand the GPU memory torch still caches for a released model back to the device (the
    next stage in this process may allocate outside torch, e.g. GPU FAISS)."""
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


class PartActor:
    """A long-lived worker for model stages: it builds a stage's state (its model) on its
    first part and keeps it for the parts that follow, until it runs another stage's."""

    def run_part(self, stage: Stage, run: RunDir, part: str, config_key: str) -> dict[str, Any]:
        return run_part_on_worker(stage, run, part, config_key)


# driver side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Shipment:
    """What every part of a stage needs, put in the object store once."""

    stage: Any  # object refs
    run: Any
    config_key: str


class Pool(Protocol):
    """Where a stage's parts run: `slots` parts at a time."""

    slots: int

    def submit(self, part: str) -> tuple[Any, int]:
        """Start `part`; return its object ref and the slot it occupies."""
        ...

    def release(self, slot: int, lost: bool) -> None:
        """The part in `slot` finished, or its worker died (`lost`)."""
        ...

    def abandon(self, refs: list[Any]) -> None:
        """Stop the parts in flight (the stage failed)."""
        ...


class TaskPool:
    """CPU stages: every part is a task; Ray picks a free worker for it."""

    def __init__(
        self, ray: ModuleType, name: str, cpus: float, slots: int, shipment: Shipment
    ) -> None:
        self.ray, self.slots, self.shipment = ray, slots, shipment
        self.task = ray.remote(run_part_on_worker).options(
            num_cpus=cpus, max_retries=0, retry_exceptions=False, name=f"{name} part"
        )

    def submit(self, part: str) -> tuple[Any, int]:
        shipped = self.shipment
        return self.task.remote(shipped.stage, shipped.run, part, shipped.config_key), -1

    def release(self, slot: int, lost: bool) -> None:
        """Tasks hold no slot."""

    def abandon(self, refs: list[Any]) -> None:
        """Interrupt the tasks, give them a moment to stop, then kill their workers."""
        for ref in refs:
            self.ray.cancel(ref)
        _, running = self.ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        for ref in running:
            self.ray.cancel(ref, force=True)


class ActorPool:
    """Model stages: `slots` actors of one shape (CPUs, GPUs), kept across consecutive
    model stages of that shape (one process start and import per actor, not per stage).
    One part per actor at a time: a part queued on a busy actor would wait while another
    sits idle. A dead actor is replaced."""

    def __init__(self, ray: ModuleType, shape: tuple[float, float], slots: int) -> None:
        cpus, gpus = shape
        self.ray, self.shape, self.slots = ray, shape, slots
        self.actor_class = ray.remote(PartActor).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0
        )
        self.actors = [self.actor_class.remote() for _ in range(slots)]
        self.free = set(range(slots))
        self.shipment: Shipment | None = None  # the stage being run

    def submit(self, part: str) -> tuple[Any, int]:
        assert self.shipment is not None
        slot = min(self.free)
        self.free.remove(slot)
        shipped = self.shipment
        ref = self.actors[slot].run_part.remote(
            shipped.stage, shipped.run, part, shipped.config_key
        )
        return ref, slot

    def release(self, slot: int, lost: bool) -> None:
        if lost:
            self.ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self.actor_class.remote()
        self.free.add(slot)

    def abandon(self, refs: list[Any]) -> None:
        """A running actor call cannot be interrupted: the runner kills the actors."""

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []


def actor_gpus(setting: float, stage: Stage, cluster: dict[str, float]) -> float:
    """GPUs per actor: the setting, or (-1) one where the cluster has GPUs and the stage
    wants one."""
    if setting >= 0:
        return setting
    wants = isinstance(stage, UsesAccelerator) and stage.wants_gpu()
    return 1.0 if wants and cluster.get("GPU", 0) >= 1 else 0.0


def pool_size(actors: int, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> int:
    """Actors to start: as many as the nodes' CPUs and GPUs hold (`nodes`: each alive node's
    resources), or the setting if fewer; never more, since an actor that cannot be placed
    would hold its parts forever while the placed ones keep their resources."""
    fits = sum(actors_per_node(cpus, gpus, node) for node in nodes)
    if actors > fits:
        log.warning("runner.actors=%d, but the cluster holds %d such actors now", actors, fits)
    return max(1, min(actors, fits) if actors else fits)


def actors_per_node(cpus: float, gpus: float, node: dict[str, float]) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs a node's resources hold."""
    fits = int(node.get("CPU", 0) // cpus)
    return min(fits, int(node.get("GPU", 0) // gpus)) if gpus > 0 else fits


def warn_if_unplaceable(stage: Stage, cpus: float, gpus: float, cluster: dict[str, float]) -> None:
    """Say so when no worker of the cluster as it is now could take a part (it waits until
    an autoscaler adds one)."""
    if cpus > cluster.get("CPU", 0) or gpus > cluster.get("GPU", 0):
        log.warning(
            "%s: each worker needs %g CPUs and %g GPUs, the cluster has %g and %g; "
            "its parts wait until the cluster grows",
            stage.name,
            cpus,
            gpus,
            cluster.get("CPU", 0),
            cluster.get("GPU", 0),
        )


def ship(ray: ModuleType, stage: Stage) -> Any:
    """Put the stage in the object store once, or say which attribute cannot travel."""
    try:
        return ray.put(stage)
    except Exception as err:
        bad = ", ".join(unpicklable_attributes(stage)) or "?"
        raise RuntimeError(
            f"stage {stage.name!r} cannot be sent to Ray workers (attributes: {bad}): {err}"
        ) from err


def stage_error(err: Exception) -> BaseException:
    """The exception a stage raised in a worker, out of Ray's RayTaskError wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


@dataclass
class Attempt:
    """One submission of a part: how often it was tried before, and where it runs."""

    part: str
    tries: int
    slot: int


class RayRunner(BaseRunner):
    """Runs each stage's parts on a Ray cluster: `address` None starts Ray here (all
    CPUs), else joins one (`auto`, `host:port`, `ray://host:10001`). A Ray already
    initialised in this process is used as it is."""

    name = "ray"

    def __init__(
        self,
        run: RunDir,
        config: PipelineConfig,
        progress: bool = True,
        address: str | None = None,
        order: PartOrder | None = None,
    ) -> None:
        super().__init__(run, config, progress, order)
        if getattr(run.root, "protocol", "") == "memory":
            raise RuntimeError(f"{run.root}: Ray workers cannot see this process's memory")
        self.address = address
        self.ray = import_ray()
        self.started = False  # whether this runner called ray.init (and so shuts it down)
        self.actors: ActorPool | None = None  # kept while consecutive model stages run

    def connect(self) -> ModuleType:
        """Start or join Ray, once; workers get the driver's forwarded environment. No
        address: the cluster in RAY_ADDRESS (as under `ray job submit`), else a new Ray
        here (never one that `ray start` left running on this machine)."""
        ray = self.ray
        if ray.is_initialized():
            return ray
        runtime_env = {"env_vars": forwarded_env()}
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env=runtime_env)
        else:
            start_private_ray(local_cpus(), runtime_env)
        self.started = True
        return ray

    def start(self) -> None:
        """Prepare the run directory, then start or join Ray (before any progress bar)."""
        super().start()
        self.connect()

    def execute(self, stage: Stage, parts: list[str], done: PartDone) -> None:
        ray = self.connect()
        shipment = Shipment(ship(ray, stage), ray.put(self.run), self.config_key)
        pool = self.pool_for(stage, shipment)
        try:
            self.drive(pool, stage, parts, done)
        except BaseException:
            self.drop_actors()  # they may still be running parts of the failed stage
            raise

    def pool_for(self, stage: Stage, shipment: Shipment) -> Pool:
        """Tasks for a CPU stage; for a model stage, the actor pool of its shape (reused
        from the previous stage when the shape is the same)."""
        settings, cluster = self.config.runner, self.ray.cluster_resources()
        if not (isinstance(stage, UsesAccelerator) and stage.needs_actor()):
            self.drop_actors()  # actors hold their CPUs: free them for the tasks
            warn_if_unplaceable(stage, settings.task_cpus, 0.0, cluster)
            slots = max(1, int(cluster.get("CPU", 1) // settings.task_cpus))
            return TaskPool(self.ray, stage.name, settings.task_cpus, slots, shipment)
        shape = (settings.actor_cpus, actor_gpus(settings.actor_gpus, stage, cluster))
        if self.actors is None or self.actors.shape != shape:
            self.drop_actors()
            warn_if_unplaceable(stage, *shape, cluster)
            size = pool_size(settings.actors, *shape, self.node_resources())
            self.actors = ActorPool(self.ray, shape, size)
        self.actors.shipment = shipment
        return self.actors

    def node_resources(self) -> list[dict[str, float]]:
        """The resources of each alive node of the cluster."""
        return [node["Resources"] for node in self.ray.nodes() if node["Alive"]]

    def drop_actors(self) -> None:
        """Kill the actor pool, if any (frees its CPUs, GPUs and models)."""
        if self.actors is not None:
            self.actors.close()
            self.actors = None

    def in_flight(self, pool: Pool) -> int:
        """Parts submitted at once: the setting or twice the workers (actors: one each)."""
        limit = self.config.runner.max_in_flight or 2 * pool.slots
        return min(limit, pool.slots) if isinstance(pool, ActorPool) else limit

    def drive(self, pool: Pool, stage: Stage, parts: list[str], done: PartDone) -> None:
        """Submit parts in order as slots free up, calling `done` as each commits."""
        queue = deque(Attempt(part, 0, -1) for part in parts)
        pending: dict[Any, Attempt] = {}
        limit = self.in_flight(pool)
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    attempt = queue.popleft()
                    ref, attempt.slot = pool.submit(attempt.part)
                    pending[ref] = attempt
                [ref], _ = self.ray.wait(list(pending), num_returns=1)
                attempt = pending.pop(ref)
                counts = self.outcome(ref, attempt, pool, stage)
                if counts is None:
                    queue.appendleft(Attempt(attempt.part, attempt.tries + 1, -1))
                else:
                    done(attempt.part, counts)
        except BaseException:
            if pending:
                pool.abandon(list(pending))
            raise

    def outcome(self, ref: Any, attempt: Attempt, pool: Pool, stage: Stage) -> Any:
        """A finished part's counts; None when its worker died and it should run again."""
        exceptions = self.ray.exceptions
        lost_worker = (
            exceptions.WorkerCrashedError,
            exceptions.RayActorError,
            exceptions.NodeDiedError,
            exceptions.LocalRayletDiedError,
            exceptions.ObjectLostError,
            exceptions.OutOfMemoryError,
        )
        try:
            counts = self.ray.get(ref)
        except exceptions.RayTaskError as err:
            pool.release(attempt.slot, lost=False)
            raise stage_error(err) from err
        except lost_worker as err:
            pool.release(attempt.slot, lost=True)
            self.check_retry(stage, attempt, err)
            return None
        pool.release(attempt.slot, lost=False)
        return counts

    def check_retry(self, stage: Stage, attempt: Attempt, err: Exception) -> None:
        """Log the retry of a part whose worker died, or raise when none are left."""
        retries = self.config.runner.part_retries
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if attempt.tries >= retries:
            raise PartFailed(
                f"{stage.name} {attempt.part}: its worker died {attempt.tries + 1} times "
                f"(runner.part_retries={retries}); last: {reason}"
            ) from err
        log.warning(
            "%s %s: its worker died (%s); running it again (%d/%d)",
            stage.name,
            attempt.part,
            reason,
            attempt.tries + 1,
            retries,
        )

    def close(self) -> None:
        """Release cached state; shut Ray down only if this runner started it."""
        super().close()
        self.drop_actors()
        if self.started:
            self.ray.shutdown()
            self.started = False
