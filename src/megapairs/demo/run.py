"""`megapairs demo`: generate a scene corpus, synthesize pairs from it offline, and show
what came out, including how often mined pairs share ground-truth attributes."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import PipelineConfig, load_config
from megapairs.corpus.store import read_corpus, read_rejects
from megapairs.demo.scenes import SceneCorpus, generate_scene_corpus, read_attributes
from megapairs.demo.summary import format_summary, read_pairs, summarize_run
from megapairs.pipeline.report import accounting_errors, format_results
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import AnyPath, RunDir
from megapairs.schemas import DATASET_DIR

COMPARED_ATTRIBUTES = ("shape", "colour", "count", "position", "texture", "background")
INPUT_FOLDER = "input"


@dataclass(frozen=True)
class Agreement:
    """How often pairs share each ground-truth attribute: mined pairs vs random pairs."""

    pairs: int
    mined: dict[str, float]
    random: dict[str, float]

    @property
    def mined_mean(self) -> float:
        return float(np.mean(list(self.mined.values())))

    @property
    def random_mean(self) -> float:
        return float(np.mean(list(self.random.values())))


def demo_input_dir(run_root: Path, images: int, seed: int) -> Path:
    """Where the demo writes its corpus: named by size and seed, so another size or seed
    changes the config's input path and the run directory refuses to mix the two."""
    return Path(run_root) / INPUT_FOLDER / f"scenes-n{images}-seed{seed}"


def demo_config_path() -> Path:
    return Path(str(resources.files("megapairs") / "configs" / "demo.yaml"))


def share_rates(
    pairs: list[tuple[str, str]], truth: dict[str, dict[str, object]]
) -> dict[str, float]:
    """For each attribute, the fraction of (query, target) pairs with equal values."""
    return {
        name: float(np.mean([truth[q][name] == truth[t][name] for q, t in pairs]))
        for name in COMPARED_ATTRIBUTES
    }


def random_pairs(keys: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """`count` ordered pairs of distinct keys, drawn with a seeded generator."""
    rng = np.random.default_rng(seed)
    first = rng.integers(len(keys), size=count)
    offset = rng.integers(1, len(keys), size=count)
    return [(keys[a], keys[(a + o) % len(keys)]) for a, o in zip(first, offset, strict=True)]


def attribute_agreement(
    pairs: pa.Table, corpus: pa.Table, truth: dict[str, dict[str, object]], seed: int = 0
) -> Agreement:
    """Attribute share rates of the mined pairs and of as many random pairs."""
    key_of = dict(zip(corpus["id"].to_pylist(), corpus["key"].to_pylist(), strict=True))
    mined = [
        (key_of[q], key_of[t])
        for q, t in zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist(), strict=True)
    ]
    if not mined:
        raise ValueError("no pairs were mined; widen the windows or use more images")
    keys = sorted(k for k in key_of.values() if k in truth)
    return Agreement(
        pairs=len(mined),
        mined=share_rates(mined, truth),
        random=share_rates(random_pairs(keys, len(mined), seed), truth),
    )


def format_agreement(agreement: Agreement) -> str:
    lines = [f"ground truth: attribute shared by {agreement.pairs} mined vs as many random pairs"]
    for name in COMPARED_ATTRIBUTES:
        mined, rand = agreement.mined[name], agreement.random[name]
        lines.append(f"  {name:<11} mined {mined:6.1%}   random {rand:6.1%}")
    lines.append(
        f"  {'mean':<11} mined {agreement.mined_mean:6.1%}   random {agreement.random_mean:6.1%}"
    )
    return "\n".join(lines)


def reject_check(run: RunDir, corpus: SceneCorpus) -> list[str]:
    """Bad records the generator planted that ingest did not reject for the expected reason."""
    rejects = read_rejects(run).filter(pc.field("stage") == "ingest")
    got = dict(zip(rejects["key"].to_pylist(), rejects["reason"].to_pylist(), strict=True))
    return [
        f"{name}: expected {reason}, got {got.get(name, 'kept')}"
        for name, reason in corpus.expected_rejects.items()
        if got.get(name) != reason
    ]


