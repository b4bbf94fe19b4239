"""Prompt sets: loading and checking a prompt folder, per-pair sampling, rendering messages.

A prompt folder holds `describe.txt`, `instruct.txt`, `repair.txt` (string.Template text:
`${name}` placeholders, `$$` for a literal dollar sign) and `demonstrations.jsonl` (the pool
the instructor's worked examples are drawn from, one JSON object a line). The packaged folder
is `megapairs/prompts/v1`; to change the wording, copy it, edit it and set `annotate.prompts`
to the copy. A set's `version` names the folder and hashes its files, so a cache keyed by it
never mixes answers to different prompts.

Per pair, `sample_pair_settings` draws the describer's word budget, the demonstrations and a
request seed from (run seed, pair id) alone: the same pair gets the same prompts on any
machine, in any order, on any resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from megapairs.annotation.types import (
    ChatMessage,
    Demonstration,
    ImagePart,
    PairContext,
    TextPart,
)

DESCRIBE_FILE = "describe.txt"
INSTRUCT_FILE = "instruct.txt"
REPAIR_FILE = "repair.txt"
DEMONSTRATIONS_FILE = "demonstrations.jsonl"
PROMPT_FILES = (DESCRIBE_FILE, INSTRUCT_FILE, REPAIR_FILE, DEMONSTRATIONS_FILE)
NO_CAPTION = "(no caption)"
MIN_DEMONSTRATION_INSTRUCTIONS = 3
REQUEST_SEED_LIMIT = 2**31


@dataclass(frozen=True)
class Placeholders:
    """The placeholders a template must use, and those it may use besides."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def allowed(self) -> frozenset[str]:
        return self.required | self.optional


CAPTIONS = frozenset({"query_caption", "target_caption"})
COUNTS = frozenset({"min_instructions", "max_instructions"})
TEMPLATE_PLACEHOLDERS: Mapping[str, Placeholders] = {
    DESCRIBE_FILE: Placeholders(frozenset({"query_image", "target_image", "word_num"}), CAPTIONS),
    INSTRUCT_FILE: Placeholders(frozenset({"demonstrations", "description"}) | COUNTS, CAPTIONS),
    REPAIR_FILE: Placeholders(frozenset({"problem"}), COUNTS),
}
IMAGE_PLACEHOLDERS = ("query_image", "target_image")  # in this order, once each
DEMONSTRATION_KEYS = Placeholders(
    frozenset({"id", "relation", "description", "instructions"}), CAPTIONS
)


class PromptError(ValueError):
    """A prompt folder that cannot be used; the message names the file."""


@dataclass(frozen=True)
class PromptSet:
    """The templates and demonstrations of one prompt folder."""

    name: str  # the folder's name ("v1" for the packaged prompts)
    version: str  # f"{name}-{first 8 hex digits of the sha256 of the prompt files}"
    describe: str
    instruct: str
    repair: str
    demonstrations: tuple[Demonstration, ...]


@dataclass(frozen=True)
class PairSettings:
    """What is drawn per pair: the word budget, the demonstrations and the request seed."""

    word_num: int
    demonstration_indices: tuple[int, ...]
    request_seed: int


def packaged_prompts_dir() -> Path:
    """The folder of the packaged prompts (`megapairs/prompts/v1`)."""
    return Path(str(resources.files("megapairs") / "prompts" / "v1"))


def load_prompts(folder: str | Path | None = None) -> PromptSet:
    """The prompt set in `folder` (None or "": the packaged one), checked; raises PromptError."""
    root = Path(folder) if folder else packaged_prompts_dir()
    if not root.is_dir():
        raise PromptError(f"{root}: prompt folder not found")
    data = {name: _read_bytes(root / name) for name in PROMPT_FILES}
    texts = {name: _decode(root / name, data[name]) for name in PROMPT_FILES}
    for name, placeholders in TEMPLATE_PLACEHOLDERS.items():
        _check_template(root / name, texts[name], placeholders)
    _check_image_order(root / DESCRIBE_FILE, texts[DESCRIBE_FILE])
    digest = hashlib.sha256()
    for name in PROMPT_FILES:
        digest.update(name.encode() + b"\0" + data[name] + b"\0")
    return PromptSet(
        name=root.resolve().name,
        version=f"{root.resolve().name}-{digest.hexdigest()[:8]}",
        describe=texts[DESCRIBE_FILE].rstrip(),
        instruct=texts[INSTRUCT_FILE].rstrip(),
        repair=texts[REPAIR_FILE].rstrip(),
        demonstrations=_parse_demonstrations(
            root / DEMONSTRATIONS_FILE, texts[DEMONSTRATIONS_FILE]
        ),
    )


