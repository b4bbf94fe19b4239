"""`megapairs export-model`: a trained MMRet retriever as a sentence-transformers model
folder, with a model card.

`export_sentence_transformers` (MMRet-CLIP, or any CLIP checkpoint) writes one folder that
is at once a sentence-transformers model (`modules.json` names
`megapairs.models.st_export.MMRetCLIPModule`; load it with `trust_remote_code=True`, which
sentence-transformers >= 6 asks for any class outside its package), an MMRet-CLIP checkpoint
(`build_retriever("mmret-clip", folder)`) and a transformers CLIP checkpoint, plus a
`README.md` model card. `write_model_card` writes the card alone; it is the only export of
an MMRet-MLLM checkpoint (sentence-transformers export is CLIP-only).

A model path is a folder `MMRetCLIP/MMRetMLLM.save_pretrained` wrote, a trainer's `final/`
or `best/`, a `checkpoint-<step>/` (its `model/` is used) or a training output folder (its
`final/`). The card reads the training record beside the weights (`megapairs_training.json`,
or the checkpoint's `trainer_state.json`): steps, the whole config, and each training
dataset's `dataset_info.json` counts when that folder is readable here.

Heavy imports (torch, transformers, sentence-transformers) happen on use, so registering
the command costs the CLI nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("sentence-transformers", "card")
CARD_FILE = "README.md"
TRAINING_RECORD = "megapairs_training.json"  # training.trainer.TRAINING_RECORD
TRAINER_STATE = "trainer_state.json"  # training.trainer.STATE_FILE
DATASET_INFO = "dataset_info.json"  # dataset.export.INFO_FILE
SETTINGS_FILES = {"mmret-clip": "mmret_clip.json", "mmret-mllm": "mmret_mllm.json"}
"""What each MMRet model's `save_pretrained` writes beside its weights (models.clip/mllm)."""
MODEL_MARKERS = (*SETTINGS_FILES.values(), "config.json", "adapter_config.json")
CARD_KEYS = ("title", "base_model", "license", "description")
"""Keys of `card` the card uses by name; any other key becomes a line under "Details"."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint to export: its folder, kind (`mmret-clip`, `clip` (a CLIP folder
    without MMRet settings), `mmret-mllm`), saved settings and training record."""

    folder: Path
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def is_clip(self) -> bool:
        return self.kind in ("mmret-clip", "clip")

    @property
    def config(self) -> dict[str, Any]:
        """The training config ({} when none was recorded)."""
        return dict(self.training.get("config") or {})

    def base_model(self) -> str | None:
        """The checkpoint training started from, when recorded."""
        named = (self.config.get("model") or {}).get("name_or_path")
        adapter = _read_json(self.folder / "adapter_config.json").get("base_model_name_or_path")
        return named or adapter or None


# public API -------------------------------------------------------------------------


def export_sentence_transformers(
    model_path: str | Path, out_dir: str | Path, *, card: dict[str, Any] | None = None
) -> Path:
    """Write `out_dir` (new or empty): a sentence-transformers model of the MMRet-CLIP
    checkpoint at `model_path` and its `README.md` card (`card`: see `model_card`).
    Returns `out_dir`. FileNotFoundError for a missing path; ValueError for a folder that is
    not an MMRet checkpoint, an MMRet-MLLM one, or a non-empty `out_dir`."""
    source = inspect_checkpoint(model_path)
    if not source.is_clip:
        raise ValueError(
            f"{str(source.folder)!r} is an {source.kind} checkpoint: sentence-transformers "
            "export is CLIP-only (use --format card to write its model card)"
        )
    out = _empty_folder(out_dir)
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _sentence_transformer(source).save(str(staging), create_model_card=False)
        (staging / CARD_FILE).write_text(model_card(source, card, sentence_transformers=True))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out


