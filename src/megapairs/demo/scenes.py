"""A generated, captioned corpus of simple scenes with ground-truth attributes (offline demo).

`generate_scene_corpus(out_dir, n_images)` writes a corpus the `folder` reader reads:

    out_dir/scenes/scene-00000.jpg    about one in seven is a .png instead
    out_dir/scenes/scene-00000.txt    caption sidecar; empty or missing for a few percent
    out_dir/attributes.jsonl          one line per good scene, in file-name order

Point the reader at `out_dir/scenes` (`SceneCorpus.images_dir`); keys there are the bare
file names that `attributes.jsonl` uses. Each scene shows 1-4 objects of one shape, colour,
size and texture, clustered in one of nine positions over a patterned background. Scenes
come in *families* that share some attributes (same object on other backgrounds, same
background with other objects, same layout in other colours), so every scene has
neighbours at several levels of similarity, not only near-repeats.

With `with_bad_inputs`, files the ingest stage must reject are added after the good
scenes (so they sort last): see `BAD_INPUTS` and `SceneCorpus.bad_records`, which give the
reject reason each one should get. They have no line in `attributes.jsonl`. Two good
scenes are also stored in modes ingest must convert (a greyscale JPEG, a palette PNG with
transparency); those keep their line, with `mode` saying which.

Output is a pure function of the arguments: every random draw comes from a generator
seeded by (seed, stream, index), JPEGs use a fixed quality, PNGs carry no timestamp.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from megapairs.registry import Registry

IMAGES_FOLDER = "scenes"
ATTRIBUTES_FILE = "attributes.jsonl"
FILE_PREFIX = "scene-"
JPEG_QUALITY = 90
PNG_SHARE = 0.15
SUPERSAMPLE = 2  # draw at twice the size, then box-downscale: anti-aliased edges
EMPTY_CAPTION_SHARE = 0.03  # sidecar present but empty
MISSING_CAPTION_SHARE = 0.02  # no sidecar at all

# Ground-truth attributes of a scene, in the order attributes.jsonl lists them.
ATTRIBUTES = (
    "shape",
    "colour",
    "count",
    "size",
    "position",
    "texture",
    "background",
    "background_colour",
)

# --- vocabulary --------------------------------------------------------------------------------

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "orange": (245, 132, 20),
    "yellow": (246, 214, 36),
    "green": (38, 158, 60),
    "blue": (36, 84, 214),
    "purple": (124, 54, 184),
    "pink": (244, 124, 186),
    "brown": (124, 76, 38),
    "white": (242, 242, 242),
    "black": (28, 28, 28),
    "grey": (128, 128, 128),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "brown": ("brown",),
    "white": ("white",),
    "black": ("black",),
    "grey": ("grey", "gray"),
}
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between object and background colour

# (singular, plural) nouns for each shape; GENERIC_NOUNS when the caption omits the shape.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "ring": (("ring", "rings"), ("donut", "donuts")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "heart": (("heart", "hearts"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
}
GENERIC_NOUNS = (("shape", "shapes"), ("object", "objects"), ("figure", "figures"))

COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "one", "a single"),
    2: ("two", "a pair of"),
    3: ("three",),
    4: ("four",),
}
UNCOUNTED_PLURAL = ("", "some", "several")
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
SIZE_RADIUS = {"small": 0.08, "medium": 0.12, "large": 0.17}  # fraction of the image side
COUNT_SHRINK = (1.0, 0.9, 0.8, 0.75)  # objects get smaller when there are more of them

TEXTURE_WORDS = {
    "solid": ("solid", "filled"),
    "striped": ("striped", "stripy"),
    "spotted": ("spotted",),
    "outlined": ("outlined", "hollow"),
}
TEXTURE_WEIGHTS = {"solid": 0.55, "striped": 0.15, "spotted": 0.15, "outlined": 0.15}

# Background phrases: {c} is a colour word or empty, {noun} one of BACKGROUND_NOUNS.
# UNNAMED_BACKGROUND does not name its pattern, so it always names the colour.
UNNAMED_BACKGROUND = "a {c} {noun}"
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain {c} {noun}", UNNAMED_BACKGROUND, "a flat {c} {noun}"),
    "gradient": ("a {c} gradient {noun}", "a {c} gradient", "a softly graded {c} {noun}"),
    "striped": ("a striped {c} {noun}", "a {c} striped {noun}", "{c} stripes"),
    "checkered": ("a checkered {c} {noun}", "a {c} checkerboard", "a chequered {c} {noun}"),
    "dotted": ("a polka-dot {c} {noun}", "{c} polka dots", "a dotted {c} {noun}"),
    "noisy": ("a grainy {c} {noun}", "a noisy {c} {noun}", "a speckled {c} {noun}"),
}
BACKGROUND_NOUNS = ("background", "backdrop", "wall", "surface")
BACKGROUND_PREPOSITIONS = ("on", "against", "over", "in front of")

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
CELL_CENTRE = {"top": 1 / 6, "middle": 0.5, "bottom": 5 / 6, "left": 1 / 6, "centre": 0.5}
CELL_CENTRE["right"] = 5 / 6
# Position phrases keyed by (row is middle, column is centre).
POSITION_PHRASES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (True, True): ("in the centre", "in the middle", "in the center of the picture"),
    (True, False): ("on the {col}", "on the {col} side", "at the {col} edge"),
    (False, True): ("at the {row}", "near the {row}", "at the {row} centre"),
    (False, False): ("in the {row} {col}", "in the {row} {col} corner", "at the {row}-{col}"),
}

# Caption templates keyed by which optional phrases they hold: (background, position).
# {S}/{B} are the subject/background phrase with a capital letter, {be} is "is" or "are".
CAPTION_TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (True, True): (
        "{S} {b}, {p}.",
        "{S} {p} {b}.",
        "{S} {b} {p}",
        "A picture of {s} {p} {b}.",
        "{B} with {s} {p}.",
    ),
    (True, False): ("{S} {b}.", "{s} {b}", "Photo of {s} {b}", "{B} with {s}."),
    (False, True): ("{S} {p}.", "{s}, {p}", "There {be} {s} {p}."),
    (False, False): ("{S}.", "{s}", "Just {s}.", "A simple drawing of {s}."),
}
MENTION_PROBABILITY = {
    "shape": 0.9,
    "colour": 0.8,
    "count": 0.75,  # a single object always gets its article, which counts it
    "size": 0.4,
    "texture": 0.45,
    "background": 0.65,
    "background_colour": 0.75,
    "position": 0.55,
}

# Families: scenes that keep the `locked` attributes of a prototype and redraw some others.
FAMILY_LOCKS: dict[str, tuple[str, ...]] = {
    "object": ("shape", "colour", "texture"),
    "background": ("background", "background_colour"),
    "layout": ("shape", "count", "size", "position"),
}
FAMILY_SIZE = (3, 8)  # inclusive range of members per family
CHANGED_ATTRIBUTES_P = (0.15, 0.35, 0.3, 0.2)  # P(0, 1, 2, 3 attributes redrawn)


# --- scenes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image."""

    shape: str
    colour: str
    count: int
    size: str
    position: str  # "<row>-<column>", e.g. "top-left", "middle-centre"
    texture: str
    background: str
    background_colour: str
    family: int
    family_kind: str

    @property
    def row(self) -> str:
        return self.position.split("-")[0]

    @property
    def column(self) -> str:
        return self.position.split("-")[1]


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


