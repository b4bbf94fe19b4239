"""Builders of small corpus fixtures in temp folders: images, folders, manifests, tars, Parquet.

Everything is made in code, so no binary fixture is committed.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image

from megapairs.config import PipelineConfig
from megapairs.corpus.ingest import ingest_stages
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.runs import RunDir


def noise_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A random RGB picture: distinct seeds give distinct pixels."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "PNG", **save_options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(noise_image(size, seed), "PNG")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), **save_options: Any) -> bytes:
    return encode(noise_image(size, seed), "JPEG", quality=90, **save_options)


def halves_image(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]):
    """A picture whose left half is `left` and right half `right`."""
    width, height = size
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def exif_rotated_jpeg(size: tuple[int, int] = (80, 40), orientation: int = 6) -> bytes:
    """A JPEG, left half red and right half blue, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = halves_image(size, (255, 0, 0), (0, 0, 255))
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def truncated(data: bytes) -> bytes:
    """The first half of a file."""
    return data[: len(data) // 2]


def corrupt_png(seed: int = 0) -> bytes:
    """A PNG whose header is intact but whose compressed pixel data is garbage."""
    data = png_bytes(seed)
    return data[:100] + bytes(200) + data[300:]


def write_files(root: Path, files: dict[str, bytes | str]) -> Path:
    """Write `files` (relative path -> content) under `root`; return `root`."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return root


def write_tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A tar holding `members` (name, content) in the given order, as img2dataset writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_sample(
    key: str, image: bytes, caption: str | None
) -> list[tuple[str, bytes | str]]:
    """The members img2dataset writes for one sample: .jpg, .txt (if any), .json."""
    members: list[tuple[str, bytes | str]] = [(f"{key}.jpg", image)]
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append(
        (f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}))
    )
    return members


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A manifest in the format its suffix names: .csv, .tsv, .jsonl or .parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        table = pa.Table.from_pylist(rows)
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(delimiter=delimiter))
    return path


def write_hf_parquet(
    path: Path,
    images: list[bytes | dict[str, Any] | None],
    captions: list[str | None],
    *,
    struct: bool = True,
    image_column: str = "image",
    caption_column: str = "text",
    row_group_size: int | None = None,
) -> Path:
    """Hugging Face datasets style Parquet: image as {bytes, path} structs or plain binary."""
    if struct:
        cells = [
            c if isinstance(c, dict) or c is None else {"bytes": c, "path": None} for c in images
        ]
        kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    else:
        cells, kind = images, pa.binary()
    table = pa.table(
        {image_column: pa.array(cells, kind), caption_column: pa.array(captions, pa.string())}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_config(path: Path | str, **input_options: Any) -> PipelineConfig:
    """A config reading `path`; `ingest` options go in as `ingest={...}`."""
    ingest = input_options.pop("ingest", {})
    return PipelineConfig.model_validate(
        {"input": {"path": str(path), **input_options}, "ingest": ingest}
    )


def run_ingest(run_root: Path, config: PipelineConfig) -> StageResult:
    """Run the ingest stage over `run_root` with the local runner."""
    runner = LocalRunner(RunDir(run_root), config, progress=False)
    return runner.run_all(ingest_stages(config))[-1]
