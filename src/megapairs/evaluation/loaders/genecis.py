"""GeneCIS: conditional similarity, a reference image + condition word, ~15 candidates each.

Layout (the GeneCIS release; image folders as its config.py names them):

    {data_root}/{focus_attribute,change_attribute,focus_object,change_object}.json
    {data_root}/coco/val2017/{val_image_id:012d}.jpg          object subtasks
    {data_root}/visual_genome/VG_100K_all/{image_id}.jpg        attribute subtasks

Each entry is {reference, target, condition, gallery}; an image item is
`{"val_image_id": int}` (COCO val2017) or `{"image_id": int, "instance_bbox":
[x, y, w, h]}` (Visual Genome, cropped). One task per subtask: all four are
expected, and a missing file is an error unless `allow_missing` (the others are
then evaluated) or `subtasks` names the ones to evaluate; either way the absent
ones are recorded as `missing_subtasks`, and the headline average R@1 is only
given when all four are present. Candidates are `[target] + gallery`, so the correct one is
first; candidate ids are the image id (`"{image_id}:{x},{y},{w},{h}"` for a box),
made unique per query with a `#k` suffix. Query ids are the entries' positions.

Crops follow GeneCIS' reference code: the box grows by `box_dilation` (0.7) of
its size to the left and top, `left = max(0, x - 0.7 w)`, and spans `1.7 w` by
`1.7 h` from there; whoever crops must clip it to the image (and the reference
code then pads the crop to a square with black). `box_dilation=0` keeps the box.

The query text is the subtask's template filled with the condition; the
templates are settings (GeneCIS' own baselines use the bare "{condition}").
"""

from __future__ import annotations

from collections.abc import Mapping
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
    unique_ids,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("val",)  # GeneCIS has one evaluation set (its reference code's "val" subsets)
SUBTASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
TEMPLATES: dict[str, str] = {
    "focus_attribute": "focus on the {condition}",
    "change_attribute": "make it {condition}",
    "focus_object": "focus on the {condition}",
    "change_object": "add {condition}",
}
DEFAULTS: dict[str, Any] = {
    "subtasks": None,  # None: all four (a missing file is an error unless allow_missing)
    "annotation_file": "{subtask}.json",
    "coco_images": "coco/val2017",
    "vg_images": "visual_genome/VG_100K_all",
    "box_dilation": 0.7,
    "templates": TEMPLATES,
}


