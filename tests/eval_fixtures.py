"""Writers of small benchmark data roots in the released layouts, with tiny real images.

`write_<benchmark>_root(root, ...)` writes the annotation files in the exact
format of the benchmark's release plus one tiny image file (PNG or JPEG, as the
benchmark names them) for every image the annotations or image lists refer to,
and returns `root`; `load_benchmark("<benchmark>", root, split)` then loads it
with default settings. The default contents come from the `<benchmark>_entries`
functions and constants here, so tests can assert on them or pass their own.
Nothing binary is committed: everything is made in code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_SIZE = (8, 6)


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """A tiny noise picture: JPEG for a .jpg/.jpeg suffix (any case), PNG otherwise."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    Image.fromarray(pixels).save(path, "JPEG" if jpeg else "PNG")
    return path


def write_images(paths: Iterable[Path], size: tuple[int, int] = IMAGE_SIZE) -> None:
    for seed, path in enumerate(paths):
        write_image(path, seed, size)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


# --- CIRCO -------------------------------------------------------------------------------

CIRCO_GALLERY_IDS = (11, 22, 33, 44, 55, 66, 77, 88)
CIRCO_IMAGES = "COCO2017_unlabeled/unlabeled2017"
CIRCO_IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"


def circo_entries(split: str = "val") -> list[dict[str, Any]]:
    """Three CIRCO queries; val has targets (1, 2 and 3 ground truths) and aspects."""
    entries: list[dict[str, Any]] = [
        {
            "reference_img_id": 11,
            "target_img_id": 22,
            "relative_caption": "is parked at night",
            "shared_concept": "a red bus",
            "gt_img_ids": [22],
            "id": 0,
            "semantic_aspects": ["cardinality"],
        },
        {
            "reference_img_id": 33,
            "target_img_id": 44,
            "relative_caption": "has two of them on a bench",
            "shared_concept": "a teddy bear",
            "gt_img_ids": [44, 55],
            "id": 1,
            "semantic_aspects": ["cardinality", "spatial_relations_background"],
        },
        {
            "reference_img_id": 55,
            "target_img_id": 11,
            "relative_caption": "is seen from above",
            "shared_concept": "a city street",
            "gt_img_ids": [11, 66, 77],
            "id": 2,
            "semantic_aspects": [],
        },
    ]
    if split == "test":
        hidden = ("target_img_id", "gt_img_ids", "semantic_aspects")
        return [{k: v for k, v in entry.items() if k not in hidden} for entry in entries]
    return entries


def write_circo_root(
    root: Path,
    split: str = "val",
    entries: Sequence[Mapping[str, Any]] | None = None,
    gallery_ids: Sequence[int] = CIRCO_GALLERY_IDS,
    image_info: bool = True,
) -> Path:
    """annotations/{split}.json, the COCO image-info file and the unlabeled2017 images."""
    write_json(root / "annotations" / f"{split}.json", entries or circo_entries(split))
    names = [f"{image_id:012d}.jpg" for image_id in gallery_ids]
    if image_info:
        images = [
            {"license": 4, "file_name": name, "height": 6, "width": 8, "id": image_id}
            for name, image_id in zip(names, gallery_ids, strict=True)
        ]
        write_json(root / CIRCO_IMAGE_INFO, {"info": {"year": 2017}, "images": images})
    write_images(root / CIRCO_IMAGES / name for name in names)
    return root


# --- CIRR --------------------------------------------------------------------------------

CIRR_FOLDERS = {"train": "train/0", "val": "dev", "test1": "test1"}
CIRR_PREFIXES = {"train": "train", "val": "dev", "test1": "test1"}


def cirr_image_names(split: str = "val") -> list[str]:
    """Eight NLVR2-style image names of the split."""
    prefix = CIRR_PREFIXES[split]
    keys = ["1-0-img0", "1-0-img1", "2-1-img0", "2-1-img1", "3-0-img0", "3-2-img1"]
    return [f"{prefix}-{key}" for key in [*keys, "4-1-img0", "5-3-img1"]]


def cirr_entries(split: str = "val") -> list[dict[str, Any]]:
    """Three CIRR queries over two image sets of six members (reference included)."""
    n = cirr_image_names(split)
    set_a = [n[0], n[1], n[2], n[3], n[4], n[5]]
    set_b = [n[2], n[3], n[4], n[5], n[6], n[7]]
    rows = [
        (100, n[0], n[2], "show two dogs on the grass", 1, set_a),
        (101, n[3], n[5], "make it a night scene", 1, set_a),
        (102, n[6], n[7], "remove the people", 2, set_b),
    ]
    entries = []
    for pairid, reference, target, caption, set_id, members in rows:
        entry: dict[str, Any] = {
            "pairid": pairid,
            "reference": reference,
            "target_hard": target,
            "target_soft": {target: 1.0},
            "caption": caption,
            "img_set": {
                "id": set_id,
                "members": members,
                "reference_rank": members.index(reference),
                "target_rank": members.index(target),
            },
        }
        if split == "test1":
            del entry["target_hard"], entry["target_soft"], entry["img_set"]["target_rank"]
        entries.append(entry)
    return entries


