"""The BentoML service: ``POST /embed``, ``/classify``, ``/search``, the page at ``GET /``, thumbnails.

Two BentoML services, composed the way BentoML runs models with pre-processing:

- ``MAEService`` (the front, bound to the port): parses and validates uploads, decodes and preprocesses them in
  threads, asks the encoder for vectors, searches the index, renders JSON; it also serves the page.
- ``EncoderService`` (a dependency, its own process): holds the model (``Embedder``, backend picked once at start) and
  exposes one batchable API over decoded, preprocessed ``float32 (N, C, H, W)`` arrays. Concurrent requests from
  the front are merged there by BentoML's adaptive batching (CorkDispatcher): arrays, never lists of PIL images.

Start it with ``mae serve --artifact A [--index I]``, or ``MAE_ARTIFACT=A bentoml serve serving.service:MAEService``
(see ``serving.settings`` for every ``MAE_*`` variable). Either way the artifact and every exported file in it are
verified once before any worker starts (``on_deployment``), the server binds loopback unless ``MAE_HOST`` says
otherwise, and ``serving.guard`` checks each request's Host and Origin. A model process that still cannot load
reports why on ``/healthz`` (503) instead of restarting in a loop. The item routes (``/items``, ``/duplicates``) are
in ``serving.items``, API keys and CORS in ``serving.auth``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache, partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serving.auth import Guard
from serving.fair import FairPool
from serving.guard import RequestGuard, install_log_filter
from serving.images import Upload, error, inspect_all, parse_request, preprocess
from serving.items import ROUTES as ITEM_ROUTES
from serving.items import ItemError, Items, damaged_message, parse_min_score, parse_where
from serving.settings import Limits, Settings, var

log = logging.getLogger("mae.serving")

SETTINGS = Settings.from_env()
LIMITS = Limits.from_env()
WEB = Path(__file__).parent / "web"
THUMBNAIL_SIZE = 128
# Decode jobs over this many pixels (a 2000x2000 photo) may not hold every decode thread at once (serving.fair).
HEAVY_IMAGE_PIXELS = 4_000_000
# Fair-queueing cost of an image besides its pixels, so that tiny images are not free: about a 64x64 decode.
IMAGE_OVERHEAD_PIXELS = 4096
# How long /healthz and /readyz wait for the model process to answer before calling it still loading.
MODEL_CHECK_S = 2.0

# Where a request's time goes; scraped from /metrics by bench/serving.py. BentoML gathers the metrics of all
# service processes (front and encoder) into the front's /metrics.
_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DECODE_SECONDS = bentoml.metrics.Histogram(
    name="mae_decode_seconds", documentation="Per request: parse-to-pixels time (decode, convert, resize, normalise)",
    buckets=_TIME_BUCKETS)
ENCODER_SECONDS = bentoml.metrics.Histogram(
    name="mae_encoder_call_seconds", documentation="Per request: waiting for the encoder (queue + transfer + model)",
    buckets=_TIME_BUCKETS)
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="mae_model_batch_seconds", documentation="Per model call: time in the backend", buckets=_TIME_BUCKETS)
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="mae_model_batch_images", documentation="Per model call: images in the batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
IMAGE_MODEL_SECONDS = bentoml.metrics.Counter(
    name="mae_model_image_seconds", documentation="Sum over images of the time of the model call each was part of")


def _require_artifact() -> Path:
    if not SETTINGS.artifact:
        raise RuntimeError(f"no artifact: set {var('artifact')} (mae serve --artifact A does)")
    return Path(SETTINGS.artifact)


# ----------------------------------------------------------------------------------------------- model process


@bentoml.service(name="mae-encoder", workers=1, threads=1, traffic={"timeout": 120})
class EncoderService:
    """The model, loaded once; one model call at a time, batched across requests."""

    def __init__(self) -> None:
        import torch

        from export.runtime import Embedder

        # The model's threads leave the front-end its share of the cores: torch's pool here, onnxruntime's through
        # the Embedder's MAE_ORT_THREADS (which also keeps ORT's threads from spin-waiting on shared cores).
        install_log_filter()
        torch.set_num_threads(SETTINGS.model_threads)
        if SETTINGS.threads:
            os.environ["MAE_ORT_THREADS"] = str(SETTINGS.threads)
        else:
            os.environ.setdefault("MAE_ORT_THREADS", str(SETTINGS.model_threads))
        self.error: str | None = None
        try:
            self.embedder = Embedder.load(_require_artifact(), backend=SETTINGS.backend)
            c, h, w = self.embedder.preprocessing.input_size
            self.embedder.run(np.zeros((1, c, h, w), np.float32))  # warm up: first-call allocations, lazy inits
        except Exception as e:
            # Raising here would make BentoML restart this process in a loop (24 tracebacks in 45 s) while the
            # front answered /healthz 200; instead stay up, unready, and say why on every probe and call.
            self.error = " ".join(f"{type(e).__name__}: {e}".split())
            log.error("the model cannot be loaded: %s", self.error,
                      exc_info=not isinstance(e, (ValueError, OSError, RuntimeError)))  # known file problems: 1 line
            return
        log.info("encoder %s loaded on %s (%d threads, batching %s)", self.embedder.sha256[:12],
                 self.embedder.backend_name, SETTINGS.model_threads,
                 f"up to {SETTINGS.max_batch_size}" if SETTINGS.batching else "off")

    def __is_ready__(self) -> bool:
        return self.error is None

    def __is_alive__(self) -> bool:
        return self.error is None

    @bentoml.api(batchable=SETTINGS.batching, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels float32 (N, C, H, W) -> (N, D [+ K]): embedding, then logits when there is a head."""
        if self.error is not None:
            raise error(f"the model cannot be loaded: {self.error}", HTTPStatus.SERVICE_UNAVAILABLE)
        started = time.perf_counter()
        out = self.embedder.run(pixels)
        seconds = time.perf_counter() - started
        MODEL_SECONDS.observe(seconds)
        BATCH_IMAGES.observe(len(pixels))
        IMAGE_MODEL_SECONDS.inc(seconds * len(pixels))
        parts = [out["embedding"]] + ([out["logits"]] if "logits" in out else [])
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)  # (N, D + K)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """The backend that actually runs the model (chosen at start from what the machine has), or why none can."""
        if self.error is not None:
            return {"backend": None, "error": self.error}
        return {"backend": self.embedder.backend_name, "threads": SETTINGS.model_threads}


