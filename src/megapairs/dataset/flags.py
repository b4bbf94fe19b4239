"""Curation flags: a person marks a pair, or one instruction of it, as bad (`megapairs explore`).

Each flag or unflag is one small JSON file in `<run>/flags/`, written atomically (temp file +
rename, or one upload on object storage) and never edited or deleted. A file is named
`<UTC time %Y%m%dT%H%M%S.%fZ>-<8 random hex>.json`, so name order is time order; its stem is
the event's id. The current state (`ActiveFlags`) is the replay of the events in that order:
the last action on a key (pair id, instruction index or None for the whole pair) wins. A file
that does not parse is skipped with a warning and counted, never fatal.

`megapairs export --exclude-flagged` leaves flagged pairs and instructions out of the dataset
(`dataset/export.py`); `megapairs reset` never deletes flags (they are user curation, not a
stage's output).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from megapairs.runs import AnyPath, RunDir, list_files, part_name, read_bytes, write_json
from megapairs.schemas import FLAGS_DIR, PART_STRIDE

log = logging.getLogger(__name__)

ACTIONS = ("flag", "unflag")
REASONS = ("unrelated_pair", "wrong_instruction", "false_negative", "near_duplicate", "other")
MAX_REASON = 200
MAX_USER = 100
PAIR_ID = re.compile(r"^\d{1,19}-\d{1,19}$")  # two int64 record ids
TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
EVENT_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")

# FlagKey: (pair id, instruction index), None for the whole pair
FlagKey = tuple[str, int | None]

_clock = threading.Lock()
_last_time = datetime.min.replace(tzinfo=UTC)


class FlagError(ValueError):
    """A flag that cannot be recorded (a malformed pair id, an empty reason, ...)."""


def default_user() -> str:
    """The login name, or `unknown` where there is none (a container without one)."""
    try:
        return getpass.getuser() or "unknown"
    except (KeyError, OSError):
        return "unknown"


def pair_part(pair_id: str) -> str:
    """The part holding a pair: that of its query id (`<query>-<target>`)."""
    return part_name(int(pair_id.split("-", 1)[0]) // PART_STRIDE)


@dataclass(frozen=True)
class FlagEvent:
    """One flag or unflag of a pair (instruction_index None) or of one of its instructions."""

    id: str
    time: str
    user: str
    action: str
    pair_id: str
    instruction_index: int | None
    instruction: str | None
    reason: str

    @property
    def key(self) -> FlagKey:
        return (self.pair_id, self.instruction_index)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlagEvent:
        """An event from its JSON form; FlagError when a field is missing or malformed."""
        if not isinstance(data, dict):
            raise FlagError("a flag event must be a JSON object")
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        if missing:
            raise FlagError(f"a flag event lacks {', '.join(missing)}")
        for name in ("id", "time"):
            if not isinstance(data[name], str) or not data[name]:
                raise FlagError(f"a flag event's {name} must be a non-empty string")
        check_flag(
            data["pair_id"],
            data["reason"],
            data["user"],
            data["instruction_index"],
            data["instruction"],
            data["action"],
        )
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def check_flag(
    pair_id: Any,
    reason: Any,
    user: Any,
    instruction_index: Any = None,
    instruction: Any = None,
    action: Any = "flag",
) -> None:
    """Refuse (FlagError, one sentence) a flag that is not well formed."""
    if action not in ACTIONS:
        raise FlagError(f"a flag's action must be flag or unflag, not {action!r}")
    if not isinstance(pair_id, str) or not PAIR_ID.match(pair_id):
        raise FlagError(f"{pair_id!r} is not a pair id (<query id>-<target id>, e.g. 1000003-42)")
    if not isinstance(reason, str) or not reason.strip():
        raise FlagError("a flag needs a reason (e.g. unrelated_pair or a short sentence)")
    if len(reason.strip()) > MAX_REASON:
        raise FlagError(f"a flag's reason must be at most {MAX_REASON} characters")
    if not isinstance(user, str) or not user.strip() or len(user.strip()) > MAX_USER:
        raise FlagError(f"a flag needs a user name of 1 to {MAX_USER} characters")
    if instruction_index is not None and (
        isinstance(instruction_index, bool)
        or not isinstance(instruction_index, int)
        or instruction_index < 0
    ):
        raise FlagError(f"an instruction index must be an integer >= 0, not {instruction_index!r}")
    if instruction is not None and not isinstance(instruction, str):
        raise FlagError("a flagged instruction's text must be a string")
    if action == "flag" and instruction_index is not None and not instruction:
        raise FlagError(
            f"flagging instruction {instruction_index} of pair {pair_id} needs its text "
            "(instruction=...), so the flag is not applied to another text after re-annotation"
        )


@dataclass(frozen=True)
class ActiveFlags:
    """The flags in force: the last action on each key was `flag`."""

    pairs: dict[str, FlagEvent] = field(default_factory=dict)  # whole-pair flags
    instructions: dict[tuple[str, int], FlagEvent] = field(default_factory=dict)
    events: int = 0  # events replayed (all of them, also unflags)
    unreadable: int = 0  # flag files skipped because they did not parse

    @classmethod
    def replay(cls, events: Iterable[FlagEvent], unreadable: int = 0) -> ActiveFlags:
        """Replay `events` in order: the last action on each key wins."""
        last: dict[FlagKey, FlagEvent] = {}
        count = 0
        for event in events:
            last[event.key] = event
            count += 1
        flagged = [e for e in last.values() if e.action == "flag"]
        return cls(
            pairs={e.pair_id: e for e in flagged if e.instruction_index is None},
            instructions={
                (e.pair_id, e.instruction_index): e
                for e in flagged
                if e.instruction_index is not None
            },
            events=count,
            unreadable=unreadable,
        )

    def flags(self) -> list[FlagEvent]:
        """Every active flag, by pair id then instruction (the whole pair first)."""
        everything = [*self.pairs.values(), *self.instructions.values()]
        return sorted(everything, key=_flag_order)

    @property
    def count(self) -> int:
        """Active flags (pairs and instructions); no __len__, so an empty set is not falsy."""
        return len(self.pairs) + len(self.instructions)

    def for_part(self, part: str) -> ActiveFlags:
        """The flags on the pairs of `part` (the part of each pair's query id)."""
        return ActiveFlags(
            pairs={p: e for p, e in self.pairs.items() if pair_part(p) == part},
            instructions={k: e for k, e in self.instructions.items() if pair_part(k[0]) == part},
            events=self.events,
            unreadable=self.unreadable,
        )

    def instructions_of(self, pair_id: str) -> dict[int, FlagEvent]:
        """instruction index -> its active flag, for one pair."""
        return {i: e for (p, i), e in self.instructions.items() if p == pair_id}

    def digest(self) -> str | None:
        """A short digest of what the active flags would change (pair, instruction index and
        text, reason, user); None when no flag is active."""
        flags = self.flags()
        if not flags:
            return None
        identity = [
            [e.pair_id, e.instruction_index, e.instruction, e.reason, e.user] for e in flags
        ]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """Counts of the active flags (by reason and by user), events and unreadable files."""
        flags = self.flags()
        return {
            "flagged_pairs": len(self.pairs),
            "flagged_instructions": len(self.instructions),
            "by_reason": _ranked(Counter(e.reason for e in flags)),
            "by_user": _ranked(Counter(e.user for e in flags)),
            "events": self.events,
            "unreadable": self.unreadable,
        }


def _flag_order(event: FlagEvent) -> tuple[str, int, str]:
    index = event.instruction_index
    return (event.pair_id, -1 if index is None else index, event.id)


def _ranked(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


class FlagStore:
    """A run's flag events (`<run>/flags/`): append-only, one atomic file per event. Files
    are never edited, so each is parsed once per store and remembered by name."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._parsed: dict[str, FlagEvent | None] = {}

    @property
    def folder(self) -> AnyPath:
        return self.run.folder(FLAGS_DIR)

    def add(
        self,
        pair_id: str,
        reason: str,
        user: str,
        *,
        instruction_index: int | None = None,
        instruction: str | None = None,
        action: str = "flag",
    ) -> FlagEvent:
        """Record a flag (or unflag) of a pair or of one of its instructions; returns it."""
        if action == "unflag" and isinstance(reason, str) and not reason.strip():
            reason = "unflag"
        check_flag(pair_id, reason, user, instruction_index, instruction, action)
        moment = _next_time()
        event = FlagEvent(
            id=f"{moment.strftime(TIME_FORMAT)}-{secrets.token_hex(4)}",
            time=moment.isoformat(timespec="microseconds"),
            user=user.strip(),
            action=action,
            pair_id=pair_id,
            instruction_index=instruction_index,
            instruction=instruction,
            reason=reason.strip(),
        )
        write_json(self.folder / f"{event.id}.json", event.as_dict())
        self._parsed[f"{event.id}.json"] = event
        return event

    def events(self) -> list[FlagEvent]:
        """Every readable event, in id (time) order."""
        return [e for e in self._read() if e is not None]

    def active(self) -> ActiveFlags:
        """The flags in force now."""
        read = self._read()
        events = [e for e in read if e is not None]
        return ActiveFlags.replay(events, unreadable=len(read) - len(events))

    def _read(self) -> list[FlagEvent | None]:
        """Each event file's event (None: unreadable), in name order; temp files of a writer
        (`.<name>.<random>.tmp`) are not event files."""
        paths = [p for p in list_files(self.folder, "*.json") if not p.name.startswith(".")]
        for path in paths:
            if path.name not in self._parsed:
                self._parsed[path.name] = _parse(path)
        return [self._parsed[path.name] for path in paths]


def _parse(path: AnyPath) -> FlagEvent | None:
    """The event in `path`, or None (with a warning naming the file) when it does not parse."""
    try:
        stem = path.name.removesuffix(".json")
        if not EVENT_NAME.match(stem):
            raise FlagError("its name is not <time>-<8 hex>.json")
        event = FlagEvent.from_dict(json.loads(read_bytes(path).decode("utf-8")))
        if event.id != stem:
            raise FlagError(f"its id {event.id!r} is not its file name")
        return event
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, FlagError) as err:
        log.warning("skipping unreadable flag file %s: %s", path, err)
        return None


def _next_time() -> datetime:
    """Now in UTC, strictly after the previous event of this process (names stay in order
    when two flags come within one clock tick)."""
    global _last_time
    with _clock:
        moment = max(datetime.now(UTC), _last_time + timedelta(microseconds=1))
        _last_time = moment
        return moment
