"""The annotator backend interface and its registry.

A backend answers one chat request at a time, asynchronously; batching (hf) and
concurrency limits and retries (openai) live inside it. It names the model it uses
for each role, which goes into every output row's provenance. A factory takes the
annotate config and the roles the backend answers (`ROLES` by default): with
`annotate.describer.backend` and `annotate.instructor.backend` the two roles may be
answered by different backends (`factory.RoleBackends`).

| name | module | what answers |
|---|---|---|
| `openai` | `openai_chat` | any OpenAI-compatible chat-completions server |
| `hf` | `hf` | local transformers models (image-text-to-text, causal LM) |
| `template` | `template` | a model-free baseline built from the two captions |
"""

from __future__ import annotations

from typing import Protocol

from megapairs.annotation.types import Completion, PromptRequest, Role
from megapairs.registry import Registry

ROLES: tuple[Role, ...] = ("describer", "instructor")


class AnnotatorBackend(Protocol):
    """Answers describer and instructor requests."""

    name: str
    reads_images: bool  # False: describe requests carry empty image parts (template)

    def model_name(self, role: Role) -> str:
        """The model that answers `role` (recorded as provenance)."""
        ...

    def check_ready(self) -> None:
        """Raise RuntimeError (`SetupError` when a setting is wrong), before any pair is
        sent, when the models cannot answer."""
        ...

    async def complete(self, request: PromptRequest) -> Completion:
        """The model's answer; raises `BackendError` when the request fails for good."""
        ...

    async def aclose(self) -> None:
        """Release what the current event loop holds (HTTP connections, workers)."""
        ...


BACKENDS: Registry[AnnotatorBackend] = Registry("annotator backend")
