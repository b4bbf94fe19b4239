"""Annotation when a setting is wrong: a refused key, a wrong model, a describer that cannot
see, answers cut short or degenerate, copied or ungrounded instructions, per-role backends,
and the API key kept out of every file and every line printed. All against the loopback
chat server (tests/chat_server.py) through the `megapairs annotate` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_server import Body, ChatServer, default_answer, is_describer_request, prompt_text
from proxy_fixtures import ForwardProxy
from run_fixtures import PAIRS, FixtureRun, build_run

from megapairs.annotation.backends.probe import QUESTION as PROBE_QUESTION
from megapairs.annotation.prompts import load_prompts
from megapairs.cli import main
from megapairs.runs import RunDir, concat_tables, read_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
)

KEY_ENV = "MEGAPAIRS_TEST_HARDENING_KEY"
SECRET = "sk-hardening-5ecret-value"
PAIR_COUNT = sum(len(rows) for rows in PAIRS.values())


@pytest.fixture
def fixture_run(tmp_path: Path) -> FixtureRun:
    return build_run(tmp_path / "run", annotate=False)


@pytest.fixture(autouse=True)
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def write_config(folder: Path, base_url: str, **annotate: Any) -> Path:
    """A config file for the openai backend at `base_url` (both roles)."""
    endpoint = {"base_url": base_url, "timeout": 2.0, "temperature": 0.0, "api_key_env": KEY_ENV}
    describer = {"model": "fake-vlm", **endpoint, **annotate.pop("describer", {})}
    instructor = {"model": "fake-llm", **endpoint, **annotate.pop("instructor", {})}
    settings = {
        "backend": "openai",
        "concurrency": 4,
        "max_retries": 1,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "flush_every": 1,
        "describer": describer,
        "instructor": instructor,
        **annotate,
    }
    path = folder / f"config-{len(list(folder.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"seed": 7, "annotate": settings}))
    return path


def annotate_cli(run: RunDir, config: Path) -> int:
    return main(["annotate", "--run", str(run.root), "--config", str(config), "--quiet"])


def annotations(run: RunDir) -> list[dict[str, Any]]:
    return concat_tables(run.files(ANNOTATIONS_DIR, "annotate"), ANNOTATIONS_SCHEMA).to_pylist()


def failures(run: RunDir) -> list[dict[str, Any]]:
    table = concat_tables(
        run.files(ANNOTATION_FAILURES_DIR, "annotate"), ANNOTATION_FAILURES_SCHEMA
    )
    return table.to_pylist()


def cached(run: RunDir) -> list[dict[str, Any]]:
    """The answers and final failures in the run's annotation cache."""
    chunks = sorted((run.root / "annotation_cache").rglob("chunk-*.parquet"))
    return [row for chunk in chunks for row in read_table(chunk).to_pylist()]


def cached_entries(run: RunDir) -> int:
    return len(cached(run))


def is_probe(body: Body) -> bool:
    """Whether `body` is the describer's capability probe (or its text-only twin)."""
    return PROBE_QUESTION in prompt_text(body)


def pair_requests(server: ChatServer) -> list[Body]:
    """The requests about pairs (not the describer's capability probe)."""
    return [body for body in server.bodies if not is_probe(body)]


