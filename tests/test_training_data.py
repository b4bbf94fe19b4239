"""Training data: both dataset layouts, seeded sampling, skipped images, exact data position."""

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megapairs.training.data import (
    BatchStream,
    RowStream,
    RowUnusable,
    TrainSample,
    TripletBatches,
    TripletTable,
    find_sources,
    required_columns,
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


def triplet_rows(
    prefix: str, rows: int = ROWS, images: int = ROWS + 5, query_in_hns: bool = True
) -> list[dict]:
    """Row i: query image i, target i + 1, hns = [query, i + 2, i + 3, i + 4] (image paths;
    without the query when not `query_in_hns`)."""

    def path(index: int) -> str:
        return f"{prefix}img-{index % images}.png"

    first = [0] if query_in_hns else []
    return [
        {
            "q_img": path(i),
            "q_text": INSTRUCTIONS,
            "t_img": path(i + 1),
            "hns": [path(i + offset) for offset in (*first, 2, 3, 4)],
        }
        for i in range(rows)
    ]


def write_our_dataset(folder: Path, rows: int = ROWS, query_in_hns: bool = True) -> Path:
    """Our export's layout: part-N.parquet (+ its JSONL twin) with extra columns, image
    paths relative to the dataset folder (images/...)."""
    write_images(folder / "images", rows + 5)
    records = [
        {**row, "pair_id": f"p{i}", "query_id": i, "channels": ["image"], "description": "x"}
        for i, row in enumerate(triplet_rows("images/", rows, query_in_hns=query_in_hns))
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


@pytest.mark.parametrize("query_in_hns", [True, False], ids=["released-layout", "no-query-in-hns"])
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
    tmp_path: Path, strategy: str, count: int, expected: list[str], query_in_hns: bool
) -> None:
    folder = write_our_dataset(tmp_path, query_in_hns=query_in_hns)
    table = TripletTable.from_paths([str(folder)])
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


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize("column", ["q_img", "q_text", "t_img", "hns"])
def test_a_file_without_a_needed_column_is_refused_when_read(
    tmp_path: Path, suffix: str, column: str
) -> None:
    write_images(tmp_path / "images", ROWS + 5)
    records = [{k: v for k, v in row.items() if k != column} for row in triplet_rows("images/")]
    file = tmp_path / f"part-0{suffix}"
    if suffix == ".jsonl":
        file.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), file)
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}.*no '{column}' column"):
        TripletTable.from_paths([str(file)])  # every column needed: mined negatives
    if column != "hns":
        with pytest.raises(ValueError, match=f"no '{column}' column"):
            TripletTable.from_paths([str(file)], required=required_columns("none"))
        return
    for strategy in ("none", "query_image"):  # these never read hns
        table = TripletTable.from_paths([str(file)], required=required_columns(strategy))
        sample = batches(table, strategy=strategy, negatives=1).sample(4, epoch=0)
        assert [image_index(image) for image in sample.candidates] == (
            [5] if strategy == "none" else [5, 4]
        )


def test_rows_with_null_hns_train_without_mined_negatives(tmp_path: Path) -> None:
    write_images(tmp_path / "images", ROWS + 5)
    records = [{**row, "hns": None} for row in triplet_rows("images/")]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "part-0.parquet")
    table = TripletTable.from_paths([str(tmp_path)], required=required_columns("none"))
    plain = batches(table, batch_size=5, strategy="none")
    assert not plain[0].skipped and len(plain[0].batch) == 5
    assert not batches(table, batch_size=5, strategy="query_image")[0].skipped
    mined = batches(TripletTable.from_paths([str(tmp_path)]), strategy="mined")
    with pytest.raises(RowUnusable, match="too_few_negatives"):
        mined.sample(0, epoch=0)


def test_a_batch_larger_than_a_process_share_is_refused(tmp_path: Path) -> None:
    table = TripletTable.from_paths([str(write_our_dataset(tmp_path))])  # 10 rows
    assert len(batches(table, batch_size=ROWS)[0].batch) == ROWS
    with pytest.raises(ValueError, match="batch_size 11 exceeds the 10 training rows"):
        batches(table, batch_size=ROWS + 1)
    half = RowStream(len(table), seed=0, rank=1, world_size=2)  # 5 rows per process
    with pytest.raises(ValueError, match=r"batch_size 6 exceeds the 5 .* 2 process"):
        TripletBatches(table, half, 6, "none", 0)


def test_instructions_holding_a_reserved_token_skip_their_row(tmp_path: Path) -> None:
    write_images(tmp_path / "images", ROWS + 5)
    records = triplet_rows("images/")
    records[3]["q_text"] = ["make it red", "put <image> here"]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "part-0.parquet")
    table = TripletTable.from_paths([str(tmp_path)])
    guarded = TripletBatches(
        table, RowStream(len(table), 0), ROWS, "none", 0, reserved_tokens=["<image>"]
    )
    with pytest.raises(RowUnusable, match=r"reserved_token.*<image>"):
        guarded.sample(3, epoch=0)
    loaded = guarded[0]
    assert [(s.row, s.reason) for s in loaded.skipped] == [(3, "reserved_token")]
    assert len(loaded.batch) == ROWS and 3 not in {sample.row for sample in loaded.batch}
    stream = BatchStream(guarded)
    stream.next_batch()
    assert stream.skipped.as_dict() == {"reserved_token": 1}
    assert batches(table, strategy="none").sample(3, epoch=0)  # no reserved tokens: usable
