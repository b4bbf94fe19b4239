"""The `export` stage: annotated pairs -> dataset/part-N.parquet (+ .jsonl) in the MegaPairs schema.

One row per annotated pair (failed pairs stay in `annotation_failures/`), in the
pairs table's order: the released columns `q_img`, `q_text`, `t_img`, `hns` (the
query image first, then the mined negatives, as the released dataset has it),
then ours (ids, channels, scores, captions, description, provenance).

Image paths, by `export.images`:
- `copy`: every referenced image is materialised once, with its original bytes, as
  `dataset/images/<id's corpus part>/<id>.<ext>` (hard-linked from its source file
  when the file system allows, else copied; written atomically; skipped when present),
  and paths are relative to the dataset folder, so the folder moves as one piece.
- `reference`: the absolute source paths; records whose bytes exist only in the run's
  image store (tar or Parquet input) cannot be referenced and need `copy`.

A finished part is exported again when its shard is gone, the annotate stage has re-run
it since (a digest of its annotation files differs from the one exported), its scores
changed, or, with `export.exclude_flagged`, the flags on its pairs did (`stale_parts`, which
the runner honours).

Curation flags (`dataset/flags.py`), with `export.exclude_flagged`: applied to the annotated
pairs before the gate (so the gate's scores stay aligned with the instructions left): a
flagged pair goes to `rejects/export-part-N.parquet` (reason `flagged`); a flagged instruction
leaves `q_text` while its text is still the flagged one (else the flag is stale, counted and
ignored), and a pair left with fewer than `annotate.min_instructions` goes to the rejects as
`flagged_instructions`. annotated = rows + gate_rejected_pairs + flag_rejected_pairs.

The quality gate: when the score stage has finished a part (`scores/part-N.parquet` and its
marker), each row also carries its scores (`DATASET_SCORE_FIELDS`, lists aligned with
`q_text`) and `export.filter` applies (rules in `dataset/gate.py`): failing instructions
leave `q_text`, flagged false negatives leave `hns` (topped up from the query's
below-window neighbours), and a pair left without instructions goes to
`rejects/export-part-N.parquet` (id: the query, key: the pair id, reason `gate:<rule>`).
The part's counts add up: annotated = rows + gate_rejected_pairs, instructions_in =
instructions_kept + the dropped_* counts. A part without scores is exported as before, and
refused while a rule is on.

`dataset/dataset_info.json` (columns, image root, per-part counts, config provenance)
is written once all parts are done (`finalize`, on the driver), from the finished
parts' markers, so it always describes the files on disk, also after a resume, and
no two parts ever write it at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import PipelineConfig
from megapairs.corpus.store import load_image_bytes, read_corpus, rejects_path
from megapairs.dataset.flags import ActiveFlags, FlagEvent, FlagStore
from megapairs.dataset.gate import (
    ChannelNeighbours,
    GatedPair,
    ScoreRow,
    below_window_candidates,
    gate_counts,
    gate_pair,
    reject_reason,
    rules_on,
)
from megapairs.neighbours.stage import neighbours_folder, neighbours_stage_name
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.quality.stage import SCORE_ROW_SETTINGS
from megapairs.runs import (
    AnyPath,
    RunDir,
    atomic_path,
    environment_versions,
    filesystem,
    is_url,
    local_path,
    now_iso,
    parquet_rows,
    part_name,
    read_table,
    write_json,
    write_table,
)
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATIONS_DIR,
    DATASET_DIR,
    DATASET_SCHEMA,
    IMAGES_DIR,
    PAIRS_DIR,
    PART_STRIDE,
    PROVENANCE_FIELDS,
    SCORED_DATASET_SCHEMA,
    SCORES_DIR,
    rejects_table,
)

STAGE_NAME = "export"
ANNOTATE_STAGE = "annotate"
MINE_STAGE = "mine"
SCORE_STAGE = "score"
INFO_FILE = "dataset_info.json"
IMAGES_FOLDER = "images"
RELEASED_COLUMNS = ("q_img", "q_text", "t_img", "hns")
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # what Pillow calls many camera JPEGs
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
INDEX_COLUMNS = ["id", "path", "source_format", "caption", "sha256"]
PAIR_COLUMNS = [
    "pair_id",
    "query_id",
    "target_id",
    "channels",
    "channel_scores",
    "hard_negative_ids",
]
PROVENANCE_COLUMNS = [name for name, _ in PROVENANCE_FIELDS]
ANNOTATION_COLUMNS = ["pair_id", "description", "instructions", *PROVENANCE_COLUMNS]
# dataset list column -> the score row's field, one value per kept instruction
SCORE_LISTS = {
    "instruction_target_scores": "target_score",
    "instruction_ranks": "rank",
    "instruction_margins": "margin",
    "instruction_text_only_ranks": "text_only_rank",
    "instruction_image_only_ranks": "image_only_rank",
    "text_shortcuts": "text_shortcut",
    "image_shortcuts": "image_shortcut",
    "judge_verdicts": "judge_verdict",
    "judge_reasons": "judge_reason",
}


class ExportError(RuntimeError):
    """An export that cannot be made as configured (a missing record, changed bytes, ...)."""


def image_extension(source_format: str | None) -> str:
    """File extension for a corpus `source_format` (JPEG -> jpg; unknown -> bin)."""
    return EXTENSIONS.get((source_format or "").upper(), "bin")


def image_relpath(record_id: int, source_format: str | None) -> str:
    """Where `copy` puts a record's image, relative to the dataset folder."""
    folder = part_name(record_id // PART_STRIDE)
    return f"{IMAGES_FOLDER}/{folder}/{record_id}.{image_extension(source_format)}"


class CorpusIndex:
    """id -> path, source format, caption and sha256 of every finished corpus record."""

    def __init__(self, table: pa.Table) -> None:
        ids = table["id"].to_numpy()
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.table = table.take(pa.array(order))

    @classmethod
    def read(cls, run: RunDir) -> CorpusIndex:
        return cls(read_corpus(run, columns=INDEX_COLUMNS))

    def lookup(self, ids: np.ndarray) -> pa.Table:
        """The index rows of `ids`, in that order; every id must be in the corpus."""
        if len(self.ids) == 0:
            clipped, found = np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        else:
            clipped = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
            found = self.ids[clipped] == ids
        if not found.all():
            missing = ids[~found][:10].tolist()
            raise ExportError(
                f"records {missing} are referenced by pairs but not in any finished corpus "
                "part; finish the ingest stage (or re-run mining on this corpus)"
            )
        return self.table.take(pa.array(clipped))


class ExportStage(StageBase):
    """Annotated pairs of a part -> its dataset shard(s) and referenced images; then
    `dataset_info.json` once, over all parts (`finalize`)."""

    name = STAGE_NAME

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    @property
    def config_sections(self) -> tuple[str, ...]:
        """`export` (its filter rules included), and the score settings when scoring is on."""
        return ("export", *SCORE_ROW_SETTINGS) if self.config.score.enabled else ("export",)

    def plan(self, run: RunDir) -> list[str]:
        """The parts the annotate stage has finished."""
        return run.done_parts(ANNOTATE_STAGE)

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts to export again: their shard is gone, or the part's annotations
        changed since (the annotate stage retried failures, or ran again with other models),
        or its scores did (the score stage finished or redid it), or the flags to apply did
        (flags changed under `exclude_flagged`, or it was switched on or off)."""
        recorded = run.part_counts(STAGE_NAME)
        flags = FlagStore(run).active() if self.config.export.exclude_flagged else None
        return [
            p for p in self.plan(run) if p in recorded and self._stale(run, p, recorded[p], flags)
        ]

    def _stale(
        self, run: RunDir, part: str, counts: dict[str, Any], flags: ActiveFlags | None
    ) -> bool:
        suffixes = [".parquet", ".jsonl"] if self.config.export.jsonl else [".parquet"]
        if not all(run.part_path(DATASET_DIR, part, s).exists() for s in suffixes):
            return True
        if counts.get("annotations_sha256") != annotations_digest(run, part):
            return True
        flags_digest = flags.for_part(part).digest() if flags is not None else None
        if counts.get("flags_sha256") != flags_digest:
            return True
        return counts.get("scores_sha256") != scores_digest(run, part)

    def setup(self, run: RunDir) -> CorpusIndex:
        """Read the whole corpus index once per worker: pairs reference records of any part."""
        return CorpusIndex.read(run)

    def run_part(
        self, run: RunDir, part: str, state: CorpusIndex, progress: PartProgress
    ) -> dict[str, Any]:
        rows, failed = annotated_pairs(run, part)
        annotated = rows.num_rows
        flagged = self._flags(run, part, rows)
        if flagged is not None:
            rows = flagged.rows
        gated = self._gate(run, part, rows, flagged)
        if gated is not None:
            rows = gated.rows
        records = state.lookup(referenced_ids(rows))
        folder = dataset_folder(run)
        if self.config.export.images == "copy":
            materialise_images(run, folder, records)
            paths = dict(zip(records["id"].to_pylist(), relative_paths(records), strict=True))
        else:
            paths = reference_paths(records, part)
        captions = dict(zip(records["id"].to_pylist(), records["caption"].to_pylist(), strict=True))
        table = dataset_table(rows, paths, captions)
        if gated is not None:
            table = with_score_columns(table, gated.columns)
        write_table(run.part_path(DATASET_DIR, part), table)
        if self.config.export.jsonl:
            write_jsonl(run.part_path(DATASET_DIR, part, ".jsonl"), table)
        # only counts that a resumed run reproduces (not how many images this run copied)
        counts = {
            "rows": table.num_rows,
            "pairs": annotated + failed,
            "failed": failed,
            "images_referenced": records.num_rows,
            "annotations_sha256": annotations_digest(run, part),
            "annotated": annotated,
            "flags_sha256": flagged.digest if flagged is not None else None,
        }
        write_rejects(run, part, gated, flagged)
        if flagged is not None:
            counts = {**counts, **flagged.counts}
        if gated is None:
            return counts
        return {**counts, **gated.counts, "scores_sha256": gated.digest}

    def _flags(self, run: RunDir, part: str, rows: pa.Table) -> FlaggedRows | None:
        """The part's rows with its active flags applied under `export.exclude_flagged`;
        None (rows as they are) otherwise."""
        if not self.config.export.exclude_flagged:
            return None
        flags = FlagStore(run).active().for_part(part)
        return apply_flags(rows, flags, self.config.annotate.min_instructions)

    def _gate(
        self, run: RunDir, part: str, rows: pa.Table, flagged: FlaggedRows | None
    ) -> GatedRows | None:
        """The part's rows through `export.filter` when the score stage finished it; None
        (rows as they are) without scores, which a rule that is on refuses."""
        scores = part_scores(run, part)
        if scores is not None and flagged is not None:
            scores = flagged.scores(scores)
        if scores is None:
            if rules_on(self.config.export.filter):
                raise ExportError(
                    f"export.filter has rules on but the score stage has not finished {part}: "
                    "run `megapairs score` (or synthesize with score.enabled=true) first, or "
                    "switch the rules off"
                )
            return None
        return gate_rows(run, part, rows, scores, self.config)

    def finalize(self, run: RunDir, counts: dict[str, dict[str, Any]]) -> None:
        """Write dataset_info.json from the finished parts (stage-wide, so only here)."""
        write_dataset_info(run, self.config, counts)

    def problems(self, counts: dict[str, dict[str, Any]]) -> list[str]:
        """Parts whose pairs do not add up (pairs = annotated + failed, annotated = rows +
        gate-rejected + left out for flags), one sentence each."""
        return [
            f"export {part}: {c['pairs']} pairs = {c['annotated']} annotated + {c['failed']} "
            f"failed, and annotated = {c['rows']} rows + {c.get('gate_rejected_pairs', 0)} "
            f"gate-rejected + {c.get('flag_rejected_pairs', 0)} left out for flags, do not "
            "add up: re-run export"
            for part, c in sorted(counts.items())
            if "annotated" in c and not part_balances(c)
        ]


def part_balances(counts: dict[str, Any]) -> bool:
    """Whether an export part's counts add up: pairs = annotated + failed = rows + pairs the
    gate rejected + pairs flags left out + failed."""
    out = counts["rows"] + counts.get("gate_rejected_pairs", 0)
    out += counts.get("flag_rejected_pairs", 0)
    return counts["pairs"] == counts["annotated"] + counts["failed"] and counts["annotated"] == out


def write_rejects(
    run: RunDir, part: str, gated: GatedRows | None, flagged: FlaggedRows | None
) -> None:
    """rejects/export-part-N.parquet: the pairs flags left out, then those the gate rejected;
    removed when the part was neither gated nor flagged (an earlier export's file)."""
    path = rejects_path(run, STAGE_NAME, part)
    tables = [t.rejects for t in (flagged, gated) if t is not None]
    if gated is None and not (flagged is not None and flagged.rejects.num_rows):
        path.unlink(missing_ok=True)
        return
    write_table(path, pa.concat_tables(tables))


def annotations_digest(run: RunDir, part: str) -> str:
    """A digest of the part's annotation and failure files, as exported."""
    digest = hashlib.sha256()
    for folder in (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR):
        path = run.part_path(folder, part)
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:16]


def scores_digest(run: RunDir, part: str) -> str | None:
    """A digest of the part's score table, or None while the score stage has not finished
    the part."""
    path = run.part_path(SCORES_DIR, part)
    if not run.is_done(SCORE_STAGE, part) or not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def part_scores(run: RunDir, part: str) -> pa.Table | None:
    """The part's score rows when the score stage has finished it, else None."""
    if not run.is_done(SCORE_STAGE, part):
        return None
    path = run.part_path(SCORES_DIR, part)
    if not path.exists():
        raise ExportError(f"the score stage marked {part} done but {path} is missing")
    return read_table(path)


def dataset_folder(run: RunDir) -> AnyPath:
    return run.folder(DATASET_DIR)


def annotated_pairs(run: RunDir, part: str) -> tuple[pa.Table, int]:
    """The part's annotated pairs in pairs order, with their annotation columns, and the
    number of failed pairs; refuses a part whose pairs != annotated + failed."""
    pairs = read_table(run.part_path(PAIRS_DIR, part), PAIR_COLUMNS)
    annotations = read_table(run.part_path(ANNOTATIONS_DIR, part), ANNOTATION_COLUMNS)
    failed = parquet_rows(run.part_path(ANNOTATION_FAILURES_DIR, part))
    if pc.count_distinct(annotations["pair_id"]).as_py() != annotations.num_rows:
        raise ExportError(f"annotations of {part} list a pair more than once")
    position = pc.index_in(pairs["pair_id"], value_set=annotations["pair_id"])
    annotated = pc.is_valid(position)
    kept = pairs.filter(annotated)
    if kept.num_rows != annotations.num_rows or pairs.num_rows != kept.num_rows + failed:
        raise ExportError(
            f"{part}: {pairs.num_rows} pairs but {annotations.num_rows} annotations "
            f"({kept.num_rows} of them of these pairs) and {failed} failures; every pair must "
            "be annotated or failed exactly once: re-run the annotate stage for this part"
        )
    taken = annotations.take(position.filter(annotated))
    for name in ANNOTATION_COLUMNS[1:]:
        kept = kept.append_column(name, taken[name])
    return kept, failed


def referenced_ids(rows: pa.Table) -> np.ndarray:
    """Distinct ids of every query, target and hard negative of `rows`, sorted."""
    negatives = pc.list_flatten(rows["hard_negative_ids"])
    columns = [rows["query_id"], rows["target_id"], negatives]
    return np.unique(np.concatenate([np.asarray(c.to_numpy(), dtype=np.int64) for c in columns]))


@dataclass(frozen=True)
class FlaggedRows:
    """A part's annotated pairs with its active flags applied: the rows left (flagged
    instructions removed), the pairs left out as rejects, what left, the counts."""

    rows: pa.Table
    rejects: pa.Table
    removed: dict[str, list[int]]  # kept pair id -> indices of the instructions taken out
    rejected: set[str]  # pair ids left out
    counts: dict[str, int]
    digest: str | None  # of the part's active flags

    def scores(self, scores: pa.Table) -> pa.Table:
        """The part's score rows for the rows left: those of left-out pairs and removed
        instructions dropped, the others' instruction_index renumbered to match."""
        if not self.removed and not self.rejected:
            return scores
        keep, indices = [], []
        pairs, listed = scores["pair_id"].to_pylist(), scores["instruction_index"].to_pylist()
        for pair, index in zip(pairs, listed, strict=True):
            gone = self.removed.get(pair, [])
            keep.append(pair not in self.rejected and index not in gone)
            indices.append(index - sum(g < index for g in gone))
        position = scores.schema.get_field_index("instruction_index")
        kind = scores.schema.field(position).type
        renumbered = scores.set_column(position, "instruction_index", pa.array(indices, kind))
        return renumbered.filter(pa.array(keep, pa.bool_()))


def apply_flags(rows: pa.Table, flags: ActiveFlags, min_instructions: int) -> FlaggedRows:
    """Leave flagged pairs out (`flagged`), take flagged instructions out while their text is
    unchanged (else the flag is stale), and leave out a pair that keeps fewer than
    `min_instructions` (`flagged_instructions`)."""
    by_pair: dict[str, dict[int, FlagEvent]] = defaultdict(dict)
    for (pair, index), flag in flags.instructions.items():
        by_pair[pair][index] = flag
    pair_ids = rows["pair_id"].to_pylist()
    decisions = [
        decide_pair(listed, flags.pairs.get(pair), by_pair.get(pair, {}), min_instructions)
        for pair, listed in zip(pair_ids, rows["instructions"].to_pylist(), strict=True)
    ]
    kept = [d for d in decisions if d.reject is None]
    table = rows.filter(pa.array([d.reject is None for d in decisions], pa.bool_()))
    texts = pa.array([d.left for d in kept], pa.list_(pa.string()))
    rejected = {p: d.reject for p, d in zip(pair_ids, decisions, strict=True) if d.reject}
    return FlaggedRows(
        rows=_replace(table, "instructions", texts),
        rejects=flag_rejects(rows, decisions),
        removed={p: d.gone for p, d in zip(pair_ids, decisions, strict=True) if d.removes},
        rejected=set(rejected),
        counts={
            "flagged_pairs": sum(reason == "flagged" for reason, _ in rejected.values()),
            "flagged_instructions": sum(len(d.gone) for d in decisions if d.pair_flag is None),
            "flag_rejected_pairs": len(rejected),
            "stale_flags": sum(d.stale for d in decisions),
        },
        digest=flags.digest(),
    )


@dataclass(frozen=True)
class FlagDecision:
    """What the flags do to one annotated pair."""

    left: list[str]  # the instructions left
    gone: list[int]  # indices of the flagged instructions taken out
    stale: int  # instruction flags whose text is no longer at their index
    pair_flag: FlagEvent | None
    reject: tuple[str, str] | None  # (reason, detail) when the pair is left out

    @property
    def removes(self) -> bool:
        """Kept, with instructions taken out."""
        return self.reject is None and bool(self.gone)


def decide_pair(
    listed: list[str],
    pair_flag: FlagEvent | None,
    flags: dict[int, FlagEvent],
    min_instructions: int,
) -> FlagDecision:
    """Apply a pair's whole-pair flag and instruction flags to its instructions."""
    current = {i: f for i, f in flags.items() if i < len(listed) and listed[i] == f.instruction}
    left = [text for i, text in enumerate(listed) if i not in current]
    reject = None
    if pair_flag is not None:
        reject = ("flagged", f"flagged by {pair_flag.user}: {pair_flag.reason}")
    elif current and len(left) < min_instructions:
        who = "; ".join(f"{f.user}: {f.reason}" for _, f in sorted(current.items()))
        detail = (
            f"{len(current)} of {len(listed)} instructions flagged ({who}); {len(left)} left, "
            f"fewer than annotate.min_instructions ({min_instructions})"
        )
        reject = ("flagged_instructions", detail)
    return FlagDecision(left, sorted(current), len(flags) - len(current), pair_flag, reject)


def flag_rejects(rows: pa.Table, decisions: list[FlagDecision]) -> pa.Table:
    """REJECTS_SCHEMA rows of the pairs flags left out: id = the query, key = the pair id."""
    order = [row for row, d in enumerate(decisions) if d.reject is not None]
    taken = rows.take(pa.array(order, pa.int64()))
    reasons = [decisions[row].reject for row in order]
    table = rejects_table(
        taken["query_id"].to_pylist(),
        STAGE_NAME,
        [r[0] for r in reasons if r],
        [r[1] for r in reasons if r],
    )
    return _replace(table, "key", pa.array(taken["pair_id"].to_pylist(), pa.string()))


# a kept pair: the gate's outcome, its annotated instructions, its score rows
Survivor = tuple[GatedPair, list[str], list[ScoreRow | None]]


@dataclass(frozen=True)
class GatedRows:
    """A part's annotated pairs after the gate: the kept rows (instructions and hard
    negatives as gated), their score columns, the rejected pairs and the counts."""

    rows: pa.Table
    columns: dict[str, list[Any]]
    rejects: pa.Table
    counts: dict[str, int]
    digest: str | None


def gate_rows(
    run: RunDir, part: str, rows: pa.Table, scores: pa.Table, config: PipelineConfig
) -> GatedRows:
    """Apply `export.filter` to a part's annotated pairs with its score rows."""
    aligned = align_scores(rows, scores, part)
    pair_ids = rows["pair_id"].to_pylist()
    queries, targets = rows["query_id"].to_pylist(), rows["target_id"].to_pylist()
    negatives = rows["hard_negative_ids"].to_pylist()
    flagged = {q for q, p in zip(queries, pair_ids, strict=True) if _any_flagged(aligned[p])}
    candidates = NeighbourCandidates(run, part, config, sorted(flagged))
    rules, limit = config.export.filter, config.mine.num_hard_negatives
    least = rules.min_instructions or config.annotate.min_instructions
    gated = [
        gate_pair(q, t, ns, aligned[p], rules, candidates, limit, least)
        for p, q, t, ns in zip(pair_ids, queries, targets, negatives, strict=True)
    ]
    texts = rows["instructions"].to_pylist()
    survivors = [
        (g, t, aligned[p]) for g, t, p in zip(gated, texts, pair_ids, strict=True) if not g.rejected
    ]
    return GatedRows(
        rows=kept_rows(rows, gated, survivors),
        columns=score_columns(survivors),
        rejects=gate_rejects(rows, gated),
        counts=gate_counts(gated),
        digest=scores_digest(run, part),
    )


def kept_rows(rows: pa.Table, gated: list[GatedPair], survivors: list[Survivor]) -> pa.Table:
    """The rows of the pairs the gate kept, with its instructions and hard negatives."""
    kept = rows.filter(pa.array([not g.rejected for g in gated], pa.bool_()))
    instructions = [[t[i] for i in g.kept] for g, t, _ in survivors]
    kept = _replace(kept, "instructions", pa.array(instructions, pa.list_(pa.string())))
    negatives = pa.array([g.negatives for g, _, _ in survivors], pa.list_(pa.int64()))
    return _replace(kept, "hard_negative_ids", negatives)


def _any_flagged(scores: list[ScoreRow | None]) -> bool:
    return any(s is not None and s["false_negative_ids"] for s in scores)


def _replace(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def align_scores(rows: pa.Table, scores: pa.Table, part: str) -> dict[str, list[ScoreRow | None]]:
    """pair id -> one score row (or None: not scored) per annotated instruction; refuses
    rows of another pair or instruction text (scores older than the annotations)."""
    texts = dict(zip(rows["pair_id"].to_pylist(), rows["instructions"].to_pylist(), strict=True))
    aligned: dict[str, list[ScoreRow | None]] = {p: [None] * len(t) for p, t in texts.items()}
    for score in scores.to_pylist():
        pair, index = score["pair_id"], score["instruction_index"]
        listed = texts.get(pair)
        if listed is None or not 0 <= index < len(listed) or listed[index] != score["instruction"]:
            raise ExportError(
                f"{part}: the score of pair {pair} instruction {index} is not of the part's "
                "annotations (scored before the annotate stage re-ran): re-run the score stage "
                "for this part"
            )
        if aligned[pair][index] is not None:
            raise ExportError(f"{part}: pair {pair} instruction {index} is scored twice")
        aligned[pair][index] = score
    return aligned


class NeighbourCandidates:
    """query id -> its below-window neighbours over the enabled channels (mining's top-up
    order), read once from the part's neighbours tables, for the queries `needed`."""

    def __init__(self, run: RunDir, part: str, config: PipelineConfig, needed: list[int]) -> None:
        self.run, self.part, self.config, self.needed = run, part, config, needed
        self.lists: dict[int, list[ChannelNeighbours]] | None = None

    def __call__(self, query_id: int) -> list[int]:
        if self.lists is None:
            self.lists = self._read()
        return below_window_candidates(query_id, self.lists.get(query_id, []))

    def _read(self) -> dict[int, list[ChannelNeighbours]]:
        from megapairs.mining.stage import stage_windows

        lists: dict[int, list[ChannelNeighbours]] = defaultdict(list)
        try:
            windows = stage_windows(self.run, self.config)  # as mined (auto: as recorded)
        except FileNotFoundError as err:
            raise ExportError(f"drop_false_negatives tops up below the windows: {err}") from None
        for channel, window in windows.items():
            for row in self._table(channel).to_pylist():
                lists[row["id"]].append(
                    ChannelNeighbours(row["neighbour_ids"] or [], row["scores"] or [], window)
                )
        return lists

    def _table(self, channel: str) -> pa.Table:
        path = self.run.part_path(neighbours_folder(channel), self.part)
        if not self.run.is_done(neighbours_stage_name(channel), self.part) or not path.exists():
            raise ExportError(
                f"drop_false_negatives needs {path} (the query's neighbours) to top up hard "
                f"negatives; {neighbours_stage_name(channel)} has not finished {self.part}"
            )
        columns = ["id", "neighbour_ids", "scores"]
        return read_table(path, columns, filters=[("id", "in", self.needed)])


def score_columns(survivors: list[Survivor]) -> dict[str, list[Any]]:
    """DATASET_SCORE_FIELDS values of the kept pairs (gate outcome, instructions, scores)."""
    columns: dict[str, list[Any]] = defaultdict(list)
    for gated, texts, scores in survivors:
        kept = [scores[i] for i in gated.kept]
        for name, key in SCORE_LISTS.items():
            columns[name].append([s[key] if s is not None else None for s in kept])
        columns["scorer"].append(_first(scores, "scorer"))
        columns["judge_model"].append(_first(kept, "judge_model"))
        columns["false_negative_ids"].append(gated.false_negatives)
        columns["topped_up_negative_ids"].append(gated.topped_up)
        dropped = [f"{d.rule}: {texts[d.index]}" for d in gated.dropped]
        columns["gate_dropped_instructions"].append(dropped)
    return dict(columns)


def _first(scores: list[ScoreRow | None], key: str) -> Any:
    return next((s[key] for s in scores if s is not None and s[key] is not None), None)


def gate_rejects(rows: pa.Table, gated: list[GatedPair]) -> pa.Table:
    """REJECTS_SCHEMA rows of the pairs the gate left with too few instructions (fewer than
    `annotate.min_instructions`): id = the query, key = the pair id."""
    rejected = [i for i, g in enumerate(gated) if g.rejected]
    taken = rows.take(pa.array(rejected, pa.int64()))
    pair_ids = taken["pair_id"].to_pylist()
    reasons, details = [], []
    for pair, index in zip(pair_ids, rejected, strict=True):
        reason, detail = reject_reason(gated[index].dropped)
        reasons.append(reason)
        details.append(f"pair {pair}: {detail}")
    table = rejects_table(taken["query_id"].to_pylist(), STAGE_NAME, reasons, details)
    return _replace(table, "key", pa.array(pair_ids, pa.string()))


def with_score_columns(table: pa.Table, columns: dict[str, list[Any]]) -> pa.Table:
    """`table` (DATASET_SCHEMA) with the score columns appended: SCORED_DATASET_SCHEMA."""
    for field in SCORED_DATASET_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.array(columns.get(field.name, []), field.type))
    return table


def relative_paths(records: pa.Table) -> list[str]:
    """`copy` paths of index rows."""
    formats = records["source_format"].to_pylist()
    return [image_relpath(i, f) for i, f in zip(records["id"].to_pylist(), formats, strict=True)]


def reference_paths(records: pa.Table, part: str) -> dict[int, str]:
    """`reference` paths: the absolute source files; refuses records stored only in the run."""
    ids, paths = records["id"].to_pylist(), records["path"].to_pylist()
    stored = [i for i, p in zip(ids, paths, strict=True) if p is None]
    if stored:
        raise ExportError(
            f"export.images=reference needs a source file for every image, but {len(stored)} "
            f"records referenced by {part} (e.g. {stored[:5]}) exist only in the run's image "
            "store (tar or Parquet input): export with export.images=copy"
        )
    return {i: p if is_url(p) else str(Path(p).absolute()) for i, p in zip(ids, paths, strict=True)}


def materialise_images(run: RunDir, folder: AnyPath, records: pa.Table) -> Counter[str]:
    """Put each record's original bytes at its `copy` path unless present; counts of
    images `copied`, `linked` and already `present`."""
    counts: Counter[str] = Counter()
    rows = records.to_pylist()
    present = present_images(folder, [image_relpath(r["id"], r["source_format"]) for r in rows])
    todo = [r for r in rows if image_relpath(r["id"], r["source_format"]) not in present]
    counts["present"] = len(rows) - len(todo)
    stored = stored_bytes(run, [r["id"] for r in todo if r["path"] is None])
    for record in todo:
        destination = folder / image_relpath(record["id"], record["source_format"])
        try:
            data = load_image_bytes(record["id"], record["path"], stored)
        except OSError as err:
            raise ExportError(f"cannot read the image of record {record['id']}: {err}") from err
        check_digest(record, data)
        counts[place_image(destination, record["path"], data)] += 1
    return counts


def present_images(folder: AnyPath, relpaths: list[str]) -> set[str]:
    """The `relpaths` that exist under `folder` (remote: one listing per image folder)."""
    if local_path(folder) is not None:
        return {r for r in relpaths if (folder / r).exists()}
    found: set[str] = set()
    for subfolder in sorted({r.rpartition("/")[0] for r in relpaths}):
        fs, key = filesystem(folder / subfolder)
        names = fs.find(key, maxdepth=1)
        found |= {f"{subfolder}/{name.rpartition('/')[2]}" for name in names}
    return found & set(relpaths)


def stored_bytes(run: RunDir, ids: list[int]) -> dict[int, bytes]:
    """Bytes of `ids` from the run's image store, reading only those rows of each part."""
    by_part: dict[str, list[int]] = defaultdict(list)
    for record_id in ids:
        by_part[part_name(record_id // PART_STRIDE)].append(record_id)
    found: dict[int, bytes] = {}
    for part, wanted in by_part.items():
        path = run.part_path(IMAGES_DIR, part)
        if not path.exists():
            raise ExportError(f"records {wanted[:5]} have no source path and {path} is missing")
        table = read_table(path, filters=[("id", "in", wanted)])
        found.update(zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True))
    return found


def check_digest(record: dict[str, Any], data: bytes) -> None:
    """Refuse bytes that are not the ones ingested (a source file changed since)."""
    expected = record["sha256"]
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ExportError(
            f"image of record {record['id']} ({record['path'] or 'stored'}) changed since "
            "ingest (sha256 differs): restore the file or re-run the pipeline on this corpus"
        )


def place_image(destination: AnyPath, source: str | None, data: bytes) -> str:
    """Hard-link `source` to `destination`, or write `data` there atomically; returns
    `linked`, `copied` or `present` (another writer was first). Object storage has no
    links: the bytes are uploaded."""
    local = local_path(destination)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    if local is not None and source is not None and not is_url(source):
        try:
            os.link(source, local)
            return "linked"
        except FileExistsError:
            return "present"
        except OSError:
            pass  # another file system, or links not allowed: copy
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return "copied"


def dataset_table(
    rows: pa.Table, paths: dict[int, str], captions: dict[int, str | None]
) -> pa.Table:
    """DATASET_SCHEMA rows from annotated pairs and each record's image path and caption."""
    queries, targets = rows["query_id"].to_pylist(), rows["target_id"].to_pylist()
    negatives = rows["hard_negative_ids"].to_pylist()
    columns: dict[str, Any] = {
        "q_img": [paths[q] for q in queries],
        "q_text": rows["instructions"],
        "t_img": [paths[t] for t in targets],
        "hns": [
            [paths[q]] + [paths[n] for n in ns] for q, ns in zip(queries, negatives, strict=True)
        ],
        **{name: rows[name] for name in PAIR_COLUMNS},
        "q_caption": [captions[q] for q in queries],
        "t_caption": [captions[t] for t in targets],
        "description": rows["description"],
        **{name: rows[name] for name in PROVENANCE_COLUMNS},
    }
    return pa.table(
        {f.name: _as_array(columns[f.name], f.type) for f in DATASET_SCHEMA}, schema=DATASET_SCHEMA
    )


def _as_array(values: Any, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.cast(kind)
    return pa.array(values, kind)


def write_jsonl(path: AnyPath, table: pa.Table) -> None:
    """One JSON object per row, the same columns as the Parquet shard, written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for batch in table.to_batches():
            for row in batch.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# Settings that say where servers are and how to reach them: not shipped with a dataset.
TRANSPORT_SETTINGS = {
    "base_url",
    "api_key_env",
    "extra_body",
    "timeout",
    "device",
    "cooldown",
    "cooldown_max",
}


def shareable_config(config: PipelineConfig, scored: bool = False) -> dict[str, Any]:
    """The config sections that made the dataset (`score` too when it is `scored`), without
    server addresses or key names (nor `export.exclude_flagged` while it is off)."""
    sections = {"seed", "mine", "annotate", "export"} | ({"score"} if scored else set())
    data = config.model_dump(mode="json", include=sections)
    endpoints = [data["annotate"][role] for role in ("describer", "instructor")]
    if scored:
        endpoints.append(data["score"]["judge"]["endpoint"])
    for endpoint in endpoints:
        for name in TRANSPORT_SETTINGS:
            endpoint.pop(name, None)
    if not config.export.exclude_flagged:  # (a dataset made without flags: as before them)
        data["export"].pop("exclude_flagged")
    return data


def write_dataset_info(
    run: RunDir, config: PipelineConfig, counts: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Rewrite dataset_info.json from the finished export parts' `counts` (part -> the
    counts its marker holds, as the runner hands them to `finalize`); returns it."""
    parts = dict(sorted(counts.items()))
    pending = sorted(set(run.done_parts(MINE_STAGE)) - set(parts))
    totals: Counter[str] = Counter()
    for counts in parts.values():
        totals.update({k: v for k, v in counts.items() if isinstance(v, int)})
    suffixes = [".parquet", ".jsonl"] if config.export.jsonl else [".parquet"]
    scored = [part for part, counts in parts.items() if "scores_sha256" in counts]
    schema = SCORED_DATASET_SCHEMA if scored else DATASET_SCHEMA
    hashed = ("channels", "mine", "annotate", "export", *(SCORE_ROW_SETTINGS if scored else ()))
    info = {
        "format": "megapairs",
        "columns": schema.names,
        "released_columns": list(RELEASED_COLUMNS),
        "image_root": ".",
        "images": config.export.images,
        "files": [f"{p}{s}" for p in parts for s in suffixes],
        "complete": not pending,
        "pending_parts": pending,
        "counts": dict(totals),
        "parts": parts,
        "scored_parts": scored,  # parts with score columns (the others: DATASET_SCHEMA)
        "config": shareable_config(config, scored=bool(scored)),
        "config_hash": config.section_hash(*hashed),
        "versions": environment_versions(),
        "updated_at": now_iso(),
    }
    write_json(dataset_folder(run) / INFO_FILE, info)
    return info
