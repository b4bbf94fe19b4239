"""`megapairs search`: composed search over a run's corpus from the command line
(`megapairs.explore.search`), printed as a table or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs.explore.search import RETRIEVER_NAMES, SearchEngine, SearchHit

if TYPE_CHECKING:
    from PIL import Image

    from megapairs.runs import RunDir

EXAMPLES = """examples:
  megapairs search --run runs/demo --image 1000033 --text "the same scene at night"
  megapairs search --run runs/demo --image photo.jpg -k 5 --json
  megapairs search --run runs/demo --text "two red circles" --retriever mmret-clip \\
      --model checkpoints/mmret-clip      # embeds the corpus once into runs/demo/explore/
"""


def add_search_command(commands: argparse._SubParsersAction) -> None:
    """Register `megapairs search` and its handler `cmd_search`."""
    text = "composed search over a run's corpus: a query image and/or a text -> top-k images"
    search = commands.add_parser(
        "search",
        help=text,
        description=text + ". The channels retriever uses the run's own embeddings (offline); "
        "a model retriever embeds the corpus once into <run>/explore/gallery/ and reuses it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("--run", required=True, help="run directory")
    search.add_argument("--image", help="query image: a corpus record id (digits) or an image file")
    search.add_argument("--text", default="", help="query text (with --image: the modification)")
    search.add_argument(
        "--retriever",
        choices=RETRIEVER_NAMES,
        default="channels",
        help="channels (default: the run's embeddings), or a `megapairs eval` retriever with "
        "--model",
    )
    search.add_argument("--model", help="the retriever's checkpoint folder (not with channels)")
    search.add_argument("-k", type=int, default=10, help="hits to show (1..1000, default 10)")
    search.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    search.add_argument("--batch-size", type=int, default=64, help="gallery encoding batch")
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    """Run one search and print its hits; errors are raised for `megapairs.cli.main`, which
    prints them as one `error:` line with exit code 2."""
    from megapairs.explore.search import build_search_engine
    from megapairs.runs import RunDir

    text = (args.text or "").strip()
    if not args.image and not text:
        raise ValueError("give --image (a record id or an image file), --text, or both")
    image_id, image = parse_image(args.image)
    run = RunDir(args.run)
    engine = build_search_engine(
        run, args.retriever, args.model, device=args.device, batch_size=args.batch_size
    )
    build_with_bar(engine, quiet=args.quiet)
    hits = engine.search(image_id=image_id, image=image, text=text, k=args.k)
    rows = hit_rows(run, hits)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(format_table(rows))
    return 0


def parse_image(value: str | None) -> tuple[int | None, Image.Image | None]:
    """(record id, None) for digits, (None, decoded image) for an image file."""
    from megapairs.explore.search import MAX_UPLOAD_BYTES, UploadTooLarge, decode_upload

    if not value:
        return None, None
    if value.isdigit():
        return int(value), None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--image {value!r} is neither a record id nor an image file")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        size = path.stat().st_size
        raise UploadTooLarge(f"{value}: {size} bytes, more than the {MAX_UPLOAD_BYTES} allowed")
    try:
        return None, decode_upload(path.read_bytes())
    except ValueError as err:
        raise type(err)(f"{value}: {err}") from err


def build_with_bar(engine: SearchEngine, quiet: bool) -> None:
    """Build the engine's gallery, with a progress bar on stderr unless `quiet`."""
    from tqdm.auto import tqdm

    with tqdm(desc="gallery", unit="img", disable=quiet, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        engine.build(progress)


def hit_rows(run: RunDir, hits: Sequence[SearchHit]) -> list[dict[str, Any]]:
    """The hits with their rank and caption."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from megapairs.corpus.store import read_corpus

    corpus = read_corpus(run, columns=["id", "caption"])
    wanted = corpus.filter(pc.is_in(corpus["id"], pa.array([hit.id for hit in hits], pa.int64())))
    captions = dict(zip(wanted["id"].to_pylist(), wanted["caption"].to_pylist(), strict=True))
    return [
        {"rank": rank, "id": hit.id, "score": round(hit.score, 6), "caption": captions.get(hit.id)}
        for rank, hit in enumerate(hits, 1)
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """`rank  id  score  caption`, one line per hit."""
    if not rows:
        return "no hits"
    width = max(len("id"), *(len(str(row["id"])) for row in rows))
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>7}  caption"]
    for row in rows:
        caption = " ".join((row["caption"] or "").split())
        lines.append(f"{row['rank']:>4}  {row['id']:<{width}}  {row['score']:>7.4f}  {caption}")
    return "\n".join(lines)
