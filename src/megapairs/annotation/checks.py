"""Checks on model answers: the describer's description and the instructor's instructions.

Pure functions over the raw text a backend returned. `check_instructions` parses the
instructor's JSON and drops, with a reason, every instruction that is empty, too short or
too long, refers to the images by order or position ("the second image", "the former"),
restates the target caption, copies a demonstration's instruction, shares no content word
with the pair's description and captions (`grounding="lexical"`), or repeats an accepted one.
Its `problem` is a sentence the repair prompt can quote back to the model. `check_description`
also refuses degenerate text: a looping token or phrase, or mostly non-words.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from megapairs.annotation.types import Demonstration

MIN_DESCRIPTION_WORDS = 5
RESTATE_JACCARD = 0.8  # token-set overlap at which an instruction restates the caption

# Degenerate descriptions. Natural English keeps its most common word ("the") under ~15% of
# the tokens and repeats almost no word 3-gram; a looping answer breaks both at once.
LOOP_MIN_TOKENS = 12  # fewer tokens are too few to measure a share or a 3-gram ratio
MAX_TOKEN_SHARE = 0.4  # most common token's share of all tokens
MIN_DISTINCT_TRIGRAMS = 0.6  # distinct word 3-grams / all word 3-grams
MIN_WORD_SHARE = 0.6  # tokens that look like words / all tokens
COPY_NGRAM = 3  # word n-grams compared with demonstration instructions
GROUNDING_MODES = ("lexical", "off")

_WORD = re.compile(r"[^\W\d_]+(?:[.'\u2019-][^\W\d_]+)*")  # letters; inner ' - . allowed
_LEAD_PUNCT = "\"'\u201c\u2018\u00ab([{*"  # opening quotes, brackets, markdown emphasis
_TRAIL_PUNCT = ".,;:!?\"'\u201d\u2019\u00bb)]}*\u2026"

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

# Words besides IGNORED_WORDS that do not ground an instruction in the pair: pronouns,
# auxiliaries and the vocabulary of a request for something alike ("same", "instead").
_STOP_TEXT = """
be been being was were am has have had do does did can could would should will may might
he she they them their his her him we us our you your my mine im not no nor so than then
too very just only also more most less such what which who whom where when how why all any
each both other another same similar different instead like version kind sort something
someone thing things but if while about up out off again here now
"""
GROUNDING_STOP_WORDS = IGNORED_WORDS | frozenset(_STOP_TEXT.split())

_REASON_TEXT = {
    "empty": "it is empty",
    "too_short": "it has fewer than {low} words",
    "too_long": "it has more than {high} words",
    "mentions_image_order": (
        "it refers to the images by order or position instead of describing what to find"
    ),
    "restates_target_caption": "it only restates the target caption",
    "copied_demonstration": "it copies an example instruction instead of describing this pair",
    "ungrounded": (
        "it names nothing from this pair's description or captions (no shared content word)"
    ),
    "duplicate": "it repeats another instruction",
    "beyond_max": "at most {max_count} instructions are kept",
}


class ParseError(ValueError):
    """An instructor answer that holds no list of instructions."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem  # a sentence for the repair prompt


@dataclass(frozen=True)
class _Rules:
    """What an instruction is checked against, besides its neighbours."""

    target_caption: str | None
    word_bounds: tuple[int, int]
    demonstrations: Sequence[Demonstration] = ()
    copy_threshold: float = 0.6
    grounding_words: frozenset[str] | None = None  # None: no grounding check


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
    if is_degenerate(text):
        return text, "degenerate_description"
    return text, None


def is_degenerate(text: str) -> bool:
    """Whether `text` loops (one token, or a short phrase, over and over) or is mostly
    non-words (`class_name`, `<unk>`, `##`, digits, hex, symbols)."""
    raw = text.split()
    if not raw:
        return False
    tokens = [_strip_punct(t).lower() or t for t in raw]
    words = sum(_WORD.fullmatch(_strip_punct(t)) is not None for t in raw)
    if words / len(raw) < MIN_WORD_SHARE:
        return True
    if len(set(tokens)) == 1 and len(tokens) > 1:
        return True
    if len(tokens) < LOOP_MIN_TOKENS:
        return False
    top_share = Counter(tokens).most_common(1)[0][1] / len(tokens)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    return top_share > MAX_TOKEN_SHARE or len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS


