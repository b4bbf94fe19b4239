"""The `mine` stage: neighbours/<channel>/part-N.parquet -> pairs/part-N.parquet.

Reads the finished neighbour parts of every enabled channel (a disabled
channel's files are ignored), mines pairs with hard negatives (`mine_part`) and
writes queries that got no pair to `rejects/mine-part-N.parquet` with the reason.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import PipelineConfig
from megapairs.corpus.store import INGEST_STAGE, read_corpus, rejects_path
from megapairs.mining.mine import Window, mine_part, unpaired_rejects
from megapairs.neighbours.stage import neighbours_folder, neighbours_stage_name
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import CORPUS_SCHEMA, PAIRS_DIR, rejects_table, with_sources

STAGE_NAME = "mine"


class MineStage(StageBase):
    """Pairs and hard negatives for every query of a part, from its channels' neighbours."""

    name = STAGE_NAME
    config_sections = ("channels", "neighbours", "mine")

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.windows: dict[str, Window] = {
            name: channel.window for name, channel in config.enabled_channels().items()
        }

    def plan(self, run: RunDir) -> list[str]:
        """Every part some enabled channel's neighbours stage finished; refuse if another
        enabled channel has not finished it too."""
        if not self.windows:
            raise ValueError("the mine stage needs at least one enabled channel; none is enabled")
        done = {c: set(run.done_parts(neighbours_stage_name(c))) for c in self.windows}
        parts = set().union(*done.values())
        lacking = {c: sorted(parts - finished) for c, finished in done.items() if parts - finished}
        if lacking:
            listed = "; ".join(
                f"{neighbours_stage_name(c)} lacks {', '.join(p)}" for c, p in lacking.items()
            )
            raise RuntimeError(
                f"cannot mine {run.root}: enabled channels have not finished the same "
                f"neighbour parts ({listed}); finish the neighbours stage or disable the channel"
            )
        return sorted(parts)

    def run_part(
        self, run: RunDir, part: str, state: None, progress: PartProgress
    ) -> dict[str, int]:
        neighbours = {c: self._read_neighbours(run, c, part) for c in self.windows}
        pairs = mine_part(neighbours, self.windows, self.config.mine)
        corpus = part_corpus(run, part)
        unsearched = self._unsearched_rejects(corpus, neighbours)
        unpaired = unpaired_rejects(neighbours, self.windows, pairs, STAGE_NAME)
        rejects = with_sources(pa.concat_tables([unpaired, unsearched]), corpus)
        write_table(run.part_path(PAIRS_DIR, part), pairs)
        write_table(rejects_path(run, STAGE_NAME, part), rejects)
        queries = int(pc.count_distinct(pairs["query_id"]).as_py()) + rejects.num_rows
        counts = {"queries": queries, "not_in_any_channel": unsearched.num_rows}
        return {**counts, **pair_counts(pairs, list(self.windows))}

    def _unsearched_rejects(self, corpus: pa.Table, neighbours: dict[str, pa.Table]) -> pa.Table:
        """Corpus records of the part that no enabled channel has a vector for (e.g. an
        image without a caption in a caption-only run): rejected here, never lost."""
        searched = pa.concat_arrays([t["id"].combine_chunks() for t in neighbours.values()])
        missing = corpus["id"].filter(pc.invert(pc.is_in(corpus["id"], value_set=searched)))
        channels = ", ".join(self.windows)
        detail = f"no vector in any enabled channel ({channels}); see the embed counts and rejects"
        return rejects_table(missing, STAGE_NAME, "not_in_any_channel", [detail] * len(missing))

    def _read_neighbours(self, run: RunDir, channel: str, part: str) -> pa.Table:
        stage = neighbours_stage_name(channel)
        path = run.part_path(neighbours_folder(channel), part)
        if not run.is_done(stage, part) or not path.exists():
            raise FileNotFoundError(
                f"{stage} has not finished {part}: {path} is missing or unmarked"
            )
        return read_table(path)


def part_corpus(run: RunDir, part: str) -> pa.Table:
    """id, key and uri of the part's corpus records; empty when the embeddings were made
    outside the pipeline (no ingest stage in the run)."""
    columns = ["id", "key", "uri"]
    if not run.is_done(INGEST_STAGE, part):
        return CORPUS_SCHEMA.empty_table().select(columns)
    return read_corpus(run, part, columns=columns)


def pair_counts(pairs: pa.Table, channels: list[str]) -> dict[str, int]:
    """Queries with pairs, pairs, hard negatives, topped-up negatives and pairs per channel."""
    found = pc.value_counts(pc.list_flatten(pairs["channels"])).to_pylist()
    per_channel = {row["values"]: row["counts"] for row in found}
    return {
        "queries_with_pairs": int(pc.count_distinct(pairs["query_id"]).as_py()),
        "pairs": pairs.num_rows,
        "hard_negatives": int(
            pc.sum(pc.list_value_length(pairs["hard_negative_ids"])).as_py() or 0
        ),
        "topped_up": int(pc.sum(pairs["hard_negative_topped_up"]).as_py() or 0),
        **{f"pairs_{c}": int(per_channel.get(c, 0)) for c in channels},
    }
