"""Training triplets: rows of MegaPairs-schema files -> loaded samples, in a resumable order.

Rows come from Parquet or JSONL files with the released columns `q_img`, `q_text`, `t_img`,
`hns` (our export's extra columns are ignored); `hns` may be absent or null when the negative
strategy does not read it (`none`, `query_image`). A file without a column the run needs is
refused when it is read. Relative image paths are resolved against `image_root`, by
default each dataset's folder (or the `image_root` its dataset_info.json names), as
`megapairs.dataset.validate` does; absolute paths are kept.

Order: process `rank` of `world_size` reads an endless stream of rows, epoch after epoch:
epoch e is `permutation(e)[rank::world_size]`, the permutation of all rows drawn from
`numpy.random.default_rng([seed, e])`. Batch k of a process holds stream positions
[k * B, (k + 1) * B) (a batch may run across an epoch's end), so the data position a
checkpoint stores is one number, the index of the next batch, and a restored run reads
exactly the batches an uninterrupted one would. Batches loaded ahead by DataLoader
workers do not move it; only batches handed to the trainer do. B may not exceed a
process's share of an epoch (else a batch would repeat rows, a positive becoming its own
in-batch negative).

Per row and epoch, `random.Random(f"{seed}:{epoch}:{row}")` draws the instruction (one of
`q_text`) and then the negatives (`select_negatives`), so a row's sample depends only on
(seed, epoch, row), never on workers or timing.

A row whose images cannot be loaded (missing file, corrupt, truncated, not an image, ...), or
that lacks an instruction or the negatives its strategy needs, or whose instructions hold a
token the model reserves (MMRet-MLLM's image token), is skipped, never a crash:
it is counted by reason, logged (the first few per reason), and replaced by a row drawn
from a generator seeded with (seed, rank, batch index), so every batch has exactly B
queries (DDP ranks and gradient caching need equal batches) and stays a pure function of
its index. Skip counts are part of the checkpointed state.

Workers build whole batches (load, then the adapter's `collate`: image processor and
tokenizer over the batch), so one step costs one hand-over between processes, not one
per row.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from megapairs.corpus.images import ImageRejected
from megapairs.dataset.validate import dataset_files, default_image_root
from megapairs.models.inputs import load_image
from megapairs.training.negatives import (
    NegativeStrategy,
    select_negatives,
    uses_hard_negatives,
)

logger = logging.getLogger(__name__)

TRIPLET_SCHEMA = pa.schema(
    [
        ("q_img", pa.string()),
        ("q_text", pa.list_(pa.string())),
        ("t_img", pa.string()),
        ("hns", pa.list_(pa.string())),
    ]
)
LARGE_TRIPLET_SCHEMA = pa.schema(
    [
        ("q_img", pa.large_string()),
        ("q_text", pa.large_list(pa.large_string())),
        ("t_img", pa.large_string()),
        ("hns", pa.large_list(pa.large_string())),
    ]
)
ALL_COLUMNS = tuple(TRIPLET_SCHEMA.names)
LOGGED_SKIPS_PER_REASON = 10
MAX_REPLACEMENTS = 1000  # unusable replacement rows tried per batch before giving up
GLOB_CHARACTERS = frozenset("*?[")


# rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Triplet:
    """One training row with resolved image paths."""

    q_img: str
    q_text: list[str]
    t_img: str
    hns: list[str]


@dataclass(frozen=True)
class Source:
    """A data file and the folder its relative image paths start from."""

    file: Path
    image_root: Path


def find_sources(paths: Sequence[str], image_root: str | None = None) -> list[Source]:
    """The data files named by `paths` (files, dataset folders or glob patterns), in order.

    Raises FileNotFoundError for a path or pattern that names no data file."""
    sources: list[Source] = []
    for entry in paths:
        files = _expand(entry)
        if not files:
            raise FileNotFoundError(f"training data {entry!r}: no Parquet or JSONL file found")
        base = Path(entry) if Path(entry).is_dir() else None
        for file in files:
            root = Path(image_root) if image_root else default_image_root(base or file)
            sources.append(Source(file, root))
    return sources


def _expand(entry: str) -> list[Path]:
    if GLOB_CHARACTERS & set(entry):
        return [Path(name) for name in sorted(glob.glob(entry, recursive=True))]
    path = Path(entry)
    return dataset_files(path)[0] if path.exists() else []


def required_columns(strategy: NegativeStrategy | str) -> tuple[str, ...]:
    """The columns a run with negative `strategy` reads: `hns` only for mined negatives."""
    if uses_hard_negatives(strategy):
        return ALL_COLUMNS
    return tuple(name for name in ALL_COLUMNS if name != "hns")


def read_triplets(file: Path, required: Sequence[str] = ALL_COLUMNS) -> pa.Table:
    """The four released columns of a Parquet or JSONL file (other columns are ignored); a
    column not `required` may be absent (it reads as nulls). ValueError naming the file
    and the column when a required one is absent (in JSONL: from every row)."""
    try:
        table, absent = _read_json(file) if file.suffix == ".jsonl" else _read_parquet(file)
    except pa.ArrowException as err:
        raise ValueError(f"cannot read training triplets from {file}: {err}") from err
    missing = [name for name in required if name in absent]
    if missing:
        raise ValueError(
            f"training data {file} has no {', '.join(map(repr, missing))} column "
            f"(this run needs {', '.join(required)})"
        )
    return table.cast(TRIPLET_SCHEMA)


def _read_json(file: Path) -> tuple[pa.Table, set[str]]:
    """A JSONL file's four columns, and those that no row has (they read as nulls)."""
    options = pa_json.ParseOptions(
        explicit_schema=TRIPLET_SCHEMA, unexpected_field_behavior="ignore"
    )
    table = pa_json.read_json(file, parse_options=options).select(TRIPLET_SCHEMA.names)
    empty = {name for name in TRIPLET_SCHEMA.names if table.column(name).null_count == len(table)}
    return table, empty if len(table) else set()


