"""One writer per run directory: the lock file, its re-entry within a process, refusal of a
second writer (in-process and as two real `megapairs annotate` processes), take-over of a
stale lock (a dead holder, a reused pid) and the best-effort lock on object storage."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_server import ChatServer, Faults
from process_fixtures import kill_9_once_it_exists, start_cli
from run_fixtures import build_run

from megapairs.config import PipelineConfig
from megapairs.pipeline.lock import (
    LOCK_FILE,
    RunLocked,
    acquire_run_lock,
    holds_run_lock,
    process_start,
    read_owner,
    release_run_lock,
    run_lock,
)
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir

HOLD = """
import sys, time
from megapairs.pipeline.lock import acquire_run_lock
from megapairs.runs import RunDir
acquire_run_lock(RunDir(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    (tmp_path / "run").mkdir()
    return RunDir(tmp_path / "run")


@pytest.fixture
def holder(run: RunDir):
    """Another process that holds `run`'s lock until the test ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def write_lock(run: RunDir, **fields: Any) -> None:
    record = {
        "pid": 1,
        "host": socket.gethostname(),
        "started_at": "2024-01-01T00:00:00+00:00",
        "command": "megapairs annotate --run old",
        "process_start": None,
        "token": "theirs",
        **fields,
    }
    (run.root / LOCK_FILE).write_text(json.dumps(record))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# in one process ---------------------------------------------------------------------------
def test_the_lock_records_its_holder_and_is_reentrant(run: RunDir) -> None:
    acquire_run_lock(run)
    owner = read_owner(run)
    assert owner is not None and owner.pid == os.getpid()
    assert owner.host == socket.gethostname() and owner.started_at
    if sys.platform == "linux":
        assert owner.process_start == process_start(os.getpid())
    with run_lock(run):  # the same process again: no deadlock
        assert holds_run_lock(run)
    assert (run.root / LOCK_FILE).exists()
    release_run_lock(run)
    assert not (run.root / LOCK_FILE).exists() and not holds_run_lock(run)


def test_a_runner_holds_the_lock_from_start_to_close_and_runs_again(run: RunDir) -> None:
    runner = LocalRunner(run, PipelineConfig(), progress=False)
    runner.start()
    runner.start()  # twice: still one acquisition of this runner
    other = LocalRunner(run, PipelineConfig(), progress=False)
    assert other.run_all([]) == []  # another runner of this process: re-entrant
    assert (run.root / LOCK_FILE).exists()
    runner.close()
    assert not (run.root / LOCK_FILE).exists()
    for _ in range(2):  # run_all repeatedly
        LocalRunner(run, PipelineConfig(), progress=False).run_all([])
    assert not (run.root / LOCK_FILE).exists()


# another holder ---------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_leaves_the_holders_temp_files(
    run: RunDir, holder: subprocess.Popen
) -> None:
    temp = run.root / "pairs" / ".part-00000.parquet.abc.tmp"  # the holder's file in progress
    temp.parent.mkdir()
    temp.write_bytes(b"being written")
    with pytest.raises(RunLocked) as refused:
        LocalRunner(run, PipelineConfig(), progress=False).run_all([])
    message = str(refused.value)
    assert message.startswith(f"{run.uri} is in use by pid {holder.pid} on host ")
    assert " -c ... " in message and "wait for it or stop it" in message
    assert message.endswith(f"if it is dead on another host, delete {run.root / LOCK_FILE}")
    assert temp.exists()
    assert read_owner(run).pid == holder.pid  # untouched


def test_a_lock_of_a_dead_process_is_taken_over_with_a_warning(run: RunDir, caplog) -> None:
    pid = dead_pid()
    write_lock(run, pid=pid)
    with caplog.at_level(logging.WARNING, "megapairs"), run_lock(run):
        assert read_owner(run).pid == os.getpid()
    assert f"taking over the stale lock of pid {pid} on host" in caplog.text
    assert "that process is gone" in caplog.text
    assert not (run.root / LOCK_FILE).exists()


@pytest.mark.skipif(sys.platform != "linux", reason="process start times come from /proc")
def test_a_reused_pid_is_not_taken_for_the_holder(
    run: RunDir, holder: subprocess.Popen, caplog
) -> None:
    started = process_start(holder.pid)
    assert started is not None
    write_lock(run, pid=holder.pid, process_start=started - 1)  # an older process of that pid
    with caplog.at_level(logging.WARNING, "megapairs"), run_lock(run):
        pass
    assert f"pid {holder.pid} now belongs to another process" in caplog.text


def test_a_lock_from_another_host_is_never_taken_over(run: RunDir) -> None:
    write_lock(run, pid=dead_pid(), host="elsewhere")
    with pytest.raises(RunLocked, match=r"on host elsewhere .*megapairs annotate --run old"):
        acquire_run_lock(run)


def test_a_lock_file_being_written_is_not_taken_over(run: RunDir) -> None:
    (run.root / LOCK_FILE).write_text("")  # created, not yet written
    with pytest.raises(RunLocked, match="being locked"):
        acquire_run_lock(run)
    old = time.time() - 60
    os.utime(run.root / LOCK_FILE, (old, old))  # a writer killed in between, long ago
    with run_lock(run):
        assert read_owner(run).pid == os.getpid()


# object storage ---------------------------------------------------------------------------
def test_a_remote_run_takes_a_best_effort_lock(tmp_path: Path) -> None:
    run = RunDir(f"memory://locks/{tmp_path.name}")
    with run_lock(run):
        owner = read_owner(run)
        assert owner is not None and owner.pid == os.getpid()
    assert not (run.root / LOCK_FILE).exists()
    foreign = {"pid": 1, "host": "elsewhere", "started_at": "t", "command": "megapairs x"}
    (run.root / LOCK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(RunLocked, match="in use by pid 1 on host elsewhere since t"):
        acquire_run_lock(run)


# two real commands -------------------------------------------------------------------------
def annotate_command(tmp_path: Path, run: RunDir, base_url: str) -> list[str]:
    endpoint = {"base_url": base_url, "timeout": 5.0, "temperature": 0.0}
    annotate = {
        "backend": "openai",
        "concurrency": 1,
        "max_retries": 1,
        "flush_every": 1,
        "describer": {"model": "fake-vlm", **endpoint},
        "instructor": {"model": "fake-llm", **endpoint},
    }
    config = PipelineConfig.model_validate({"seed": 7, "annotate": annotate})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return ["annotate", "--run", str(run.root), "--config", str(path), "--quiet"]


def test_two_annotate_commands_at_once_one_runs_the_other_names_it(tmp_path: Path) -> None:
    fixture = build_run(tmp_path, annotate=False)
    with ChatServer(Faults(latency=0.4)) as server:  # the holder takes seconds
        command = annotate_command(tmp_path, fixture.run, server.base_url)
        processes = [start_cli(command), start_cli(command)]
        errors = {p.pid: p.communicate(timeout=180)[1].decode() for p in processes}
    codes = {p.pid: p.returncode for p in processes}
    assert sorted(codes.values()) == [0, 2], errors
    winner = next(pid for pid, code in codes.items() if code == 0)
    refused = errors[next(pid for pid, code in codes.items() if code != 0)]
    assert refused.startswith(
        f"megapairs annotate: error: {fixture.run.uri} is in use by pid {winner} on host "
    )
    assert "(megapairs annotate --run " in refused
    assert fixture.run.done_parts("annotate") == fixture.parts
    assert not (fixture.run.root / LOCK_FILE).exists()


def test_after_kill_9_of_the_holder_the_next_command_takes_over(tmp_path: Path) -> None:
    fixture = build_run(tmp_path, annotate=False)
    lock = fixture.run.root / LOCK_FILE
    with ChatServer(Faults(latency=0.4)) as server:
        command = annotate_command(tmp_path, fixture.run, server.base_url)
        holder = start_cli(command)
        kill_9_once_it_exists(holder, lock)
        assert read_owner(fixture.run).pid == holder.pid  # left behind
        server.faults = Faults()
        finished = subprocess.run(
            [sys.executable, "-m", "megapairs.cli", *command],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert finished.returncode == 0, finished.stderr
    assert (
        f"megapairs: warning: {lock}: taking over the stale lock of pid {holder.pid} on host "
        in finished.stderr
    )
    assert "that process is gone" in finished.stderr
    assert fixture.run.done_parts("annotate") == fixture.parts
    assert not lock.exists()
