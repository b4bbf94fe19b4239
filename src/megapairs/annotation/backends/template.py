"""A model-free baseline annotator built from the two captions.

It answers the same requests as a model backend, in the same formats (prose for
`describe`, strict JSON for `instruct` and `repair`), so its answers go through the
same checks. It reads the structured `PairContext`, never the images, and names
itself `template` as backend and model in every row's provenance. It is meant for
offline runs and tests; its instructions only say what the captions say.
"""

from __future__ import annotations

import json
import re

from megapairs.annotation.backends.base import BACKENDS
from megapairs.annotation.checks import GROUNDING_STOP_WORDS
from megapairs.annotation.types import Completion, PairContext, PromptRequest, Role
from megapairs.config import AnnotateConfig

STOP_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to"})
STOP_WORDS |= {"for", "by", "from", "is", "are", "its", "it", "this", "that"}


# Fallbacks that the checks keep when the specific requests are refused or missing; each
# names the pair's subject (caption words), so it stays grounded in the description.
GENERIC_INSTRUCTIONS = (
    "find another picture of {subject} closely related to this one",
    "show me a different image that shares this one's {subject}",
    "search for a variation of this scene with {subject}",
    "a related photo of {subject} with a similar composition",
    "something with {subject} in the same spirit as this picture",
)
SUBJECT_WORDS = 6  # caption words at most in a generic request (keeps it short)
FALLBACK_SUBJECT = "visual style"  # no caption content word: the description names this


def content_words(caption: str | None) -> list[str]:
    """The caption's lowercase words without stop words, in order, without repeats."""
    words = re.findall(r"[a-z0-9]+", (caption or "").lower())
    return list(dict.fromkeys(w for w in words if w not in STOP_WORDS))


def subject(query: list[str], target: list[str]) -> str:
    """What the generic requests name: the shared caption content words, else the target's,
    else the query's (at most `SUBJECT_WORDS`, none the grounding check ignores), else
    `FALLBACK_SUBJECT`."""
    query = [w for w in query if w not in GROUNDING_STOP_WORDS]
    target = [w for w in target if w not in GROUNDING_STOP_WORDS]
    words = [w for w in query if w in target] or target or query
    return " ".join(words[:SUBJECT_WORDS]) or FALLBACK_SUBJECT


def describe_pair(context: PairContext) -> str:
    """What the captions share and how the target's differs from the query's."""
    query, target = content_words(context.query_caption), content_words(context.target_caption)
    if not query and not target:
        return (
            "Neither image has a caption, so nothing can be said about what they share "
            f"beyond their {FALLBACK_SUBJECT}; the target is a related picture."
        )
    shared = [w for w in query if w in target]
    added = [w for w in target if w not in query]
    removed = [w for w in query if w not in target]
    sentences = [
        f"Both images share {' '.join(shared)}." if shared else "The images are related.",
        f"The query image shows {context.query_caption or 'something uncaptioned'}, "
        f"while the target image shows {context.target_caption or 'something uncaptioned'}.",
    ]
    if added or removed:
        change = f"The target adds {' '.join(added) or 'nothing'}"
        sentences.append(f"{change} and drops {' '.join(removed) or 'nothing'}.")
    if subject(query, target) == FALLBACK_SUBJECT:
        sentences.append(f"They share a {FALLBACK_SUBJECT}.")
    return " ".join(sentences)


def instruct_pair(context: PairContext) -> list[str]:
    """Search requests from the caption differences, then generic ones naming the pair's
    `subject`, which the checks keep when specific ones are refused (e.g. restating the
    target caption) or missing."""
    query, target = content_words(context.query_caption), content_words(context.target_caption)
    shared = " ".join(w for w in query if w in target)
    added = " ".join(w for w in target if w not in query)
    removed = " ".join(w for w in query if w not in target)
    specific = []
    if added:
        specific.append(f"find a similar picture but with {added}")
        specific.append(f"show me this kind of picture featuring {added} instead")
    if shared and added:
        specific.append(f"keep the {shared} but change it to {added}")
    if removed and added:
        specific.append(f"replace the {removed} with {added}")
    about = subject(query, target)
    return specific + [generic.format(subject=about) for generic in GENERIC_INSTRUCTIONS]


class TemplateBackend:
    """Answers describe and instruct requests from the captions in their context."""

    name = "template"
    reads_images = False

    def model_name(self, role: Role) -> str:
        return "template"

    def check_ready(self) -> None:
        """Always ready: no model."""

    async def complete(self, request: PromptRequest) -> Completion:
        if request.step == "describe":
            return Completion(describe_pair(request.context))
        return Completion(json.dumps({"instructions": instruct_pair(request.context)}))

    async def aclose(self) -> None:
        """Nothing is held."""


@BACKENDS.register("template")
def build_template(config: AnnotateConfig, roles: tuple[Role, ...] = ()) -> TemplateBackend:
    return TemplateBackend()
