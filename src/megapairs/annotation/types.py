"""The values that flow through annotation: chat messages, requests, completions, errors.

Messages are backend-neutral: text parts and encoded images. The openai backend sends
images as base64 data URLs in `image_url` parts; the hf backend hands them to a
processor as PIL images; the template backend reads the structured `PairContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["describer", "instructor"]
Step = Literal["describe", "instruct", "repair"]

# Reasons a request failed that a later run may retry: the server, not the pair, was at fault.
TRANSIENT_REASONS = frozenset(
    {"timeout", "connection_error", "server_error", "rate_limited", "malformed_response"}
)


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An encoded image (JPEG bytes after resizing to the configured side)."""

    data: bytes
    mime: str = "image/jpeg"


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    parts: tuple[TextPart | ImagePart, ...]

    @property
    def text(self) -> str:
        """The message's text parts joined (images left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True)
class Demonstration:
    """One worked example for the instructor: a description and its instructions."""

    id: str
    relation: str
    description: str
    instructions: tuple[str, ...]
    query_caption: str = ""
    target_caption: str = ""


@dataclass(frozen=True)
class PairContext:
    """What the prompts are filled from, kept structured for the template backend."""

    pair_id: str
    query_caption: str | None
    target_caption: str | None
    word_num: int
    demonstrations: tuple[Demonstration, ...] = ()
    description: str = ""
    previous_output: str = ""  # the instructor answer a repair request fixes
    problem: str = ""  # why that answer was refused


@dataclass(frozen=True)
class PromptRequest:
    """One chat request of one annotation step of one pair."""

    role: Role
    step: Step
    messages: tuple[ChatMessage, ...]
    context: PairContext
    seed: int  # per pair, derived from the run seed: reproducible sampling on a server


@dataclass(frozen=True)
class Completion:
    text: str
    attempts: int = 1  # HTTP attempts it took (1 when no retry)
    finish_reason: str | None = None  # "stop", "length" (cut at max_tokens), ...; None: unknown
    prompt_tokens: int | None = None  # as the server counted them; None: not reported


class SetupError(RuntimeError):
    """The configuration is wrong (a refused API key, a model the server does not serve, a
    describer that cannot see images): the run stops, and nothing of it is cached as a
    pair's answer, so the same command resumes once the setting is fixed."""


@dataclass
class BackendError(Exception):
    """A request that failed for good (after the backend's retries)."""

    reason: str  # timeout | connection_error | server_error | rate_limited | client_error | ...
    detail: str
    attempts: int = 1
    raw: str = ""  # the response body, when there was one
    extra: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS
