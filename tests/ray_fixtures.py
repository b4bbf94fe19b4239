"""Ray test helpers: Ray kept on the loopback address, toy stages that record where each
attempt ran, and a two-node cluster on this machine.

Run as a script, this module is Ray's own CLI with the loopback patch applied:
`python tests/ray_fixtures.py start --head ...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs.pipeline.ray_runner import bind_to_loopback
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.runs import RunDir, part_index, part_name, write_table

LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 256 * 1024**2
HOLD_TIMEOUT_S = 60.0


def loopback_only() -> None:
    """Make Ray pick 127.0.0.1 as this node's address (it would take the address of the
    route to a public DNS server, and it maps an explicit 127.0.0.1 onto that too)."""
    bind_to_loopback()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def start_local_ray(num_cpus: int = 2) -> None:
    """Ray in this process with `num_cpus` CPUs, on loopback, shipping this module's stages
    by value (Ray's workers cannot import the tests folder)."""
    import ray

    loopback_only()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster that `ray start` left running here
            num_cpus=num_cpus,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
        )


# toy stages -----------------------------------------------------------------------


def append_line(path: Path, line: str) -> None:
    """Append one line (a single write with O_APPEND: safe across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(line + "\n")


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def where() -> dict[str, Any]:
    """This process: its pid, its Ray node (or `local`) and the forwarded probe variable."""
    node = "local"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"pid": os.getpid(), "node": node, "probe": os.environ.get("MEGAPAIRS_RAY_PROBE")}


@dataclass
class SquaresStage(StageBase):
    """Part i writes squares/part-i.parquet with ids 10i..10i+9 and their squares. Each
    setup and each attempt at a part is logged under `trace`; with `hold`, a part waits for
    the file `trace/go`; `fail_on` names a part whose data is "bad" (a ValueError); every
    part takes at least `delay` seconds."""

    trace: str
    n_parts: int = 6
    hold: bool = False
    fail_on: str | None = None
    delay: float = 0.0
    name: str = "squares"
    config_sections: tuple[str, ...] = ("mine",)

    def plan(self, run: RunDir) -> list[str]:
        return [part_name(i) for i in range(self.n_parts)]

    def setup(self, run: RunDir) -> dict[str, Any]:
        append_line(Path(self.trace) / "setups", json.dumps(where()))
        return {"offset": 0}

    def run_part(
        self, run: RunDir, part: str, state: Any, progress: PartProgress
    ) -> dict[str, Any]:
        append_line(Path(self.trace) / "attempts" / part, json.dumps(where()))
        if self.hold:
            wait_for(Path(self.trace) / "go", HOLD_TIMEOUT_S)
        time.sleep(self.delay)
        if part == self.fail_on:
            raise ValueError(f"bad data in {part}")
        ids = np.arange(10, dtype=np.int64) + part_index(part) * 10 + state["offset"]
        write_table(run.part_path("squares", part), pa.table({"id": ids, "square": ids**2}))
        progress(1, 1)
        return {"rows": len(ids)}

    def attempts(self) -> dict[str, list[dict[str, Any]]]:
        """Part -> where each attempt at it ran."""
        folder = Path(self.trace) / "attempts"
        return {p.name: read_lines(p) for p in sorted(folder.glob("part-*"))}

    def setups(self) -> list[dict[str, Any]]:
        return read_lines(Path(self.trace) / "setups")


@dataclass
class ModelSquaresStage(SquaresStage):
    """The same stage as a model stage: its parts run on actors."""

    name: str = "model_squares"

    def needs_actor(self) -> bool:
        return True

    def wants_gpu(self) -> bool:
        return True


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def run_contents(run: RunDir, folders: tuple[str, ...]) -> dict[str, Any]:
    """Every file under `folders` of a run by relative path: Parquet as rows, JSON parsed."""
    contents: dict[str, Any] = {}
    for folder in folders:
        root = Path(str(run.root))  # local runs only
        for path in sorted((root / folder).rglob("*")):
            name = str(path.relative_to(root))
            if path.is_dir():
                continue
            if path.suffix == ".parquet":
                contents[name] = pq.read_table(path).to_pylist()
            elif path.suffix == ".json":
                contents[name] = json.loads(path.read_text())
            else:
                contents[name] = path.read_bytes()
    return contents


# a two-node cluster on this machine -----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


class TwoNodeCluster:
    """A head and a worker node, one CPU each, started with Ray's CLI in `--block` mode:
    their daemons share the fate of the two processes started here, so stopping those
    two stops the cluster (nothing machine-wide like `ray stop`). Its own temp folder
    (short: Unix socket paths are limited) keeps it from becoming the machine's "current
    cluster" that a plain `ray.init()` of anyone else here would join."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="mp-ray-")
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        self._ray_start("head", "--head", f"--port={self.port}", "--include-dashboard=false")
        while not port_open(self.port):
            self._check(deadline)
        self._ray_start("worker", f"--address={self.address}", '--resources={"node2": 1}')
        self._wait_for_nodes(2, deadline)

    def _ray_start(self, name: str, *args: str) -> None:
        command = [sys.executable, __file__, "start", *args, f"--node-ip-address={LOOPBACK}"]
        command += ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        command.append("--block")
        log = (self.logs / f"{name}.log").open("wb")
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cluster_env())
        )

    def _check(self, deadline: float) -> None:
        dead = [p.args for p in self.processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log")))
            raise RuntimeError(f"the test cluster did not start ({dead}):\n{logs}")
        time.sleep(0.2)

    def _wait_for_nodes(self, count: int, deadline: float) -> None:
        import ray

        ray.init(address=self.address, log_to_driver=False)
        try:
            while sum(node["Alive"] for node in ray.nodes()) < count:
                self._check(deadline)
        finally:
            ray.shutdown()

    def stop(self) -> None:
        """Interrupt the two processes started here, worker node first (each stops the
        daemons it started), then kill whatever of their process trees is left."""
        tree = self._descendants()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for leftover in tree:
            with contextlib.suppress(Exception):
                leftover.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _descendants(self) -> list[Any]:
        """The processes the cluster's two processes started (psutil handles)."""
        try:
            import psutil  # type: ignore[import-untyped]
        except ImportError:
            return []
        tree = []
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree += psutil.Process(process.pid).children(recursive=True)
        return tree


def cluster_env() -> dict[str, str]:
    """The cluster's environment: this one without the probe that the runner forwards."""
    env = {k: v for k, v in os.environ.items() if k != "MEGAPAIRS_RAY_PROBE"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def use_token_auth() -> None:
    """Token authentication for this process and the clusters it starts, as a local
    `ray.init` sets it up (which leaves a process in that mode): RAY_AUTH_MODE=token, Ray's
    config reloaded to see it, and Ray's own token file, made by `ray get-auth-token
    --generate` if there is none yet (the token is not read here)."""
    from ray._raylet import Config  # type: ignore[attr-defined]

    command = [sys.executable, __file__, "get-auth-token", "--generate"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


if __name__ == "__main__":
    loopback_only()
    from ray.scripts.scripts import main

    sys.exit(main())
