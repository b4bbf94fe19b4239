"""Learning is real: a short CPU training run of the tiny CLIP learns composed retrieval.

The task: pictures of a coloured shape (4 shapes x 4 colours x 4 jittered variants, drawn
with PIL). A query is (a picture of shape s in colour a, an instruction naming colour b);
its target is a picture of shape s in colour b. Of the 48 (s, a, b) combinations, 16 are
held out of training (for each shape, every a with one fixed colour step to b), so held-out
queries ask for combinations never seen, while every shape and colour is. The gallery
holds all 64 pictures; recall@1 counts a hit when the top picture has the target's shape
and colour. Training rows use the paper's negatives: the query image plus a mined one
(same target colour, other shape; or same shape, third colour). The run uses the demo's
training settings (configs/train_demo.yaml: 150 steps of 32 queries, gradient caching).
"""

import itertools
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from tiny_models import Tiny

import megapairs
from megapairs.models.clip import MMRetCLIP
from megapairs.training.config import load_train_config
from megapairs.training.trainer import train

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 30),
}
VARIANTS = 4
TEMPLATES = ["the same shape in {}", "make it {}", "{}", "change the colour to {}"]
Combination = tuple[str, str, str]  # shape, query colour, target colour
DEMO_CONFIG = Path(megapairs.__file__).parent / "configs" / "train_demo.yaml"


def draw(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """A 32 px picture of `shape` in `colour`, with a random size and position."""
    image = Image.new("RGB", (32, 32), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    size, x, y = rng.randint(9, 12), rng.randint(12, 20), rng.randint(12, 20)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([x - size, y - size, x + size, y + size], fill=fill)
    elif shape == "square":
        pen.rectangle([x - size, y - size, x + size, y + size], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x, y - size), (x - size, y + size), (x + size, y + size)], fill=fill)
    else:
        arm = size // 3
        pen.rectangle([x - arm, y - size, x + arm, y + size], fill=fill)
        pen.rectangle([x - size, y - arm, x + size, y + arm], fill=fill)
    return image


def picture(shape: str, colour: str, variant: int) -> str:
    return f"images/{shape}-{colour}-{variant}.png"


def split() -> tuple[list[Combination], list[Combination]]:
    """(training, held-out) combinations: shape i holds out a -> a + 1 + (i mod 3)."""
    names = list(COLOURS)
    held = {
        (shape, a, names[(j + 1 + i % 3) % len(names)])
        for i, shape in enumerate(SHAPES)
        for j, a in enumerate(names)
    }
    every = [(s, a, b) for s in SHAPES for a in names for b in names if a != b]
    return [c for c in every if c not in held], sorted(held)


def write_task(folder: Path) -> list[Combination]:
    """Pictures and the training rows (MegaPairs schema); returns the held-out combinations."""
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    for shape, colour, variant in itertools.product(SHAPES, COLOURS, range(VARIANTS)):
        draw(shape, colour, rng).save(folder / picture(shape, colour, variant))
    training, held = split()
    rows = []
    for (shape, a, b), variant in itertools.product(training, range(VARIANTS)):
        query = picture(shape, a, variant)
        mined = [picture(s, b, rng.randrange(VARIANTS)) for s in SHAPES if s != shape]
        mined += [picture(shape, c, rng.randrange(VARIANTS)) for c in COLOURS if c not in (a, b)]
        rows.append(
            {
                "q_img": query,
                "q_text": [template.format(b) for template in TEMPLATES],
                "t_img": picture(shape, b, rng.randrange(VARIANTS)),
                "hns": [query, *mined],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    return held


def recall_at_1(model_path: Path, folder: Path, combinations: list[Combination]) -> float:
    """Held-out recall@1 over the gallery of every picture."""
    model = MMRetCLIP.from_pretrained(model_path)
    gallery = list(itertools.product(SHAPES, COLOURS, range(VARIANTS)))
    gallery_embeddings = model.encode(images=[folder / picture(*item) for item in gallery])
    queries = [(s, a, b, v) for (s, a, b), v in itertools.product(combinations, range(VARIANTS))]
    query_embeddings = model.encode(
        images=[folder / picture(s, a, v) for s, a, _, v in queries],
        text=[TEMPLATES[0].format(b) for _, _, b, _ in queries],
    )
    best = (query_embeddings @ gallery_embeddings.T).argmax(dim=1).tolist()
    hits = [gallery[top][:2] == (s, b) for top, (s, _, b, _) in zip(best, queries, strict=True)]
    return sum(hits) / len(hits)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_lowers_the_loss_and_raises_held_out_recall(
    tiny_clip: Tiny, tmp_path: Path
) -> None:
    held = write_task(tmp_path / "task")
    config = load_train_config(
        DEMO_CONFIG,  # the demo's training settings, on this task's data
        [
            f"model.name_or_path={tiny_clip.path}",
            f"data.paths=[{tmp_path / 'task'}]",
            f"output_dir={tmp_path / 'run'}",
            "save_every=150",
        ],
    )
    assert (config.steps, config.batch_size, config.chunk_size) == (150, 32, 32)
    result = train(config, progress=False)
    untrained = recall_at_1(tiny_clip.path, tmp_path / "task", held)
    trained = recall_at_1(result.final_model, tmp_path / "task", held)
    first, last = result.losses[:10], result.losses[-10:]
    # Measured here (2026-11-26, 2-core CPU): loss 4.78 -> 2.27 (means of the first and last
    # 10 steps: 4.54 -> 2.27); held-out recall@1 untrained 0.031, trained 0.500 (64 queries),
    # identical over five runs. Asserted with margins: loss down by > 1.5, recall up by >= 0.25.
    assert sum(last) / 10 < sum(first) / 10 - 1.5
    assert untrained <= 0.15
    assert trained >= untrained + 0.25
