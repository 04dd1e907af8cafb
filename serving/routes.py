"""The routes beside BentoML's APIs: the page, /info, thumbnails and the index as a live collection.

Mounted at / as one Starlette app (``PAGE``); keys and CORS are ``serving.auth``, the middleware order
``serving.service``::

    GET    /                           the page (serving/web/), /web/* its files, /docs BentoML's Swagger UI
    GET    /info                       what the page shows: model, backend, index, limits, the caller's key scope
    GET    /items/{id}                 the item: path (relative to the indexed folders), label, tags, added
    GET    /items/{id}/similar?k=&where=&min_score=   "more like this": neighbours of its stored vector
    GET    /items/{id}/thumbnail       a small PNG (also at /thumbnail/{id}, the URL answers give)
    POST   /items                      images (multipart or JSON base64) + label / tags: embed and add (write key)
    DELETE /items/{id}                 remove (write key)
    GET    /duplicates?threshold=&limit=   groups of near-copies (cached per threshold; a new scan while one runs or
                                       has just run is a 429 with Retry-After: serving.index_access)

Every route goes through ``handled``: the one mapping from exceptions to answers (``serving.errors``). The index
is reached only through the worker's ``serving.index_access.IndexAccess``: reads see every committed write, and
writes wait for the index's lock (see there).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Awaitable, Callable
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serving.bentoml_workarounds import swagger_page
from serving.environment import LIMITS
from serving.errors import RequestError, client_error
from serving.images import Upload, parse_request
from serving.params import (
    only,
    parse_id,
    parse_k,
    parse_label,
    parse_min_score,
    parse_tags,
    parse_threshold,
    parse_where_off_loop,
    per_image,
)

if TYPE_CHECKING:
    from serving.index_access import IndexAccess

WEB = Path(__file__).parent / "web"
THUMBNAIL_SIZE = 128
DUPLICATE_GROUPS = 50


class Front(Protocol):
    """What the routes use of the front service (``serving.service.MAEService``) of the worker serving them."""

    index_access: IndexAccess

    async def embeddings(self, uploads: list[Upload]) -> np.ndarray: ...

    async def info(self) -> dict[str, Any]: ...

    def key_scope(self, authorization: str | None) -> str | None: ...


def _front() -> Front:
    return bentoml.get_current_service()


def handled(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A route whose errors a client can act on (``serving.errors.client_error``) answer ``{"error": message}``
    with their status; anything else is a bug and stays a 500."""

    @functools.wraps(route)
    async def answered(request: Request) -> Response:
        try:
            return await route(request)
        except Exception as e:
            answer = client_error(e)
            if answer is None:
                raise
            return JSONResponse({"error": answer.message}, status_code=answer.status, headers=answer.headers)

    return answered


# ----------------------------------------------------------------------------------------------- the page


async def page(_: Request) -> Response:
    return FileResponse(WEB / "index.html", media_type="text/html")


@handled
async def info(request: Request) -> Response:
    front = _front()
    answer = await front.info()
    answer["auth"]["scope"] = front.key_scope(request.headers.get("authorization"))  # what the page may offer
    return JSONResponse(answer)


@handled
async def thumbnail(request: Request) -> Response:
    """A PNG of an indexed item, at most THUMBNAIL_SIZE pixels a side; only ids in the catalogue are served."""
    item_id = parse_id(request.path_params["item_id"])
    access = _front().index_access
    if not access.loaded:
        raise RequestError("this server has no index", HTTPStatus.NOT_FOUND)
    row = await access.row(item_id)
    png = await anyio.to_thread.run_sync(_thumbnail_png, item_id, row.path)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@lru_cache(maxsize=1024)
def _thumbnail_png(item_id: int, path: str) -> bytes:
    from mae.images import ImageError, read_image
    from mae.visualize import thumbnail as picture

    try:
        im = picture(read_image(path), THUMBNAIL_SIZE)
    except ImageError as e:
        raise RequestError(f"item {item_id}: {e}", HTTPStatus.NOT_FOUND) from e
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- items


@handled
async def get_item(request: Request) -> Response:
    access = _front().index_access
    row = await access.row(parse_id(request.path_params["item_id"]))
    return JSONResponse(access.item_json(row))


@handled
async def similar(request: Request) -> Response:
    access = _front().index_access
    item_id = parse_id(request.path_params["item_id"])
    query = request.query_params
    only(query, ("k", "where", "min_score"), "k, where (repeatable), min_score")
    k, where = parse_k(query.get("k")), await parse_where_off_loop(query.getlist("where"))
    min_score = parse_min_score(query.get("min_score"))
    found = await access.similar(item_id, k, where, min_score)
    row, hits = found.value
    return JSONResponse({"item": access.item_json(row), "neighbours": [access.hit_json(h) for h in hits],
                         "index_count": found.count, "generation": found.generation})


@handled
async def add_items(request: Request) -> Response:
    front = _front()
    access = front.index_access
    access.require()  # before the body is read
    parsed = await parse_request(request, LIMITS, allow_k=False, extra=("label", "tags"))
    n = len(parsed.uploads)

    def fields() -> tuple[list[str | None], list[dict[str, str] | None]]:  # up to an image's worth of JSON each
        return (per_image("label", parsed.fields.get("label"), n, parse_label),
                per_image("tags", parsed.fields.get("tags"), n, parse_tags))

    labels, tags = await anyio.to_thread.run_sync(fields)  # checked before anything is embedded or stored
    vectors = await front.embeddings(parsed.uploads)  # (N, D); bad images are 4xx here
    found = await access.add(parsed.uploads, vectors, labels, tags)
    return JSONResponse({"added": [access.item_json(row) for row in found.value.rows],
                         "duplicates": [{"image": image, "id": holder} for image, holder in found.value.duplicates],
                         "count": found.count, "generation": found.generation})


@handled
async def delete_item(request: Request) -> Response:
    found = await _front().index_access.remove(parse_id(request.path_params["item_id"]))
    return JSONResponse({"removed": found.value, "count": found.count, "generation": found.generation})


@handled
async def duplicates(request: Request) -> Response:
    from retrieval.index import DUPLICATE_THRESHOLD

    access = _front().index_access
    query = request.query_params
    only(query, ("threshold", "limit"), "threshold and limit")
    threshold = parse_threshold(query.get("threshold"), DUPLICATE_THRESHOLD)
    limit = parse_k(query.get("limit"), DUPLICATE_GROUPS) if query.get("limit") else DUPLICATE_GROUPS
    found = await access.duplicates(threshold, limit, client=request.client.host if request.client else "?")
    groups, total = found.value
    return JSONResponse({"threshold": threshold,
                         "groups": [[dict(access.item_json(row), score=s) for row, s in g] for g in groups],
                         "total_groups": total, "index_count": found.count, "generation": found.generation})


ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/docs", swagger_page, methods=["GET"]),
    Mount("/web", StaticFiles(directory=WEB), name="web"),
    Route("/thumbnail/{item_id}", thumbnail, methods=["GET"]),
    Route("/items", add_items, methods=["POST"]),
    Route("/items/{item_id}", get_item, methods=["GET"]),
    Route("/items/{item_id}", delete_item, methods=["DELETE"]),
    Route("/items/{item_id}/similar", similar, methods=["GET"]),
    Route("/items/{item_id}/thumbnail", thumbnail, methods=["GET"]),
    Route("/duplicates", duplicates, methods=["GET"]),
]
PAGE = Starlette(routes=ROUTES)
