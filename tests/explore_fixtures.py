"""A small demo run for the explorer's tests, built once per session (`explore_demo_run`)."""

from __future__ import annotations

from pathlib import Path

from megapairs.demo.run import run_demo

EXPLORE_DEMO_IMAGES = 240


def build_explore_demo_run(root: Path) -> Path:
    """Run the offline demo on EXPLORE_DEMO_IMAGES generated scenes into `root`."""
    status = run_demo(root, EXPLORE_DEMO_IMAGES, seed=0, config_path=None, progress=False)
    if status != 0:
        raise RuntimeError(f"the demo failed its own checks (exit {status})")
    return root
