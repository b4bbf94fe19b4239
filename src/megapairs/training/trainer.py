"""The step-based contrastive trainer of MMRet retrievers (`megapairs train`).

One process or many (`accelerate launch`, DDP): accelerate prepares the model
(`ContrastiveModule`: device, DDP, autocast for `mixed_precision`) and the AdamW optimizer;
the linear schedule (with optional warm-up) is stepped once per optimizer step (not after a
step that fp16 loss scaling skipped for overflowing gradients). Each step
reads `batch_size` queries per process (`BatchStream`), embeds them and their 1 + m
candidates and minimises `InfoNCELoss` (candidates all-gathered across processes). With
`chunk_size` > 0 the step is gradient-cached (`gradcache_step`, DDP gradients synchronised
once), so a batch of 2048 fits the memory of a chunk; otherwise it is one forward and
backward. `activation_checkpointing` makes the model's transformer layers recompute their
activations in backward (`enable_activation_checkpointing` of the retriever): less memory
per item, more compute, the same gradients.

Output folder:

    log.jsonl                 every `log_every` steps: step, epoch, loss (mean over the
                              window and the processes), lr, queries_per_s, step_time_s,
                              peak_memory_mb (+ memory: cuda_max_allocated | cpu_max_rss),
                              skipped_images (reasons -> counts, all processes), time
    tensorboard/              the same scalars, when the `tensorboard` package is installed
    checkpoint-<step>/        every `save_every` steps and at the last step:
        model/                save_pretrained (the model class's from_pretrained loads it)
        optimizer.pt, scheduler.pt
        scaler.pt             the fp16 gradient scaler's state (fp16 runs only)
        rng-<rank>.pt         python, numpy, torch and cuda generator states of each process
        data-<rank>.json      each process's stream position and skip counts
        trainer_state.json    step, world size, last loss, the whole config
    final/                    the trained model (save_pretrained)
    best/                     with `eval` set: the model of the best evaluation so far
                              (see `periodic_eval`; its lines in log.jsonl carry `eval`)

A checkpoint is written into `.checkpoint-<step>.tmp/` and renamed when complete, so a
`checkpoint-<step>/` folder is always whole; the newest `keep_checkpoints` are kept. Running
the same command again resumes from the newest checkpoint: the model is loaded from its
`model/` folder, then optimizer, scheduler, data position and RNG states are restored, and
the losses of the following steps equal those of an uninterrupted run. A resume refuses a
config that would change them (`TrainConfig.resume_blockers`) or another process count.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import sys
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from megapairs.runs import atomic_path, now_iso, write_json
from megapairs.training.adapters import (
    ContrastiveModule,
    TrainBatch,
    TrainingAdapter,
    build_adapter,
)
from megapairs.training.config import TrainConfig
from megapairs.training.data import (
    BatchStream,
    RowStream,
    TripletBatches,
    TripletTable,
    required_columns,
)
from megapairs.training.gradcache import chunk_inputs, gradcache_step
from megapairs.training.losses import InfoNCELoss
from megapairs.training.periodic_eval import BEST_FOLDER, BestModel, PeriodicEval

LOG_FILE = "log.jsonl"
FINAL_FOLDER = "final"
STATE_FILE = "trainer_state.json"
SCALER_FILE = "scaler.pt"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
TRAINING_RECORD = "megapairs_training.json"


@dataclass
class TrainResult:
    """What a `train` call did; `losses` are this process's per-step losses of this call."""

    steps: int
    final_loss: float | None
    losses: list[float]
    output_dir: Path
    final_model: Path
    log_file: Path
    checkpoints: list[Path]
    skipped_images: dict[str, int]
    resumed_from: int | None = None
    best: BestModel | None = None  # with `eval`: the best evaluation so far (`best/`)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # this call's, main process


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (or resume training) the model of `config`; see the module docstring."""
    output = Path(config.output_dir)
    accelerator = _make_accelerator(config, output)
    try:
        return _train(config, accelerator, output, progress)
    finally:
        accelerator.end_training()
        _release_accelerator_state()


def _train(config: TrainConfig, accelerator: Any, output: Path, progress: bool) -> TrainResult:
    resume = latest_checkpoint(output)
    start = _check_resumable(config, resume, accelerator.num_processes) if resume else 0
    run = _TrainingRun.build(config, accelerator, resume)
    if resume is not None:
        run.restore(resume)
        if accelerator.is_main_process:
            truncate_log(output / LOG_FILE, start)
    losses = run.loop(start, progress)
    final = run.save_final()
    return TrainResult(
        steps=config.steps,
        final_loss=losses[-1] if losses else _saved_loss(resume),
        losses=losses,
        output_dir=output,
        final_model=final,
        log_file=output / LOG_FILE,
        checkpoints=list_checkpoints(output),
        skipped_images=run.skipped_totals(),
        resumed_from=start if resume else None,
        best=run.shared_best(),
        evaluations=run.evaluations,
    )


def _release_accelerator_state() -> None:
    """Forget this run's accelerate settings (mixed precision, ...), which accelerate keeps
    per process, so that a later `train` call in the same process may use others. The
    process group (`PartialState`) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


