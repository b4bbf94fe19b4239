"""Running the CLI in a child process and killing it (SIGKILL) at a chosen point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any


def start_cli(arguments: list[str]) -> subprocess.Popen[bytes]:
    """`python -m megapairs.cli ARGUMENTS` in a child process (stderr kept for errors)."""
    command = [sys.executable, "-m", "megapairs.cli", *arguments]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_9_once_it_exists(
    process: subprocess.Popen[bytes], marker: Any, timeout: float = 240.0, poll: float = 0.05
) -> None:
    """Wait until `marker` (a path) exists, then SIGKILL `process`; fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    assert process.poll() is None, f"finished before the kill: {process.stderr.read()!r}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
