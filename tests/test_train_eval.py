"""Evaluation during training: a tiny CLIP trained a few steps, evaluated on a tiny CIRCO val
root every 2 steps through the evaluation engine, its best model kept in `best/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_fixtures import write_circo_root
from test_trainer import config, read_log
from test_training_data import write_our_dataset
from tiny_models import Tiny

from megapairs.evaluation.evaluator import evaluate
from megapairs.models.clip import MMRetCLIP
from megapairs.training import trainer as trainer_module
from megapairs.training.trainer import TrainResult, train

EVAL_FIELDS = {
    "step",
    "eval",
    "metric",
    "value",
    "improved",
    "best_step",
    "best_value",
    "metrics",
    "eval_seconds",
    "time",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_our_dataset(tmp_path_factory.mktemp("dataset"), rows=12)


@pytest.fixture(scope="module")
def circo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_circo_root(tmp_path_factory.mktemp("circo"), "val")


RUN = ("steps=7", "optim.lr=5e-3")  # here mAP@25 rises from step 2 to 4, then falls


def with_eval(root: Path, *more: str) -> tuple[str, ...]:
    """Evaluation on CIRCO val every 2 steps of a 7-step run, by mAP@25."""
    settings = ("eval.benchmark=circo", f"eval.data_root={root}", "eval.every=2")
    return (*RUN, "save_every=1", *settings, "eval.metric=mAP@25", *more)


def eval_lines(result: TrainResult) -> list[dict[str, Any]]:
    return [line for line in read_log(result) if "eval" in line]


def test_evaluations_are_logged_and_the_best_model_is_kept(
    tiny_clip: Tiny, dataset: Path, circo_root: Path, tmp_path: Path
) -> None:
    result = train(config(tiny_clip.path, dataset, tmp_path, *with_eval(circo_root)), False)
    lines = eval_lines(result)
    assert [line["step"] for line in lines] == [2, 4, 6, 7]  # every 2 steps and the last
    assert all(set(line) == EVAL_FIELDS for line in lines)
    assert all(line["eval"] == "circo/val" and line["metric"] == "mAP@25" for line in lines)
    assert all(line["value"] == line["metrics"]["mAP@25"] for line in lines)
    assert lines == result.evaluations
    values = [line["value"] for line in lines]
    best_index = values.index(max(values))  # the first of equal values stays the best
    assert result.best is not None
    assert (result.best.step, result.best.value) == (lines[best_index]["step"], max(values))
    assert result.best.path == tmp_path / "best"
    assert [line["improved"] for line in lines][best_index]
    assert lines[-1]["best_step"] == result.best.step

    record = json.loads((result.best.path / "megapairs_training.json").read_text())
    assert record["best"] == result.best.as_dict()
    best = MMRetCLIP.from_pretrained(result.best.path)
    saved = MMRetCLIP.from_pretrained(tmp_path / f"checkpoint-{result.best.step}" / "model")
    weights = saved.clip.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in best.clip.state_dict().items())
    again = evaluate("circo", best, "best", circo_root, "val", batch_size=64)
    assert again.metrics["mAP@25"] == pytest.approx(result.best.value, abs=1e-6)

    plain = train(config(tiny_clip.path, dataset, tmp_path / "plain", *RUN), False)
    assert plain.losses == result.losses  # evaluating changes no later loss
    assert plain.best is None and not (tmp_path / "plain" / "best").exists()


def test_a_resumed_run_keeps_its_best_and_logs_each_evaluation_once(
    tiny_clip: Tiny,
    dataset: Path,
    circo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = (*with_eval(circo_root), "save_every=3", "eval.metric=null")
    straight = train(config(tiny_clip.path, dataset, tmp_path / "straight", *settings), False)
    assert straight.best is not None and straight.best.metric == "mAP@5"  # circo's primary

    interrupted = config(tiny_clip.path, dataset, tmp_path / "interrupted", *settings)
    real_step = trainer_module._TrainingRun.step
    calls: list[int] = []

    def crash_at_step_5(self: Any) -> float:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # after step 4 and its evaluation: resumed from step 3
        return real_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module._TrainingRun, "step", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(interrupted, False)
    resumed = train(interrupted, False)
    assert resumed.resumed_from == 3
    assert [line["step"] for line in eval_lines(resumed)] == [2, 4, 6, 7]
    assert [line["value"] for line in eval_lines(resumed)] == pytest.approx(
        [line["value"] for line in eval_lines(straight)]
    )
    assert resumed.best is not None
    assert (resumed.best.step, resumed.best.value) == (straight.best.step, straight.best.value)
    assert train(interrupted, False).best == resumed.best  # finished: the best is still known


def test_bad_evaluation_settings_fail_before_training(
    tiny_clip: Tiny, dataset: Path, circo_root: Path, tmp_path: Path
) -> None:
    def run(*settings: str) -> None:
        train(config(tiny_clip.path, dataset, tmp_path, *with_eval(circo_root), *settings), False)

    with pytest.raises(ValueError, match=r"eval\.data_root"):
        run(f"eval.data_root={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"eval\.split 'train'"):
        run("eval.split=train")
    with pytest.raises(ValueError, match=r"eval\.benchmark: unknown benchmark 'circa'"):
        run("eval.benchmark=circa")
    assert not list(tmp_path.glob("checkpoint-*"))
    with pytest.raises(ValueError, match=r"eval\.metric 'mAP@7' is not among circo/val's .*mAP@5"):
        run("eval.metric=mAP@7")