def write_cirr_root(
    root: Path,
    split: str = "val",
    entries: Sequence[Mapping[str, Any]] | None = None,
    image_folder: str = "img_raw",
) -> Path:
    """captions/cap.rc2.{split}.json, image_splits/split.rc2.{split}.json and the PNGs."""
    write_json(root / "captions" / f"cap.rc2.{split}.json", entries or cirr_entries(split))
    folder = CIRR_FOLDERS[split]
    relative = {name: f"./{folder}/{name}.png" for name in cirr_image_names(split)}
    write_json(root / "image_splits" / f"split.rc2.{split}.json", relative)
    write_images(root / image_folder / path for path in relative.values())
    return root


# --- FashionIQ ---------------------------------------------------------------------------

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


def fashioniq_image_names(category: str) -> list[str]:
    """Four ASIN-like names per category."""
    return [f"B00{category[:2].upper()}{i:05d}" for i in range(4)]


def fashioniq_entries(category: str, split: str = "val") -> list[dict[str, Any]]:
    """Two queries per category; the test split's captions have no target."""
    n = fashioniq_image_names(category)
    entries: list[dict[str, Any]] = [
        {"target": n[1], "candidate": n[0], "captions": ["is red", "has long sleeves"]},
        {"target": n[3], "candidate": n[2], "captions": ["is shorter", " darker"]},
    ]
    if split == "test":
        return [{k: v for k, v in e.items() if k != "target"} for e in entries]
    return entries


def write_fashioniq_root(
    root: Path,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    extension: str = ".png",
) -> Path:
    """captions/cap.{cat}.{split}.json, image_splits/split.{cat}.{split}.json, images/."""
    for category in categories:
        names = fashioniq_image_names(category)
        write_json(
            root / "captions" / f"cap.{category}.{split}.json", fashioniq_entries(category, split)
        )
        write_json(root / "image_splits" / f"split.{category}.{split}.json", names)
        write_images(root / "images" / f"{name}{extension}" for name in names)
    return root


# --- GeneCIS -----------------------------------------------------------------------------

GENECIS_SUBTASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
GENECIS_COCO = "coco/val2017"
GENECIS_VG = "visual_genome/VG_100K_all"
GENECIS_VG_SIZE = (40, 30)


def _coco(image_id: int) -> dict[str, int]:
    return {"val_image_id": image_id}


def _vg(image_id: int, box: list[float], name: str = "car") -> dict[str, Any]:
    return {"image_id": image_id, "instance_bbox": box, "object_name": name}


def genecis_entries(subtask: str) -> list[dict[str, Any]]:
    """Two queries of three gallery images; attribute tasks use Visual Genome boxes.

    In the attribute tasks one gallery has two boxes of one image (distinct ids) and
    change_attribute's second query lists an identical item twice (made unique)."""
    if subtask.endswith("_object"):
        condition = "dog" if subtask == "change_object" else "cardboard"
        return [
            {
                "condition": condition,
                "gallery": [_coco(3), _coco(4), _coco(5)],
                "reference": _coco(1),
                "target": _coco(2),
            },
            {
                "condition": condition,
                "gallery": [_coco(1), _coco(7), _coco(8)],
                "reference": _coco(5),
                "target": _coco(6),
            },
        ]
    condition = "red" if subtask == "change_attribute" else "color"
    repeated = _vg(1005, [1, 1, 5, 5]) if subtask == "change_attribute" else _vg(1006, [1, 1, 5, 5])
    return [
        {
            "reference": _vg(1001, [4, 6, 10, 8]),
            "target": _vg(1002, [20.5, 10, 12, 9.5]),
            "condition": condition,
            "gallery": [
                _vg(1003, [0, 0, 6, 6]),
                _vg(1003, [20, 12, 8, 8]),
                _vg(1004, [2, 2, 9, 9]),
            ],
        },
        {
            "reference": _vg(1004, [2, 2, 9, 9]),
            "target": _vg(1006, [3, 4, 5, 6]),
            "condition": condition,
            "gallery": [_vg(1005, [1, 1, 5, 5]), repeated, _vg(1001, [4, 6, 10, 8])],
        },
    ]


def write_genecis_root(root: Path, subtasks: Sequence[str] = GENECIS_SUBTASKS) -> Path:
    """{subtask}.json files, COCO val2017 JPEGs and Visual Genome JPEGs."""
    for subtask in subtasks:
        write_json(root / f"{subtask}.json", genecis_entries(subtask))
    write_images(root / GENECIS_COCO / f"{i:012d}.jpg" for i in range(1, 9))
    write_images((root / GENECIS_VG / f"{i}.jpg" for i in range(1001, 1007)), GENECIS_VG_SIZE)
    return root