# ----------------------------------------------------------------------------------------------- HTTP schema


class ImagesInput(bentoml.IODescriptor):
    """One or more images: multipart ``images`` files, or JSON ``{"images": ["<base64>", ...]}``."""

    images: list[Path] = Field(description="image files (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM); in a JSON body, "
                                           "base64 strings (a data: URL prefix is allowed)")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> ImagesInput:
        # Our own parser instead of BentoML's file fields: limits, formats and 4xx messages are ours (images.py).
        parsed = await parse_request(request, LIMITS, allow_k=False)
        return cls.model_construct(images=parsed.uploads)


class TopKInput(ImagesInput):
    """Images as for /embed, and how many results to return for each."""

    k: int = Field(5, ge=1, le=100, description="results per image")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> TopKInput:
        parsed = await parse_request(request, LIMITS, allow_k=True)
        return cls.model_construct(images=parsed.uploads, k=parsed.k)


class SearchInput(TopKInput):
    """Images and k as for /classify, and optionally a filter on the catalogue and a score cut."""

    where: list[str] = Field(default_factory=list, description='conditions that all hold, e.g. ["label=cat", '
                             '"path^=photos/2024/", "added>=2026-01-01", "tag.camera=X100"]')
    min_score: float | None = Field(None, description="leave out neighbours with a cosine below this")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> SearchInput:
        parsed = await parse_request(request, LIMITS, allow_k=True, extra=("where", "min_score"))
        try:
            where = parse_where(parsed.fields.get("where"))
            min_score = parse_min_score(parsed.fields.get("min_score"))
        except ItemError as e:
            raise error(str(e)) from None
        return cls.model_construct(images=parsed.uploads, k=parsed.k, where=where, min_score=min_score)


