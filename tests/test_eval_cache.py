"""The gallery-embedding cache: reused across evaluations and across splits that share a
gallery (proved by counting encodes), recomputed when the gallery, its files, the
checkpoint or the preprocessing changes, resumed from finished chunks; benchmark images
are read on their stored pixels (no EXIF rotation)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import CIRCO_GALLERY_IDS, write_circo_root
from PIL import Image

from megapairs.evaluation.cache import (
    CACHE_FORMAT,
    GalleryCache,
    ImageDecodeError,
    checkpoint_key,
    encode_items,
    expand_to_square,
    file_digest,
    find_undecodable,
    gallery_digest,
    gallery_key,
    load_ref_image,
    preprocessing_key,
)
from megapairs.evaluation.evaluator import evaluate
from megapairs.evaluation.types import Candidate, EvalQuery, EvalTask, ImageRef
from megapairs.models.inputs import ImageLoadError, load_image

EXIF_ORIENTATION = 0x0112


class CountingRetriever:
    """Embeds an image by its mean colour and a text by its length; counts what it encodes."""

    name = "counting-fake"

    def __init__(self, fail_after_candidate_calls: int | None = None) -> None:
        self.query_rows = 0
        self.candidate_images = 0
        self.candidate_calls = 0
        self.fail_after = fail_after_candidate_calls

    def encode_queries(
        self,
        images: list[Image.Image] | None,
        texts: list[str] | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        self.query_rows += len(images) if images is not None else len(texts or [])
        return self._embed(images, texts)

    def encode_candidates(
        self, images: list[Image.Image] | None, texts: list[str] | None
    ) -> torch.Tensor:
        if self.fail_after is not None and self.candidate_calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.candidate_calls += 1
        self.candidate_images += len(images or [])
        return self._embed(images, texts)

    @staticmethod
    def _embed(images: list[Image.Image] | None, texts: list[str] | None) -> torch.Tensor:
        count = len(images) if images is not None else len(texts or [])
        rows = np.ones((count, 4), np.float32)
        for row, image in enumerate(images or []):
            rows[row, :3] += np.asarray(image, np.float32).reshape(-1, 3).mean(0) / 255
        for row, text in enumerate(texts or []):
            rows[row, 3] += len(text) / 10
        return torch.nn.functional.normalize(torch.from_numpy(rows), dim=1)


def gallery_task(folder: Path, count: int, name: str = "toy/val", split: str = "val") -> EvalTask:
    """A gallery of `count` distinct one-colour PNGs and one query."""
    folder.mkdir(parents=True, exist_ok=True)
    gallery = []
    for index in range(count):
        path = folder / f"{index}.png"
        if not path.exists():
            Image.new("RGB", (4, 4), (index * 9 % 256, index * 5 % 256, 90)).save(path)
        gallery.append(Candidate(str(index), ImageRef(path)))
    query = EvalQuery("q", ImageRef(folder / "0.png"), "text", targets=("1",))
    return EvalTask("toy", name, split, (query,), tuple(gallery))


def entries(cache_root: Path) -> list[Path]:
    """The entry folders under a cache root."""
    return sorted((cache_root / f"v{CACHE_FORMAT}").iterdir())


def keep_stat(path: Path, data: bytes) -> None:
    """Write `data` (same size) into `path` and put its mtime back: what the file digest
    cannot see."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_second_evaluation_encodes_only_queries(tmp_path: Path) -> None:
    root = write_circo_root(tmp_path / "circo")
    cache = tmp_path / "cache"
    first = CountingRetriever()
    cold = evaluate("circo", first, "model@1", root, "val", cache_dir=cache)
    assert first.candidate_images == len(CIRCO_GALLERY_IDS) and first.query_rows == 3
    assert cold.record["cache"]["misses"] == 1 and cold.record["cache"]["hits"] == 0

    second = CountingRetriever()
    warm = evaluate("circo", second, "model@1", root, "val", cache_dir=cache)
    assert second.candidate_calls == 0 and second.candidate_images == 0
    assert second.query_rows == 3
    assert warm.record["cache"]["hits"] == 1 and warm.record["cache"]["encoded_rows"] == 0
    assert warm.metrics == cold.metrics
    image = root / "COCO2017_unlabeled/unlabeled2017/000000000088.jpg"
    keep_stat(image, b"\0" * image.stat().st_size)  # broken, same size and mtime
    again = evaluate("circo", CountingRetriever(), "model@1", root, "val", cache_dir=cache)
    assert again.metrics == cold.metrics  # a cached gallery is not decoded (nor probed) again


