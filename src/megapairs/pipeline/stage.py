"""The stage contract every pipeline step follows, whichever runner executes it.

A stage splits its work into named parts (`plan`), may build shared state once
(`prepare`, e.g. a FAISS index), and turns one part into output files
(`run_part`), returning counts. It never writes its completion marker itself:
the runner does that after `run_part` returns, so a part is either done with
all its files in place or not done at all. A stage reads its inputs only
from the run directory, never from another stage's memory, so parts may run in
other processes or on other machines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from megapairs.runs import RunDir


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
        """Build state shared by all parts (idempotent; may write files atomically)."""
        ...

    def run_part(self, run: RunDir, part: str) -> dict[str, int]:
        """Produce one part's output files atomically; return its counts."""
        ...


@runtime_checkable
class ReopensParts(Protocol):
    """A stage whose finished parts may need another pass (e.g. annotate retries
    server-side failures): the runner re-runs the parts `stale_parts` names."""

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts to compute again."""
        ...