class EmbedOutput(BaseModel):
    embeddings: list[list[float]] = Field(description="one L2-normalised vector per image, in request order")
    dim: int
    model: str = Field(description="sha256 of the artifact that computed them")


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ClassifyOutput(BaseModel):
    predictions: list[list[Prediction]] = Field(description="top-k labels per image, most probable first")
    model: str


class Neighbour(BaseModel):
    id: int
    score: float = Field(description="inner product of L2-normalised vectors (cosine similarity)")
    path: str = Field(description="relative to the indexed folders (absolute with MAE_ABSOLUTE_PATHS=1)")
    label: str | None
    tags: dict[str, str] = Field(default_factory=dict, description="the item's free-form tags")
    thumbnail: str = Field(description="URL of a small PNG of the item, served by this API")


class SearchOutput(BaseModel):
    neighbours: list[list[Neighbour]] = Field(description="top-k items per image, most similar first")
    model: str
    index_count: int
    generation: int = Field(0, description="the index generation that answered (every write makes a new one)")


# ----------------------------------------------------------------------------------------------- the page


async def _page(_: Request) -> Response:
    return FileResponse(WEB / "index.html", media_type="text/html")


async def _info(request: Request) -> Response:
    service: MAEService = bentoml.get_current_service()
    try:
        answer = await service.info()
    except RuntimeError as e:
        return _damaged_index(e)
    answer["auth"]["scope"] = service.key_scope(request.headers.get("authorization"))  # what the page may offer
    return JSONResponse(answer)


async def _thumbnail(request: Request) -> Response:
    service: MAEService = bentoml.get_current_service()
    try:
        item_id = int(request.path_params["item_id"])
    except ValueError:
        return JSONResponse({"error": "thumbnail ids are integers"}, status_code=400)
    try:
        png = await service.thumbnail(item_id)
    except LookupError as e:
        return JSONResponse({"error": str(e)}, status_code=404)
    except RuntimeError as e:
        return _damaged_index(e)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def _damaged_index(e: RuntimeError) -> Response:
    """503 naming the problem when the index was damaged while serving; anything else stays an error (500)."""
    from retrieval.index import IndexDamagedError

    if not isinstance(e, IndexDamagedError):
        raise e
    return JSONResponse({"error": damaged_message(e)}, status_code=503)


async def _docs(_: Request) -> Response:
    # BentoML's Swagger UI (normally at /, which the page takes); it reads ./docs.json and ./static_content.
    from _bentoml_impl.server import app as bentoml_app

    return FileResponse(Path(bentoml_app.__file__).parent / "main-openapi.html", media_type="text/html")


PAGE = Starlette(routes=[
    Route("/", _page, methods=["GET"]),
    Route("/info", _info, methods=["GET"]),
    Route("/thumbnail/{item_id}", _thumbnail, methods=["GET"]),
    Route("/docs", _docs, methods=["GET"]),
    Mount("/web", StaticFiles(directory=WEB), name="web"),
    *ITEM_ROUTES,
])


# ----------------------------------------------------------------------------------------------- front


