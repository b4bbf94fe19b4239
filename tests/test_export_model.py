"""`megapairs export-model`: a tiny MMRet-CLIP checkpoint as a sentence-transformers folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from image_fixtures import save_random_images
from PIL import Image
from sentence_transformers import SentenceTransformer
from tiny_models import Tiny

from megapairs.models.base import build_retriever
from megapairs.models.clip import MMRetCLIP
from megapairs.models.export import (
    add_export_model_command,
    export_sentence_transformers,
    inspect_checkpoint,
    write_model_card,
)
from megapairs.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = "Find a picture of the same scene."
BASE = "openai/clip-vit-base-patch16"
TEXTS = ["the cat on a mat", "a red dog", "the cat"]


@pytest.fixture(scope="module")
def trained(tiny_clip: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer-style `final/` folder: the model, and its training record beside it."""
    root = tmp_path_factory.mktemp("train")
    dataset = root / "dataset"
    dataset.mkdir()
    info = {"counts": {"rows": 120, "pairs": 40}, "config_hash": "abc123"}
    (dataset / "dataset_info.json").write_text(json.dumps(info))
    model = MMRetCLIP.from_pretrained(tiny_clip.path)
    model.task_instruction = TASK
    model.save_pretrained(root / "final")
    config = TrainConfig(model={"name_or_path": BASE}, data={"paths": [str(dataset)]}, steps=7)
    record = {"steps": 7, "config": config.model_dump(mode="json")}
    (root / "final" / "megapairs_training.json").write_text(json.dumps(record))
    return root / "final"


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_sentence_transformers(trained, tmp_path_factory.mktemp("out") / "st")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    specs = [((40, 48), "RGB"), ((64, 36), "RGBA"), ((33, 33), "L")]
    paths = save_random_images(tmp_path_factory.mktemp("images"), specs)
    return [Image.open(path) for path in paths]


def load_exported(folder: Path) -> SentenceTransformer:
    """As a user loads it: sentence-transformers >= 6 asks `trust_remote_code` for any module
    class outside its own package; the class comes from the installed megapairs."""
    return SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)


def close(theirs: object, ours: torch.Tensor) -> bool:
    return torch.allclose(torch.as_tensor(theirs), ours, atol=1e-5)


def test_sentence_transformers_embeddings_equal_ours(
    exported: Path, trained: Path, images: list[Image.Image]
) -> None:
    ours = MMRetCLIP.from_pretrained(trained)
    st = load_exported(exported)
    composed = [{"image": image, "text": text} for image, text in zip(images, TEXTS, strict=True)]
    assert close(st.encode(images), ours.encode_candidates(images, None))
    assert close(st.encode_document(images), ours.encode_candidates(images, None))
    assert close(st.encode(TEXTS), ours.encode_candidates(None, TEXTS))
    assert close(st.encode(composed), ours.encode_candidates(images, TEXTS))
    assert close(st.encode_query(composed), ours.encode_queries(images, TEXTS))
    assert close(st.encode_query(TEXTS), ours.encode_queries(None, TEXTS))
    assert close(st.encode_query(images), ours.encode_queries(images, None))
    assert not close(st.encode_query(composed), ours.encode_candidates(images, TEXTS))
    assert st.prompts["query"] == TASK


def test_the_folder_is_also_an_mmret_clip_checkpoint(exported: Path, trained: Path) -> None:
    again = build_retriever("mmret-clip", str(exported))
    assert again.task_instruction == TASK  # type: ignore[attr-defined]
    assert close(
        again.encode_queries(None, TEXTS),
        MMRetCLIP.from_pretrained(trained).encode_queries(None, TEXTS),
    )
    modules = json.loads((exported / "modules.json").read_text())
    assert modules[0]["type"] == "megapairs.models.st_export.MMRetCLIPModule"


def test_loading_needs_trust_remote_code(exported: Path) -> None:
    assert not list(exported.rglob("*.py"))  # no code in the folder: megapairs provides it
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(exported), device="cpu")


def test_mixed_input_forms_are_refused(exported: Path, images: list[Image.Image]) -> None:
    st = load_exported(exported)
    with pytest.raises(ValueError):
        st.encode([images[0], "a red dog"], batch_size=8)
    with pytest.raises(ValueError, match="keys 'image' and/or 'text'"):
        st[0].preprocess([{"image": images[0], "caption": "x"}])


def test_card_names_base_model_and_training(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    assert f"base_model: {BASE}" in card
    assert "library_name: sentence-transformers" in card
    assert "- Steps: 7" in card
    assert "rows 120, pairs 40" in card
    assert TASK in card
    assert "pip install megapairs" in card and "trust_remote_code=True" in card
    assert "## License" in card


def test_mllm_checkpoints_get_a_card_only(tmp_path: Path) -> None:
    folder = tmp_path / "mllm"
    folder.mkdir()
    settings = {"kind": "mmret-mllm", "image_size": 512, "task_instruction": None}
    (folder / "mmret_mllm.json").write_text(json.dumps(settings))
    base = "llava-hf/llava-v1.6-mistral-7b-hf"
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    card = write_model_card(folder, tmp_path / "card", card={"license": "apache-2.0"}).read_text()
    assert f"base_model: {base}" in card and "license: apache-2.0" in card
    assert "CLIP-only" in card and "library_name" not in card
    with pytest.raises(ValueError, match="CLIP-only"):
        export_sentence_transformers(folder, tmp_path / "st")


def test_checkpoint_folders_resolve(trained: Path, tmp_path: Path) -> None:
    assert inspect_checkpoint(trained.parent).folder == trained  # a training output: final/
    checkpoint = tmp_path / "checkpoint-3"
    MMRetCLIP.from_pretrained(trained).save_pretrained(checkpoint / "model")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 3, "config": {}}))
    source = inspect_checkpoint(checkpoint)
    assert source.folder == checkpoint / "model" and source.training["step"] == 3


def test_errors_are_clear(trained: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model folder"):
        export_sentence_transformers(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="not an MMRet checkpoint"):
        export_sentence_transformers(tmp_path, tmp_path / "out")
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match=r"not an MMRet checkpoint.*'dinov2'"):
        export_sentence_transformers(tmp_path / "dino", tmp_path / "out")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_sentence_transformers(trained, exported)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="megapairs")
    add_export_model_command(top.add_subparsers(dest="command", required=True))
    return top


def test_command(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["export-model", "--help"])
    assert exit_info.value.code == 0 and "sentence-transformers" in capsys.readouterr().out
    args = parser().parse_args(
        ["export-model", "--model", str(trained), "--out", str(tmp_path / "c")]
    )
    assert args.handler(args) == 0
    assert (tmp_path / "c" / "modules.json").is_file() and "wrote" in capsys.readouterr().out
    card_args = ["--format", "card", "--license", "mit"]
    args = parser().parse_args(
        ["export-model", "--model", str(trained), "--out", str(tmp_path / "d"), *card_args]
    )
    assert args.handler(args) == 0
    assert "license: mit" in (tmp_path / "d" / "README.md").read_text()
    args = parser().parse_args(
        ["export-model", "--model", str(tmp_path / "no"), "--out", str(tmp_path / "e")]
    )
    with pytest.raises(FileNotFoundError):
        args.handler(args)


def test_the_megapairs_command_exports_and_reports_errors(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from megapairs.cli import main

    assert main(["export-model", "--model", str(trained), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "modules.json").is_file()
    assert main(["export-model", "--model", str(tmp_path / "no"), "--out", str(tmp_path / "n")])
    assert "export-model: error:" in capsys.readouterr().err