ATTRIBUTE_SAMPLERS: dict[str, Callable[[np.random.Generator], Any]] = {
    "shape": lambda rng: _pick(rng, list(SHAPE_NOUNS)),
    "colour": lambda rng: _pick(rng, list(COLOUR_RGB)),
    "count": lambda rng: int(rng.integers(1, 5)),
    "size": lambda rng: _pick(rng, list(SIZE_RADIUS)),
    "position": lambda rng: f"{_pick(rng, ROWS)}-{_pick(rng, COLUMNS)}",
    "texture": lambda rng: _weighted(rng, TEXTURE_WEIGHTS),
    "background": lambda rng: _pick(rng, list(BACKGROUND_PHRASES)),
    "background_colour": lambda rng: _pick(rng, list(COLOUR_RGB)),
}


def colours_contrast(colour: str, background_colour: str) -> bool:
    """Whether objects of `colour` stand out on a `background_colour` background."""
    a, b = np.array(COLOUR_RGB[colour], float), np.array(COLOUR_RGB[background_colour], float)
    return float(np.linalg.norm(a - b)) >= MIN_COLOUR_DISTANCE


def _redraw(scene: Scene, names: Sequence[str], rng: np.random.Generator) -> Scene:
    """`scene` with the attributes `names` drawn again (each to a different value) until the
    object contrasts with the background; the background colour gives way if it cannot."""
    for _ in range(50):
        changes = {}
        for name in names:
            value = getattr(scene, name)
            while value == getattr(scene, name):
                value = ATTRIBUTE_SAMPLERS[name](rng)
            changes[name] = value
        candidate = replace(scene, **changes)
        if colours_contrast(candidate.colour, candidate.background_colour):
            return candidate
    return _redraw(scene, [*names, "background_colour"], rng)