def sample_pair_settings(
    pair_id: str,
    seed: int,
    word_range: tuple[int, int],
    num_demonstrations: int,
    pool_size: int,
) -> PairSettings:
    """The settings of one pair, a function of (seed, pair_id) only: word_num uniform in the
    inclusive `word_range`, `num_demonstrations` distinct pool indices, a request seed."""
    low, high = word_range
    if not 1 <= low <= high:
        raise ValueError(f"word_range must satisfy 1 <= low <= high, got {word_range}")
    if not 0 <= num_demonstrations <= pool_size:
        raise ValueError(
            f"cannot draw {num_demonstrations} demonstrations from a pool of {pool_size}"
        )
    rng = np.random.default_rng([seed % 2**64, _stable_hash(pair_id)])
    word_num = int(rng.integers(low, high, endpoint=True))
    indices = rng.choice(pool_size, size=num_demonstrations, replace=False)
    request_seed = int(rng.integers(0, REQUEST_SEED_LIMIT))
    return PairSettings(word_num, tuple(int(i) for i in indices), request_seed)


def pair_context(
    pair_id: str,
    query_caption: str | None,
    target_caption: str | None,
    settings: PairSettings,
    prompts: PromptSet,
) -> PairContext:
    """The structured context of one pair, with its drawn demonstrations."""
    return PairContext(
        pair_id=pair_id,
        query_caption=query_caption,
        target_caption=target_caption,
        word_num=settings.word_num,
        demonstrations=tuple(prompts.demonstrations[i] for i in settings.demonstration_indices),
    )


def describe_messages(
    prompts: PromptSet, context: PairContext, query_image: bytes, target_image: bytes
) -> tuple[ChatMessage, ...]:
    """The describer request: one user message, the two images where the template puts them."""
    values = {
        "query_caption": caption_text(context.query_caption),
        "target_caption": caption_text(context.target_caption),
        "word_num": str(context.word_num),
    }
    images = {"query_image": ImagePart(query_image), "target_image": ImagePart(target_image)}
    parts: list[TextPart | ImagePart] = []
    for chunk, image in _split_at_images(prompts.describe):
        text = Template(chunk).substitute(values)
        if text:
            parts.append(TextPart(text))
        if image is not None:
            parts.append(images[image])
    return (ChatMessage("user", tuple(parts)),)


def instruct_messages(
    prompts: PromptSet, context: PairContext, min_instructions: int, max_instructions: int
) -> tuple[ChatMessage, ...]:
    """The instructor request: one user message with the demonstrations and the description."""
    text = Template(prompts.instruct).substitute(
        demonstrations=render_demonstrations(context.demonstrations),
        description=context.description,
        query_caption=caption_text(context.query_caption),
        target_caption=caption_text(context.target_caption),
        min_instructions=str(min_instructions),
        max_instructions=str(max_instructions),
    )
    return (_user(text),)


def repair_messages(
    prompts: PromptSet,
    instruct: tuple[ChatMessage, ...],
    context: PairContext,
    min_instructions: int,
    max_instructions: int,
) -> tuple[ChatMessage, ...]:
    """The instruct conversation, the refused answer, and a request to fix `context.problem`."""
    text = Template(prompts.repair).substitute(
        problem=context.problem,
        min_instructions=str(min_instructions),
        max_instructions=str(max_instructions),
    )
    answer = ChatMessage("assistant", (TextPart(context.previous_output),))
    return (*instruct, answer, _user(text))