def _read_parquet(file: Path) -> tuple[pa.Table, set[str]]:
    """A Parquet file's four columns (an absent one as nulls), and the absent ones."""
    present = set(pq.read_schema(file).names)
    absent = {name for name in TRIPLET_SCHEMA.names if name not in present}
    table = pq.read_table(file, columns=[n for n in TRIPLET_SCHEMA.names if n in present])
    for name in sorted(absent):
        nulls = pa.nulls(table.num_rows, TRIPLET_SCHEMA.field(name).type)
        table = table.append_column(TRIPLET_SCHEMA.field(name), nulls)
    return table.select(TRIPLET_SCHEMA.names), absent


class TripletTable:
    """Every row of the training files in one Arrow table, with each row's image root.

    Arrow keeps the strings compact (no Python object per row, so forked DataLoader workers
    share the buffers instead of copying them on reference-count writes), and rows are
    materialised only when asked for. Every file must have the `required` columns
    (`required_columns(strategy)`; all four by default)."""

    def __init__(self, sources: Sequence[Source], required: Sequence[str] = ALL_COLUMNS) -> None:
        tables = [read_triplets(source.file, required) for source in sources]
        counts = [table.num_rows for table in tables]
        self.roots = [os.fspath(source.image_root) for source in sources]
        self._columns = _single_chunk_columns(tables)
        self._source_of_row = np.repeat(np.arange(len(counts), dtype=np.int32), counts)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str],
        image_root: str | None = None,
        required: Sequence[str] = ALL_COLUMNS,
    ) -> TripletTable:
        return cls(find_sources(paths, image_root), required)

    def __len__(self) -> int:
        return len(self._source_of_row)

    def __getitem__(self, row: int) -> Triplet:
        """Row `row` with absolute image paths (null `hns`: none); ValueError when another
        value is null."""
        values = {name: column[row].as_py() for name, column in self._columns.items()}
        missing = [name for name, value in values.items() if value is None and name != "hns"]
        if missing:
            raise ValueError(f"null {', '.join(missing)}")
        root = self.roots[self._source_of_row[row]]

        def resolved(path: str) -> str:
            return os.path.normpath(os.path.join(root, path))

        return Triplet(
            q_img=resolved(values["q_img"]),
            q_text=list(values["q_text"]),
            t_img=resolved(values["t_img"]),
            hns=[resolved(path) for path in values["hns"] or [] if path is not None],
        )


def _single_chunk_columns(tables: list[pa.Table]) -> dict[str, pa.Array]:
    """Each column as one array (64-bit offsets, so more than 2 GiB of paths fit)."""
    if not tables or not sum(table.num_rows for table in tables):
        return {}
    combined = pa.concat_tables(tables).cast(LARGE_TRIPLET_SCHEMA).combine_chunks()
    return {name: combined.column(name).chunk(0) for name in TRIPLET_SCHEMA.names}


# order --------------------------------------------------------------------------------------


