"""The evaluator end to end on fixture data roots: exact metrics with a deterministic fake
retriever, and the tiny random CLIP through `build_retriever` (results, submissions, table)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import (
    CIRCO_GALLERY_IDS,
    CIRCO_IMAGE_INFO,
    CIRCO_IMAGES,
    CIRR_FOLDERS,
    GENECIS_COCO,
    GENECIS_VG,
    GENECIS_VG_SIZE,
    cirr_image_names,
    fashioniq_image_names,
    write_circo_root,
    write_cirr_root,
    write_fashioniq_root,
    write_genecis_root,
    write_mmeb_root,
)
from eval_fixtures import write_json as write_fixture_json
from PIL import Image
from tiny_models import Tiny

from megapairs.evaluation.cache import ImageDecodeError
from megapairs.evaluation.command import (
    evaluate_all,
    parse_settings,
    plan_benchmarks,
    retriever_placement,
    run_eval_command,
)
from megapairs.evaluation.evaluator import BENCHMARKS, TaskOutput, evaluate, results_path
from megapairs.evaluation.loaders.circo import PAPER_TEMPLATE
from megapairs.evaluation.submissions import (
    validate_circo_submission,
    validate_cirr_recall_submission,
    validate_cirr_subset_submission,
)
from megapairs.evaluation.tables import PAPER_TABLE1, details_markdown, table1_markdown
from megapairs.evaluation.types import EvalQuery, EvalTask
from megapairs.models.base import Retriever, build_retriever

# A fake retriever over six hues: an image is its hue (nearest of these directions of its
# mean colour) plus its brightness; a text is the hue its first known keyword names.
HUES = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "magenta": (1, 0, 1),
    "cyan": (0, 1, 1),
}
HUE_NAMES = list(HUES)
DIM = len(HUES) + 1  # the last component: brightness (images), a constant (queries)


def hue_vector(name: str) -> np.ndarray:
    vector = np.zeros(DIM, np.float32)
    vector[HUE_NAMES.index(name)] = 1
    return vector


def image_hue(image: Image.Image) -> tuple[str, float]:
    mean = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3).mean(0)
    brightness = mean.max() / 255
    direction = mean / max(mean.max(), 1e-9)
    name = min(HUES, key=lambda hue: float(np.sum((direction - HUES[hue]) ** 2)))
    return name, float(brightness)


class ColourRetriever:
    """Deterministic scores, so rankings are known by hand: a query scores an image by hue
    (1 for the hue its text names, 0.5 for its reference image's hue), then brightness
    (a brighter image ranks first among images of one hue class)."""

    name = "colour-fake"

    def __init__(self, keywords: Mapping[str, str]) -> None:
        self.keywords = dict(keywords)

    def encode_queries(
        self,
        images: list[Image.Image] | None,
        texts: list[str] | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        count = len(images) if images is not None else len(texts or [])
        rows = np.zeros((count, DIM), np.float32)
        rows[:, -1] = 0.2
        for row, text in enumerate(texts or []):
            rows[row] += self._text(text)
        for row, image in enumerate(images or []):
            rows[row] += 0.5 * hue_vector(image_hue(image)[0])
        return _unit(rows)

    def encode_candidates(
        self, images: list[Image.Image] | None, texts: list[str] | None
    ) -> torch.Tensor:
        count = len(images) if images is not None else len(texts or [])
        rows = np.zeros((count, DIM), np.float32)
        for row, image in enumerate(images or []):
            hue, brightness = image_hue(image)
            rows[row] += hue_vector(hue)
            rows[row, -1] += 0.1 * brightness
        for row, text in enumerate(texts or []):
            rows[row] += self._text(text)
        rows[np.abs(rows).sum(1) == 0, -1] = 1
        return _unit(rows)

    def _text(self, text: str) -> np.ndarray:
        for word in text.lower().replace(".", " ").replace(",", " ").split():
            if word in self.keywords:
                return hue_vector(self.keywords[word])
        return np.zeros(DIM, np.float32)


def _unit(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True))


def paint(path: Path, hue: str, brightness: float = 1.0, size: tuple[int, int] = (8, 6)) -> None:
    colour = tuple(round(255 * brightness * c) for c in HUES[hue])
    Image.new("RGB", size, colour).save(path, quality=95)


def test_fake_retriever_is_a_retriever() -> None:
    assert isinstance(ColourRetriever({}), Retriever)


# CIRCO ---------------------------------------------------------------------------------

CIRCO_COLOURS = {
    11: ("blue", 0.9),
    22: ("red", 1.0),
    33: ("yellow", 0.5),
    44: ("green", 1.0),
    55: ("green", 0.8),
    66: ("blue", 0.6),
    77: ("blue", 0.7),
    88: ("magenta", 0.4),
}


@pytest.fixture(scope="module")
def circo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_circo_root(tmp_path_factory.mktemp("circo"))
    for image_id, (hue, brightness) in CIRCO_COLOURS.items():
        paint(root / CIRCO_IMAGES / f"{image_id:012d}.jpg", hue, brightness)
    return root


def test_circo_perfect_retrieval_scores_one(circo_root: Path, tmp_path: Path) -> None:
    """Each query's text names its ground truths' hue: every mAP@k and Recall@k is 1."""
    fake = ColourRetriever({"bus": "red", "teddy": "green", "street": "blue"})
    result = evaluate("circo", fake, "fake", circo_root, "val", cache_dir=tmp_path / "cache")
    for k in (5, 10, 25, 50):
        assert result.metrics[f"mAP@{k}"] == pytest.approx(1.0)
        assert result.metrics[f"Recall@{k}"] == pytest.approx(1.0)


def test_circo_metrics_match_a_hand_ranking(circo_root: Path, tmp_path: Path) -> None:
    """Query 2 asks for yellow; its ground truths (blue: 11, 66, 77) then rank 5, 6, 7 behind
    33 (yellow), 44 and 55 (its reference's green) and 22 (brightest of the rest)."""
    fake = ColourRetriever({"bus": "red", "teddy": "green", "street": "yellow"})
    result = evaluate("circo", fake, "fake", circo_root, "val", output=tmp_path)
    ap5 = (1 / 5) / 3
    ap10 = (1 / 5 + 2 / 6 + 3 / 7) / 3
    assert result.metrics["mAP@5"] == pytest.approx((2 + ap5) / 3)
    assert result.metrics["mAP@10"] == pytest.approx((2 + ap10) / 3)
    assert result.metrics["mAP@50"] == pytest.approx((2 + ap10) / 3)
    assert result.metrics["Recall@5"] == pytest.approx(1.0)  # query 2's target 11 is 5th
    assert result.metrics["mAP@10/aspect/cardinality"] == pytest.approx(1.0)
    record = json.loads((tmp_path / "circo-val.json").read_text())
    assert record["metrics"] == pytest.approx(result.metrics)
    counts = {"tasks": 1, "queries": 3, "queries_in_split": 3, "gallery": 8, "candidates": 0}
    counts["encoded_queries"] = 3
    counts["undecodable_images"] = 0
    assert record["counts"] == counts
    assert record["cache"]["dir"] is None and record["cache"]["encoded_rows"] == 8
    assert record["tasks"][0]["settings"]["template"] == PAPER_TEMPLATE


# CIRR ----------------------------------------------------------------------------------

CIRR_COLOURS = [
    ("red", 1.0),
    ("yellow", 0.5),
    ("red", 0.5),
    ("magenta", 0.8),
    ("green", 0.9),
    ("blue", 0.6),
    ("blue", 0.9),
    ("green", 0.7),
]


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_cirr_root(tmp_path_factory.mktemp("cirr"))
    for name, (hue, brightness) in zip(cirr_image_names("val"), CIRR_COLOURS, strict=True):
        paint(root / "img_raw" / "dev" / f"{name}.png", hue, brightness)
    return root


def test_cirr_removes_the_reference_and_ranks_subsets(cirr_root: Path) -> None:
    """Pair 100's reference (red, brightest) would rank first: removed, its red target wins.
    Pairs 101 and 102 lose R@1 to a brighter image of the named hue; in its subset 101's
    target is the only blue member (Rs@1 hit), 102's is second behind a green member."""
    fake = ColourRetriever({"dogs": "red", "night": "blue", "people": "green"})
    result = evaluate("cirr", fake, "fake", cirr_root, "val")
    assert result.metrics["Recall@1"] == pytest.approx(1 / 3)
    assert result.metrics["Recall@5"] == pytest.approx(1.0)
    assert result.metrics["Recall@50"] == pytest.approx(1.0)
    assert result.metrics["Recall_subset@1"] == pytest.approx(2 / 3)
    assert result.metrics["Recall_subset@2"] == pytest.approx(1.0)


# FashionIQ, GeneCIS, MMEB ----------------------------------------------------------------


def test_fashioniq_perfect_retrieval(tmp_path: Path) -> None:
    root = write_fashioniq_root(tmp_path / "fiq", categories=("dress", "shirt"))
    for category in ("dress", "shirt"):
        names = fashioniq_image_names(category)
        for name, hue in zip(names, ["cyan", "red", "yellow", "blue"], strict=True):
            paint(root / "images" / f"{name}.png", hue)
    fake = ColourRetriever({"red": "red", "darker": "blue"})
    settings = {"categories": ["dress", "shirt"], "template": "{0}, and {1}"}
    result = evaluate("fashioniq", fake, "fake", root, "val", settings, output=tmp_path / "out")
    assert result.metrics["dress/R@10"] == 1.0 and result.metrics["average/R@50"] == 1.0
    tasks = result.record["tasks"]
    assert [t["label"] for t in tasks] == ["dress", "shirt"]
    assert tasks[0]["settings"]["template"] == "{0}, and {1}"
    assert result.record["settings"] == settings


def _paint_box(image: Image.Image, box: tuple[int, int, int, int], hue: str) -> None:
    x, y, width, height = box
    colour = tuple(255 * c for c in HUES[hue])
    image.paste(Image.new("RGB", (width, height), colour), (x, y))


@pytest.fixture(scope="module")
def genecis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Object images are plain hues; Visual Genome images have a background hue that only a
    retriever ignoring the crop box would see."""
    root = write_genecis_root(
        tmp_path_factory.mktemp("genecis"), ("focus_object", "change_attribute")
    )
    coco = {
        1: "blue",
        2: "red",
        3: "green",
        4: "yellow",
        5: "magenta",
        6: "red",
        7: "red",
        8: "cyan",
    }
    dims = {2: 0.8, 6: 0.5, 7: 0.9}
    for image_id, hue in coco.items():
        paint(root / GENECIS_COCO / f"{image_id:012d}.jpg", hue, dims.get(image_id, 1.0))
    boxes = {
        1001: ("red", [((4, 6, 10, 8), "yellow")]),
        1002: ("blue", [((20, 10, 13, 10), "red")]),
        1003: ("red", [((0, 0, 6, 6), "green"), ((20, 12, 8, 8), "yellow")]),
        1004: ("cyan", []),
        1005: ("red", [((1, 1, 5, 5), "magenta")]),
        1006: ("green", [((3, 4, 5, 6), "red")]),
    }
    for image_id, (background, regions) in boxes.items():
        image = Image.new("RGB", GENECIS_VG_SIZE, tuple(255 * c for c in HUES[background]))
        for box, hue in regions:
            _paint_box(image, box, hue)
        image.save(root / GENECIS_VG / f"{image_id}.jpg", quality=95)
    return root


def test_genecis_scores_candidates_of_cropped_boxes(genecis_root: Path, tmp_path: Path) -> None:
    """focus_object: query 0's red target is the only red candidate (hit); query 1's red
    target is dimmer than a red distractor (rank 2). change_attribute: the red boxes win
    only because crops are applied (the distractors' backgrounds are bright red)."""
    fake = ColourRetriever({"cardboard": "red", "red": "red"})
    settings = {"box_dilation": 0, "allow_missing": True}  # two of the four subtasks
    result = evaluate("genecis", fake, "fake", genecis_root, "val", settings, tmp_path / "c")
    assert result.metrics["focus_object/Recall@1"] == pytest.approx(0.5)
    assert result.metrics["focus_object/Recall@2"] == pytest.approx(1.0)
    assert result.metrics["change_attribute/Recall@1"] == pytest.approx(1.0)
    assert "average/Recall@1" not in result.metrics  # needs all four subtasks
    assert result.metrics["missing_subtasks"] == ["focus_attribute", "change_object"]
    assert "focus_attribute, change_object missing" in result.metrics["average_note"]
    assert result.record["tasks"][0]["settings"]["missing_subtasks"] == [
        "focus_attribute",
        "change_object",
    ]
    ours = table1_markdown({"fake": {"genecis": result.record}}).splitlines()[-3]
    assert ours.startswith("| ours: fake |") and ours.endswith("| \u2013 |")
    lookups = result.record["cache"]["lookups"]
    assert [entry["name"] for entry in lookups] == [
        "genecis/change_attribute/candidates",
        "genecis/focus_object/candidates",
    ]
    # change_attribute lists 1005's box twice in one gallery: encoded once
    assert lookups[0]["rows"] == 8 - 1


def test_mmeb_text_and_image_candidates(tmp_path: Path) -> None:
    root = write_mmeb_root(tmp_path / "mmeb")
    for index, hue in enumerate(["red", "yellow"]):
        paint(root / "images" / "ImageNet-1K" / f"val_{index}.JPEG", hue)
    for name, hue in zip("abc", ["green", "blue", "magenta"], strict=True):
        paint(root / "images" / "MSCOCO_t2i" / f"{name}.jpg", hue)
    keywords = {
        "tench": "red",
        "goldfish": "yellow",
        "shark": "blue",
        "dog": "green",
        "cat": "magenta",
    }
    settings = {"datasets": ["ImageNet-1K", "MSCOCO_t2i"]}
    result = evaluate("mmeb", ColourRetriever(keywords), "fake", root, "test", settings)
    assert result.metrics["ImageNet-1K/Precision@1"] == 1.0
    assert result.metrics["MSCOCO_t2i/Precision@1"] == 1.0
    assert result.metrics["overall/Precision@1"] == 1.0
    assert len(result.metrics["missing_datasets"]) == 34
    wrong = {**keywords, "tench": "yellow", "goldfish": "red"}  # swaps both labels
    result = evaluate("mmeb", ColourRetriever(wrong), "fake", root, "test", settings)
    assert result.metrics["ImageNet-1K/Precision@1"] == 0.0
    assert result.metrics["overall/Precision@1"] == pytest.approx(0.5)


# the tiny CLIP, end to end ----------------------------------------------------------------


def _extend_circo_gallery(root: Path, extra: int = 50) -> None:
    """Add `extra` gallery images so a submission's top 50 exists."""
    ids = [*CIRCO_GALLERY_IDS, *range(1000, 1000 + extra)]
    info = json.loads((root / CIRCO_IMAGE_INFO).read_text())
    info["images"] = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    write_fixture_json(root / CIRCO_IMAGE_INFO, info)
    for i in ids[len(CIRCO_GALLERY_IDS) :]:
        paint(root / CIRCO_IMAGES / f"{i:012d}.jpg", HUE_NAMES[i % 6], 0.3 + (i % 7) / 10)


def _extend_cirr_gallery(root: Path, split: str, extra: int = 50) -> None:
    split_file = root / "image_splits" / f"split.rc2.{split}.json"
    relative = json.loads(split_file.read_text())
    folder = CIRR_FOLDERS[split]
    for i in range(extra):
        name = f"{split}-9{i}-0-img0"
        relative[name] = f"./{folder}/{name}.png"
        paint(root / "img_raw" / folder / f"{name}.png", HUE_NAMES[i % 6], 0.3 + (i % 7) / 10)
    write_fixture_json(split_file, relative)


@pytest.fixture(scope="module")
def tiny_roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/circo (val + test) and <root>/cirr (val + test1) with 58 images each."""
    root = tmp_path_factory.mktemp("roots")
    write_circo_root(root / "circo", "val")
    write_circo_root(root / "circo", "test")
    _extend_circo_gallery(root / "circo")
    for split in ("val", "test1"):
        write_cirr_root(root / "cirr", split)
        _extend_cirr_gallery(root / "cirr", split)
    return root


def test_tiny_clip_test_splits_write_valid_submissions(
    tiny_clip: Tiny, tiny_roots: Path, tmp_path: Path
) -> None:
    retriever = build_retriever("clip", str(tiny_clip.path))
    output = tmp_path / "out"
    circo = evaluate("circo", retriever, "tiny", tiny_roots / "circo", "test", output=output)
    cirr = evaluate("cirr", retriever, "tiny", tiny_roots / "cirr", "test1", output=output)
    assert circo.metrics == {} and cirr.metrics == {}
    (circo_file,) = circo.submission_paths
    submission = json.loads(circo_file.read_text())
    validate_circo_submission(submission, ["0", "1", "2"])
    assert all(len(ids) == 50 for ids in submission.values())
    recall_file, subset_file = cirr.submission_paths
    queries = [EvalQuery(id=str(i), image=None, text="") for i in (100, 101, 102)]
    names = cirr_image_names("test1")
    members = {"100": names[:6], "101": names[:6], "102": names[2:]}
    references = {"100": names[0], "101": names[3], "102": names[6]}
    queries = [
        EvalQuery(
            id=q.id,
            image=None,
            text="",
            exclude=(references[q.id],),
            subset=tuple(m for m in members[q.id] if m != references[q.id]),
        )
        for q in queries
    ]
    validate_cirr_recall_submission(json.loads(recall_file.read_text()), queries)
    validate_cirr_subset_submission(json.loads(subset_file.read_text()), queries)
    record = json.loads(results_path(output, "cirr", "test1").read_text())
    assert record["ground_truth"] is False
    assert record["submissions"] == [str(recall_file), str(subset_file)]


def test_run_eval_command_all(tiny_clip: Tiny, tiny_roots: Path, tmp_path: Path) -> None:
    """`--benchmark all` over a root holding circo and cirr: the others are skipped and
    said so; results JSON, table.md with the paper's rows; a second run hits the cache."""
    lines: list[str] = []
    output, cache = tmp_path / "out", tmp_path / "cache"
    kwargs = {
        "model": str(tiny_clip.path),
        "kind": "clip",
        "data_root": tiny_roots,
        "output": output,
        "cache_dir": cache,
        "overrides": ["circo.template=find {relative_caption}"],
        "progress": False,
        "echo": lines.append,
    }
    assert run_eval_command("all", **kwargs) == 0
    assert any("skipping fashioniq" in line for line in lines)
    record = json.loads((output / "circo-val.json").read_text())
    assert record["model"]["kind"] == "clip" and record["model"]["path"] == str(tiny_clip.path)
    assert record["model"]["key"].startswith(str(tiny_clip.path.resolve()) + "@")
    placement = {"device": "cpu", "dtype": "float32"}  # `auto` resolved (no GPU here)
    assert record["model"]["options"] == placement
    assert record["model"]["key"].endswith("?" + json.dumps(placement, sort_keys=True))
    assert record["retriever"] == f"clip:{tiny_clip.path}"
    assert record["settings"] == {"template": "find {relative_caption}"}
    assert record["tasks"][0]["settings"]["template"] == "find {relative_caption}"
    assert set(record["metrics"]) >= {"mAP@5", "mAP@50", "Recall@10"}
    assert all(0 <= v <= 1 for v in record["metrics"].values())
    for key in ("started", "finished", "versions", "counts", "cache", "search"):
        assert key in record
    assert record["cache"]["misses"] == 1 and record["cache"]["hits"] == 0
    table = (output / "table.md").read_text()
    for row in PAPER_TABLE1:
        assert f"| {row.model} | {row.backbone} |" in table
    ours = next(
        line for line in table.splitlines() if line.startswith(f"| ours: {tiny_clip.path.name}")
    )
    assert ours.endswith("| \u2013 | \u2013 |")  # FashionIQ and GeneCIS were skipped
    single = kwargs | {"overrides": [], "data_root": tiny_roots / "cirr"}
    assert run_eval_command("cirr", **single) == 0
    record = json.loads((output / "cirr-val.json").read_text())
    assert record["cache"]["hits"] == 1 and record["cache"]["encoded_rows"] == 0


def test_evaluate_all_skips_absent_roots(circo_root: Path, tmp_path: Path) -> None:
    said: list[str] = []
    fake = ColourRetriever({"bus": "red"})
    roots = {"circo": circo_root, "cirr": tmp_path / "nowhere"}
    results = evaluate_all(fake, "fake", roots, log=said.append)
    assert list(results) == ["circo"]
    assert said[0] == f"skipping cirr: {tmp_path / 'nowhere'} does not exist"
    assert said[1:] == [
        f"skipping {name}: no data root given" for name in ("fashioniq", "genecis", "mmeb")
    ]


def test_hidden_split_needs_an_output_folder(tiny_roots: Path) -> None:
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate("circo", ColourRetriever({}), "fake", tiny_roots / "circo", "test")


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        evaluate("nope", ColourRetriever({}), "fake", tmp_path, "val")


def test_parse_settings() -> None:
    assert parse_settings(["template={0} and {1}", "check_images=false"], ["fashioniq"]) == {
        "fashioniq": {"template": "{0} and {1}", "check_images": False}
    }
    parsed = parse_settings(["circo.template=x", 'mmeb.datasets=["CIRR"]'], ["circo", "mmeb"])
    assert parsed == {"circo": {"template": "x"}, "mmeb": {"datasets": ["CIRR"]}}
    with pytest.raises(ValueError, match="name the benchmark"):
        parse_settings(["template=x"], ["circo", "cirr"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["template"], ["circo"])


def test_tables() -> None:
    records = {
        "circo": {"split": "val", "metrics": {"mAP@5": 0.1234, "mAP@10": 0.2}},
        "cirr": {"split": "val", "metrics": {"Recall@1": 0.5, "Recall_subset@1": 0.75}},
        "mmeb": {
            "split": "test",
            "metrics": {"overall/Precision@1": 0.5, "missing_datasets": ["A"]},
        },
    }
    table = table1_markdown({"mine": records}, backbone={"mine": "CLIP-B"})
    lines = table.splitlines()
    assert lines[0] == (
        "| model | backbone | CIRCO mAP@5 | CIRR R@1 | CIRR Rs@1 | FashionIQ R@10 | GeneCIS Rs@1 |"
    )
    assert "| MMRet-Base | CLIP-B | 34.3 | 36.1 | 71.6 | 31.9 | 18.0 |" in lines
    assert "| ours: mine | CLIP-B | 12.3 | 50.0 | 75.0 | \u2013 | \u2013 |" in lines
    assert "ours: mine evaluated on circo val, cirr val, mmeb test." in lines
    details = details_markdown(records)
    assert "### circo (val)" in details and "| mAP@10 | 20.0 |" in details
    assert "missing_datasets: ['A']" in details


# task instruction, GeneCIS average, placement, splits, undecodable images --------------


class InstructionRecorder(ColourRetriever):
    """The colour retriever, noting the `instruction` of every `encode_queries` call."""

    def __init__(self, keywords: Mapping[str, str]) -> None:
        super().__init__(keywords)
        self.instructions: list[str | None] = []

    def encode_queries(
        self,
        images: list[Image.Image] | None,
        texts: list[str] | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        self.instructions.append(instruction)
        return super().encode_queries(images, texts, instruction)


def test_the_instruction_setting_reaches_the_retriever(circo_root: Path) -> None:
    """None is passed as None (the retriever's own default applies); a set one verbatim."""
    plain = InstructionRecorder({"bus": "red"})
    result = evaluate("circo", plain, "fake", circo_root, "val")
    assert plain.instructions == [None]
    assert result.record["tasks"][0]["settings"]["instruction"] is None
    told = InstructionRecorder({"bus": "red"})
    settings = {"instruction": "Retrieve an image that matches the edit."}
    result = evaluate("circo", told, "fake", circo_root, "val", settings)
    assert told.instructions == ["Retrieve an image that matches the edit."]
    assert result.record["tasks"][0]["settings"]["instruction"] == settings["instruction"]
    with pytest.raises(ValueError, match="instruction: Input should be a valid string"):
        evaluate("circo", told, "fake", circo_root, "val", {"instruction": 3})


def _candidate_output(task_name: str, scores: dict[str, list[float]]) -> TaskOutput:
    task = EvalTask("genecis", task_name, "val", ())
    return TaskOutput(task, scores=scores)


def test_genecis_average_needs_all_four_subtasks() -> None:
    hit, miss = [0.9, 0.1, 0.2], [0.1, 0.9, 0.2]
    per_subtask = {
        "focus_attribute": {"0": hit, "1": hit},
        "change_attribute": {"0": hit, "1": miss},
        "focus_object": {"0": miss, "1": miss},
        "change_object": {"0": hit, "1": miss},
    }
    outputs = [_candidate_output(f"genecis/{name}", s) for name, s in per_subtask.items()]
    metrics = BENCHMARKS["genecis"].score(outputs)
    assert metrics["average/Recall@1"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert "missing_subtasks" not in metrics
    partial = BENCHMARKS["genecis"].score(outputs[1:])
    assert "average/Recall@1" not in partial
    assert partial["missing_subtasks"] == ["focus_attribute"]


def test_retriever_placement_resolves_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert retriever_placement("clip", None) == {"device": "cpu", "dtype": "float32"}
    assert retriever_placement("mmret-mllm", None, {"max_length": 9}) == {
        "max_length": 9,
        "device": "cpu",
        "dtype": "float32",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert retriever_placement("mmret-mllm", None) == {"device": "cuda", "dtype": "float16"}
    assert retriever_placement("clip", None) == {"device": "cuda", "dtype": "float32"}
    assert retriever_placement("mmret-mllm", "cpu", {"dtype": "bfloat16"}) == {
        "device": "cpu",
        "dtype": "bfloat16",
    }


def test_a_split_applies_only_to_benchmarks_that_have_it(circo_root: Path, tmp_path: Path) -> None:
    said: list[str] = []
    roots = {"circo": circo_root, "cirr": tmp_path}
    plan = plan_benchmarks(roots, dict.fromkeys(BENCHMARKS, "test1"), said.append)
    assert plan == {"cirr": (tmp_path, "test1")}
    assert said[0] == "skipping circo: it has no split 'test1' (its splits: val, test)"
    assert said[1:] == [
        f"skipping {name}: it has no split 'test1' "
        f"(its splits: {', '.join(BENCHMARKS[name].splits)})"
        for name in ("fashioniq", "genecis", "mmeb")
    ]
    with pytest.raises(ValueError, match="no benchmark has split 'bogus'"):
        run_eval_command("all", str(tmp_path / "no-model"), "clip", tmp_path, split="bogus")
    with pytest.raises(ValueError, match="no benchmark has split 'test1'"):
        run_eval_command("circo", str(tmp_path / "no-model"), "clip", circo_root, split="test1")


def _circo_copy(root: Path) -> Path:
    write_circo_root(root)
    for image_id, (hue, brightness) in CIRCO_COLOURS.items():
        paint(root / CIRCO_IMAGES / f"{image_id:012d}.jpg", hue, brightness, size=(32, 32))
    return root


def test_undecodable_images_fail_before_encoding_or_are_dropped(tmp_path: Path) -> None:
    root = _circo_copy(tmp_path / "circo")
    for image_id in (66, 88):  # a ground truth of query 2, and a distractor
        path = root / CIRCO_IMAGES / f"{image_id:012d}.jpg"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fake = InstructionRecorder({"bus": "red", "teddy": "green", "street": "blue"})
    with pytest.raises(ImageDecodeError, match=r"2 image file\(s\) cannot be decoded") as err:
        evaluate("circo", fake, "fake", root, "val", cache_dir=tmp_path / "cache")
    assert "000000000066.jpg" in str(err.value) and "000000000088.jpg" in str(err.value)
    assert fake.instructions == []  # nothing was encoded
    settings = {"allow_missing": True}
    result = evaluate("circo", fake, "fake", root, "val", settings, tmp_path / "cache")
    task_settings = result.record["tasks"][0]["settings"]
    assert task_settings["undecodable_images"] == 2 and task_settings["dropped_gallery"] == 2
    assert result.record["counts"]["undecodable_images"] == 2
    assert result.record["counts"]["gallery"] == len(CIRCO_COLOURS) - 2
    assert result.metrics["Recall@50"] == pytest.approx(1.0)
    assert result.metrics["mAP@50"] < 1.0  # query 2's ground truth 66 is a miss


# hidden splits: every query or no submission ------------------------------------------------
def test_a_hidden_split_missing_an_image_writes_no_submission_and_says_how_many(
    tiny_clip: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from megapairs.cli import main

    root = write_circo_root(tmp_path / "circo", "test")
    _extend_circo_gallery(root)  # (a submission lists 50 ids per query)
    (root / CIRCO_IMAGES / f"{11:012d}.jpg").unlink()  # the reference image of query 0
    output = tmp_path / "out"
    args = ["eval", "--benchmark", "circo", "--kind", "clip", "--model", str(tiny_clip.path)]
    args += ["--data-root", str(root), "--split", "test", "--output", str(output), "--quiet"]
    assert main([*args, "--set", "allow_missing=true", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "only 2 of 3 queries can be evaluated" in err and "no submission was written" in err
    assert "e.g. queries 0" in err
    assert not list(output.glob("*submission*"))

    write_circo_root(tmp_path / "circo", "test")  # the image is back: every query is there
    _extend_circo_gallery(root)
    assert main([*args, "--cache-dir", str(tmp_path / "c")]) == 0
    (submission,) = output.glob("circo-test-submission.json")
    assert sorted(json.loads(submission.read_text())) == ["0", "1", "2"]
    record = json.loads((output / "circo-test.json").read_text())
    assert (record["counts"]["queries"], record["counts"]["queries_in_split"]) == (3, 3)
    assert "3/3 queries" in (output / "table.md").read_text()


def test_every_benchmark_plugin_is_the_cli_choice_and_has_its_loader() -> None:
    from megapairs.cli import build_parser
    from megapairs.evaluation.loaders.base import LOADERS

    parser = build_parser()
    evaluate_parser = parser._subparsers._group_actions[0].choices["eval"]  # type: ignore[union-attr]
    (choice,) = [a for a in evaluate_parser._actions if a.dest == "benchmark"]
    assert list(choice.choices) == [*BENCHMARKS, "all"]
    assert sorted(BENCHMARKS) == LOADERS.names()
    for plugin in BENCHMARKS.values():
        assert plugin.default_split in plugin.splits


def test_the_paper_recipe_gives_table_1_and_the_submissions(
    tiny_clip: Tiny, tiny_roots: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`megapairs eval --benchmark all --split paper` (docs/reproduction.md), with a tiny
    saved model of the real architecture in place of BAAI/BGE-VL-base."""
    from megapairs.cli import main

    roots = tmp_path / "benchmarks"
    roots.mkdir()
    for name in ("circo", "cirr"):
        (roots / name).symlink_to(tiny_roots / name)
    write_fashioniq_root(roots / "fashioniq", "val")
    write_genecis_root(roots / "genecis")
    output = tmp_path / "results"
    args = ["eval", "--benchmark", "all", "--retriever", "mmret-clip", "--split", "paper"]
    args += ["--model", str(tiny_clip.path), "--data-root", str(roots), "--output", str(output)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main([*args, "--set", "genecis.box_dilation=0"]) == 0
    out = capsys.readouterr().out
    assert "skipping mmeb" in out and "| MMRet-Base | CLIP-B | 34.3 |" in out
    written = sorted(path.name for path in output.iterdir())
    assert written == [
        "circo-test-submission.json",
        "circo-test.json",
        "cirr-test1-recall-submission.json",
        "cirr-test1-recall_subset-submission.json",
        "cirr-test1.json",
        "fashioniq-val.json",
        "genecis-val.json",
        "table.md",
    ]
    fashioniq = json.loads((output / "fashioniq-val.json").read_text())
    assert "average/R@10" in fashioniq["metrics"]


def test_each_plugin_names_its_typed_settings() -> None:
    for plugin in BENCHMARKS.values():
        defaults = plugin.settings()
        assert (defaults.check_images, defaults.allow_missing) == (True, False)
        with pytest.raises(ValueError, match=f"unknown {plugin.name} settings"):
            plugin.load(Path(__file__).parent, plugin.default_split, {"no_such_setting": 1})
