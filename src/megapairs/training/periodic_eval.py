"""Evaluation during training: a benchmark split every `eval.every` steps (and at the last
step) through the evaluation engine (`megapairs.evaluation.evaluator.evaluate`), and the
best model by one metric kept in `best/`.

The model is evaluated as it is in memory: the trainer's `adapter.model` is the retriever
class that `megapairs eval` loads from a checkpoint (`MMRetCLIP`, `MMRetMLLM`), with the
same preprocessing, so nothing is written and read back. It runs in eval mode without
gradients, in the weights' own dtype (no autocast), and the training mode is restored
after; the trainer also restores every random generator, so an evaluation changes no later
loss. Only the main process evaluates (the others wait).

Each evaluation is one `log.jsonl` line (`record`): step, `eval` (`<benchmark>/<split>`),
metric, value, whether it improved, the best step and value so far, every metric, seconds
and time. A strictly better value makes the trainer save the model to `best/` (as `final/`,
its `megapairs_training.json` holding `best`: step, benchmark, split, metric, value). A
resumed run takes the best so far from that record when it names the same benchmark, split
and metric.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megapairs.models.common import eval_mode
from megapairs.runs import now_iso
from megapairs.training.config import EvalSettings

BEST_FOLDER = "best"


@dataclass(frozen=True)
class BestModel:
    """The best evaluation so far: its step, benchmark, split, metric and value; `path` is
    the `best/` folder holding the model of that step."""

    step: int
    benchmark: str
    split: str
    metric: str
    value: float
    path: Path

    def as_dict(self) -> dict[str, Any]:
        """The record saved in `best/` (without the path)."""
        return {key: value for key, value in asdict(self).items() if key != "path"}


class PeriodicEval:
    """When to evaluate, the evaluation itself, and the best value so far."""

    def __init__(self, settings: EvalSettings, steps: int, output: Path) -> None:
        self.settings = settings
        self.steps = steps
        self.folder = output / BEST_FOLDER
        plugin = _benchmark(settings.benchmark)
        self.split: str = settings.split or plugin.default_split
        self.metric: str = settings.metric or plugin.primary_metric
        self.best: BestModel | None = None

    @property
    def label(self) -> str:
        return f"{self.settings.benchmark}/{self.split}"

    def check(self) -> None:
        """ValueError, before any training, for a missing data root or an unknown split
        (an unknown benchmark is refused when this is built)."""
        known = _benchmark(self.settings.benchmark).splits
        if self.split not in known:
            raise ValueError(
                f"eval.split {self.split!r}: {self.settings.benchmark} has {', '.join(known)}"
            )
        if not Path(self.settings.data_root).is_dir():
            raise ValueError(f"eval.data_root {self.settings.data_root!r} is not a folder")

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0 or step == self.steps

    def run(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Evaluate `model` (a retriever) at `step`; returns the log record and, when its
        value beats the best so far, makes it the best (`record["improved"]`)."""
        clock = time.perf_counter()
        metrics = self._metrics(model, step)
        value = metric_value(metrics, self.metric, self.label)
        best, improved = self.best, False
        if best is None or value > best.value:
            best = BestModel(
                step, self.settings.benchmark, self.split, self.metric, value, self.folder
            )
            self.best, improved = best, True
        return {
            "step": step,
            "eval": self.label,
            "metric": self.metric,
            "value": value,
            "improved": improved,
            "best_step": best.step,
            "best_value": best.value,
            "metrics": metrics,
            "eval_seconds": time.perf_counter() - clock,
            "time": now_iso(),
        }

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Take the best so far from `best/`'s saved record, if it is of this evaluation."""
        if not saved:
            return
        wanted = (self.settings.benchmark, self.split, self.metric)
        if (saved.get("benchmark"), saved.get("split"), saved.get("metric")) == wanted:
            self.best = BestModel(
                int(saved["step"]), *wanted, float(saved["value"]), path=self.folder
            )

    def _metrics(self, model: nn.Module, step: int) -> dict[str, Any]:
        from megapairs.evaluation.evaluator import evaluate

        settings = self.settings
        with eval_mode(model), torch.no_grad():
            result = evaluate(
                settings.benchmark,
                model,  # type: ignore[arg-type]  # MMRetCLIP / MMRetMLLM are retrievers
                f"training:{self.folder.parent.resolve()}@step-{step}",
                Path(settings.data_root),
                self.split,
                dict(settings.settings),
                cache_dir=None,
                output=None,
                batch_size=settings.batch_size,
                progress=False,
            )
        return dict(result.metrics)


def metric_value(metrics: dict[str, Any], metric: str, label: str) -> float:
    """`metrics[metric]` as a float; ValueError naming the metrics there are otherwise."""
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
        raise ValueError(
            f"eval.metric {metric!r} is not among {label}'s metrics: {', '.join(numeric)}"
        )
    return float(value)


def _benchmark(name: str) -> Any:
    """The evaluation's plug-in of benchmark `name` (ValueError naming the known ones)."""
    from megapairs.evaluation.benchmarks import benchmark

    try:
        return benchmark(name)
    except ValueError as err:
        raise ValueError(f"eval.benchmark: {err}") from None
