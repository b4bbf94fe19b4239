"""Checks on model answers: the describer's description and the instructor's instructions.

Pure functions over the raw text a backend returned. `check_instructions` parses the
instructor's JSON and drops, with a reason, every instruction that is empty, too short or
too long, refers to the images by order or position ("the second image", "the former"),
restates the target caption, or repeats an accepted one. Its `problem` is a sentence the
repair prompt can quote back to the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MIN_DESCRIPTION_WORDS = 5
RESTATE_JACCARD = 0.8  # token-set overlap at which an instruction restates the caption

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_UNCLOSED_THINK = re.compile(r"<think>.*", re.DOTALL | re.IGNORECASE)
_THINK_END = re.compile(r"^.*</think>", re.DOTALL | re.IGNORECASE)

_IMAGE = r"(?:image|picture|photo|photograph|pic|img)"
_IMAGES = r"(?:images|pictures|photos|photographs|pics|imgs)"
_IMAGE_ORDER_PATTERNS = (
    # "first image", "2nd picture", "left photo", "the target image"; not "a second picture frame"
    rf"(?<!\ba\s)(?<!\ban\s)\b(?:first|second|1st|2nd|former|latter|left|right|previous"
    rf"|query|target|reference)[\s-]+{_IMAGE}s?\b",
    rf"\b{_IMAGE}\s*(?:#\s*)?(?:1|2|one|two)\b",  # "image 1", "picture two"
    r"\bthe\s+(?:former|latter)\b",
    r"\bthe\s+(?:first|second|1st|2nd)\s+one\b",
    rf"\b(?:both|the\s+two|these\s+two|those\s+two|the\s+2)\s+{_IMAGES}\b",
    rf"\b(?:either|neither|the\s+other)\s+{_IMAGE}\b",
)
IMAGE_ORDER = re.compile("|".join(_IMAGE_ORDER_PATTERNS), re.IGNORECASE)

# Words left out when comparing an instruction with the target caption: function words and
# the words of a search request ("find me a photo of ..."), which say nothing about content.
_IGNORED_TEXT = """
a an the of in on at to for with and or but by from into onto over as is are it its this that
these those there some one find show search look looking me i want need get give photo photos
picture pictures image images pic shot
"""
IGNORED_WORDS = frozenset(_IGNORED_TEXT.split())

_REASON_TEXT = {
    "empty": "it is empty",
    "too_short": "it has fewer than {low} words",
    "too_long": "it has more than {high} words",
    "mentions_image_order": (
        "it refers to the images by order or position instead of describing what to find"
    ),
    "restates_target_caption": "it only restates the target caption",
    "duplicate": "it repeats another instruction",
    "beyond_max": "at most {max_count} instructions are kept",
}


class ParseError(ValueError):
    """An instructor answer that holds no list of instructions."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem  # a sentence for the repair prompt


@dataclass(frozen=True)
class InstructionCheck:
    """The instructions kept, those dropped ("reason: text") and why the answer failed."""

    accepted: tuple[str, ...]
    dropped: tuple[str, ...]
    reason: str | None  # None when at least min_instructions were accepted
    problem: str  # "" when reason is None