def random_scene(rng: np.random.Generator, family: int, kind: str) -> Scene:
    """A prototype scene with every attribute drawn afresh."""
    values = {name: sample(rng) for name, sample in ATTRIBUTE_SAMPLERS.items()}
    scene = Scene(**values, family=family, family_kind=kind)
    if colours_contrast(scene.colour, scene.background_colour):
        return scene
    return _redraw(scene, ["background_colour"], rng)


def family_member(prototype: Scene, rng: np.random.Generator) -> Scene:
    """A variant of `prototype`: 0-3 of its unlocked attributes drawn again."""
    locked = FAMILY_LOCKS[prototype.family_kind]
    free = [a for a in ATTRIBUTES if a not in locked]
    n_changed = int(rng.choice(len(CHANGED_ATTRIBUTES_P), p=CHANGED_ATTRIBUTES_P))
    names = [free[i] for i in rng.choice(len(free), size=n_changed, replace=False)]
    return _redraw(prototype, names, rng) if names else prototype


def plan_scenes(n_images: int, seed: int) -> list[Scene]:
    """`n_images` scenes grouped in families, shuffled so families are not contiguous."""
    rng = np.random.default_rng([seed, 1])
    scenes: list[Scene] = []
    for family in itertools.count():
        if len(scenes) >= n_images:
            break
        prototype = random_scene(rng, family, _pick(rng, list(FAMILY_LOCKS)))
        size = int(rng.integers(FAMILY_SIZE[0], FAMILY_SIZE[1] + 1))
        scenes.extend(family_member(prototype, rng) for _ in range(size))
    scenes = scenes[:n_images]
    return [scenes[i] for i in rng.permutation(len(scenes))]


# --- drawing -----------------------------------------------------------------------------------

Layer = tuple[np.ndarray, int]  # polygon points (k, 2) in units of the radius, and fill value
SHAPES: Registry[list[Layer]] = Registry("scene shape")


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


@SHAPES.register("circle")
def _circle() -> list[Layer]:
    return [(_regular(64), 255)]


@SHAPES.register("square")
def _square() -> list[Layer]:
    return [(_regular(4, 1.15, np.pi / 4), 255)]


@SHAPES.register("triangle")
def _triangle() -> list[Layer]:
    return [(_regular(3, 1.2) + np.array([0.0, 0.2]), 255)]


@SHAPES.register("star")
def _star() -> list[Layer]:
    points = _regular(10, 1.15)
    points[1::2] *= 0.45
    return [(points, 255)]


@SHAPES.register("ring")
def _ring() -> list[Layer]:
    return [(_regular(64), 255), (_regular(64, 0.55), 0)]


@SHAPES.register("cross")
def _cross() -> list[Layer]:
    a, w = 1.0, 0.33
    outline = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w)]
    outline += [(w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    return [(np.array(outline), 255)]


@SHAPES.register("heart")
def _heart() -> list[Layer]:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y + 2.5], axis=1) / 15
    return [(points, 255)]


@SHAPES.register("diamond")
def _diamond() -> list[Layer]:
    return [(np.array([(0, -1.25), (0.8, 0), (0, 1.25), (-0.8, 0)]), 255)]


@SHAPES.register("hexagon")
def _hexagon() -> list[Layer]:
    return [(_regular(6, 1.05, 0.0), 255)]


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def draw_object(
    mask: Image.Image, shape: str, centre: np.ndarray, radius: float, angle: float, hollow: bool
) -> None:
    """Add one object to `mask` (mode L): filled, or only its outline when `hollow`."""
    layers = [(pts @ _rotation(angle).T * radius, fill) for pts, fill in SHAPES.build(shape)]
    pad = 4
    low = np.floor(centre - 1.4 * radius) - pad
    size = int(np.ceil(2.8 * radius)) + 2 * pad
    local = Image.new("L", (size, size))
    draw = ImageDraw.Draw(local)
    width = max(2, round(0.2 * radius))
    for points, fill in layers:
        xy = [tuple(p) for p in points + (centre - low)]
        if hollow:
            draw.polygon(xy, outline=255, width=width)
        else:
            draw.polygon(xy, fill=fill)
    mask.paste(255, (int(low[0]), int(low[1])), local)


