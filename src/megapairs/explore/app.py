"""The explorer's FastAPI app: the page, its JSON API and the security checks around both.

Every endpoint answers a clear 4xx with `{"detail": "..."}` for bad input; an unexpected
error in one request is a 500 for that request only, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from megapairs.dataset.flags import REASONS, FlagError
from megapairs.explore.images import ImageNotFound, ImageUndecodable, RecordImages
from megapairs.explore.index import FilterError
from megapairs.explore.view import RunView, UnknownPair
from megapairs.runs import RunDir

TOKEN_HEADER = "x-megapairs-token"
TOKEN_COOKIE = "megapairs_token"
TOKEN_PLACEHOLDER = "__MEGAPAIRS_TOKEN__"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class ExplorerSettings:
    """How the app guards itself and what it serves."""

    token: str
    token_everywhere: bool = False  # a non-loopback bind: every request carries the token
    loopback: bool = True  # a loopback bind: the Host header must name a loopback address
    user: str = "unknown"
    max_upload_bytes: int = 20_000_000
    max_upload_pixels: int = 50_000_000
    engine: Any = None  # a megapairs.explore.search.SearchEngine, or None: search is off
    search_off_reason: str = "start the explorer with --retriever to search"
    extra: dict[str, Any] = field(default_factory=dict)


class FlagRequest(BaseModel):
    """A flag or unflag of a pair, or of one of its instructions."""

    pair_id: str = Field(max_length=64)
    instruction_index: int | None = Field(None, ge=0, le=10_000)
    reason: str = Field(min_length=1, max_length=200)
    action: Literal["flag", "unflag"] = "flag"


def create_app(run: RunDir, settings: ExplorerSettings) -> FastAPI:
    """The explorer over `run`."""
    app = FastAPI(
        title="megapairs explorer",
        description="See, search and curate a MegaPairs run's triplets.",
        docs_url=None,
        redoc_url=None,
    )
    view, images = RunView(run), RecordImages(run)
    threading.Thread(target=view.warm, name="explore-warm", daemon=True).start()
    app.state.settings = settings
    app.add_middleware(GuardMiddleware, settings=settings)
    _mount_assets(app)
    _page_routes(app, settings)
    _data_routes(app, view, images)
    _flag_routes(app, view, settings)
    _search_routes(app, view, settings)
    return app


# security -------------------------------------------------------------------------


class GuardMiddleware(BaseHTTPMiddleware):
    """Host check on loopback binds, the token where required, same-origin writes."""

    def __init__(self, app: Any, settings: ExplorerSettings) -> None:
        super().__init__(app)
        self.settings = settings

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        refusal = self._refusal(request)
        if refusal is not None:
            status, detail = refusal
            return JSONResponse({"detail": detail}, status_code=status)
        response = await call_next(request)
        if request.query_params.get("token") and self._token_ok(request.query_params["token"]):
            response.set_cookie(TOKEN_COOKIE, self.settings.token, httponly=True, samesite="strict")
        return response

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        host = _host_name(request.headers.get("host", ""))
        if self.settings.loopback and host not in LOOPBACK_NAMES:
            return 403, f"this explorer only answers requests addressed to 127.0.0.1, not {host!r}"
        header = request.headers.get(TOKEN_HEADER)
        if self.settings.token_everywhere:
            offered = (
                header or request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token")
            )
            if not self._token_ok(offered):
                return 401, "a valid token is required: open the address the server printed"
        if request.method in UNSAFE_METHODS:
            too_big = self._body_refusal(request)
            if too_big is not None:
                return too_big
            if not self._token_ok(header):
                return 403, f"writes need the page's token in the {TOKEN_HEADER} header"
            origin = request.headers.get("origin")
            expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if origin is not None and origin != expected:
                return 403, f"cross-origin write refused (origin {origin!r})"
        return None

    def _body_refusal(self, request: Request) -> tuple[int, str] | None:
        """Refuse a body too large for any endpoint before it is read."""
        length = request.headers.get("content-length")
        if length is None:
            if request.headers.get("transfer-encoding"):
                return 411, "send a Content-Length with the request body"
            return None
        if not length.isdigit():
            return 400, "Content-Length is not a number"
        limit = self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        if int(length) > limit:
            return 413, f"the request body is {int(length)} bytes; the limit is {limit}"
        return None

    def _token_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered, self.settings.token)


def _host_name(host: str) -> str:
    """The name in a Host header, without the port (IPv6 in brackets too)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


