"""CIRCO: composed queries over the COCO 2017 unlabeled images, several ground truths each.

Layout (the CIRCO repository's, also MagicLens'):

    {data_root}/annotations/{val,test}.json
    {data_root}/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json
    {data_root}/COCO2017_unlabeled/unlabeled2017/{id:012d}.jpg

The gallery is every image of the COCO image-info file (123,403 images), the
reference image included (CIRCO does not remove it). With
`gallery_source="folder"` it is every `{12 digits}.jpg` in the image folder
instead; the image-info file is the stricter choice, since a partly downloaded
folder is then detected. Query ids are the annotations' `id`; targets are
`gt_img_ids` (the `target_img_id` first); `meta["semantic_aspects"]` keeps the
aspect tags when present. The test split has no targets.

The query text is `template` filled with the entry's `shared_concept` and
`relative_caption`: a literal template or a name of `TEMPLATES` (the table below
names each one's source). The default, `megapairs`, is the released MegaPairs
query file's form, "Find a picture that also {shared_concept}, but
{relative_caption}." (capital F, full stop), so our numbers compare with the
paper's. The task's settings record the resolved `template` and its
`template_name` (None for a literal outside the table).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs.evaluation.loaders.base import (
    LOADERS,
    Entry,
    FolderListing,
    LoaderSettings,
    check_split,
    check_template,
    check_unique_ids,
    entries,
    read_json,
    recorded,
    resolve_path,
    resolve_settings,
    resolve_template,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import (
    BenchmarkDataError,
    Candidate,
    EvalQuery,
    EvalTask,
    ImageRef,
)

SPLITS = ("val", "test")
TEMPLATES: dict[str, str] = {
    # The released MegaPairs (BGE-VL) evaluation query file, "q_text" of every test query:
    # FlagOpen/FlagEmbedding research/BGE_VL/eval/data/circo_query.jsonl.
    "megapairs": "Find a picture that also {shared_concept}, but {relative_caption}.",
    # MagicLens: google-deepmind/magiclens data_utils.py, build_circo_dataset (qtext).
    "magiclens": "find {shared_concept} but {relative_caption}",
    # The relative caption alone, as SEARLE (miccunifi/SEARLE src/validate.py,
    # circo_generate_val_predictions) and Pic2Word-style methods use it; their prefix
    # "a photo of $ that ..." needs their pseudo-word token $, so it is left out here.
    "bare": "{relative_caption}",
}
PAPER_TEMPLATE = TEMPLATES["megapairs"]  # the default, as the paper's numbers were made
MAGICLENS_TEMPLATE = TEMPLATES["magiclens"]
GALLERY_SOURCES = ("image_info", "folder")


class Settings(LoaderSettings):
    """CIRCO's settings (paths relative to the data root)."""

    annotation_file: str = "annotations/{split}.json"
    image_folder: str = "COCO2017_unlabeled/unlabeled2017"
    gallery_source: str = "image_info"
    image_info_file: str = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
    template: str = "megapairs"  # a name of TEMPLATES or a literal template


IMAGE_NAME = re.compile(r"^(\d{12})\.jpg$")