def write_model_card(
    model_path: str | Path, out_dir: str | Path, *, card: dict[str, Any] | None = None
) -> Path:
    """Write the model card of the checkpoint at `model_path` (MMRet-CLIP or MMRet-MLLM) as
    `out_dir/README.md` (`out_dir` is created); returns the card's path."""
    source = inspect_checkpoint(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CARD_FILE
    path.write_text(model_card(source, card, sentence_transformers=False))
    return path


def inspect_checkpoint(model_path: str | Path) -> ModelSource:
    """What `model_path` holds (see the module docstring for the folders accepted)."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"no model folder at {str(path)!r}")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; pass a model folder")
    folder = _model_folder(path)
    return ModelSource(folder, _kind(folder), _settings(folder), _training_record(folder))


# sentence-transformers ----------------------------------------------------------------


def _sentence_transformer(source: ModelSource) -> Any:
    from sentence_transformers import SentenceTransformer

    from megapairs.models.clip import MMRetCLIP
    from megapairs.models.st_export import MMRetCLIPModule

    model = MMRetCLIP.from_pretrained(source.folder, **_clip_options(source))
    return SentenceTransformer(
        modules=[MMRetCLIPModule(model)],
        prompts={"query": model.task_instruction or "", "document": ""},
        similarity_fn_name="cosine",
        device="cpu",
    )


def _clip_options(source: ModelSource) -> dict[str, Any]:
    """The text length training used (its config's `model.max_text_length`), if any."""
    length = (source.config.get("model") or {}).get("max_text_length")
    return {} if length is None else {"max_text_length": int(length)}


# the model card -----------------------------------------------------------------------


def model_card(
    source: ModelSource, card: dict[str, Any] | None = None, *, sentence_transformers: bool
) -> str:
    """The card (markdown with YAML front matter). `card` adds or overrides: `title`,
    `base_model`, `license`, `description`; any other key is listed under "Details"."""
    extra = dict(card or {})
    base = extra.get("base_model") or source.base_model()
    title = extra.get("title") or f"{source.kind} ({source.folder.name})"
    sections = [
        _front_matter(source, base, extra.get("license"), sentence_transformers),
        f"# {title}\n",
        _summary(source, base, extra.get("description")),
        _usage(source) if sentence_transformers else _megapairs_usage(source),
        _training(source),
        _details(extra),
        _license(base, extra.get("license")),
    ]
    return "\n".join(section for section in sections if section)


def _front_matter(
    source: ModelSource, base: str | None, license_id: str | None, sentence_transformers: bool
) -> str:
    tags = ["megapairs", "mmret", "composed-image-retrieval", "multimodal-retrieval"]
    lines = ["---", f"license: {license_id}"] if license_id else ["---"]
    if sentence_transformers:
        lines += ["library_name: sentence-transformers", "pipeline_tag: feature-extraction"]
        tags = ["sentence-transformers", "feature-extraction", *tags]
    if base and not Path(base).exists():  # a hub name, not a local folder
        lines.append(f"base_model: {base}")
    lines += ["tags:", *(f"- {tag}" for tag in tags), "---\n"]
    return "\n".join(lines)


def _summary(source: ModelSource, base: str | None, description: str | None) -> str:
    kind = {
        "mmret-clip": "an MMRet-CLIP retriever (MegaPairs): a CLIP dual encoder whose composed "
        "image + text embedding is score fusion, normalize(image features + text features)",
        "clip": "a CLIP checkpoint without MMRet settings (a released BGE-VL-CLIP, or the "
        "zero-shot `clip` baseline), used as MMRet-CLIP does (score fusion)",
        "mmret-mllm": "an MMRet-MLLM retriever (MegaPairs): a LLaVA-NeXT whose embedding is the "
        "final token's last hidden state",
    }[source.kind]
    task = source.settings.get("task_instruction")
    lines = [description + "\n"] if description else []
    lines += [
        f"This is {kind}. Every embedding has unit length: rank by dot product (= cosine).\n",
        f"- Base model: `{base}`" if base else "- Base model: not recorded",
        f"- Task instruction: `{task}`" if task else "- Task instruction: none",
    ]
    if source.kind == "mmret-mllm":
        lines.append(f"- Image size: {source.settings.get('image_size')} px")
    return "\n".join(lines) + "\n"


def _usage(source: ModelSource) -> str:
    task = source.settings.get("task_instruction")
    query_note = (
        f'`encode_query` prepends the task instruction (`prompts["query"]` = `{task}`) as '
        'MMRet-CLIP\'s `encode_queries` does: `"{instruction} {text}"`, and an image alone '
        "becomes the composed (image, instruction) item."
        if task
        else "The checkpoint has no task instruction: `encode_query` equals `encode`."
    )
    return f"""## Usage (sentence-transformers)

Needs `pip install megapairs` (it provides `megapairs.models.st_export.MMRetCLIPModule`,
which `modules.json` names) and sentence-transformers >= 6. sentence-transformers asks for
`trust_remote_code=True` before importing a module class from outside its own package: this
folder holds no code, the class is imported from the installed megapairs.

```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder", trust_remote_code=True)
images = model.encode([Image.open("cat.jpg")])                 # candidates: images
texts = model.encode(["a cat on a red sofa"])                   # candidates: texts
queries = model.encode_query([{{"image": Image.open("cat.jpg"), "text": "the same cat outdoors"}}])
scores = model.similarity(queries, images)
```

Input forms, one per `encode` call: a PIL image (or a local image path), a string, or a
composed item `{{"image": image, "text": text}}` (score fusion). {query_note}

The folder is also an MMRet-CLIP checkpoint:
`megapairs.models.base.build_retriever("mmret-clip", "path/to/this/folder")`.
"""


def _megapairs_usage(source: ModelSource) -> str:
    return f"""## Usage (megapairs)

```python
from megapairs.models.base import build_retriever

model = build_retriever("{source.kind}", "path/to/the/checkpoint")
queries = model.encode_queries(images, texts)      # images: PIL images or paths
candidates = model.encode_candidates(images, None)
```

sentence-transformers export is CLIP-only: this {source.kind} checkpoint has this card only.
"""


def _training(source: ModelSource) -> str:
    record, config = source.training, source.config
    if not record:
        return "## Training\n\nNo training record beside the weights.\n"
    steps = record.get("steps", record.get("step"))
    lines = ["## Training\n", f"- Steps: {steps}"]
    lines += [f"- {name}: {value}" for name, value in _training_settings(config)]
    lines += _dataset_lines((config.get("data") or {}).get("paths") or [])
    if "best" in record:
        lines.append(f"- Best evaluation: `{json.dumps(record['best'], sort_keys=True)}`")
    lines += ["", "<details><summary>Training config</summary>\n", "```json"]
    lines += [json.dumps(config, indent=2, sort_keys=True), "```\n", "</details>\n"]
    return "\n".join(lines)


def _training_settings(config: dict[str, Any]) -> list[tuple[str, Any]]:
    data, optim = config.get("data") or {}, config.get("optim") or {}
    settings = [
        ("Batch size (queries per process)", config.get("batch_size")),
        ("Temperature", config.get("temperature")),
        ("Learning rate", optim.get("lr")),
        ("Negatives", f"{data.get('negative_strategy')} x {data.get('num_negatives')}"),
        ("Mixed precision", config.get("mixed_precision")),
    ]
    return [(name, value) for name, value in settings if value is not None]


def _dataset_lines(paths: list[str]) -> list[str]:
    """One line per training dataset, with its dataset_info.json counts when readable."""
    lines = []
    for path in paths:
        info = _read_json(Path(path) / DATASET_INFO)
        counts = info.get("counts") or {}
        stats = ", ".join(f"{key} {counts[key]}" for key in ("rows", "pairs") if key in counts)
        digest = f", config hash `{info['config_hash']}`" if info.get("config_hash") else ""
        lines.append(f"- Dataset `{path}`: {stats or 'no dataset_info.json here'}{digest}")
    return lines


def _details(extra: dict[str, Any]) -> str:
    rest = {key: value for key, value in extra.items() if key not in CARD_KEYS}
    if not rest:
        return ""
    return "## Details\n\n" + "\n".join(f"- {key}: {value}" for key, value in rest.items()) + "\n"


def _license(base: str | None, license_id: str | None) -> str:
    stated = f"This model is released under `{license_id}`. " if license_id else ""
    origin = f"`{base}`" if base else "the base model"
    return (
        f"## License\n\n{stated}The weights derive from {origin}: its license applies too. "
        "MegaPairs training data is synthesised from an image corpus; its images and "
        "captions keep their sources' licenses and terms.\n"
    )


# finding the checkpoint ---------------------------------------------------------------


def _model_folder(path: Path) -> Path:
    """`path` itself when it holds a model, else a checkpoint's `model/` or a training
    output's `final/`; ValueError when none does."""
    for folder in (path, path / "model", path / "final"):
        if any((folder / marker).is_file() for marker in MODEL_MARKERS):
            return folder
    raise ValueError(
        f"{str(path)!r} is not an MMRet checkpoint: it holds no model "
        f"({', '.join(MODEL_MARKERS)}); pass a folder `megapairs train` wrote (final/, best/, "
        "checkpoint-<step>/) or one MMRetCLIP/MMRetMLLM.save_pretrained wrote"
    )


def _kind(folder: Path) -> str:
    for kind, name in SETTINGS_FILES.items():
        if (folder / name).is_file():
            return kind
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type == "clip":
        return "clip"
    raise ValueError(
        f"{str(folder)!r} is not an MMRet checkpoint: no {' or '.join(SETTINGS_FILES.values())}, "
        f"and its config names model_type {model_type!r}, not 'clip'"
    )


def _settings(folder: Path) -> dict[str, Any]:
    return next(
        (
            _read_json(folder / name)
            for name in SETTINGS_FILES.values()
            if (folder / name).is_file()
        ),
        {},
    )


def _training_record(folder: Path) -> dict[str, Any]:
    """The record beside the weights, or the checkpoint state above a `model/` folder."""
    record = _read_json(folder / TRAINING_RECORD)
    if not record and folder.name == "model":
        record = _read_json(folder.parent / TRAINER_STATE)
    return record


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when missing or unreadable (a card is best effort)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _empty_folder(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{str(out)!r} exists and is not an empty folder: choose a new --out")
    return out


# the command --------------------------------------------------------------------------


def add_export_model_command(commands: argparse._SubParsersAction) -> None:
    """`export-model`: a trained MMRet-CLIP as a sentence-transformers folder + card."""
    text = (
        "export a trained MMRet model: --format sentence-transformers (MMRet-CLIP only) "
        "writes a folder that SentenceTransformer(DIR, trust_remote_code=True) loads (needs "
        "megapairs installed: the module class comes from it), with a model card; "
        "--format card writes the README.md card alone (MMRet-CLIP or MMRet-MLLM)"
    )
    export = commands.add_parser("export-model", help=text, description=text)
    export.add_argument(
        "--model",
        required=True,
        help="the checkpoint: final/, best/ or checkpoint-<step>/ of `megapairs train`, "
        "or a folder MMRetCLIP/MMRetMLLM.save_pretrained wrote",
    )
    export.add_argument("--out", required=True, help="folder to write (new or empty)")
    export.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="what to write")
    export.add_argument("--license", help="the license to state in the card (e.g. mit)")
    export.set_defaults(handler=cmd_export_model)


def cmd_export_model(args: argparse.Namespace) -> int:
    card = {"license": args.license} if args.license else None
    if args.format == "card":
        written = write_model_card(args.model, args.out, card=card)
    else:
        written = export_sentence_transformers(args.model, args.out, card=card)
    print(f"wrote {written}")
    return 0
