"""Input readers: folders, manifests, WebDataset tars, Hugging Face Parquet, auto detection."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest
from corpus_fixtures import (
    img2dataset_sample,
    jpeg_bytes,
    png_bytes,
    truncated,
    write_files,
    write_hf_parquet,
    write_manifest,
    write_tar,
)

from megapairs.config import InputConfig
from megapairs.corpus.readers import (
    READERS,
    InputError,
    InputPart,
    SourceRecord,
    detect_format,
    plan_input,
    read_part,
)


def read_all(config: InputConfig) -> list[SourceRecord]:
    return [record for part in plan_input(config) for record in read_part(part)]


def by_key(records: list[SourceRecord]) -> dict[str, SourceRecord]:
    return {record.key: record for record in records}


# folder -------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return write_files(
        tmp_path / "images",
        {
            "b.jpg": jpeg_bytes(1),
            "b.txt": "  a caption for b \n",
            "a.png": png_bytes(2),
            "sub/deeper/c.JPEG": jpeg_bytes(3),
            "sub/deeper/c.txt": "caption c",
            "sub/d.webp": png_bytes(4),  # wrong content for its suffix: still a record
            "notes.md": "not a picture",
            "meta.json": "{}",
            ".hidden.jpg": jpeg_bytes(5),
            ".cache/e.jpg": jpeg_bytes(6),
        },
    )


def test_folder_lists_files_in_sorted_relative_order_with_sidecar_captions(image_tree):
    records = read_all(InputConfig(path=str(image_tree), format="folder"))
    assert [r.key for r in records] == [
        "a.png",
        "b.jpg",
        "notes.md",
        "sub/d.webp",
        "sub/deeper/c.JPEG",
    ]
    found = by_key(records)
    assert found["b.jpg"].caption == "  a caption for b \n"  # cleaned by ingest, not here
    assert found["sub/deeper/c.JPEG"].caption == "caption c"
    assert found["a.png"].caption is None
    assert found["a.png"].path == str(image_tree / "a.png")
    assert found["a.png"].data is None and found["a.png"].error is None
    assert Path(found["b.jpg"].uri).is_absolute()


def test_folder_parts_hold_at_most_shard_size_records(image_tree):
    parts = plan_input(InputConfig(path=str(image_tree), shard_size=2))
    assert [len(p.members) for p in parts] == [2, 2, 1]
    assert {p.reader for p in parts} == {"folder"}
    assert pickle.loads(pickle.dumps(parts[0])) == parts[0]
    assert InputPart.from_json(parts[1].to_json()) == parts[1]
    keys = [r.key for p in parts for r in read_part(p)]
    assert keys == [r.key for r in read_all(InputConfig(path=str(image_tree)))]


def test_folder_input_must_exist_and_hold_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_input(InputConfig(path=str(tmp_path / "nope"), format="folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no records"):
        plan_input(InputConfig(path=str(tmp_path / "empty"), format="folder"))
    with pytest.raises(InputError, match="not set"):
        plan_input(InputConfig(path=""))


# manifest -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_manifest_with_custom_columns_and_relative_paths(tmp_path, suffix):
    write_files(tmp_path / "data" / "pics", {"x.jpg": jpeg_bytes(1), "y.jpg": jpeg_bytes(2)})
    abs_path = write_files(tmp_path / "elsewhere", {"z.png": png_bytes(3)}) / "z.png"
    rows = [
        {"file": "pics/x.jpg", "text": 'a "quoted", comma caption', "extra": 1},
        {"file": "pics/gone.jpg", "text": "1984", "extra": 2},
        {"file": str(abs_path), "text": "multi\nline", "extra": 3},
        {"file": "pics/y.jpg", "text": None, "extra": 4},
    ]
    manifest = write_manifest(tmp_path / "data" / f"list{suffix}", rows)
    config = InputConfig(path=str(manifest), image_column="file", caption_column="text")
    assert detect_format(config) == "manifest"
    records = read_all(config)
    assert [r.key for r in records] == [row["file"] for row in rows]
    x, gone, z, y = records
    assert x.path == str(tmp_path / "data" / "pics" / "x.jpg")
    assert x.caption == 'a "quoted", comma caption'
    assert gone.error is not None and gone.error[0] == "missing_file"
    assert gone.path is None and "gone.jpg" in gone.error[1]
    assert gone.caption == "1984"
    assert z.path == str(abs_path) and z.caption == "multi\nline"
    assert y.caption in (None, "")  # CSV cannot tell an empty string from a missing value


def test_manifest_paths_resolve_against_image_root(tmp_path):
    root = write_files(tmp_path / "root", {"p/x.jpg": jpeg_bytes(1)})
    manifest = write_manifest(tmp_path / "m" / "list.csv", [{"image": "p/x.jpg", "caption": "c"}])
    [record] = read_all(InputConfig(path=str(manifest), image_root=str(root)))
    assert record.path == str(root / "p" / "x.jpg")
    assert record.error is None


def test_manifest_missing_column_names_the_file_and_its_columns(tmp_path):
    manifest = write_manifest(tmp_path / "list.csv", [{"img": "x.jpg", "caption": "c"}])
    with pytest.raises(InputError) as caught:
        plan_input(InputConfig(path=str(manifest), format="manifest"))
    message = str(caught.value)
    assert "list.csv" in message and "'image'" in message and "'img'" in message


def test_manifest_rows_without_path_or_with_urls_are_error_records(tmp_path):
    rows = [
        {"image": "http://example.com/a.jpg", "caption": "web"},
        {"image": None, "caption": "nothing"},
    ]
    manifest = write_manifest(tmp_path / "list.jsonl", rows)
    url, empty = read_all(InputConfig(path=str(manifest)))
    assert url.error is not None and url.error[0] == "missing_file" and "URL" in url.error[1]
    assert empty.error is not None and empty.error[0] == "no_image"
    assert empty.caption == "nothing"


def test_manifest_splits_rows_into_parts(tmp_path):
    rows = [{"image": f"{i}.jpg", "caption": str(i)} for i in range(7)]
    manifest = write_manifest(tmp_path / "list.tsv", rows)
    parts = plan_input(InputConfig(path=str(manifest), shard_size=3))
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 7)]
    assert [r.caption for r in read_part(parts[1])] == ["3", "4", "5"]


def test_malformed_jsonl_names_the_line(tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"image": "a.jpg"}\n{not json\n')
    with pytest.raises(InputError, match="line 2"):
        plan_input(InputConfig(path=str(manifest)))


# webdataset ---------------------------------------------------------------------


def test_webdataset_reads_img2dataset_shards(tmp_path):
    shards = tmp_path / "shards"
    write_tar(
        shards / "00000.tar",
        img2dataset_sample("000000000", jpeg_bytes(1), "first caption")
        + img2dataset_sample("000000001", jpeg_bytes(2), None)
        + [("000000002.txt", "caption without image"), ("000000002.json", "{}")],
    )
    write_tar(shards / "00001.tar", img2dataset_sample("000010000", jpeg_bytes(3), "other shard"))
    config = InputConfig(path=str(shards))
    assert detect_format(config) == "webdataset"
    parts = plan_input(config.model_copy(update={"shard_size": 1}))
    assert len(parts) == 2, "one part per tar shard"
    records = read_all(config)
    assert [r.key for r in records] == ["000000000", "000000001", "000000002", "000010000"]
    first, no_caption, no_image, other = records
    assert first.data == jpeg_bytes(1) and first.path is None
    assert first.caption == "first caption"
    assert first.uri.endswith("00000.tar#000000000.jpg")
    assert no_caption.caption is None and no_caption.error is None
    assert no_image.error is not None and no_image.error[0] == "no_image"
    assert "000000002.txt" in no_image.error[1]
    assert other.caption == "other shard"


def test_webdataset_accepts_a_glob_of_tars(tmp_path):
    for index in range(3):
        write_tar(
            tmp_path / f"{index:05d}.tar", img2dataset_sample(f"k{index}", jpeg_bytes(index), "c")
        )
    parts = plan_input(InputConfig(path=str(tmp_path / "0000[02].tar")))
    assert [Path(p.source).name for p in parts] == ["00000.tar", "00002.tar"]


def test_truncated_tar_ends_with_a_corrupt_archive_record(tmp_path):
    big = jpeg_bytes(1, size=(256, 256))
    full = write_tar(
        tmp_path / "full.tar",
        img2dataset_sample("a", jpeg_bytes(2), "kept") + img2dataset_sample("b", big, "lost"),
    )
    with tarfile.open(full) as tar:
        middle_of_big = tar.getmember("b.jpg").offset_data + len(big) // 2
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(full.read_bytes()[:middle_of_big])
    records = read_all(InputConfig(path=str(cut)))
    assert records[0].key == "a" and records[0].data == jpeg_bytes(2)
    assert records[-1].error is not None and records[-1].error[0] == "corrupt_archive"
    assert "00000.tar" in records[-1].error[1]


def test_a_file_that_is_not_a_tar_is_one_corrupt_archive_record(tmp_path):
    (tmp_path / "00000.tar").write_bytes(truncated(b"garbage" * 100))
    [record] = read_all(InputConfig(path=str(tmp_path), format="webdataset"))
    assert record.error is not None and record.error[0] == "corrupt_archive"


# parquet (Hugging Face style) ----------------------------------------------------


@pytest.mark.parametrize("struct", [True, False], ids=["struct", "binary"])
def test_hf_parquet_image_column(tmp_path, struct):
    images = [jpeg_bytes(i) for i in range(5)]
    captions = ["zero", None, "two", "three", "four"]
    path = write_hf_parquet(
        tmp_path / "train.parquet", images, captions, struct=struct, row_group_size=2
    )
    config = InputConfig(path=str(path), caption_column="text", shard_size=3)
    assert detect_format(config) == "parquet"
    parts = plan_input(config)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 5)]
    records = read_all(config)
    assert [r.data for r in records] == images
    assert [r.caption for r in records] == captions
    assert records[4].key == "train.parquet#4"
    assert records[4].uri.endswith("train.parquet#row=4")


def test_hf_parquet_struct_with_paths_only_or_nothing(tmp_path):
    write_files(tmp_path / "imgs", {"local.jpg": jpeg_bytes(1)})
    cells = [
        {"bytes": jpeg_bytes(2), "path": "orig_name.jpg"},
        {"bytes": None, "path": "imgs/local.jpg"},
        {"bytes": None, "path": "imgs/absent.jpg"},
        None,
    ]
    path = write_hf_parquet(tmp_path / "d.parquet", cells, ["a", "b", "c", "d"])
    named, local, absent, empty = read_all(InputConfig(path=str(path), caption_column="text"))
    assert named.key == "orig_name.jpg" and named.data == jpeg_bytes(2)
    assert local.path == str(tmp_path / "imgs" / "local.jpg") and local.data is None
    assert absent.error is not None and absent.error[0] == "missing_file"
    assert empty.error is not None and empty.error[0] == "no_image"


def test_hf_parquet_missing_column_is_an_input_error(tmp_path):
    path = write_hf_parquet(tmp_path / "d.parquet", [jpeg_bytes(1)], ["a"])
    with pytest.raises(InputError, match=r"'caption'.*its columns are 'image', 'text'"):
        plan_input(InputConfig(path=str(path), format="parquet"))


def test_parquet_of_paths_is_detected_as_a_manifest(tmp_path):
    write_files(tmp_path, {"x.jpg": jpeg_bytes(1)})
    path = write_manifest(tmp_path / "list.parquet", [{"image": "x.jpg", "caption": "c"}])
    config = InputConfig(path=str(path))
    assert detect_format(config) == "manifest"
    with pytest.raises(InputError, match="not binary"):
        plan_input(config.model_copy(update={"format": "parquet"}))


# detection and dispatch ------------------------------------------------------------


def test_auto_detects_a_folder_of_images(image_tree):
    assert detect_format(InputConfig(path=str(image_tree))) == "folder"


def test_auto_refuses_what_it_cannot_recognise(tmp_path):
    write_files(tmp_path, {"a.bin": b"\x00", "b.dat": b"\x01"})
    with pytest.raises(InputError, match=r"cannot tell the format.*\.bin, \.dat"):
        plan_input(InputConfig(path=str(tmp_path)))


def test_unknown_reader_name_lists_the_known_ones():
    assert set(READERS.names()) == {"folder", "manifest", "parquet", "webdataset"}
    with pytest.raises(ValueError, match="known: folder, manifest, parquet, webdataset"):
        list(read_part(InputPart("zip", "/tmp/x.zip")))
