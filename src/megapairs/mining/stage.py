"""The `mine` stage: neighbours/<channel>/part-N.parquet -> pairs/part-N.parquet.

Reads the finished neighbour parts of every enabled channel (a disabled
channel's files are ignored), mines pairs with hard negatives (`mine_part`) and
writes queries that got no pair to `rejects/mine-part-N.parquet` with the reason.

Windows are resolved on the driver, in `plan`, before any part is mined: a channel with
numbers keeps them; a channel with `window: auto` gets the rule of
`megapairs.neighbours.calibrate` over all its neighbour scores of the parts to mine.
Every enabled channel's window, with the numbers the rule chose (quantiles, scores
counted, a digest of their histogram), is written to `pairs/windows.json`, which the
parts read, and to the manifest's `windows`. The stage's config hash covers the config
(`window: auto` and its quantiles), never the resolved numbers, so it is the same on
every resume; instead each `plan` resolves again from the finished neighbours (one pass
over their scores) and, once parts are mined, refuses (`WindowsChanged`) if the
neighbours were recomputed into other scores since: `megapairs reset --stage mine` then
mines everything again with the new windows.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import PipelineConfig
from megapairs.corpus.store import INGEST_STAGE, read_corpus, rejects_path
from megapairs.mining.mine import Window, mine_part, unpaired_rejects
from megapairs.neighbours.calibrate import AUTO, window_record
from megapairs.neighbours.stage import neighbours_folder, neighbours_stage_name
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.runs import RunDir, read_table, write_json, write_table
from megapairs.schemas import CORPUS_SCHEMA, PAIRS_DIR, rejects_table, with_sources

STAGE_NAME = "mine"
WINDOWS_FILE = "windows.json"  # in pairs/: every enabled channel's window, as mined


class WindowsChanged(RuntimeError):
    """Parts were mined with auto windows that the current neighbours no longer give."""


class MineStage(StageBase):
    """Pairs and hard negatives for every query of a part, from its channels' neighbours."""

    name = STAGE_NAME
    config_sections = ("channels", "neighbours", "mine")

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.channels = list(config.enabled_channels())

    def plan(self, run: RunDir) -> list[str]:
        """Every part some enabled channel's neighbours stage finished (refused if another
        enabled channel has not finished it too); resolves and records the windows."""
        parts = self._parts(run)
        if parts:  # (nothing to mine: no scores to resolve an auto window from)
            resolve_windows(run, self.config, parts)
        return parts

    def _parts(self, run: RunDir) -> list[str]:
        if not self.channels:
            raise ValueError("the mine stage needs at least one enabled channel; none is enabled")
        done = {c: set(run.done_parts(neighbours_stage_name(c))) for c in self.channels}
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
        windows = stage_windows(run, self.config)
        neighbours = {c: self._read_neighbours(run, c, part) for c in windows}
        pairs = mine_part(neighbours, windows, self.config.mine)
        corpus = part_corpus(run, part)
        unsearched = self._unsearched_rejects(corpus, neighbours)
        unpaired = unpaired_rejects(neighbours, windows, pairs, STAGE_NAME)
        rejects = with_sources(pa.concat_tables([unpaired, unsearched]), corpus)
        write_table(run.part_path(PAIRS_DIR, part), pairs)
        write_table(rejects_path(run, STAGE_NAME, part), rejects)
        queries = int(pc.count_distinct(pairs["query_id"]).as_py()) + rejects.num_rows
        counts = {"queries": queries, "not_in_any_channel": unsearched.num_rows}
        return {**counts, **pair_counts(pairs, self.channels)}

    def _unsearched_rejects(self, corpus: pa.Table, neighbours: dict[str, pa.Table]) -> pa.Table:
        """Corpus records of the part that no enabled channel has a vector for (e.g. an
        image without a caption in a caption-only run): rejected here, never lost."""
        searched = pa.concat_arrays([t["id"].combine_chunks() for t in neighbours.values()])
        missing = corpus["id"].filter(pc.invert(pc.is_in(corpus["id"], value_set=searched)))
        channels = ", ".join(self.channels)
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


# windows ---------------------------------------------------------------------------


def windows_path(run: RunDir) -> Any:
    return run.folder(PAIRS_DIR) / WINDOWS_FILE


def read_windows(run: RunDir) -> dict[str, dict[str, Any]] | None:
    """The windows recorded by the mine stage's plan (`pairs/windows.json`), if any."""
    path = windows_path(run)
    return json.loads(path.read_text()) if path.exists() else None


def resolve_windows(run: RunDir, config: PipelineConfig, parts: list[str]) -> dict[str, dict]:
    """Every enabled channel's window record (`window_record`) over `parts`; written to
    `pairs/windows.json` and the manifest's `windows`. Refuses (`WindowsChanged`) when
    parts were mined under other records: the neighbours changed since."""
    current = {
        name: window_record(run, name, channel, parts)
        for name, channel in config.enabled_channels().items()
    }
    recorded = read_windows(run)
    if recorded is not None and recorded != current and run.done_parts(STAGE_NAME):
        raise WindowsChanged(_changed_message(run, recorded, current))
    if recorded != current:
        write_json(windows_path(run), current)
    if run.read_manifest().get("windows") != current:
        run.update_manifest(windows=current)
    return current


def _changed_message(run: RunDir, recorded: dict, current: dict) -> str:
    changed = [c for c in current if recorded.get(c) != current[c]]
    details = "; ".join(
        f"{c}: mined with {(recorded.get(c) or {}).get('window')} from "
        f"{(recorded.get(c) or {}).get('scores')} scores, now {current[c]['window']} from "
        f"{current[c].get('scores')}"
        for c in changed
    )
    return (
        f"the auto windows of {run.uri} no longer match its neighbours ({details}): the "
        f"neighbours were recomputed after mining; mine again with the new windows: "
        f"megapairs reset --run {run.uri} --stage mine"
    )


def stage_windows(run: RunDir, config: PipelineConfig) -> dict[str, Window]:
    """The window of every enabled channel, in config order: its numbers, or for `auto`
    the ones `plan` recorded in `pairs/windows.json`."""
    enabled = config.enabled_channels()
    recorded = read_windows(run) if any(c.window == AUTO for c in enabled.values()) else {}
    windows: dict[str, Window] = {}
    for name, channel in enabled.items():
        if channel.window != AUTO:
            windows[name] = channel.window
        elif recorded and recorded.get(name, {}).get("rule") == AUTO:
            low, high = recorded[name]["window"]
            windows[name] = (float(low), float(high))
        else:
            raise FileNotFoundError(
                f"{windows_path(run)} holds no auto window for channel {name!r}; the mine "
                f"stage's plan resolves it before any part is mined"
            )
    return windows


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
