"""The `megapairs` command: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from megapairs import __version__
from megapairs.config import ConfigError, PipelineConfig, load_config
from megapairs.explore.search_command import add_search_command
from megapairs.explore.server import add_explore_command
from megapairs.models.export import add_export_model_command
from megapairs.pipeline import RUNNERS

EPILOG = """examples:
  megapairs demo                                       # offline demo, end to end
  megapairs synthesize --config configs/demo.yaml --input photos/ --run runs/photos
  megapairs ingest --config configs/paper.yaml --input 'shards/{00000..00099}.tar' --run runs/dc
  megapairs mine --run runs/photos --set mine.max_targets=5
  megapairs annotate --run runs/photos --set annotate.backend=openai \
      --set annotate.describer.model=Qwen/Qwen2-VL-7B-Instruct
  megapairs export --run runs/photos && megapairs validate runs/photos/dataset
  megapairs stats runs/photos
  megapairs summary --run runs/photos
  megapairs reset --run runs/photos --stage annotate   # redo annotate (and export)
  megapairs explore --run runs/photos                  # web page: see, search, flag pairs
  megapairs search --run runs/photos --image 1000033 --text "the same scene at night"
  megapairs export --run runs/photos --exclude-flagged # the dataset without flagged pairs
  megapairs synthesize --config configs/paper.yaml --input s3://corpus/shards/ \
      --run s3://runs/paper --runner ray --ray-address auto     # on a Ray cluster
