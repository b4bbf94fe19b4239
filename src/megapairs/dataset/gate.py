"""The quality gate's rules (`export.filter`) over the score stage's rows (SCORES_SCHEMA, as
dicts): pure functions without I/O, so every rule is tested on hand-written rows.

An instruction is dropped by the first rule it fails, in `RULES` order, and counted once:
- `unscored`: it has no score row (the score stage failed on it) while an instruction rule
  is on;
- `max_rank`: rank > max_rank (when max_rank > 0); a rank equal to it is kept;
- `min_margin`: margin < min_margin (when set); a margin equal to it is kept;
- `text_shortcut` / `image_shortcut`: the flag is set and `drop_shortcuts` names that kind
  (or `either`);
- `judge`: `require_judge` and the verdict is not "yes" (no, or null: no judge, it failed).
A value an active rule needs that is missing (null, NaN) fails that rule.

A pair whose instructions all fail is rejected as `gate:<rule>`, the rule that removed most
of them (ties: `RULES` order). A kept pair's false negatives are the hard negatives that a
kept instruction's row flags (`false_negative_ids`); with `drop_false_negatives` they leave
the pair and the query's below-window neighbours take their places (`top_up`), as mining
tops up: by descending score over the channels (ties: channel order, then list position),
never the target, the query, an in-window candidate, a negative already there, a flagged id
or a duplicate, up to `mine.num_hard_negatives`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megapairs.config import FilterConfig

RULES = ("unscored", "max_rank", "min_margin", "text_shortcut", "image_shortcut", "judge")
# rule -> the export count of instructions it dropped
DROP_COUNTS = {
    "unscored": "dropped_unscored",
    "max_rank": "dropped_rank",
    "min_margin": "dropped_margin",
    "text_shortcut": "dropped_text_shortcut",
    "image_shortcut": "dropped_image_shortcut",
    "judge": "dropped_judge",
}
REJECT_PREFIX = "gate:"
SHORTCUT_KINDS = {"text_shortcut": ("text", "either"), "image_shortcut": ("image", "either")}

ScoreRow = Mapping[str, Any]
Window = tuple[float, float]


@dataclass(frozen=True)
class ChannelNeighbours:
    """One channel's neighbour list of a query (descending scores) and its mining window."""

    ids: Sequence[int]
    scores: Sequence[float]
    window: Window


@dataclass(frozen=True)
class Dropped:
    """An instruction the gate removed: its index in the annotation, the rule, why."""

    index: int
    rule: str
    detail: str


@dataclass(frozen=True)
class GatedPair:
    """What the gate decided for one annotated pair."""

    kept: list[int]  # indices of the kept instructions, in annotation order
    dropped: list[Dropped]
    false_negatives: list[int]  # flagged hard negatives, in the pair's order
    negatives: list[int]  # the hard negatives after the gate
    removed: list[int]  # flagged negatives taken out (drop_false_negatives)
    topped_up: list[int]  # below-window neighbours added in their place
    min_kept: int = 1  # fewer kept instructions than this (after drops) rejects the pair

    @property
    def rejected(self) -> bool:
        """No instruction left, or the gate left fewer than `min_kept` (a triplet needs
        `annotate.min_instructions`, as `validate` checks)."""
        return not self.kept or (bool(self.dropped) and len(self.kept) < self.min_kept)


def instruction_rules_on(rules: FilterConfig) -> bool:
    """Whether any rule can drop an instruction."""
    return bool(
        rules.max_rank
        or rules.min_margin is not None
        or rules.drop_shortcuts != "none"
        or rules.require_judge
    )


def rules_on(rules: FilterConfig) -> bool:
    """Whether the filter changes anything (an instruction rule or the false-negative drop)."""
    return instruction_rules_on(rules) or rules.drop_false_negatives


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fails(rule: str, score: ScoreRow, rules: FilterConfig) -> bool:
    if rule == "max_rank":
        return rules.max_rank > 0 and (_missing(score["rank"]) or score["rank"] > rules.max_rank)
    if rule == "min_margin":
        limit = rules.min_margin
        return limit is not None and (_missing(score["margin"]) or score["margin"] < limit)
    if rule in SHORTCUT_KINDS:
        return rules.drop_shortcuts in SHORTCUT_KINDS[rule] and score[rule] is not False
    if rule == "judge":
        return rules.require_judge and score["judge_verdict"] != "yes"
    raise ValueError(f"unknown gate rule {rule!r}")


def failed_rule(score: ScoreRow | None, rules: FilterConfig) -> str | None:
    """The first rule (RULES order) an instruction with this score row fails, or None."""
    if score is None:
        return "unscored" if instruction_rules_on(rules) else None
    return next((rule for rule in RULES[1:] if _fails(rule, score, rules)), None)


def rule_detail(rule: str, score: ScoreRow | None, rules: FilterConfig) -> str:
    """Why `rule` dropped the instruction, with the values that decided it."""
    if score is None or rule == "unscored":
        return "no score row"
    if rule == "max_rank":
        return f"rank {score['rank']} > {rules.max_rank}"
    if rule == "min_margin":
        margin = score["margin"]
        shown = "none" if _missing(margin) else f"{margin:.4g}"
        return f"margin {shown} < {rules.min_margin:g}"
    if rule in SHORTCUT_KINDS:
        kind = rule.split("_")[0]
        key = f"{kind}_only_rank"
        return f"{kind} shortcut ({key.replace('_', '-')} {score.get(key)})"
    return f"judge said {score['judge_verdict'] or 'nothing'}"