class FlatErrors:
    """ASGI middleware: answer 4xx errors as ``{"error": message}``.

    BentoML 1.4 answers a ``BentoMLException`` with a one-element list ``[{"error": message}]`` but a validation
    error with an object; clients (and the page) get one shape from us. Only 4xx JSON bodies are touched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def send_flat(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                start = message  # held back until the body is known
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
                body = json.dumps(payload[0]).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_flat)


def _keep_one_session(proxy: Any) -> None:
    """Stop BentoML's dependency client from replacing its HTTP session under load.

    BentoML 1.4.30+ (``_bentoml_impl.client.proxy2.SessionManager``) swaps its aiohttp session every 100 requests
    or 5 minutes and closes the old one while calls are still in flight on it, failing them with "Server
    disconnected": 252 of 640 requests from 64 concurrent clients here. One session per worker is what aiohttp
    intends; if BentoML's internals change this does nothing and the retry in ``_call_encoder`` remains.
    """
    manager = getattr(getattr(proxy, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests") and hasattr(manager, "max_age"):
        manager.max_requests = math.inf
        manager.max_age = math.inf
    else:
        log.warning("BentoML's client has no SessionManager to configure; relying on retries")



def _client() -> str:
    """The fairness key of the request being served: its peer address (everyone behind one proxy is one client)."""
    request = bentoml.Context().request
    return request.client.host if request.client else "?"


# Loopback unless MAE_HOST says otherwise (`bentoml serve` and the container read this; --host overrides it). The
# readiness probe is ours (__is_ready__): BentoML's own asks the model process without a deadline while it loads,
# and each such probe then holds the front's shutdown open for good.
@bentoml.asgi_app(PAGE, path="/", name="page")
@bentoml.service(name="mae", workers=SETTINGS.workers, traffic={"timeout": 120}, envs=[{"name": "MAE_ARTIFACT"}],
                 http={"host": SETTINGS.host}, runner_probe={"enabled": False})
class MAEService:
    """Embeddings, classification and search by image for one artifact (and optionally one index)."""

    encoder = bentoml.depends(EncoderService)

    @bentoml.on_deployment
    def verify_artifact() -> None:
        """Once, before any worker starts: a damaged artifact stops ``bentoml serve`` here with one line naming the
        file (``mae serve`` checks the same before it starts BentoML)."""
        from export.runtime import verify_artifact

        try:
            verify_artifact(_require_artifact())
        except (ValueError, OSError, RuntimeError) as e:
            print(f"mae serve: error: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(1) from None

    def __init__(self) -> None:
        import torch

        from mae.artifact import read_config
        from mae.data import Preprocessing

        install_log_filter()
        torch.set_num_threads(1)  # many small per-image resizes in parallel threads, not one large one
        path = _require_artifact()
        self.config = read_config(path)
        self.sha256: str = self.config["sha256"]
        self.dim = int(self.config["embed_dim"])
        self.labels: list[str] | None = self.config.get("labels")
        self.preprocessing = Preprocessing.from_dict(self.config["preprocessing"])
        # Every index call runs on one thread that also opened it: the catalogue is SQLite, whose connections
        # belong to the thread that made them, and FAISS parallelises a search internally anyway.
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-index")
        self.index = None
        if SETTINGS.index:
            from retrieval.index import Index

            self.index = self._index_thread.submit(Index.open, SETTINGS.index, artifact_sha256=self.sha256).result()
        self._decoder = FairPool(max(2, SETTINGS.model_threads), HEAVY_IMAGE_PIXELS)
        self._backend: dict[str, Any] | None = None
        self.items = Items(self, LIMITS, absolute_paths=SETTINGS.absolute_paths, write_wait_s=SETTINGS.write_wait_s)
        _keep_one_session(self.encoder)

    # ------------------------------------------------------------------ health

    async def _model_status(self) -> dict[str, Any] | None:
        """The model process's ``describe()`` (its backend, or the error that keeps it from loading); None while it
        does not answer within MODEL_CHECK_S (still loading)."""
        import aiohttp
        from bentoml.exceptions import BentoMLException

        try:
            status = await asyncio.wait_for(self.encoder.to_async.describe(), MODEL_CHECK_S)
        except (asyncio.TimeoutError, aiohttp.ClientError, BentoMLException, OSError):
            return None
        if not status.get("error"):
            self._backend = status
        return status

    async def __is_alive__(self) -> bool:
        """/healthz: dead when the model process reports that it cannot load the model (a restart may help)."""
        status = await self._model_status()
        if status is not None and status.get("error"):
            log.error("unhealthy: the model cannot be loaded: %s", status["error"])
            return False
        return True

    async def __is_ready__(self) -> bool:
        """/readyz: the model process answers and has its model."""
        status = await self._model_status()
        return status is not None and not status.get("error")

    # ------------------------------------------------------------------ shared steps

    async def _vectors(self, uploads: list[Upload]) -> np.ndarray:
        """Uploads -> (N, D [+ K]) from the encoder; decoding runs on the fair pool, the model in its own process.

        First every header is read and the request held to its limits (one cheap job), then each image is one
        job costed by its pixels, so a client's big request shares the threads with everyone else's small ones.
        """
        import torch

        started = time.perf_counter()
        client = _client()
        [headers] = await self._decoder.run(client, [(IMAGE_OVERHEAD_PIXELS * len(uploads),
                                                      partial(inspect_all, uploads, LIMITS))])
        tensors = await self._decoder.run(client, [(h.pixels + IMAGE_OVERHEAD_PIXELS,
                                                    partial(preprocess, u, LIMITS, self.preprocessing))
                                                   for u, h in zip(uploads, headers)])
        pixels = torch.stack(tensors).numpy()  # (N, C, H, W)
        decoded = time.perf_counter()
        out = await self._call_encoder(pixels)
        DECODE_SECONDS.observe(decoded - started)
        ENCODER_SECONDS.observe(time.perf_counter() - decoded)
        return np.asarray(out, dtype=np.float32)

    async def _call_encoder(self, pixels: np.ndarray) -> np.ndarray:
        import aiohttp

        try:
            return await self.encoder.to_async.run(pixels)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as e:
            # A pooled keep-alive connection the encoder's server had already closed (BentoML #4971). The call is a
            # pure function of its input, so one retry on a fresh connection is safe.
            log.warning("encoder connection dropped (%s); retrying once", e)
            return await self.encoder.to_async.run(pixels)

    # ------------------------------------------------------------------ APIs

    @bentoml.api(route="/embed", input_spec=ImagesInput, output_spec=EmbedOutput)
    async def embed(self, images: list[Upload]) -> EmbedOutput:
        """L2-normalised embeddings, one per image, from the artifact's encoder."""
        out = await self._vectors(images)
        return EmbedOutput(embeddings=out[:, : self.dim].tolist(), dim=self.dim, model=self.sha256)

    @bentoml.api(route="/classify", input_spec=TopKInput, output_spec=ClassifyOutput)
    async def classify(self, images: list[Upload], k: int = 5) -> ClassifyOutput:
        """Top-k labels with softmax probabilities (artifacts exported from a finetuned checkpoint)."""
        from export.runtime import top_k

        if not self.labels:
            raise error("this artifact has no classification head (it was exported from a pretrained, not a "
                        "finetuned, checkpoint): use /embed or /search")
        out = await self._vectors(images)
        predictions = top_k(out[:, self.dim :], self.labels, k)
        return ClassifyOutput(predictions=predictions, model=self.sha256)

    @bentoml.api(route="/search", input_spec=SearchInput, output_spec=SearchOutput)
    async def search(self, images: list[Upload], k: int = 5, where: list[str] | None = None,
                     min_score: float | None = None) -> SearchOutput:
        """The k most similar items of the index for each image; ``where`` filters on the catalogue."""
        from retrieval.index import IndexDamagedError

        if self.index is None:
            raise error("this server has no index: start it with --index INDEX (mae index build makes one)")
        vectors = np.ascontiguousarray((await self._vectors(images))[:, : self.dim])  # (N, D)
        try:
            hits = await asyncio.get_running_loop().run_in_executor(self._index_thread, self._search, vectors, k,
                                                                    where or [], min_score)
        except IndexDamagedError as e:  # BentoML shows 5xx answers as "unexpected error": the reason is logged
            raise error(damaged_message(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
        neighbours = [[Neighbour(**self.items.hit_json(h)) for h in row] for row in hits]
        return SearchOutput(neighbours=neighbours, model=self.sha256, index_count=self.index.count,
                            generation=self.index.generation)

    def _search(self, vectors: np.ndarray, k: int, where: list[str] | None = None,
                min_score: float | None = None) -> list[list[Any]]:
        """On the index thread: pick up what a writer (``mae index add``, ``POST /items``, another worker)
        committed meanwhile (a ``stat`` of the manifest; see ``serving.items``), then search."""
        if self.index.reload():
            log.info("index %s reloaded: %d items, generation %d", self.index.name, self.index.count,
                     self.index.generation)
        return self.index.search(vectors, k, where=where, min_score=min_score)

    # ------------------------------------------------------------------ page helpers

    async def info(self) -> dict[str, Any]:
        """What the page needs to know: model identity, head, index; the backend as the encoder reports it.

        No server paths: anyone who can reach the page can read this.
        """
        backend = self._backend or await self._model_status()
        if backend is None:
            backend = {"backend": None, "error": "the model is loading"}
        elif backend.get("error"):  # the reason names server paths: it goes to the server log, not to the page
            backend = {"backend": None, "error": "the model cannot be loaded (see the server log)"}
        return {
            "model": self.sha256,
            "dim": self.dim,
            "labels": self.labels,
            "input_size": list(self.preprocessing.input_size),
            "backend": backend,
            "index": None if self.index is None else await self.items.read(self._index_info),
            "auth": {"keys": bool(self._keyring), "public_read": SETTINGS.public_read},
            "batching": {"enabled": SETTINGS.batching, "max_batch_size": SETTINGS.max_batch_size,
                         "max_latency_ms": SETTINGS.max_latency_ms},
            "limits": dataclasses.asdict(LIMITS),
        }

    def _index_info(self) -> dict[str, Any]:
        """The index as /info shows it: its folder's name (the whole path only with MAE_ABSOLUTE_PATHS=1)."""
        from retrieval.index import DUPLICATE_THRESHOLD

        idx = self.index
        return {"path": idx.name if SETTINGS.absolute_paths else Path(idx.name).name, "count": idx.count,
                "generation": idx.generation, "labels": idx.labels(),
                "duplicate_threshold": DUPLICATE_THRESHOLD}

    @cached_property
    def _keyring(self) -> Any:
        from serving.auth import KeyRing

        return KeyRing.load(SETTINGS.api_keys_file)

    def key_scope(self, authorization: str | None) -> str | None:
        """The scope of the key a request carries ("read", "write"), None without a valid one."""
        kind, _, presented = (authorization or "").partition(" ")
        key = self._keyring.scope_of(presented.strip()) if kind.lower() == "bearer" and presented.strip() else None
        return key.scope if key is not None else None

    @cached_property
    def _thumbnail_cache(self) -> Any:
        return lru_cache(maxsize=1024)(self._render_thumbnail)

    async def thumbnail(self, item_id: int) -> bytes:
        """A PNG of an indexed item, at most THUMBNAIL_SIZE pixels a side; only ids in the catalogue are served."""
        if self.index is None:
            raise LookupError("this server has no index")
        hit = await self.items.read(self.index.item, item_id)
        if hit is None:
            raise LookupError(f"no item {item_id} in the index")
        return await anyio.to_thread.run_sync(self._thumbnail_cache, item_id, hit.path)

    def _render_thumbnail(self, item_id: int, path: str) -> bytes:
        import io

        from mae.data import ImageError, read_image
        from mae.visualize import thumbnail

        try:
            im = thumbnail(read_image(path), THUMBNAIL_SIZE)
        except ImageError as e:
            raise LookupError(f"item {item_id}: {e}") from e
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


MAEService.add_asgi_middleware(FlatErrors)
MAEService.add_asgi_middleware(Guard)  # API keys and CORS (serving.auth); inside FlatErrors, outside the routes
MAEService.add_asgi_middleware(RequestGuard, allowed_hosts=SETTINGS.host_allow_list,
                               allowed_origins=[o for o in SETTINGS.cors_origins.split(",") if o])