def test_circo_val_then_test_encode_the_shared_gallery_once(tmp_path: Path) -> None:
    gallery = [*CIRCO_GALLERY_IDS, *range(1000, 1050)]  # a submission needs a top 50
    root = write_circo_root(tmp_path / "circo", "val", gallery_ids=gallery)
    write_circo_root(root, "test", gallery_ids=gallery)
    cache = tmp_path / "cache"
    val_retriever, test_retriever = CountingRetriever(), CountingRetriever()
    val = evaluate("circo", val_retriever, "model@1", root, "val", cache_dir=cache)
    test = evaluate(
        "circo", test_retriever, "model@1", root, "test", cache_dir=cache, output=tmp_path / "out"
    )
    assert val_retriever.candidate_images == len(gallery)
    assert test_retriever.candidate_calls == 0 and test_retriever.query_rows == 3
    (computed,) = val.record["cache"]["lookups"]
    (hit,) = test.record["cache"]["lookups"]
    labels = ("status", "split", "encoded_rows")
    assert [computed[k] for k in labels] == ["computed", "val", len(gallery)]
    assert [hit[k] for k in labels] == ["hit", "test", 0]
    assert hit["path"] == computed["path"] and len(entries(cache)) == 1
    meta = json.loads((Path(hit["path"]) / "meta.json").read_text())
    assert meta["computed_for"] == {"name": "circo/val", "benchmark": "circo", "split": "val"}
    assert not {"benchmark", "split", "task"} & set(meta)


def test_changed_gallery_or_checkpoint_is_recomputed(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path / "cache")
    task = gallery_task(tmp_path / "images", 6)
    ids, vectors = cache.embeddings(task, CountingRetriever(), "model@1")
    assert ids == [str(i) for i in range(6)] and vectors.dtype == np.float32

    for changed_task, key in [
        (gallery_task(tmp_path / "images", 7), "model@1"),  # one more image
        (task, "model@2"),  # another checkpoint
    ]:
        retriever = CountingRetriever()
        cache.embeddings(changed_task, retriever, key)
        assert retriever.candidate_images == len(changed_task.gallery)
    for same_task in [task, gallery_task(tmp_path / "images", 6, "toy/other", "test")]:
        retriever = CountingRetriever()  # another task name and split: only labels
        again_ids, again = cache.embeddings(same_task, retriever, "model@1")
        assert retriever.candidate_images == 0 and again_ids == ids
        np.testing.assert_array_equal(again, vectors)
    assert [event.status for event in cache.events] == ["computed"] * 3 + ["hit"] * 2
    assert [event.split for event in cache.events[-2:]] == ["val", "test"]


def encodes(cache: GalleryCache, task: EvalTask, model_key: str) -> int:
    """How many gallery images one lookup encodes."""
    retriever = CountingRetriever()
    cache.embeddings(task, retriever, model_key)
    return retriever.candidate_images


def test_a_changed_file_or_model_is_recomputed(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path / "cache")
    task = gallery_task(tmp_path / "images", 4)
    assert encodes(cache, task, "model@1") == 4
    touched = tmp_path / "images" / "2.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes
    assert encodes(cache, task, "model@1") == 4
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "images" / "3.png")  # another size
    assert encodes(cache, task, "model@1") == 4
    assert encodes(cache, task, "model@1") == 0
    assert encodes(cache, task, "model@2") == 4  # another checkpoint
    assert [event.status for event in cache.events] == ["computed"] * 3 + ["hit", "computed"]


def test_killed_encoding_resumes_from_finished_chunks(tmp_path: Path) -> None:
    task = gallery_task(tmp_path / "images", 10)
    cache = GalleryCache(tmp_path / "cache", chunk_rows=3)
    dying = CountingRetriever(fail_after_candidate_calls=2)  # batch 3 = one call per chunk
    with pytest.raises(KeyboardInterrupt):
        cache.embeddings(task, dying, "model@1", batch_size=3)
    assert dying.candidate_images == 6
    (entry,) = entries(tmp_path / "cache")
    assert sorted(p.name for p in (entry / "partial-3").iterdir()) == [
        "chunk-00000.npy",
        "chunk-00001.npy",
    ]
    assert not (entry / "meta.json").exists()

    resumed = CountingRetriever()
    _, vectors = cache.embeddings(task, resumed, "model@1", batch_size=3)
    assert resumed.candidate_images == 4  # chunks 2 (3 rows) and 3 (1 row) only
    assert cache.events[-1].status == "resumed" and cache.events[-1].encoded_rows == 4
    assert not (entry / "partial-3").exists() and (entry / "meta.json").exists()
    fresh = encode_items(task.gallery, CountingRetriever().encode_candidates, batch_size=4)
    np.testing.assert_allclose(vectors, fresh, rtol=1e-6)


