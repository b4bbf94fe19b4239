"""The explorer's search endpoints over a `SearchEngine` chosen at start-up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from pydantic import BaseModel, Field

from megapairs.explore.view import RunView

UPLOAD_SLACK = 64 * 1024  # multipart headers and fields around the file


class SearchRequest(BaseModel):
    """A composed query: a corpus image (by record id), an instruction, or both."""

    image_id: int | None = Field(None, ge=0)
    text: str = Field("", max_length=1000)
    k: int = Field(20, ge=1, le=1000)


def register_search_routes(app: FastAPI, view: RunView, settings: Any) -> None:
    """`/api/search/status`, `/api/search/build`, `/api/search`, `/api/search/upload`."""

    def engine() -> Any:
        if settings.engine is None:
            raise HTTPException(409, f"search is off: {settings.search_off_reason}")
        return settings.engine

    @app.get("/api/search/status", summary="the retriever and the state of its gallery")
    def status() -> dict[str, Any]:
        if settings.engine is None:
            return {"enabled": False, "state": "off", "reason": settings.search_off_reason}
        return settings.engine.describe()

    @app.post("/api/search/build", status_code=202, summary="embed the gallery (once)")
    def build() -> dict[str, Any]:
        chosen = engine()
        chosen.start_build()
        return chosen.describe()

    @app.post("/api/search", summary="top-k corpus images for a record id and/or a text")
    def search(body: SearchRequest) -> dict[str, Any]:
        return _answer(view, engine(), body.image_id, None, body.text, body.k)

    @app.post("/api/search/upload", summary="top-k corpus images for an uploaded image")
    async def upload(
        request: Request,
        image: UploadFile = File(...),  # noqa: B008 (FastAPI's way of declaring a file field)
        text: str = Form(""),
        k: int = Form(20, ge=1, le=1000),
    ) -> dict[str, Any]:
        from megapairs.explore.search import NotAnImage, UploadTooLarge, decode_upload

        chosen = engine()
        data = await image.read(settings.max_upload_bytes + 1)
        try:
            decoded = decode_upload(
                data,
                max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_upload_pixels,
            )
        except UploadTooLarge as err:
            raise HTTPException(413, str(err)) from None
        except NotAnImage as err:
            raise HTTPException(415, str(err)) from None
        return await asyncio.to_thread(_answer, view, chosen, None, decoded, text, k)


def _answer(
    view: RunView, engine: Any, image_id: int | None, image: Any, text: str, k: int
) -> dict[str, Any]:
    from megapairs.explore.search import SearchInputError, SearchNotReady

    started = time.perf_counter()
    try:
        hits = engine.search(image_id=image_id, image=image, text=text, k=k)
    except SearchNotReady:
        raise HTTPException(
            409, "the search gallery is not built yet: POST /api/search/build"
        ) from None
    except SearchInputError as err:
        raise HTTPException(400, str(err)) from None
    results = []
    for hit in hits:
        record = view.record(hit.id)
        results.append({"id": hit.id, "score": round(float(hit.score), 6), **_caption(record)})
    return {
        "retriever": engine.describe()["retriever"],
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
        "query": {"image_id": image_id, "text": text, "uploaded": image is not None},
        "results": results,
    }


def _caption(record: dict[str, Any]) -> dict[str, Any]:
    return {"caption": record.get("caption"), "uri": record.get("uri")}
