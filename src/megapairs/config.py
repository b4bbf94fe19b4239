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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from megapairs.redaction import strip_credentials

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
    """One similarity channel: an encoder over images or captions and its window.

    `window` is (low, high), or `auto`: before mining, (low, high) = the `auto_window`
    quantiles (q_low, q_high) of all the channel's own neighbour scores, on a 1e-4 grid
    (rule: `megapairs.neighbours.calibrate`). About (1 - q_low) * k entries per query lie
    above low (5 with the defaults and k = 20, as many as `mine.max_targets`), the top
    1 - q_high of the scores (near-duplicates) at or above high. The chosen numbers are
    recorded in `pairs/windows.json` and the manifest's `windows`; `megapairs calibrate`
    shows each channel's scores and the window the rule suggests."""

    encoder: str
    model: str = ""
    enabled: bool = True
    window: tuple[float, float] | Literal["auto"] = (0.8, 0.96)
    # window: auto -> (low, high) = these quantiles of the channel's neighbour scores
    auto_window: tuple[float, float] = (0.75, 0.995)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("window")
    @classmethod
    def _ordered(cls, window: tuple[float, float] | str) -> tuple[float, float] | str:
        if isinstance(window, str):
            return window
        low, high = window
        if not -1.0 <= low < high <= 1.0:
            raise ValueError(f"window must satisfy -1 <= low < high <= 1, got {window}")
        return window

    @field_validator("auto_window")
    @classmethod
    def _quantiles(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"auto_window must satisfy 0 <= low < high <= 1, got {bounds}")
        return bounds


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
    # IVF list storage: float32 vectors (IndexIVFFlat) or fp16 scalar-quantised (half the memory)
    ivf_storage: Literal["flat", "sq_fp16"] = "flat"
    # search engine: FAISS; or an exact blocked torch matmul + top-k (fp16 on CUDA); auto:
    # FAISS, except on CUDA without GPU FAISS, where the torch path runs on the GPU
    engine: Literal["auto", "faiss", "torch"] = "auto"


class MineConfig(Section):
    """Pair selection: targets per query and hard negatives per pair."""

    max_targets: int = Field(5, ge=1)
    num_hard_negatives: int = Field(5, ge=0)


