#!/usr/bin/env python
"""Run config overlays (ablations) over ONE base run's embeddings and neighbours.

Each overlay is a small YAML (configs/ablations/: the paper's Table 5 channel
combinations, Table 4 hard-negative counts, auto windows) merged into the base run's
stored config. For each, a new run directory OUT/<overlay name> gets the base run's
ingest, embed and neighbours outputs hard-linked (copied where links cannot be made),
with their part markers and manifest entries, so nothing before mining is computed
again; then mine -> annotate -> [score] -> export run there through the normal runner
(a re-run resumes). An overlay that changes what those shared outputs depend on (input,
ingest, embed or neighbours settings, the seed, a channel's encoder, model or options,
or a channel the base run has no neighbours for) is refused.

    python scripts/ablations.py --base runs/demo --out runs/demo-ablations \\
        configs/ablations/table5-*.yaml

prints, per overlay, the pairs (and how many each channel found), instructions and
exported rows. Local run directories only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megapairs.config import ConfigError, PipelineConfig, apply_override
from megapairs.neighbours.stage import neighbours_stage_name
from megapairs.pipeline.reset import PROGRESS_DIR, STAGE_OUTPUTS, stage_kind
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import RunDir

ABLATIONS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
DOWNSTREAM = ("mine", "annotate", "score", "export")
SHAPING = ("seed", "input", "ingest", "embed", "neighbours")  # what shared outputs depend on
CHANNEL_SHAPING = ("encoder", "model", "options")


@dataclass
class Ablation:
    """One overlay run: its config and what each downstream stage did."""

    name: str
    run: RunDir
    config: PipelineConfig
    results: list[StageResult]
    linked: int  # files hard-linked (or copied) from the base run

    def counts(self, stage: str) -> dict[str, int]:
        return next((r.counts for r in self.results if r.name == stage), {})


# configs ----------------------------------------------------------------------------


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` laid over it: mappings merge key by key, other values replace."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def base_config(base: RunDir) -> PipelineConfig:
    stored = base.read_manifest().get("config")
    if stored is None:
        raise ConfigError(f"{base.uri} holds no manifest with a config: not a megapairs run")
    return PipelineConfig.model_validate(stored)


def overlay_config(
    base: PipelineConfig, overlay: Path, overrides: list[str] | None = None
) -> PipelineConfig:
    """The base config with the overlay file and then `overrides` applied."""
    data = yaml.safe_load(overlay.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"overlay {overlay} must be a mapping at the top level")
    merged = merge(base.model_dump(mode="json"), data)
    for override in overrides or []:
        apply_override(merged, override)
    try:
        return PipelineConfig.model_validate(merged)
    except ValueError as err:
        raise ConfigError(f"overlay {overlay}: {err}") from err


def shared_stages(config: PipelineConfig) -> list[str]:
    """The stages an overlay run takes from the base run, in pipeline order."""
    channels = list(config.enabled_channels())
    return [
        "ingest.decode",
        "ingest",
        *(f"embed.{c}" for c in channels),
        *(neighbours_stage_name(c) for c in channels),
    ]


def reuse_problems(base_run: RunDir, base: PipelineConfig, config: PipelineConfig) -> list[str]:
    """Why `config` cannot reuse the base run's shared outputs (empty: it can)."""
    problems = [
        f"{section} differs"
        for section in SHAPING
        if base.section_hash(section) != config.section_hash(section)
    ]
    for name in config.enabled_channels():
        if not base_run.done_parts(neighbours_stage_name(name)):
            problems.append(f"the base run has no neighbours for channel {name!r}")
            continue
        keys = [f"channels.{name}.{key}" for key in CHANNEL_SHAPING]
        if name not in base.channels or base.section_hash(*keys) != config.section_hash(*keys):
            problems.append(f"channel {name!r} has another encoder, model or options")
    return problems


# sharing the base run's outputs -------------------------------------------------------


