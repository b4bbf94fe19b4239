"""Where the explorer keeps its caches (thumbnails, the pair index): `<run>/explore/` for a
local run, a per-run folder in the temp folder for a run on object storage."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from megapairs.runs import RunDir, local_path

CACHE_FOLDER = "explore"


def cache_root(run: RunDir) -> Path:
    """The explorer's cache folder for `run` (created on first write)."""
    root = local_path(run.root)
    if root is not None:
        return root / CACHE_FOLDER
    digest = hashlib.sha256(run.uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "megapairs-explore" / digest
