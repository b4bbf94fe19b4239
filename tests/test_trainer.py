"""The trainer end to end on a tiny CLIP (and a tiny LLaVA-NeXT): logs, checkpoints, exact
resume, gradient caching against the plain step, bf16 on the CPU."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training_data import write_our_dataset
from tiny_models import Tiny
from tiny_vlm import build_tiny_llava_next

from megapairs.config import ConfigError
from megapairs.models.clip import MMRetCLIP
from megapairs.training import trainer as trainer_module
from megapairs.training.adapters import CLIPAdapter, build_adapter
from megapairs.training.config import TrainConfig, load_train_config
from megapairs.training.data import TrainSample
from megapairs.training.trainer import TrainResult, train

LOG_FIELDS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "queries_per_s",
    "step_time_s",
    "peak_memory_mb",
    "memory",
    "skipped_images",
    "time",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_our_dataset(tmp_path_factory.mktemp("dataset"), rows=12)


@pytest.fixture(scope="module")
def dropout_clip(tiny_clip: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with attention dropout 0.2: its training steps draw random numbers, so
    an exact resume needs the generator states restored."""
    from transformers import CLIPConfig

    folder = tmp_path_factory.mktemp("dropout-clip")
    shutil.copytree(tiny_clip.path, folder, dirs_exist_ok=True)
    clip_config = CLIPConfig.from_pretrained(folder)
    clip_config.text_config.attention_dropout = 0.2
    clip_config.vision_config.attention_dropout = 0.2
    clip_config.save_pretrained(folder)
    return folder


def config(model: Path, data: Path, output: Path, *overrides: str) -> TrainConfig:
    """A small CPU run: batch 4, 1 positive + 2 negatives (query image + 1 mined)."""
    settings = [
        f"model.name_or_path={model}",
        f"data.paths=[{data}]",
        f"output_dir={output}",
        "data.num_negatives=2",
        "batch_size=4",
        "steps=4",
        "log_every=1",
        "save_every=2",
        "keep_checkpoints=0",
        "num_workers=0",
        "mixed_precision=no",
        "temperature=0.05",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        *overrides,
    ]
    return load_train_config(None, settings)


def read_log(result: TrainResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.log_file.read_text().splitlines()]