class EndpointConfig(Section):
    """One annotation model: a served model (openai backend) or a local checkpoint (hf).

    The API key is read from the environment variable named by `api_key_env` when a
    request is sent; it is never stored in the config, the manifest or a log.
    `base_url` is one server or a list of servers of the same model (the openai backend
    spreads requests over them); a list of one is kept as that one string. Credentials in
    a URL (`http://user:key@host/v1`) are sent but never written anywhere.
    """

    backend: str = ""  # openai | hf | template for this role; empty: annotate.backend
    model: str = ""  # served model name (openai) or hub name / local path (hf)
    base_url: str | tuple[str, ...] = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    cooldown: float = Field(5.0, gt=0.0)  # seconds a failed server sits out; doubles per relapse
    cooldown_max: float = Field(300.0, gt=0.0)  # cap of that cool-down
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    timeout: float = Field(120.0, gt=0.0)  # seconds per request
    extra_body: dict[str, Any] = Field(default_factory=dict)  # server-specific request fields
    # send the API key over plain http to a host that is not this machine (warned once)
    allow_insecure: bool = False
    # describer (openai): one request with two small coloured squares before any pair; a
    # server that cannot see images fails it and the run stops
    probe: bool = True
    device: str = "auto"  # hf only
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # hf only
    batch_size: int = Field(8, ge=1)  # hf only: prompts per generate call

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("base_url is an empty list: name at least one server")
        if any(not url.strip() for url in value):
            raise ValueError("base_url lists an empty URL")
        if len(set(value)) < len(value):
            raise ValueError("base_url lists a server twice")
        return value[0] if len(value) == 1 else value

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The servers of this model, in config order (one or more)."""
        return (self.base_url,) if isinstance(self.base_url, str) else self.base_url


class AnnotateConfig(Section):
    """Two-step annotation of mined pairs: describer (VLM) then instructor (LLM)."""

    backend: str = "template"  # openai | hf | template (annotation.backends registry)
    prompts: str = ""  # folder of prompt files; empty: the packaged prompts
    word_range: tuple[int, int] = (60, 100)  # WORD_NUM of the describer, drawn per pair
    num_demonstrations: int = Field(5, ge=0)  # drawn per pair from the prompt's pool
    min_instructions: int = Field(3, ge=1)
    max_instructions: int = Field(6, ge=1)
    instruction_words: tuple[int, int] = (3, 40)  # accepted instruction length in words
    image_max_side: int = Field(512, ge=16)  # images are resized to fit before sending
    concurrency: int = Field(64, ge=1)  # requests in flight (openai) / pairs in flight
    max_retries: int = Field(5, ge=0)  # per request, on timeouts, connection errors, 429, 5xx
    backoff_initial: float = Field(1.0, gt=0.0)  # seconds; doubles per retry, full jitter
    backoff_max: float = Field(60.0, gt=0.0)  # also caps a server's Retry-After
    retry_failed: bool = True  # a re-run re-opens parts with transient (server-side) failures
    flush_every: int = Field(64, ge=1)  # finished requests between cache flushes
    # an instruction whose word n-grams overlap a demonstration instruction's this much
    # (containment, 0-1) is dropped as `copied_demonstration`; 1.0 drops verbatim copies only
    copy_threshold: float = Field(0.6, gt=0.0, le=1.0)
    # lexical: an instruction sharing no content word with the description or the target
    # caption is dropped as `ungrounded`; off: no grounding check
    grounding: Literal["lexical", "off"] = "lexical"
    describer: EndpointConfig = EndpointConfig()
    instructor: EndpointConfig = EndpointConfig()

    @field_validator("word_range", "instruction_words")
    @classmethod
    def _range(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        low, high = bounds
        if not 1 <= low <= high:
            raise ValueError(f"range must satisfy 1 <= low <= high, got {bounds}")
        return bounds

    def backend_for(self, role: str) -> str:
        """The backend that answers `role` (describer | instructor)."""
        endpoint: EndpointConfig = getattr(self, role)
        return endpoint.backend or self.backend

    @model_validator(mode="after")
    def _instruction_counts(self) -> AnnotateConfig:
        if self.min_instructions > self.max_instructions:
            raise ValueError(
                f"annotate.min_instructions ({self.min_instructions}) is above "
                f"max_instructions ({self.max_instructions})"
            )
        return self


JUDGE_ENDPOINT_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256}


class JudgeConfig(Section):
    """The optional judge of the score stage: a vision-language model asked, as strict JSON,
    whether the instruction applied to the query image describes the target."""

    enabled: bool = False
    backend: Literal["openai", "hf"] = "openai"  # the annotation backends that see images
    # the judge's model (sent as an annotate describer: the capability probe applies);
    # greedy and short by default: it answers one JSON verdict
    endpoint: EndpointConfig = EndpointConfig(**JUDGE_ENDPOINT_DEFAULTS)
    concurrency: int = Field(16, ge=1)
    max_retries: int = Field(5, ge=0)
    backoff_initial: float = Field(1.0, gt=0.0)
    backoff_max: float = Field(60.0, gt=0.0)
    flush_every: int = Field(64, ge=1)
    image_max_side: int = Field(512, ge=16)

    @field_validator("endpoint", mode="before")
    @classmethod
    def _greedy(cls, value: Any) -> Any:
        """A judge endpoint given as a mapping gets the judge's defaults, not a describer's."""
        return {**JUDGE_ENDPOINT_DEFAULTS, **value} if isinstance(value, dict) else value


class ScoreConfig(Section):
    """The quality gate: every (query image, instruction) scored by a composed scorer."""

    enabled: bool = False  # part of `synthesize` (between annotate and export) when true
    # channels: the run's own encoders (image channel similarity + caption channel text
    # similarity), offline; clip | mmret-clip | mmret-mllm: a retriever as `megapairs eval`
    scorer: Literal["channels", "clip", "mmret-clip", "mmret-mllm"] = "channels"
    model: str = ""  # the retriever's checkpoint (hub name or folder) for clip / mmret-*
    image_channel: str = ""  # channels scorer: the image channel (empty: the first enabled)
    text_channel: str = ""  # channels scorer: the caption channel (empty: the first enabled)
    # channels scorer: weight of the text term (0.7: best separation of swapped from intact
    # instructions in the corruption test, tests/test_quality_corruption.py)
    text_weight: float = Field(0.7, ge=0.0, le=1.0)
    random_negatives: int = Field(20, ge=0)  # random corpus images added to the hard negatives
    batch_size: int = Field(64, ge=1)
    device: str = "auto"
    judge: JudgeConfig = JudgeConfig()


class FilterConfig(Section):
    """Export rules over the score stage's columns (all off by default: keep everything)."""

    max_rank: int = Field(0, ge=0)  # keep an instruction whose target ranks <= this; 0: off
    min_margin: float | None = None  # keep an instruction whose margin is >= this
    drop_shortcuts: Literal["none", "text", "image", "either"] = "none"
    drop_false_negatives: bool = False  # drop flagged hard negatives (topped up from below)
    require_judge: bool = False  # keep only instructions the judge said yes to
    # a pair the gate leaves with fewer instructions goes to rejects; None: as many as
    # annotate.min_instructions (what `validate` asks of every row)
    min_instructions: int | None = Field(None, ge=1)


