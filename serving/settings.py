"""How the service is configured: environment variables, so that ``bentoml serve`` and ``mae serve`` agree.

BentoML starts each service in its own worker processes by importing ``serving.service``; the only channel that
reaches all of them (and a container built by ``bentoml build``) is the environment. ``mae serve`` validates its
flags, writes them here as ``MAE_*`` variables and execs ``bentoml serve serving.service:MAEService``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from export.formats import BACKEND_CHOICES
from mae.errors import UsageError


def _default_threads() -> int:
    # The model process gets half the cores; the front-end (HTTP, decoding, resizing) the rest.
    return max(1, (os.cpu_count() or 2) // 2)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def var(name: str) -> str:
    """The environment variable of a setting: ``max_batch_size`` -> ``MAE_MAX_BATCH_SIZE``."""
    return f"MAE_{name.upper()}"


def _read_env(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = environ.get(var(f.name))
        if raw is None or raw == "":
            continue
        if f.type == "bool":
            if raw.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise UsageError(f"{var(f.name)} must be 0 or 1, got {raw!r}")
            values[f.name] = raw.lower() in ("1", "true", "yes", "on")
        elif f.type == "int":
            try:
                values[f.name] = int(raw)
            except ValueError as e:
                raise UsageError(f"{var(f.name)} must be an integer, got {raw!r}") from e
        else:
            values[f.name] = raw
    return values


def _write_env(obj: Any) -> dict[str, str]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[var(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


@dataclass(frozen=True)
class Settings:
    """Service settings; each field has one ``MAE_<FIELD>`` environment variable."""

    artifact: str = ""
    """Artifact folder (``mae export``); required."""
    index: str = ""
    """Index folder (``mae index build``); without one, /search answers 400 and the page shows labels only."""
    backend: str = "auto"
    """Embedder backend: auto (the first of export.formats.BACKENDS that runs here) or one of them by name."""
    batching: bool = True
    """Adaptive batching of model calls across concurrent requests (BentoML's CorkDispatcher)."""
    max_batch_size: int = 32
    """Most images in one model call."""
    max_latency_ms: int = 5000
    """BentoML's deadline for a queued model call: one predicted to wait longer is shed with a 503."""
    threads: int = 0
    """Intra-op threads of the model on CPU; 0 means half the cores."""
    workers: int = 1
    """Front-end worker processes (HTTP parsing, decoding, preprocessing, search)."""
    api_keys_file: str = ""
    """File of API keys with their scopes (serving.auth); empty: no keys, reads open, writes refused."""
    public_read: bool = False
    """With keys configured, let reads through without one (writes still need a write key)."""
    cors_origins: str = ""
    """Comma-separated origins whose web pages may call the API (CORS); empty: none (CORS off)."""
    absolute_paths: bool = False
    """Answer item paths as absolute server paths instead of relative to the indexed folders."""
    write_wait_s: int = 10
    """Seconds an HTTP write waits for another writer's index lock before answering 409."""
    host: str = "127.0.0.1"
    """Address to bind, for ``bentoml serve`` and the container too (``mae serve --host`` sets it): loopback
    unless told otherwise; 0.0.0.0 (or ::) is every interface. See docs/serving.md "Expose the server"."""
    allowed_hosts: str = ""
    """Comma-separated names the HTTP Host header may carry (``*``: any). Empty: the loopback names and the bound
    address. A browser page on another site can make a browser send requests here (DNS rebinding); the Host it
    then sends is that site's name, which is refused."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        settings = cls(**_read_env(cls, environ))
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        return _write_env(self)

    def validate(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise UsageError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.max_batch_size < 2:
            raise UsageError(f"max batch size must be at least 2 (or turn batching off), got {self.max_batch_size}")
        if self.max_latency_ms < 1:
            raise UsageError(f"max latency must be at least 1 ms, got {self.max_latency_ms}")
        if self.threads < 0 or self.workers < 1:
            raise UsageError(f"threads must be >= 0 and workers >= 1, got {self.threads} and {self.workers}")
        if self.write_wait_s < 0:
            raise UsageError(f"write wait must be >= 0 s, got {self.write_wait_s}")
        if self.public_read and not self.api_keys_file:
            raise UsageError("public read only means something with API keys (--api-keys FILE)")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise UsageError(f"host must be an IP address (127.0.0.1, 0.0.0.0, ::), got {self.host!r}") from None
        if any(not name or " " in name for name in self.host_allow_list):
            raise UsageError(f"allowed hosts must be comma-separated names, got {self.allowed_hosts!r}")

    @property
    def model_threads(self) -> int:
        return self.threads or _default_threads()

    @property
    def host_allow_list(self) -> tuple[str, ...]:
        """Host header names served: ``allowed_hosts``, or by default the loopback names and a specific bound IP."""
        if self.allowed_hosts.strip():
            return tuple(name.strip().lower() for name in self.allowed_hosts.split(","))
        unspecified = ipaddress.ip_address(self.host).is_unspecified
        return LOOPBACK_NAMES + (() if unspecified or self.host in LOOPBACK_NAMES else (self.host,))


@dataclass(frozen=True)
class Limits:
    """What one request may carry and cost; over a limit is a 413 (too large) naming the image, never a crash.

    Bytes and pixels alone do not bound the work: a 177-byte PNG of 100000x1 pixels passes both and costs seconds
    to resize (the short side is scaled up to the model's size, the long side with it). So side lengths, aspect
    ratio and a per-request pixel budget are checked too, all from the image headers before anything is decoded.
    """

    max_image_bytes: int = 10 * 2**20
    """Encoded bytes per image (after base64 decoding)."""
    max_image_pixels: int = 40_000_000
    """Width x height per image, read from the header before decoding (decompression bombs stop here)."""
    max_images: int = 64
    """Images per request."""
    max_image_side: int = 16384
    """Longest side of an image in pixels (WebP's own limit; JPEG's is 65535)."""
    max_aspect_ratio: int = 50
    """Long side over short side: resizing scales the long side with the short one, so this bounds the resized
    image (and the work) to about 50 model inputs."""
    max_request_pixels: int = 64_000_000
    """Sum of the images' pixels per request: the decode budget of one request."""
    max_request_bytes: int = 64 * 2**20
    """A multipart body (parsed as a stream, files spooled to disk); refused from Content-Length when it is over."""
    max_json_bytes: int = 8 * 2**20
    """A JSON body, which is held in memory whole and base64-decoded: far less than multipart (send large images
    as files)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Limits from their ``MAE_MAX_*`` variables (set by mae serve)."""
        limits = cls(**_read_env(cls, environ))
        limits.validate()
        return limits

    def to_env(self) -> dict[str, str]:
        return _write_env(self)

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise UsageError(f"{f.name.replace('_', ' ')} must be at least 1, got {getattr(self, f.name)}")

    def body_cap(self, media_type: str) -> int:
        """The most body bytes read for a request of ``media_type`` before it is refused: its own limit, or less
        when ``max_images`` images at ``max_image_bytes`` (base64-encoded, plus slack) could never fill it."""
        could_be_valid = self.max_images * (self.max_image_bytes * 4 // 3 + 4096) + 65536
        own = self.max_json_bytes if media_type in ("application/json", "") else self.max_request_bytes
        return min(own, could_be_valid)
