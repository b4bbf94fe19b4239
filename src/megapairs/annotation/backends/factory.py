"""One factory from the annotate config to a ready backend, one backend per role if asked.

`annotate.backend` names the backend of both roles; `annotate.describer.backend` or
`annotate.instructor.backend` overrides it for one role (e.g. an `openai` describer with
a `template` instructor). Two different backends are joined by `RoleBackends`, which
sends each request to its role's backend and names itself `describer+instructor`.
"""

from __future__ import annotations

from megapairs.annotation.backends import hf, openai_chat, template  # noqa: F401  (fill BACKENDS)
from megapairs.annotation.backends.base import BACKENDS, ROLES, AnnotatorBackend
from megapairs.annotation.types import Completion, PromptRequest, Role
from megapairs.config import AnnotateConfig


class RoleBackends:
    """Two backends, one per role, behind the backend interface."""

    def __init__(self, backends: dict[Role, AnnotatorBackend]) -> None:
        self.backends = backends
        self.name = "+".join(backends[role].name for role in ROLES)
        self.reads_images = backends["describer"].reads_images

    def model_name(self, role: Role) -> str:
        return self.backends[role].model_name(role)

    def check_ready(self) -> None:
        for backend in self.backends.values():
            backend.check_ready()

    async def complete(self, request: PromptRequest) -> Completion:
        return await self.backends[request.role].complete(request)

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()


def build_backend(config: AnnotateConfig) -> AnnotatorBackend:
    """The backend of each role, built from the describer and instructor settings."""
    names = {role: config.backend_for(role) for role in ROLES}
    if names["describer"] == names["instructor"]:
        return BACKENDS.build(names["describer"], config)
    return RoleBackends({role: BACKENDS.build(names[role], config, (role,)) for role in ROLES})


def backend_names() -> list[str]:
    return BACKENDS.names()