# --- query texts -------------------------------------------------------------------------
# One entry per benchmark in its public annotation format and the query text that each
# template name makes of it, written out by hand from the sources the loaders cite.

CIRCO_TEXT_ENTRY: dict[str, Any] = {
    "reference_img_id": 33,
    "target_img_id": 44,
    "relative_caption": "is running into the water and the sky is cloudy",
    "shared_concept": "a dog on a beach",
    "gt_img_ids": [44, 66],
    "id": 5,
    "semantic_aspects": ["addition", "spatial_relations_background"],
}
CIRCO_TEXTS = {
    # circo_query.jsonl's form: capital F, a comma before "but", a full stop
    "megapairs": (
        "Find a picture that also a dog on a beach, but is running into the water and the sky "
        "is cloudy."
    ),
    "magiclens": "find a dog on a beach but is running into the water and the sky is cloudy",
    "bare": "is running into the water and the sky is cloudy",
}


def cirr_text_entry() -> dict[str, Any]:
    """A val entry whose caption is capitalised and ends with a full stop, as many do."""
    entry = cirr_entries("val")[0]
    entry["caption"] = "Show two dogs of the same breed lying on the grass."
    return entry


CIRR_TEXTS = {"bare": "Show two dogs of the same breed lying on the grass."}


def fashioniq_text_entry(category: str) -> dict[str, Any]:
    """Captions as FashionIQ releases them: one ends with a full stop, one starts with a space."""
    names = fashioniq_image_names(category)
    captions = ["Is lighter with a floral print.", " has shorter sleeves"]
    return {"target": names[3], "candidate": names[1], "captions": captions}


FASHIONIQ_TEXTS = {
    # the released query files keep both captions verbatim, hence "., and  has"
    "megapairs": "Is lighter with a floral print., and  has shorter sleeves",
    "and": "Is lighter with a floral print. and  has shorter sleeves",
}
FASHIONIQ_STRIPPED = "Is lighter with a floral print and has shorter sleeves"  # ".?, " stripped

# For the first query of each `genecis_entries(subtask)` (conditions color, red,
# cardboard, dog).
GENECIS_TEXTS = {
    "megapairs": {
        "focus_attribute": "focus on the color",
        "change_attribute": "make it red",
        "focus_object": "focus on the cardboard",
        "change_object": "add dog",
    },
    "bare": {  # GeneCIS' baselines: the condition word itself
        "focus_attribute": "color",
        "change_attribute": "red",
        "focus_object": "cardboard",
        "change_object": "dog",
    },
}


# --- MMEB --------------------------------------------------------------------------------

MMEB_TOKEN = "<|image_1|>"


def mmeb_rows(dataset: str) -> list[dict[str, Any]]:
    """Two evaluation rows: image->text classification, or text->image retrieval."""
    if dataset == "MSCOCO_t2i":
        image_text = f"{MMEB_TOKEN}\nRepresent the given image."
        paths = [f"MSCOCO_t2i/{name}.jpg" for name in ("a", "b", "c")]
        return [
            {
                "qry_text": "Find me an everyday image that matches the given caption: A dog.",
                "qry_img_path": "",
                "tgt_text": [image_text] * 3,
                "tgt_img_path": paths,
            },
            {
                "qry_text": "Find me an everyday image that matches the given caption: A cat.",
                "qry_img_path": "",
                "tgt_text": [image_text] * 3,
                "tgt_img_path": [paths[2], paths[0], paths[1]],
            },
        ]
    instruction = f"{MMEB_TOKEN} Represent the given image for classification"
    labels = ["tench", "goldfish", "great white shark"]
    return [
        {
            "qry_text": instruction,
            "qry_img_path": f"{dataset}/val_{i}.JPEG",
            "tgt_text": labels[i:] + labels[:i],
            "tgt_img_path": ["", "", ""],
        }
        for i in range(2)
    ]


def mmeb_image_paths(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    paths = [row["qry_img_path"] for row in rows]
    paths += [path for row in rows for path in row["tgt_img_path"]]
    return sorted({path for path in paths if path})


def write_mmeb_root(
    root: Path, datasets: Mapping[str, str] | None = None, split: str = "test"
) -> Path:
    """Each dataset as "jsonl" ({name}.jsonl), "parquet" ({name}.parquet) or "hf"
    ({name}/{split}-00000-of-00001.parquet, as TIGER-Lab/MMEB-eval), and images/."""
    formats = datasets or {"ImageNet-1K": "jsonl", "MSCOCO_t2i": "parquet"}
    root.mkdir(parents=True, exist_ok=True)
    for name, kind in formats.items():
        rows = mmeb_rows(name)
        if kind == "jsonl":
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            (root / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        else:
            path = root / f"{name}.parquet"
            if kind == "hf":
                path = root / name / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path)
        write_images(root / "images" / relative for relative in mmeb_image_paths(rows))
    return root
