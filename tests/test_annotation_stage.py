"""The annotate stage end to end: the template backend offline, and the openai backend
against a real chat-completions server on loopback (tests/chat_server.py) with faults
injected per pair, a resumed run that completes the rest, and a kill -9 mid-part."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from chat_server import Body, ChatServer, Faults, prompt_text
from PIL import Image
from run_fixtures import PAIRS, RECORDS, FixtureRun, build_run, pair_id

from megapairs.annotation.prompts import load_prompts
from megapairs.annotation.stage import AnnotateStage
from megapairs.config import PipelineConfig
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.runs import RunDir, concat_tables, read_table
from megapairs.schemas import (
    ANNOTATION_CACHE_DIR,
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    DATASET_SCHEMA,
)

SEED = 7
ALL_PAIRS = {pair_id(q, t): (q, t) for part in PAIRS.values() for q, t, *_ in part}


def caption(record_id: int) -> str:
    return RECORDS[record_id][1] or "(no caption)"


def annotate(run: RunDir, config: PipelineConfig) -> StageResult:
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    return runner.run_stage(AnnotateStage(config, progress=False))


def annotations(run: RunDir) -> pa.Table:
    return concat_tables(run.files(ANNOTATIONS_DIR, "annotate"), ANNOTATIONS_SCHEMA)


def failures(run: RunDir) -> pa.Table:
    return concat_tables(run.files(ANNOTATION_FAILURES_DIR, "annotate"), ANNOTATION_FAILURES_SCHEMA)


def openai_config(base_url: str, **annotate: Any) -> PipelineConfig:
    endpoint = {"base_url": base_url, "timeout": 1.0, "temperature": 0.0}
    settings = {
        "backend": "openai",
        "concurrency": 4,
        "max_retries": 1,
        "backoff_initial": 0.01,
        "backoff_max": 2.0,
        "flush_every": 1,
        # (the capability probe's requests would blur the request counts here; it has its
        # own tests in test_annotation_hardening.py)
        "describer": {"model": "fake-vlm", "probe": False, **endpoint},
        "instructor": {"model": "fake-llm", **endpoint},
        **annotate,
    }
    return PipelineConfig.model_validate({"seed": SEED, "annotate": settings})


@pytest.fixture
def fixture_run(tmp_path: Path) -> FixtureRun:
    return build_run(tmp_path, annotate=False)


@pytest.fixture
def server() -> ChatServer:
    with ChatServer() as chat:
        yield chat


# template backend ---------------------------------------------------------------------------
def test_template_backend_annotates_every_pair_offline(fixture_run: FixtureRun) -> None:
    config = PipelineConfig.model_validate({"seed": SEED})
    result = annotate(fixture_run.run, config)
    table = annotations(fixture_run.run)
    assert result.counts["pairs"] == len(ALL_PAIRS) == table.num_rows
    assert result.counts["failed"] == 0 and failures(fixture_run.run).num_rows == 0
    assert set(table["pair_id"].to_pylist()) == set(ALL_PAIRS)
    for row in table.to_pylist():
        assert 3 <= len(row["instructions"]) <= 6
        assert row["backend"] == row["describer_model"] == row["instructor_model"] == "template"
        assert row["prompt_version"] == load_prompts().version and row["seed"] == SEED
        assert 60 <= row["word_num"] <= 100 and len(row["demonstration_ids"]) == 5
        target = caption(ALL_PAIRS[row["pair_id"]][1])
        assert target in row["description"] or target == "(no caption)"
    again = annotate(fixture_run.run, config)
    assert again.computed == 0 and again.counts == result.counts


def test_template_keeps_enough_instructions_when_its_specific_ones_restate_the_target() -> None:
    from megapairs.annotation.backends.template import instruct_pair
    from megapairs.annotation.checks import check_instructions
    from megapairs.annotation.types import PairContext

    unrelated = PairContext("p", "a green ring", "four red solid squares", word_num=70)
    raw = json.dumps({"instructions": instruct_pair(unrelated)})
    check = check_instructions(raw, unrelated.target_caption, 3, 6, (3, 40))
    assert check.reason is None and len(check.accepted) >= 3
    assert any(d.startswith("restates_target_caption") for d in check.dropped)


# openai backend: what is sent ----------------------------------------------------------------
def image_size(data_url: str) -> tuple[int, int]:
    header, encoded = data_url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(encoded))).size


def image_urls(body: Body) -> list[str]:
    parts = [p for m in body["messages"] for p in m["content"] if isinstance(p, dict)]
    return [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]


def record_size(fixture: FixtureRun, record_id: int) -> tuple[int, int]:
    return Image.open(io.BytesIO(fixture.image_bytes[record_id])).size


def test_openai_requests_carry_images_captions_budget_and_demonstrations(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    result = annotate(fixture_run.run, openai_config(server.base_url))
    assert result.counts["annotated"] == len(ALL_PAIRS), failures(fixture_run.run).to_pylist()
    prompts = load_prompts()
    demos = {d.id: d for d in prompts.demonstrations}
    describe = [r.body for r in server.requests if image_urls(r.body)]
    instruct = [r.body for r in server.requests if not image_urls(r.body)]
    assert len(describe) == len(instruct) == len(ALL_PAIRS)
    for row in annotations(fixture_run.run).to_pylist():
        query, target = ALL_PAIRS[row["pair_id"]]
        (body,) = [b for b in describe if pair_of(b) == row["pair_id"]]
        assert body["model"] == "fake-vlm" and body["temperature"] == 0.0
        urls = image_urls(body)
        sizes = [record_size(fixture_run, record) for record in (query, target)]
        assert [image_size(url) for url in urls] == sizes
        assert f"about {row['word_num']} words" in prompt_text(body)
        (body,) = [b for b in instruct if pair_of(b) == row["pair_id"]]
        assert body["model"] == "fake-llm"
        text = prompt_text(body)
        assert f"Description: {row['description']}\n" in text
        assert len(row["demonstration_ids"]) == 5
        for demo_id in row["demonstration_ids"]:
            assert demos[demo_id].description in text
        assert text.count("\nDescription: ") == 6  # five demonstrations and the pair


# openai backend: faults, then a resumed run ---------------------------------------------------
def step_of(body: Body) -> str:
    if image_urls(body):
        return "describe"
    roles = [m.get("role") for m in body["messages"]]
    return "repair" if "assistant" in roles else "instruct"


def pair_of(body: Body) -> str | None:
    text = prompt_text(body)
    for name, (query, target) in ALL_PAIRS.items():
        lines = (
            f"Query image caption: {caption(query)}\nTarget image caption: {caption(target)}",
            f"Query caption: {caption(query)}\nTarget caption: {caption(target)}",
        )
        if any(line in text for line in lines):
            return name
    return None


P = {
    name: pair_id(*ids)
    for name, ids in {
        "rate_limited_once": (0, 1),
        "always_500": (0, 1_000_001),
        "instruct_timeout": (2, 3),
        "malformed": (3, 1_000_000),
        "never_parses": (1_000_000, 1_000_001),
        "repaired": (1_000_002, 0),
        "clean": (1_000_003, 1_000_002),
    }.items()
}


def fault_rule() -> Callable[[Body], str | None]:
    """One fault plan per pair (see P); 429 only on its first describe request."""
    limited: list[str] = []

    def rule(body: Body) -> str | None:
        pair, step = pair_of(body), step_of(body)
        if pair == P["rate_limited_once"] and step == "describe" and not limited:
            limited.append(pair)
            return "http_429"
        plan = {
            (P["always_500"], "describe"): "http_500",
            (P["instruct_timeout"], "instruct"): "timeout",
            (P["malformed"], "describe"): "malformed_json",
            (P["never_parses"], "instruct"): "unparseable",
            (P["never_parses"], "repair"): "unparseable",
            (P["repaired"], "instruct"): "unparseable",
        }
        return plan.get((pair, step))

    return rule


def test_faults_end_in_failures_with_reasons_and_a_rerun_completes_the_rest(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    run, config = fixture_run.run, openai_config(server.base_url)
    server.faults = Faults(rule=fault_rule(), retry_after=1, hang=3.0)
    first = annotate(run, config)
    limited = [r.time for r in server.requests if pair_of(r.body) == P["rate_limited_once"]]
    assert limited[1] - limited[0] >= 0.95  # the 429's Retry-After: 1 was honoured

    failed = {row["pair_id"]: row for row in failures(run).to_pylist()}
    reasons = {pair: (row["step"], row["reason"], row["transient"]) for pair, row in failed.items()}
    assert reasons == {
        P["always_500"]: ("describe", "server_error", True),
        P["instruct_timeout"]: ("instruct", "timeout", True),
        P["malformed"]: ("describe", "malformed_response", True),
        P["never_parses"]: ("repair", "unparseable", False),
    }
    assert failed[P["always_500"]]["attempts"] == 2  # max_retries 1
    assert "instructions" not in failed[P["never_parses"]]["raw_output"]  # the prose answer
    annotated = {row["pair_id"]: row for row in annotations(run).to_pylist()}
    assert set(annotated) == {P["rate_limited_once"], P["repaired"], P["clean"]}
    assert annotated[P["repaired"]]["repaired"] and not annotated[P["clean"]]["repaired"]
    counts = first.counts
    assert counts["pairs"] == counts["annotated"] + counts["failed"] == len(ALL_PAIRS)
    assert counts["failed_transient"] == 3 and counts["failed_server_error"] == 1

    server.faults = Faults()  # the server is healthy again; the same command resumes
    sent_before = len(server.requests)
    second = annotate(run, config)
    resent = [(pair_of(r.body), step_of(r.body)) for r in server.requests[sent_before:]]
    assert sorted(resent) == sorted(
        [
            (P["always_500"], "describe"),
            (P["always_500"], "instruct"),
            (P["instruct_timeout"], "instruct"),  # its description was cached
            (P["malformed"], "describe"),
            (P["malformed"], "instruct"),
        ]
    )
    assert second.counts["annotated"] == len(ALL_PAIRS) - 1
    assert {row["pair_id"] for row in failures(run).to_pylist()} == {P["never_parses"]}
    third = annotate(run, config)  # only a non-transient failure is left: nothing to redo
    assert third.computed == 0 and len(server.requests) == sent_before + len(resent)


def test_client_errors_fail_at_once_without_retry(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    server.faults = Faults(rule=lambda body: "http_400" if step_of(body) == "describe" else None)
    result = annotate(fixture_run.run, openai_config(server.base_url, max_retries=3))
    assert result.counts["failed_client_error"] == len(ALL_PAIRS)
    assert len(server.requests) == len(ALL_PAIRS)
    assert not any(failures(fixture_run.run)["transient"].to_pylist())


# kill -9 mid-part, then the same command ---------------------------------------------------
def cached_answers(run: RunDir) -> int:
    chunks = sorted(run.folder(ANNOTATION_CACHE_DIR).rglob("chunk-*.parquet"))
    return sum(read_table(path).num_rows for path in chunks)


def annotate_command(run: RunDir, config_path: Path) -> list[str]:
    cli = "from megapairs.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return [
        sys.executable,
        "-c",
        cli,
        "annotate",
        "--run",
        str(run.root),
        "--config",
        str(config_path),
        "--quiet",
    ]


def test_kill_9_mid_part_then_the_same_command_resends_only_what_is_missing(
    tmp_path: Path, server: ChatServer
) -> None:
    reference = build_run(tmp_path / "reference", annotate=False)
    killed = build_run(tmp_path / "killed", annotate=False)
    config = openai_config(server.base_url, concurrency=1)
    annotate(reference.run, config)
    reference_requests = len(server.requests)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    server.faults = Faults(latency=0.15)
    sent_before = len(server.requests)
    command = annotate_command(killed.run, config_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while cached_answers(killed.run) < 4 and process.poll() is None:
        assert time.monotonic() < deadline, "no answer was cached within a minute"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.run.is_done("annotate", "part-00001"), "the run finished before the kill"
    kept = cached_answers(killed.run)
    sent_by_killed = len(server.requests) - sent_before

    server.faults = Faults()
    sent_before = len(server.requests)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    resent = len(server.requests) - sent_before
    assert resent == reference_requests - kept  # cached answers were not sent again
    assert sent_by_killed >= kept
    for folder in (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR):
        for part in killed.parts:
            got = read_table(killed.run.part_path(folder, part))
            assert got.equals(read_table(reference.run.part_path(folder, part)))


def test_an_unreachable_server_or_unserved_model_stops_before_any_pair(
    fixture_run: FixtureRun,
) -> None:
    with ChatServer() as closed:
        url = closed.base_url
    with pytest.raises(RuntimeError, match=r"annotate\.describer: cannot reach"):
        annotate(fixture_run.run, openai_config(url))
    with ChatServer(models=("fake-vlm", "another-llm")) as server:
        with pytest.raises(RuntimeError, match=r"'fake-llm' is not served .* another-llm"):
            annotate(fixture_run.run, openai_config(server.base_url))
        assert server.requests == []
    assert not fixture_run.run.done_parts("annotate")


# hf backend: tiny random local models through the same stage --------------------------------
def test_hf_backend_runs_tiny_local_models_through_the_stage(
    fixture_run: FixtureRun, tiny_llava: Any, tiny_llm: Any
) -> None:
    settings = {"max_tokens": 12, "temperature": 0.0, "batch_size": 4, "device": "cpu"}
    config = PipelineConfig.model_validate(
        {
            "seed": SEED,
            "annotate": {
                "backend": "hf",
                "describer": {"model": str(tiny_llava.path), **settings},
                "instructor": {"model": str(tiny_llm.path), **settings},
            },
        }
    )
    result = annotate(fixture_run.run, config)
    counts = result.counts
    assert counts["pairs"] == counts["annotated"] + counts["failed"] == len(ALL_PAIRS)
    assert counts["answers"] >= len(ALL_PAIRS)  # every pair reached the describer
    random_model_reasons = {"too_short_description", "empty_description", "unparseable"}
    for row in failures(fixture_run.run).to_pylist():
        assert row["reason"] in random_model_reasons | {"too_few_instructions"}
        assert row["backend"] == "hf" and row["describer_model"] == str(tiny_llava.path)
        assert row["raw_output"] or row["reason"] == "empty_description"
        assert not row["transient"]
    again = annotate(fixture_run.run, config)  # nothing transient: nothing is redone
    assert again.computed == 0


# what a re-run sends: only transient failures, and never an answer of another config ----------
def drop_stage_outputs(run: RunDir, stage: str, folders: tuple[str, ...]) -> None:
    """Delete a stage's markers and output tables (its answer cache stays)."""
    for path in (run.root / "_progress" / stage).glob("*.json"):
        path.unlink()
    for folder in folders:
        for path in run.folder(folder).glob("part-*"):
            path.unlink()


