"""The index as a live collection over HTTP: items by id, "more like this", writes, near-duplicates.

Routes (mounted beside the page; keys and CORS are ``serving.auth``)::

    GET    /items/{id}                 the item: path (relative to the indexed folders), label, tags, added
    GET    /items/{id}/similar?k=&where=&min_score=   "more like this": neighbours of its stored vector
    GET    /items/{id}/thumbnail       a small PNG (as /thumbnail/{id})
    POST   /items                      images (multipart or JSON base64) + label / tags: embed and add (write key)
    DELETE /items/{id}                 remove (write key)
    GET    /duplicates?threshold=&limit=   groups of near-copies

**Writes** go through the same generation commits as ``mae index add|remove`` and take the same
``INDEX/.lock``: one writer at a time across the CLI and every worker of every server; a write that cannot get
the lock within ``MAE_WRITE_WAIT_S`` seconds (10) answers 409 (nothing changed; try again). Images are embedded
before the lock is taken, so the lock is held only for the commit. Uploaded files are stored in ``INDEX/uploads/`` under
their sha256 (the catalogue points at them, thumbnails read them); a file the same bytes were already indexed
under is not stored again, and the answer names the item that holds them.

**Readers see writes at once.** Every read (search, item, similar, thumbnail, duplicates) first compares the
manifest's ``stat`` with the one its worker loaded (one system call), and reloads on a change. A write's 200
is sent after its commit, so any read that starts after that 200, in any worker, sees the write: the bound is
the reload itself (reading the index file: milliseconds for thousands of items, about a second per GB).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any

from bentoml.exceptions import BentoMLException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mae.files import write_bytes_atomic
from serving.images import MAX_K, Upload, parse_request

MAX_WHERE = 16
DUPLICATE_GROUPS = 50
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ItemError(Exception):
    """A request the item routes answer with a 4xx (or 503) and a message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Items:
    """The item routes' state in one front worker: the index (shared with /search), a writer thread, caches."""

    def __init__(self, service: Any, limits: Any, absolute_paths: bool = False, write_wait_s: float = 10.0) -> None:
        self.service = service
        self.limits = limits  # serving.settings.Limits: what one request may carry
        self.absolute_paths = absolute_paths
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-index-write")
        self._slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-duplicates")
        self._duplicates: dict[tuple[int, float], list] = {}
        if service.index is not None:
            service.index.lock_timeout = write_wait_s

    @property
    def index(self) -> Any:
        if self.service.index is None:
            raise ItemError("this server has no index: start it with --index INDEX (mae index build makes one)")
        return self.service.index

    def shown(self, path: str) -> str:
        """A path as answers give it: relative to the indexed folders, absolute only when configured so."""
        return path if self.absolute_paths else self.index.relative(path)

    def item_json(self, row: Any) -> dict[str, Any]:
        return {"id": row.id, "path": self.shown(row.path), "label": row.label, "tags": row.tags or {},
                "added": row.added, "thumbnail": f"/thumbnail/{row.id}", "similar": f"/items/{row.id}/similar"}

    def hit_json(self, hit: Any) -> dict[str, Any]:
        return {"id": hit.id, "score": hit.score, "path": self.shown(hit.path), "label": hit.label,
                "tags": hit.tags or {}, "thumbnail": f"/thumbnail/{hit.id}"}

    # ------------------------------------------------------------------ threads

    async def read(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the index thread after picking up any committed write (see the module docstring)."""
        index = self.index

        def fresh() -> Any:
            index.reload()
            return fn(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self.service._index_thread, fresh)

    async def write(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # ------------------------------------------------------------------ writes (on the writer thread)

    def add(self, uploads: list[Upload], vectors: Any, labels: list[str | None],
            tags: list[dict[str, str] | None]) -> dict[str, Any]:
        from retrieval.catalog import Item

        index = self.index
        folder = index.uploads
        items, files = [], []
        for upload, label, tag in zip(uploads, labels, tags):
            sha = hashlib.sha256(upload.data).hexdigest()
            path = folder / f"{sha[:16]}-{_file_name(upload)}"
            items.append(Item(str(path), sha, label, tag))
            files.append(path)
        written = []
        known = index.ids_by_sha256([it.sha256 for it in items])
        stored = set(known)  # bytes the index or an earlier upload of this request already holds
        for it, path, upload in zip(items, files, uploads):
            if it.sha256 not in stored and not path.exists():
                folder.mkdir(exist_ok=True)
                write_bytes_atomic(path, upload.data)
                written.append(path)
            stored.add(it.sha256)
        try:
            result = index.add(vectors, items)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        with index.lock:
            rows = index.rows(result.ids)
            added = {rows[i].sha256: i for i in result.ids}
            later = index.ids_by_sha256([it.sha256 for it in items if it.sha256 not in known and
                                         it.sha256 not in added])
            # a writer elsewhere indexed the same bytes first: its item keeps its own file, ours goes
            unused = [p for p in written if not index.ids_by_path([str(p)])]
        for path in unused:
            path.unlink(missing_ok=True)
        duplicates, first = [], set()
        for upload, it in zip(uploads, items):
            if it.sha256 in added and it.sha256 not in first:
                first.add(it.sha256)
                continue
            holder = known.get(it.sha256) or added.get(it.sha256) or later.get(it.sha256)
            duplicates.append({"image": upload.label, "id": holder})
        return {"added": [self.item_json(rows[i]) for i in result.ids], "duplicates": duplicates,
                "count": index.count, "generation": index.generation}

    def remove(self, item_id: int) -> dict[str, Any]:
        index = self.index
        result = index.remove([item_id])
        if not result.ids:
            raise ItemError(f"no item {item_id} in the index", 404)
        folder = index.uploads
        for path in result.paths:
            p = Path(path)
            if p.parent == folder and not index.ids_by_path([path]):
                p.unlink(missing_ok=True)  # the stored upload; a collection's own files are never deleted
        return {"removed": result.ids, "count": index.count, "generation": index.generation}


def damaged_message(e: Exception) -> str:
    """What a client is told about a damaged index: the part and the way out, not the server's paths (those go
    to the log, once)."""
    import logging

    logging.getLogger("mae.serving").error("%s", e)
    text = str(e).split("; run `mae index check")[0]
    text = re.sub(r"(/[^\s;:,()']+)+/([^/\s;:,()']+)", r"\2", text)  # /srv/index/items.sqlite -> items.sqlite
    return f"the index cannot be used: {text}; the operator must run `mae index check` on the server (--repair)"


# ----------------------------------------------------------------------------------------------- parsing


def parse_id(text: str) -> int:
    if not re.fullmatch(r"\d{1,30}", text):
        raise ItemError(f"item ids are whole numbers, got {text[:40]!r}")
    return int(text)


def parse_k(value: Any, default: int = 10) -> int:
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,4}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise ItemError(f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    return value


def parse_where(values: Any) -> list[str]:
    """``where`` as a list of condition strings (one string, a list, or repeated form/query fields), validated."""
    from retrieval.catalog import parse_filters

    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ItemError('"where" is a list of conditions like ["label=cat", "tag.camera=X100"]')
    if len(values) > MAX_WHERE:
        raise ItemError(f"at most {MAX_WHERE} conditions in 'where', got {len(values)}")
    try:
        parse_filters(values)
    except ValueError as e:
        raise ItemError(str(e)) from None
    return values


def parse_min_score(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        if len(value) != 1:
            raise ItemError("give min_score once")
        value = value[0]
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ItemError(f"min_score must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(score):
        raise ItemError(f"min_score must be a finite number, got {value!r}")
    return score


def per_image(name: str, values: Any, n: int, parse: Any) -> list[Any]:
    """A field given once (for every image) or once per image, in image order."""
    if values is None:
        return [None] * n
    if not isinstance(values, list):
        values = [values]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ItemError(f"give '{name}' once (for every image) or once per image: {len(values)} for {n} images")
    return [parse(v) for v in values]


def _label(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise ItemError("a label is text of at most 200 characters")
    return value


def _tags(value: Any) -> dict[str, str] | None:
    from retrieval.catalog import _clean_tags

    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ItemError('tags are a JSON object like {"camera": "X100"}') from None
    if not isinstance(value, dict) or len(value) > 64:
        raise ItemError('tags are a JSON object of at most 64 name: value pairs, like {"camera": "X100"}')
    try:
        return _clean_tags(value)
    except ValueError as e:
        raise ItemError(str(e)) from None


def _file_name(upload: Upload) -> str:
    """A safe file name for a stored upload: the client's, cleaned, or ``image.<format>``."""
    name = _SAFE.sub("_", Path(upload.filename).name).strip("._")[-80:] if upload.filename else ""
    if "." not in name:
        from PIL import Image

        try:
            fmt = (Image.open(io.BytesIO(upload.data)).format or "bin").lower()
        except Exception:  # noqa: BLE001 - decoding was checked before; only the extension is at stake
            fmt = "bin"
        name = f"{name or 'image'}.{'jpg' if fmt == 'jpeg' else fmt}"
    return name


