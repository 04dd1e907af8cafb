"""The BentoML service: ``POST /embed``, ``/classify``, ``/search``, the page at ``GET /``, thumbnails, items.

Two BentoML services, composed the way BentoML runs models with pre-processing:

- ``MAEService`` (here; the front, bound to the port): parses and validates uploads, decodes and preprocesses them
  in threads, asks the encoder for vectors, searches the index, renders JSON; it also serves the page and the
  item routes (``serving.routes``), which reach the index through the worker's ``serving.index_access``.
- ``EncoderService`` (``serving.encoder``, a dependency in its own process): holds the model and exposes one
  batchable API over decoded, preprocessed arrays, merged across requests by BentoML's adaptive batching.

Start it with ``mae serve --artifact A [--index I]``, or ``MAE_ARTIFACT=A bentoml serve serving.service:MAEService``
(see ``serving.settings`` for every ``MAE_*`` variable). Either way the artifact and every exported file in it are
verified once before any worker starts (``on_deployment``), the server binds loopback unless ``MAE_HOST`` says
otherwise, and ``serving.guard`` checks each request's Host and Origin. A model process that still cannot load
reports why on ``/healthz`` (503) instead of restarting in a loop. The request and answer models are in
``serving.schema``, API keys and CORS in ``serving.auth``, what works around BentoML in
``serving.bentoml_workarounds``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from functools import cached_property, partial
from typing import Any

import bentoml
import numpy as np

from mae.errors import UserError
from serving.auth import Guard
from serving.bentoml_workarounds import (
    RUNNER_PROBE_OFF,
    FlatErrors,
    ask_encoder,
    call_encoder,
    install_log_filter,
    keep_one_session,
)
from serving.encoder import EncoderService
from serving.environment import LIMITS, SETTINGS, require_artifact
from serving.errors import RequestError, client_error
from serving.fair import FairPool
from serving.guard import RequestGuard, SecurityHeaders
from serving.images import Upload, inspect_all, preprocess
from serving.index_access import IndexAccess
from serving.metrics import DECODE_SECONDS, ENCODER_SECONDS
from serving.routes import PAGE
from serving.schema import ClassifyOutput, EmbedOutput, ImagesInput, Neighbour, SearchInput, SearchOutput, TopKInput

log = logging.getLogger("mae.serving")

# Decode jobs over this many pixels (a 2000x2000 photo) may not hold every decode thread at once (serving.fair).
HEAVY_IMAGE_PIXELS = 4_000_000
# Fair-queueing cost of an image besides its pixels, so that tiny images are not free: about a 64x64 decode.
IMAGE_OVERHEAD_PIXELS = 4096
# How long /healthz and /readyz wait for the model process to answer before calling it still loading.
MODEL_CHECK_S = 2.0


def _client() -> str:
    """The fairness key of the request being served: its peer address (everyone behind one proxy is one client)."""
    request = bentoml.Context().request
    return request.client.host if request.client else "?"


# Loopback unless MAE_HOST says otherwise (`bentoml serve` and the container read this; --host overrides it). The
# readiness probe is ours (__is_ready__; see RUNNER_PROBE_OFF).
@bentoml.asgi_app(PAGE, path="/", name="page")
@bentoml.service(name="mae", workers=SETTINGS.workers, traffic={"timeout": 120}, envs=[{"name": "MAE_ARTIFACT"}],
                 http={"host": SETTINGS.host}, runner_probe=RUNNER_PROBE_OFF)
class MAEService:
    """Embeddings, classification and search by image for one artifact (and optionally one index)."""

    encoder = bentoml.depends(EncoderService)

    @bentoml.on_deployment
    def verify_artifact() -> None:
        """Once, before any worker starts: a damaged artifact stops ``bentoml serve`` here with one line naming the
        file (``mae serve`` checks the same before it starts BentoML)."""
        from export.runtime import verify_artifact

        try:
            verify_artifact(require_artifact())
        except (UserError, ValueError, OSError, RuntimeError) as e:
            print(f"mae serve: error: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(1) from None

    def __init__(self) -> None:
        import torch

        from mae.artifact_config import ArtifactConfig

        install_log_filter()
        torch.set_num_threads(1)  # many small per-image resizes in parallel threads, not one large one
        path = require_artifact()
        self.config = ArtifactConfig.read(path)
        self.sha256: str = self.config.sha256
        self.dim = self.config.embed_dim
        self.labels: list[str] | None = list(self.config.labels) if self.config.labels else None
        self.preprocessing = self.config.preprocessing
        self.index_access = IndexAccess(SETTINGS.index, self.sha256, write_wait_s=SETTINGS.write_wait_s,
                                        absolute_paths=SETTINGS.absolute_paths)
        self._decoder = FairPool(max(2, SETTINGS.model_threads), HEAVY_IMAGE_PIXELS)
        self._backend: dict[str, Any] | None = None
        keep_one_session(self.encoder)

    # ------------------------------------------------------------------ health

    async def _model_status(self) -> dict[str, Any] | None:
        """The model process's ``describe()`` (its backend, or the error that keeps it from loading); None while it
        does not answer within MODEL_CHECK_S (still loading)."""
        status = await ask_encoder(self.encoder, MODEL_CHECK_S)
        if status is not None and not status.get("error"):
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

    # ------------------------------------------------------------------ the model

    async def encode(self, uploads: list[Upload]) -> np.ndarray:
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
        out = await call_encoder(self.encoder, pixels)
        DECODE_SECONDS.observe(decoded - started)
        ENCODER_SECONDS.observe(time.perf_counter() - decoded)
        return np.asarray(out, dtype=np.float32)

    async def embeddings(self, uploads: list[Upload]) -> np.ndarray:
        """Uploads -> their L2-normalised embeddings (N, D)."""
        return np.ascontiguousarray((await self.encode(uploads))[:, : self.dim])

    # ------------------------------------------------------------------ APIs

    @bentoml.api(route="/embed", input_spec=ImagesInput, output_spec=EmbedOutput)
    async def embed(self, images: list[Upload]) -> EmbedOutput:
        """L2-normalised embeddings, one per image, from the artifact's encoder."""
        out = await self.embeddings(images)
        return EmbedOutput(embeddings=out.tolist(), dim=self.dim, model=self.sha256)

    @bentoml.api(route="/classify", input_spec=TopKInput, output_spec=ClassifyOutput)
    async def classify(self, images: list[Upload], k: int = 5) -> ClassifyOutput:
        """Top-k labels with softmax probabilities (artifacts exported from a finetuned checkpoint)."""
        from export.runtime import top_k

        if not self.labels:
            raise RequestError("this artifact has no classification head (it was exported from a pretrained, not "
                               "a finetuned, checkpoint): use /embed or /search")
        out = await self.encode(images)
        predictions = top_k(out[:, self.dim :], self.labels, k)
        return ClassifyOutput(predictions=predictions, model=self.sha256)

    @bentoml.api(route="/search", input_spec=SearchInput, output_spec=SearchOutput)
    async def search(self, images: list[Upload], k: int = 5, where: list[str] | None = None,
                     min_score: float | None = None) -> SearchOutput:
        """The k most similar items of the index for each image; ``where`` filters on the catalogue."""
        access = self.index_access
        access.require()
        vectors = await self.embeddings(images)
        try:
            found = await access.search(vectors, k, where, min_score)
        except Exception as e:  # a damaged index is a 503 (BentoML words its 5xx itself: the reason is logged)
            answer = client_error(e)
            if answer is None:
                raise
            raise answer from None
        neighbours = [[Neighbour(**access.hit_json(h)) for h in row] for row in found.value]
        return SearchOutput(neighbours=neighbours, model=self.sha256, index_count=found.count,
                            generation=found.generation)

    # ------------------------------------------------------------------ the page

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
            "index": await self.index_access.summary() if self.index_access.loaded else None,
            "auth": {"keys": bool(self._keyring), "public_read": SETTINGS.public_read},
            "batching": {"enabled": SETTINGS.batching, "max_batch_size": SETTINGS.max_batch_size,
                         "max_latency_ms": SETTINGS.max_latency_ms},
            "limits": dataclasses.asdict(LIMITS),
        }

    @cached_property
    def _keyring(self) -> Any:
        from serving.auth import KeyRing

        return KeyRing.load(SETTINGS.api_keys_file)

    def key_scope(self, authorization: str | None) -> str | None:
        """The scope of the key a request carries ("read", "write"), None without a valid one."""
        kind, _, presented = (authorization or "").partition(" ")
        key = self._keyring.scope_of(presented.strip()) if kind.lower() == "bearer" and presented.strip() else None
        return key.scope if key is not None else None


# The middleware, outermost first (every request and answer of the service passes through it): the one place where
# requests are refused before they reach a route, and where answers get headers.
MAEService.add_asgi_middleware(SecurityHeaders)  # CSP, framing, nosniff on every answer, refusals included
MAEService.add_asgi_middleware(FlatErrors)
MAEService.add_asgi_middleware(Guard)  # API keys and CORS (serving.auth); inside FlatErrors, outside the routes
MAEService.add_asgi_middleware(RequestGuard, allowed_hosts=SETTINGS.host_allow_list,
                               allowed_origins=[o for o in SETTINGS.cors_origins.split(",") if o])
