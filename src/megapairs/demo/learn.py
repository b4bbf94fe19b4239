"""The demo learns: a small CLIP trained on the demo's synthesized triplets, measured on a
held-out composed-retrieval set built from the corpus's ground truth (before and after).

No CLIP weights install offline, so the model is built FROM SCRATCH: a random-init
`CLIPModel` from a small `CLIPConfig`, a CLIP byte-level BPE tokenizer whose merges are
learned from the demo's own texts (captions and training instructions) with `tokenizers`,
and a CLIP image processor at a small size. It is saved with `save_pretrained` and every
later step loads it through `MMRetCLIP.from_pretrained`, the path real checkpoints take.

The held-out set is made from the ground truth (`attributes.jsonl`), not from mined pairs.
A query is (scene R, "find a similar picture but with <new value>") for one attribute A
and a value v that some other scene has while matching R in every other attribute; its
ground truths are all such scenes. The instruction is worded like the template annotator's
first instruction ("find a similar picture but with <target caption words the query caption
lacks>"), so what the model learned from the synthesized instructions can transfer. A seeded
share of the scenes that have such queries is held out: their queries are evaluated, and
they are removed from training entirely (rows where they are the query or the target are
dropped, and they are taken out of the other rows' mined negatives). The set is built in
memory as a CIRCO val task (`EvalTask`: gallery = every scene's image, ids = corpus record
ids) and scored by the real evaluation engine (`megapairs.evaluation.engine.evaluate_tasks`)
with CIRCO's metrics: mAP@k over all ground truths, Recall@k on the first, mAP@10 per changed
attribute (CIRCO's `semantic_aspects`). The query text is the relative caption alone. The
trained model is also scored with one fixed text for every query ("find a similar
picture"): the difference says how much of its gain the instruction's new value brings,
and how much is image similarity.

Training uses the packaged configs/train_demo.yaml with `LearnSettings.steps` and
`train_overrides`; its images are copies shrunk to the model's input size (bicubic, as
CLIP's processor resizes), so a step decodes small files. Evaluation reads the originals.

Layout under `<run>/learn/` (rebuilt on every call):

    clip-init/        the random-init checkpoint (+ demo_clip.json: how it was built)
    train-data/       train.parquet (the exported rows without the held-out scenes)
                      and images/<n>.png (the images they use, shrunk)
    train/            the trainer's output (log.jsonl, checkpoints, final/)
    eval/untrained/, eval/trained/, eval/trained-without-value/
                      the evaluator's results JSON (circo-val.json)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from megapairs.corpus.store import read_corpus
from megapairs.dataset.validate import dataset_files, default_image_root
from megapairs.demo.scenes import (
    ATTRIBUTES,
    COLOUR_WORDS,
    COUNT_WORDS,
    SHAPE_NOUNS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    read_attributes,
)
from megapairs.encoders.stage import loading_bars
from megapairs.evaluation.types import Candidate, EvalQuery, EvalTask, ImageRef
from megapairs.models.inputs import load_image
from megapairs.runs import RunDir, write_json
from megapairs.schemas import DATASET_DIR
from megapairs.training.data import TRIPLET_SCHEMA

LEARN_DIR = "learn"
INIT_FOLDER = "clip-init"
TRAIN_DATA_FOLDER = "train-data"
TRAIN_FOLDER = "train"
EVAL_FOLDER = "eval"
BUILD_RECORD = "demo_clip.json"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
QUERY_TEMPLATE = "{relative_caption}"
ABLATION_TEMPLATE = "find a similar picture"  # the same text for every query: no new value
INSTRUCTION = "find a similar picture but with {}"  # the template annotator's first wording
REPORTED_METRICS = ("mAP@5", "mAP@10", "Recall@5", "Recall@10")
NAN = float("nan")
MODEL_SETTINGS = (  # the LearnSettings that shape the checkpoint
    "image_size",
    "patch_size",
    "width",
    "layers",
    "heads",
    "projection_dim",
    "max_text_length",
)
LOSS_WINDOW = 10  # steps averaged for the first and last loss
# Fewer held-out queries are too few to judge by: with 200 demo images (28-32 queries) the
# untrained model's mAP@10 ranged 0.11-0.29 over three hold-out seeds, and the trained one
# beat it in one; with 600 images (106-123 queries) it beat it in all three, by 0.07-0.08.
MIN_CHECKED_QUERIES = 80
TRAIN_COLUMNS = ["q_img", "q_text", "t_img", "hns", "query_id", "target_id", "hard_negative_ids"]


@dataclass(frozen=True)
class LearnSettings:
    """Size of the from-scratch CLIP, the held-out share, and training overrides (on top of
    the packaged configs/train_demo.yaml)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    max_text_length: int = 32
    held_out_share: float = 0.3  # of the scenes that have a composed query
    steps: int = 200
    # On 2 cores shared with other work, torch's two threads (or a DataLoader worker beside
    # them) made steps up to 12x slower (2.5 s instead of 0.2 s); one thread ran 0.25 s.
    # The losses are the same. Gradient caching of a 32-query batch in one chunk only adds a
    # forward pass.
    torch_threads: int = 1
    train_overrides: tuple[str, ...] = ("num_workers=0", "chunk_size=0")