@LOADERS.register("circo")
def load_circo(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task, `circo/{split}`, ranked against the whole unlabeled gallery."""
    check_split("circo", split, SPLITS)
    config = resolve_settings("circo", Settings, settings)
    config["template"], config["template_name"] = resolve_template(
        "template", config["template"], TEMPLATES
    )
    check_template("template", config["template"], shared_concept="", relative_caption="")
    if config["gallery_source"] not in GALLERY_SOURCES:
        raise ValueError(f"circo gallery_source should be one of {GALLERY_SOURCES}")
    annotation_file = resolve_path(data_root, config["annotation_file"].format(split=split))
    folder = resolve_path(data_root, config["image_folder"])
    gallery = _gallery(data_root, folder, config)
    # With the image-info file, an id outside it is an unknown id; with a folder listing,
    # an id outside it is a missing image (reported by `verify_images`).
    paths = {c.id: c.image.path for c in gallery if c.image is not None}
    images = _ImagesById(folder, paths, strict=config["gallery_source"] == "image_info")
    records = read_json(annotation_file)
    queries = [
        _query(entry, split, config["template"], images)
        for entry in entries(annotation_file, records)
    ]
    check_unique_ids(annotation_file, [query.id for query in queries])
    required = [] if images.strict else _target_images(queries, folder)
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, gallery, str(annotation_file), config, required)
    settings_record = recorded(
        config, data_root, annotation_file=annotation_file, gallery_size=len(checked.gallery)
    )
    settings_record.update(checked.counts)
    return [
        EvalTask(
            benchmark="circo",
            name=f"circo/{split}",
            split=split,
            queries=checked.queries,
            gallery=checked.gallery,
            settings=settings_record,
        )
    ]


def _gallery(data_root: Path, folder: Path, config: Mapping[str, Any]) -> tuple[Candidate, ...]:
    if config["gallery_source"] == "image_info":
        info_file = resolve_path(data_root, config["image_info_file"])
        if not info_file.is_file():
            raise BenchmarkDataError(
                f"{info_file}: COCO image-info file not found (it lists CIRCO's gallery); "
                "download image_info_unlabeled2017.json, or set gallery_source='folder' to "
                "take every image of the image folder"
            )
        return _gallery_from_info(info_file, folder)
    if not config["check_images"]:
        return ()  # annotation-only mode: the image folder is not read
    names = FolderListing().names(folder)
    ids = sorted(int(match[1]) for name in names if (match := IMAGE_NAME.match(name)))
    return tuple(Candidate(id=str(i), image=ImageRef(folder / f"{i:012d}.jpg")) for i in ids)


def _gallery_from_info(info_file: Path, folder: Path) -> tuple[Candidate, ...]:
    info = read_json(info_file, dict)
    if not isinstance(info.get("images"), list):
        raise BenchmarkDataError(f"{info_file}: missing the 'images' array")
    gallery = []
    for entry in entries(info_file, info["images"], unit="images entry"):
        image_id = entry.get("id", int)
        name = entry.optional("file_name", str) or f"{image_id:012d}.jpg"
        gallery.append(Candidate(id=str(image_id), image=ImageRef(folder / name)))
    check_unique_ids(info_file, [c.id for c in gallery], what="image id")
    return tuple(gallery)


@dataclass(frozen=True)
class _ImagesById:
    folder: Path
    paths: Mapping[str, Path]
    strict: bool

    def ref(self, entry: Entry, field_name: str, image_id: int) -> ImageRef:
        path = self.paths.get(str(image_id))
        if path is None and self.strict:
            raise entry.error(f"{field_name} {image_id} is not in the gallery (unknown id)")
        return ImageRef(path or self.folder / f"{image_id:012d}.jpg")


def _query(entry: Entry, split: str, template: str, images: _ImagesById) -> EvalQuery:
    text = template.format(
        shared_concept=entry.get("shared_concept", str),
        relative_caption=entry.get("relative_caption", str),
    )
    targets = _targets(entry) if split != "test" else []
    for target in targets:
        images.ref(entry, "gt_img_ids", target)  # a target must be rankable
    meta: dict[str, Any] = {}
    if entry.optional("semantic_aspects", list) is not None:
        meta["semantic_aspects"] = entry.items("semantic_aspects", str)
    return EvalQuery(
        id=str(entry.get("id", (int, str))),
        image=images.ref(entry, "reference_img_id", entry.get("reference_img_id", int)),
        text=text,
        targets=tuple(str(t) for t in targets),
        meta=meta,
    )


def _target_images(queries: list[EvalQuery], folder: Path) -> list[tuple[ImageRef, str]]:
    """Every ground-truth image, which must exist when the gallery is the folder's listing."""
    return [
        (ImageRef(folder / f"{int(target):012d}.jpg"), f"query {query.id!r} ground truth {target}")
        for query in queries
        for target in query.targets
    ]


def _targets(entry: Entry) -> list[int]:
    target = entry.get("target_img_id", int)
    ground_truths = entry.items("gt_img_ids", int, min_len=1)
    if ground_truths[0] != target:
        raise entry.error(f"gt_img_ids should start with target_img_id {target}")
    if len(set(ground_truths)) != len(ground_truths):
        raise entry.error(f"gt_img_ids has a repeated id: {ground_truths}")
    return ground_truths
