"""One writer per run directory: `<run>/.megapairs.lock`.

Every command that writes a run (a runner's `start`, `megapairs reset`) takes the lock;
a second writer is refused with `RunLocked`, naming the holder. The lock file is JSON:
pid, host, start time, command line and, on Linux, the holder's process start time
(`/proc/<pid>/stat` field 22), so a pid reused by another process is not taken for the
holder. A lock whose holder is gone (same host, pid dead or reused) is taken over with a
warning; a lock from another host is never judged from here.

A local lock is created with O_CREAT|O_EXCL (atomic), and stale locks are taken over
under an flock on the run folder, so two processes cannot both take one over. On object
storage there is no atomic create-if-absent: the lock is best effort (check that it is
absent, write it, read it back and compare the owner), which catches all but writers
that start within the same moment.

Within one process the lock is re-entrant: each `acquire_run_lock` counts, and the file
goes at the matching last `release_run_lock` (or at exit). Ray workers never take it:
only the driver's runner does.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megapairs.runs import AnyPath, RunDir, local_path, now_iso, read_bytes, write_json

log = logging.getLogger(__name__)

LOCK_FILE = ".megapairs.lock"
# seconds an unreadable local lock may be in the middle of being written
WRITE_GRACE_S = 5.0
MEGAPAIRS_PROGRAMS = frozenset({"megapairs", "cli.py", "__main__.py"})


class RunLocked(RuntimeError):
    """Another process writes into this run directory."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run's lock."""

    pid: int
    host: str
    started_at: str
    command: str
    process_start: int | None  # Linux: clock ticks after boot at which the process started
    token: str  # unique per acquisition

    @classmethod
    def of_this_process(cls) -> LockOwner:
        pid, token = os.getpid(), uuid.uuid4().hex
        host = socket.gethostname()
        return cls(pid, host, now_iso(), command_line(), process_start(pid), token)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LockOwner:
        start = data.get("process_start")
        return cls(
            int(data["pid"]),
            str(data.get("host", "?")),
            str(data.get("started_at", "?")),
            str(data.get("command", "?")),
            None if start is None else int(start),
            str(data.get("token", "")),
        )

    def describe(self) -> str:
        """`pid 1234 on host h since <time> (megapairs annotate ...)`."""
        return f"pid {self.pid} on host {self.host} since {self.started_at} ({self.command})"

    def gone_because(self) -> str | None:
        """Why this holder is certainly gone (its host is this one); None if it may live."""
        if self.host != socket.gethostname():
            return None
        if not pid_alive(self.pid):
            return "that process is gone"
        started = process_start(self.pid)
        if self.process_start is not None and started is not None and started != self.process_start:
            return f"pid {self.pid} now belongs to another process"
        return None


@dataclass
class _Held:
    """A lock this process holds, and how many acquisitions it still owes releases for."""

    run: RunDir
    owner: LockOwner
    count: int


_HELD: dict[str, _Held] = {}


# the holder's process -------------------------------------------------------------------


def command_line() -> str:
    """This process's command line (`megapairs annotate ...` when run as the CLI)."""
    argv = sys.argv or [""]
    if Path(argv[0]).name in MEGAPAIRS_PROGRAMS:
        return shlex.join(["megapairs", *argv[1:]])
    python = Path(sys.executable).name or "python"
    if argv[0] == "-c":  # (the script itself is not kept)
        return shlex.join([python, "-c", "...", *argv[1:]])
    return shlex.join([python, *argv])


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # the name, in parentheses, may hold spaces


