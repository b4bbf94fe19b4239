"""The synthesis pipeline as an ordered list of stages, grouped by CLI command."""

from __future__ import annotations

from collections.abc import Callable

from megapairs.config import PipelineConfig
from megapairs.pipeline.stage import Stage

STEPS = ("ingest", "embed", "neighbours", "mine", "annotate", "score", "export")
CHANNEL_STEPS = frozenset({"embed", "neighbours", "mine"})  # steps that need a channel


def ingest_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.corpus.ingest import ingest_stages as build

    return build(config)


def embed_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.encoders.stage import EmbedStage

    return [EmbedStage(config, channel, progress) for channel in config.enabled_channels()]


def neighbours_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.neighbours.stage import NeighboursStage

    return [NeighboursStage(config, channel) for channel in config.enabled_channels()]


def mine_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.mining.stage import MineStage

    return [MineStage(config)]


def annotate_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.annotation.stage import AnnotateStage

    return [AnnotateStage(config, progress)]


def score_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.quality.stage import ScoreStage

    return [ScoreStage(config, progress)]


def export_stages(config: PipelineConfig, progress: bool) -> list[Stage]:
    from megapairs.dataset.export import ExportStage

    return [ExportStage(config)]


# step -> builder(config, progress): the progress flag reaches stages with inner bars.
STAGE_BUILDERS: dict[str, Callable[[PipelineConfig, bool], list[Stage]]] = {
    "ingest": ingest_stages,
    "embed": embed_stages,
    "neighbours": neighbours_stages,
    "mine": mine_stages,
    "annotate": annotate_stages,
    "score": score_stages,
    "export": export_stages,
}


def build_stages(
    config: PipelineConfig, steps: tuple[str, ...] = STEPS, progress: bool = True
) -> list[Stage]:
    """The stages of the named steps, in pipeline order; `score` among several steps only
    when `score.enabled`."""
    if not config.enabled_channels() and set(steps) & CHANNEL_STEPS:
        raise ValueError("no channel is enabled; enable at least one under `channels`")
    wanted = [step for step in STEPS if step in steps]
    if len(wanted) > 1 and not config.score.enabled:  # the gate runs alone, or when enabled
        wanted = [step for step in wanted if step != "score"]
    builders = [STAGE_BUILDERS[step] for step in wanted]
    return [stage for build in builders for stage in build(config, progress)]
