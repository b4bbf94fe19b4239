"""Composed search over a run's corpus (`megapairs.explore.search`, `megapairs search`):
the channels retriever's hits recomputed from the run's embeddings and the score stage's
scorer, uploads, the gallery cache of a model retriever (built once, reused by another
engine, images read from an archive run's image store), state and errors, and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from corpus_fixtures import img2dataset_sample, jpeg_bytes, make_config, run_ingest, write_tar
from PIL import Image, ImageFile

from megapairs.corpus.images import open_rgb
from megapairs.corpus.store import read_corpus, read_part_images
from megapairs.embeddings import load_channel
from megapairs.explore.search import (
    GALLERY_DIR,
    MAX_K,
    NotAnImage,
    SearchEngine,
    SearchHit,
    SearchInputError,
    SearchNotReady,
    UploadTooLarge,
    build_search_engine,
    decode_upload,
    run_config,
)
from megapairs.explore.search_command import format_table
from megapairs.models.clip import MMRetCLIP
from megapairs.quality.scorers import ChannelsScorer, build_channels_scorer, resolve_channels
from megapairs.runs import RunDir

TEXT = "three red hearts near the top"


@pytest.fixture(scope="module")
def engine(explore_demo_run: Path) -> SearchEngine:
    """The channels engine over the demo run, built (it writes nothing into the run)."""
    built = build_search_engine(RunDir(explore_demo_run))
    built.build()
    return built


@pytest.fixture(scope="module")
def scorer(explore_demo_run: Path) -> ChannelsScorer:
    """The score stage's channels scorer over the same run: the reference."""
    run = RunDir(explore_demo_run)
    return build_channels_scorer(run, run_config(run))


def corpus_ids(run_root: Path) -> list[int]:
    return sorted(read_corpus(RunDir(run_root), columns=["id"])["id"].to_pylist())


def source_bytes(run_root: Path, record: int) -> bytes:
    corpus = read_corpus(RunDir(run_root), columns=["id", "path"]).to_pylist()
    return Path(next(row["path"] for row in corpus if row["id"] == record)).read_bytes()


def top(ids: np.ndarray, scores: np.ndarray, k: int, drop: int | None = None) -> list[SearchHit]:
    """The k best (id, score) by descending score, `drop` left out."""
    order = np.argsort(-scores, kind="stable")
    hits = [SearchHit(int(ids[i]), float(scores[i])) for i in order if ids[i] != drop]
    return hits[:k]


def assert_same_hits(got: list[SearchHit], expected: list[SearchHit], tol: float = 1e-4) -> None:
    assert [hit.id for hit in got] == [hit.id for hit in expected]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=tol)


# the channels retriever -------------------------------------------------------------