def process_start(pid: int) -> int | None:
    """When `pid` started (field 22 of /proc/<pid>/stat); None off Linux or if gone."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # fields[0] is field 3


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")


# the lock file --------------------------------------------------------------------------


def lock_path(run: RunDir) -> AnyPath:
    return run.root / LOCK_FILE


def read_owner(run: RunDir) -> LockOwner | None:
    """The holder recorded in the lock file; None when there is no lock file. Raises
    ValueError for a file that is not a lock (e.g. one being written)."""
    path = lock_path(run)
    try:
        data = json.loads(read_bytes(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a lock file: {err}") from err
    if not isinstance(data, dict) or "pid" not in data:
        raise ValueError(f"{path} is not a lock file")
    return LockOwner.from_json(data)


def _refusal(run: RunDir, holder: LockOwner) -> RunLocked:
    return RunLocked(
        f"{run.uri} is in use by {holder.describe()}; wait for it or stop it; "
        f"if it is dead on another host, delete {lock_path(run)}"
    )


def _warn_takeover(run: RunDir, holder: LockOwner | None, reason: str) -> None:
    who = holder.describe() if holder else "an unknown holder"
    log.warning("%s: taking over the stale lock of %s: %s", lock_path(run), who, reason)


@contextmanager
def _takeover_guard(run: RunDir) -> Iterator[None]:
    """An flock on the local run folder while the lock is judged and taken (released by the
    system if this process dies); nothing where flock is not available."""
    root = local_path(run.root)
    try:
        import fcntl

        fd = os.open(root, os.O_RDONLY) if root is not None else None
    except (ImportError, OSError):
        fd = None
    if fd is None:
        yield
        return
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the flock)


def _create_local(path: Path, owner: LockOwner) -> bool:
    """Create the lock file if absent (O_CREAT|O_EXCL); False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(owner), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_local(run: RunDir, path: Path, owner: LockOwner) -> None:
    """Take a local run's lock, or a stale one over; RunLocked if it is held."""
    with _takeover_guard(run):
        if _create_local(path, owner):
            return
        holder, reason = _judge_local(run, path)
        if reason is None:
            raise _refusal(run, holder) if holder else RunLocked(f"{run.uri} is locked")
        if reason:
            _warn_takeover(run, holder, reason)
        path.unlink(missing_ok=True)
        if not _create_local(path, owner):
            raise RunLocked(f"{run.uri} was locked by another process just now")


def _judge_local(run: RunDir, path: Path) -> tuple[LockOwner | None, str | None]:
    """The holder of an existing lock file and why it may be taken over: None while it is
    held, "" when the file went meanwhile."""
    try:
        holder = read_owner(run)
    except ValueError:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None, ""
        if age < WRITE_GRACE_S:
            raise RunLocked(f"{run.uri} is being locked by another process just now") from None
        return None, f"{path} holds no lock record"
    if holder is None:
        return None, ""
    return holder, holder.gone_because()


def _take_remote(run: RunDir, owner: LockOwner) -> None:
    """Best effort on object storage: write the lock if absent (or stale), read it back and
    check that it is ours (a writer starting at the same moment may still slip through)."""
    holder = read_owner(run)
    if holder is not None:
        reason = holder.gone_because()
        if reason is None:
            raise _refusal(run, holder)
        _warn_takeover(run, holder, reason)
    write_json(lock_path(run), asdict(owner))
    written = read_owner(run)
    if written is None or written.token != owner.token:
        raise _refusal(run, written) if written else RunLocked(f"{run.uri}: lost its lock")


# the API --------------------------------------------------------------------------------


def acquire_run_lock(run: RunDir) -> None:
    """Take `run`'s lock for this process (again, if it holds it already: re-entrant);
    RunLocked when another process holds it."""
    key = str(lock_path(run))
    held = _HELD.get(key)
    if held is not None and held.owner.pid == os.getpid():
        held.count += 1
        return
    owner = LockOwner.of_this_process()
    path = local_path(lock_path(run))
    if path is not None:
        _take_local(run, path, owner)
    else:
        _take_remote(run, owner)
    _HELD[key] = _Held(run, owner, 1)


def release_run_lock(run: RunDir) -> None:
    """Undo one `acquire_run_lock`; the last one deletes the lock file (if still ours)."""
    key = str(lock_path(run))
    held = _HELD.get(key)
    if held is None or held.owner.pid != os.getpid():
        return
    held.count -= 1
    if held.count <= 0:
        del _HELD[key]
        _delete_if_ours(held)


def holds_run_lock(run: RunDir) -> bool:
    """Whether this process holds `run`'s lock."""
    held = _HELD.get(str(lock_path(run)))
    return held is not None and held.owner.pid == os.getpid()


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold `run`'s lock for the block."""
    acquire_run_lock(run)
    try:
        yield
    finally:
        release_run_lock(run)


def _delete_if_ours(held: _Held) -> None:
    try:
        current = read_owner(held.run)
    except (ValueError, OSError):
        return
    if current is not None and current.token == held.owner.token:
        lock_path(held.run).unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    """Delete this process's locks at exit (a forked child's copies are not its own)."""
    for key, held in list(_HELD.items()):
        if held.owner.pid == os.getpid():
            del _HELD[key]
            with suppress(Exception):
                _delete_if_ours(held)