def _strip_punct(token: str) -> str:
    return token.lstrip(_LEAD_PUNCT).rstrip(_TRAIL_PUNCT)


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
    *,
    demonstrations: Sequence[Demonstration] = (),
    copy_threshold: float = 0.6,
    grounding_texts: Sequence[str | None] = (),
    grounding: str = "off",
) -> InstructionCheck:
    """Parse an instructor answer and keep the usable, distinct instructions (at most
    `max_instructions`); `reason` is "unparseable" or "too_few_instructions" on failure.
    An instruction that copies one of `demonstrations`' instructions is dropped; so, with
    `grounding` "lexical" and a non-empty text in `grounding_texts` (the description and the
    captions), is one that shares no content word with them."""
    if grounding not in GROUNDING_MODES:
        raise ValueError(f"grounding must be one of {GROUNDING_MODES}, got {grounding!r}")
    try:
        items = parse_instructions(raw)
    except ParseError as error:
        return InstructionCheck((), (), "unparseable", error.problem)
    grounding_words = None
    if grounding == "lexical" and any(t and t.strip() for t in grounding_texts):
        grounding_words = frozenset().union(*(grounding_stems(t or "") for t in grounding_texts))
    rules = _Rules(target_caption, word_bounds, demonstrations, copy_threshold, grounding_words)
    accepted: list[str] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        text = " ".join(item.split())
        reason = _drop_reason(text, rules, seen)
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


def copies_demonstration(
    text: str, demonstrations: Sequence[Demonstration], threshold: float = 0.6
) -> str | None:
    """The id of the first demonstration with an instruction `text` copies, or None. From
    3 words on, a copy has at least `threshold` of its word 3-grams in that instruction
    (containment, after `_dedupe_key`); a shorter `text` must equal it once normalised."""
    words, ours = _words_and_ngrams(text)
    if not words:
        return None
    for demonstration in demonstrations:
        for instruction in demonstration.instructions:
            their_words, theirs = _words_and_ngrams(instruction)
            if len(words) < COPY_NGRAM:
                if words == their_words:
                    return demonstration.id
            elif len(ours & theirs) / len(ours) >= threshold:
                return demonstration.id
    return None


def grounding_stems(text: str) -> frozenset[str]:
    """The stems of `text`'s content words: lowercase words outside `GROUNDING_STOP_WORDS`,
    plural and -ing/-ed endings cut ("dogs", "sleeping" -> "dog", "sleep")."""
    words = _dedupe_key(text).split()
    return frozenset(_stem(w) for w in words if w not in GROUNDING_STOP_WORDS)


def is_grounded(text: str, grounding_words: frozenset[str]) -> bool:
    """Whether `text` shares a content-word stem with `grounding_words`."""
    return not grounding_stems(text).isdisjoint(grounding_words)


def _stem(word: str) -> str:
    """A light stem, applied to both sides of a comparison: "box" for "boxes" and "box",
    "city" for "cities", "run" for "running", "bak" for "baked" and "bake"; >= 3 letters."""
    stem = word
    if word.endswith("ies") and len(word) >= 5:
        return word[:-3] + "y"
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            if len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
                stem = stem[:-1]  # running -> run, but falling -> fall
            break
    else:
        if re.search(r"(?:s|x|z|ch|sh)es$", word) and len(word) >= 5:
            stem = word[:-2]
        elif word.endswith("s") and not word.endswith("ss") and len(word) >= 4:
            stem = word[:-1]
    return stem[:-1] if stem.endswith("e") and len(stem) >= 4 else stem


@functools.lru_cache(maxsize=4096)  # the demonstrations' instructions come back every pair
def _words_and_ngrams(text: str) -> tuple[tuple[str, ...], frozenset[tuple[str, ...]]]:
    """`text`'s normalised words and their word n-grams (n = `COPY_NGRAM`)."""
    words = tuple(_dedupe_key(text).split())
    n = COPY_NGRAM
    return words, frozenset(words[i : i + n] for i in range(len(words) - n + 1))


def _drop_reason(text: str, rules: _Rules, seen: set[str]) -> str | None:
    low, high = rules.word_bounds
    words = len(text.split())
    if not text:
        return "empty"
    if words < low:
        return "too_short"
    if words > high:
        return "too_long"
    if mentions_image_order(text):
        return "mentions_image_order"
    if restates_caption(text, rules.target_caption):
        return "restates_target_caption"
    if copies_demonstration(text, rules.demonstrations, rules.copy_threshold):
        return "copied_demonstration"
    if rules.grounding_words is not None and not is_grounded(text, rules.grounding_words):
        return "ungrounded"
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
