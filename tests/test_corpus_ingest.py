"""The ingest stage end to end through LocalRunner: outputs, rejects, duplicates, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_fixtures import (
    corrupt_png,
    encode,
    exif_rotated_jpeg,
    img2dataset_sample,
    jpeg_bytes,
    make_config,
    noise_image,
    png_bytes,
    run_ingest,
    truncated,
    write_files,
    write_hf_parquet,
    write_manifest,
    write_tar,
)

from megapairs.corpus.images import ImageLimits
from megapairs.corpus.ingest import (
    PLAN_FILE,
    DecodeStage,
    IngestStage,
    RejectedRecord,
    ValidRecord,
    clean_caption,
    decode_part,
    find_duplicates,
    ingest_stages,
    split_part,
    validate_record,
)
from megapairs.corpus.readers import SourceRecord
from megapairs.corpus.store import read_corpus, read_part_images, read_rejects
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir
from megapairs.schemas import (
    CORPUS_SCHEMA,
    DECODED_SCHEMA,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    record_id,
)

LIMITS = ImageLimits(min_side=16, max_pixels=100_000, max_bytes=1_000_000)


def rows_by_key(table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


def reasons(run: RunDir) -> dict[str, str]:
    return {row["key"]: row["reason"] for row in read_rejects(run).to_pylist()}


def output_files(run_root: Path) -> dict[str, bytes]:
    """Every Parquet file the stage wrote, by path relative to the run."""
    return {
        p.relative_to(run_root).as_posix(): p.read_bytes()
        for p in sorted(run_root.glob("*/part-*.parquet"))
    }


# a folder holding every kind of bad input ------------------------------------------


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    return write_files(
        tmp_path / "corpus",
        {
            "00_good.jpg": jpeg_bytes(1),
            "00_good.txt": "  a red bus  \n",
            "01_blank_caption.png": png_bytes(2),
            "01_blank_caption.txt": " \t\n",
            "02_no_caption.png": png_bytes(3),
            "03_copy_of_02.bmp": encode(noise_image(seed=3), "BMP"),
            "04_corrupt.png": corrupt_png(4),
            "05_truncated.jpg": truncated(jpeg_bytes(5)),
            "06_truncated.png": truncated(png_bytes(6)),
            "07_empty.jpg": b"",
            "08_text.jpg": "I am text pretending to be a JPEG",
            "09_tiny.png": png_bytes(9, size=(40, 8)),
            "10_bomb.png": png_bytes(10, size=(400, 300)),
            "11_rotated.jpg": exif_rotated_jpeg((80, 40)),
            "12_readme.md": "# not an image",
            "13_random.jpg": bytes(range(256)) * 3,
        },
    )


@pytest.fixture
def messy_run(tmp_path, messy_folder):
    config = make_config(messy_folder, ingest={"min_side": 16, "max_pixels": 100_000})
    result = run_ingest(tmp_path / "run", config)
    return result, RunDir(tmp_path / "run")


def test_counts_add_up_exactly(messy_run):
    result, run = messy_run
    assert result.counts == {
        "records": 14,
        "kept": 4,
        "rejected": 10,
        "duplicates": 1,
        "no_caption": 3,
    }
    assert result.parts == 1
    assert read_corpus(run).num_rows + read_rejects(run).num_rows == 14


def test_every_bad_record_lands_in_rejects_with_its_reason(messy_run):
    _, run = messy_run
    assert reasons(run) == {
        "03_copy_of_02.bmp": "duplicate",
        "04_corrupt.png": "corrupt",
        "05_truncated.jpg": "truncated",
        "06_truncated.png": "truncated",
        "07_empty.jpg": "empty",
        "08_text.jpg": "not_an_image",
        "09_tiny.png": "too_small",
        "10_bomb.png": "decompression_bomb",
        "12_readme.md": "not_an_image",
        "13_random.jpg": "not_an_image",
    }
    rejects = read_rejects(run)
    assert rejects.schema.equals(REJECTS_SCHEMA)
    assert set(rejects.column("stage").to_pylist()) == {"ingest"}
    assert all(detail for detail in rejects.column("detail").to_pylist())


def test_kept_rows_carry_ids_metadata_and_clean_captions(messy_run, messy_folder):
    _, run = messy_run
    corpus = read_corpus(run)
    assert corpus.schema.equals(CORPUS_SCHEMA)
    rows = rows_by_key(corpus)
    assert list(rows) == [
        "00_good.jpg",
        "01_blank_caption.png",
        "02_no_caption.png",
        "11_rotated.jpg",
    ]
    assert [r["id"] for r in rows.values()] == [record_id(0, p) for p in (0, 1, 2, 11)]
    good = rows["00_good.jpg"]
    assert (good["caption"], good["has_caption"]) == ("a red bus", True)
    assert good["path"] == str(messy_folder / "00_good.jpg")
    assert (good["width"], good["height"], good["source_format"]) == (64, 48, "JPEG")
    blank = rows["01_blank_caption.png"]
    assert (blank["caption"], blank["has_caption"]) == (None, False)
    rotated = rows["11_rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (40, 80)
    assert not (run.root / "images").exists(), "local files are reopened, not stored, by default"


def test_duplicate_points_to_the_kept_id(messy_run):
    _, run = messy_run
    corpus = rows_by_key(read_corpus(run))
    [duplicate] = [r for r in read_rejects(run).to_pylist() if r["reason"] == "duplicate"]
    assert duplicate["duplicate_of"] == corpus["02_no_caption.png"]["id"]
    assert duplicate["id"] == record_id(0, 3)


# duplicates across parts, dedupe off -------------------------------------------------


def folder_with_repeats(root: Path) -> Path:
    """Six files, two per part with shard_size=2: seed 1 repeats in parts 0, 1 and 2."""
    return write_files(
        root,
        {
            "a.png": png_bytes(1),
            "b.png": png_bytes(2),
            "c.png": png_bytes(1),
            "d.png": png_bytes(3),
            "e.png": png_bytes(3),
            "f.png": png_bytes(1),
        },
    )


def test_duplicates_across_parts_point_to_the_first_occurrence(tmp_path):
    config = make_config(folder_with_repeats(tmp_path / "in"), shard_size=2)
    result = run_ingest(tmp_path / "run", config)
    run = RunDir(tmp_path / "run")
    assert result.parts == 3
    assert result.counts == {
        "records": 6,
        "kept": 3,
        "rejected": 3,
        "duplicates": 3,
        "no_caption": 3,
    }
    duplicates = {r["key"]: r["duplicate_of"] for r in read_rejects(run).to_pylist()}
    assert duplicates == {
        "c.png": record_id(0, 0),
        "e.png": record_id(1, 1),
        "f.png": record_id(0, 0),
    }
    assert read_corpus(run, "part-00001").column("key").to_pylist() == ["d.png"]


def test_dedupe_off_keeps_every_copy(tmp_path):
    config = make_config(folder_with_repeats(tmp_path / "in"), ingest={"dedupe": False})
    result = run_ingest(tmp_path / "run", config)
    assert result.counts["kept"] == 6 and result.counts["duplicates"] == 0


# other inputs through the stage -------------------------------------------------------


def test_manifest_missing_file_is_rejected(tmp_path):
    write_files(tmp_path / "in", {"x.jpg": jpeg_bytes(1)})
    rows = [{"path": "x.jpg", "alt": "kept"}, {"path": "missing.jpg", "alt": "lost"}]
    manifest = write_manifest(tmp_path / "in" / "list.csv", rows)
    config = make_config(manifest, image_column="path", caption_column="alt")
    result = run_ingest(tmp_path / "run", config)
    run = RunDir(tmp_path / "run")
    assert result.counts == {
        "records": 2,
        "kept": 1,
        "rejected": 1,
        "duplicates": 0,
        "no_caption": 0,
    }
    [reject] = read_rejects(run).to_pylist()
    assert (reject["key"], reject["reason"], reject["id"]) == ("missing.jpg", "missing_file", 1)
    assert read_corpus(run).column("caption").to_pylist() == ["kept"]


def test_webdataset_bytes_are_stored_and_keyless_images_rejected(tmp_path):
    members = [
        *img2dataset_sample("000000000", jpeg_bytes(1), "one"),
        ("000000001.txt", "a caption alone"),
        *img2dataset_sample("000000002", jpeg_bytes(2), "   "),
    ]
    write_tar(tmp_path / "shards" / "00000.tar", members)
    result = run_ingest(tmp_path / "run", make_config(tmp_path / "shards"))
    run = RunDir(tmp_path / "run")
    assert result.counts == {
        "records": 3,
        "kept": 2,
        "rejected": 1,
        "duplicates": 0,
        "no_caption": 1,
    }
    assert reasons(run) == {"000000001": "no_image"}
    corpus = read_corpus(run)
    assert corpus.column("path").to_pylist() == [None, None]
    assert corpus.column("has_caption").to_pylist() == [True, False]
    stored = read_part_images(run, "part-00000")
    assert stored == {0: jpeg_bytes(1), 2: jpeg_bytes(2)}
    assert pq.read_schema(run.part_path("images", "part-00000")).equals(IMAGES_SCHEMA)


def test_hf_parquet_through_the_stage(tmp_path):
    images = [jpeg_bytes(1), b"broken", jpeg_bytes(1), png_bytes(2)]
    path = write_hf_parquet(tmp_path / "train.parquet", images, ["a", "b", "c", None], struct=False)
    config = make_config(path, caption_column="text", shard_size=2)
    result = run_ingest(tmp_path / "run", config)
    run = RunDir(tmp_path / "run")
    assert result.counts == {
        "records": 4,
        "kept": 2,
        "rejected": 2,
        "duplicates": 1,
        "no_caption": 1,
    }
    assert {r["id"]: r["reason"] for r in read_rejects(run).to_pylist()} == {
        1: "not_an_image",
        record_id(1, 0): "duplicate",
    }
    assert read_part_images(run, "part-00001") == {record_id(1, 1): png_bytes(2)}


@pytest.mark.parametrize(("policy", "stored"), [("always", True), ("never", False)])
def test_store_images_policy(tmp_path, policy, stored):
    folder = write_files(tmp_path / "in", {"a.jpg": jpeg_bytes(1)})
    run_ingest(tmp_path / "run", make_config(folder, ingest={"store_images": policy}))
    run = RunDir(tmp_path / "run")
    assert read_part_images(run, "part-00000") == ({0: jpeg_bytes(1)} if stored else {})
    assert read_corpus(run).column("path").to_pylist() == [
        None if stored else str(folder / "a.jpg")
    ]


# resume ------------------------------------------------------------------------------------


def test_rerun_skips_finished_parts_and_a_redone_part_is_identical(tmp_path):
    folder = folder_with_repeats(tmp_path / "in")
    write_files(folder, {"b.txt": "caption b", "zz_bad.jpg": b"junk"})
    config = make_config(folder, shard_size=2, ingest={"store_images": "always"})
    first = run_ingest(tmp_path / "run", config)
    before = output_files(tmp_path / "run")
    # decoded, corpus and rejects for 4 parts (a,b | c,d | e,f | zz_bad); images for the 2
    # that keep any
    assert len(before) == 14

    again = run_ingest(tmp_path / "run", config)
    assert (again.parts, again.computed) == (4, 0)
    assert again.counts == first.counts

    for stage in ("ingest", "ingest.decode"):
        (tmp_path / "run" / "_progress" / stage / "part-00001.json").unlink()
    for folder in ("decoded", "corpus", "images"):
        (tmp_path / "run" / folder / "part-00001.parquet").unlink()
    redone = run_ingest(tmp_path / "run", config)
    assert redone.computed == 1
    assert redone.counts == first.counts
    assert output_files(tmp_path / "run") == before


def test_resume_uses_the_stored_plan_even_if_files_were_added(tmp_path):
    folder = write_files(tmp_path / "in", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    config = make_config(folder, shard_size=1)
    run_ingest(tmp_path / "run", config)
    plan = json.loads((tmp_path / "run" / "corpus" / PLAN_FILE).read_text())
    assert [p["members"] for p in plan["parts"]] == [["a.jpg"], ["b.jpg"]]

    write_files(folder, {"0_new.jpg": jpeg_bytes(3)})
    (tmp_path / "run" / "_progress" / "ingest" / "part-00000.json").unlink()
    result = run_ingest(tmp_path / "run", config)
    assert (result.parts, result.computed) == (2, 1)
    assert read_corpus(RunDir(tmp_path / "run")).column("key").to_pylist() == ["a.jpg", "b.jpg"]


def test_resume_refuses_a_manifest_that_changed_since_planning(tmp_path):
    write_files(tmp_path / "in", {"x.jpg": jpeg_bytes(1), "y.jpg": jpeg_bytes(2)})
    rows = [{"path": "x.jpg", "alt": "one"}, {"path": "y.jpg", "alt": "two"}]
    manifest = write_manifest(tmp_path / "in" / "list.csv", rows)
    config = make_config(manifest, image_column="path", caption_column="alt", shard_size=1)
    run_ingest(tmp_path / "run", config)
    write_manifest(manifest, [rows[1], rows[0], {"path": "x.jpg", "alt": "three"}])
    (tmp_path / "run" / "_progress" / "ingest" / "part-00001.json").unlink()
    with pytest.raises(RuntimeError, match=r"input changed since this run planned it: .*list\.csv"):
        run_ingest(tmp_path / "run", config)


def test_a_changed_input_config_is_replanned_in_a_fresh_run(tmp_path):
    folder = write_files(tmp_path / "in", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    run = RunDir(tmp_path / "run")
    stage = DecodeStage(make_config(folder, shard_size=1))
    assert stage.plan(run) == ["part-00000", "part-00001"]
    assert IngestStage(make_config(folder, shard_size=1)).plan(run) == stage.plan(run)
    assert DecodeStage(make_config(folder, shard_size=5)).plan(run) == ["part-00000"]
    with pytest.raises(RuntimeError, match="holds no plan for this input config"):
        IngestStage(make_config(folder, shard_size=1)).plan(run)  # planned for another


# the pure and the ordered steps on their own --------------------------------------------


def test_clean_caption():
    assert clean_caption("  two words \n") == "two words"
    assert clean_caption(" \t ") is None
    assert clean_caption(None) is None


def test_validate_record_passes_reader_errors_through_and_reads_files(tmp_path):
    known = SourceRecord("k", "u", error=("no_image", "nothing there"))
    assert validate_record(known, LIMITS) == RejectedRecord("k", "u", "no_image", "nothing there")
    missing = validate_record(SourceRecord("m", "u", path=str(tmp_path / "gone.jpg")), LIMITS)
    assert isinstance(missing, RejectedRecord) and missing.reason == "missing_file"
    big = write_files(tmp_path, {"big.png": png_bytes(1)}) / "big.png"
    small_limit = ImageLimits(16, 100_000, max_bytes=100)
    too_big = validate_record(SourceRecord("b", "u", path=str(big)), small_limit)
    assert isinstance(too_big, RejectedRecord) and too_big.reason == "too_large_file"
    valid = validate_record(SourceRecord("v", "u", data=jpeg_bytes(1), caption=" c "), LIMITS)
    assert isinstance(valid, ValidRecord) and valid.caption == "c" and valid.data == jpeg_bytes(1)


def test_duplicates_keep_the_lowest_id_whatever_the_part_order():
    """The reduce over all parts' digests does not depend on which part was decoded first."""
    valid = validate_record(SourceRecord("v", "u", data=png_bytes(1)), LIMITS)
    other = validate_record(SourceRecord("w", "u", data=png_bytes(2)), LIMITS)
    bad = RejectedRecord("x", "u", "corrupt", "broken")
    parts = {
        5: decode_part([valid], index=5, store_images="auto"),
        2: decode_part([other, valid, valid, bad], index=2, store_images="auto"),
    }
    tables = [pa.Table.from_pylist(parts[i].rows, DECODED_SCHEMA) for i in (5, 2)]
    forward, backward = (
        find_duplicates(pa.concat_tables(tables)),
        find_duplicates(pa.concat_tables(tables[::-1])),
    )
    assert forward.equals(backward)
    keeper = record_id(2, 1)
    assert forward.to_pylist() == [
        {"id": record_id(2, 2), "duplicate_of": keeper},
        {"id": record_id(5, 0), "duplicate_of": keeper},
    ]
    duplicates = dict(
        zip(forward["id"].to_pylist(), forward["duplicate_of"].to_pylist(), strict=True)
    )
    corpus, rejects, dropped = split_part(tables[1], duplicates)
    assert corpus["id"].to_pylist() == [record_id(2, 0), keeper]
    assert dropped == {record_id(2, 2)}
    assert [(r["reason"], r["duplicate_of"]) for r in rejects.to_pylist()] == [
        ("duplicate", keeper),
        ("corrupt", None),
    ]
    assert parts[2].images == [
        {"id": record_id(2, i), "image": png_bytes(n)} for i, n in ((0, 2), (1, 1), (2, 1))
    ]


def test_any_part_order_gives_the_same_tables_and_keepers(tmp_path):
    """Parts decoded and filtered last to first (as another runner may) keep the lowest id
    of each group of duplicates, exactly as in plan order."""
    folder = folder_with_repeats(tmp_path / "in")
    config = make_config(folder, shard_size=2, ingest={"store_images": "always"})
    forward = run_ingest(tmp_path / "forward", config)
    runner = LocalRunner(RunDir(tmp_path / "reverse"), config, progress=False, order=reversed_parts)
    backward = runner.run_all(ingest_stages(config))[-1]
    assert backward.counts == forward.counts
    assert output_files(tmp_path / "reverse") == output_files(tmp_path / "forward")
    rejects = read_rejects(RunDir(tmp_path / "reverse")).to_pylist()
    kept_a = record_id(0, 0)  # a.png, the first of the three identical images
    assert sorted((r["key"], r["duplicate_of"]) for r in rejects) == [
        ("c.png", kept_a),
        ("e.png", record_id(1, 1)),  # d.png
        ("f.png", kept_a),
    ]


def reversed_parts(parts: list[str]) -> list[str]:
    return parts[::-1]
