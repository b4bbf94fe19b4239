"""GeneCIS: conditional similarity, a reference image + condition word, ~15 candidates each.

Layout (the GeneCIS release; image folders as its config.py names them):

    {data_root}/{focus_attribute,change_attribute,focus_object,change_object}.json
    {data_root}/coco/val2017/{val_image_id:012d}.jpg          object subtasks
    {data_root}/visual_genome/VG_100K_all/{image_id}.jpg        attribute subtasks

Each entry is {reference, target, condition, gallery}; an image item is
`{"val_image_id": int}` (COCO val2017) or `{"image_id": id, "instance_bbox":
[x, y, w, h]}` (Visual Genome, cropped). As in GeneCIS' reference code, which
formats them into paths (`f"{val_img_id:012d}.jpg"`, `f"{image_id}.jpg"`), a
`val_image_id` must be an integer and an `image_id` an integer or a string of
digits (`"2373241"`, used verbatim in the path and the id); anything else is an
error naming the entry.

One task per subtask: all four are expected, and a missing file is an error
unless `allow_missing` (the others are then evaluated) or `subtasks` names the
ones to evaluate; either way the absent ones are recorded as `missing_subtasks`,
and the headline average R@1 is only given when all four are present. Candidates
are `[target] + gallery`, so the correct one is first; candidate ids are the image
id (`"{image_id}:{x},{y},{w},{h}"` for a box), made unique per query with a `#k`
suffix. Query ids are the entries' positions.

Crops follow GeneCIS' reference code: the box grows by `box_dilation` (0.7) of
its size to the left and top, `left = max(0, x - 0.7 w)`, and spans `1.7 w` by
`1.7 h` from there; whoever crops must clip it to the image (and the reference
code then pads the crop to a square with black). `box_dilation=0` keeps the box.

The query text is the subtask's template filled with the condition. `templates`
is a name of `TEMPLATE_SETS` (one template per subtask; sources in the table), a
literal template for all four, or a mapping subtask -> literal template or name
(the default set's template for the subtasks it leaves out). The default,
`megapairs`, follows the paper's description (App. C: "the text description of
the sub-task derived from the condition keyword"); the paper gives no wording and
the release has no GeneCIS query file, so the wording is ours. `bare` is the
condition word alone, which GeneCIS' own baselines encode (`caption =
sample['condition']` in its datasets/coco_dataset.py and vaw_dataset.py). Each
task's settings record its resolved `template` and `template_name`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
    unique_ids,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("val",)  # GeneCIS has one evaluation set (its reference code's "val" subsets)
SUBTASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
TEMPLATE_SETS: dict[str, dict[str, str]] = {
    # This project's wording of the MegaPairs paper's "text description of the sub-task
    # derived from the condition keyword" (App. C); no released file gives the text.
    "megapairs": {
        "focus_attribute": "focus on the {condition}",
        "change_attribute": "make it {condition}",
        "focus_object": "focus on the {condition}",
        "change_object": "add {condition}",
    },
    # The condition word alone, as GeneCIS' baselines (facebookresearch/genecis
    # datasets/coco_dataset.py and vaw_dataset.py: caption = sample['condition']).
    "bare": dict.fromkeys(SUBTASKS, "{condition}"),
}
DEFAULT_SET = "megapairs"
DIGITS = re.compile(r"[0-9]+")
TEMPLATES = TEMPLATE_SETS[DEFAULT_SET]


class Settings(LoaderSettings):
    """GeneCIS' settings (paths relative to the data root)."""

    subtasks: str | tuple[str, ...] | None = None  # None: all four (a missing file: error
    # unless allow_missing)
    annotation_file: str = "{subtask}.json"
    coco_images: str = "coco/val2017"
    vg_images: str = "visual_genome/VG_100K_all"
    box_dilation: float = 0.7
    templates: str | dict[str, str] = DEFAULT_SET  # a name of TEMPLATE_SETS, one template,
    # or subtask -> template or name


@LOADERS.register("genecis")
def load_genecis(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task per subtask, `genecis/{subtask}`, each query with its own candidates."""
    check_split("genecis", split, SPLITS)
    config = resolve_settings("genecis", Settings, settings)
    templates = _templates(config["templates"])
    config["templates"] = {subtask: template for subtask, (template, _) in templates.items()}
    config["template_names"] = {subtask: name for subtask, (_, name) in templates.items()}
    if not isinstance(config["box_dilation"], int | float) or config["box_dilation"] < 0:
        raise ValueError(f"genecis box_dilation should be >= 0, got {config['box_dilation']!r}")
    files = _subtask_files(data_root, config)
    return [_subtask_task(data_root, split, subtask, path, config) for subtask, path in files]


def _templates(given: str | Mapping[str, str]) -> dict[str, tuple[str, str | None]]:
    """Subtask -> (template, name). A string (a set's name, or a literal) applies to all
    four subtasks; a mapping names some, the others take the default set's."""
    if isinstance(given, str):
        given = dict.fromkeys(SUBTASKS, given)
    if not isinstance(given, Mapping):
        raise ValueError(f"setting 'templates' should be a name or a mapping, got {given!r}")
    unknown = sorted(set(given) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"genecis templates for unknown subtasks {unknown}; known: {SUBTASKS}")
    resolved = {}
    for subtask in SUBTASKS:
        table = {name: templates[subtask] for name, templates in TEMPLATE_SETS.items()}
        setting = f"templates.{subtask}"
        resolved[subtask] = resolve_template(setting, given.get(subtask, DEFAULT_SET), table)
        check_template(setting, resolved[subtask][0], condition="")
    return resolved


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
    template, template_name = config["templates"][subtask], config["template_names"][subtask]
    queries = [_query(entry, template, images) for entry in entries(path, read_json(path))]
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, (), str(path), config)
    settings_record = recorded(
        {**config, "subtask": subtask, "template": template, "template_name": template_name},
        data_root,
        annotation_file=path,
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
        image_id = _vg_image_id(entry, f"{name}.image_id", value["image_id"])
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


def _vg_image_id(entry: Entry, field_name: str, value: Any) -> str:
    """A Visual Genome image id as GeneCIS' code puts it in the path (`f"{image_id}.jpg"`):
    an integer, or a string of ASCII digits, kept verbatim."""
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise entry.error(
        f"field {field_name!r} should be an integer or a string of digits (a Visual Genome "
        f"image id), got {value!r:.80}"
    )


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
