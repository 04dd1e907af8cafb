"""What ``POST /embed``, ``/classify`` and ``/search`` take and answer (BentoML IO descriptors and pydantic models).

The inputs are parsed by ``serving.images`` (``from_http_request``), not by BentoML's file or PIL types: limits,
formats and 4xx messages are ours (``serving.bentoml_workarounds`` says why). The models still give BentoML the
OpenAPI schema it shows at /docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, Field
from starlette.requests import Request

from serving.environment import LIMITS
from serving.images import parse_request
from serving.params import parse_min_score, parse_where_off_loop


class ImagesInput(bentoml.IODescriptor):
    """One or more images: multipart ``images`` files, or JSON ``{"images": ["<base64>", ...]}``."""

    images: list[Path] = Field(description="image files (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM); in a JSON body, "
                                           "base64 strings (a data: URL prefix is allowed)")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> ImagesInput:
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
        where = await parse_where_off_loop(parsed.fields.get("where"))
        min_score = parse_min_score(parsed.fields.get("min_score"))
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