# the from-scratch CLIP ------------------------------------------------------------------------


def caption_tokenizer(texts: Iterable[str]) -> Any:
    """A CLIP byte-level BPE tokenizer whose merges are learned from `texts`.

    The vocabulary is CLIP's: the two special tokens, the 256 byte symbols alone and with
    `</w>`, then one token per learned merge; normalisation and pre-tokenisation are
    `CLIPTokenizer`'s own, so the merges are learned on the pieces it will split."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    template = CLIPTokenizer(vocab={token: i for i, token in enumerate(SPECIAL_TOKENS)})
    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.normalizer = template.backend_tokenizer.normalizer
    learner.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # a ceiling: merging stops once every word is one token
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    learner.train_from_iterator(sorted(set(texts)), trainer)
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]
    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*SPECIAL_TOKENS, *alphabet, *(c + "</w>" for c in alphabet)]
    tokens += [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # pairs work


def small_clip_config(tokenizer: Any, settings: LearnSettings) -> Any:
    """A small CLIPConfig: both towers `layers` deep and `width` wide."""
    from transformers import CLIPConfig

    start, end = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    tower = {
        "hidden_size": settings.width,
        "num_hidden_layers": settings.layers,
        "num_attention_heads": settings.heads,
        "intermediate_size": 4 * settings.width,
    }
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": settings.max_text_length,
        "bos_token_id": start,
        "eos_token_id": end,
        "pad_token_id": end,
    }
    vision = {**tower, "image_size": settings.image_size, "patch_size": settings.patch_size}
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=settings.projection_dim
    )


def build_small_clip(
    folder: Path, texts: Iterable[str], seed: int, settings: LearnSettings = LearnSettings()
) -> Path:
    """Write a random-init CLIP checkpoint (weights, tokenizer, image processor) to `folder`;
    a pure function of (`texts`, `seed`, `settings`). The global RNG is left untouched."""
    import transformers

    tokenizer = caption_tokenizer(texts)
    tokenizer.model_max_length = settings.max_text_length
    config = small_clip_config(tokenizer, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    side = settings.image_size
    # the PIL backend, as MMRetCLIP loads it (transformers 4 has only the PIL-backed class)
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    processor = (processor_class or transformers.CLIPImageProcessor)(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for part in (model, processor, tokenizer):
        part.save_pretrained(folder)
    record = {
        "built": "from scratch: random init, no pretrained weights",
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "settings": {k: v for k, v in vars(settings).items() if k in MODEL_SETTINGS},
    }
    write_json(folder / BUILD_RECORD, record)
    return folder


def parameter_count(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / BUILD_RECORD).read_text())["parameters"])


# the held-out composed-retrieval set ------------------------------------------------------------


@dataclass(frozen=True)
class ComposedQuery:
    """Reference scene + an instruction that changes one attribute; `targets` are every
    scene equal to the reference except for `attribute` = `value` (sorted keys)."""

    reference: str
    attribute: str
    value: Any
    targets: tuple[str, ...]
    relative_caption: str
    shared_concept: str


def _noun(shape: str, count: int) -> str:
    singular, plural = SHAPE_NOUNS[shape][0]
    return singular if count == 1 else plural


def _position_words(position: str) -> str:
    """`top-left` -> `top left`, `middle-left` -> `left`, `middle-centre` -> `centre`."""
    row, column = position.split("-")
    words = [w for w in (row, column) if w not in ("middle", "centre")]
    return " ".join(words) or "centre"


BACKGROUND_WORDS = {
    "plain": "plain",
    "gradient": "gradient",
    "striped": "striped",
    "checkered": "checkered",
    "dotted": "dotted",
    "noisy": "grainy",
}


def _count_words(count: int, scene: Mapping[str, Any]) -> str:
    number = "one" if count == 1 else COUNT_WORDS[count][0]  # "a" is not a content word
    return f"{number} {_noun(scene['shape'], count)}"


VALUE_WORDS: dict[str, Callable[[Any, Mapping[str, Any]], str]] = {
    "shape": lambda value, scene: _noun(value, scene["count"]),
    "colour": lambda value, scene: COLOUR_WORDS[value][0],
    "count": _count_words,
    "size": lambda value, scene: SIZE_WORDS[value][0],
    "position": lambda value, scene: _position_words(value),
    "texture": lambda value, scene: TEXTURE_WORDS[value][0],
    "background": lambda value, scene: f"{BACKGROUND_WORDS[value]} background",
    "background_colour": lambda value, scene: f"{COLOUR_WORDS[value][0]} background",
}


def value_words(attribute: str, value: Any, scene: Mapping[str, Any]) -> str:
    """How a caption names `attribute` = `value` in `scene` (content words only, as the
    template annotator's instructions keep them)."""
    if attribute not in VALUE_WORDS:
        raise ValueError(f"unknown scene attribute {attribute!r}")
    return VALUE_WORDS[attribute](value, scene)


def shared_concept(attribute: str, scene: Mapping[str, Any]) -> str:
    """What reference and targets share, in words (CIRCO's `shared_concept`)."""
    noun = "shapes" if attribute == "shape" else _noun(scene["shape"], 2)
    colour = "" if attribute == "colour" else COLOUR_WORDS[scene["colour"]][0] + " "
    return f"{colour}{noun}"


def composed_queries(truth: Mapping[str, Mapping[str, Any]]) -> list[ComposedQuery]:
    """Every (reference, attribute, new value) with at least one scene that matches the
    reference in all other ground-truth attributes, in key and attribute order."""
    keys = sorted(truth)
    rows = {key: tuple(truth[key][a] for a in ATTRIBUTES) for key in keys}
    queries = []
    for position, attribute in enumerate(ATTRIBUTES):
        # scenes grouped by every attribute but this one, then by this one's value
        groups: dict[tuple[Any, ...], dict[Any, list[str]]] = defaultdict(dict)
        for key in keys:
            row = rows[key]
            groups[row[:position] + row[position + 1 :]].setdefault(row[position], []).append(key)
        for key in keys:
            row = rows[key]
            found = groups[row[:position] + row[position + 1 :]]
            for value in sorted(found, key=str):
                if value != row[position]:
                    queries.append(_query(truth[key], key, attribute, value, found[value]))
    return sorted(queries, key=lambda q: (q.reference, ATTRIBUTES.index(q.attribute)))


def _query(
    scene: Mapping[str, Any], key: str, attribute: str, value: Any, targets: list[str]
) -> ComposedQuery:
    return ComposedQuery(
        reference=key,
        attribute=attribute,
        value=value,
        targets=tuple(targets),
        relative_caption=INSTRUCTION.format(value_words(attribute, value, scene)),
        shared_concept=shared_concept(attribute, scene),
    )


def hold_out(
    queries: Sequence[ComposedQuery], seed: int, share: float
) -> tuple[list[ComposedQuery], frozenset[str]]:
    """The queries of a seeded `share` of the reference scenes, and those scenes."""
    references = sorted({query.reference for query in queries})
    count = min(len(references), max(1, round(share * len(references)))) if references else 0
    picked = np.random.default_rng([seed, 5]).choice(len(references), count, replace=False)
    held = frozenset(references[i] for i in picked)
    return [query for query in queries if query.reference in held], held


# the held-out task ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusImage:
    """A corpus image by its integer id (the CIRCO-style image id) and file."""

    id: int
    path: Path


def corpus_images(run: RunDir) -> dict[str, CorpusImage]:
    """The ingested corpus: key -> (record id, source file); records without a file of their
    own (from archives) are left out."""
    table = read_corpus(run, columns=["id", "key", "path"])
    rows = zip(*(table[c].to_pylist() for c in ("key", "id", "path")), strict=True)
    return {key: CorpusImage(int(i), Path(path)) for key, i, path in rows if path}


def heldout_task(
    queries: Sequence[ComposedQuery], images: Mapping[str, CorpusImage], template: str
) -> EvalTask:
    """`queries` as a CIRCO val task over the gallery `images`, built as the CIRCO loader
    builds one (reference kept in the gallery, ground truths with the target first, the
    changed attribute as `semantic_aspects`); `template` fills the query text."""
    gallery = tuple(
        Candidate(str(image.id), ImageRef(image.path))
        for image in sorted(images.values(), key=lambda image: image.id)
    )
    built = tuple(
        EvalQuery(
            id=str(number),
            image=ImageRef(images[query.reference].path),
            text=template.format(
                relative_caption=query.relative_caption, shared_concept=query.shared_concept
            ),
            targets=tuple(str(images[key].id) for key in query.targets),
            meta={"semantic_aspects": [query.attribute]},
        )
        for number, query in enumerate(queries)
    )
    settings = {"template": template, "source": "demo --learn held-out scenes (in memory)"}
    return EvalTask("circo", "circo/val", "val", built, gallery, settings)


# training rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRows:
    """The filtered training file, its image root, and how many rows it kept of how many."""

    path: Path
    image_root: Path
    kept: int
    total: int


def kept_rows(dataset: Path, excluded_ids: set[int]) -> tuple[list[dict[str, Any]], int]:
    """The dataset's rows without the `excluded_ids` images: rows whose query or target is
    one are dropped, mined negatives that are one are removed, and a row left without a
    mined negative is dropped. Returns the kept rows and the number of rows read."""
    files, _ = dataset_files(dataset)
    table = pa.concat_tables(pq.read_table(f, columns=TRAIN_COLUMNS) for f in files)
    rows = []
    for row in table.to_pylist():
        if row["query_id"] in excluded_ids or row["target_id"] in excluded_ids:
            continue
        mined_ids = row["hard_negative_ids"] or []
        pairs = zip(row["hns"][1:], mined_ids, strict=True)
        mined = [path for path, image_id in pairs if image_id not in excluded_ids]
        if mined or not mined_ids:
            rows.append({**row, "hns": row["hns"][:1] + mined})
    return rows, table.num_rows


def shrink_image(source: Path, target: Path, side: int) -> None:
    """`source` as a PNG whose shorter side is `side` (bicubic, as CLIP's processor resizes),
    so that a training step decodes and resizes small files."""
    image = load_image(source)
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    target.parent.mkdir(parents=True, exist_ok=True)
    image.resize(size, Image.Resampling.BICUBIC).save(target, "PNG")


def write_training_data(
    dataset: Path, out_dir: Path, excluded_ids: set[int], image_side: int
) -> TrainingRows:
    """`kept_rows` as `out_dir/train.parquet`, every image they use shrunk to the model's
    input size as `out_dir/images/<n>.png` (n in order of first use)."""
    rows, total = kept_rows(dataset, excluded_ids)
    moved: dict[str, str] = {}
    for row in rows:
        for path in (row["q_img"], row["t_img"], *row["hns"]):
            moved.setdefault(path, f"images/{len(moved):06d}.png")
    root = default_image_root(dataset)  # absolute paths in the rows stay absolute
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [
            pool.submit(shrink_image, root / old, out_dir / new, image_side)
            for old, new in moved.items()
        ]
        for job in jobs:
            job.result()
    renamed = [
        {
            "q_img": moved[row["q_img"]],
            "q_text": row["q_text"],
            "t_img": moved[row["t_img"]],
            "hns": [moved[path] for path in row["hns"]],
        }
        for row in rows
    ]
    path = out_dir / "train.parquet"
    pq.write_table(pa.Table.from_pylist(renamed, schema=TRIPLET_SCHEMA), path)
    return TrainingRows(path, out_dir, len(rows), total)


# evaluation and training ----------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint: Path, task: EvalTask, output: Path, progress: bool = False
) -> dict[str, Any]:
    """CIRCO metrics of `checkpoint` on the held-out `task`, through the real engine."""
    from megapairs.evaluation.cache import checkpoint_key
    from megapairs.evaluation.engine import evaluate_tasks
    from megapairs.models.clip import MMRetCLIP

    retriever = MMRetCLIP.from_pretrained(checkpoint)
    result = evaluate_tasks(
        "circo",
        [task],
        retriever,
        checkpoint_key(checkpoint),
        output=output,
        progress=progress,
        settings=task.settings,
        model={"kind": "mmret-clip", "path": str(checkpoint)},
    )
    return result.metrics