class ExportConfig(Section):
    """The exported dataset in the MegaPairs schema."""

    images: Literal["copy", "reference"] = "copy"  # copy into dataset/images, or absolute paths
    jsonl: bool = True  # also write part-N.jsonl beside each Parquet shard
    filter: FilterConfig = FilterConfig()
    # leave flagged pairs and instructions (megapairs explore) out; not hashed: toggling it
    # on a finished run re-exports the parts whose flags differ from the exported ones
    exclude_flagged: bool = Field(False, json_schema_extra={"hashed": False})


class RunnerConfig(Section):
    """How a runner spreads parts over workers (`--runner ray`); never changes the output."""

    max_in_flight: int = Field(0, ge=0)  # parts submitted at once; 0: twice the workers
    part_retries: int = Field(3, ge=0)  # re-runs of a part whose worker died
    task_cpus: float = Field(1.0, gt=0.0)  # CPUs reserved per part task (CPU stages)
    actor_cpus: float = Field(1.0, gt=0.0)  # CPUs per actor of a model stage (embed, hf)
    actor_gpus: float = Field(-1.0, ge=-1.0)  # GPUs per actor; -1: 1 where the cluster has GPUs
    actors: int = Field(0, ge=0)  # actors per model stage; 0: as many as resources allow


class PipelineConfig(Section):
    """The whole synthesis pipeline's settings."""

    seed: int = 0
    input: InputConfig = InputConfig()
    ingest: IngestConfig = IngestConfig()
    channels: dict[str, ChannelConfig] = Field(default_factory=dict)
    embed: EmbedConfig = EmbedConfig()
    neighbours: NeighboursConfig = NeighboursConfig()
    mine: MineConfig = MineConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    score: ScoreConfig = ScoreConfig()
    export: ExportConfig = ExportConfig()
    runner: RunnerConfig = RunnerConfig()

    def enabled_channels(self) -> dict[str, ChannelConfig]:
        """The channels switched on, in config order."""
        return {name: ch for name, ch in self.channels.items() if ch.enabled}

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON data without credentials (a password in an annotation server
        URL): what the manifest stores and `megapairs config` prints."""
        data = self.model_dump(mode="json")
        endpoints = [data["annotate"][role] for role in ("describer", "instructor")]
        for endpoint in [*endpoints, data["score"]["judge"]["endpoint"]]:
            urls = endpoint["base_url"]
            if isinstance(urls, str):
                endpoint["base_url"] = strip_credentials(urls)
            else:
                endpoint["base_url"] = [strip_credentials(url) for url in urls]
        return data

    def section_hash(self, *sections: str) -> str:
        """A short digest of the named sections (dotted paths such as `channels.caption`),
        to detect a changed config on resume."""
        data = hashed_dump(self)
        picked = {name: _lookup(data, name) for name in sections}
        text = json.dumps(picked)  # order matters: channel order decides the pairs
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def hashed_dump(model: BaseModel) -> dict[str, Any]:
    """`model` as JSON data without the fields marked `json_schema_extra={"hashed": False}`
    (settings that do not change a stage's output, such as export.exclude_flagged, whose
    effect the stage tracks itself)."""
    return _drop_unhashed(model, model.model_dump(mode="json"))


def _drop_unhashed(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("hashed") is False:
            data.pop(name, None)
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _drop_unhashed(value, data[name])
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    _drop_unhashed(item, data[name][key])
    return data


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
