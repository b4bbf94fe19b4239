"""The synthesis pipeline as an ordered list of stages, grouped by CLI command."""

from __future__ import annotations

from collections.abc import Callable

from megapairs.config import PipelineConfig
from megapairs.pipeline.stage import Stage

STEPS = ("ingest", "embed", "neighbours", "mine")


def ingest_stages(config: PipelineConfig) -> list[Stage]:
    from megapairs.corpus.ingest import IngestStage

    return [IngestStage(config)]


def embed_stages(config: PipelineConfig) -> list[Stage]:
    from megapairs.encoders.stage import EmbedStage

    return [EmbedStage(config, channel) for channel in config.enabled_channels()]


def neighbours_stages(config: PipelineConfig) -> list[Stage]:
    from megapairs.neighbours.stage import NeighboursStage

    return [NeighboursStage(config, channel) for channel in config.enabled_channels()]


def mine_stages(config: PipelineConfig) -> list[Stage]:
    from megapairs.mining.stage import MineStage

    return [MineStage(config)]


STAGE_BUILDERS: dict[str, Callable[[PipelineConfig], list[Stage]]] = {
    "ingest": ingest_stages,
    "embed": embed_stages,
    "neighbours": neighbours_stages,
    "mine": mine_stages,
}


def build_stages(config: PipelineConfig, steps: tuple[str, ...] = STEPS) -> list[Stage]:
    """The stages of the named steps, in pipeline order."""
    if not config.enabled_channels() and set(steps) - {"ingest"}:
        raise ValueError("no channel is enabled; enable at least one under `channels`")
    return [stage for step in STEPS if step in steps for stage in STAGE_BUILDERS[step](config)]
