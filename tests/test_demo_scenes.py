"""The demo's generated scene corpus: determinism, layout, attributes, captions, bad inputs."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from megapairs.demo import scenes
from megapairs.demo.scenes import (
    ATTRIBUTES,
    COLOUR_WORDS,
    SHAPE_NOUNS,
    Scene,
    SceneCorpus,
    generate_scene_corpus,
    make_caption,
    plan_scenes,
    read_attributes,
    render_scene,
    shared_attributes,
)

N_IMAGES = 150
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SceneCorpus:
    out = tmp_path_factory.mktemp("scenes")
    return generate_scene_corpus(out, N_IMAGES, seed=0, image_size=IMAGE_SIZE)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in {".jpg", ".png"})


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _words(text: str, vocabulary: list[str]) -> set[str]:
    """The vocabulary entries that occur in `text` as whole words (case-insensitive)."""
    return {w for w in vocabulary if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)}


# --- determinism and layout --------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = generate_scene_corpus(tmp_path / "a", 24, seed=7, image_size=48)
    second = generate_scene_corpus(tmp_path / "b", 24, seed=7, image_size=48)
    other = generate_scene_corpus(tmp_path / "c", 24, seed=8, image_size=48)
    assert _tree(first.root) == _tree(second.root)
    assert first.bad_records == second.bad_records
    assert first.converted == second.converted
    first_attributes = read_attributes(first.attributes_path)
    assert first_attributes == read_attributes(second.attributes_path)
    other_tree = _tree(other.root)
    differing = [name for name, data in _tree(first.root).items() if other_tree.get(name) != data]
    assert len(differing) > 40  # nearly every image and caption changes with the seed


def test_counts_and_attributes_file_match_the_folder(corpus: SceneCorpus) -> None:
    images = _image_files(corpus.images_dir)
    attributes = read_attributes(corpus.attributes_path)
    bad = {r.file for r in corpus.bad_records}
    assert corpus.n_images == N_IMAGES == len(attributes)
    assert corpus.n_files == len(images) == N_IMAGES + len(bad)
    assert set(attributes) == {p.name for p in images} - bad
    assert list(attributes) == sorted(attributes)  # written in file-name order
    captioned = [a for a in attributes.values() if a["caption"]]
    assert corpus.n_captioned == len(captioned)
    assert (corpus.images_dir / "attributes.jsonl").exists() is False  # kept out of the images


def test_every_good_image_decodes_at_the_requested_size(corpus: SceneCorpus) -> None:
    attributes = read_attributes(corpus.attributes_path)
    formats: Counter[str] = Counter()
    pixel_hashes = set()
    for file, line in attributes.items():
        with Image.open(corpus.images_dir / file) as image:
            image.load()
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE), file
            assert (image.format, image.mode) == (line["format"], line["mode"]), file
            rgb = image.convert("RGBA" if image.mode == "P" else "RGB").convert("RGB")
            pixel_hashes.add(hashlib.sha256(rgb.tobytes()).hexdigest())
        formats[line["format"]] += 1
    assert len(pixel_hashes) == len(attributes)  # never two pixel-identical scenes
    assert formats["JPEG"] > formats["PNG"] > 0


def test_attribute_lines_hold_valid_ground_truth(corpus: SceneCorpus) -> None:
    for line in read_attributes(corpus.attributes_path).values():
        assert line["shape"] in SHAPE_NOUNS
        assert line["colour"] in COLOUR_WORDS and line["background_colour"] in COLOUR_WORDS
        assert line["colour"] != line["background_colour"]
        assert line["count"] in {1, 2, 3, 4}
        row, column = line["position"].split("-")
        assert row in scenes.ROWS and column in scenes.COLUMNS
        assert line["texture"] in scenes.TEXTURES and line["background"] in scenes.BACKGROUNDS
        assert set(line["caption_mentions"]) <= set(ATTRIBUTES)


def test_sidecars_hold_the_recorded_captions_some_empty_or_missing(corpus: SceneCorpus) -> None:
    kinds: Counter[str] = Counter()
    for file, line in read_attributes(corpus.attributes_path).items():
        sidecar = corpus.images_dir / f"{Path(file).stem}.txt"
        if line["caption"] is None:
            assert not sidecar.exists(), file
            kinds["missing"] += 1
        else:
            assert sidecar.read_text(encoding="utf-8").strip() == line["caption"], file
            kinds["empty" if line["caption"] == "" else "text"] += 1
    assert kinds["missing"] >= 1 and kinds["empty"] >= 1
    assert kinds["missing"] + kinds["empty"] <= 0.12 * N_IMAGES


# --- bad inputs --------------------------------------------------------------------------------


def _decode_error(path: Path) -> Exception | None:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError) as err:
        return err
    return None


def test_bad_inputs_are_present_with_the_expected_kinds(corpus: SceneCorpus) -> None:
    expected = corpus.expected_rejects
    assert sorted(expected.values()) == sorted(
        ["corrupt", "truncated", "empty", "not_an_image", "too_small", "duplicate"]
    )
    good = set(read_attributes(corpus.attributes_path))
    assert max(good) < min(expected)  # bad records sort after the scenes they may copy
    by_reason = {r.reason: r for r in corpus.bad_records}
    path = {reason: corpus.images_dir / r.file for reason, r in by_reason.items()}
    for record in corpus.bad_records:
        assert (corpus.images_dir / f"{Path(record.file).stem}.txt").read_text().strip()

    assert path["empty"].stat().st_size == 0
    assert isinstance(_decode_error(path["not_an_image"]), UnidentifiedImageError)
    assert path["not_an_image"].read_bytes().isascii()
    assert "truncated" in str(_decode_error(path["truncated"]))
    with Image.open(path["corrupt"]) as header_only:  # the header still reads
        assert header_only.size == (IMAGE_SIZE, IMAGE_SIZE)
    corrupt_error = _decode_error(path["corrupt"])
    assert corrupt_error is not None and "truncated" not in str(corrupt_error)
    with Image.open(path["too_small"]) as tiny:
        tiny.load()
        assert tiny.size == (8, 8)
    original = by_reason["duplicate"].duplicate_of
    assert original in good
    assert path["duplicate"].read_bytes() == (corpus.images_dir / original).read_bytes()


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_every_bad_kind_can_derive_from_a_scene_of_any_mode(mode: str) -> None:
    image = render_scene(_scene(), 48, np.random.default_rng(0))
    image = scenes.CONVERTED_MODES[mode][0](image) if mode in scenes.CONVERTED_MODES else image
    data = scenes.encode_image(image, "PNG")
    for kind in scenes.BAD_INPUTS.names():
        sample = scenes.BAD_INPUTS.build(kind, scenes.BadSource("scene-00001.png", data, image))
        assert sample.suffix in {".jpg", ".png"} and sample.detail, kind
        assert (sample.data == data) == (kind == "duplicate"), kind


def test_convertible_modes_are_good_scenes(corpus: SceneCorpus) -> None:
    attributes = read_attributes(corpus.attributes_path)
    assert {c.mode for c in corpus.converted} == {"L", "P"}
    for record in corpus.converted:
        assert attributes[record.file]["mode"] == record.mode
        with Image.open(corpus.images_dir / record.file) as image:
            assert image.mode == record.mode
            if record.mode == "P":
                assert "transparency" in image.info
                alpha = np.asarray(image.convert("RGBA"))[..., 3]
                assert 0 < (alpha == 0).mean() < 1  # partly transparent


def test_without_bad_inputs_every_file_is_a_plain_scene(tmp_path: Path) -> None:
    corpus = generate_scene_corpus(tmp_path, 12, seed=3, image_size=40, with_bad_inputs=False)
    assert corpus.bad_records == () and corpus.converted == ()
    assert len(_image_files(corpus.images_dir)) == 12
    modes = {line["mode"] for line in read_attributes(corpus.attributes_path).values()}
    assert modes == {"RGB"}


def test_existing_scenes_are_kept_unless_overwrite(tmp_path: Path) -> None:
    generate_scene_corpus(tmp_path, 20, image_size=40)
    with pytest.raises(FileExistsError, match="scenes"):
        generate_scene_corpus(tmp_path, 10, image_size=40)
    corpus = generate_scene_corpus(tmp_path, 10, image_size=40, overwrite=True)
    assert len(_image_files(corpus.images_dir)) == corpus.n_files == 10 + 6


@pytest.mark.parametrize(("n", "size"), [(1, 64), (10, 16)])
def test_refuses_unusable_arguments(tmp_path: Path, n: int, size: int) -> None:
    with pytest.raises(ValueError, match="must be at least"):
        generate_scene_corpus(tmp_path, n, image_size=size)


# --- what the scenes and captions show ----------------------------------------------------------


def _scene(**changes: Any) -> Scene:
    base = Scene("square", "red", 1, "large", "middle-centre", "solid", "plain", "white", 0, "")
    return replace(base, family_kind="object", **changes)


@pytest.mark.parametrize("position", ["top-left", "middle-centre", "bottom-right", "top-centre"])
@pytest.mark.parametrize("shape", ["circle", "star", "heart", "cross"])
def test_rendered_object_has_its_colour_at_its_position(position: str, shape: str) -> None:
    scene = _scene(shape=shape, colour="blue", position=position, size="medium")
    pixels = np.asarray(render_scene(scene, 96, np.random.default_rng(0)), float)
    blue = np.linalg.norm(pixels - scenes.COLOUR_RGB["blue"], axis=2) < 60
    assert 0.01 < blue.mean() < 0.2
    ys, xs = np.nonzero(blue)
    row, column = position.split("-")
    thirds = {"top": 0, "middle": 1, "bottom": 2, "left": 0, "centre": 1, "right": 2}
    assert (int(ys.mean() // 32), int(xs.mean() // 32)) == (thirds[row], thirds[column])


def test_more_objects_cover_more_of_the_image() -> None:
    def coverage(count: int) -> float:
        scene = _scene(colour="green", count=count, size="small")
        pixels = np.asarray(render_scene(scene, 96, np.random.default_rng(1)), float)
        return (np.linalg.norm(pixels - scenes.COLOUR_RGB["green"], axis=2) < 60).mean()

    areas = [coverage(count) for count in (1, 2, 3, 4)]
    assert areas == sorted(areas) and areas[3] > 2 * areas[0]


def test_captions_name_only_ground_truth_values() -> None:
    colours = [w for words in COLOUR_WORDS.values() for w in words]
    shapes = [w for nouns in SHAPE_NOUNS.values() for pair in nouns for w in pair]
    numbers = {"one": 1, "single": 1, "two": 2, "pair": 2, "three": 3, "four": 4}
    mentioned: Counter[str] = Counter()
    for index, scene in enumerate(plan_scenes(1500, seed=5)):
        caption, mentions = make_caption(scene, np.random.default_rng([9, index]))
        mentioned.update(mentions)
        truth_colours = {*COLOUR_WORDS[scene.colour], *COLOUR_WORDS[scene.background_colour]}
        assert _words(caption, colours) <= truth_colours, caption
        if "colour" in mentions:
            assert _words(caption, list(COLOUR_WORDS[scene.colour])), caption
        if not {"colour", "background_colour"} & set(mentions):
            assert not _words(caption, colours), caption
        shape_words = _words(caption, shapes)
        assert shape_words <= {w for pair in SHAPE_NOUNS[scene.shape] for w in pair}, caption
        assert bool(shape_words) == ("shape" in mentions), caption
        assert {numbers[w] for w in _words(caption, list(numbers))} <= {scene.count}, caption
        if "count" in mentions and scene.count > 1:
            assert _words(caption, list(numbers)), caption
        assert "count" in mentions or scene.count > 1, caption  # "a star" counts it
        nouns = (*SHAPE_NOUNS[scene.shape], *scenes.GENERIC_NOUNS)
        number = int(scene.count > 1)  # 0: singular nouns, 1: plural
        assert _words(caption, [pair[number] for pair in nouns]), caption
        sides = _words(caption, ["left", "right", "top", "bottom"])
        assert sides <= set(scene.position.split("-")), caption
        assert ("position" in mentions) or not sides, caption
        assert not re.search(r"\ba [aeiou]|\s[,.]|\s\s", caption, re.IGNORECASE), caption
    shares = {name: mentioned[name] / 1500 for name in ATTRIBUTES}
    assert all(0.2 < share < 0.99 for share in shares.values()), shares


def test_caption_words_for_a_known_scene() -> None:
    scene = _scene(shape="star", colour="red", count=2, position="top-left")
    scene = replace(scene, background="striped", background_colour="blue")
    captions = [make_caption(scene, np.random.default_rng(i))[0].lower() for i in range(60)]
    assert all("green" not in c and "circle" not in c and "three" not in c for c in captions)
    assert sum("star" in c for c in captions) > 40
    assert sum("red" in c or "crimson" in c for c in captions) > 30
    assert any("blue" in c and "stripe" in c for c in captions)
    assert any("top left" in c or "top-left" in c for c in captions)
    assert len(set(captions)) > 45  # varied wording


def test_families_give_neighbours_at_several_similarities() -> None:
    planned = plan_scenes(600, seed=0)
    lines = [{name: getattr(s, name) for name in ATTRIBUTES} for s in planned]
    families: dict[int, list[int]] = {}
    for index, scene in enumerate(planned):
        families.setdefault(scene.family, []).append(index)
    assert all(len(members) >= 2 for members in list(families.values())[:-1])
    within = [
        shared_attributes(lines[a], lines[b])
        for members in families.values()
        for a, b in itertools.combinations(members, 2)
    ]
    rng = np.random.default_rng(0)
    random_pairs = rng.integers(0, len(lines), (3000, 2))
    between = [shared_attributes(lines[a], lines[b]) for a, b in random_pairs if a != b]
    assert np.mean(within) > np.mean(between) + 2.5
    assert len(set(within)) >= 5  # near-repeats, close relatives and distant ones
    assert Counter(s.family_kind for s in planned).keys() == scenes.FAMILY_LOCKS.keys()
    assert planned != sorted(planned, key=lambda s: s.family)  # families are interleaved


# --- command line ------------------------------------------------------------------------------


def test_command_line_writes_a_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scenes.main([str(tmp_path), "--n", "8", "--seed", "2", "--size", "40"]) == 0
    out = capsys.readouterr().out
    assert "8 good scenes" in out and "truncated" in out
    lines = (tmp_path / "attributes.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["file"] for line in lines)
    with pytest.raises(SystemExit) as exit_info:
        scenes.main(["--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        scenes.main([str(tmp_path), "--n", "8"])  # scenes already there
    assert exit_info.value.code == 2
    assert "already holds" in capsys.readouterr().err