class RowStream:
    """The endless, seeded order in which process `rank` of `world_size` reads rows.

    Position p of the stream is index `p % share_size` of the process's share of epoch
    `p // share_size`; the share of epoch e is `permutation(e)[rank::world_size]`."""

    def __init__(self, num_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_rows < world_size:
            raise ValueError(f"{num_rows} training rows cannot feed {world_size} processes")
        self.num_rows = num_rows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.share_size = len(range(rank, num_rows, world_size))
        self._shares: dict[int, np.ndarray] = {}

    def share(self, epoch: int) -> np.ndarray:
        """The rows of this process in epoch `epoch`, in reading order."""
        if epoch not in self._shares:
            if len(self._shares) >= 2:  # a batch spans at most two epochs
                self._shares.pop(min(self._shares))
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._shares[epoch] = permutation[self.rank :: self.world_size]
        return self._shares[epoch]

    def rows(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, row) at stream positions start, ..., start + count - 1."""
        found = []
        for position in range(start, start + count):
            epoch, cursor = divmod(position, self.share_size)
            found.append((epoch, int(self.share(epoch)[cursor])))
        return found

    def epoch_of(self, position: int) -> int:
        return position // self.share_size


class BatchSampler(Sampler[int]):
    """Batch indices `start`, `start + 1`, ... (endless)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


# samples ------------------------------------------------------------------------------------


@dataclass
class TrainSample:
    """A query (image + one instruction) and its candidates: the positive, then negatives."""

    row: int
    query_image: Image.Image
    instruction: str
    candidates: list[Image.Image]


@dataclass(frozen=True)
class Skipped:
    """A row left out of training, and why."""

    row: int
    reason: str
    detail: str


class RowUnusable(Exception):
    """A row that cannot be trained on: `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedBatch:
    """Batch `index` as `collate` made it, and the rows replaced in it."""

    index: int
    batch: Any
    skipped: list[Skipped]

    def pin_memory(self) -> LoadedBatch:
        """Called by a DataLoader with `pin_memory`: pins the batch when it can be pinned."""
        pin = getattr(self.batch, "pin_memory", None)
        return LoadedBatch(self.index, pin() if pin else self.batch, self.skipped)


class TripletBatches(Dataset[LoadedBatch]):
    """Batch k of a process: its rows at stream positions [k * B, (k + 1) * B), loaded and
    collated (in a DataLoader worker). A row that cannot be used is replaced by a row drawn
    from `numpy.random.default_rng([seed, rank, k])` (until one loads), so batch k is a pure
    function of (seed, rank, k) and always holds exactly B samples."""

    def __init__(
        self,
        rows: TripletTable,
        stream: RowStream,
        batch_size: int,
        strategy: NegativeStrategy | str,
        num_negatives: int,
        collate: Callable[[list[TrainSample]], Any] | None = None,
        reserved_tokens: Sequence[str] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size > stream.share_size:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {stream.share_size} training rows each "
                f"of {stream.world_size} process(es) reads per epoch: a batch would repeat rows "
                "(a positive becoming its own in-batch negative); lower batch_size or add data"
            )
        self.rows = rows
        self.stream = stream
        self.batch_size = batch_size
        self.strategy = NegativeStrategy(strategy)
        self.num_negatives = num_negatives
        self.collate = collate
        self.reserved_tokens = tuple(token for token in reserved_tokens if token)

    def __getitem__(self, index: int) -> LoadedBatch:
        samples: list[TrainSample] = []
        skipped: list[Skipped] = []
        replacements = self._replacements(index)
        for epoch, row in self.stream.rows(index * self.batch_size, self.batch_size):
            sample = self._sample_or_skip(row, epoch, skipped)
            while sample is None:
                sample = self._sample_or_skip(next(replacements), epoch, skipped)
            samples.append(sample)
        batch = samples if self.collate is None else self.collate(samples)
        return LoadedBatch(index, batch, skipped)

    def sample(self, row: int, epoch: int) -> TrainSample:
        """The loaded sample of `row` in `epoch`; RowUnusable when it cannot be trained on."""
        try:
            triplet = self.rows[row]
        except ValueError as err:
            raise RowUnusable("null_value", str(err)) from err
        rng = random.Random(f"{self.stream.seed}:{epoch}:{row}")
        instructions = [text for text in triplet.q_text if text and text.strip()]
        if not instructions:
            raise RowUnusable("no_instruction", f"q_text of {triplet.q_img!r} is empty")
        self._check_reserved_tokens(instructions)
        instruction = rng.choice(instructions)
        try:
            negatives = select_negatives(
                triplet.hns, self.strategy, self.num_negatives, rng, query_image=triplet.q_img
            )
        except ValueError as err:
            raise RowUnusable("too_few_negatives", str(err)) from err
        images = _load_images([triplet.q_img, triplet.t_img, *negatives])
        return TrainSample(row, images[0], instruction, images[1:])

    def _check_reserved_tokens(self, instructions: list[str]) -> None:
        """RowUnusable when an instruction holds a token the model reserves."""
        for text in instructions:
            held = [token for token in self.reserved_tokens if token in text]
            if held:
                raise RowUnusable("reserved_token", f"instruction {text!r} holds {held[0]!r}")

    def _sample_or_skip(self, row: int, epoch: int, skipped: list[Skipped]) -> TrainSample | None:
        try:
            return self.sample(row, epoch)
        except RowUnusable as err:
            skipped.append(Skipped(row, err.reason, err.detail))
            return None

    def _replacements(self, index: int) -> Iterator[int]:
        rng = np.random.default_rng([self.stream.seed, self.stream.rank, index])
        for _ in range(MAX_REPLACEMENTS):
            yield int(rng.integers(len(self.rows)))
        raise RuntimeError(
            f"batch {index}: {MAX_REPLACEMENTS} replacement rows were unusable too; "
            "is the image root right? (data.image_root)"
        )


def _load_images(paths: list[str]) -> list[Image.Image]:
    """Each path's image (a path used twice is decoded once); RowUnusable on a failure."""
    loaded: dict[str, Image.Image] = {}
    for path in paths:
        if path not in loaded:
            try:
                loaded[path] = load_image(path)
            except OSError as err:
                raise RowUnusable(image_failure_reason(err), str(err)) from err
    return [loaded[path] for path in paths]


def image_failure_reason(err: OSError) -> str:
    """The reject code of an image that did not load (the ingest stage's vocabulary)."""
    cause = err.__cause__
    if isinstance(cause, FileNotFoundError):
        return "missing_file"
    if isinstance(cause, ImageRejected):
        return cause.reason
    return "unreadable"


# batches ------------------------------------------------------------------------------------


@dataclass
class SkipCounter:
    """Skipped rows by reason; logs the first few of each reason."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, skipped: Skipped) -> None:
        self.counts[skipped.reason] += 1
        seen = self.counts[skipped.reason]
        if seen <= LOGGED_SKIPS_PER_REASON:
            more = " (further ones are only counted)" if seen == LOGGED_SKIPS_PER_REASON else ""
            reason, detail = skipped.reason, skipped.detail
            logger.warning("skipped row %d: %s: %s%s", skipped.row, reason, detail, more)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class BatchStream:
    """The batches of one process in order, loaded ahead by `num_workers` DataLoader workers
    (0: in this process), with a resumable position: `next_index`, the batch to hand out
    next (batches loaded ahead but not handed out do not count). `pin_memory` (for a GPU)
    hands out batches in page-locked memory, which copies to the device asynchronously."""

    def __init__(
        self,
        batches: TripletBatches,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.batches = batches
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.next_index = 0
        self.skipped = SkipCounter()
        self._loaded: Iterator[LoadedBatch] | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first row."""
        return self.batches.stream.epoch_of(self.next_index * self.batches.batch_size)

    def next_batch(self) -> Any:
        """The next batch (what `collate` makes of exactly `batch_size` usable samples)."""
        loaded = next(self._iterator())
        if loaded.index != self.next_index:
            raise RuntimeError(f"expected batch {self.next_index}, the loader gave {loaded.index}")
        self.next_index += 1
        for skipped in loaded.skipped:
            self.skipped.add(skipped)
        return loaded.batch

    def state_dict(self) -> dict[str, Any]:
        stream = self.batches.stream
        return {
            "next_batch": self.next_index,
            "epoch": self.epoch,
            "batch_size": self.batches.batch_size,
            "skipped": self.skipped.as_dict(),
            "rank": stream.rank,
            "world_size": stream.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream = self.batches.stream
        if (state["rank"], state["world_size"]) != (stream.rank, stream.world_size):
            raise ValueError(
                f"data state of rank {state['rank']} of {state['world_size']} cannot resume "
                f"rank {stream.rank} of {stream.world_size}"
            )
        if state["batch_size"] != self.batches.batch_size:
            raise ValueError(
                f"data state of batch size {state['batch_size']} cannot resume batches "
                f"of {self.batches.batch_size}"
            )
        self.close()
        self.next_index = int(state["next_batch"])
        self.skipped = SkipCounter(Counter(state["skipped"]))

    def close(self) -> None:
        """Stop the workers; the next batch starts a new loader at `next_index`."""
        self._loaded = None

    def _iterator(self) -> Iterator[LoadedBatch]:
        if self._loaded is None:
            loader = DataLoader(
                self.batches,
                sampler=BatchSampler(self.next_index),
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch if self.num_workers else None,
                pin_memory=self.pin_memory,
                generator=torch.Generator(),  # never draws from (and shifts) the global RNG
            )
            self._loaded = iter(loader)
        return self._loaded


def _as_is(loaded: Any) -> Any:
    """The DataLoader's collate_fn: a LoadedBatch is already a batch."""
    return loaded