def gate_instructions(
    scores: Sequence[ScoreRow | None], rules: FilterConfig
) -> tuple[list[int], list[Dropped]]:
    """Split a pair's instructions (one score row or None each) into kept indices and
    dropped ones with their rule."""
    kept: list[int] = []
    dropped: list[Dropped] = []
    for index, score in enumerate(scores):
        rule = failed_rule(score, rules)
        if rule is None:
            kept.append(index)
        else:
            dropped.append(Dropped(index, rule, rule_detail(rule, score, rules)))
    return kept, dropped


def reject_reason(dropped: Sequence[Dropped]) -> tuple[str, str]:
    """The reject reason (`gate:<rule>` of the rule that removed most instructions; ties:
    RULES order) and a detail listing every instruction's rule and values."""
    if not dropped:
        raise ValueError("a pair without dropped instructions is not a gate reject")
    tally = Counter(d.rule for d in dropped)
    rule = max(RULES, key=lambda r: (tally[r], -RULES.index(r)))
    listed = "; ".join(f"#{d.index} {d.rule}: {d.detail}" for d in dropped)
    return f"{REJECT_PREFIX}{rule}", f"{len(dropped)} instructions failed the gate: {listed}"


def flagged_negatives(negatives: Sequence[int], scores: Iterable[ScoreRow | None]) -> list[int]:
    """The pair's hard negatives that any of `scores` flags as false negatives, in order."""
    flagged = {i for s in scores if s is not None for i in s["false_negative_ids"] or ()}
    return [n for n in negatives if n in flagged]


def below_window_candidates(query_id: int, channels: Sequence[ChannelNeighbours]) -> list[int]:
    """The query's below-window neighbours, as mining tops up from them: merged over the
    channels by descending float32 score (ties: channel order, then list position), distinct,
    without the query, padding (-1), non-finite scores or an id some channel has in window."""
    in_window: set[int] = set()
    below: list[tuple[int, np.float32]] = []
    for channel in channels:
        low, high = np.float32(channel.window[0]), np.float32(channel.window[1])
        for neighbour, raw in zip(channel.ids, channel.scores, strict=True):
            score = np.float32(np.nan if raw is None else raw)
            if neighbour is None or neighbour < 0 or neighbour == query_id:
                continue
            if not np.isfinite(score):
                continue
            if low < score < high:
                in_window.add(neighbour)
            elif score <= low:
                below.append((neighbour, score))
    ordered = sorted(below, key=lambda entry: -entry[1])  # stable: channel, then position
    return list(dict.fromkeys(i for i, _ in ordered if i not in in_window))


def top_up(
    negatives: Sequence[int],
    flagged: Sequence[int],
    candidates: Iterable[int],
    *,
    query_id: int,
    target_id: int,
    limit: int,
) -> tuple[list[int], list[int]]:
    """`negatives` without `flagged`, then candidates until `limit` negatives (never the
    query, the target, a negative or flagged id of the pair, or a duplicate); returns the
    new negatives and the added ones."""
    dropped = set(flagged)
    kept = [n for n in negatives if n not in dropped]
    blocked = {query_id, target_id, *negatives, *dropped}
    added: list[int] = []
    for candidate in candidates:
        if len(kept) + len(added) >= limit:
            break
        if candidate not in blocked:
            blocked.add(candidate)
            added.append(candidate)
    return kept + added, added


def gate_pair(
    query_id: int,
    target_id: int,
    negatives: Sequence[int],
    scores: Sequence[ScoreRow | None],
    rules: FilterConfig,
    candidates: Callable[[int], Iterable[int]],
    num_hard_negatives: int,
    min_kept: int = 1,
) -> GatedPair:
    """Apply the filter to one pair: `scores` has one row (or None) per instruction;
    `candidates(query_id)` gives the below-window neighbours, asked only for a top-up; a
    pair the gate leaves with fewer than `min_kept` instructions is rejected."""
    kept, dropped = gate_instructions(scores, rules)
    flagged = flagged_negatives(negatives, [scores[i] for i in kept])
    unchanged = GatedPair(kept, dropped, flagged, list(negatives), [], [], min_kept)
    if unchanged.rejected or not (rules.drop_false_negatives and flagged):
        return unchanged
    new, added = top_up(
        negatives,
        flagged,
        candidates(query_id),
        query_id=query_id,
        target_id=target_id,
        limit=num_hard_negatives,
    )
    return GatedPair(kept, dropped, flagged, new, flagged, added, min_kept)


def gate_counts(pairs: Iterable[GatedPair]) -> dict[str, int]:
    """The counts export records for gated pairs: instructions in, kept and dropped per
    rule; pairs rejected; false negatives removed and negatives topped up (kept pairs)."""
    counts = Counter({key: 0 for key in DROP_COUNTS.values()})
    for pair in pairs:
        counts["instructions_in"] += len(pair.kept) + len(pair.dropped)
        counts["instructions_kept"] += len(pair.kept)
        counts.update(DROP_COUNTS[d.rule] for d in pair.dropped)
        counts["gate_rejected_pairs"] += pair.rejected
        counts["dropped_false_negatives"] += len(pair.removed)
        counts["topped_up_negatives"] += len(pair.topped_up)
    keys = ["instructions_in", "instructions_kept", *DROP_COUNTS.values()]
    keys += ["gate_rejected_pairs", "dropped_false_negatives", "topped_up_negatives"]
    return {key: counts[key] for key in keys}
