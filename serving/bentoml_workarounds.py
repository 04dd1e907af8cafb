"""Where BentoML 1.4 does something this service must not do, and what we do instead (one place for all of them).

Each piece below names the BentoML behaviour it works around; if BentoML changes, this is the file to revisit.
Four more live where they act, each with its comment:

- BentoML's ``PIL.Image`` and file parameter types answer an undecodable upload with a 500 (and fetch URLs given
  as text): every request is parsed by ``serving.images`` instead, through the IO descriptors of
  ``serving.schema`` (``from_http_request``);
- a batchable API over a list of PIL images has been reported to break adaptive batching: the encoder
  (``serving.encoder``) batches float32 arrays;
- a service whose ``__init__`` raises is restarted in a loop by BentoML (24 tracebacks in 45 s) while the front
  answers ``/healthz`` 200: the encoder stays up, unready, and says why;
- BentoML's own client (``bentoml.SyncHTTPClient``) sends every field of a multipart request as JSON text: a list
  ``where=["label=3"]`` as the text ``["label=3"]``, ``min_score=None`` as ``null``: ``serving.params`` accepts
  those forms (``json_text``), and tests/test_exposed.py drives every API through that client.

BentoML also replaces the message of every 5xx answer of its API routes with "An unexpected error has occurred":
the reason of a 503 from ``/search`` is therefore logged (``serving.errors.damaged_message``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, Response

log = logging.getLogger("mae.serving")

# BentoML's readiness probe asks the model process without a deadline while it loads, and each such probe then
# holds the front's shutdown open for good: it is turned off (``runner_probe`` of the front's service config) and
# the front answers /readyz itself, asking the encoder with a deadline (``ask_encoder``).
RUNNER_PROBE_OFF = {"enabled": False}


async def ask_encoder(encoder: Any, seconds: float) -> dict[str, Any] | None:
    """The encoder's ``describe()`` (its backend, or why it cannot load), or None while it does not answer within
    ``seconds`` (still loading): see ``RUNNER_PROBE_OFF``."""
    import aiohttp
    from bentoml.exceptions import BentoMLException

    try:
        return await asyncio.wait_for(encoder.to_async.describe(), seconds)
    except (asyncio.TimeoutError, aiohttp.ClientError, BentoMLException, OSError):
        return None


async def call_encoder(encoder: Any, pixels: np.ndarray) -> np.ndarray:
    """``encoder.run(pixels)``, retried once on a dropped connection.

    BentoML's dependency client reuses pooled keep-alive connections that the encoder's server may already have
    closed (BentoML #4971). The call is a pure function of its input, so one retry on a fresh connection is safe.
    """
    import aiohttp

    try:
        return await encoder.to_async.run(pixels)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as e:
        log.warning("encoder connection dropped (%s); retrying once", e)
        return await encoder.to_async.run(pixels)


def keep_one_session(proxy: Any) -> None:
    """Stop BentoML's dependency client from replacing its HTTP session under load.

    BentoML 1.4.30+ (``_bentoml_impl.client.proxy2.SessionManager``) swaps its aiohttp session every 100 requests
    or 5 minutes and closes the old one while calls are still in flight on it, failing them with "Server
    disconnected": 252 of 640 requests from 64 concurrent clients here. One session per worker is what aiohttp
    intends; if BentoML's internals change this does nothing and the retry in ``call_encoder`` remains.
    """
    manager = getattr(getattr(proxy, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests") and hasattr(manager, "max_age"):
        manager.max_requests = math.inf
        manager.max_age = math.inf
    else:
        log.warning("BentoML's client has no SessionManager to configure; relying on retries")


async def swagger_page(_: Request) -> Response:
    """BentoML's Swagger UI at /docs: BentoML serves it at /, which the page takes; it reads ./docs.json and
    ./static_content, which BentoML still serves."""
    from _bentoml_impl.server import app as bentoml_app

    return FileResponse(Path(bentoml_app.__file__).parent / "main-openapi.html", media_type="text/html")


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


# ----------------------------------------------------------------------------------------------- logs

# Where BentoML's API wrapper logs exceptions (bentoml._internal.server.http_app.log_exception).
BENTOML_ERROR_LOGGER = "bentoml._internal.server.http_app"


def client_error_status(exc: BaseException) -> int | None:
    """The 4xx status BentoML answers ``exc`` with, or None when it is a server error (5xx)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, BentoMLException):
        status = int(exc.error_code)
        return status if 400 <= status < 500 else None
    status = getattr(exc, "status_code", None)  # starlette's HTTPException
    return status if isinstance(status, int) and 400 <= status < 500 else None


class ClientErrorLogFilter(logging.Filter):
    """Rewrite BentoML's "Exception on PATH [METHOD]" + traceback of a 4xx into one line with the message.

    BentoML logs every error raised in an API with a full traceback, so a client sending bad images wrote 1,785
    log lines for 124 requests; server errors (5xx) keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_error_status(exc) if exc is not None else None
        if status is None:
            return True
        path, method = record.args if isinstance(record.args, tuple) and len(record.args) == 2 else ("?", "?")
        message = " ".join(str(exc).split())
        record.msg, record.args = "%s %s -> %d: %s", (method, path, status, message[:500])
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"  # not ERROR: the server did nothing wrong
        return True


def install_log_filter() -> None:
    """Once per process (each BentoML worker configures its logging before the service starts)."""
    logger = logging.getLogger(BENTOML_ERROR_LOGGER)
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.addFilter(ClientErrorLogFilter())