def test_a_rerun_retries_transient_failures_only(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    run, config = fixture_run.run, openai_config(server.base_url)
    plan = {(P["always_500"], "describe"): "http_500", (P["clean"], "describe"): "http_400"}
    server.faults = Faults(rule=lambda body: plan.get((pair_of(body), step_of(body))))
    annotate(run, config)
    assert {r["pair_id"]: r["reason"] for r in failures(run).to_pylist()} == {
        P["always_500"]: "server_error",
        P["clean"]: "client_error",
    }
    server.faults = Faults()
    sent_before = len(server.requests)
    annotate(run, config)
    resent = {pair_of(r.body) for r in server.requests[sent_before:]}
    assert resent == {P["always_500"]}  # the 400 is final: kept, not sent again
    assert {r["pair_id"]: r["reason"] for r in failures(run).to_pylist()} == {
        P["clean"]: "client_error"
    }


def test_cached_answers_are_reused_only_under_the_same_settings(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    run = fixture_run.run
    annotate(run, openai_config(server.base_url))
    answers = len(server.requests)
    folders = (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR)
    drop_stage_outputs(run, "annotate", folders)
    annotate(run, openai_config(server.base_url))  # same settings: all from the cache
    assert len(server.requests) == answers
    drop_stage_outputs(run, "annotate", folders)
    annotate(run, openai_config(server.base_url, word_range=(20, 30)))
    assert len(server.requests) == 2 * answers  # another word budget: asked again


def test_an_unexpected_error_is_a_failure_row_and_a_rerun_retries_it(
    fixture_run: FixtureRun, server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import megapairs.annotation.flow as flow

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug in the checks")

    run, config = fixture_run.run, openai_config(server.base_url)
    monkeypatch.setattr(flow, "check_instructions", broken)
    first = annotate(run, config)
    assert first.counts["failed_internal_error"] == len(ALL_PAIRS)
    assert all(row["transient"] for row in failures(run).to_pylist())
    monkeypatch.undo()
    sent_before = len(server.requests)
    second = annotate(run, config)
    assert second.counts["annotated"] == len(ALL_PAIRS)
    assert len(server.requests) == sent_before  # the answers were cached before the bug hit


def test_export_follows_a_part_annotated_again_with_another_backend(
    fixture_run: FixtureRun, server: ChatServer
) -> None:
    from megapairs.dataset.export import ExportStage

    def export(config: PipelineConfig) -> pa.Table:
        runner = LocalRunner(fixture_run.run, config, progress=False)
        runner.run_stage(ExportStage(config))
        return concat_tables(fixture_run.run.files("dataset", "export"), DATASET_SCHEMA)

    template = PipelineConfig.model_validate({"seed": SEED})
    annotate(fixture_run.run, template)
    assert set(export(template)["backend"].to_pylist()) == {"template"}
    drop_stage_outputs(fixture_run.run, "annotate", (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR))
    served = openai_config(server.base_url)
    annotate(fixture_run.run, served)
    assert set(export(served)["backend"].to_pylist()) == {"openai"}