def strip_reasoning(text: str) -> str:
    """`text` without <think>...</think> blocks (reasoning models) and outer whitespace."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_END.sub("", text)  # a block whose opening tag the server swallowed
    text = _UNCLOSED_THINK.sub("", text)  # reasoning cut off before its end
    return text.strip()


def check_description(raw: str) -> tuple[str, str | None]:
    """The cleaned description (whitespace collapsed) and a failure reason, or None."""
    text = " ".join(strip_reasoning(raw).split())
    if not text:
        return text, "empty_description"
    if len(text.split()) < MIN_DESCRIPTION_WORDS:
        return text, "too_short_description"
    return text, None


def parse_instructions(raw: str) -> list[str]:
    """The instructions of an answer `{"instructions": [...]}`, also when fenced, surrounded by
    text, or given as a bare JSON list of strings; raises `ParseError` otherwise."""
    text = strip_reasoning(raw)
    if not text:
        raise ParseError("the answer was empty.")
    value = _first_json_value(text)
    if isinstance(value, dict):
        if "instructions" not in value:
            keys = ", ".join(json.dumps(k) for k in value) or "none"
            raise ParseError(
                f'the JSON object has no "instructions" key (its keys: {keys}); '
                'use exactly {"instructions": [...]}.'
            )
        value = value["instructions"]
    if not isinstance(value, list):
        raise ParseError(f'"instructions" must be a list of strings, not {_json_kind(value)}.')
    for number, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise ParseError(
                f"instruction {number} is {_json_kind(item)}, but every instruction "
                "must be a string."
            )
    return value


def check_instructions(
    raw: str,
    target_caption: str | None,
    min_instructions: int,
    max_instructions: int,
    word_bounds: tuple[int, int],
) -> InstructionCheck:
    """Parse an instructor answer and keep the usable, distinct instructions (at most
    `max_instructions`); `reason` is "unparseable" or "too_few_instructions" on failure."""
    try:
        items = parse_instructions(raw)
    except ParseError as error:
        return InstructionCheck((), (), "unparseable", error.problem)
    accepted: list[str] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        text = " ".join(item.split())
        reason = _drop_reason(text, target_caption, word_bounds, seen)
        if reason is None and len(accepted) >= max_instructions:
            reason = "beyond_max"
        if reason is None:
            accepted.append(text)
            seen.add(_dedupe_key(text))
        else:
            dropped.append((reason, text))
    dropped_tags = tuple(f"{reason}: {text}" for reason, text in dropped)
    if len(accepted) >= min_instructions:
        return InstructionCheck(tuple(accepted), dropped_tags, None, "")
    problem = _too_few_problem(
        len(accepted), dropped, (min_instructions, max_instructions), word_bounds
    )
    return InstructionCheck(tuple(accepted), dropped_tags, "too_few_instructions", problem)


def mentions_image_order(text: str) -> bool:
    """Whether `text` refers to the images as a set or by order ("the second image")."""
    return IMAGE_ORDER.search(text) is not None


def restates_caption(text: str, caption: str | None) -> bool:
    """Whether `text` is the caption again: equal once normalised, or a token-set Jaccard
    of at least 0.8 over lowercase words outside `IGNORED_WORDS`. A None caption never is."""
    if not caption or not caption.strip():
        return False
    if _dedupe_key(text) == _dedupe_key(caption):
        return True
    ours, theirs = _content_words(text), _content_words(caption)
    if not ours or not theirs:
        return False
    return len(ours & theirs) / len(ours | theirs) >= RESTATE_JACCARD


def _drop_reason(
    text: str, target_caption: str | None, word_bounds: tuple[int, int], seen: set[str]
) -> str | None:
    low, high = word_bounds
    words = len(text.split())
    if not text:
        return "empty"
    if words < low:
        return "too_short"
    if words > high:
        return "too_long"
    if mentions_image_order(text):
        return "mentions_image_order"
    if restates_caption(text, target_caption):
        return "restates_target_caption"
    if _dedupe_key(text) in seen:
        return "duplicate"
    return None


def _too_few_problem(
    accepted: int,
    dropped: list[tuple[str, str]],
    count_bounds: tuple[int, int],
    word_bounds: tuple[int, int],
) -> str:
    min_instructions, max_instructions = count_bounds
    low, high = word_bounds
    head = (
        f"only {accepted} usable instruction{'s' if accepted != 1 else ''} "
        f"{'were' if accepted != 1 else 'was'} given, but at least {min_instructions} "
        "distinct ones are needed."
    )
    if not dropped:
        return head
    explained = "; ".join(
        f"{json.dumps(text, ensure_ascii=False)} was dropped because "
        + _REASON_TEXT[reason].format(low=low, high=high, max_count=max_instructions)
        for reason, text in dropped
    )
    return f"{head} {explained}."


def _first_json_value(text: str) -> object:
    """The outermost JSON value in `text` that is an object with "instructions" or a list of
    strings, scanning from the left and never inside a value that parsed; failing that, the
    first value that parsed (for a precise error)."""
    decoder = json.JSONDecoder()
    first: list[object] = []
    resume = 0
    for match in re.finditer(r"[{\[]", text):
        if match.start() < resume:
            continue  # inside a value already parsed
        try:
            value, resume = decoder.raw_decode(text, match.start())
        except RecursionError:  # a looping answer of thousands of nested brackets
            raise ParseError(
                "the answer nests brackets too deeply to be the JSON asked for."
            ) from None
        except json.JSONDecodeError:
            continue
        if (isinstance(value, dict) and "instructions" in value) or _is_string_list(value):
            return value
        if not first:
            first.append(value)
    if first:
        return first[0]
    raise ParseError(
        'the answer is not valid JSON; reply with a JSON object like {"instructions": [...]}.'
    )


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return kinds.get(type(value), type(value).__name__)


def _dedupe_key(text: str) -> str:
    """Lowercase words without punctuation: "Show it, red!" == "show it red"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower().replace("'", "")).split())


def _content_words(text: str) -> set[str]:
    return set(_dedupe_key(text).split()) - IGNORED_WORDS
