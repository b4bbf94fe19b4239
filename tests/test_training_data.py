"""Training data: both dataset layouts, seeded sampling, skipped images, exact data position."""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megapairs.training.data import (
    BatchStream,
    RowStream,
    TrainSample,
    TripletBatches,
    TripletTable,
    find_sources,
)
from megapairs.training.negatives import NegativeStrategy

ROWS = 10
INSTRUCTIONS = ["make it red", "now in blue", "the same, but green", "a yellow one"]


def colour(index: int) -> tuple[int, int, int]:
    """A distinct solid colour per image index, so an image is known by its pixel."""
    return (index * 20 % 256, 255 - index * 20 % 256, index * 55 % 256)


def image_index(image: Image.Image) -> int:
    return next(i for i in range(64) if colour(i) == image.getpixel((0, 0)))


def write_images(folder: Path, count: int, size: int = 32) -> list[str]:
    """`count` solid-colour PNGs named img-<i>.png under `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        Image.new("RGB", (size, size), colour(index)).save(folder / f"img-{index}.png")
        names.append(f"img-{index}.png")
    return names


def triplet_rows(prefix: str, rows: int = ROWS, images: int = ROWS + 5) -> list[dict]:
    """Row i: query image i, target i + 1, hns = [query, i + 2, i + 3, i + 4] (image paths)."""

    def path(index: int) -> str:
        return f"{prefix}img-{index % images}.png"

    return [
        {
            "q_img": path(i),
            "q_text": INSTRUCTIONS,
            "t_img": path(i + 1),
            "hns": [path(i), path(i + 2), path(i + 3), path(i + 4)],
        }
        for i in range(rows)
    ]


def write_our_dataset(folder: Path, rows: int = ROWS) -> Path:
    """Our export's layout: part-N.parquet (+ its JSONL twin) with extra columns, image
    paths relative to the dataset folder (images/...)."""
    write_images(folder / "images", rows + 5)
    records = [
        {**row, "pair_id": f"p{i}", "query_id": i, "channels": ["image"], "description": "x"}
        for i, row in enumerate(triplet_rows("images/", rows))
    ]
    pq.write_table(pa.Table.from_pylist(records), folder / "part-00000.parquet")
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (folder / "part-00000.jsonl").write_text(lines)  # a twin: must not be read twice
    return folder


def write_released_dataset(folder: Path, image_root: Path, rows: int = ROWS) -> Path:
    """The released layout: the four columns only, paths relative to a separate image root."""
    write_images(image_root / "MegaPairs", rows + 5)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(triplet_rows("MegaPairs/", rows))
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    return folder


def batches(
    table: TripletTable,
    batch_size: int = 4,
    strategy: str = "both",
    negatives: int = 3,
    seed: int = 0,
) -> TripletBatches:
    stream = RowStream(len(table), seed)
    return TripletBatches(table, stream, batch_size, strategy, negatives)


def signature(samples: list[TrainSample]) -> list[tuple]:
    """What a batch of samples holds, comparably: rows, instruction, image indices."""
    return [
        (s.row, s.instruction, image_index(s.query_image), *map(image_index, s.candidates))
        for s in samples
    ]


def test_our_layout_and_the_released_layout_read_alike(tmp_path: Path) -> None:
    ours = TripletTable.from_paths([str(write_our_dataset(tmp_path / "ours"))])
    root = tmp_path / "released-images"
    released_folder = write_released_dataset(tmp_path / "released", root)
    released = TripletTable.from_paths([str(released_folder)], image_root=str(root))
    assert len(ours) == len(released) == ROWS  # the JSONL twin was not read as more rows
    for table in (ours, released):
        row = table[3]
        assert row.q_text == INSTRUCTIONS
        assert [Path(p).name for p in (row.q_img, row.t_img)] == ["img-3.png", "img-4.png"]
        assert all(Path(p).is_file() for p in (row.q_img, row.t_img, *row.hns))
    assert Path(ours[0].q_img).parent == tmp_path / "ours" / "images"
    assert Path(released[0].q_img).parent == root / "MegaPairs"


def test_jsonl_files_and_globs_are_read_and_extra_fields_ignored(tmp_path: Path) -> None:
    write_images(tmp_path / "images", ROWS + 5)
    records = [{**row, "extra": {"nested": i}} for i, row in enumerate(triplet_rows("images/"))]
    for part in range(2):
        lines = "".join(json.dumps(r) + "\n" for r in records[part * 5 : part * 5 + 5])
        (tmp_path / f"part-{part}.jsonl").write_text(lines)
    sources = find_sources([str(tmp_path / "part-*.jsonl")])
    assert [s.file.name for s in sources] == ["part-0.jsonl", "part-1.jsonl"]
    table = TripletTable(sources)
    assert len(table) == ROWS
    assert Path(table[7].t_img) == tmp_path / "images" / "img-8.png"
    with pytest.raises(FileNotFoundError, match="no Parquet or JSONL"):
        find_sources([str(tmp_path / "nothing-*.parquet")])


def test_instruction_sampling_is_seeded_by_seed_epoch_and_row(tmp_path: Path) -> None:
    table = TripletTable.from_paths([str(write_our_dataset(tmp_path))])
    first, again, other_seed = batches(table), batches(table), batches(table, seed=1)
    draws = {
        (row, epoch): first.sample(row, epoch).instruction for row in range(5) for epoch in range(8)
    }
    assert draws == {key: again.sample(*key).instruction for key in draws}
    assert set(draws.values()) == set(INSTRUCTIONS)  # every instruction gets drawn
    per_row = [{draws[row, epoch] for epoch in range(8)} for row in range(5)]
    assert all(len(drawn) > 1 for drawn in per_row)  # a row's instruction changes by epoch
    assert draws != {key: other_seed.sample(*key).instruction for key in draws}


@pytest.mark.parametrize(
    ("strategy", "count", "expected"),
    [
        ("none", 3, []),
        ("query_image", 3, ["query"]),
        ("mined", 3, ["mined", "mined", "mined"]),
        ("both", 3, ["query", "mined", "mined"]),
    ],
)
def test_negatives_follow_the_strategy(
    tmp_path: Path, strategy: str, count: int, expected: list[str]
) -> None:
    table = TripletTable.from_paths([str(write_our_dataset(tmp_path))])
    sample = batches(table, strategy=strategy, negatives=count).sample(5, epoch=0)
    query, target, *negatives = [image_index(i) for i in (sample.query_image, *sample.candidates)]
    assert (query, target) == (5, 6)
    kinds = ["query" if n == query else "mined" if n in (7, 8, 9) else "?" for n in negatives]
    assert kinds == expected
    mined = [n for n in negatives if n != query]
    assert len(set(mined)) == len(mined)  # three mined negatives exist: no repeats
    assert NegativeStrategy(strategy)  # a known strategy name


def test_unloadable_images_are_skipped_counted_and_replaced(tmp_path: Path) -> None:
    folder = write_our_dataset(tmp_path)
    (folder / "images" / "img-2.png").write_bytes(b"not an image at all")  # rows 1 and 2
    (folder / "images" / "img-6.png").unlink()  # rows 5 (its target) and 6 (its query)
    bad = {1: "not_an_image", 2: "not_an_image", 5: "missing_file", 6: "missing_file"}
    plan = batches(TripletTable.from_paths([str(folder)]), batch_size=5, strategy="none")
    stream = BatchStream(plan)
    loaded = [plan[index] for index in range(4)]  # two epochs of 10 rows
    for expected in loaded:
        assert signature(stream.next_batch()) == signature(expected.batch)
    assert all(len(batch.batch) == 5 for batch in loaded)  # replaced: batches stay full
    assert not set(bad) & {sample.row for batch in loaded for sample in batch.batch}
    skipped = [entry for batch in loaded for entry in batch.skipped]
    assert all(bad[entry.row] == entry.reason for entry in skipped)
    assert all("img-2.png" in e.detail or "img-6.png" in e.detail for e in skipped)
    counts = stream.skipped.as_dict()
    assert counts == dict(sorted(Counter(entry.reason for entry in skipped).items()))
    assert counts["not_an_image"] >= 4 and counts["missing_file"] >= 4  # twice per epoch


def test_a_restored_position_yields_the_same_next_batches(tmp_path: Path) -> None:
    folder = write_our_dataset(tmp_path)
    (folder / "images" / "img-9.png").unlink()  # rows 8 and 9 are skipped: counts restore too
    table = TripletTable.from_paths([str(folder)])
    running = BatchStream(batches(table, batch_size=3), num_workers=1)  # loads ahead
    for _ in range(4):
        running.next_batch()
    state = json.loads(json.dumps(running.state_dict()))  # as a checkpoint stores it
    expected = [signature(running.next_batch()) for _ in range(3)]
    running.close()

    restored = BatchStream(batches(table, batch_size=3))
    restored.load_state_dict(state)
    assert restored.skipped.as_dict() == state["skipped"]
    assert [signature(restored.next_batch()) for _ in range(3)] == expected
    assert state["epoch"] == 1 and state["next_batch"] == 4


def test_each_epoch_reads_every_row_once_and_ranks_split_them() -> None:
    stream = RowStream(num_rows=7, seed=3)
    positions = stream.rows(0, 21)  # three epochs, read across their ends
    for epoch in range(3):
        assert sorted(row for e, row in positions if e == epoch) == list(range(7))
    assert positions[:7] != positions[7:14]  # each epoch is shuffled anew
    ranks = [RowStream(7, seed=3, rank=r, world_size=2) for r in range(2)]
    shares = [{row for _, row in r.rows(0, r.share_size)} for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(7))