def demo_config(
    config_path: Path | None, corpus: SceneCorpus, seed: int, overrides: list[str] | None = None
) -> PipelineConfig:
    settings = [f"input.path={corpus.images_dir}", f"seed={seed}", *(overrides or [])]
    return load_config(config_path or demo_config_path(), settings)


def annotator_note(config: PipelineConfig) -> str:
    """Which annotator the demo uses, and how to point it at a model server."""
    annotate = config.annotate
    if annotate.backend == "template":
        return (
            "demo: annotating with the model-free `template` backend (instructions built from "
            "the captions); to use models, serve them and pass e.g. --set annotate.backend=openai "
            "--set annotate.describer.base_url=http://127.0.0.1:8000/v1 "
            "--set annotate.describer.model=Qwen/Qwen2-VL-7B-Instruct (and the instructor's)"
        )
    return (
        f"demo: annotating with the `{annotate.backend}` backend: describer "
        f"{annotate.describer.model} ({', '.join(annotate.describer.base_urls)}), instructor "
        f"{annotate.instructor.model} ({', '.join(annotate.instructor.base_urls)})"
    )


def dataset_check(run: RunDir) -> list[str]:
    """Problems `megapairs validate` finds in the exported dataset (printed with its stats)."""
    from megapairs.dataset.stats import dataset_stats, format_stats
    from megapairs.dataset.validate import validate_dataset

    dataset = run.folder(DATASET_DIR)
    print(format_stats(dataset_stats(dataset, run)))
    report = validate_dataset(dataset)
    print(f"dataset: {dataset} validated, {len(report.problems)} problems")
    return [f"dataset: {problem}" for problem in report.problems[:20]]


def learn_step(run: RunDir, corpus: SceneCorpus, seed: int, progress: bool) -> list[str]:
    """Train a small CLIP on the exported triplets and evaluate it, before and after, on a
    held-out composed-retrieval set built from the corpus; returns check failures."""
    from megapairs.demo.learn import format_learn_report, learn_checks, train_and_evaluate

    report = train_and_evaluate(run, corpus.attributes_path, seed, progress)
    print(format_learn_report(report))
    return learn_checks(report)


def run_demo(
    run_root: Path,
    images: int,
    seed: int,
    config_path: Path | None,
    progress: bool = True,
    overrides: list[str] | None = None,
    learn: bool = False,
) -> int:
    """Generate the corpus, run every stage, print the summary; 0 when all checks hold."""
    started = time.perf_counter()
    run = RunDir(run_root)
    folder = demo_input_dir(run.root, images, seed)
    print(f"demo: generating {images} captioned scenes (seed {seed}) in {folder}")
    corpus = generate_scene_corpus(folder, images, seed, overwrite=True)
    config = demo_config(config_path, corpus, seed, overrides)
    print(annotator_note(config))
    results = LocalRunner(run, config, progress).run_all(build_stages(config, progress=progress))
    resumed = [r for r in results if r.computed < r.parts]
    if resumed:
        print("resumed:\n" + format_results(resumed))
    print(format_summary(summarize_run(run)))
    truth = read_attributes(corpus.attributes_path)
    agreement = attribute_agreement(read_pairs(run), read_corpus(run), truth, seed)
    print(format_agreement(agreement))
    problems = accounting_errors(results) + reject_check(run, corpus) + dataset_check(run)
    if learn:
        problems += learn_step(run, corpus, seed, progress)
    for problem in problems:
        print(f"CHECK FAILED {problem}")
    print(f"demo: done in {time.perf_counter() - started:.0f} s; run directory {run.root}")
    print(f"demo: see, search and curate the triplets: {explore_command(run.root)}")
    return 1 if problems else 0


def explore_command(run_root: AnyPath) -> str:
    """The command that opens the explorer on a run, runnable as printed: the `megapairs`
    beside this Python (a virtualenv's bin) when it is there."""
    beside = Path(sys.executable).parent / "megapairs"
    program = str(beside) if beside.exists() else "megapairs"
    return shlex.join([program, "explore", "--run", str(run_root)])
