"""A small demo run for the explorer's tests, built once per session (`explore_demo_run`)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megapairs.demo.run import run_demo

EXPLORE_DEMO_IMAGES = 240


def build_explore_demo_run(root: Path) -> Path:
    """Run the offline demo on EXPLORE_DEMO_IMAGES generated scenes into `root`."""
    status = run_demo(root, EXPLORE_DEMO_IMAGES, seed=0, config_path=None, progress=False)
    if status != 0:
        raise RuntimeError(f"the demo failed its own checks (exit {status})")
    return root


ADDRESS = re.compile(r"explorer: (http://\S+)")


@contextmanager
def explorer(run: Path, *options: str) -> Iterator[tuple[str, list[str]]]:
    """A running `megapairs explore` and its printed address (and lines printed before)."""
    command = [sys.executable, "-m", "megapairs", "explore", "--run", str(run), "--port", "0"]
    server = subprocess.Popen(
        [*command, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        assert server.stdout is not None
        for line in server.stdout:
            seen.append(line)
            match = ADDRESS.search(line)
            if match:
                yield match.group(1), seen
                break
        else:
            raise AssertionError(f"no address printed: {''.join(seen)}")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
