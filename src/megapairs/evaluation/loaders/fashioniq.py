"""FashionIQ: relative captions over product images, one task per category.

Layout (the FashionIQ release, as MagicLens and CLIP4Cir unpack it):

    {data_root}/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    {data_root}/image_splits/split.{category}.{split}.json   a list of image names
    {data_root}/images/{name}.png

The gallery is the category's split list, the reference included (FashionIQ does
not remove it). Query ids are the entries' positions in the captions file;
targets are `(target,)`, which must be in the split list (none on test, whose
captions have no target).

The query text joins the two captions with `template`, a literal over `{0}` and
`{1}` or a name of `TEMPLATES` (sources in the table). The default, `megapairs`,
is "{0}, and {1}", the released MegaPairs query files' join; `and` ("{0} and {1}")
is MagicLens' and SEARLE's. The captions go in as released, not stripped, as in
both those files (e.g. "Is lighter with a floral pattern., and is blue with
straps"); `caption_strip` names characters to strip from both ends of each caption
first (".?, " is SEARLE's and CLIP4Cir's preprocessing). The task's settings record
the resolved `template`, its `template_name` and `caption_strip`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from megapairs.evaluation.loaders.base import (
    LOADERS,
    Entry,
    LoaderSettings,
    check_split,
    check_template,
    entries,
    read_json,
    recorded,
    resolve_path,
    resolve_settings,
    resolve_template,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("train", "val", "test")
CATEGORIES = ("dress", "shirt", "toptee")
TEMPLATES: dict[str, str] = {
    # The released MegaPairs (BGE-VL) query files, "q_text": FlagOpen/FlagEmbedding
    # research/BGE_VL/eval/data/fashioniq_{dress,shirt,toptee}_query_val.jsonl.
    "megapairs": "{0}, and {1}",
    # MagicLens: google-deepmind/magiclens data_utils.py build_fiq_dataset
    # (" and ".join(captions)); SEARLE src/validate.py fiq_generate_val_predictions.
    "and": "{0} and {1}",
}


class Settings(LoaderSettings):
    """FashionIQ's settings (paths relative to the data root)."""

    categories: str | tuple[str, ...] = CATEGORIES  # one name or several
    captions_file: str = "captions/cap.{category}.{split}.json"
    image_split_file: str = "image_splits/split.{category}.{split}.json"
    image_folder: str = "images"
    image_extension: str = ".png"
    template: str = "megapairs"  # a name of TEMPLATES or a literal template
    caption_strip: str | None = None  # None: captions as released; else characters stripped


@LOADERS.register("fashioniq")
def load_fashioniq(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task per category, `fashioniq/{category}/{split}`."""
    check_split("fashioniq", split, SPLITS)
    config = _config(settings)
    return [_category_task(data_root, split, category, config) for category in config["categories"]]


def _config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings: the template by name or literal, categories as a tuple."""
    config = resolve_settings("fashioniq", Settings, settings)
    config["template"], config["template_name"] = resolve_template(
        "template", config["template"], TEMPLATES
    )
    check_template("template", config["template"], "", "")
    strip = config["caption_strip"]
    if strip is not None and not isinstance(strip, str):
        raise ValueError(f"fashioniq caption_strip should be a string or null: {strip!r}")
    categories = config["categories"]
    if isinstance(categories, str):
        categories = config["categories"] = (categories,)
    if not categories or not set(categories) <= set(CATEGORIES):
        raise ValueError(f"fashioniq categories should be some of {CATEGORIES}, got {categories}")
    return config


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
        _query(entry, split, config, image, known, split_file)
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
    config: Mapping[str, Any],
    image: Callable[[str], ImageRef],
    known: set[str],
    split_file: Path,
) -> EvalQuery:
    captions = entry.items("captions", str, min_len=2)
    if len(captions) != 2:
        raise entry.error(f"field 'captions' should hold 2 captions, got {len(captions)}")
    if config["caption_strip"] is not None:
        captions = [caption.strip(config["caption_strip"]) for caption in captions]
    targets: tuple[str, ...] = ()
    if split != "test":
        target = entry.get("target", str)
        if target not in known:
            raise entry.error(f"target {target!r} is not in {split_file} (unknown id)")
        targets = (target,)
    return EvalQuery(
        id=str(entry.index),
        image=image(entry.get("candidate", str)),
        text=config["template"].format(*captions),
        targets=targets,
    )