def test_corrupt_entry_is_recomputed(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path / "cache")
    task = gallery_task(tmp_path / "images", 4)
    cache.embeddings(task, CountingRetriever(), "m")
    (entry,) = entries(tmp_path / "cache")
    (entry / "embeddings.npy").write_bytes(b"not numpy")
    retriever = CountingRetriever()
    cache.embeddings(task, retriever, "m")
    assert retriever.candidate_images == 4


def test_checkpoint_key(tmp_path: Path) -> None:
    assert checkpoint_key("BAAI/BGE-VL-base") == "BAAI/BGE-VL-base"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * (2 << 20))  # above the content-hash size
    key = checkpoint_key(folder)
    assert key.startswith(f"{folder.resolve()}@") and checkpoint_key(folder) == key
    (folder / "config.json").write_text('{"a": 2}')  # same size, other bytes
    changed_config = checkpoint_key(folder)
    assert changed_config != key
    os.utime(weights, ns=(1, 1))  # retouched weights
    assert checkpoint_key(folder) != changed_config


class Processor:
    """An image processor as transformers exposes its settings."""

    def __init__(self, size: int) -> None:
        self.size = size

    def to_dict(self) -> dict[str, object]:
        return {"size": {"shortest_edge": self.size}, "image_mean": [0.5, 0.5, 0.5]}


class ProcessingRetriever(CountingRetriever):
    """A counting retriever with an image processor and a text length."""

    def __init__(self, size: int, max_text_length: int = 77) -> None:
        super().__init__()
        self.image_processor = Processor(size)
        self.max_text_length = max_text_length


def test_key_fields_and_preprocessing(tmp_path: Path) -> None:
    task = gallery_task(tmp_path / "images", 3)
    key = gallery_key(task.gallery, ProcessingRetriever(32), "model@1")
    assert list(key) == [
        "format",
        "retriever",
        "model",
        "preprocessing",
        "gallery",
        "rows",
        "files",
    ]
    assert key["preprocessing"] == {
        "image_processor": {
            "class": f"{__name__}.Processor",
            "size": {"shortest_edge": 32},
            "image_mean": [0.5, 0.5, 0.5],
        },
        "max_text_length": 77,
    }
    labelled = GalleryCache(tmp_path / "labels")  # name, benchmark and split only label
    for name, split in (("circo/val", "val"), ("other/name", "test")):
        labelled.embed_items(
            task.gallery,
            name=name,
            benchmark="bench",
            split=split,
            retriever=ProcessingRetriever(32),
            model_key="model@1",
        )
    assert [event.status for event in labelled.events] == ["computed", "hit"]
    assert preprocessing_key(CountingRetriever()) == {}
    exposing = CountingRetriever()
    exposing.preprocessing_key = "pad-square-224"  # type: ignore[attr-defined]
    assert preprocessing_key(exposing) == {"preprocessing_key": "pad-square-224"}

    cache = GalleryCache(tmp_path / "cache")
    counts = []
    for retriever in [
        ProcessingRetriever(32),
        ProcessingRetriever(64),
        ProcessingRetriever(32, 64),
    ]:
        cache.embeddings(task, retriever, "model@1")
        counts.append(retriever.candidate_images)
    assert counts == [3, 3, 3] and len(entries(tmp_path / "cache")) == 3


def test_file_digest_is_of_sizes_and_mtimes(tmp_path: Path) -> None:
    task = gallery_task(tmp_path / "images", 2)
    before = file_digest(task.gallery)
    assert file_digest(task.gallery) == before
    image = tmp_path / "images" / "1.png"
    keep_stat(image, bytes(image.stat().st_size))  # other bytes, same size and mtime
    assert file_digest(task.gallery) == before
    image.unlink()
    assert file_digest(task.gallery) != before  # a missing file: "missing", no error


def test_gallery_digest_covers_ids_paths_and_boxes() -> None:
    base = [Candidate("1", ImageRef(Path("a.jpg")))]
    digests = {
        gallery_digest(base),
        gallery_digest([Candidate("2", ImageRef(Path("a.jpg")))]),
        gallery_digest([Candidate("1", ImageRef(Path("b.jpg")))]),
        gallery_digest([Candidate("1", ImageRef(Path("a.jpg"), (0, 0, 2, 2)))]),
        gallery_digest([Candidate("1", ImageRef(Path("a.jpg")), "text")]),
    }
    assert len(digests) == 5


