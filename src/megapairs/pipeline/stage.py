"""The stage contract every pipeline step follows, whichever runner executes it.

A stage's life in one `run_stage` call, and where each step runs:

- `plan(run)` (driver): the part names to produce, in order.
- `prepare(run)` (driver, once, only when some part is pending): builds state
  shared by all parts and writes it to the run directory (e.g. a trained FAISS
  index, a duplicate table); never to `self`, so the stage stays picklable.
- `setup(run)` (each worker process, lazily, at most once per process): builds
  per-worker state (models, backends, an opened index) and returns it; the
  runner caches it (`worker_state`) and hands it to every `run_part` there.
- `run_part(run, part, state, progress)` (any worker): produces one part's files
  atomically and returns its counts. It never writes its completion marker: the
  runner does that after it returns, so a part is done with all its files in
  place or not done at all. Progress goes through the `progress` callback.
- `finalize(run, counts)` (driver, once, after every part is done): stage-wide
  files such as `dataset_info.json`, from the parts' recorded counts.
- `problems(counts)` (driver, optional: `ReportsProblems`): what went wrong that the
  command should report as errors (and exit non-zero on).

`output_dirs` (optional) names the folders a stage writes: `megapairs reset` deletes
them and the runner checks that each finished part's Parquet files there open; stages
that do not declare them are looked up in `megapairs.pipeline.reset.STAGE_OUTPUTS`.

A stage reads its inputs only from the run directory, never from another stage's
memory, so parts may run in any order, in other processes or on other machines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from megapairs.runs import RunDir

# progress(done, total): units of work finished within the part so far, out of total
PartProgress = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    """A progress callback that shows nothing."""


class Stage(Protocol):
    """One step of the pipeline over the parts of a run directory."""

    @property
    def name(self) -> str:
        """Unique stage name, used for progress markers (e.g. `embed.caption`)."""
        ...

    @property
    def config_sections(self) -> tuple[str, ...]:
        """Config sections whose change invalidates this stage's finished parts."""
        ...

    def plan(self, run: RunDir) -> list[str]:
        """The part names this stage must produce, in order."""
        ...

    def prepare(self, run: RunDir) -> None:
        """Build state shared by all parts into the run directory (idempotent)."""
        ...

    def setup(self, run: RunDir) -> Any:
        """Per-worker state for `run_part` (models, an opened index); None if none."""
        ...

    def run_part(
        self, run: RunDir, part: str, state: Any, progress: PartProgress
    ) -> dict[str, Any]:
        """Produce one part's output files atomically; return its counts."""
        ...

    def finalize(self, run: RunDir, counts: dict[str, dict[str, Any]]) -> None:
        """Write stage-wide files once all parts are done (`counts`: part -> its counts)."""
        ...


class StageBase:
    """Defaults for the optional steps: nothing to prepare, set up or finalize."""

    # folders (relative to the run) this stage writes; () to use the table in pipeline.reset
    output_dirs: tuple[str, ...] = ()

    def prepare(self, run: RunDir) -> None:
        """Nothing shared to build."""

    def setup(self, run: RunDir) -> Any:
        """No per-worker state."""
        return None

    def finalize(self, run: RunDir, counts: dict[str, dict[str, Any]]) -> None:
        """No stage-wide files."""


@runtime_checkable
class ReopensParts(Protocol):
    """A stage whose finished parts may need another pass (e.g. annotate retries
    server-side failures): the runner re-runs the parts `stale_parts` names."""

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts to compute again."""
        ...


@runtime_checkable
class ReportsProblems(Protocol):
    """A stage that reports errors after it ran (e.g. a part whose every pair failed): the
    command prints each and exits non-zero."""

    def problems(self, counts: dict[str, dict[str, Any]]) -> list[str]:
        """What went wrong, one sentence each (`counts`: part -> its recorded counts)."""
        ...


@runtime_checkable
class UsesAccelerator(Protocol):
    """A stage whose `setup` loads a model (embed, local-model annotation): a
    distributed runner keeps it in long-lived actors with these resources."""

    def needs_actor(self) -> bool:
        """True when setup is costly enough to keep per actor (a model)."""
        ...

    def wants_gpu(self) -> bool:
        """True when the stage's model runs on a GPU if the worker has one."""
        ...


# per-process cache of worker state ------------------------------------------------

_WORKER_STATE: dict[tuple[str, str, str], Any] = {}


def state_key(stage: Stage, run: RunDir, config_key: str) -> tuple[str, str, str]:
    """What identifies a stage's worker state within a process (`config_key`: a digest of
    the whole config, so a changed server URL or batch size builds new state)."""
    return (stage.name, str(run.root), config_key)


def worker_state(stage: Stage, run: RunDir, config_key: str) -> Any:
    """`stage.setup(run)`, built once per process and stage config, then reused."""
    key = state_key(stage, run, config_key)
    if key not in _WORKER_STATE:
        _WORKER_STATE[key] = stage.setup(run)
    return _WORKER_STATE[key]


def holds_worker_state(stage: Stage, run: RunDir, config_key: str) -> bool:
    """Whether this process has built `stage`'s worker state for `run` and this config."""
    return state_key(stage, run, config_key) in _WORKER_STATE


def release_worker_state(stage: Stage | None = None) -> None:
    """Forget cached worker state (of one stage, or all): frees models and indexes."""
    for key in list(_WORKER_STATE):
        if stage is None or key[0] == stage.name:
            del _WORKER_STATE[key]


def execute_part(
    stage: Stage, run: RunDir, part: str, config_key: str, progress: PartProgress = no_progress
) -> dict[str, Any]:
    """Run one part where this is called and commit it: files first, then the marker."""
    counts = stage.run_part(run, part, worker_state(stage, run, config_key), progress)
    run.mark_done(stage.name, part, counts)
    return counts
