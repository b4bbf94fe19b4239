"""Score stage throughput on the demo, and its cost relative to the demo's annotate.

Runs `megapairs demo --images N` once (template annotate, score off), then times, on that
run directory, the `annotate` stage (template backend, reset and run again) and the
`score` stage with the offline `channels` scorer (the demo's `image_semantic` image channel
+ its sentence-transformers `caption` channel), each through `LocalRunner` as the CLI runs
them. With `--judge` it also times `score` with the judge against the tests' loopback chat
server (in this process, answering a JSON verdict after `--judge-latency` seconds).
Prints a markdown block: seconds, instructions/s, score's time relative to annotate.

    python bench/bench_score.py                  # 300 images
    python bench/bench_score.py --images 600 --judge
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import cpu_model

from megapairs.annotation.stage import AnnotateStage
from megapairs.config import PipelineConfig
from megapairs.demo.run import run_demo
from megapairs.pipeline.reset import reset_stage
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.stage import Stage
from megapairs.quality.stage import ScoreStage
from megapairs.runs import RunDir

TESTS = Path(__file__).resolve().parents[1] / "tests"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage; the fastest")
    parser.add_argument("--judge", action="store_true", help="also time score with the judge")
    parser.add_argument("--judge-latency", type=float, default=0.2)
    parser.add_argument("--judge-concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


@dataclass
class Measured:
    name: str
    seconds: float
    counts: dict[str, int]
    setup: float = 0.0  # seconds of it spent building the worker state (models)

    @property
    def rate(self) -> float:
        return self.counts.get("instructions", 0) / self.seconds


def build_demo(root: Path, images: int, seed: int) -> tuple[RunDir, PipelineConfig]:
    """The demo's run directory (its printout swallowed) and its config."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_demo(root, images, seed, None, progress=False)
    if code != 0:
        raise RuntimeError(f"the demo failed its checks (exit {code})")
    run = RunDir(root)
    return run, PipelineConfig.model_validate(run.read_manifest()["config"])


def timed(run: RunDir, config: PipelineConfig, stage: Stage, name: str) -> Measured:
    """The stage run from scratch (reset first) through LocalRunner, timed."""
    reset_stage(run, stage.name)
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    try:
        started = time.perf_counter()
        result = runner.run_stage(stage)
        return Measured(name, time.perf_counter() - started, result.counts)
    finally:
        runner.close()


def setup_seconds(run: RunDir, stage: Stage) -> float:
    started = time.perf_counter()
    stage.setup(run)
    return time.perf_counter() - started


def judge_server(latency: float) -> Any:
    """The tests' chat server answering every request with a JSON verdict."""
    sys.path.insert(0, str(TESTS))
    from chat_server import ChatServer, Faults

    verdict = json.dumps({"verdict": "yes", "reason": "the instruction fits"})
    return ChatServer(Faults(latency=latency), answer=lambda body: verdict)


def judged(config: PipelineConfig, base_url: str, concurrency: int) -> PipelineConfig:
    data = config.model_dump(mode="json")
    endpoint = {"model": "judge", "base_url": base_url, "probe": False}
    judge = {"enabled": True, "endpoint": endpoint, "concurrency": concurrency}
    data["score"] = {**data["score"], "judge": judge}
    return PipelineConfig.model_validate(data)


def best(repeats: int, measure_once: Any) -> Measured:
    """The fastest of `repeats` runs (a shared machine's load only ever slows one down)."""
    return min((measure_once() for _ in range(repeats)), key=lambda m: m.seconds)


def measure(args: argparse.Namespace, root: Path) -> list[Measured]:
    run, config = build_demo(root, args.images, args.seed)
    annotate = AnnotateStage(config, progress=False)
    results = [best(args.repeats, lambda: timed(run, config, annotate, "annotate (template)"))]
    score = ScoreStage(config, progress=False)
    setup = min(setup_seconds(run, score) for _ in range(args.repeats))
    results.append(best(args.repeats, lambda: timed(run, config, score, "score (channels)")))
    results[-1].setup = setup
    if args.judge:
        with judge_server(args.judge_latency) as server:
            with_judge = judged(config, server.base_url, args.judge_concurrency)
            stage = ScoreStage(with_judge, progress=False)
            results.append(timed(run, with_judge, stage, "score (channels + judge)"))
            results[-1].setup = setup
    return results


def report(args: argparse.Namespace, results: list[Measured]) -> str:
    annotate = results[0]
    lines = [
        f"date {datetime.now(UTC):%Y-%m-%d}, {platform.node()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}",
        "command: python " + " ".join(shlex.quote(a) for a in sys.argv),
        f"demo: {args.images} images, seed {args.seed}; best of {args.repeats} runs; "
        f"{annotate.counts['pairs']} pairs, {annotate.counts['instructions']} instructions",
        "| stage | seconds | setup (timed apart) | instructions/s | vs annotate |",
        "|---|---|---|---|---|",
    ]
    for m in results:
        lines.append(
            f"| {m.name} | {m.seconds:.2f} | {m.setup:.2f} | {m.rate:,.0f} | "
            f"{m.seconds / annotate.seconds:.2f}x |"
        )
    if args.judge:
        lines.append(
            f"judge: loopback server, {args.judge_latency} s per answer, concurrency "
            f"{args.judge_concurrency}"
        )
    counts = results[1].counts
    lines.append(f"score counts: {', '.join(f'{k} {v}' for k, v in counts.items())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args, Path(tmp) / "demo")
    print(report(args, results))
    if args.json:
        args.json.write_text(json.dumps([m.__dict__ for m in results], indent=2))
    lost = [
        m
        for m in results[1:]
        if m.counts["instructions"] != m.counts["scored"] + m.counts["failed"]
    ]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