# ----------------------------------------------------------------------------------------------- routes


def _items(request: Request) -> Items:
    import bentoml

    return bentoml.get_current_service().items


async def _answer(work: Any) -> Response:
    """Run a route's work; ItemError and BentoML's input errors become their 4xx, a damaged index a 503."""
    from retrieval.index import IndexBusyError, IndexDamagedError

    try:
        return await work()
    except ItemError as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
    except BentoMLException as e:
        return JSONResponse({"error": e.message}, status_code=int(e.error_code))
    except IndexBusyError as e:
        return JSONResponse({"error": str(e)}, status_code=HTTPStatus.CONFLICT)
    except IndexDamagedError as e:
        return JSONResponse({"error": damaged_message(e)}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    except KeyError as e:
        return JSONResponse({"error": str(e.args[0]) if e.args else "no such item"}, status_code=404)


async def get_item(request: Request) -> Response:
    async def work() -> Response:
        items = _items(request)
        item_id = parse_id(request.path_params["item_id"])
        row = await items.read(items.index.row, item_id)
        if row is None:
            raise ItemError(f"no item {item_id} in the index", 404)
        return JSONResponse(items.item_json(row))

    return await _answer(work)


async def similar(request: Request) -> Response:
    async def work() -> Response:
        items = _items(request)
        item_id = parse_id(request.path_params["item_id"])
        query = request.query_params
        unknown = sorted(set(query) - {"k", "where", "min_score"})
        if unknown:
            raise ItemError(f"unknown parameter(s) {unknown}; this endpoint takes k, where (repeatable), min_score")
        k, where = parse_k(query.get("k")), parse_where(query.getlist("where"))
        min_score = parse_min_score(query.get("min_score"))

        def run() -> tuple[Any, list[Any]]:
            row = items.index.row(item_id)
            if row is None:
                raise ItemError(f"no item {item_id} in the index", 404)
            return row, items.index.similar(item_id, k, where=where, min_score=min_score)

        row, hits = await items.read(run)
        return JSONResponse({"item": items.item_json(row), "neighbours": [items.hit_json(h) for h in hits],
                             "index_count": items.index.count, "generation": items.index.generation})

    return await _answer(work)


async def thumbnail(request: Request) -> Response:
    async def work() -> Response:
        import bentoml

        item_id = parse_id(request.path_params["item_id"])
        try:
            png = await bentoml.get_current_service().thumbnail(item_id)
        except LookupError as e:
            raise ItemError(str(e), 404) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return await _answer(work)


async def add_items(request: Request) -> Response:
    async def work() -> Response:
        import bentoml

        service = bentoml.get_current_service()
        items = service.items
        items.index  # noqa: B018 - 400 before reading the body when there is no index
        parsed = await parse_request(request, items.limits, allow_k=False, extra=("label", "tags"))
        n = len(parsed.uploads)
        labels = per_image("label", parsed.fields.get("label"), n, _label)
        tags = per_image("tags", parsed.fields.get("tags"), n, _tags)
        vectors = (await service._vectors(parsed.uploads))[:, : service.dim]  # (N, D); bad images are 4xx here
        return JSONResponse(await items.write(items.add, parsed.uploads, vectors, labels, tags))

    return await _answer(work)


async def delete_item(request: Request) -> Response:
    async def work() -> Response:
        items = _items(request)
        item_id = parse_id(request.path_params["item_id"])
        return JSONResponse(await items.write(items.remove, item_id))

    return await _answer(work)


async def duplicates(request: Request) -> Response:
    async def work() -> Response:
        from retrieval.index import DUPLICATE_THRESHOLD

        items = _items(request)
        query = request.query_params
        unknown = sorted(set(query) - {"threshold", "limit"})
        if unknown:
            raise ItemError(f"unknown parameter(s) {unknown}; this endpoint takes threshold and limit")
        threshold = parse_min_score(query.get("threshold"))
        threshold = DUPLICATE_THRESHOLD if threshold is None else threshold
        if not -1.0 <= threshold <= 1.0:
            raise ItemError(f"threshold is a cosine in [-1, 1], got {threshold}")
        limit = parse_k(query.get("limit"), DUPLICATE_GROUPS) if query.get("limit") else DUPLICATE_GROUPS
        index = await items.read(lambda: items.index)
        key = (index.generation, threshold)
        groups = items._duplicates.get(key)
        if groups is None:  # the whole index is scanned: off the index thread, once per generation
            groups = await asyncio.get_running_loop().run_in_executor(items._slow, index.duplicates, threshold)
            items._duplicates = {key: groups}
        rows = await items.read(index.rows, [i for g in groups[:limit] for i, _ in g])
        out = [[dict(items.item_json(rows[i]), score=s) for i, s in g if i in rows] for g in groups[:limit]]
        return JSONResponse({"threshold": threshold, "groups": out, "total_groups": len(groups),
                             "index_count": index.count, "generation": index.generation})

    return await _answer(work)


ROUTES = [
    Route("/items", add_items, methods=["POST"]),
    Route("/items/{item_id}", get_item, methods=["GET"]),
    Route("/items/{item_id}", delete_item, methods=["DELETE"]),
    Route("/items/{item_id}/similar", similar, methods=["GET"]),
    Route("/items/{item_id}/thumbnail", thumbnail, methods=["GET"]),
    Route("/duplicates", duplicates, methods=["GET"]),
]