A command re-run on the same --run resumes: finished parts are skipped.
Set MEGAPAIRS_DEBUG=1 to see the full traceback of an error.
"""

STEP_COMMANDS = {
    "ingest": ("ingest",),
    "embed": ("embed",),
    "neighbours": ("neighbours",),
    "mine": ("mine",),
    "annotate": ("annotate",),
    "score": ("score",),
    "export": ("export",),
    "synthesize": ("ingest", "embed", "neighbours", "mine", "annotate", "score", "export"),
}


def add_set_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--set KEY=VALUE` option (collected in `args.overrides`)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        required=True,
        help="run directory (created if new): a local folder, or an object-store URL such as "
        "s3://bucket/prefix (credentials and endpoint from the usual AWS_* variables)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config; default: the config stored in the run's manifest",
    )
    parser.add_argument("--input", help="corpus path (overrides input.path)")
    add_set_option(parser, "override a config value, e.g. --set mine.max_targets=5 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default="local",
        help="where parts run: local (this process, default) or ray (a Ray cluster; "
        "pip install 'megapairs[ray]'); the output is the same",
    )
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join with --runner ray: auto, host:port or ray://host:10001 "
        "(default: start Ray on this machine)",
    )


def add_exclude_flagged_option(parser: argparse.ArgumentParser) -> None:
    """`--exclude-flagged` / `--no-exclude-flagged`: export.exclude_flagged for this run."""
    parser.add_argument(
        "--exclude-flagged",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave flagged pairs and instructions (megapairs explore) out of the dataset "
        "(sets export.exclude_flagged, kept in the run's config; --no-exclude-flagged puts "
        "them back)",
    )


def exclude_flagged_override(args: argparse.Namespace) -> list[str]:
    """The override `--exclude-flagged` (or its `--no-` form) asks for; none without it."""
    chosen = getattr(args, "exclude_flagged", None)
    return [] if chosen is None else [f"export.exclude_flagged={str(chosen).lower()}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megapairs",
        description="MegaPairs data synthesis: mine correlated image pairs from a captioned "
        "image corpus with three similarity channels, annotate them with retrieval "
        "instructions and export the triplets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"megapairs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "ingest": "read, decode, validate and dedupe the corpus",
        "embed": "embed every image/caption with each enabled channel's encoder",
        "neighbours": "FAISS top-k neighbours per channel",
        "mine": "mine (query, target) pairs in the similarity window, with hard negatives",
        "annotate": "describe each pair (VLM) and write its retrieval instructions (LLM)",
        "score": "the quality gate: score every instruction (round trip, shortcuts, false "
        "negatives, optional judge) for export's filter rules",
        "export": "export the triplets in the MegaPairs schema (Parquet + JSONL)",
        "synthesize": "run ingest -> embed -> neighbours -> mine -> annotate -> [score] -> "
        "export (score when score.enabled)",
    }
    for name, text in helps.items():
        step = commands.add_parser(name, help=text, description=text)
        add_run_options(step)
        if name in ("export", "synthesize"):
            add_exclude_flagged_option(step)
        step.set_defaults(handler=partial(run_steps, steps=STEP_COMMANDS[name]))
    demo = commands.add_parser("demo", help="offline demo on a generated corpus")
    demo.set_defaults(handler=cmd_demo)
    demo.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory")
    demo.add_argument("--images", type=int, default=600, help="images to generate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--config", type=Path, help="config (default: the packaged demo.yaml)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    add_set_option(demo, "override a config value, e.g. --set annotate.backend=openai (repeatable)")
    demo.add_argument(
        "--learn",
        action="store_true",
        help="then train a small CLIP from scratch on the exported triplets and evaluate it "
        "before and after on a held-out composed-retrieval set (CPU: several minutes)",
    )
    add_dataset_commands(commands)
    add_train_command(commands)
    add_eval_command(commands)
    add_reset_command(commands)
    add_calibrate_command(commands)
    add_explore_command(commands)
    add_search_command(commands)
    add_export_model_command(commands)
    summary = commands.add_parser("summary", help="print what a run holds")
    summary.add_argument("--run", required=True, help="run directory or object-store URL")
    summary.add_argument("--examples", type=int, default=5, help="example pairs to show")
    summary.set_defaults(handler=cmd_summary)
    show = commands.add_parser("config", help="print the resolved config")
    show.set_defaults(handler=cmd_config)
    show.add_argument("--config", type=Path)
    add_set_option(show, "override a config value (repeatable)")
    return parser


def add_dataset_commands(commands: argparse._SubParsersAction) -> None:
    """`validate` and `stats`: checks and counts of an exported (or released) dataset."""
    validate = commands.add_parser(
        "validate",
        help="check a dataset: schema, images exist, no target among its negatives, "
        ">= 3 instructions",
        description="Check an exported dataset (or the released MegaPairs layout) and list "
        "each problem with its file and row number; exits 1 when there are problems.",
    )
    validate.add_argument(
        "dataset", help="dataset folder or file (Parquet/JSONL), local or an object-store URL"
    )
    validate.add_argument(
        "--image-root", help="root of relative image paths (default: the dataset folder)"
    )
    validate.add_argument("--limit", type=int, default=50, help="problems to print")
    validate.add_argument(
        "--allow-empty", action="store_true", help="a dataset without rows is not a problem"
    )
    validate.set_defaults(handler=cmd_validate)
    stats = commands.add_parser(
        "stats",
        help="counts of a dataset: pairs per channel, instructions, lengths, failures",
        description="Counts of a dataset folder, or of a run directory's dataset with its "
        "annotation failures.",
    )
    stats.add_argument(
        "path", help="a run directory or a dataset folder/file (local or an object-store URL)"
    )
    stats.set_defaults(handler=cmd_stats)


def add_reset_command(commands: argparse._SubParsersAction) -> None:
    """`reset`: clear a stage (and the stages after it) so it runs again."""
    text = "delete a stage's outputs, markers and manifest entry, and those of every later stage"
    reset = commands.add_parser(
        "reset",
        help=text,
        description=text + " that depends on it (pipeline order: ingest.decode, ingest, "
        "embed.CHANNEL, neighbours.CHANNEL, mine, annotate, export), so that the next run "
        "computes them again, e.g. with a changed config. `ingest` includes ingest.decode; "
        "`embed` every embed.CHANNEL. Prints what it deleted.",
    )
    reset.add_argument("--run", required=True, help="run directory or object-store URL")
    reset.add_argument(
        "--stage", required=True, help="stage to clear: ingest, embed, embed.caption, annotate, ..."
    )
    reset.add_argument("--yes", action="store_true", help="accepted for scripts; reset never asks")
    reset.set_defaults(handler=cmd_reset)


def cmd_reset(args: argparse.Namespace) -> int:
    from megapairs.pipeline.reset import format_reset, reset_stage
    from megapairs.runs import RunDir

    run = RunDir(args.run)
    if not run.root.exists():
        raise FileNotFoundError(f"no run at {args.run}")
    print(format_reset(run, args.stage, reset_stage(run, args.stage)))
    return 0


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """`train`: contrastive training of an MMRet retriever on MegaPairs-schema triplets."""
    text = "train an MMRet retriever (CLIP score fusion or LLaVA-NeXT + LoRA) with InfoNCE"
    train = commands.add_parser(
        "train",
        help=text,
        description=text + ". The same command resumes from the newest checkpoint in "
        "output_dir. Several GPUs: accelerate launch -m megapairs train ...",
        epilog="examples:\n"
        "  megapairs train --config configs/train_clip.yaml --set data.paths=[runs/dc/dataset]\n"
        "  megapairs train --config configs/train_mllm.yaml --set batch_size=16 --set chunk_size=4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", type=Path, required=True, help="training YAML config")
    add_set_option(train, "override a config value, e.g. --set steps=100 (repeatable)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from megapairs.training.config import load_train_config
    from megapairs.training.trainer import train

    result = train(load_train_config(args.config, args.overrides), progress=not args.quiet)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"train: {result.steps} steps{resumed}, final loss {loss}")
    print(f"  model {result.final_model}; log {result.log_file}")
    if result.best is not None:
        best = result.best
        print(
            f"  best {best.benchmark} {best.split} {best.metric} {100 * best.value:.1f} "
            f"at step {best.step}: {best.path}"
        )
    if result.skipped_images:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped_images.items()))
        print(f"  skipped rows: {skipped}")
    return 0


def benchmark_names() -> list[str]:
    """The benchmarks of the evaluation registry, in its order."""
    from megapairs.evaluation.benchmarks import BENCHMARKS

    return list(BENCHMARKS)


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    """`eval`: zero-shot composed retrieval benchmarks and MMEB with their own metrics."""
    text = "evaluate a retriever on CIRCO, CIRR, FashionIQ, GeneCIS or MMEB"
    evaluate = commands.add_parser(
        "eval",
        help=text,
        description=text + " with each benchmark's reference metrics; writes a results JSON "
        "(and server submission files for test splits) and prints a Table-1-style summary "
        "beside the paper's numbers. Gallery embeddings are cached per model and benchmark.",
        epilog="examples:\n"
        "  megapairs eval --benchmark circo --kind mmret-clip --model runs/train/final \\\n"
        "      --data-root /data/circo --output results/\n"
        "  megapairs eval --benchmark all --kind clip --model openai/clip-vit-base-patch16 \\\n"
        "      --data-root /data/benchmarks   # holds circo/ cirr/ fashioniq/ genecis/ mmeb/\n"
        "  megapairs eval --benchmark cirr --split test1 ... # writes the two submission files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--benchmark",
        required=True,
        choices=[*benchmark_names(), "all"],
        help="a benchmark of the registry (megapairs.evaluation.benchmarks), or all",
    )
    evaluate.add_argument("--model", required=True, help="checkpoint: hub name or local folder")
    evaluate.add_argument(
        "--kind",
        "--retriever",
        dest="kind",
        default="mmret-clip",
        choices=["clip", "mmret-clip", "mmret-mllm"],
        help="retriever kind (clip: zero-shot score fusion of a plain CLIP)",
    )
    evaluate.add_argument(
        "--data-root", required=True, type=Path, help="the benchmark's folder (all: their parent)"
    )
    evaluate.add_argument(
        "--split",
        help="default: each benchmark's labelled split (val; MMEB: test); `paper`: the "
        "splits of the paper's Table 1 (CIRCO test, CIRR test1, FashionIQ val, GeneCIS)",
    )
    evaluate.add_argument("--output", type=Path, default=Path("results"), help="results folder")
    evaluate.add_argument(
        "--cache-dir", type=Path, default=Path("results/cache"), help="gallery embedding cache"
    )
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    add_set_option(
        evaluate,
        "benchmark setting, e.g. --set template='find {shared_concept} but "
        "{relative_caption}' (default: the paper's form), --set instruction='...', "
        "--set allow_missing=true (with all: circo.template=...)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from megapairs.evaluation.command import run_eval_command

    return run_eval_command(
        args.benchmark,
        args.model,
        args.kind,
        args.data_root,
        split=args.split,
        output=args.output,
        cache_dir=args.cache_dir,
        overrides=args.overrides,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from megapairs.dataset.validate import format_report, validate_dataset

    report = validate_dataset(args.dataset, args.image_root, allow_empty=args.allow_empty)
    print(format_report(report, limit=args.limit))
    return 1 if report.problems else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from megapairs.dataset.stats import dataset_stats, format_stats
    from megapairs.runs import RunDir, as_path
    from megapairs.schemas import DATASET_DIR

    path = as_path(args.path)
    is_run = (path / "manifest.json").exists()
    dataset = path / DATASET_DIR if is_run else path
    stats = dataset_stats(dataset, RunDir(path) if is_run else None)
    print(format_stats(stats))
    gate_unbalanced = stats.gate is not None and not stats.gate.balanced
    return 1 if gate_unbalanced or any(not part.balanced for part in stats.parts) else 0


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """The config from --config (or the run's manifest), --input and --set."""
    from megapairs.runs import RunDir

    overrides = list(args.overrides)
    if getattr(args, "input", None):
        overrides.insert(0, f"input.path={args.input}")
    if args.config is not None:
        return load_config(args.config, overrides)
    stored = RunDir(args.run).read_manifest().get("config")
    if stored is None:
        raise ConfigError(f"no --config given and {args.run} holds no manifest with a config")
    config = PipelineConfig.model_validate(stored)
    if not overrides:
        return config
    from megapairs.config import apply_override

    data = config.model_dump(mode="json")
    for override in overrides:
        apply_override(data, override)
    return PipelineConfig.model_validate(data)


def run_steps(args: argparse.Namespace, steps: tuple[str, ...]) -> int:
    from megapairs.pipeline.report import print_stage_results
    from megapairs.pipeline.runner import build_runner
    from megapairs.pipeline.synthesize import build_stages
    from megapairs.runs import RunDir

    if args.ray_address and args.runner != "ray":
        raise ConfigError("--ray-address needs --runner ray")
    args.overrides = [*args.overrides, *exclude_flagged_override(args)]
    config = resolve_config(args)
    run = RunDir(args.run)
    runner = build_runner(args.runner, run, config, not args.quiet, args.ray_address)
    # (model-loading bars of workers elsewhere would only clutter the driver's output)
    inner_bars = not args.quiet and args.runner == "local"
    results = runner.run_all(build_stages(config, steps, progress=inner_bars))
    return print_stage_results(results, run.uri)


def cmd_demo(args: argparse.Namespace) -> int:
    from megapairs.demo.run import run_demo

    return run_demo(
        args.run,
        args.images,
        args.seed,
        args.config,
        progress=not args.quiet,
        overrides=args.overrides,
        learn=args.learn,
    )


def cmd_summary(args: argparse.Namespace) -> int:
    from megapairs.demo.summary import format_summary, summarize_run
    from megapairs.runs import RunDir

    print(format_summary(summarize_run(RunDir(args.run), examples=args.examples)))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.public_dump(), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from megapairs.redaction import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        if os.environ.get("MEGAPAIRS_DEBUG"):
            raise
        from megapairs.redaction import redact

        print(f"megapairs {args.command}: error: {redact(str(err))}", file=sys.stderr)
        return 2


def add_calibrate_command(commands: argparse._SubParsersAction) -> None:
    """`calibrate`: each channel's neighbour scores and the window they suggest."""
    text = (
        "after `neighbours`: per channel, the neighbour scores (quantiles, by list rank), "
        "the entries below/inside/above its window and the window `window: auto` would "
        "choose; writes neighbours/<channel>/calibration.json"
    )
    calibrate = commands.add_parser("calibrate", help=text, description=text)
    calibrate.add_argument("--run", required=True, help="run directory or object-store URL")
    calibrate.add_argument(
        "--config", type=Path, help="YAML config; default: the config stored in the run"
    )
    add_set_option(calibrate, "override a config value, e.g. --set channels.caption.window=auto")
    calibrate.set_defaults(handler=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from megapairs.neighbours.calibrate import calibrate_run, format_calibration
    from megapairs.runs import RunDir

    run = RunDir(args.run)
    print(format_calibration(run, calibrate_run(run, resolve_config(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
