"""Where a request's time goes: Prometheus metrics on ``/metrics``, scraped by ``bench/serving.py``.

BentoML gathers the metrics of all service processes (front and encoder) into the front's ``/metrics``.
"""

from __future__ import annotations

import bentoml

_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

# The front (serving.service), per request.
DECODE_SECONDS = bentoml.metrics.Histogram(
    name="mae_decode_seconds", documentation="Per request: parse-to-pixels time (decode, convert, resize, normalise)",
    buckets=_TIME_BUCKETS)
ENCODER_SECONDS = bentoml.metrics.Histogram(
    name="mae_encoder_call_seconds", documentation="Per request: waiting for the encoder (queue + transfer + model)",
    buckets=_TIME_BUCKETS)

# The encoder (serving.encoder), per model call.
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="mae_model_batch_seconds", documentation="Per model call: time in the backend", buckets=_TIME_BUCKETS)
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="mae_model_batch_images", documentation="Per model call: images in the batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
IMAGE_MODEL_SECONDS = bentoml.metrics.Counter(
    name="mae_model_image_seconds", documentation="Sum over images of the time of the model call each was part of")
