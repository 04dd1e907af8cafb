"""How the service is configured: environment variables, so that ``bentoml serve`` and ``mae serve`` agree.

BentoML starts each service in its own worker processes by importing ``serving.service``; the only channel that
reaches all of them (and a container built by ``bentoml build``) is the environment. ``mae serve`` validates its
flags, writes them here as ``MAE_*`` variables and execs ``bentoml serve serving.service:MAEService``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from export.formats import BACKEND_CHOICES


def _default_threads() -> int:
    # The model process gets half the cores; the front-end (HTTP, decoding, resizing) the rest.
    return max(1, (os.cpu_count() or 2) // 2)


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
                raise ValueError(f"{var(f.name)} must be 0 or 1, got {raw!r}")
            values[f.name] = raw.lower() in ("1", "true", "yes", "on")
        elif f.type == "int":
            try:
                values[f.name] = int(raw)
            except ValueError as e:
                raise ValueError(f"{var(f.name)} must be an integer, got {raw!r}") from e
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        settings = cls(**_read_env(cls, environ))
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        return _write_env(self)

    def validate(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.max_batch_size < 2:
            raise ValueError(f"max batch size must be at least 2 (or turn batching off), got {self.max_batch_size}")
        if self.max_latency_ms < 1:
            raise ValueError(f"max latency must be at least 1 ms, got {self.max_latency_ms}")
        if self.threads < 0 or self.workers < 1:
            raise ValueError(f"threads must be >= 0 and workers >= 1, got {self.threads} and {self.workers}")
        if self.write_wait_s < 0:
            raise ValueError(f"write wait must be >= 0 s, got {self.write_wait_s}")
        if self.public_read and not self.api_keys_file:
            raise ValueError("public read only means something with API keys (--api-keys FILE)")

    @property
    def model_threads(self) -> int:
        return self.threads or _default_threads()


@dataclass(frozen=True)
class Limits:
    """What one request may carry; over a limit is a 413 (too large) naming the image, never a crash."""

    max_image_bytes: int = 10 * 2**20
    """Encoded bytes per image (after base64 decoding)."""
    max_image_pixels: int = 40_000_000
    """Width x height per image, read from the header before decoding (decompression bombs stop here)."""
    max_images: int = 64
    """Images per request."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Limits from ``MAE_MAX_IMAGE_BYTES``, ``MAE_MAX_IMAGE_PIXELS``, ``MAE_MAX_IMAGES`` (set by mae serve)."""
        limits = cls(**_read_env(cls, environ))
        limits.validate()
        return limits

    def to_env(self) -> dict[str, str]:
        return _write_env(self)

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name.replace('_', ' ')} must be at least 1, got {getattr(self, f.name)}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body that can still be valid: every image at its limit, base64-encoded, plus slack."""
        return self.max_images * (self.max_image_bytes * 4 // 3 + 4096) + 65536