def test_a_run_logs_checkpoints_and_saves_a_loadable_model(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path
) -> None:
    result = train(config(tiny_clip.path, dataset, tmp_path, "keep_checkpoints=1"), False)
    assert result.steps == 4 and len(result.losses) == 4
    assert result.final_loss == result.losses[-1]
    log = read_log(result)
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert all(set(line) == LOG_FIELDS for line in log)
    assert [line["loss"] for line in log] == pytest.approx(result.losses)
    assert log[0]["lr"] == 0.0 and log[1]["lr"] == pytest.approx(1e-3)  # warm-up, then decay
    assert log[2]["lr"] == pytest.approx(1e-3 * 2 / 3)
    assert log[-1]["memory"] == "cpu_max_rss" and log[-1]["peak_memory_mb"] > 50
    assert log[-1]["queries_per_s"] > 0 and log[-1]["skipped_images"] == {}

    assert [p.name for p in result.checkpoints] == ["checkpoint-4"]  # checkpoint-2 pruned
    checkpoint = result.checkpoints[0]
    names = {p.name for p in checkpoint.iterdir()}
    expected = {"model", "optimizer.pt", "scheduler.pt", "rng-0.pt", "data-0.json"}
    assert names == {*expected, "trainer_state.json"}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1
    assert state["config"]["batch_size"] == 4
    assert json.loads((checkpoint / "data-0.json").read_text())["next_batch"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    saved = MMRetCLIP.from_pretrained(checkpoint / "model").clip.state_dict()
    final = MMRetCLIP.from_pretrained(result.final_model).clip.state_dict()
    start = MMRetCLIP.from_pretrained(tiny_clip.path).clip.state_dict()
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(saved[name], final[name]) and not torch.equal(final[name], start[name])
    assert torch.equal(final["logit_scale"], start["logit_scale"])  # frozen: unused by the loss


def test_an_interrupted_run_resumes_with_the_same_losses(
    dropout_clip: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ("steps=6", "save_every=3", "data.negative_strategy=mined")
    straight = train(config(dropout_clip, dataset, tmp_path / "straight", *settings), False)

    interrupted = config(dropout_clip, dataset, tmp_path / "interrupted", *settings)
    real_step = trainer_module._TrainingRun.step
    calls: list[int] = []

    def crash_at_step_5(self: Any) -> float:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed after checkpoint-3 and one more step
        return real_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module._TrainingRun, "step", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(interrupted, False)
    resumed = train(interrupted, False)  # the same command again

    assert resumed.resumed_from == 3 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-6, abs=1e-7)
    assert [line["step"] for line in read_log(resumed)] == [1, 2, 3, 4, 5, 6]  # 4 not twice
    assert [line["loss"] for line in read_log(resumed)] == pytest.approx(straight.losses)
    again = train(interrupted, False)  # finished: nothing more to do
    assert again.losses == [] and again.final_loss == pytest.approx(straight.losses[-1])


def test_a_resume_refuses_settings_that_change_the_run(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path
) -> None:
    train(config(tiny_clip.path, dataset, tmp_path, "steps=2"), False)
    with pytest.raises(ValueError, match="temperature"):
        train(config(tiny_clip.path, dataset, tmp_path, "steps=2", "temperature=0.1"), False)
    more_logs = config(tiny_clip.path, dataset, tmp_path, "steps=2", "log_every=5")
    assert train(more_logs, False).resumed_from == 2  # logging settings may change


def test_gradient_caching_equals_the_plain_step(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path
) -> None:
    settings = ("steps=2", "optim.warmup_steps=0")  # step 1 updates the weights
    plain = train(config(tiny_clip.path, dataset, tmp_path / "plain", *settings), False)
    cached = train(
        config(tiny_clip.path, dataset, tmp_path / "cached", *settings, "chunk_size=5"), False
    )
    assert cached.losses[0] == pytest.approx(plain.losses[0], rel=1e-5)
    assert cached.losses[1] == pytest.approx(plain.losses[1], rel=1e-4)  # after one update


def test_bf16_mixed_precision_trains_on_the_cpu(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path
) -> None:
    settings = ("mixed_precision=bf16", "chunk_size=6", "steps=2", "save_every=10")
    result = train(config(tiny_clip.path, dataset, tmp_path, *settings), False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    fp32 = train(config(tiny_clip.path, dataset, tmp_path / "fp32", "steps=1"), False)
    assert result.losses[0] == pytest.approx(fp32.losses[0], rel=0.05)  # bf16 is close
    assert result.losses[0] != fp32.losses[0]  # ... but autocast did run in bf16


def test_fp16_loss_scaling_skips_the_schedule_and_resumes_its_scale(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gradient scaler (what fp16 gives on a GPU; here a CPU one) whose first scale makes
    every gradient overflow: each optimizer step is skipped, so the weights and the learning
    rate stay, and the halved scale is saved and restored with the checkpoint."""
    make_accelerator = trainer_module._make_accelerator

    def with_scaler(*args: Any) -> Any:
        accelerator = make_accelerator(*args)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=0.9)
        return accelerator

    monkeypatch.setattr(trainer_module, "_make_accelerator", with_scaler)
    settings = ("optim.warmup_steps=0", "save_every=2")
    straight = train(config(tiny_clip.path, dataset, tmp_path / "straight", *settings), False)
    assert [line["lr"] for line in read_log(straight)] == [1e-3] * 4  # never decayed
    scaler = torch.load(straight.checkpoints[-1] / "scaler.pt")
    after_4_skips = pytest.approx(2.0**127 * 0.9**4, rel=1e-6)  # backed off at each skip
    assert scaler["scale"] == after_4_skips
    final = MMRetCLIP.from_pretrained(straight.final_model).clip.state_dict()
    start = MMRetCLIP.from_pretrained(tiny_clip.path).clip.state_dict()
    assert all(torch.equal(final[name], start[name]) for name in start)

    interrupted = config(tiny_clip.path, dataset, tmp_path / "interrupted", *settings)
    real_step = trainer_module._TrainingRun.step
    calls: list[int] = []

    def crash_at_step_3(self: Any) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module._TrainingRun, "step", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(interrupted, False)
    resumed = train(interrupted, False)
    assert resumed.resumed_from == 2
    assert torch.load(resumed.checkpoints[-1] / "scaler.pt")["scale"] == after_4_skips
    (resumed.checkpoints[0] / "scaler.pt").unlink()
    shutil.rmtree(resumed.checkpoints[-1])
    with pytest.raises(ValueError, match=r"no scaler\.pt"):
        train(interrupted, False)


def test_the_task_instruction_is_saved_and_used_by_default(
    tiny_clip: Tiny, dataset: Path, tmp_path: Path
) -> None:
    task = "Retrieve an image that fits the change."
    settings = ("steps=2", f"model.task_instruction={task}")
    result = train(config(tiny_clip.path, dataset, tmp_path, *settings), False)
    for folder in (result.final_model, result.checkpoints[-1] / "model"):
        saved = json.loads((folder / "mmret_clip.json").read_text())
        assert saved["task_instruction"] == task
    trained = MMRetCLIP.from_pretrained(result.final_model)
    assert trained.task_instruction == task
    images = [dataset / "images" / "img-0.png", dataset / "images" / "img-1.png"]
    texts = ["make it red", "now in blue"]
    default = trained.encode_queries(images, texts, instruction=None)
    assert torch.equal(default, trained.encode_queries(images, texts, instruction=task))
    assert not torch.allclose(default, trained.encode_queries(images, texts, instruction=""))
    untasked = train(config(tiny_clip.path, dataset, tmp_path / "plain", "steps=1"), False)
    assert MMRetCLIP.from_pretrained(untasked.final_model).task_instruction is None


def test_skipped_images_reach_the_result_and_the_log(tiny_clip: Tiny, tmp_path: Path) -> None:
    data = write_our_dataset(tmp_path / "data", rows=12)
    (data / "images" / "img-3.png").unlink()
    result = train(config(tiny_clip.path, data, tmp_path / "out", "steps=3"), False)
    assert result.skipped_images.get("missing_file", 0) >= 1
    assert read_log(result)[-1]["skipped_images"] == result.skipped_images


def test_the_clip_collator_lays_out_queries_and_grouped_candidates(tiny_clip: Tiny) -> None:
    settings = load_train_config(
        None, [f"model.name_or_path={tiny_clip.path}", "model.task_instruction=Find"]
    ).model
    adapter = build_adapter(settings)
    assert isinstance(adapter, CLIPAdapter)
    pictures = [Image.new("RGB", (32, 32), (level * 40,) * 3) for level in range(6)]
    samples = [
        TrainSample(0, pictures[0], "a cat", pictures[1:3]),
        TrainSample(1, pictures[3], "the red one", pictures[4:6]),
    ]
    batch = adapter.collator(samples)
    assert batch.num_queries == 2 and batch.num_candidates == 4
    levels = batch.candidates["pixel_values"].mean(dim=(1, 2, 3))
    assert levels.argsort().tolist() == [0, 1, 2, 3]  # images 1, 2 then 4, 5: grouped per query
    text = adapter.model.tokenizer.decode(batch.queries["input_ids"][1], skip_special_tokens=True)
    assert text.replace(" ", "") == "findtheredone"  # the task instruction comes first
    with pytest.raises(ValueError, match="image_size"):
        build_adapter(settings.model_copy(update={"image_size": 64}))


def test_unknown_or_empty_settings_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chunk_sise"):
        load_train_config(None, ["chunk_sise=4"])
    with pytest.raises(ConfigError, match="num_negatives"):
        load_train_config(None, ["data.negative_strategy=both", "data.num_negatives=1"])
    assert load_train_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ValueError, match="name_or_path"):
        train(load_train_config(None, ["model.name_or_path=", f"output_dir={tmp_path}"]), False)


def test_the_mllm_trains_with_lora_and_gradient_caching(dataset: Path, tmp_path: Path) -> None:
    from megapairs.models.mllm import MMRetMLLM

    tiny = build_tiny_llava_next(tmp_path / "llava")
    settings = (
        "model.kind=mmret-mllm",
        "model.image_size=32",
        "model.lora.rank=4",
        "model.lora.dropout=0.0",
        "model.task_instruction=Find it.",
        "data.negative_strategy=query_image",
        "batch_size=2",
        "steps=2",
        "optim.warmup_steps=0",
    )
    plain = train(config(tiny.path, dataset, tmp_path / "plain", *settings), False)
    cached = train(
        config(tiny.path, dataset, tmp_path / "cached", *settings, "chunk_size=3"), False
    )
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    adapter = load_file(cached.final_model / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # zero-initialised
    assert any("vision_tower" in name for name in adapter)  # LoRA on the ViT and the LLM
    assert any("language_model" in name for name in adapter)
    trained = MMRetMLLM.from_pretrained(cached.final_model)  # an adapter folder, merged
    image = [dataset / "images" / "img-0.png"]
    embedding = trained.encode(images=image)
    assert embedding.shape == (1, trained.dim) and torch.isfinite(embedding).all()
    assert trained.task_instruction == "Find it."  # from mmret_mllm.json
    default = trained.encode_queries(image, ["make it red"], instruction=None)
    assert torch.equal(default, trained.encode_queries(image, ["make it red"], "Find it."))
    assert not torch.allclose(default, trained.encode_queries(image, ["make it red"], ""))