# a wrong key, a wrong model: stop, cache nothing, resume once fixed --------------------------
def test_a_refused_key_at_models_stops_the_run_and_the_fixed_key_resumes_it(
    fixture_run: FixtureRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = fixture_run.run
    with ChatServer(api_key=SECRET) as server:
        config = write_config(tmp_path, server.base_url)
        monkeypatch.setenv(KEY_ENV, "sk-wrong-key-1234")
        assert annotate_cli(run, config) == 2
        err = capsys.readouterr().err
        assert "HTTP 401" in err and KEY_ENV in err and "sk-wrong-key-1234" not in err
        assert not server.bodies and cached_entries(run) == 0
        assert not run.done_parts("annotate")

        monkeypatch.setenv(KEY_ENV, SECRET)
        assert annotate_cli(run, config) == 0
    assert len(annotations(run)) == PAIR_COUNT and not failures(run)


def test_a_refused_key_at_chat_stops_at_the_first_pair_and_nothing_is_cached(
    fixture_run: FixtureRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = fixture_run.run
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ChatServer() as server:
        server.faults.rule = lambda body: None if is_probe(body) else "http_401"
        config = write_config(tmp_path, server.base_url, concurrency=1)
        assert annotate_cli(run, config) == 2
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "not cached" in err and SECRET not in err
        assert len(pair_requests(server)) == 1  # the first request of the first pair
        assert cached_entries(run) == 0 and not run.done_parts("annotate")

        server.faults.rule = None  # the key is accepted again
        assert annotate_cli(run, config) == 0
    assert len(annotations(run)) == PAIR_COUNT and not failures(run)


def test_a_wrong_model_on_a_server_without_a_model_list_stops_and_the_fix_resumes(
    fixture_run: FixtureRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fixture_run.run
    with ChatServer(models=("fake-vlm", "fake-llm"), list_models=False) as server:
        wrong = write_config(tmp_path, server.base_url, instructor={"model": "fake-lm"})
        assert annotate_cli(run, wrong) == 2
        err = capsys.readouterr().err
        assert "HTTP 404" in err and "annotate.instructor.model" in err
        kept = cached(run)  # the describer's good answers are kept, the refusal is not
        assert {(row["step"], row["error"]) for row in kept} == {("describe", None)}
        assert not run.done_parts("annotate")

        fixed = write_config(tmp_path, server.base_url)
        assert annotate_cli(run, fixed) == 0
        assert "changed" not in capsys.readouterr().err
    assert len(annotations(run)) == PAIR_COUNT


# the describer must see --------------------------------------------------------------------
def test_a_text_only_describer_fails_the_probe_before_any_pair(
    fixture_run: FixtureRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ChatServer(sees_images=False) as server:
        assert annotate_cli(fixture_run.run, write_config(tmp_path, server.base_url)) == 2
        assert not pair_requests(server)
    err = capsys.readouterr().err
    assert "cannot see images" in err and "annotate.describer.probe=false" in err


def test_the_probe_sends_the_endpoints_extra_body(fixture_run: FixtureRun, tmp_path: Path) -> None:
    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    with ChatServer() as server:
        config = write_config(tmp_path, server.base_url, describer={"extra_body": extra})
        assert annotate_cli(fixture_run.run, config) == 0
        probes = [body for body in server.bodies if is_probe(body)]
    assert len(probes) == 2  # with the images, then the text alone
    assert all(body["chat_template_kwargs"] == extra["chat_template_kwargs"] for body in probes)
    assert all(body["temperature"] == 0.0 for body in probes)


def test_a_describer_that_drops_the_images_of_pairs_fails_them_as_images_ignored(
    fixture_run: FixtureRun, tmp_path: Path
) -> None:
    def sees_only_the_probe(body: Body) -> bool:
        return is_probe(body)

    with ChatServer(sees_images=sees_only_the_probe, image_tokens=300) as server:
        assert annotate_cli(fixture_run.run, write_config(tmp_path, server.base_url)) == 0
    reasons = {row["reason"] for row in failures(fixture_run.run)}
    assert reasons == {"images_ignored"} and not annotations(fixture_run.run)


def test_cut_and_degenerate_descriptions_fail_with_their_own_reasons(
    fixture_run: FixtureRun, tmp_path: Path
) -> None:
    def answer(body: Body) -> str | tuple[str, str]:
        text = default_answer(body)
        if not is_describer_request(body) or is_probe(body):
            return text
        if "bicycle" in prompt_text(body):  # the pairs of records 0 and 1
            return text, "length"
        return " ".join(["class_name"] * 512)

    with ChatServer(answer=answer) as server:
        assert annotate_cli(fixture_run.run, write_config(tmp_path, server.base_url)) == 0
    reasons = [row["reason"] for row in failures(fixture_run.run)]
    assert set(reasons) == {"truncated_description", "degenerate_description"}
    assert len(reasons) == PAIR_COUNT


# instructions: copied demonstrations and ungrounded ones are dropped ------------------------
def test_copied_and_ungrounded_instructions_are_dropped_with_reasons(
    fixture_run: FixtureRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demonstration = load_prompts().demonstrations[0].instructions[0]
    unrelated = "find a medieval stone castle above a misty fjord"

    def answer(body: Body) -> str:
        text = default_answer(body)
        if is_describer_request(body):
            return text
        own = json.loads(text)["instructions"]
        return json.dumps({"instructions": [demonstration, unrelated, *own]})

    with ChatServer(answer=answer) as server:
        assert annotate_cli(fixture_run.run, write_config(tmp_path, server.base_url)) == 0
    rows = annotations(fixture_run.run)
    assert len(rows) == PAIR_COUNT
    for row in rows:
        assert f"copied_demonstration: {demonstration}" in row["dropped_instructions"]
        assert f"ungrounded: {unrelated}" in row["dropped_instructions"]
        assert demonstration not in row["instructions"] and unrelated not in row["instructions"]
    assert main(["export", "--run", str(fixture_run.run.root), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["stats", str(fixture_run.run.root)]) == 0
    out = capsys.readouterr().out
    assert "copied_demonstration" in out and "ungrounded" in out


# per-role backends ---------------------------------------------------------------------------
def test_an_openai_describer_with_a_template_instructor(
    fixture_run: FixtureRun, tmp_path: Path
) -> None:
    with ChatServer() as server:
        config = write_config(tmp_path, server.base_url, instructor={"backend": "template"})
        assert annotate_cli(fixture_run.run, config) == 0
        asked = pair_requests(server)
    assert asked and all(is_describer_request(body) for body in asked)
    rows = annotations(fixture_run.run)
    assert len(rows) + len(failures(fixture_run.run)) == PAIR_COUNT and rows
    for row in rows:
        assert row["backend"] == "openai+template"
        assert (row["describer_model"], row["instructor_model"]) == ("fake-vlm", "template")


# the key is never written or printed --------------------------------------------------------
def files_holding(root: Path, secret: str) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and secret.encode() in path.read_bytes()
    ]


def test_a_secret_the_server_echoes_is_in_no_file_and_no_output(
    fixture_run: FixtureRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = fixture_run.run
    monkeypatch.setenv(KEY_ENV, SECRET)

    def echoing(body: Body) -> str:  # answers that quote the key they were sent with
        text = default_answer(body)
        if is_describer_request(body) and not is_probe(body):
            return f"{text} The key was {SECRET}."
        return text

    with ChatServer(answer=echoing) as server:
        config = write_config(tmp_path, server.base_url)
        server.faults.rule = lambda body: None if is_probe(body) else "http_401"
        assert annotate_cli(run, config) == 2  # its error body echoes the key
        server.faults.rule = None
        assert annotate_cli(run, config) == 0
    with ChatServer(models=(f"model-{SECRET}",)) as listing:  # the key in a model list
        other = build_run(tmp_path / "other", annotate=False).run
        assert annotate_cli(other, write_config(tmp_path, listing.base_url)) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert captured.err.count("<redacted>") >= 2  # the error body and the model list
    assert all("<redacted>" in row["description"] for row in annotations(run))
    assert len(annotations(run)) == PAIR_COUNT
    assert not files_holding(run.root, SECRET)


def test_a_key_in_the_url_is_not_written_to_the_manifest(
    fixture_run: FixtureRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fixture_run.run
    with ChatServer() as server:
        url = server.base_url.replace("http://", f"http://user:{SECRET}@")
        assert annotate_cli(run, write_config(tmp_path, url)) == 0
    captured = capsys.readouterr()
    assert SECRET not in (run.root / "manifest.json").read_text()
    assert SECRET not in captured.out + captured.err
    assert not files_holding(run.root, SECRET)


def test_plain_http_with_a_key_to_another_host_needs_allow_insecure(
    fixture_run: FixtureRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = fixture_run.run
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ChatServer() as server:
        port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
        with ForwardProxy("127.0.0.1", port) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "")
            remote = "http://annotation-host.example:8000/v1"
            assert annotate_cli(run, write_config(tmp_path, remote)) == 2
            err = capsys.readouterr().err
            assert "refusing to send the API key in clear text" in err
            assert f"through the proxy {proxy.url}" in err and not proxy.hosts

            allowed = {"allow_insecure": True}
            config = write_config(tmp_path, remote, describer=allowed, instructor=allowed)
            assert annotate_cli(run, config) == 0
            err = capsys.readouterr().err
            assert err.count("sending the API key in clear text") == 1  # warned once
            assert f"via proxy {proxy.url}" in err  # the start-up line names the proxy
            assert set(proxy.hosts) == {"annotation-host.example:8000"}
    assert len(annotations(run)) == PAIR_COUNT


def test_a_part_whose_every_pair_got_a_client_error_makes_the_command_fail(
    fixture_run: FixtureRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ChatServer() as server:
        server.faults.rule = lambda body: None if is_probe(body) else "http_400"
        assert annotate_cli(fixture_run.run, write_config(tmp_path, server.base_url)) == 1
    captured = capsys.readouterr()
    assert "all 4 pairs failed with client_error" in captured.err
    assert {row["reason"] for row in failures(fixture_run.run)} == {"client_error"}


def test_a_truncated_cache_chunk_is_set_aside_and_the_run_equals_an_uninterrupted_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = build_run(tmp_path / "clean", annotate=False).run
    broken = build_run(tmp_path / "broken", annotate=False).run
    with ChatServer() as server:
        config = write_config(tmp_path, server.base_url)
        assert annotate_cli(clean, config) == 0
        assert annotate_cli(broken, config) == 0
        part = "part-00000"  # as a kill mid-part leaves it: no marker, no outputs ...
        (broken.root / "_progress" / "annotate" / f"{part}.json").unlink()
        for folder in (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR):
            broken.part_path(folder, part).unlink()
        chunks = sorted((broken.root / "annotation_cache" / part).glob("chunk-*.parquet"))
        data = chunks[-1].read_bytes()  # ... and the tail of its cache cut short
        chunks[-1].write_bytes(data[: len(data) // 2])
        capsys.readouterr()
        asked = len(pair_requests(server))
        assert annotate_cli(broken, config) == 0
        assert len(pair_requests(server)) == asked + 1  # only the lost answer is asked again
    out = capsys.readouterr()
    assert "quarantined_cache_chunks 1" in out.out and "does not open" in out.err
    assert (broken.root / "quarantine" / "annotation_cache" / part / chunks[-1].name).exists()
    for folder, schema in (
        (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA),
        (ANNOTATION_FAILURES_DIR, ANNOTATION_FAILURES_SCHEMA),
    ):
        ours = concat_tables(broken.files(folder, "annotate"), schema)
        theirs = concat_tables(clean.files(folder, "annotate"), schema)
        assert ours.equals(theirs)