def test_image_query_returns_the_nearest_images_of_the_image_channel(engine, explore_demo_run):
    run = RunDir(explore_demo_run)
    image_channel, _ = resolve_channels(run, run_config(run))
    ids, vectors = load_channel(run, image_channel)
    assert engine.gallery_size == len(ids) == len(corpus_ids(explore_demo_run))
    for record in ids[:: len(ids) // 6]:
        cosines = vectors @ vectors[list(ids).index(record)]
        hits = engine.search(image_id=int(record), k=8)
        assert len(hits) == 8 and int(record) not in [hit.id for hit in hits]
        assert_same_hits(hits, top(ids, cosines, 8, drop=int(record)))


def test_composed_and_text_queries_score_as_the_score_stage_scorer(
    engine, scorer, explore_demo_run
):
    ids, _ = load_channel(RunDir(explore_demo_run), scorer.images.channel)
    gallery = scorer.candidates(ids.tolist()).vectors
    record = int(ids[7])
    composed = scorer.composed([record], [TEXT]).vectors[0]
    hits = engine.search(image_id=record, text=TEXT, k=10)
    assert_same_hits(hits, top(ids, gallery @ composed, 10, drop=record))
    text_only = scorer.text_only([TEXT])[0]
    assert_same_hits(engine.search(text=TEXT, k=10), top(ids, gallery @ text_only, 10))
    w = scorer.text_weight
    images, captions = gallery[:, : scorer.images.dim], gallery[:, scorer.images.dim :]
    words = scorer.texts.get([TEXT])[0]
    expected = (1 - w) * (images @ images[7]) + w * (captions @ words)
    assert_same_hits(hits, top(ids, expected, 10, drop=record))


def test_an_uploaded_corpus_image_finds_what_its_id_finds(engine, explore_demo_run):
    record = corpus_ids(explore_demo_run)[11]
    image = decode_upload(source_bytes(explore_demo_run, record))
    uploaded = engine.search(image=image, k=9)
    assert uploaded[0].id == record and uploaded[0].score == pytest.approx(1.0, abs=1e-3)
    assert_same_hits(uploaded[1:], engine.search(image_id=record, k=8), tol=1e-3)
    with_text = [hit for hit in engine.search(image=image, text=TEXT, k=6) if hit.id != record]
    assert_same_hits(with_text[:5], engine.search(image_id=record, text=TEXT, k=5), tol=1e-3)


def test_k_is_clamped_and_inputs_are_checked(engine, explore_demo_run):
    record = corpus_ids(explore_demo_run)[0]
    assert len(engine.search(image_id=record, k=0)) == 1
    assert len(engine.search(image_id=record, k=10**6)) == min(MAX_K, engine.gallery_size - 1)
    assert len(engine.search(text=TEXT, k=10**6)) == engine.gallery_size
    with pytest.raises(SearchInputError, match="is not in the corpus"):
        engine.search(image_id=987_654_321)
    with pytest.raises(SearchInputError, match="a text, or both"):
        engine.search(text="   ")
    image = Image.new("RGB", (64, 64))
    with pytest.raises(SearchInputError, match="not both"):
        engine.search(image_id=record, image=image)


def test_searches_from_several_threads_agree_with_one_thread(engine, explore_demo_run):
    records = corpus_ids(explore_demo_run)[:3]
    uploads = {r: decode_upload(source_bytes(explore_demo_run, r)) for r in records}
    queries = [{"image_id": r, "text": TEXT} for r in records]
    queries += [{"image": uploads[r], "text": f"{r} blue"} for r in records]
    expected = [engine.search(**query, k=5) for query in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda query: engine.search(**query, k=5), queries * 2))
    for hits, want in zip(got, expected * 2, strict=True):
        assert_same_hits(hits, want, tol=1e-5)


def test_state_progress_and_background_build(explore_demo_run):
    engine = build_search_engine(RunDir(explore_demo_run))
    assert engine.describe() == {
        "enabled": True,
        "retriever": "channels",
        "model": None,
        "state": "missing",
        "done": 0,
        "total": 0,
        "error": None,
    }
    with pytest.raises(SearchNotReady):
        engine.search(text=TEXT)
    engine.start_build()
    engine.start_build()  # idempotent
    assert engine.wait(120)
    size = len(corpus_ids(explore_demo_run))
    described = engine.describe()
    assert (described["state"], described["done"], described["total"]) == ("ready", size, size)
    assert (engine.state, engine.progress, engine.gallery_size) == ("ready", (size, size), size)
    engine.start_build()  # ready: nothing to do
    assert engine.state == "ready"


def test_a_failed_build_is_state_error_and_can_be_retried(explore_demo_run, tmp_path):
    engine = build_search_engine(RunDir(explore_demo_run))
    engine.backend.run = RunDir(tmp_path)  # type: ignore[attr-defined]
    engine.start_build()
    assert not engine.wait(60)
    assert engine.state == "error" and "no finished embeddings" in (engine.error or "")
    assert engine.describe()["error"] == engine.error
    with pytest.raises(SearchNotReady):
        engine.search(text=TEXT)
    engine.backend.run = RunDir(explore_demo_run)  # type: ignore[attr-defined]
    engine.build()
    assert engine.state == "ready" and engine.error is None