def test_crops_are_clipped_and_padded_to_a_square(tmp_path: Path) -> None:
    image = Image.new("RGB", (10, 8), (0, 0, 255))
    image.paste(Image.new("RGB", (4, 2), (255, 0, 0)), (6, 6))
    image.save(tmp_path / "a.png")
    crop = load_ref_image(ImageRef(tmp_path / "a.png", (6, 6, 9, 9)))  # clipped to 4x2
    assert crop.size == (4, 4)
    pixels = np.asarray(crop)
    assert (pixels[1:3] == (255, 0, 0)).all() and (pixels[0] == 0).all()
    assert load_ref_image(ImageRef(tmp_path / "a.png", (6, 6, 9, 9)), square=False).size == (4, 2)
    assert expand_to_square(image).size == (10, 10)
    with pytest.raises(ImageLoadError, match="outside image"):
        load_ref_image(ImageRef(tmp_path / "a.png", (20, 20, 5, 5)))
    with pytest.raises(ImageLoadError, match=r"missing\.png"):
        load_ref_image(ImageRef(tmp_path / "missing.png"))


def test_encode_items_groups_by_modality_and_keeps_order(tmp_path: Path) -> None:
    task = gallery_task(tmp_path / "images", 3)
    items = [
        Candidate("t", None, "a text"),
        task.gallery[0],
        Candidate("it", task.gallery[1].image, "with text"),
        task.gallery[2],
    ]
    retriever = CountingRetriever()
    rows = encode_items(items, retriever.encode_candidates, batch_size=8)
    for position, item in enumerate(items):
        alone = encode_items([item], CountingRetriever().encode_candidates, batch_size=1)
        np.testing.assert_allclose(rows[position], alone[0], rtol=1e-6)
    assert retriever.candidate_calls == 3  # text, image, image + text
    with pytest.raises(ValueError, match="neither image nor text"):
        encode_items([Candidate("x")], retriever.encode_candidates, batch_size=1)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as an interrupted download leaves it (the header still parses)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_find_undecodable_names_broken_files_only(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(good, quality=95)
    truncated, empty, text = tmp_path / "cut.jpg", tmp_path / "empty.jpg", tmp_path / "page.png"
    Image.fromarray(pixels).save(truncated, quality=95)
    truncate(truncated)
    empty.write_bytes(b"")
    text.write_text("<html>not found</html>")
    outside = ImageRef(good, box=(100.0, 100.0, 5.0, 5.0))  # a crop box off the image
    refs = [ImageRef(p) for p in (good, truncated, empty, text, good)] + [outside]
    failures = find_undecodable(refs, workers=2)
    assert list(failures) == [ImageRef(truncated), ImageRef(empty), ImageRef(text), outside]
    assert "truncated" in failures[ImageRef(truncated)]
    assert "outside image" in failures[outside]
    with pytest.raises(ImageLoadError):  # the probe agrees with the real decoder
        load_ref_image(ImageRef(truncated))


def test_every_undecodable_file_of_a_batch_is_one_error(tmp_path: Path) -> None:
    task = gallery_task(tmp_path / "images", 6)
    for index in (1, 4):
        (tmp_path / "images" / f"{index}.png").write_bytes(b"broken")
    with pytest.raises(ImageDecodeError, match=r"2 image file\(s\) cannot be decoded") as err:
        encode_items(task.gallery, CountingRetriever().encode_candidates, batch_size=8)
    assert "1.png" in str(err.value) and "4.png" in str(err.value)


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A 12x8 (wide) JPEG whose EXIF says "rotate 90 degrees" (orientation 6); returns
    its stored pixels as decoded without any rotation."""
    pixels = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:
        assert stored.getexif()[EXIF_ORIENTATION] == 6
        return np.asarray(stored.convert("RGB"))


def test_benchmark_images_are_read_on_their_stored_pixels(tmp_path: Path) -> None:
    """Crop boxes are on the stored pixels, as the benchmarks' loaders read them; EXIF
    orientation is not applied, neither here nor by the retriever's input normalisation."""
    path = tmp_path / "rotated.jpg"
    raw = exif_rotated_jpeg(path)
    assert load_image(path).size == (8, 12)  # the training decoder turns it upright
    whole = load_ref_image(ImageRef(path))
    assert whole.size == (12, 8)
    np.testing.assert_array_equal(np.asarray(whole), raw)
    crop = load_ref_image(ImageRef(path, (7, 1, 4, 6)), square=False)
    np.testing.assert_array_equal(np.asarray(crop), raw[1:7, 7:11])
    np.testing.assert_array_equal(np.asarray(load_image(crop)), raw[1:7, 7:11])
    squared = load_ref_image(ImageRef(path, (7, 1, 4, 6)))
    np.testing.assert_array_equal(np.asarray(load_image(squared))[:, 1:5], raw[1:7, 7:11])
    assert find_undecodable([ImageRef(path)]) == {}