# Offsets of the objects of a group, in units of the object radius, by count.
GROUP_OFFSETS = {
    1: [(0.0, 0.0)],
    2: [(-1.0, 0.0), (1.0, 0.0)],
    3: [(-1.0, 0.6), (1.0, 0.6), (0.0, -1.15)],
    4: [(-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0)],
}


def layout_objects(
    scene: Scene, side: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, float, float]]:
    """(centre, radius, angle) of each object: a loose group around the scene's cell."""
    radius = SIZE_RADIUS[scene.size] * COUNT_SHRINK[scene.count - 1] * rng.uniform(0.9, 1.1)
    offsets = np.array(GROUP_OFFSETS[scene.count]) * 1.2 * radius
    offsets = offsets @ _rotation(rng.uniform(-0.4, 0.4)).T
    offsets += rng.uniform(-0.15, 0.15, offsets.shape) * radius
    cell = np.array([CELL_CENTRE[scene.column], CELL_CENTRE[scene.row]])
    centre = cell + rng.uniform(-0.04, 0.04, 2)
    margin = 0.02 + 1.2 * radius
    low, high = margin - offsets.min(axis=0), 1 - margin - offsets.max(axis=0)
    centre = np.clip(centre, low, np.maximum(low, high))
    angles = rng.uniform(-0.2, 0.2, scene.count)
    return [((centre + o) * side, radius * side, a) for o, a in zip(offsets, angles, strict=True)]


@lru_cache(maxsize=4)
def _axis(side: int) -> np.ndarray:
    """Pixel coordinates 0..side-1 along one axis, float32, read-only."""
    coords = np.arange(side, dtype=np.float32)
    coords.setflags(write=False)
    return coords


def _tint(rgb: np.ndarray) -> np.ndarray:
    """A second tone of `rgb` for patterns: lighter for dark colours, darker for light ones."""
    luminance = float(rgb @ [0.299, 0.587, 0.114])
    return rgb + (255 - rgb) * 0.5 if luminance < 140 else rgb * 0.6


def _as_weight(flags: np.ndarray) -> np.ndarray:
    """A boolean pattern as a uint8 weight (255 where true)."""
    return flags.view(np.uint8) * np.uint8(255)


def _stripes(side: int, rng: np.random.Generator, period: tuple[float, float]) -> np.ndarray:
    axis = _axis(side)
    angle = _pick(rng, (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)) + rng.uniform(-0.12, 0.12)
    p = rng.uniform(*period) * side
    phase = rng.uniform(0, p)
    across = axis[None, :] * np.float32(np.cos(angle)) + axis[:, None] * np.float32(np.sin(angle))
    return _as_weight((across + np.float32(phase)) % np.float32(p) < p / 2)


def _dots(side: int, rng: np.random.Generator, spacing: tuple[float, float]) -> np.ndarray:
    axis = _axis(side)
    s = rng.uniform(*spacing) * side
    ox, oy = rng.uniform(0, s, 2)
    dx, dy = (axis + ox) % s - s / 2, (axis + oy) % s - s / 2
    return _as_weight((dx * dx)[None, :] + (dy * dy)[:, None] < (0.28 * s) ** 2)


# Patterns are uint8 weights (side, side): 0 shows the base colour, 255 its tint; None is
# the base colour alone.
Pattern = np.ndarray | None
BACKGROUNDS: Registry[Pattern] = Registry("scene background")
TEXTURES: Registry[Pattern] = Registry("object texture")


@BACKGROUNDS.register("plain")
@TEXTURES.register("solid")
@TEXTURES.register("outlined")  # the outline is drawn by `draw_object(hollow=True)`
def _uniform(side: int, rng: np.random.Generator) -> Pattern:
    return None


@BACKGROUNDS.register("gradient")
def _gradient(side: int, rng: np.random.Generator) -> Pattern:
    axis = _axis(side)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = axis * np.float32(np.cos(angle)), axis * np.float32(np.sin(angle))
    low = dx.min() + dy.min()
    ramp = dx[None, :] + dy[:, None] - low
    return (ramp * np.float32(255 / (dx.max() + dy.max() - low))).astype(np.uint8)


@BACKGROUNDS.register("striped")
def _striped_background(side: int, rng: np.random.Generator) -> Pattern:
    return _stripes(side, rng, (0.06, 0.1))


