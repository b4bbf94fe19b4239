"""`megapairs explore`: serve the explorer over a run with uvicorn.

The socket is bound here (port 0: any free port) so the printed address is the real one
before the first request; a bind to anything but a loopback address needs a token, given
or generated, printed with the address.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
from typing import Any

from megapairs.dataset.flags import default_user
from megapairs.runs import RunDir

SEARCH_RETRIEVERS = ("channels", "clip", "mmret-clip", "mmret-mllm")


def add_explore_command(commands: argparse._SubParsersAction) -> None:
    """`megapairs explore --run RUN`."""
    text = "a local web page to see, search and curate a run's triplets"
    explore = commands.add_parser(
        "explore",
        help=text,
        description=text + ". Serves http://127.0.0.1:PORT/ (the address is printed); "
        "binding another address needs a token. See docs/explorer.md.",
    )
    explore.add_argument("--run", required=True, help="run directory or object-store URL")
    explore.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    explore.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    explore.add_argument(
        "--token",
        help="token every request must carry on a non-loopback bind (default: generated and "
        "printed); writes always need the page's token",
    )
    explore.add_argument("--user", default=None, help="name recorded with flags (default: login)")
    explore.add_argument(
        "--retriever",
        choices=(*SEARCH_RETRIEVERS, "none"),
        default="channels",
        help="composed search: channels (the run's own embeddings, default), clip, "
        "mmret-clip or mmret-mllm (with --model), or none",
    )
    explore.add_argument("--model", help="checkpoint folder of --retriever clip|mmret-*")
    explore.add_argument("--device", default="cpu", help="device of the search model")
    explore.add_argument("--max-upload-bytes", type=int, default=20_000_000)
    explore.add_argument("--max-upload-pixels", type=int, default=50_000_000)
    explore.set_defaults(handler=cmd_explore)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_explore(args: argparse.Namespace) -> int:
    import uvicorn

    from megapairs.explore.app import ExplorerSettings, create_app

    run = RunDir(args.run)
    if not run.manifest_path.exists():
        raise FileNotFoundError(f"no run at {args.run} (no manifest.json)")
    loopback = is_loopback(args.host)
    settings = ExplorerSettings(
        token=args.token or secrets.token_urlsafe(24),
        token_everywhere=not loopback,
        loopback=loopback,
        user=args.user or default_user(),
        max_upload_bytes=args.max_upload_bytes,
        max_upload_pixels=args.max_upload_pixels,
    )
    settings.engine, settings.search_off_reason = _search_engine(run, args)
    app = create_app(run, settings)
    sock = _bind(args.host, args.port)
    if settings.engine is None:
        print(f"explorer: search is off ({settings.search_off_reason})", flush=True)
    print(f"explorer: {_address(sock, args.host, settings, loopback)}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


def _search_engine(run: RunDir, args: argparse.Namespace) -> tuple[Any, str]:
    if args.retriever == "none":
        return None, "started with --retriever none"
    if args.retriever != "channels" and not args.model:
        raise ValueError(f"--retriever {args.retriever} needs --model PATH")
    from megapairs.explore.search import build_search_engine

    try:
        engine = build_search_engine(run, args.retriever, args.model, device=args.device)
    except (ValueError, LookupError, OSError) as err:
        return None, str(err)
    return engine, ""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, as uvicorn's own bind: asyncio sets TCP_NODELAY only on such sockets, and
    # without it every keep-alive answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket, host: str, settings: Any, loopback: bool) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    return url if loopback else f"{url}?token={settings.token}"
