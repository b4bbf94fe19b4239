"""The annotation cache: every model answer of a part, kept so nothing is sent twice.

Answers are keyed by (pair id, step, prompt version, model, seed). They are
appended to `annotation_cache/<part>/chunk-NNNNN.parquet`, each chunk written
atomically after `flush_every` new answers, so a killed run loses at most the
answers not yet flushed; a re-run loads the chunks and resends only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.annotation.types import Completion, Step
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import ANNOTATION_CACHE_DIR

CACHE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("step", pa.string()),
        ("prompt_version", pa.string()),
        ("model", pa.string()),  # describe: describer; instruct/repair: describer>instructor
        ("seed", pa.int64()),
        ("text", pa.string()),
        ("attempts", pa.int32()),
    ]
)


@dataclass(frozen=True)
class CacheKey:
    """What an answer depends on besides the pair: prompts, models and seed."""

    prompt_version: str
    describer_model: str
    instructor_model: str
    seed: int

    def model_for(self, step: Step) -> str:
        if step == "describe":
            return self.describer_model
        return f"{self.describer_model}>{self.instructor_model}"


class AnswerCache:
    """The finished answers of one part, loaded from disk and appended in chunks."""

    def __init__(self, run: RunDir, part: str, key: CacheKey, flush_every: int) -> None:
        self.folder = run.folder(ANNOTATION_CACHE_DIR) / part
        self.key = key
        self.flush_every = flush_every
        self.answers: dict[tuple[str, str], Completion] = {}
        self.pending: list[dict[str, object]] = []
        self.chunks = 0
        self._load()

    def _load(self) -> None:
        for path in sorted(self.folder.glob("chunk-*.parquet")):
            self.chunks += 1
            table = read_table(path)
            mask = pc.and_(
                pc.equal(table["prompt_version"], self.key.prompt_version),
                pc.equal(table["seed"], self.key.seed),
            )
            for row in table.filter(mask).to_pylist():
                if row["model"] == self.key.model_for(row["step"]):
                    self.answers[(row["pair_id"], row["step"])] = Completion(
                        row["text"], row["attempts"]
                    )

    def get(self, pair_id: str, step: Step) -> Completion | None:
        return self.answers.get((pair_id, step))

    def put(self, pair_id: str, step: Step, answer: Completion) -> None:
        """Remember an answer; write a chunk once `flush_every` are pending."""
        self.answers[(pair_id, step)] = answer
        self.pending.append(
            {
                "pair_id": pair_id,
                "step": step,
                "prompt_version": self.key.prompt_version,
                "model": self.key.model_for(step),
                "seed": self.key.seed,
                "text": answer.text,
                "attempts": answer.attempts,
            }
        )
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the pending answers as one new chunk (atomically)."""
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=CACHE_SCHEMA)
        write_table(self.folder / f"chunk-{self.chunks:05d}.parquet", table)
        self.chunks += 1
        self.pending = []