@BACKGROUNDS.register("checkered")
def _checkered(side: int, rng: np.random.Generator) -> Pattern:
    axis = _axis(side)
    s = rng.uniform(0.08, 0.14) * side
    ox, oy = rng.uniform(0, s, 2)
    columns, rows = ((axis + ox) // s) % 2 == 1, ((axis + oy) // s) % 2 == 1
    return _as_weight(columns[None, :] ^ rows[:, None])


@BACKGROUNDS.register("dotted")
def _dotted_background(side: int, rng: np.random.Generator) -> Pattern:
    return _dots(side, rng, (0.07, 0.11))


@BACKGROUNDS.register("noisy")
def _noisy(side: int, rng: np.random.Generator) -> Pattern:
    coarse = rng.standard_normal((8, 8)).astype(np.float32) * 55 + 110
    blotches = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))
    grain = rng.standard_normal((side, side), dtype=np.float32) * 40
    return np.clip(blotches + grain, 0, 255).astype(np.uint8)


@TEXTURES.register("striped")
def _striped_texture(side: int, rng: np.random.Generator) -> Pattern:
    return _stripes(side, rng, (0.035, 0.05))


@TEXTURES.register("spotted")
def _spotted(side: int, rng: np.random.Generator) -> Pattern:
    return _dots(side, rng, (0.035, 0.05))


HOLLOW_TEXTURES = frozenset({"outlined"})


def _jittered_rgb(colour: str, rng: np.random.Generator) -> np.ndarray:
    """The colour made a little lighter or darker, with a hue shift too small to rename it."""
    shift = rng.uniform(-14, 14) + rng.uniform(-5, 5, 3)
    return np.clip(np.array(COLOUR_RGB[colour], float) + shift, 0, 255)


def _paint(pattern: Pattern, rgb: np.ndarray, side: int) -> Image.Image:
    """The colour `rgb` with its tint where `pattern` says (blended by weight)."""
    base = Image.new("RGB", (side, side), tuple(int(v) for v in rgb))
    if pattern is None:
        return base
    tint = Image.new("RGB", (side, side), tuple(int(v) for v in _tint(rgb)))
    return Image.composite(tint, base, Image.fromarray(pattern))


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as an RGB image of image_size x image_size pixels."""
    side = image_size * SUPERSAMPLE
    background_rgb = _jittered_rgb(scene.background_colour, rng)
    background = _paint(BACKGROUNDS.build(scene.background, side, rng), background_rgb, side)
    object_rgb = _jittered_rgb(scene.colour, rng)
    fill = _paint(TEXTURES.build(scene.texture, side, rng), object_rgb, side)
    mask = Image.new("L", (side, side))
    hollow = scene.texture in HOLLOW_TEXTURES
    for centre, radius, angle in layout_objects(scene, side, rng):
        draw_object(mask, scene.shape, centre, radius, angle, hollow)
    picture = np.asarray(Image.composite(fill, background, mask).reduce(SUPERSAMPLE), np.int16)
    grain = rng.integers(-2, 3, (image_size, image_size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(picture + grain, 0, 255).astype(np.uint8))


# --- captions ----------------------------------------------------------------------------------


def _article_fix(text: str) -> str:
    """'a orange' -> 'an orange' (and 'A' -> 'An')."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _subject_phrase(scene: Scene, mention: set[str], rng: np.random.Generator) -> str:
    """E.g. 'two small red striped stars': the determiner always, the rest if mentioned."""
    plural = scene.count > 1
    nouns = SHAPE_NOUNS[scene.shape] if "shape" in mention else GENERIC_NOUNS
    noun = _pick(rng, nouns)[int(plural)]
    determiner = _pick(rng, COUNT_WORDS[scene.count] if "count" in mention else UNCOUNTED_PLURAL)
    words = [
        determiner,
        _pick(rng, SIZE_WORDS[scene.size]) if "size" in mention else "",
        _pick(rng, COLOUR_WORDS[scene.colour]) if "colour" in mention else "",
        _pick(rng, TEXTURE_WORDS[scene.texture]) if "texture" in mention else "",
        noun,
    ]
    return _squash(" ".join(words))


def _background_phrase(scene: Scene, mention: set[str], rng: np.random.Generator) -> str:
    """E.g. 'a striped blue wall'; updates `mention` when the phrase names no pattern."""
    template = _pick(rng, BACKGROUND_PHRASES[scene.background])
    if template == UNNAMED_BACKGROUND:
        mention.discard("background")
        mention.add("background_colour")  # a bare "a wall" would say nothing
    colour = _pick(rng, COLOUR_WORDS[scene.background_colour])
    colour = colour if "background_colour" in mention else ""
    return _squash(template.format(c=colour, noun=_pick(rng, BACKGROUND_NOUNS)))