@LOADERS.register("genecis")
def load_genecis(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task per subtask, `genecis/{subtask}`, each query with its own candidates."""
    check_split("genecis", split, SPLITS)
    config = resolve_settings("genecis", DEFAULTS, settings)
    config["templates"] = _templates(config["templates"])
    if not isinstance(config["box_dilation"], int | float) or config["box_dilation"] < 0:
        raise ValueError(f"genecis box_dilation should be >= 0, got {config['box_dilation']!r}")
    files = _subtask_files(data_root, config)
    return [_subtask_task(data_root, split, subtask, path, config) for subtask, path in files]


def _templates(given: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(given) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"genecis templates for unknown subtasks {unknown}; known: {SUBTASKS}")
    templates = {**TEMPLATES, **given}
    for subtask, template in templates.items():
        check_template(f"templates.{subtask}", template, condition="")
    return templates


def _subtask_files(data_root: Path, config: dict[str, Any]) -> list[tuple[str, Path]]:
    """The subtasks to evaluate and their files; records `missing_subtasks` in `config`.

    Without `subtasks` all four are expected: a missing file is an error (naming every
    missing one) unless `allow_missing`. Named `subtasks` are evaluated as named (a
    missing one fails when read), the others counted as missing."""

    def path(subtask: str) -> Path:
        return resolve_path(data_root, config["annotation_file"].format(subtask=subtask))

    named = config["subtasks"]
    if named is None:
        absent = [s for s in SUBTASKS if not path(s).is_file()]
        if absent and (not config["allow_missing"] or len(absent) == len(SUBTASKS)):
            raise BenchmarkDataError(
                f"{data_root}: {len(absent)} of the {len(SUBTASKS)} GeneCIS annotation files "
                f"are missing: {', '.join(str(path(s)) for s in absent)}. Pass "
                "allow_missing=True or name the `subtasks` to evaluate the others (the "
                "average R@1 needs all four)"
            )
        named = [s for s in SUBTASKS if s not in absent]
    named = (named,) if isinstance(named, str) else tuple(named)
    if not named or not set(named) <= set(SUBTASKS):
        raise ValueError(f"genecis subtasks should be some of {SUBTASKS}, got {named}")
    config["missing_subtasks"] = [s for s in SUBTASKS if s not in named]
    return [(subtask, path(subtask)) for subtask in named]  # a missing file fails when read


def _subtask_task(
    data_root: Path, split: str, subtask: str, path: Path, config: Mapping[str, Any]
) -> EvalTask:
    images = _ImageItems(
        coco=resolve_path(data_root, config["coco_images"]),
        vg=resolve_path(data_root, config["vg_images"]),
        dilation=float(config["box_dilation"]),
    )
    template = config["templates"][subtask]
    queries = [_query(entry, template, images) for entry in entries(path, read_json(path))]
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, (), str(path), config)
    settings_record = recorded(
        {**config, "subtask": subtask, "template": template}, data_root, annotation_file=path
    )
    settings_record.update(checked.counts)
    return EvalTask(
        benchmark="genecis",
        name=f"genecis/{subtask}",
        split=split,
        queries=checked.queries,
        settings=settings_record,
    )


class _ImageItems:
    """GeneCIS image items -> (id, ImageRef): COCO by `val_image_id`, Visual Genome by box."""

    def __init__(self, coco: Path, vg: Path, dilation: float) -> None:
        self.coco, self.vg, self.dilation = coco, vg, dilation

    def item(self, entry: Entry, name: str, value: Any) -> tuple[str, ImageRef]:
        if not isinstance(value, dict):
            raise entry.error(f"field {name!r} should be an image object, got {value!r:.80}")
        if "val_image_id" in value:
            image_id = entry.check(f"{name}.val_image_id", value["val_image_id"], int)
            return str(image_id), ImageRef(self.coco / f"{image_id:012d}.jpg")
        if "image_id" not in value or "instance_bbox" not in value:
            raise entry.error(
                f"field {name!r} should have 'val_image_id' or 'image_id' and 'instance_bbox'"
            )
        image_id = entry.check(f"{name}.image_id", value["image_id"], int)
        box = value["instance_bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise entry.error(f"field '{name}.instance_bbox' should be [x, y, w, h]: {box!r}")
        box_id = ",".join(f"{v:g}" for v in box)
        return f"{image_id}:{box_id}", ImageRef(self.vg / f"{image_id}.jpg", self.dilate(box))

    def dilate(self, box: list[float]) -> tuple[float, float, float, float]:
        x, y, width, height = (float(v) for v in box)
        grow = self.dilation
        left, top = max(0.0, x - grow * width), max(0.0, y - grow * height)
        return (left, top, (1 + grow) * width, (1 + grow) * height)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _query(entry: Entry, template: str, images: _ImageItems) -> EvalQuery:
    condition = entry.get("condition", str)
    _, reference = images.item(entry, "reference", entry.get("reference", dict))
    gallery = entry.items("gallery", dict, min_len=1)
    items = [images.item(entry, "target", entry.get("target", dict))]
    items += [images.item(entry, f"gallery[{i}]", item) for i, item in enumerate(gallery)]
    ids = unique_ids([image_id for image_id, _ in items])
    pairs = zip(ids, items, strict=True)
    candidates = tuple(Candidate(id=i, image=image) for i, (_, image) in pairs)
    return EvalQuery(
        id=str(entry.index),
        image=reference,
        text=template.format(condition=condition),
        targets=(candidates[0].id,),
        candidates=candidates,
        meta={"condition": condition},
    )