def train_demo_config_path() -> Path:
    return Path(str(resources.files("megapairs") / "configs" / "train_demo.yaml"))


def train_small_clip(
    init: Path,
    rows: TrainingRows,
    output: Path,
    seed: int,
    steps: int,
    progress: bool,
    overrides: Sequence[str] = (),
) -> Any:
    """Train `init` on the rows with configs/train_demo.yaml (+ `overrides`); returns the
    trainer's `TrainResult`."""
    from megapairs.training.config import load_train_config
    from megapairs.training.trainer import train

    config = load_train_config(
        train_demo_config_path(),
        [
            f"model.name_or_path={json.dumps(str(init))}",
            f"data.paths={json.dumps([str(rows.path)])}",
            f"data.image_root={json.dumps(str(rows.image_root))}",
            f"output_dir={json.dumps(str(output))}",
            f"seed={seed}",
            f"data.seed={seed}",
            f"steps={steps}",
            *overrides,
        ],
    )
    return train(config, progress=progress)


# the whole step -------------------------------------------------------------------------------


@dataclass
class LearnReport:
    """What `learn` measured: held-out metrics before and after training, and the run."""

    folder: Path
    checkpoint: Path
    trained_model: Path
    task: EvalTask  # the held-out set (query text: QUERY_TEMPLATE)
    parameters: int
    queries: int
    held_out_scenes: int
    gallery: int
    training_rows: TrainingRows
    steps: int
    loss_first: float
    loss_last: float
    before: dict[str, Any]
    after: dict[str, Any]
    without_value: dict[str, Any]  # the trained model, every query's text ABLATION_TEMPLATE
    seconds: dict[str, float] = field(default_factory=dict)


