"""Typed training configuration: YAML files plus `key.path=value` overrides.

Like the pipeline's config (`megapairs.config`), every section forbids unknown keys.
The defaults are the paper's MMRet-CLIP base run (Appendix B): CLIP-B/16, batch 2048,
1 positive + 4 hard negatives, tau 0.02, lr 5e-6 with linear decay, 15k steps, bf16.
`configs/train_clip.yaml`, `train_mllm.yaml` and `train_demo.yaml` spell them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from megapairs.config import ConfigError, Section, apply_override
from megapairs.training.negatives import NegativeStrategy, negatives_per_query

ModelKind = Literal["mmret-clip", "mmret-mllm"]
MixedPrecision = Literal["no", "bf16", "fp16"]

RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "save_every",
        "log_every",
        "keep_checkpoints",
        "num_workers",
        "chunk_size",
        "activation_checkpointing",
        "eval",
    }
)
"""Top-level settings that may differ when a run resumes: they change how a run is
carried out or recorded, not its losses (gradient caching equals the plain step;
activation checkpointing recomputes the same forward, dropout masks included; an
evaluation leaves the random generators and the weights as it found them)."""


class LoraOptions(Section):
    """LoRA adapters of MMRet-MLLM (paper: rank 32 on the ViT and the LLM; alpha and dropout
    are not given there). Module lists None: the model class's defaults."""

    rank: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0.0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    vision_modules: list[str] | None = None
    language_modules: list[str] | None = None

    def as_options(self) -> dict[str, Any]:
        """The settings given, as keywords of `megapairs.models.mllm.LoraSettings`."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class ModelSettings(Section):
    """Which retriever is trained, from which checkpoint (a hub name or a local folder)."""

    kind: ModelKind = "mmret-clip"
    name_or_path: str = "openai/clip-vit-base-patch16"
    image_size: int | None = Field(None, ge=8)  # None: the checkpoint's (CLIP 224, MLLM 512)
    max_text_length: int | None = Field(None, ge=1)  # CLIP only; None: the checkpoint's
    task_instruction: str = ""  # put before every training query's instruction (see adapters)
    lora: LoraOptions = LoraOptions()
    options: dict[str, Any] = Field(default_factory=dict)  # more from_pretrained keywords


class DataSettings(Section):
    """Training triplets: Parquet/JSONL files, folders of them, or glob patterns."""

    paths: list[str] = Field(default_factory=list)
    image_root: str | None = None  # None: each dataset's folder (or its dataset_info.json's)
    negative_strategy: NegativeStrategy = NegativeStrategy.BOTH
    num_negatives: int = Field(4, ge=0)  # per query, for `mined` and `both` (Table 4)
    seed: int = 0  # shuffling, instruction and negative sampling

    @model_validator(mode="after")
    def _enough_negatives(self) -> DataSettings:
        try:
            negatives_per_query(self.negative_strategy, self.num_negatives)
        except ValueError as err:
            raise ValueError(f"data.num_negatives: {err}") from None
        return self


class OptimSettings(Section):
    """AdamW with a linear decay to zero after an optional linear warm-up."""

    lr: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear"] = "linear"
    max_grad_norm: float = Field(0.0, ge=0.0)  # 0: no clipping


class EvalSettings(Section):
    """Evaluation during training (`megapairs.training.periodic_eval`): every `every` steps
    and at the last step the model is evaluated on `benchmark`'s `split` read from
    `data_root`; `metric` (higher is better) picks the model kept in `best/`. Benchmark,
    split and data root are checked before training, the metric at the first evaluation."""

    benchmark: str  # circo, cirr, fashioniq, genecis or mmeb
    data_root: str
    split: str | None = None  # None: the benchmark's default (labelled) split
    every: int = Field(1000, ge=1)
    metric: str | None = None  # None: the benchmark's primary metric (circo: mAP@5, ...)
    settings: dict[str, Any] = Field(default_factory=dict)  # the benchmark loader's settings
    batch_size: int = Field(64, ge=1)


class TrainConfig(Section):
    """One contrastive training run of an MMRet retriever."""

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    batch_size: int = Field(2048, ge=1)  # queries per step and process
    chunk_size: int = Field(0, ge=0)  # gradient caching chunk (items per forward); 0: off
    activation_checkpointing: bool = False  # recompute layer activations in backward
    steps: int = Field(15_000, ge=1)
    temperature: float = Field(0.02, gt=0.0)
    mixed_precision: MixedPrecision = "bf16"
    output_dir: str = "runs/train"
    save_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=0)  # 0: keep all
    seed: int = 0  # model-side randomness (dropout); data has its own seed
    num_workers: int = Field(4, ge=0)
    eval: EvalSettings | None = None  # None: no evaluation during training

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` as false: take it as "no"."""
        return "no" if value is False else value

    @property
    def negatives_per_query(self) -> int:
        return negatives_per_query(self.data.negative_strategy, self.data.num_negatives)

    def resume_blockers(self, saved: dict[str, Any]) -> list[str]:
        """The settings of this config that differ from `saved` (a checkpoint's config dump)
        and would change the resumed run's losses; empty when it may resume."""
        current = self.model_dump(mode="json")
        return sorted(
            key
            for key in current.keys() | saved.keys()
            if key not in RESUMABLE_CHANGES and current.get(key) != saved.get(key)
        )


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Load a training YAML config (or the defaults) and apply `key.path=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read training config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"training config {path} must be a mapping at the top level")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid training config {path or '(defaults)'}:\n{err}") from err
