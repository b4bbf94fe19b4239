"""Typed pipeline configuration: YAML files plus `key.path=value` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo in a
config file or an override is an error that names the key, never a silent
default. The resolved config is stored whole in each run's manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

InputFormat = Literal["auto", "folder", "manifest", "webdataset", "parquet"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(Section):
    """Where the corpus comes from and how to read it."""

    path: str = ""
    format: InputFormat = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    image_root: str | None = None
    shard_size: int = Field(10_000, ge=1, le=1_000_000)


class IngestConfig(Section):
    """Image validation limits and duplicate handling."""

    min_side: int = Field(32, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    dedupe: bool = True
    store_images: Literal["auto", "always", "never"] = "auto"


class ChannelConfig(Section):
    """One similarity channel: an encoder over images or captions and its window."""

    encoder: str
    model: str = ""
    enabled: bool = True
    window: tuple[float, float] = (0.8, 0.96)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("window")
    @classmethod
    def _ordered(cls, window: tuple[float, float]) -> tuple[float, float]:
        low, high = window
        if not -1.0 <= low < high <= 1.0:
            raise ValueError(f"window must satisfy -1 <= low < high <= 1, got {window}")
        return window


class EmbedConfig(Section):
    """Batching and placement of the encoders."""

    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class NeighboursConfig(Section):
    """FAISS top-k search per channel."""

    k: int = Field(20, ge=1)
    exact_max: int = Field(200_000, ge=1)
    nlist: int = Field(0, ge=0)
    nprobe: int = Field(16, ge=1)
    train_size: int = Field(0, ge=0)
    query_block: int = Field(65_536, ge=1)
    gpu: Literal["auto", "never", "always"] = "auto"


class MineConfig(Section):
    """Pair selection: targets per query and hard negatives per pair."""

    max_targets: int = Field(5, ge=1)
    num_hard_negatives: int = Field(5, ge=0)


class PipelineConfig(Section):
    """The whole synthesis pipeline's settings."""

    seed: int = 0
    input: InputConfig = InputConfig()
    ingest: IngestConfig = IngestConfig()
    channels: dict[str, ChannelConfig] = Field(default_factory=dict)
    embed: EmbedConfig = EmbedConfig()
    neighbours: NeighboursConfig = NeighboursConfig()
    mine: MineConfig = MineConfig()

    def enabled_channels(self) -> dict[str, ChannelConfig]:
        """The channels switched on, in config order."""
        return {name: ch for name, ch in self.channels.items() if ch.enabled}

    def section_hash(self, *sections: str) -> str:
        """A short digest of the named sections (dotted paths such as `channels.caption`),
        to detect a changed config on resume."""
        data = self.model_dump(mode="json")
        picked = {name: _lookup(data, name) for name in sections}
        text = json.dumps(picked)  # order matters: channel order decides the pairs
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the reason."""


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in nested `data`; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML config (or the defaults) and apply `key.path=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {path or '(defaults)'}:\n{err}") from err
