"""The model process: ``EncoderService``, a BentoML dependency of the front (``serving.service``).

It holds the model (``export.runtime.Embedder``, its backend picked once at start) and exposes one batchable API
over decoded, preprocessed ``float32 (N, C, H, W)`` arrays. Concurrent requests from the front's workers are merged
here by BentoML's adaptive batching (CorkDispatcher): arrays, never lists of PIL images, which have been reported to
break it. One model call at a time: the model's threads are the process's cores.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from typing import Any

import bentoml
import numpy as np

from mae.errors import UserError
from serving.bentoml_workarounds import install_log_filter
from serving.environment import SETTINGS, require_artifact
from serving.errors import RequestError
from serving.metrics import BATCH_IMAGES, IMAGE_MODEL_SECONDS, MODEL_SECONDS

log = logging.getLogger("mae.serving")


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
            self.embedder = Embedder.load(require_artifact(), backend=SETTINGS.backend)
            c, h, w = self.embedder.preprocessing.input_size
            self.embedder.run(np.zeros((1, c, h, w), np.float32))  # warm up: first-call allocations, lazy inits
        except Exception as e:
            # Raising here would make BentoML restart this process in a loop (24 tracebacks in 45 s) while the
            # front answered /healthz 200; instead stay up, unready, and say why on every probe and call.
            self.error = " ".join(f"{type(e).__name__}: {e}".split())
            log.error("the model cannot be loaded: %s", self.error,
                      exc_info=not isinstance(e, (UserError, ValueError, OSError, RuntimeError)))  # 1 line
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
            raise RequestError(f"the model cannot be loaded: {self.error}", HTTPStatus.SERVICE_UNAVAILABLE)
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
