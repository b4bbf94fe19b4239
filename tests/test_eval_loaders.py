"""Benchmark loaders on fixture data roots in the released formats, and on real annotation files."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import (
    CIRCO_GALLERY_IDS,
    CIRCO_IMAGES,
    CIRCO_TEXT_ENTRY,
    CIRCO_TEXTS,
    CIRR_TEXTS,
    FASHIONIQ_CATEGORIES,
    FASHIONIQ_STRIPPED,
    FASHIONIQ_TEXTS,
    GENECIS_COCO,
    GENECIS_SUBTASKS,
    GENECIS_TEXTS,
    GENECIS_VG,
    MMEB_TOKEN,
    circo_entries,
    cirr_entries,
    cirr_image_names,
    cirr_text_entry,
    fashioniq_image_names,
    fashioniq_text_entry,
    genecis_entries,
    write_circo_root,
    write_cirr_root,
    write_fashioniq_root,
    write_genecis_root,
    write_json,
    write_mmeb_root,
)

from megapairs.evaluation.benchmarks import BENCHMARKS
from megapairs.evaluation.loaders import (
    LOADERS,
    circo,
    cirr,
    fashioniq,
    genecis,
    load_benchmark,
)
from megapairs.evaluation.loaders import base as loaders_base
from megapairs.evaluation.loaders.base import resolve_template
from megapairs.evaluation.loaders.circo import PAPER_TEMPLATE
from megapairs.evaluation.loaders.mmeb import DATASETS
from megapairs.evaluation.types import BenchmarkDataError, EvalTask

REFERENCE_DATA = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
REAL_CIRCO_VAL = REFERENCE_DATA / "circo" / "val.json"
REAL_GENECIS = REFERENCE_DATA / "genecis"


def only(tasks: list[EvalTask]) -> EvalTask:
    assert len(tasks) == 1
    return tasks[0]


# --- registry and settings ----------------------------------------------------------------


def test_every_benchmark_is_registered_with_a_default_split():
    assert LOADERS.names() == ["circo", "cirr", "fashioniq", "genecis", "mmeb"]
    assert sorted(BENCHMARKS) == LOADERS.names()


def test_unknown_benchmark_setting_and_split_are_refused(tmp_path):
    root = write_circo_root(tmp_path)
    with pytest.raises(ValueError, match=r"unknown benchmark loader 'circa'"):
        load_benchmark("circa", root, "val")
    with pytest.raises(ValueError, match=r"unknown circo settings \['tempalte'\]"):
        load_benchmark("circo", root, "val", {"tempalte": "{relative_caption}"})
    with pytest.raises(ValueError, match=r"circo has no split 'train'"):
        load_benchmark("circo", root, "train")
    with pytest.raises(BenchmarkDataError, match="is not a folder"):
        load_benchmark("circo", tmp_path / "absent", "val")


def test_a_template_with_an_unknown_placeholder_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"template.*\{shared_concept\}, \{relative_caption\}"):
        load_benchmark("circo", tmp_path, "val", {"template": "find {concept}"})


# --- CIRCO ---------------------------------------------------------------------------------


def test_circo_val_ranks_the_whole_gallery_with_the_reference_kept(tmp_path):
    root = write_circo_root(tmp_path)
    task = only(load_benchmark("circo", root, "val"))
    assert (task.benchmark, task.name, task.split) == ("circo", "circo/val", "val")
    assert [c.id for c in task.gallery] == [str(i) for i in CIRCO_GALLERY_IDS]
    query = task.queries[1]
    assert query.id == "1"
    assert query.text == "Find a picture that also a teddy bear, but has two of them on a bench."
    assert query.targets == ("44", "55")
    assert query.image is not None and query.image.path == root / CIRCO_IMAGES / "000000000033.jpg"
    assert query.image.path.is_file()
    assert query.exclude == () and query.candidates == ()
    assert query.meta["semantic_aspects"] == ["cardinality", "spatial_relations_background"]
    assert "33" in {c.id for c in task.gallery}  # the reference stays rankable
    assert task.queries[2].targets == ("11", "66", "77")  # target first, then the others
    assert task.settings["template"] == PAPER_TEMPLATE  # the released query file's form
    assert task.settings["template_name"] == "megapairs"
    assert task.settings["instruction"] is None and query.instruction is None
    assert task.settings["missing_images"] == 0
    assert task.settings["gallery_size"] == len(CIRCO_GALLERY_IDS)


def test_circo_test_split_has_no_targets(tmp_path):
    task = only(load_benchmark("circo", write_circo_root(tmp_path, "test"), "test"))
    assert [q.id for q in task.queries] == ["0", "1", "2"]
    assert all(q.targets == () and q.meta == {} for q in task.queries)


def test_circo_gallery_from_the_folder_and_a_custom_template(tmp_path):
    root = write_circo_root(tmp_path, image_info=False)
    (root / CIRCO_IMAGES / "notes.txt").write_text("not an image")
    settings = {"gallery_source": "folder", "template": "{relative_caption} ({shared_concept})"}
    task = only(load_benchmark("circo", root, "val", settings))
    assert [c.id for c in task.gallery] == [str(i) for i in sorted(CIRCO_GALLERY_IDS)]
    assert task.queries[0].text == "is parked at night (a red bus)"
    assert task.settings["template"] == settings["template"]
    assert task.settings["gallery_source"] == "folder"


def test_circo_without_the_image_info_file_says_how_to_go_on(tmp_path):
    root = write_circo_root(tmp_path, image_info=False)
    with pytest.raises(BenchmarkDataError, match=r"image_info_unlabeled2017\.json.*gallery_source"):
        load_benchmark("circo", root, "val")


# --- CIRR ----------------------------------------------------------------------------------


def test_cirr_val_excludes_the_reference_and_keeps_the_subset(tmp_path):
    root = write_cirr_root(tmp_path)
    task = only(load_benchmark("cirr", root, "val"))
    names = cirr_image_names("val")
    assert task.name == "cirr/val"
    assert [c.id for c in task.gallery] == names
    query = task.queries[0]
    entry = cirr_entries("val")[0]
    assert query.id == "100"
    assert query.text == entry["caption"]
    assert query.targets == (entry["target_hard"],)
    assert query.exclude == (entry["reference"],)
    assert query.subset == tuple(m for m in entry["img_set"]["members"] if m != entry["reference"])
    assert len(query.subset) == 5 and entry["target_hard"] in query.subset
    assert query.image is not None
    assert query.image.path == root / "img_raw" / "dev" / f"{entry['reference']}.png"
    assert query.meta["target_soft"] == {entry["target_hard"]: 1.0}
    assert query.meta["img_set_id"] == 1


def test_cirr_test1_has_no_targets(tmp_path):
    task = only(load_benchmark("cirr", write_cirr_root(tmp_path, "test1"), "test1"))
    assert [q.id for q in task.queries] == ["100", "101", "102"]
    assert all(q.targets == () and len(q.exclude) == 1 for q in task.queries)


def test_cirr_images_unpacked_in_the_data_root(tmp_path):
    root = write_cirr_root(tmp_path, image_folder="")
    with pytest.raises(BenchmarkDataError, match=r"8 of 8 .*img_raw"):
        load_benchmark("cirr", root, "val")
    task = only(load_benchmark("cirr", root, "val", {"image_folder": ""}))
    assert all(c.image is not None and c.image.path.is_file() for c in task.gallery)


# --- FashionIQ -----------------------------------------------------------------------------


def test_fashioniq_one_task_per_category_with_joined_captions(tmp_path):
    tasks = load_benchmark("fashioniq", write_fashioniq_root(tmp_path), "val")
    assert [t.name for t in tasks] == [f"fashioniq/{c}/val" for c in FASHIONIQ_CATEGORIES]
    dress = tasks[0]
    names = fashioniq_image_names("dress")
    assert [c.id for c in dress.gallery] == names
    assert dress.queries[0].text == "is red, and has long sleeves"
    assert dress.queries[1].text == "is shorter, and  darker"  # captions as released
    assert dress.queries[0].targets == (names[1],)
    assert dress.queries[0].exclude == ()  # FashionIQ keeps the reference in the ranking
    assert dress.settings["template"] == "{0}, and {1}"
    assert dress.settings["template_name"] == "megapairs"
    assert dress.settings["caption_strip"] is None
    assert dress.settings["category"] == "dress"


def test_fashioniq_joiner_categories_and_extension_are_settings(tmp_path):
    root = write_fashioniq_root(tmp_path, categories=("shirt",), extension=".jpg")
    settings = {"categories": ["shirt"], "image_extension": ".jpg", "template": "and"}
    task = only(load_benchmark("fashioniq", root, "val", settings))
    assert task.name == "fashioniq/shirt/val"
    assert task.queries[0].text == "is red and has long sleeves"
    assert task.settings["template"] == "{0} and {1}"
    assert task.settings["template_name"] == "and"
    assert task.queries[0].image is not None and task.queries[0].image.path.suffix == ".jpg"


def test_fashioniq_test_split_has_no_targets(tmp_path):
    tasks = load_benchmark("fashioniq", write_fashioniq_root(tmp_path, "test"), "test")
    assert all(q.targets == () for task in tasks for q in task.queries)


# --- GeneCIS -------------------------------------------------------------------------------


def test_genecis_object_task_lists_the_target_first(tmp_path):
    root = write_genecis_root(tmp_path)
    tasks = load_benchmark("genecis", root, "val")
    assert [t.name for t in tasks] == [f"genecis/{s}" for s in GENECIS_SUBTASKS]
    task = tasks[2]
    query = task.queries[0]
    assert task.gallery == ()
    assert [c.id for c in query.candidates] == ["2", "3", "4", "5"]
    assert query.targets == ("2",)
    assert query.text == "focus on the cardboard"
    assert query.image is not None
    assert query.image.path == root / GENECIS_COCO / "000000000001.jpg"
    assert query.image.box is None
    assert tasks[3].queries[0].text == "add dog"


def test_genecis_attribute_items_are_dilated_crops(tmp_path):
    task = load_benchmark("genecis", write_genecis_root(tmp_path), "val")[0]
    query = task.queries[0]
    assert query.image is not None and query.image.path == tmp_path / GENECIS_VG / "1001.jpg"
    # [4, 6, 10, 8] grown by 0.7: left = max(0, 4 - 7) = 0, top = 6 - 5.6, size 1.7x
    assert query.image.box == pytest.approx((0.0, 0.4, 17.0, 13.6))
    target = query.candidates[0]
    assert target.id == "1002:20.5,10,12,9.5"
    assert target.image is not None
    assert target.image.box == pytest.approx((12.1, 3.35, 20.4, 16.15))
    assert [c.id for c in query.candidates[1:3]] == ["1003:0,0,6,6", "1003:20,12,8,8"]
    plain = load_benchmark("genecis", tmp_path, "val", {"box_dilation": 0})[0]
    assert plain.queries[0].image is not None
    assert plain.queries[0].image.box == (4.0, 6.0, 10.0, 8.0)


def test_genecis_candidate_ids_are_unique_per_query(tmp_path):
    task = load_benchmark("genecis", write_genecis_root(tmp_path), "val")[1]
    ids = [c.id for c in task.queries[1].candidates]
    assert ids[1:3] == ["1005:1,1,5,5", "1005:1,1,5,5#1"]
    assert all(len(set(c.id for c in q.candidates)) == len(q.candidates) for q in task.queries)


def test_genecis_image_id_may_be_a_string_of_digits(tmp_path):
    """Visual Genome ids as strings load as their integers do (GeneCIS' code formats
    either into f"{image_id}.jpg"); other strings are refused (a string val_image_id
    too, since the code formats it with :012d: test_a_field_of_the_wrong_type_is_named)."""
    root = write_genecis_root(tmp_path, subtasks=("focus_attribute",))
    entries = genecis_entries("focus_attribute")
    as_ints = only(load_benchmark("genecis", root, "val", {"subtasks": "focus_attribute"}))
    for entry in entries:
        for item in [entry["reference"], entry["target"], *entry["gallery"]]:
            item["image_id"] = str(item["image_id"])
    write_json(root / "focus_attribute.json", entries)
    assert entries[0]["target"]["image_id"] == "1002"
    as_strings = only(load_benchmark("genecis", root, "val", {"subtasks": "focus_attribute"}))
    assert as_strings.queries == as_ints.queries
    assert as_strings.queries[0].candidates[0].id == "1002:20.5,10,12,9.5"
    for bad in ("1002a", "", " 1002", "\u0661\u0660", True, 10.5):
        entries[1]["gallery"][2]["image_id"] = bad
        write_json(root / "focus_attribute.json", entries)
        with pytest.raises(
            BenchmarkDataError,
            match=r"entry 1: field 'gallery\[2\]\.image_id' should be an integer or a string "
            "of digits",
        ):
            load_benchmark("genecis", root, "val", {"subtasks": "focus_attribute"})


def test_genecis_templates_and_a_partial_root(tmp_path):
    root = write_genecis_root(tmp_path, subtasks=("change_attribute", "focus_object"))
    with pytest.raises(BenchmarkDataError, match="2 of the 4 GeneCIS annotation files") as err:
        load_benchmark("genecis", root, "val")
    assert "focus_attribute.json" in str(err.value) and "change_object.json" in str(err.value)
    settings = {
        "templates": {"change_attribute": "change the colour to {condition}"},
        "allow_missing": True,
    }
    tasks = load_benchmark("genecis", root, "val", settings)
    assert [t.name for t in tasks] == ["genecis/change_attribute", "genecis/focus_object"]
    assert tasks[0].queries[0].text == "change the colour to red"
    assert tasks[0].settings["template"] == "change the colour to {condition}"
    assert tasks[0].settings["missing_subtasks"] == ["focus_attribute", "change_object"]
    assert tasks[1].queries[0].text == "focus on the cardboard"
    assert tasks[0].queries[0].meta == {"condition": "red"}
    named = load_benchmark("genecis", root, "val", {"subtasks": ["focus_object"]})
    assert [t.name for t in named] == ["genecis/focus_object"]
    assert named[0].settings["missing_subtasks"] == [
        "focus_attribute",
        "change_attribute",
        "change_object",
    ]
    with pytest.raises(ValueError, match="unknown subtasks"):
        load_benchmark("genecis", root, "val", {"templates": {"change_colour": "{condition}"}})
    with pytest.raises(
        BenchmarkDataError, match=r"focus_attribute\.json: annotation file not found"
    ):
        load_benchmark("genecis", root, "val", {"subtasks": ["focus_attribute"]})
    full = load_benchmark("genecis", write_genecis_root(tmp_path / "full"), "val")
    assert len(full) == 4 and full[0].settings["missing_subtasks"] == []
    assert all(query.instruction is None for task in full for query in task.queries)
    told = load_benchmark("genecis", tmp_path / "full", "val", {"instruction": "Edit it."})
    assert {query.instruction for task in told for query in task.queries} == {"Edit it."}
    assert told[0].settings["instruction"] == "Edit it."


# --- query texts: the defaults and the template names ---------------------------------------


def test_circo_query_texts_by_name(tmp_path):
    root = write_circo_root(tmp_path, entries=[CIRCO_TEXT_ENTRY])
    default = only(load_benchmark("circo", root, "val"))
    assert default.queries[0].text == CIRCO_TEXTS["megapairs"]
    for name, text in CIRCO_TEXTS.items():
        task = only(load_benchmark("circo", root, "val", {"template": name}))
        assert task.queries[0].text == text
        assert task.settings["template"] == circo.TEMPLATES[name]
        assert task.settings["template_name"] == name
    assert set(CIRCO_TEXTS) == set(circo.TEMPLATES)


def test_cirr_query_text_is_the_caption_as_released(tmp_path):
    root = write_cirr_root(tmp_path, entries=[cirr_text_entry()])
    task = only(load_benchmark("cirr", root, "val"))
    assert task.queries[0].text == CIRR_TEXTS["bare"]
    assert (task.settings["template"], task.settings["template_name"]) == ("{caption}", "bare")
    assert set(CIRR_TEXTS) == set(cirr.TEMPLATES)


def test_fashioniq_query_texts_by_name_with_captions_verbatim(tmp_path):
    root = write_fashioniq_root(tmp_path, categories=("toptee",))
    write_json(root / "captions" / "cap.toptee.val.json", [fashioniq_text_entry("toptee")])
    base = {"categories": "toptee"}
    assert (
        only(load_benchmark("fashioniq", root, "val", base)).queries[0].text
        == (FASHIONIQ_TEXTS["megapairs"])
    )
    for name, text in FASHIONIQ_TEXTS.items():
        task = only(load_benchmark("fashioniq", root, "val", {**base, "template": name}))
        assert task.queries[0].text == text
        assert task.settings["template_name"] == name
    assert set(FASHIONIQ_TEXTS) == set(fashioniq.TEMPLATES)
    stripped = {**base, "template": "and", "caption_strip": ".?, "}
    task = only(load_benchmark("fashioniq", root, "val", stripped))
    assert task.queries[0].text == FASHIONIQ_STRIPPED
    assert task.settings["caption_strip"] == ".?, "
    with pytest.raises(ValueError, match="caption_strip: Input should be a valid string"):
        load_benchmark("fashioniq", root, "val", {**base, "caption_strip": True})


def test_genecis_query_texts_by_name(tmp_path):
    root = write_genecis_root(tmp_path)
    for name, texts in GENECIS_TEXTS.items():
        tasks = load_benchmark("genecis", root, "val", {"templates": name})
        assert {t.settings["subtask"]: t.queries[0].text for t in tasks} == texts
        assert {t.settings["template_name"] for t in tasks} == {name}
        assert tasks[0].settings["templates"] == genecis.TEMPLATE_SETS[name]
    assert set(GENECIS_TEXTS) == set(genecis.TEMPLATE_SETS)
    default = load_benchmark("genecis", root, "val")
    assert [t.queries[0].text for t in default] == list(GENECIS_TEXTS["megapairs"].values())
    mixed = {"change_object": "bare", "focus_object": "look at the {condition}"}
    tasks = load_benchmark("genecis", root, "val", {"templates": mixed})
    assert [t.queries[0].text for t in tasks[2:]] == ["look at the cardboard", "dog"]
    assert [t.settings["template_name"] for t in tasks] == ["megapairs", "megapairs", None, "bare"]
    every = load_benchmark("genecis", root, "val", {"templates": "the {condition}"})
    assert [t.queries[0].text for t in every] == [
        "the color",
        "the red",
        "the cardboard",
        "the dog",
    ]


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (circo, ["megapairs", "magiclens", "bare"]),
        (cirr, ["bare"]),
        (fashioniq, ["megapairs", "and"]),
    ],
)
def test_template_tables_round_trip(module, names):
    table = module.TEMPLATES
    assert list(table) == names
    assert len(set(table.values())) == len(table)  # one name per template
    for name, template in table.items():
        assert "{" in template and "{" not in name
        assert resolve_template("template", name, table) == (template, name)
        assert resolve_template("template", template, table) == (template, name)
    assert module.Settings().template == names[0]
    assert resolve_template("template", "{x} or {y}", table) == ("{x} or {y}", None)


def test_genecis_template_sets_round_trip():
    for name, templates in genecis.TEMPLATE_SETS.items():
        assert list(templates) == list(genecis.SUBTASKS)
        for subtask, template in templates.items():
            table = {n: t[subtask] for n, t in genecis.TEMPLATE_SETS.items()}
            assert resolve_template("t", template, table) == (template, name)
    assert genecis.Settings().templates == "megapairs"
    assert genecis.TEMPLATE_SETS["megapairs"] == genecis.TEMPLATES


def test_an_unknown_template_name_is_refused_with_the_names(tmp_path):
    cases = [
        ("circo", {"template": "paper"}, r"'paper' is not a template .*megapairs, magiclens, bare"),
        ("cirr", {"template": "caption"}, r"'caption' is not a template .*names: bare"),
        ("fashioniq", {"template": "comma"}, r"'comma' is not a template .*megapairs, and"),
        ("genecis", {"templates": "plain"}, r"templates\.focus_attribute.*megapairs, bare"),
        ("genecis", {"templates": {"change_object": "add"}}, r"'add' is not a template"),
    ]
    for benchmark, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            load_benchmark(benchmark, tmp_path, "val", settings)
    with pytest.raises(ValueError, match="template: Input should be a valid string"):
        load_benchmark("circo", tmp_path, "val", {"template": 3})


# --- MMEB ----------------------------------------------------------------------------------


def test_mmeb_rows_from_jsonl_and_parquet(tmp_path):
    root = write_mmeb_root(tmp_path)
    settings = {"datasets": ["ImageNet-1K", "MSCOCO_t2i"]}
    classification, retrieval = load_benchmark("mmeb", root, "test", settings)
    assert classification.name == "mmeb/ImageNet-1K"
    query = classification.queries[0]
    assert query.text == "Represent the given image for classification"
    assert query.instruction is None
    assert query.meta["raw_text"].startswith(MMEB_TOKEN)
    assert query.image is not None
    assert query.image.path == root / "images" / "ImageNet-1K" / "val_0.JPEG"
    assert [c.text for c in query.candidates] == ["tench", "goldfish", "great white shark"]
    assert all(c.image is None for c in query.candidates)
    assert query.targets == (query.candidates[0].id,)
    assert classification.settings["meta_task"] == "classification"
    assert classification.settings["distribution"] == "IND"

    first, second = retrieval.queries
    assert first.image is None and first.text is not None and first.text.endswith("A dog.")
    assert [c.text for c in first.candidates] == ["Represent the given image."] * 3
    assert first.candidates[0].image is not None
    assert first.candidates[0].image.path == root / "images" / "MSCOCO_t2i" / "a.jpg"
    # one candidate (path, text) has one id in every row it appears in
    assert second.candidates[1].id == first.candidates[0].id
    assert second.targets == (second.candidates[0].id,) != first.targets


def test_mmeb_reads_the_hugging_face_layout(tmp_path):
    root = write_mmeb_root(tmp_path, {"N24News": "hf"})
    task = only(load_benchmark("mmeb", root, "test", {"datasets": ["N24News"]}))
    assert len(task.queries) == 2
    assert task.settings["annotation_file"] == [
        str(root / "N24News" / "test-00000-of-00001.parquet")
    ]


def test_mmeb_defaults_to_all_36_and_reports_missing_datasets(tmp_path):
    root = write_mmeb_root(tmp_path)
    with pytest.raises(BenchmarkDataError, match=r"datasets not found: N24News, HatefulMemes"):
        load_benchmark("mmeb", root, "test")
    tasks = load_benchmark("mmeb", root, "test", {"allow_missing": True})
    assert [t.name for t in tasks] == ["mmeb/ImageNet-1K", "mmeb/MSCOCO_t2i"]
    assert len(tasks[0].settings["missing_datasets"]) == 34


def test_mmeb_dataset_table_matches_the_benchmark():
    assert len(DATASETS) == 36
    assert Counter(d for _, d in DATASETS.values()) == {"IND": 20, "OOD": 16}
    tasks = Counter(t for t, _ in DATASETS.values())
    assert tasks == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}


def test_mmeb_malformed_rows_name_the_file_and_row(tmp_path):
    root = write_mmeb_root(tmp_path)
    rows = [json.loads(line) for line in (root / "ImageNet-1K.jsonl").read_text().splitlines()]
    rows[1]["tgt_img_path"] = [""]
    (root / "ImageNet-1K.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkDataError, match=r"ImageNet-1K\.jsonl: line 2: tgt_text has 3"):
        load_benchmark("mmeb", root, "test", {"datasets": ["ImageNet-1K"]})
    pq.write_table(pa.table({"qry_text": ["x"]}), root / "MSCOCO_t2i.parquet")
    with pytest.raises(BenchmarkDataError, match=r"MSCOCO_t2i\.parquet: missing column"):
        load_benchmark("mmeb", root, "test", {"datasets": ["MSCOCO_t2i"]})


# --- errors that name the file and the entry -------------------------------------------------


def test_a_missing_annotation_file_is_named(tmp_path):
    root = write_cirr_root(tmp_path)
    (root / "captions" / "cap.rc2.val.json").unlink()
    with pytest.raises(BenchmarkDataError, match=r"cap\.rc2\.val\.json: annotation file not found"):
        load_benchmark("cirr", root, "val")


def test_malformed_json_names_the_file_and_line(tmp_path):
    root = write_circo_root(tmp_path)
    path = root / "annotations" / "val.json"
    path.write_text('[\n {"id": 0,\n  "reference_img_id": }\n]')
    with pytest.raises(BenchmarkDataError, match=r"val\.json: malformed JSON at line 3"):
        load_benchmark("circo", root, "val")


def test_an_entry_missing_a_field_is_named(tmp_path):
    entries = circo_entries("val")
    del entries[1]["relative_caption"]
    root = write_circo_root(tmp_path, entries=entries)
    with pytest.raises(BenchmarkDataError) as error:
        load_benchmark("circo", root, "val")
    message = str(error.value)
    assert f"{root / 'annotations' / 'val.json'}: entry 1 (id 1)" in message
    assert "missing field 'relative_caption'" in message


def test_a_field_of_the_wrong_type_is_named(tmp_path):
    entries = genecis_entries("focus_object")
    entries[1]["gallery"] = [{"val_image_id": "7"}]
    root = write_genecis_root(tmp_path, subtasks=("focus_object",))
    write_json(root / "focus_object.json", entries)
    with pytest.raises(BenchmarkDataError, match=r"entry 1: field 'gallery\[0\]\.val_image_id'"):
        load_benchmark("genecis", root, "val", {"subtasks": "focus_object"})


@pytest.mark.parametrize(
    ("benchmark", "expected"),
    [
        ("cirr", r"cap\.rc2\.val\.json: entry 0 \(pairid 100\): reference 'dev-9-9-img0' is not"),
        ("circo", r"val\.json: entry 2 \(id 2\): gt_img_ids 999 is not in the gallery"),
        ("fashioniq", r"cap\.dress\.val\.json: entry 1: target 'B00XX' is not in .*split"),
    ],
)
def test_unknown_ids_name_the_file_and_entry(tmp_path, benchmark, expected):
    if benchmark == "cirr":
        entries = cirr_entries("val")
        entries[0]["reference"] = "dev-9-9-img0"
        write_cirr_root(tmp_path, entries=entries)
    elif benchmark == "circo":
        entries = circo_entries("val")
        entries[2]["gt_img_ids"] = [11, 999]
        write_circo_root(tmp_path, entries=entries)
    else:
        write_fashioniq_root(tmp_path, categories=("dress",))
        path = tmp_path / "captions" / "cap.dress.val.json"
        captions = json.loads(path.read_text())
        captions[1]["target"] = "B00XX"
        write_json(path, captions)
    with pytest.raises(BenchmarkDataError, match=expected):
        load_benchmark(
            benchmark,
            tmp_path,
            "val",
            {"categories": ["dress"]} if benchmark == "fashioniq" else {},
        )


def test_a_missing_image_names_the_file_entry_and_path(tmp_path):
    root = write_cirr_root(tmp_path)
    image = root / "img_raw" / "dev" / f"{cirr_image_names('val')[6]}.png"
    image.unlink()
    with pytest.raises(BenchmarkDataError) as error:
        load_benchmark("cirr", root, "val")
    message = str(error.value)
    assert message.startswith(f"{root / 'captions' / 'cap.rc2.val.json'}: 1 of 8 ")
    assert f"{image} (query '102' reference image)" in message
    assert "allow_missing" in message


def test_a_partial_data_root_is_reported_not_evaluated_on_a_subset(tmp_path):
    root = write_circo_root(tmp_path)
    for image_id in (66, 88):  # a ground truth and an image no annotation refers to
        (root / CIRCO_IMAGES / f"{image_id:012d}.jpg").unlink()
    with pytest.raises(BenchmarkDataError, match=r"2 of 8 referenced image files are missing"):
        load_benchmark("circo", root, "val")
    task = only(load_benchmark("circo", root, "val", {"allow_missing": True}))
    assert [c.id for c in task.gallery] == ["11", "22", "33", "44", "55", "77"]
    assert task.settings["missing_images"] == 2
    assert task.settings["dropped_gallery"] == 2
    assert task.settings["dropped_queries"] == 0
    assert task.queries[2].targets == ("11", "66", "77")  # a missing target stays a miss


def test_a_folder_listed_gallery_still_needs_every_ground_truth(tmp_path):
    root = write_circo_root(tmp_path, image_info=False)
    (root / CIRCO_IMAGES / "000000000044.jpg").unlink()
    with pytest.raises(
        BenchmarkDataError, match=r"000000000044\.jpg \(query '1' ground truth 44\)"
    ):
        load_benchmark("circo", root, "val", {"gallery_source": "folder"})


def test_allow_missing_drops_candidates_and_queries_it_cannot_evaluate(tmp_path):
    root = write_genecis_root(tmp_path, subtasks=("focus_object",))
    (root / GENECIS_COCO / "000000000004.jpg").unlink()  # a gallery image of query 0
    (root / GENECIS_COCO / "000000000006.jpg").unlink()  # the target of query 1
    task = only(load_benchmark("genecis", root, "val", {"allow_missing": True}))
    assert [q.id for q in task.queries] == ["0"]
    assert [c.id for c in task.queries[0].candidates] == ["2", "3", "5"]
    assert task.settings["missing_images"] == 2
    assert task.settings["dropped_queries"] == 1
    assert task.settings["dropped_candidates"] == 1


def test_an_absent_image_folder_is_named(tmp_path):
    root = write_fashioniq_root(tmp_path, categories=("toptee",))
    for path in (root / "images").iterdir():
        path.unlink()
    (root / "images").rmdir()
    with pytest.raises(BenchmarkDataError, match=r"4 of 4 .*folder\(s\) not found: .*images"):
        load_benchmark("fashioniq", root, "val", {"categories": ["toptee"]})
    task = only(
        load_benchmark("fashioniq", root, "val", {"categories": ["toptee"], "check_images": False})
    )
    assert task.settings["missing_images"] is None and len(task.queries) == 2


def test_image_existence_takes_one_listing_per_folder(tmp_path, monkeypatch):
    root = write_circo_root(tmp_path)
    calls = []
    scandir = os.scandir

    def counting_scandir(path):
        calls.append(Path(path))
        return scandir(path)

    monkeypatch.setattr(loaders_base.os, "scandir", counting_scandir)
    load_benchmark("circo", root, "val")
    assert calls == [root / CIRCO_IMAGES]


# --- the real annotation files, when present -------------------------------------------------


@pytest.mark.skipif(not REAL_CIRCO_VAL.is_file(), reason="CIRCO val.json not in ../shared")
def test_real_circo_val_parses_every_query(tmp_path):
    settings = {
        "annotation_file": str(REAL_CIRCO_VAL),
        "check_images": False,
        "gallery_source": "folder",
    }
    task = only(load_benchmark("circo", tmp_path, "val", settings))
    raw = json.loads(REAL_CIRCO_VAL.read_text())
    assert len(task.queries) == len(raw) == 220
    for query, entry in zip(task.queries, raw, strict=True):
        assert query.id == str(entry["id"])
        assert query.targets == tuple(str(i) for i in entry["gt_img_ids"])
        assert query.targets[0] == str(entry["target_img_id"])
        concept, caption = entry["shared_concept"], entry["relative_caption"]
        assert query.text == f"Find a picture that also {concept}, but {caption}."
        assert query.image is not None
        assert query.image.path.name == f"{entry['reference_img_id']:012d}.jpg"
        assert query.meta["semantic_aspects"] == entry["semantic_aspects"]
    assert task.gallery == () and task.settings["missing_images"] is None


@pytest.mark.skipif(not (REAL_GENECIS / "focus_object.json").is_file(), reason="GeneCIS absent")
def test_real_genecis_focus_object_parses_every_query():
    settings = {"check_images": False, "subtasks": ["focus_object"]}
    task = only(load_benchmark("genecis", REAL_GENECIS, "val", settings))
    assert task.settings["missing_subtasks"] == [
        "focus_attribute",
        "change_attribute",
        "change_object",
    ]
    raw = json.loads((REAL_GENECIS / "focus_object.json").read_text())
    assert task.name == "genecis/focus_object"
    assert len(task.queries) == len(raw) == 1960
    for query, entry in zip(task.queries, raw, strict=True):
        ids = [c.id for c in query.candidates]
        assert len(ids) == len(set(ids)) == 1 + len(entry["gallery"])
        assert ids[0] == str(entry["target"]["val_image_id"]) == query.targets[0]
        assert ids[1:] == [str(item["val_image_id"]) for item in entry["gallery"]]
        assert query.text == f"focus on the {entry['condition']}"
        assert query.image is not None
        assert query.image.path.name == f"{entry['reference']['val_image_id']:012d}.jpg"


@pytest.mark.skipif(not (REAL_GENECIS / "focus_object.json").is_file(), reason="GeneCIS absent")
def test_real_genecis_without_its_images_is_reported():
    with pytest.raises(BenchmarkDataError, match="3 of the 4 GeneCIS annotation files"):
        load_benchmark("genecis", REAL_GENECIS, "val", {"check_images": False})
    with pytest.raises(BenchmarkDataError) as error:
        load_benchmark("genecis", REAL_GENECIS, "val", {"allow_missing": False, "subtasks": None})
    assert "change_object.json" in str(error.value)
    with pytest.raises(BenchmarkDataError) as error:
        load_benchmark("genecis", REAL_GENECIS, "val", {"subtasks": "focus_object"})
    message = str(error.value)
    assert "of 2198 referenced image files are missing" in message
    assert f"folder(s) not found: {REAL_GENECIS / 'coco' / 'val2017'}" in message