def _position_phrase(scene: Scene, rng: np.random.Generator) -> str:
    key = (scene.row == "middle", scene.column == "centre")
    return _pick(rng, POSITION_PHRASES[key]).format(row=scene.row, col=scene.column)


def _choose_mentions(scene: Scene, rng: np.random.Generator) -> set[str]:
    mention = {a for a, p in MENTION_PROBABILITY.items() if rng.random() < p}
    if scene.count == 1:
        mention.add("count")
    if "background" not in mention:
        mention.discard("background_colour")
    return mention


def make_caption(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A caption for `scene` and the attributes it mentions (in ATTRIBUTES order)."""
    mention = _choose_mentions(scene, rng)
    with_background, with_position = "background" in mention, "position" in mention
    background = _background_phrase(scene, mention, rng) if with_background else ""
    if not with_background:
        mention -= {"background", "background_colour"}
    subject = _subject_phrase(scene, mention, rng)
    template = _pick(rng, CAPTION_TEMPLATES[(with_background, with_position)])
    caption = template.format(
        s=subject,
        S=_capitalised(subject),
        b=f"{_pick(rng, BACKGROUND_PREPOSITIONS)} {background}",
        B=_capitalised(background),
        p=_position_phrase(scene, rng) if with_position else "",
        be="is" if scene.count == 1 or subject.startswith("a ") else "are",
    )
    caption = _article_fix(_squash(caption))
    if rng.random() < 0.2:
        caption = caption.lower()
    return caption, [a for a in ATTRIBUTES if a in mention]


# --- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRecord:
    """A file ingest must reject, with the reason code it should report."""

    file: str
    reason: str
    detail: str
    duplicate_of: str | None = None


@dataclass(frozen=True)
class ConvertedRecord:
    """A good scene stored in a mode ingest must convert to RGB."""

    file: str
    mode: str


@dataclass(frozen=True)
class SceneCorpus:
    """What `generate_scene_corpus` wrote."""

    root: Path
    images_dir: Path  # the folder to hand to the `folder` reader
    attributes_path: Path
    n_images: int  # good scenes: one attributes line each, all should pass ingest
    n_captioned: int  # good scenes with a non-empty caption
    n_files: int  # image files written, bad records included
    bad_records: tuple[BadRecord, ...] = ()
    converted: tuple[ConvertedRecord, ...] = ()

    @property
    def expected_rejects(self) -> dict[str, str]:
        """File name -> the reject reason ingest should give it."""
        return {r.file: r.reason for r in self.bad_records}


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Fixed-setting encoding, so the same image gives the same bytes on every run."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    else:
        extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
        image.save(buffer, "PNG", compress_level=3, **extra)
    return buffer.getvalue()


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    """A 64-colour palette image whose most common colour (and entries near it) is transparent,
    stored as a tRNS table of alpha bytes like many real PNGs."""
    paletted = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    colours = np.array(paletted.getpalette(), float).reshape(-1, 3)
    common = colours[np.bincount(np.asarray(paletted).ravel()).argmax()]
    alpha = np.where(np.linalg.norm(colours - common, axis=1) < 24, 0, 255).astype(np.uint8)
    paletted.info["transparency"] = alpha.tobytes()
    return paletted


# How special good scenes are stored: mode -> (converter, format). Used with bad inputs only.
CONVERTED_MODES: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "L": (lambda image: image.convert("L"), "JPEG"),
    "P": (_palette_with_transparency, "PNG"),
}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png"}


@dataclass(frozen=True)
class BadSample:
    """Bytes of one bad file, how it was made, and the good file it copies (if any)."""

    suffix: str
    data: bytes
    detail: str
    duplicate_of: str | None = None


@dataclass(frozen=True)
class BadSource:
    """A good scene a bad record is derived from: its file name, file bytes and image."""

    file: str
    data: bytes
    image: Image.Image

    @property
    def jpeg(self) -> bytes:
        """The scene encoded afresh as an RGB JPEG."""
        return encode_image(self.rgb, "JPEG")

    @property
    def rgb(self) -> Image.Image:
        """The scene as RGB (palette images through RGBA, as Pillow asks for their alpha)."""
        image = self.image.convert("RGBA") if self.image.mode == "P" else self.image
        return image.convert("RGB")


BAD_INPUTS: Registry[BadSample] = Registry("bad input kind")


def _jpeg_segment(data: bytes, marker: int) -> int:
    """Offset of the first JPEG header segment with `marker` (before the scan data)."""
    offset = 2
    while data[offset] == 0xFF and data[offset + 1] != 0xDA:
        if data[offset + 1] == marker:
            return offset
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    raise ValueError(f"JPEG has no segment 0xFF{marker:02X} before its scan")


@BAD_INPUTS.register("corrupt")
def _corrupt(source: BadSource) -> BadSample:
    data = bytearray(source.jpeg)
    dht = _jpeg_segment(source.jpeg, 0xC4)
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts of the first Huffman table
    detail = f"JPEG of {source.file} with a broken Huffman table: header reads, pixels do not"
    return BadSample(".jpg", bytes(data), detail)


@BAD_INPUTS.register("truncated")
def _truncated(source: BadSource) -> BadSample:
    data = source.jpeg
    cut = len(data) // 2
    return BadSample(
        ".jpg", data[:cut], f"first {cut} of {len(data)} bytes of a JPEG of {source.file}"
    )


@BAD_INPUTS.register("empty")
def _empty(source: BadSource) -> BadSample:
    return BadSample(".png", b"", "zero-byte file")


@BAD_INPUTS.register("not_an_image")
def _not_an_image(source: BadSource) -> BadSample:
    text = b"This is a text file that happens to be named .jpg.\n"
    return BadSample(".jpg", text, "plain text named .jpg")


@BAD_INPUTS.register("too_small")
def _too_small(source: BadSource) -> BadSample:
    tiny = source.rgb.resize((8, 8), Image.Resampling.BOX)
    return BadSample(".jpg", encode_image(tiny, "JPEG"), f"{source.file} shrunk to 8x8 pixels")


@BAD_INPUTS.register("duplicate")
def _duplicate(source: BadSource) -> BadSample:
    suffix = Path(source.file).suffix
    return BadSample(suffix, source.data, f"byte copy of {source.file}", duplicate_of=source.file)


@dataclass(frozen=True)
class RenderedScene:
    """One good scene ready to write."""

    stem: str
    scene: Scene
    image: Image.Image
    image_format: str
    mode: str
    caption: str | None  # None: no sidecar file
    mentions: list[str]


def _file_stem(index: int, total: int) -> str:
    return f"{FILE_PREFIX}{index:0{max(5, len(str(total - 1)))}d}"


def _caption_or_none(scene: Scene, rng: np.random.Generator) -> tuple[str | None, list[str]]:
    roll = rng.random()
    if roll < MISSING_CAPTION_SHARE:
        return None, []
    if roll < MISSING_CAPTION_SHARE + EMPTY_CAPTION_SHARE:
        return "", []
    return make_caption(scene, rng)


def render_record(scene: Scene, stem: str, index: int, seed: int, image_size: int) -> RenderedScene:
    """Image, format and caption of scene `index`, from its own seeded generator."""
    rng = np.random.default_rng([seed, 2, index])
    image = render_scene(scene, image_size, rng)
    image_format = "PNG" if rng.random() < PNG_SHARE else "JPEG"
    caption, mentions = _caption_or_none(scene, rng)
    return RenderedScene(stem, scene, image, image_format, "RGB", caption, mentions)


def _store_converted(record: RenderedScene, mode: str) -> RenderedScene:
    convert, image_format = CONVERTED_MODES[mode]
    return replace(record, image=convert(record.image), image_format=image_format, mode=mode)


def _write_sidecar(folder: Path, stem: str, caption: str | None) -> None:
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption + ("\n" if caption else ""), encoding="utf-8")


def _write_scene(folder: Path, record: RenderedScene) -> dict[str, Any]:
    """Write image and sidecar; return the record's attributes line."""
    file = f"{record.stem}{SUFFIX[record.image_format]}"
    (folder / file).write_bytes(encode_image(record.image, record.image_format))
    _write_sidecar(folder, record.stem, record.caption)
    attributes = {name: getattr(record.scene, name) for name in ATTRIBUTES}
    return {
        "file": file,
        **attributes,
        "family": record.scene.family,
        "family_kind": record.scene.family_kind,
        "format": record.image_format,
        "mode": record.mode,
        "caption": record.caption,
        "caption_mentions": record.mentions,
    }


def _write_bad_records(folder: Path, records: list[RenderedScene], seed: int) -> list[BadRecord]:
    """Write one file of each BAD_INPUTS kind after the good scenes, each with a caption."""
    rng = np.random.default_rng([seed, 3])
    kinds = BAD_INPUTS.names()
    total = len(records) + len(kinds)
    bad = []
    for offset, reason in enumerate(kinds):
        record = _pick(rng, records)
        file = f"{record.stem}{SUFFIX[record.image_format]}"
        sample = BAD_INPUTS.build(
            reason, BadSource(file, (folder / file).read_bytes(), record.image)
        )
        stem = _file_stem(len(records) + offset, total)
        (folder / f"{stem}{sample.suffix}").write_bytes(sample.data)
        _write_sidecar(folder, stem, make_caption(record.scene, rng)[0])
        bad.append(BadRecord(f"{stem}{sample.suffix}", reason, sample.detail, sample.duplicate_of))
    return bad


def _prepare_folder(out_dir: Path, overwrite: bool) -> Path:
    folder = out_dir / IMAGES_FOLDER
    existing = sorted(folder.glob(f"{FILE_PREFIX}*")) if folder.exists() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {len(existing)} scene files; "
            "choose an empty folder or pass overwrite=True"
        )
    for path in existing:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def generate_scene_corpus(
    out_dir: Path,
    n_images: int,
    seed: int = 0,
    *,
    image_size: int = 256,
    with_bad_inputs: bool = True,
    overwrite: bool = False,
) -> SceneCorpus:
    """Write `n_images` captioned scenes (plus bad records) under `out_dir`; see module doc."""
    if n_images < 2:
        raise ValueError(f"n_images must be at least 2, got {n_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out_dir = Path(out_dir)
    folder = _prepare_folder(out_dir, overwrite)
    scenes = plan_scenes(n_images, seed)
    total = n_images + (len(BAD_INPUTS.names()) if with_bad_inputs else 0)
    records = [
        render_record(scene, _file_stem(i, total), i, seed, image_size)
        for i, scene in enumerate(scenes)
    ]
    converted: list[ConvertedRecord] = []
    if with_bad_inputs:
        picks = np.random.default_rng([seed, 4]).choice(n_images, len(CONVERTED_MODES), False)
        for index, mode in zip(picks, CONVERTED_MODES, strict=True):
            record = records[index] = _store_converted(records[index], mode)
            converted.append(ConvertedRecord(record.stem + SUFFIX[record.image_format], mode))
    lines = [_write_scene(folder, record) for record in records]
    bad = _write_bad_records(folder, records, seed) if with_bad_inputs else []
    attributes_path = out_dir / ATTRIBUTES_FILE
    attributes_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return SceneCorpus(
        root=out_dir,
        images_dir=folder,
        attributes_path=attributes_path,
        n_images=n_images,
        n_captioned=sum(bool(r.caption) for r in records),
        n_files=n_images + len(bad),
        bad_records=tuple(bad),
        converted=tuple(sorted(converted, key=lambda c: c.file)),
    )


def read_attributes(path: Path) -> dict[str, dict[str, Any]]:
    """The lines of an attributes.jsonl, keyed by image file name."""
    lines = Path(path).read_text().splitlines()
    return {row["file"]: row for row in map(json.loads, lines)}


def shared_attributes(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many ground-truth attributes two attributes lines agree on (0 to len(ATTRIBUTES))."""
    return sum(a[name] == b[name] for name in ATTRIBUTES)


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megapairs.demo.scenes",
        description="Write the demo's generated scene corpus (images, captions, attributes).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write scenes/ and attributes.jsonl")
    parser.add_argument("--n", type=int, default=600, help="number of good scenes (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--no-bad-inputs", action="store_true", help="skip the bad records")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier scene files")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        corpus = generate_scene_corpus(
            args.out_dir,
            args.n,
            args.seed,
            image_size=args.size,
            with_bad_inputs=not args.no_bad_inputs,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    seconds = time.perf_counter() - start
    print(f"wrote {corpus.n_files} image files to {corpus.images_dir} in {seconds:.1f} s")
    print(f"  {corpus.n_images} good scenes ({corpus.n_captioned} captioned)")
    print(f"  attributes: {corpus.attributes_path}")
    for bad in corpus.bad_records:
        print(f"  bad: {bad.file}  {bad.reason}: {bad.detail}")
    for converted in corpus.converted:
        print(f"  converted: {converted.file}  mode {converted.mode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
