"""CIRR: composed queries over NLVR2 images, one target each, with a 6-image subset per query.

Layout (the CIRR repository's):

    {data_root}/captions/cap.rc2.{train,val,test1}.json
    {data_root}/image_splits/split.rc2.{split}.json   image name -> "./dev/dev-1-0-img0.png"
    {data_root}/img_raw/dev/dev-1-0-img0.png            paths relative to `image_folder`

Some codebases (CLIP4Cir) unpack the image folders into the data root itself: set
`image_folder=""` then. The gallery is every image of the split file; query ids
are the `pairid`s; `exclude` is the reference (CIRR removes it from the ranking);
`subset` is `img_set.members` without the reference, so Recall_subset ranks the
other five members; targets are `(target_hard,)` (none on test1). A reference,
target or member that is not in the split's image list is an unknown id.

The query text is the relative caption itself (`template` "bare", "{caption}"): the
CIRR release pairs the reference image with `caption` and defines no other text;
SEARLE feeds the caption as given (after its pseudo-word prefix, which needs its
token), and the released MegaPairs evaluation data (FlagEmbedding
research/BGE_VL/eval/data) has no CIRR query file that would differ.
`template` may be a name of `TEMPLATES` or a literal over `{caption}`; the task's
settings record the resolved `template` and its `template_name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megapairs.evaluation.loaders.base import (
    LOADERS,
    Entry,
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
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("train", "val", "test1")
TEMPLATES: dict[str, str] = {
    # The relative caption as released (Cuberick-Orion/CIRR captions/cap.rc2.*.json,
    # "caption"); SEARLE src/validate.py cirr_generate_val_predictions uses it as is.
    "bare": "{caption}",
}


class Settings(LoaderSettings):
    """CIRR's settings (paths relative to the data root)."""

    version: str = "rc2"
    captions_file: str = "captions/cap.{version}.{split}.json"
    image_split_file: str = "image_splits/split.{version}.{split}.json"
    image_folder: str = "img_raw"
    template: str = "bare"  # a name of TEMPLATES or a literal template


@LOADERS.register("cirr")
def load_cirr(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task, `cirr/{split}`, ranked against the split's images minus the reference."""
    check_split("cirr", split, SPLITS)
    config = resolve_settings("cirr", Settings, settings)
    config["template"], config["template_name"] = resolve_template(
        "template", config["template"], TEMPLATES
    )
    check_template("template", config["template"], caption="")
    names = {"version": config["version"], "split": split}
    captions_file = resolve_path(data_root, config["captions_file"].format(**names))
    split_file = resolve_path(data_root, config["image_split_file"].format(**names))
    gallery = _gallery(split_file, resolve_path(data_root, config["image_folder"]))
    paths = {candidate.id: candidate.image for candidate in gallery}
    queries = [
        _query(entry, split, config["template"], paths, split_file)
        for entry in entries(captions_file, read_json(captions_file))
    ]
    check_unique_ids(captions_file, [query.id for query in queries], what="pairid")
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, gallery, str(captions_file), config)
    settings_record = recorded(
        config,
        data_root,
        annotation_file=captions_file,
        image_split_file=split_file,
        gallery_size=len(checked.gallery),
    )
    settings_record.update(checked.counts)
    task = EvalTask(
        benchmark="cirr",
        name=f"cirr/{split}",
        split=split,
        queries=checked.queries,
        gallery=checked.gallery,
        settings=settings_record,
    )
    return [task]


def _gallery(split_file: Path, folder: Path) -> tuple[Candidate, ...]:
    relative_paths = read_json(split_file, dict)
    gallery = []
    for name, relative in relative_paths.items():
        if not isinstance(relative, str) or not relative:
            raise BenchmarkDataError(
                f"{split_file}: image {name!r} should map to a relative path, got {relative!r}"
            )
        gallery.append(Candidate(id=name, image=ImageRef(folder / relative)))
    return tuple(gallery)


def _query(
    entry: Entry,
    split: str,
    template: str,
    paths: Mapping[str, ImageRef | None],
    split_file: Path,
) -> EvalQuery:
    def known(field_name: str, name: str) -> str:
        if name not in paths:
            raise entry.error(f"{field_name} {name!r} is not in {split_file} (unknown id)")
        return name

    reference = known("reference", entry.get("reference", str))
    image_set = entry.get("img_set", dict)
    members = image_set.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise entry.error(f"field 'img_set.members' should be a list of image names: {members!r}")
    subset = tuple(known("img_set.members", m) for m in members if m != reference)
    targets = () if split == "test1" else (known("target_hard", entry.get("target_hard", str)),)
    meta: dict[str, Any] = {"img_set_id": image_set.get("id")}
    if isinstance(entry.data.get("target_soft"), dict):
        meta["target_soft"] = entry.data["target_soft"]
    return EvalQuery(
        id=str(entry.get("pairid", (int, str))),
        image=paths[reference],
        text=template.format(caption=entry.get("caption", str)),
        targets=targets,
        exclude=(reference,),
        subset=subset,
        meta=meta,
    )
