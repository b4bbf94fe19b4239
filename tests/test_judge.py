"""The score stage's judge: answers parsed leniently, a malformed answer repaired once or
recorded, transient failures retried by a re-run, a wrong setting stopping the stage, and a
kill -9 mid-stage resuming with only the missing requests (loopback chat server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_server import Body, ChatServer, Faults, image_data_urls, prompt_text
from run_fixtures import INSTRUCTIONS
from score_fixtures import build_score_run, run_score, score_config, scores
from tiny_models import Tiny

from megapairs.annotation.types import SetupError
from megapairs.config import PipelineConfig
from megapairs.quality.judge import parse_verdict
from megapairs.runs import RunDir, read_table
from megapairs.schemas import JUDGE_CACHE_DIR, SCORES_DIR

INSTRUCTION_COUNT = sum(len(v) for v in INSTRUCTIONS.values())
REPAIRED_ONCE = "make it rain"  # its first answer holds no JSON, the repair's does
NEVER_JSON = "fewer cars"  # never answers JSON: unparseable after the repair


# parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"verdict": "yes", "reason": "it matches"}', ("yes", "it matches")),
        ('```json\n{"verdict": "no", "reason": "wrong animal"}\n```', ("no", "wrong animal")),
        ('Sure. {"verdict": "YES", "reason": "ok"} Hope that helps!', ("yes", "ok")),
        ('<think>{"verdict": "no"}</think>{"verdict": "yes", "reason": "r"}', ("yes", "r")),
        ('{"note": 1} then {"verdict": "no"}', ("no", "")),
        ('{"verdict": " No ", "reason": 3}', ("no", "3")),
    ],
)
def test_verdicts_are_parsed_from_fenced_or_surrounded_json(
    answer: str, expected: tuple[str, str]
) -> None:
    assert parse_verdict(answer) == (expected, "")


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("yes, it matches", "no JSON object"),
        ('{"verdict": "maybe"}', "neither 'yes' nor 'no'"),
        ('{"reason": "no verdict"}', "no 'verdict'"),
        ('{"verdict": "yes"', "no JSON object"),
    ],
)
def test_answers_without_a_verdict_say_what_is_wrong(answer: str, problem: str) -> None:
    parsed, said = parse_verdict(answer)
    assert parsed is None and problem in said


# the stage with a judge --------------------------------------------------------------------
def instruction_of(body: Body) -> str:
    found = re.search(r"Instruction: (.*)\n", prompt_text(body))
    assert found is not None, prompt_text(body)
    return found.group(1)


def is_repair(body: Body) -> bool:
    return any(m.get("role") == "assistant" for m in body["messages"])


def verdict_of(instruction: str) -> str:
    return "yes" if re.search(r"rain|blue|cat", instruction) else "no"


def judge_answer(body: Body) -> str:
    """JSON in three styles by instruction; prose for the two malformed cases."""
    instruction = instruction_of(body)
    data = json.dumps({"verdict": verdict_of(instruction), "reason": f"about {instruction}"})
    if instruction == NEVER_JSON or (instruction == REPAIRED_ONCE and not is_repair(body)):
        return "I would say it mostly matches the target."
    if "same" in instruction:
        return f"```json\n{data}\n```"
    if "street" in instruction:
        return f"Here is my verdict: {data} That is all."
    return data


def judge_config(tiny_clip: Path, base_url: str, **judge: Any) -> PipelineConfig:
    endpoint = {"model": "fake-judge", "base_url": base_url, "timeout": 2.0, "probe": False}
    settings = {
        "enabled": True,
        "endpoint": endpoint,
        "concurrency": 4,
        "max_retries": 0,
        "backoff_initial": 0.01,
        "flush_every": 1,
        **judge,
    }
    return score_config(tiny_clip, judge=settings)


@pytest.fixture
def server() -> ChatServer:
    with ChatServer(answer=judge_answer) as chat:
        yield chat


def test_the_judge_answers_every_scored_instruction(
    tmp_path: Path, tiny_clip: Tiny, server: ChatServer
) -> None:
    fixture = build_score_run(tmp_path, tiny_clip.path)
    result = run_score(fixture.run, judge_config(tiny_clip.path, server.base_url))
    assert len(server.requests) == INSTRUCTION_COUNT + 2  # two repair requests
    assert all(len(image_data_urls(r.body)) == 2 for r in server.requests)
    rows = scores(fixture.run).to_pylist()
    for row in rows:
        assert row["judge_model"] == "fake-judge"
        if row["instruction"] == NEVER_JSON:
            assert row["judge_verdict"] is None
            assert row["judge_reason"].startswith("judge failed (unparseable)")
        else:
            assert row["judge_verdict"] == verdict_of(row["instruction"])
            assert row["judge_reason"] == f"about {row['instruction']}"
    counts = result.counts
    assert counts["judged"] == INSTRUCTION_COUNT - 1 == counts["judge_yes"] + counts["judge_no"]
    assert counts["judge_yes"] == sum(r["judge_verdict"] == "yes" for r in rows)
    assert (counts["judge_repaired"], counts["judge_failed"]) == (1, 1)
    assert counts["judge_failed_unparseable"] == 1 and counts["judge_failed_transient"] == 0


def test_cached_answers_are_not_sent_again(
    tmp_path: Path, tiny_clip: Tiny, server: ChatServer
) -> None:
    fixture = build_score_run(tmp_path, tiny_clip.path)
    config = judge_config(tiny_clip.path, server.base_url)
    run_score(fixture.run, config)
    first = scores(fixture.run)
    sent = len(server.requests)
    shutil.rmtree(Path(str(fixture.run.root)) / "_progress" / "score")  # parts to redo
    shutil.rmtree(fixture.run.folder(SCORES_DIR))
    run_score(fixture.run, config)
    assert len(server.requests) == sent  # every answer (malformed ones too) came from the cache
    assert scores(fixture.run).equals(first)


def test_transient_failures_are_recorded_and_retried_by_a_rerun(
    tmp_path: Path, tiny_clip: Tiny, server: ChatServer
) -> None:
    fixture = build_score_run(tmp_path, tiny_clip.path)
    config = judge_config(tiny_clip.path, server.base_url)
    server.faults = Faults(
        rule=lambda body: "http_500" if "umbrellas" in prompt_text(body) else None
    )
    result = run_score(fixture.run, config)
    assert (
        result.counts["judge_failed_server_error"] == result.counts["judge_failed_transient"] == 1
    )
    failed = [r for r in scores(fixture.run).to_pylist() if "umbrellas" in r["instruction"]]
    assert failed[0]["judge_verdict"] is None
    server.faults = Faults()
    sent = len(server.requests)
    again = run_score(fixture.run, config)
    assert len(server.requests) == sent + 1  # only the failed one, in the re-opened part
    assert again.computed == 1 and again.counts["judge_failed_transient"] == 0
    fixed = [r for r in scores(fixture.run).to_pylist() if "umbrellas" in r["instruction"]]
    assert fixed[0]["judge_verdict"] == "no"


def test_a_model_the_server_does_not_serve_stops_the_stage(tmp_path: Path, tiny_clip: Tiny) -> None:
    fixture = build_score_run(tmp_path, tiny_clip.path)
    with ChatServer(answer=judge_answer, models=("another-vlm",)) as server:
        with pytest.raises(SetupError, match=r"score\.judge.*fake-judge"):
            run_score(fixture.run, judge_config(tiny_clip.path, server.base_url))
        assert not server.requests
    assert not fixture.run.done_parts("score")


def test_the_hf_backend_judges_with_a_local_vision_language_model(
    tmp_path: Path, tiny_clip: Tiny, tiny_llava: Tiny
) -> None:
    """A random tiny LLaVA-NeXT sees both images; its answers hold no JSON verdict, so every
    instruction is asked twice and ends unparseable, recorded, never lost."""
    fixture = build_score_run(tmp_path, tiny_clip.path)
    endpoint = {"model": str(tiny_llava.path), "max_tokens": 8, "device": "cpu", "batch_size": 4}
    config = score_config(
        tiny_clip.path, judge={"enabled": True, "backend": "hf", "endpoint": endpoint}
    )
    result = run_score(fixture.run, config)
    counts = result.counts
    assert counts["scored"] == INSTRUCTION_COUNT
    assert counts["judged"] + counts["judge_failed"] == INSTRUCTION_COUNT
    rows = scores(fixture.run).to_pylist()
    assert {r["judge_model"] for r in rows} == {str(tiny_llava.path)}
    failed = [r for r in rows if r["judge_verdict"] is None]
    assert len(failed) == counts["judge_failed"] == counts.get("judge_failed_unparseable", 0)
    assert all(r["judge_reason"].startswith("judge failed (unparseable)") for r in failed)


# kill -9 mid-stage, then the same command --------------------------------------------------
def cached_answers(run: RunDir) -> int:
    chunks = sorted(Path(str(run.folder(JUDGE_CACHE_DIR))).rglob("chunk-*.parquet"))
    return sum(read_table(path).num_rows for path in chunks)


def score_command(run: RunDir, config_path: Path) -> list[str]:
    cli = "from megapairs.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    arguments = ["score", "--run", str(run.root), "--config", str(config_path), "--quiet"]
    return [sys.executable, "-c", cli, *arguments]


def test_kill_9_mid_stage_then_the_same_command_resends_only_what_is_missing(
    tmp_path: Path, tiny_clip: Tiny, server: ChatServer
) -> None:
    reference = build_score_run(tmp_path / "reference", tiny_clip.path)
    killed = build_score_run(tmp_path / "killed", tiny_clip.path)
    config = judge_config(tiny_clip.path, server.base_url, concurrency=1)
    run_score(reference.run, config)
    reference_requests = len(server.requests)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    server.faults = Faults(latency=0.15)
    command = score_command(killed.run, config_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while cached_answers(killed.run) < 4 and process.poll() is None:
        assert time.monotonic() < deadline, "no answer was cached within two minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.run.is_done("score", "part-00001"), "the stage finished before the kill"
    kept = cached_answers(killed.run)

    server.faults = Faults()
    sent_before = len(server.requests)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert len(server.requests) - sent_before == reference_requests - kept
    for part in killed.parts:
        got = read_table(killed.run.part_path(SCORES_DIR, part))
        assert got.equals(read_table(reference.run.part_path(SCORES_DIR, part)))