def link_file(source: Path, target: Path) -> bool:
    """Hard-link `source` as `target` (a copy across file systems); False if it exists."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return True


def stage_files(run: Path, stage: str) -> list[Path]:
    """The files of `stage` in `run`: its folders, its files in shared folders, its markers."""
    kind, channel = stage_kind(stage)
    outputs = STAGE_OUTPUTS[kind]
    folders = [run / f.format(channel=channel) for f in outputs.folders]
    folders.append(run / PROGRESS_DIR / stage)
    files = [p for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*"))]
    files += [p for g in outputs.shared for p in sorted(run.glob(g.format(channel=channel)))]
    return [p for p in files if p.is_file() and not p.name.endswith(".tmp")]


def share_stages(base: RunDir, run: RunDir, stages: list[str]) -> int:
    """Link the base run's files of `stages` into `run` and copy their manifest entries;
    how many files were linked."""
    source, target = Path(base.uri), Path(run.uri)
    linked = sum(
        link_file(path, target / path.relative_to(source))
        for stage in stages
        for path in stage_files(source, stage)
    )
    recorded = base.read_manifest().get("stages", {})
    manifest = run.read_manifest()
    entries = manifest.get("stages", {})
    entries.update({s: recorded[s] for s in stages if s in recorded and s not in entries})
    run.update_manifest(stages=entries)
    return linked


# running ------------------------------------------------------------------------------


def run_ablation(
    base: RunDir,
    overlay: Path,
    out: Path,
    overrides: list[str] | None = None,
    progress: bool = False,
) -> Ablation:
    """Apply `overlay` to the base run's config and run the downstream stages in
    `out/<overlay name>` on the base run's shared outputs."""
    if not base.is_local:
        raise ValueError(f"{base.uri}: ablations share files by hard links, on local runs only")
    stored = base_config(base)
    config = overlay_config(stored, overlay, overrides)
    problems = reuse_problems(base, stored, config)
    if problems:
        raise ConfigError(
            f"overlay {overlay} cannot reuse {base.uri}'s embeddings and neighbours: "
            f"{'; '.join(problems)}; give it a full run of its own"
        )
    run = RunDir(out / overlay.stem)
    Path(run.uri).mkdir(parents=True, exist_ok=True)
    linked = share_stages(base, run, shared_stages(config))
    run.update_manifest(
        ablation={"base": base.uri, "overlay": str(overlay), "overrides": overrides or []}
    )
    stages = build_stages(config, DOWNSTREAM, progress=progress)
    results = LocalRunner(run, config, progress).run_all(stages)
    return Ablation(overlay.stem, run, config, results, linked)


# the table ----------------------------------------------------------------------------


def channel_cells(ablation: Ablation) -> str:
    mine = ablation.counts("mine")
    pairs = max(mine.get("pairs", 0), 1)
    return ", ".join(
        f"{c} {mine.get(f'pairs_{c}', 0):,} ({mine.get(f'pairs_{c}', 0) / pairs:.0%})"
        for c in ablation.config.enabled_channels()
    )


def format_table(ablations: list[Ablation]) -> str:
    """Pairs (per channel), instructions and exported rows of each overlay."""
    lines = [
        f"{'overlay':<16}{'pairs':>8}{'negatives':>10}{'instructions':>13}{'exported':>10}"
        "   pairs found by channel (share of pairs)"
    ]
    for a in ablations:
        mine = a.counts("mine")
        lines.append(
            f"{a.name:<16}{mine.get('pairs', 0):>8,}{mine.get('hard_negatives', 0):>10,}"
            f"{a.counts('annotate').get('instructions', 0):>13,}"
            f"{a.counts('export').get('rows', 0):>10,}   {channel_cells(a)}"
        )
    return "\n".join(lines)


def format_windows(ablations: list[Ablation]) -> list[str]:
    """The auto windows each overlay's mine stage chose (none when all are fixed)."""
    lines = []
    for a in ablations:
        windows = a.run.read_manifest().get("windows", {})
        auto = {c: w["window"] for c, w in windows.items() if w.get("rule") == "auto"}
        if auto:
            chosen = ", ".join(f"{c} [{lo:.4f}, {hi:.4f}]" for c, (lo, hi) in auto.items())
            lines.append(f"{a.name}: auto windows {chosen}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="overlays: " + ", ".join(p.stem for p in sorted(ABLATIONS.glob("*.yaml"))),
    )
    parser.add_argument(
        "overlays",
        nargs="*",
        type=Path,
        help=f"overlay YAML files (default: every file in {ABLATIONS})",
    )
    parser.add_argument(
        "--base", required=True, type=Path, help="finished run (through neighbours) to reuse"
    )
    parser.add_argument(
        "--out", type=Path, help="where the overlay runs go (default: <base>-ablations)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied after every overlay (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overlays = args.overlays or sorted(ABLATIONS.glob("*.yaml"))
    out = args.out or args.base.with_name(f"{args.base.name}-ablations")
    base = RunDir(args.base)
    ablations = []
    for overlay in overlays:
        print(f"ablation {overlay.stem}: {out / overlay.stem}", flush=True)
        ablations.append(run_ablation(base, overlay, out, args.overrides, not args.quiet))
    print(format_table(ablations))
    for line in format_windows(ablations):
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        print(f"ablations: error: {err}", file=sys.stderr)
        sys.exit(2)