# routes ---------------------------------------------------------------------------


def _mount_assets(app: FastAPI) -> None:
    static = resources.files("megapairs.explore") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    try:
        import swagger_ui_bundle

        app.mount("/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path))
    except ImportError:  # the docs page then names the missing package
        pass


def _page_routes(app: FastAPI, settings: ExplorerSettings) -> None:
    page = (resources.files("megapairs.explore") / "static" / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        html = page.replace(TOKEN_PLACEHOLDER, settings.token)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="megapairs explorer API",
            swagger_js_url="/swagger/swagger-ui-bundle.js",
            swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="/swagger/favicon-32x32.png",
        )


def _data_routes(app: FastAPI, view: RunView, images: RecordImages) -> None:
    @app.get("/api/overview", summary="counts, rejects, histograms and flags of the run")
    def overview() -> dict[str, Any]:
        return view.overview()

    @app.get(
        "/api/pairs",
        summary="one page of pairs",
        description="Filters: channel (repeatable), combo (a+b), score (CHANNEL:LOW:HIGH, "
        "repeatable), backend, min_instructions, max_instructions, q (instruction text), "
        "status (annotated|failed|pending), failure, flagged (yes|no); sort: order, "
        "instructions or score:CHANNEL, '-' to reverse; offset, limit (<= 500).",
    )
    def pairs(request: Request) -> dict[str, Any]:
        params: dict[str, list[str]] = {}
        for key, value in request.query_params.multi_items():
            params.setdefault(key, []).append(value)
        try:
            return view.pairs(params)
        except FilterError as err:
            raise HTTPException(400, str(err)) from None

    @app.get("/api/pairs/{pair_id}", summary="one pair with everything known about it")
    def pair(pair_id: str) -> dict[str, Any]:
        try:
            return view.pair(pair_id)
        except UnknownPair as err:
            raise HTTPException(404, err.args[0]) from None

    @app.get(
        "/api/image/{record_id}",
        summary="a record's image by id",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}},
    )
    def image(record_id: int, size: Literal["thumb", "full"] = "thumb") -> Response:
        try:
            if size == "thumb":
                return Response(images.thumbnail(record_id), media_type="image/jpeg")
            data, kind = images.full(record_id)
            return Response(data, media_type=kind)
        except ImageNotFound as err:
            raise HTTPException(404, str(err)) from None
        except ImageUndecodable as err:
            raise HTTPException(422, str(err)) from None


def _flag_routes(app: FastAPI, view: RunView, settings: ExplorerSettings) -> None:
    @app.get("/api/flags", summary="flag events and who flagged what")
    def flags() -> dict[str, Any]:
        events = [e.as_dict() for e in view.flags.events()]
        return {"events": events, "summary": view.flags.active().summary(), "reasons": REASONS}

    @app.post("/api/flags", status_code=201, summary="flag or unflag a pair or an instruction")
    def add_flag(body: FlagRequest) -> dict[str, Any]:
        try:
            listed = view.instructions(body.pair_id)
        except UnknownPair as err:
            raise HTTPException(404, err.args[0]) from None
        text = None
        if body.instruction_index is not None:
            if body.instruction_index >= len(listed):
                raise HTTPException(
                    400,
                    f"pair {body.pair_id} has {len(listed)} instructions, "
                    f"no index {body.instruction_index}",
                )
            text = listed[body.instruction_index]
        try:
            event = view.flags.add(
                body.pair_id,
                body.reason,
                settings.user,
                instruction_index=body.instruction_index,
                instruction=text,
                action=body.action,
            )
        except FlagError as err:
            raise HTTPException(400, str(err)) from None
        return {"event": event.as_dict(), "summary": view.flags.active().summary()}


def _search_routes(app: FastAPI, view: RunView, settings: ExplorerSettings) -> None:
    from megapairs.explore.search_api import register_search_routes

    register_search_routes(app, view, settings)
