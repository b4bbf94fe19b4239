"""A small synthetic run directory up to the annotate stage, built in code.

Two corpus parts of real small image files in several formats (one record's bytes
stored in the run's `images/` table, its path null), pairs whose targets and hard
negatives cross parts, annotations for most pairs and failures for the rest, each
stage's progress markers written as the runner would. No stage is run: the tables
are written directly, so later stages can be tested on exactly known content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from corpus_fixtures import encode, noise_image

from megapairs.config import PipelineConfig
from megapairs.runs import RunDir, part_name, write_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    CORPUS_DIR,
    CORPUS_SCHEMA,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    PAIRS_DIR,
    PAIRS_SCHEMA,
    PART_STRIDE,
)

INGEST, MINE, ANNOTATE = "ingest", "mine", "annotate"
PROVENANCE = {
    "backend": "template",
    "describer_model": "template-describer",
    "instructor_model": "template-instructor",
    "prompt_version": "default-1a2b3c",
    "seed": 7,
}

# id -> (format, caption, stored in the run rather than as a file)
RECORDS: dict[int, tuple[str, str | None, bool]] = {
    0: ("JPEG", "a red bicycle against a wall", False),
    1: ("PNG", "a blue bicycle in a park", False),
    2: ("JPEG", "a bowl of ramen", True),
    3: ("WEBP", None, False),
    4: ("PNG", "an unused picture", False),  # only in a failed pair: never exported
    PART_STRIDE + 0: ("JPEG", "a city street at night", False),
    PART_STRIDE + 1: ("GIF", "a street in the rain", False),
    PART_STRIDE + 2: ("BMP", "a cat on a sofa", False),
    PART_STRIDE + 3: ("TIFF", "a dog on a sofa", False),
}

# pairs part -> (query, target, channels, scores, hard negatives)
PAIRS: dict[str, list[tuple[int, int, list[str], list[float], list[int]]]] = {
    "part-00000": [
        (0, 1, ["image"], [0.9], [PART_STRIDE, 2]),
        (0, PART_STRIDE + 1, ["image", "caption"], [0.85, 0.82], [1, PART_STRIDE + 2]),
        (2, 3, ["caption"], [0.88], [0, PART_STRIDE + 3]),
        (3, PART_STRIDE, ["dino"], [0.81], []),
    ],
    "part-00001": [
        (PART_STRIDE, PART_STRIDE + 1, ["image", "dino"], [0.9, 0.91], [2, 3, PART_STRIDE + 2]),
        (PART_STRIDE + 2, 0, ["caption"], [0.83], [4]),
        (PART_STRIDE + 3, PART_STRIDE + 2, ["dino", "image"], [0.95, 0.86], [0]),
    ],
}

# pair id -> instructions (annotated) or (step, reason, transient) (failed)
INSTRUCTIONS: dict[str, list[str]] = {
    "0-1": ["find the same bike in blue", "show it parked in a park", "a blue one outdoors"],
    f"0-{PART_STRIDE + 1}": [
        "same colours but a rainy street",
        "swap the bike for a wet road",
        "night turned to rain",
        "a street scene instead",
    ],
    "2-3": ["the same dish from above", "show the bowl closer", "ramen without the chopsticks"],
    f"{PART_STRIDE}-{PART_STRIDE + 1}": [
        "the same street in the rain",
        "make it rain",
        "wet asphalt and umbrellas at night in the same city street",
        "fewer cars",
        "daylight version",
    ],
    f"{PART_STRIDE + 3}-{PART_STRIDE + 2}": [
        "a cat instead of the dog",
        "same sofa with a cat",
        "swap the animal",
    ],
}
FAILURES: dict[str, tuple[str, str, bool]] = {
    f"3-{PART_STRIDE}": ("describe", "timeout", True),
    f"{PART_STRIDE + 2}-0": ("instruct", "unparseable", False),
}


@dataclass
class FixtureRun:
    """A run directory and what was put in it."""

    run: RunDir
    source_dir: Path
    image_bytes: dict[int, bytes]  # original bytes of every record
    stored_ids: set[int]  # records whose bytes live in <run>/images/
    annotated: dict[str, list[str]] = field(default_factory=dict)  # part -> pair ids, pairs order
    failed: dict[str, list[str]] = field(default_factory=dict)  # part -> pair ids

    def source_path(self, record_id: int) -> Path | None:
        return None if record_id in self.stored_ids else self.source_dir / file_name(record_id)

    @property
    def parts(self) -> list[str]:
        return sorted(PAIRS)


def file_name(record_id: int) -> str:
    fmt = RECORDS[record_id][0]
    return f"img{record_id}.{fmt.lower()}"


def fixture_config(**export: Any) -> PipelineConfig:
    """A config whose export section is `export` (e.g. images="reference", jsonl=False)."""
    return PipelineConfig.model_validate({"seed": 7, "export": export})


def build_run(root: Path, *, annotate: bool = True, store: bool = True) -> FixtureRun:
    """Write the fixture run under `root` (run in root/run, image files in root/source);
    with `annotate` False it stops after the pairs; with `store` False every record is a
    file (none stored in the run)."""
    run = RunDir(root / "run")
    source = root / "source"
    source.mkdir(parents=True, exist_ok=True)
    image_bytes = {rid: _image(rid, fmt) for rid, (fmt, _, _) in RECORDS.items()}
    stored = {rid for rid, (_, _, is_stored) in RECORDS.items() if is_stored and store}
    fixture = FixtureRun(run, source, image_bytes, stored)
    for rid in RECORDS:
        if rid not in stored:
            (source / file_name(rid)).write_bytes(image_bytes[rid])
    _write_corpus(fixture)
    _write_pairs(run)
    if annotate:
        for part in fixture.parts:
            _write_annotations(fixture, part)
    return fixture


def _image(record_id: int, fmt: str) -> bytes:
    image = noise_image((16 + record_id % 7, 12), seed=record_id % 97 + record_id // PART_STRIDE)
    return encode(image.convert("P") if fmt == "GIF" else image, fmt)


def _write_corpus(fixture: FixtureRun) -> None:
    for index in (0, 1):
        part = part_name(index)
        ids = [rid for rid in RECORDS if rid // PART_STRIDE == index]
        rows = [_corpus_row(fixture, rid) for rid in ids]
        write_table(
            fixture.run.part_path(CORPUS_DIR, part), pa.Table.from_pylist(rows, CORPUS_SCHEMA)
        )
        images = [
            {"id": r, "image": fixture.image_bytes[r]} for r in ids if r in fixture.stored_ids
        ]
        if images:
            table = pa.Table.from_pylist(images, IMAGES_SCHEMA)
            write_table(fixture.run.part_path(IMAGES_DIR, part), table)
        fixture.run.mark_done(INGEST, part, {"kept": len(rows)})


def _corpus_row(fixture: FixtureRun, rid: int) -> dict[str, Any]:
    fmt, caption, _ = RECORDS[rid]
    path = fixture.source_path(rid)
    data = fixture.image_bytes[rid]
    return {
        "id": rid,
        "key": file_name(rid),
        "uri": str(path) if path else f"shard.tar#{file_name(rid)}",
        "path": str(path) if path else None,
        "sha256": hashlib.sha256(data).hexdigest(),
        "pixel_sha256": hashlib.sha256(b"pixels" + data).hexdigest(),
        "width": 16 + rid % 7,
        "height": 12,
        "source_format": fmt,
        "source_mode": "P" if fmt == "GIF" else "RGB",
        "caption": caption,
        "has_caption": caption is not None,
    }


def pair_id(query: int, target: int) -> str:
    return f"{query}-{target}"


def _write_pairs(run: RunDir) -> None:
    for part, pairs in PAIRS.items():
        rows = [
            {
                "pair_id": pair_id(q, t),
                "query_id": q,
                "target_id": t,
                "rank": rank,
                "channels": channels,
                "channel_scores": scores,
                "hard_negative_ids": negatives,
                "hard_negative_topped_up": 0,
            }
            for rank, (q, t, channels, scores, negatives) in enumerate(pairs)
        ]
        write_table(run.part_path(PAIRS_DIR, part), pa.Table.from_pylist(rows, PAIRS_SCHEMA))
        run.mark_done(MINE, part, {"pairs": len(rows)})


def _write_annotations(fixture: FixtureRun, part: str) -> None:
    """Annotations (in reverse pairs order, as a concurrent annotator may finish them) and
    failures of one part, then its annotate marker."""
    done, failed = [], []
    for q, t, *_ in PAIRS[part]:
        key = pair_id(q, t)
        if key in INSTRUCTIONS:
            done.append(_annotation(key, q, t))
        else:
            failed.append(_failure(key, q, t))
    fixture.annotated[part] = [row["pair_id"] for row in done]
    fixture.failed[part] = [row["pair_id"] for row in failed]
    run = fixture.run
    table = pa.Table.from_pylist(done[::-1], ANNOTATIONS_SCHEMA)
    write_table(run.part_path(ANNOTATIONS_DIR, part), table)
    table = pa.Table.from_pylist(failed, ANNOTATION_FAILURES_SCHEMA)
    write_table(run.part_path(ANNOTATION_FAILURES_DIR, part), table)
    run.mark_done(ANNOTATE, part, {"pairs": len(done) + len(failed), "annotated": len(done)})


def _annotation(key: str, query: int, target: int) -> dict[str, Any]:
    return {
        "pair_id": key,
        "query_id": query,
        "target_id": target,
        "description": f"both show scene {query}; the target differs as {target}",
        "instructions": INSTRUCTIONS[key],
        "dropped_instructions": [],
        "word_num": 60,
        "demonstration_ids": ["d01", "d02"],
        "repaired": False,
        **PROVENANCE,
    }


def _failure(key: str, query: int, target: int) -> dict[str, Any]:
    step, reason, transient = FAILURES[key]
    return {
        "pair_id": key,
        "query_id": query,
        "target_id": target,
        "step": step,
        "reason": reason,
        "detail": f"{reason} at {step}",
        "raw_output": None,
        "attempts": 3,
        "transient": transient,
        **PROVENANCE,
    }