def render_demonstrations(demonstrations: Sequence[Demonstration]) -> str:
    """The numbered examples block of the instructor prompt."""
    return "\n\n".join(
        f"Example {number}\n"
        f"Query caption: {caption_text(demo.query_caption)}\n"
        f"Target caption: {caption_text(demo.target_caption)}\n"
        f"Description: {demo.description}\n"
        f"Answer: {json.dumps({'instructions': list(demo.instructions)}, ensure_ascii=False)}"
        for number, demo in enumerate(demonstrations, start=1)
    )


def caption_text(caption: str | None) -> str:
    """A caption as the prompts show it; a missing or blank one as "(no caption)"."""
    return caption.strip() if caption and caption.strip() else NO_CAPTION


def _user(text: str) -> ChatMessage:
    return ChatMessage("user", (TextPart(text),))


def _stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that does not change between processes (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _placeholder_names(text: str) -> list[str]:
    """The placeholder names in `text`, in order, repeats included."""
    return [
        m.group("named") or m.group("braced")
        for m in Template.pattern.finditer(text)
        if m.group("named") or m.group("braced")
    ]


def _split_at_images(template: str) -> list[tuple[str, str | None]]:
    """(text before, image placeholder or None) pieces of a describe template."""
    pieces: list[tuple[str, str | None]] = []
    start = 0
    for m in Template.pattern.finditer(template):
        name = m.group("named") or m.group("braced")
        if name in IMAGE_PLACEHOLDERS:
            pieces.append((template[start : m.start()], name))
            start = m.end()
    pieces.append((template[start:], None))
    return pieces


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise PromptError(f"{path}: missing; a prompt folder needs {', '.join(PROMPT_FILES)}")
    return path.read_bytes()


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptError(f"{path}: not UTF-8 text ({error})") from None


def _check_template(path: Path, text: str, placeholders: Placeholders) -> None:
    template = Template(text)
    if not template.is_valid():
        raise PromptError(f"{path}: a '$' that starts no placeholder (write $$ for a dollar sign)")
    used = set(_placeholder_names(text))
    if missing := placeholders.required - used:
        raise PromptError(f"{path}: missing placeholder(s) {_names(missing)}")
    if unknown := used - placeholders.allowed:
        raise PromptError(
            f"{path}: unknown placeholder(s) {_names(unknown)}; "
            f"allowed: {_names(placeholders.allowed)}"
        )


def _check_image_order(path: Path, text: str) -> None:
    images = [name for name in _placeholder_names(text) if name in IMAGE_PLACEHOLDERS]
    if tuple(images) != IMAGE_PLACEHOLDERS:
        raise PromptError(
            f"{path}: needs ${{query_image}} then ${{target_image}}, once each; found "
            f"{', '.join(images)}"
        )


def _names(names: frozenset[str] | set[str]) -> str:
    return ", ".join(f"${{{name}}}" for name in sorted(names))


def _parse_demonstrations(path: Path, text: str) -> tuple[Demonstration, ...]:
    demonstrations: list[Demonstration] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        demo = _parse_demonstration(f"{path}, line {number}", line)
        if demo.id in seen:
            raise PromptError(f"{path}, line {number}: duplicate id {demo.id!r}")
        seen.add(demo.id)
        demonstrations.append(demo)
    return tuple(demonstrations)


def _parse_demonstration(where: str, line: str) -> Demonstration:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise PromptError(f"{where}: expected a JSON object")
    keys = DEMONSTRATION_KEYS
    if missing := keys.required - record.keys():
        raise PromptError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
    if unknown := record.keys() - keys.allowed:
        raise PromptError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in sorted(record.keys() - {"instructions"}):
        if not isinstance(record[key], str):
            raise PromptError(f"{where}: {key} must be a string")
    instructions = record["instructions"]
    if not isinstance(instructions, list) or not all(isinstance(i, str) for i in instructions):
        raise PromptError(f"{where}: instructions must be a list of strings")
    if len(instructions) < MIN_DEMONSTRATION_INSTRUCTIONS:
        raise PromptError(
            f"{where}: {len(instructions)} instructions, at least "
            f"{MIN_DEMONSTRATION_INSTRUCTIONS} are needed"
        )
    return Demonstration(
        id=record["id"],
        relation=record["relation"],
        description=record["description"],
        instructions=tuple(instructions),
        query_caption=record.get("query_caption", ""),
        target_caption=record.get("target_caption", ""),
    )