def test_engine_refuses_what_it_cannot_search(explore_demo_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run"):
        build_search_engine(RunDir(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="needs a model"):
        build_search_engine(RunDir(explore_demo_run), "clip")
    with pytest.raises(ValueError, match="unknown retriever"):
        build_search_engine(RunDir(explore_demo_run), "bm25")
    with pytest.raises(FileNotFoundError, match="no model"):
        build_search_engine(RunDir(explore_demo_run), "clip", str(tmp_path / "missing"))


# uploads ------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` (its CRC made valid again)."""
    header = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def test_decode_upload_returns_rgb_and_refuses_oversize_bytes():
    rgba = png(Image.new("RGBA", (40, 30), (255, 0, 0, 128)))
    image = decode_upload(rgba)
    assert (image.mode, image.size) == ("RGB", (40, 30))
    with pytest.raises(UploadTooLarge, match="bytes"):
        decode_upload(rgba, max_bytes=len(rgba) - 1)


def test_decode_upload_refuses_pixel_bombs_before_decoding(monkeypatch):
    big = png(Image.new("1", (6000, 6000)))  # 36M pixels in a few KB
    liar = with_header_size(png(Image.new("RGB", (16, 16))), 20_000, 20_000)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(UploadTooLarge, match="pixels"):
        decode_upload(big, max_pixels=10_000_000)
    with pytest.raises(UploadTooLarge):
        decode_upload(liar)  # 400M pixels: over the limit and over PIL's own guard
    assert decoded == []


@pytest.mark.parametrize(
    "data",
    [b"just some text, no picture\n", jpeg_bytes(3, (64, 64))[:600], b""],
    ids=["text", "truncated-jpeg", "empty"],
)
def test_decode_upload_refuses_what_is_not_an_image(data):
    with pytest.raises(NotAnImage):
        decode_upload(data)


# a model retriever and its gallery cache ----------------------------------------------


@pytest.fixture
def demo_copy(explore_demo_run: Path, tmp_path: Path) -> Path:
    """A copy of the demo run to write the gallery cache into."""
    return Path(shutil.copytree(explore_demo_run, tmp_path / "run"))


class CountingEncodes:
    """Counts the rows MMRetCLIP encodes as candidates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        original = MMRetCLIP.encode_candidates
        lock = threading.Lock()

        def counting(retriever, images, texts):
            with lock:
                self.rows += len(images or texts)
            return original(retriever, images, texts)

        monkeypatch.setattr(MMRetCLIP, "encode_candidates", counting)


def test_clip_gallery_is_built_once_and_reused_by_another_engine(demo_copy, tiny_clip, monkeypatch):
    counter = CountingEncodes(monkeypatch)
    run, size = RunDir(demo_copy), len(corpus_ids(demo_copy))
    first = build_search_engine(run, "clip", str(tiny_clip.path))
    seen: list[tuple[int, int]] = []
    first.build(lambda done, total: seen.append((done, total)))
    assert counter.rows == size and seen[-1] == (size, size) and len(seen) > 2
    entries = list((demo_copy / GALLERY_DIR).glob("v*/*/meta.json"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    record = corpus_ids(demo_copy)[3]
    hits = first.search(image_id=record, text="the cat", k=7)

    second = build_search_engine(run, "clip", str(tiny_clip.path))
    second.build()
    assert counter.rows == size  # nothing encoded again
    assert second.backend.cache.events[-1].status == "hit"  # type: ignore[attr-defined]
    assert entries[0].stat().st_mtime_ns == stamp
    assert second.describe()["state"] == "ready" and second.progress == (size, size)
    assert_same_hits(second.search(image_id=record, text="the cat", k=7), hits, tol=1e-6)


def test_clip_hits_are_the_retrievers_own_scores(demo_copy, tiny_clip):
    engine = build_search_engine(RunDir(demo_copy), "clip", str(tiny_clip.path))
    engine.build()
    retriever = engine.backend.retriever  # type: ignore[attr-defined]
    ids = np.asarray(corpus_ids(demo_copy))
    pictures = [open_rgb(source_bytes(demo_copy, int(r))) for r in ids]
    gallery = retriever.encode_candidates(pictures, None).numpy()
    record = int(ids[5])
    query = retriever.encode_queries([pictures[5]], ["the cat"]).numpy()[0]
    expected = top(ids, gallery @ query, 6, drop=record)
    assert_same_hits(engine.search(image_id=record, text="the cat", k=6), expected, tol=1e-4)
    text_only = retriever.encode_queries(None, ["the cat"]).numpy()[0]
    assert_same_hits(engine.search(text="the cat", k=6), top(ids, gallery @ text_only, 6), 1e-4)
    assert engine.describe()["model"] == str(tiny_clip.path)


def test_archive_run_images_come_from_the_runs_image_store(tmp_path, tiny_clip):
    members = []
    for seed in range(6):
        members += img2dataset_sample(f"{seed:09d}", jpeg_bytes(seed, (48, 40)), f"noise {seed}")
    write_tar(tmp_path / "shards" / "00000.tar", members)
    run_ingest(tmp_path / "run", make_config(tmp_path / "shards"))
    run = RunDir(tmp_path / "run")
    assert read_corpus(run, columns=["path"])["path"].to_pylist() == [None] * 6
    engine = build_search_engine(run, "clip", str(tiny_clip.path))
    items = engine.backend.items()  # type: ignore[attr-defined]
    assert {item.image.path for item in items} == {tmp_path / "run/images/part-00000.parquet"}
    engine.build()
    stored = read_part_images(run, "part-00000")
    ids = np.asarray(sorted(stored))
    retriever = engine.backend.retriever  # type: ignore[attr-defined]
    pictures = [open_rgb(stored[int(r)]) for r in ids]
    gallery = retriever.encode_candidates(pictures, None).numpy()
    cached = np.load(next((tmp_path / "run" / GALLERY_DIR).glob("v*/*/embeddings.npy")))
    np.testing.assert_allclose(cached, gallery, atol=1e-5)
    query = retriever.encode_queries([pictures[2]], None).numpy()[0]
    hits = engine.search(image_id=int(ids[2]), k=10)
    assert_same_hits(hits, top(ids, gallery @ query, 10, drop=int(ids[2])))


# the command ------------------------------------------------------------------------


def search_cli(*argv: str) -> int:
    from megapairs.cli import main

    return main(["search", *argv])


def test_cli_prints_a_table_of_hits_with_captions(engine, explore_demo_run, capsys):
    record = corpus_ids(explore_demo_run)[4]
    assert search_cli("--run", str(explore_demo_run), "--image", str(record), "-k", "4") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "id", "score", "caption"] and len(lines) == 5
    corpus = read_corpus(RunDir(explore_demo_run), columns=["id", "caption"]).to_pylist()
    captions = {row["id"]: row["caption"] for row in corpus}
    hits = engine.search(image_id=record, k=4)
    for rank, (line, hit) in enumerate(zip(lines[1:], hits, strict=True), 1):
        fields = line.split(maxsplit=3)
        assert fields[:2] == [str(rank), str(hit.id)] and fields[3] == captions[hit.id]
        assert float(fields[2]) == pytest.approx(hit.score, abs=1e-4)


def test_cli_json_lines_for_an_image_file_and_a_text(engine, explore_demo_run, tmp_path, capsys):
    record = corpus_ids(explore_demo_run)[9]
    picture = tmp_path / "query.jpg"
    picture.write_bytes(source_bytes(explore_demo_run, record))
    argv = ["--run", str(explore_demo_run), "--image", str(picture), "--text", TEXT, "-k", "3"]
    assert search_cli(*argv, "--json", "--quiet") == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    expected = engine.search(image=decode_upload(picture.read_bytes()), text=TEXT, k=3)
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert [row["id"] for row in rows] == [hit.id for hit in expected]
    assert all(set(row) == {"rank", "id", "score", "caption"} for row in rows)
    assert captured.err == ""  # --quiet: no progress bar


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "987654321"], "is not in the corpus"),
        (["--image", "no/such/file.jpg"], "neither a record id nor an image file"),
        (["--text", "  "], "give --image"),
        (["--text", "x", "--retriever", "clip"], "needs a model"),
        (["--text", "x", "--retriever", "clip", "--model", "no/such/model"], "no model"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(explore_demo_run, argv, message, capsys):
    assert search_cli("--run", str(explore_demo_run), "--quiet", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("megapairs search: error: ") and message in err


def test_cli_refuses_a_folder_that_is_no_run_and_a_file_that_is_no_image(tmp_path, capsys):
    assert search_cli("--run", str(tmp_path), "--text", "x") == 2
    assert "no run at" in capsys.readouterr().err
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    assert search_cli("--run", str(tmp_path), "--image", str(text)) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_format_table_without_hits():
    assert format_table([]) == "no hits"