# the run --------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Steps since the last log line."""

    losses: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class _TrainingRun:
    """The prepared objects of one training run and its loop."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Any,
        adapter: TrainingAdapter,
        module: Any,
        optimizer: Any,
        scheduler: Any,
        batches: BatchStream,
        evaluator: PeriodicEval | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.adapter = adapter
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batches = batches
        self.loss = InfoNCELoss(config.temperature)
        self.output = Path(config.output_dir)
        self.lr = config.optim.lr  # the learning rate of the latest step
        self.evaluator = evaluator
        self.evaluations: list[dict[str, Any]] = []

    @classmethod
    def build(cls, config: TrainConfig, accelerator: Any, resume: Path | None) -> _TrainingRun:
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        set_seed(config.seed, device_specific=True)
        evaluator = periodic_eval(config)
        if evaluator is not None:
            evaluator.check()  # a wrong data root fails now, not after the first steps
        source = str(resume / "model") if resume else None
        adapter = build_adapter(config.model, source, device=accelerator.device)
        if config.activation_checkpointing:
            enable_activation_checkpointing(adapter.model)
        batches = _batch_stream(config, adapter, accelerator)
        optimizer = torch.optim.AdamW(
            adapter.trainable_parameters(),
            lr=config.optim.lr,
            weight_decay=config.optim.weight_decay,
            betas=config.optim.betas,
            eps=config.optim.eps,
        )
        scheduler = get_linear_schedule_with_warmup(
            optimizer, config.optim.warmup_steps, config.steps
        )
        module, optimizer = accelerator.prepare(ContrastiveModule(adapter), optimizer)
        return cls(config, accelerator, adapter, module, optimizer, scheduler, batches, evaluator)

    # the loop ---------------------------------------------------------------------------------

    def loop(self, start: int, progress: bool) -> list[float]:
        config, losses, window = self.config, [], _Window()
        bar = tqdm(
            total=config.steps,
            initial=start,
            desc="train",
            unit="step",
            disable=not (progress and self.accelerator.is_main_process),
        )
        for step in range(start + 1, config.steps + 1):
            loss = self.step()
            losses.append(loss)
            window.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % config.log_every == 0 or step == config.steps:
                self.log(step, window)
                window = _Window()
            if self.evaluator is not None and self.evaluator.due(step):
                self.evaluate(step)
            if step % config.save_every == 0 or step == config.steps:
                self.save_checkpoint(step, loss)
        bar.close()
        self.batches.close()
        return losses

    def step(self) -> float:
        """One optimizer step on the next batch; returns this process's loss."""
        batch: TrainBatch = self.batches.next_batch()
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        loss = contrastive_step(
            self.module, batch, self.loss, self.accelerator, self.config.chunk_size
        )
        if self.config.optim.max_grad_norm:
            params = self.adapter.trainable_parameters()
            self.accelerator.clip_grad_norm_(params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    # logs ---------------------------------------------------------------------------------------

    def log(self, step: int, window: _Window) -> None:
        accelerator = self.accelerator
        elapsed = time.perf_counter() - window.started
        local = torch.tensor(sum(window.losses) / len(window.losses), device=accelerator.device)
        loss = float(accelerator.reduce(local, reduction="mean"))
        queries = self.config.batch_size * accelerator.num_processes * len(window.losses)
        memory, memory_kind = peak_memory_mb(accelerator.device)
        skipped = self.skipped_totals()
        if not accelerator.is_main_process:
            return
        record = {
            "step": step,
            "epoch": self.batches.epoch,
            "loss": loss,
            "lr": self.lr,
            "queries_per_s": queries / elapsed,
            "step_time_s": elapsed / len(window.losses),
            "peak_memory_mb": memory,
            "memory": memory_kind,
            "skipped_images": skipped,
            "time": now_iso(),
        }
        append_log(self.output / LOG_FILE, record)
        scalars = {k: record[k] for k in ("loss", "lr", "queries_per_s", "peak_memory_mb")}
        scalars["skipped_images"] = sum(skipped.values())
        accelerator.log(scalars, step=step)

    def evaluate(self, step: int) -> None:
        """Evaluate the model (main process; generator states kept), log it, and save it to
        `best/` when it is the best so far."""
        evaluator, accelerator = self.evaluator, self.accelerator
        if evaluator is not None and accelerator.is_main_process:
            states = rng_states()
            try:
                record = evaluator.run(self.adapter.model, step)
            finally:
                set_rng_states(states)
            self.evaluations.append(record)
            append_log(self.output / LOG_FILE, record)
            accelerator.log({f"eval/{record['eval']}/{record['metric']}": record["value"]}, step)
            if record["improved"] and evaluator.best is not None:
                self._save_model(BEST_FOLDER, {"step": step, "best": evaluator.best.as_dict()})
        accelerator.wait_for_everyone()

    def shared_best(self) -> BestModel | None:
        """The main process's best evaluation, on every process."""
        from accelerate.utils import broadcast_object_list

        if self.evaluator is None:
            return None
        return broadcast_object_list([self.evaluator.best])[0]

    def skipped_totals(self) -> dict[str, int]:
        """Skipped rows by reason, summed over all processes (a collective call)."""
        from accelerate.utils import gather_object

        total: Counter[str] = Counter()
        for counts in gather_object([self.batches.skipped.as_dict()]):
            total.update(counts)
        return dict(sorted(total.items()))

    # checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, loss: float) -> Path:
        """Write `checkpoint-<step>/` atomically and prune old ones; returns its path."""
        accelerator, output = self.accelerator, self.output
        target = output / f"checkpoint-{step}"
        staging = output / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        torch.save(rng_states(), staging / f"rng-{rank}.pt")
        write_json(staging / f"data-{rank}.json", self.batches.state_dict())
        if accelerator.is_main_process:
            self.adapter.save(staging / "model")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), staging / SCALER_FILE)
            write_json(staging / STATE_FILE, self._state(step, loss))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            prune_checkpoints(output, self.config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return target

    def _state(self, step: int, loss: float) -> dict[str, Any]:
        return {
            "step": step,
            "world_size": self.accelerator.num_processes,
            "loss": loss,
            "time": now_iso(),
            "config": self.config.model_dump(mode="json"),
        }

    def restore(self, checkpoint: Path) -> None:
        """Optimizer, scheduler, fp16 gradient scaler, data position and RNG states of
        `checkpoint` (the model was loaded from its `model/` folder)."""
        optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu")
        self.optimizer.load_state_dict(optimizer_state)  # moves its tensors to the parameters
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        self._restore_scaler(checkpoint / SCALER_FILE)
        rank = self.accelerator.process_index
        self.batches.load_state_dict(json.loads((checkpoint / f"data-{rank}.json").read_text()))
        set_rng_states(torch.load(checkpoint / f"rng-{rank}.pt"))
        if self.evaluator is not None:
            self.evaluator.resume(_saved_record(self.output / BEST_FOLDER).get("best"))

    def _restore_scaler(self, path: Path) -> None:
        scaler = self.accelerator.scaler
        if scaler is None:
            return
        if not path.is_file():
            raise ValueError(f"{path.parent} has no {SCALER_FILE}: it cannot resume an fp16 run")
        scaler.load_state_dict(torch.load(path))

    def save_final(self) -> Path:
        """The trained model in `final/` (written beside, then renamed over an old one)."""
        if self.accelerator.is_main_process:
            self._save_model(FINAL_FOLDER, {"steps": self.config.steps})
        self.accelerator.wait_for_everyone()
        return self.output / FINAL_FOLDER

    def _save_model(self, name: str, record: dict[str, Any]) -> Path:
        """The model in `<output>/<name>/` with `record` (+ the config) as its training
        record, written beside and renamed over an old one (main process only)."""
        folder, staging = self.output / name, self.output / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.adapter.save(staging)
        record = {**record, "config": self.config.model_dump(mode="json")}
        write_json(staging / TRAINING_RECORD, record)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder


# one step -----------------------------------------------------------------------------------


def contrastive_step(
    module: Any, batch: TrainBatch, loss: InfoNCELoss, accelerator: Any, chunk_size: int = 0
) -> float:
    """Forward and backward of one batch through the prepared `ContrastiveModule`: gradients
    accumulate into `.grad` (the caller steps the optimizer). With `chunk_size` > 0 the step
    is gradient-cached in chunks of that many items, else one forward over the batch.
    Returns this process's loss.

    The batch goes to the device once, whole, so that the two passes of gradient caching do
    not copy it twice (at batch 2048 with 1 + 4 candidates: 7.4 GB of float32 224 px pixels,
    small beside the activations of a chunk of 64 CLIP-L/14 images)."""
    batch = batch.to(accelerator.device)
    if chunk_size <= 0:
        queries, candidates = module(queries=batch.queries, candidates=batch.candidates)
        value = loss.grouped(queries, candidates)
        accelerator.backward(value)
        return float(value.detach())
    scaler = accelerator.scaler  # fp16 only: scale the loss as accelerator.backward would
    scale = float(scaler.get_scale()) if scaler is not None else 1.0

    def loss_fn(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        value = loss.grouped(queries, candidates)
        return scaler.scale(value) if scaler is not None else value

    def no_sync() -> AbstractContextManager[Any]:
        context: AbstractContextManager[Any] = accelerator.no_sync(module)
        return context

    value = gradcache_step(
        chunk_inputs(batch.queries, chunk_size),
        chunk_inputs(batch.candidates, chunk_size),
        lambda chunk: module(queries=chunk)[0],
        lambda chunk: module(candidates=chunk)[1],
        loss_fn,
        no_sync=no_sync,
    )
    return float(value) / scale


# building blocks ----------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig, output: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    tensorboard = is_tensorboard_available()
    accelerator = Accelerator(
        cpu=_cpu_processes(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if tensorboard else None,
        project_dir=str(output),
    )
    output.mkdir(parents=True, exist_ok=True)
    if tensorboard:
        accelerator.init_trackers("tensorboard")
    else:
        accelerator.print("note: TensorBoard logs are off (install `tensorboard`); see log.jsonl")
    return accelerator


def _cpu_processes() -> bool:
    """Several processes on a machine without CUDA (`torchrun` / `accelerate launch` on CPU
    cores): accelerate runs them as one gloo group only when told they are CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.cuda.is_available()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Switch on the retriever's activation checkpointing; ValueError if it has none."""
    enable = getattr(model, "enable_activation_checkpointing", None)
    if enable is None:
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    enable()


def _batch_stream(config: TrainConfig, adapter: TrainingAdapter, accelerator: Any) -> BatchStream:
    required = required_columns(config.data.negative_strategy)
    rows = TripletTable.from_paths(config.data.paths, config.data.image_root, required)
    if not config.data.paths or not len(rows):
        raise ValueError("no training rows: set data.paths to MegaPairs-schema files")
    stream = RowStream(
        len(rows), config.data.seed, accelerator.process_index, accelerator.num_processes
    )
    batches = TripletBatches(
        rows,
        stream,
        config.batch_size,
        config.data.negative_strategy,
        config.data.num_negatives,
        collate=adapter.collator,
        reserved_tokens=adapter.reserved_tokens,
    )
    pin = accelerator.device.type == "cuda"
    return BatchStream(batches, num_workers=config.num_workers, pin_memory=pin)


def periodic_eval(config: TrainConfig) -> PeriodicEval | None:
    """The evaluation during training that `config.eval` asks for, or None."""
    if config.eval is None:
        return None
    return PeriodicEval(config.eval, config.steps, Path(config.output_dir))


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One JSON line more in the training log."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The process's peak memory so far: CUDA max allocated on a GPU, else CPU max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"


# checkpoints on disk --------------------------------------------------------------------------


def list_checkpoints(output: Path) -> list[Path]:
    """The complete `checkpoint-<step>/` folders of `output`, oldest first."""
    if not output.is_dir():
        return []
    found = []
    for path in output.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint of `output`, or None."""
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all)."""
    if keep:
        for path in list_checkpoints(output)[:-keep]:
            shutil.rmtree(path)


def _check_resumable(config: TrainConfig, checkpoint: Path, world_size: int) -> int:
    """The step of `checkpoint`; ValueError when `config` cannot continue it."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    blockers = config.resume_blockers(state["config"])
    if blockers:
        raise ValueError(
            f"{checkpoint} was written with other settings for {', '.join(blockers)}: resuming "
            "would not continue the same run; use another output_dir or the saved settings"
        )
    if state["world_size"] != world_size:
        raise ValueError(
            f"{checkpoint} was written by {state['world_size']} process(es), not {world_size}: "
            "each process's data position is saved, so resume with the same count"
        )
    return int(state["step"])


def _saved_loss(checkpoint: Path | None) -> float | None:
    if checkpoint is None:
        return None
    loss = json.loads((checkpoint / STATE_FILE).read_text()).get("loss")
    return None if loss is None else float(loss)


def _saved_record(folder: Path) -> dict[str, Any]:
    """The training record of a saved model folder ({} without one)."""
    path = folder / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as staging:
            staging.write_text("".join(line + "\n" for line in kept))


# random generator states --------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch and (initialised) CUDA generator states, torch.load-safe."""
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda_in_use else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
