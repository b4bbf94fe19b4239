"""An S3 endpoint for tests: moto's server on loopback, a fresh bucket per use, and helpers
to put local files there and read a remote run back.

`s3_env` sets the standard AWS environment (endpoint, keys, region) for a test module, so
code under test, and any subprocess it starts, reaches the moto server the way it would
reach real S3; nothing leaves the machine. `s3_url` gives each test its own bucket.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from megapairs.runs import as_path

_buckets = itertools.count()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 (a free port), running for the session."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env(moto_endpoint: str) -> Iterator[str]:
    """The AWS environment pointing at the moto server, for one test module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            patch.delenv(name, raising=False)
        yield moto_endpoint


def new_bucket(name: str = "run") -> str:
    """`s3://<a new bucket>/<name>` (the AWS environment must point at moto)."""
    bucket = f"megapairs-test-{next(_buckets)}"
    as_path(f"s3://{bucket}").fs.mkdir(bucket)
    return f"s3://{bucket}/{name}"


@pytest.fixture
def s3_url(s3_env: str) -> str:
    """`s3://<new bucket>/run`, empty."""
    return new_bucket()


def upload(local: Path, url: str) -> str:
    """Copy a local file, or a folder's files, to `url`; returns `url`."""
    target = as_path(url)
    if local.is_dir():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target.fs.put_file(str(file), f"{target.path}/{file.relative_to(local).as_posix()}")
    else:
        target.fs.put_file(str(local), target.path)
    return url


def remote_files(url: str) -> dict[str, str]:
    """Every object under `url`, as relative path -> file system path."""
    root = as_path(url)
    prefix = root.path.rstrip("/") + "/"
    return {name[len(prefix) :]: name for name in sorted(root.fs.find(root.path))}


def file_contents(name: str, data: bytes) -> object:
    """A run file's content for comparisons: a table's rows, an array's values, or bytes."""
    if name.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data)).tolist()
    return data


def local_run_contents(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, object]:
    """Every file of a local run by relative path (files named in `skip` left out)."""
    return {
        path.relative_to(root).as_posix(): file_contents(path.name, path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in skip
    }


def remote_run_contents(url: str, skip: frozenset[str] = frozenset()) -> dict[str, object]:
    """Every file of a remote run by relative path (files named in `skip` left out)."""
    fs = as_path(url).fs
    return {
        relative: file_contents(relative, fs.cat_file(name))
        for relative, name in remote_files(url).items()
        if relative.rpartition("/")[2] not in skip
    }
