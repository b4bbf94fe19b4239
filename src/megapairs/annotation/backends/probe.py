"""The describer's capability probe: can the server see the images it is sent?

A text-only model behind an OpenAI-compatible server drops image parts silently and
writes fluent nonsense about pictures it never saw. Before any pair is sent, the
describer gets one tiny request with two solid squares of two colours drawn at random
from `PALETTE` and must name both colours (`judge_answer`). Where the server reports
`usage.prompt_tokens`, the same text is sent once more without the images: the
difference is what the two images cost. A server that counts nothing for them cannot see
them; otherwise that cost gives `PromptFloor`, the fewest prompt tokens a describe
request of a given length can plausibly take with its two images, and a later answer
reporting fewer is refused as `images_ignored`.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass

from PIL import Image

from megapairs.annotation.types import ChatMessage, ImagePart, TextPart

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
SQUARE_SIDE = 224  # pixels: large enough to cost a dynamic-resolution model real tokens
QUESTION = (
    "Each of these two images is filled with a single colour. Name the colour of the first "
    "image and the colour of the second image, in a few words."
)
MAX_OTHER_COLOURS = 1  # an answer naming more palette colours than this is a guess


@dataclass(frozen=True)
class Probe:
    """One probe request: the two colours and the messages asking for them."""

    colours: tuple[str, str]
    messages: tuple[ChatMessage, ...]

    @property
    def text_only(self) -> tuple[ChatMessage, ...]:
        """The same messages without their images (to count what the images cost)."""
        return tuple(
            ChatMessage(m.role, tuple(p for p in m.parts if isinstance(p, TextPart)))
            for m in self.messages
        )

    @property
    def words(self) -> int:
        return sum(len(m.text.split()) for m in self.messages)


@dataclass(frozen=True)
class PromptFloor:
    """Prompt tokens measured by the probe: with its text only, and with the two images."""

    text_tokens: int
    image_tokens: int  # what the two probe images added
    words: int  # words of the probe's text

    def minimum(self, words: int) -> int:
        """The fewest prompt tokens a request of `words` words with two images plausibly
        takes: the probe's text tokens, at least one token per extra word, and half of
        what the probe's images cost (real images are at least as large)."""
        return self.text_tokens + max(0, words - self.words) + self.image_tokens // 2


def new_probe(rng: random.Random | None = None) -> Probe:
    """A probe with two different colours drawn at random."""
    first, second = (rng or random.SystemRandom()).sample(sorted(PALETTE), 2)
    parts = (
        ImagePart(square_jpeg(PALETTE[first])),
        ImagePart(square_jpeg(PALETTE[second])),
        TextPart(QUESTION),
    )
    return Probe((first, second), (ChatMessage("user", parts),))


def square_jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SQUARE_SIDE, SQUARE_SIDE), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def judge_answer(probe: Probe, answer: str) -> str | None:
    """None when `answer` names both of the probe's colours (and few others), else what is
    wrong with it."""
    named = set(re.findall(r"[a-z]+", answer.lower())) & PALETTE.keys()
    missing = [c for c in probe.colours if c not in named]
    if missing:
        return f"it did not name the {' and '.join(missing)} it was shown"
    if len(named - set(probe.colours)) > MAX_OTHER_COLOURS:
        return "it named colours it was not shown (a guess)"
    return None


def image_tokens(with_images: int | None, text_only: int | None) -> int | None:
    """What the probe's two images cost in prompt tokens; None when the server did not say."""
    if with_images is None or text_only is None:
        return None
    return with_images - text_only
