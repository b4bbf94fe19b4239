"""The annotation cache: every model answer of a part, kept so nothing is sent twice.

Answers are keyed by (pair id, step, prompt version, model, seed, settings), where
settings is the digest of every output-changing annotate setting (sampling, ranges,
image size, ...), so a changed config never reuses an answer made under another.
Requests that failed for good (a 4xx, an empty answer: not transient) are kept too,
with their reason, so a re-run does not send them again. Entries are appended to
`annotation_cache/<part>/chunk-NNNNN.parquet`, each chunk written atomically after
`flush_every` new entries, so a killed run loses at most the entries not yet
flushed; a re-run loads the chunks and resends only the rest. A chunk that does not
open (truncated) is moved to `<run>/quarantine/` and its entries are asked again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.annotation.types import BackendError, Completion, Step
from megapairs.runs import AnyPath, RunDir, list_files, read_table, write_table
from megapairs.schemas import ANNOTATION_CACHE_DIR

log = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("step", pa.string()),
        ("prompt_version", pa.string()),
        ("model", pa.string()),  # describe: describer; instruct/repair: describer>instructor
        ("seed", pa.int64()),
        ("settings", pa.string()),  # digest of the output-changing annotate settings
        ("text", pa.string()),  # the answer, or the failed response's body
        ("attempts", pa.int32()),
        ("error", pa.string()),  # null for an answer; the reason of a final failure
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class CacheKey:
    """What an answer depends on besides the pair: prompts, models and seed."""

    prompt_version: str
    describer_model: str
    instructor_model: str
    seed: int
    settings: str

    def model_for(self, step: Step) -> str:
        if step == "describe":
            return self.describer_model
        return f"{self.describer_model}>{self.instructor_model}"


class AnswerCache:
    """The finished answers (and final failures) of one part, loaded from disk and
    appended in chunks; `quarantined` counts the chunks that did not open."""

    def __init__(
        self,
        run: RunDir,
        part: str,
        key: CacheKey,
        flush_every: int,
        folder: str = ANNOTATION_CACHE_DIR,
    ) -> None:
        self.run = run
        self.folder = run.folder(folder) / part  # (the score stage's judge: judge_cache/)
        self.key = key
        self.flush_every = flush_every
        self.entries: dict[tuple[str, str], Completion | BackendError] = {}
        self.pending: list[dict[str, object]] = []
        self.next_chunk = 0
        self.quarantined = 0
        self._load()

    def _load(self) -> None:
        for path in list_files(self.folder, "chunk-*.parquet"):
            self.next_chunk = max(self.next_chunk, int(path.stem.removeprefix("chunk-")) + 1)
            table = self._read_chunk(path)
            if table is None:
                continue
            mask = pc.and_(
                pc.and_(
                    pc.equal(table["prompt_version"], self.key.prompt_version),
                    pc.equal(table["seed"], self.key.seed),
                ),
                pc.equal(table["settings"], self.key.settings),
            )
            for row in table.filter(mask).to_pylist():
                if row["model"] == self.key.model_for(row["step"]):
                    self.entries[(row["pair_id"], row["step"])] = _entry(row)

    def _read_chunk(self, path: AnyPath) -> pa.Table | None:
        """A chunk's table; None for one that does not open, moved to the quarantine."""
        try:
            return read_table(path)
        except pa.ArrowInvalid as err:
            moved = self.run.quarantine(path)
            self.quarantined += 1
            log.warning(
                "annotation cache chunk %s does not open (%s); moved to %s, its answers "
                "are asked again",
                path,
                err,
                moved,
            )
            return None

    def get(self, pair_id: str, step: Step) -> Completion | BackendError | None:
        """The answer, or the final failure, of this step; None when not yet asked."""
        return self.entries.get((pair_id, step))

    def put(self, pair_id: str, step: Step, entry: Completion | BackendError) -> None:
        """Remember an answer or a final failure; write a chunk once `flush_every` wait."""
        self.entries[(pair_id, step)] = entry
        self.pending.append(
            {
                "pair_id": pair_id,
                "step": step,
                "prompt_version": self.key.prompt_version,
                "model": self.key.model_for(step),
                "seed": self.key.seed,
                "settings": self.key.settings,
                "text": entry.raw if isinstance(entry, BackendError) else entry.text,
                "attempts": entry.attempts,
                "error": entry.reason if isinstance(entry, BackendError) else None,
                "detail": entry.detail if isinstance(entry, BackendError) else None,
            }
        )
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one new chunk (atomically)."""
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=CACHE_SCHEMA)
        write_table(self.folder / f"chunk-{self.next_chunk:05d}.parquet", table)
        self.next_chunk += 1
        self.pending = []


def _entry(row: dict[str, object]) -> Completion | BackendError:
    attempts = int(row["attempts"])  # type: ignore[call-overload]
    if row["error"] is None:
        return Completion(str(row["text"]), attempts)
    return BackendError(str(row["error"]), str(row["detail"]), attempts, str(row["text"] or ""))