def demo_texts(scenes: Mapping[str, Mapping[str, Any]], rows: TrainingRows) -> list[str]:
    """What the tokenizer learns from: the scenes' captions and the training instructions."""
    captions = [str(scene["caption"]) for scene in scenes.values() if scene.get("caption")]
    instructions = pq.read_table(rows.path, columns=["q_text"])["q_text"].to_pylist()
    return captions + [text for texts in instructions for text in texts or [] if text]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class Prepared:
    """The held-out set, the training data and the untrained checkpoint of one `learn`."""

    queries: list[ComposedQuery]
    held_out: frozenset[str]
    gallery: int
    images: dict[str, CorpusImage]  # the gallery: every scene's image
    rows: TrainingRows
    checkpoint: Path


def prepare(
    dataset: Path,
    images: Mapping[str, CorpusImage],
    truth: Mapping[str, Mapping[str, Any]],
    folder: Path,
    seed: int,
    settings: LearnSettings,
) -> Prepared:
    """Hold out composed queries (the held-out task's), write the other rows as training
    data, and build the from-scratch CLIP, under `folder`."""
    scenes = {key: scene for key, scene in truth.items() if key in images}
    queries, held = hold_out(composed_queries(scenes), seed, settings.held_out_share)
    if not queries:
        raise ValueError("no scene has a composed query with a matching target: too few scenes")
    gallery = {key: images[key] for key in scenes}
    excluded = {images[key].id for key in held}
    rows = write_training_data(dataset, folder / TRAIN_DATA_FOLDER, excluded, settings.image_size)
    init = build_small_clip(folder / INIT_FOLDER, demo_texts(scenes, rows), seed, settings)
    return Prepared(queries, held, len(scenes), gallery, rows, init)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[name]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def learn(
    dataset: Path,
    images: Mapping[str, CorpusImage],
    truth: Mapping[str, Mapping[str, Any]],
    folder: Path,
    seed: int = 0,
    progress: bool = False,
    settings: LearnSettings = LearnSettings(),
) -> LearnReport:
    """Prepare (see `prepare`), evaluate the untrained CLIP, train it on the kept rows of
    `dataset`, evaluate the trained one; everything under `folder` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    seconds: dict[str, float] = {}
    evaluations = folder / EVAL_FOLDER
    with loading_bars(progress), torch_threads(settings.torch_threads), timed(seconds, "total"):
        with timed(seconds, "prepare"):
            ready = prepare(dataset, images, truth, folder, seed, settings)
            task = heldout_task(ready.queries, ready.images, QUERY_TEMPLATE)
            ablation = heldout_task(ready.queries, ready.images, ABLATION_TEMPLATE)
        with timed(seconds, "evaluate"):
            before = evaluate_checkpoint(
                ready.checkpoint, task, evaluations / "untrained", progress
            )
        with timed(seconds, "train"):
            result = train_small_clip(
                ready.checkpoint,
                ready.rows,
                folder / TRAIN_FOLDER,
                seed,
                settings.steps,
                progress,
                settings.train_overrides,
            )
        with timed(seconds, "evaluate"):
            after = evaluate_checkpoint(result.final_model, task, evaluations / "trained", progress)
            without_value = evaluate_checkpoint(
                result.final_model, ablation, evaluations / "trained-without-value", progress
            )
    return LearnReport(
        folder=folder,
        checkpoint=ready.checkpoint,
        trained_model=result.final_model,
        task=task,
        parameters=parameter_count(ready.checkpoint),
        queries=len(ready.queries),
        held_out_scenes=len(ready.held_out),
        gallery=ready.gallery,
        training_rows=ready.rows,
        steps=result.steps,
        loss_first=_mean(result.losses[:LOSS_WINDOW]),
        loss_last=_mean(result.losses[-LOSS_WINDOW:]),
        before=before,
        after=after,
        without_value=without_value,
        seconds=seconds,
    )


def train_and_evaluate(
    run: RunDir,
    attributes_path: Path,
    seed: int = 0,
    progress: bool = True,
    settings: LearnSettings = LearnSettings(),
) -> LearnReport:
    """`learn` on a finished demo run: its exported dataset, its corpus, the ground truth
    in `attributes_path`; writes `<run>/learn/`."""
    return learn(
        run.folder(DATASET_DIR),
        corpus_images(run),
        read_attributes(attributes_path),
        run.folder(LEARN_DIR),
        seed,
        progress,
        settings,
    )


# reporting ------------------------------------------------------------------------------------


def format_learn_report(report: LearnReport) -> str:
    """The demo's lines about the learning step."""
    rows = report.training_rows
    lines = [
        f"learn: a small CLIP built FROM SCRATCH (random init, {report.parameters:,} "
        "parameters, tokenizer learned from the demo's texts): no pretrained CLIP installs "
        "offline, so absolute numbers are low; compare before with after",
        "learn: held-out composed retrieval (CIRCO metrics, in memory): "
        f"{report.queries} queries on {report.held_out_scenes} held-out scenes, gallery "
        f"{report.gallery}; query text '{INSTRUCTION.format('<new value>')}'",
        f"learn: trained {report.steps} steps on {rows.kept} of {rows.total} synthesized "
        f"triplets (rows with held-out scenes left out): loss {report.loss_first:.2f} -> "
        f"{report.loss_last:.2f} (means of the first and last {LOSS_WINDOW} steps)",
        f"  {'metric':<32} {'untrained':>9} {'trained':>9} {'no value':>9}",
    ]
    aspects = sorted(k for k in report.after if k.startswith("mAP@10/aspect/"))
    for name in (*REPORTED_METRICS, *aspects):
        values = (report.before, report.after, report.without_value)
        lines.append(f"  {name:<32} " + " ".join(f"{v.get(name, NAN):9.3f}" for v in values))
    lines.append(text_share_line(report))
    if report.queries < MIN_CHECKED_QUERIES:
        lines.append(
            f"learn: only {report.queries} held-out queries (< {MIN_CHECKED_QUERIES}): too few "
            "to check that training beats the untrained model; use more images (600 by default)"
        )
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())
    lines.append(f"learn: {seconds}; files in {report.folder}")
    return "\n".join(lines)


def text_share_line(report: LearnReport) -> str:
    """How much of the trained model's mAP@10 the instruction's new value accounts for."""
    trained, blind = report.after["mAP@10"], report.without_value["mAP@10"]
    gain = trained - report.before["mAP@10"]
    added = round(trained - blind, 3) or 0.0  # no "-0.000"
    return (
        f"learn: 'no value' = the trained model with every query's text '{ABLATION_TEMPLATE}': "
        f"the new value in the instruction adds {added:+.3f} of the {gain:+.3f} "
        "mAP@10 gain over untrained; the rest is image similarity learned in training"
    )


def learn_checks(report: LearnReport) -> list[str]:
    """Problems: training did not lower the loss, or (on a held-out set large enough to
    judge, `MIN_CHECKED_QUERIES`) did not beat the untrained model's mAP@10."""
    problems = []
    if not report.loss_last < report.loss_first:
        problems.append(
            f"learn: loss did not fall ({report.loss_first:.3f} -> {report.loss_last:.3f})"
        )
    before, after = report.before["mAP@10"], report.after["mAP@10"]
    if report.queries >= MIN_CHECKED_QUERIES and not after > before:
        problems.append(f"learn: trained mAP@10 {after:.3f} does not beat untrained {before:.3f}")
    return problems
