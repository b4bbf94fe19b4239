"""FashionIQ: relative captions over product images, one task per category.

Layout (the FashionIQ release, as MagicLens and CLIP4Cir unpack it):

    {data_root}/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    {data_root}/image_splits/split.{category}.{split}.json   a list of image names
    {data_root}/images/{name}.png

The gallery is the category's split list, the reference included (FashionIQ does
not remove it). The two captions are joined by `template` (default
"{0} and {1}", MagicLens' join; other work uses "{0}, and {1}"), recorded in the
task's settings. Query ids are the entries' positions in the captions file;
targets are `(target,)`, which must be in the split list (none on test, whose
captions have no target).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from megapairs.evaluation.loaders.base import (
    LOADERS,
    Entry,
    check_split,
    check_template,
    entries,
    read_json,
    recorded,
    resolve_path,
    resolve_settings,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("train", "val", "test")
CATEGORIES = ("dress", "shirt", "toptee")
DEFAULTS: dict[str, Any] = {
    "categories": CATEGORIES,
    "captions_file": "captions/cap.{category}.{split}.json",
    "image_split_file": "image_splits/split.{category}.{split}.json",
    "image_folder": "images",
    "image_extension": ".png",
    "template": "{0} and {1}",
}


@LOADERS.register("fashioniq")
def load_fashioniq(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task per category, `fashioniq/{category}/{split}`."""
    check_split("fashioniq", split, SPLITS)
    config = resolve_settings("fashioniq", DEFAULTS, settings)
    check_template("template", config["template"], "", "")
    categories = config["categories"]
    if isinstance(categories, str):
        categories = config["categories"] = (categories,)
    if not categories or not set(categories) <= set(CATEGORIES):
        raise ValueError(f"fashioniq categories should be some of {CATEGORIES}, got {categories}")
    return [_category_task(data_root, split, category, config) for category in categories]


def _category_task(
    data_root: Path, split: str, category: str, config: Mapping[str, Any]
) -> EvalTask:
    names = {"category": category, "split": split}
    captions_file = resolve_path(data_root, config["captions_file"].format(**names))
    split_file = resolve_path(data_root, config["image_split_file"].format(**names))
    folder = resolve_path(data_root, config["image_folder"])

    def image(name: str) -> ImageRef:
        return ImageRef(folder / f"{name}{config['image_extension']}")

    gallery = tuple(Candidate(id=name, image=image(name)) for name in _split_names(split_file))
    known = {candidate.id for candidate in gallery}
    queries = [
        _query(entry, split, config["template"], image, known, split_file)
        for entry in entries(captions_file, read_json(captions_file))
    ]
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, gallery, str(captions_file), config)
    settings_record = recorded(
        {**config, "category": category},
        data_root,
        annotation_file=captions_file,
        image_split_file=split_file,
        gallery_size=len(checked.gallery),
    )
    settings_record.update(checked.counts)
    return EvalTask(
        benchmark="fashioniq",
        name=f"fashioniq/{category}/{split}",
        split=split,
        queries=checked.queries,
        gallery=checked.gallery,
        settings=settings_record,
    )


def _split_names(split_file: Path) -> list[str]:
    names = read_json(split_file)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise BenchmarkDataError(f"{split_file}: entry {index} should be an image name")
    if len(set(names)) != len(names):
        raise BenchmarkDataError(f"{split_file}: an image name is listed twice")
    return names


def _query(
    entry: Entry,
    split: str,
    template: str,
    image: Callable[[str], ImageRef],
    known: set[str],
    split_file: Path,
) -> EvalQuery:
    captions = entry.items("captions", str, min_len=2)
    if len(captions) != 2:
        raise entry.error(f"field 'captions' should hold 2 captions, got {len(captions)}")
    targets: tuple[str, ...] = ()
    if split != "test":
        target = entry.get("target", str)
        if target not in known:
            raise entry.error(f"target {target!r} is not in {split_file} (unknown id)")
        targets = (target,)
    return EvalQuery(
        id=str(entry.index),
        image=image(entry.get("candidate", str)),
        text=template.format(*captions),
        targets=targets,
    )
