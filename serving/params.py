"""Fields of a request other than its images -> checked values, or a 400 that names the field.

The same rules hold wherever a field comes from: a query string (``GET /items/{id}/similar?k=&where=``), a
multipart form or a JSON body (``POST /search``, ``POST /items``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from serving.errors import RequestError
from serving.images import MAX_K

MAX_WHERE = 16
MAX_LABEL = 200
MAX_TAGS = 64

T = TypeVar("T")


def parse_id(text: str) -> int:
    """An item id from a path: whole numbers only (an id past the catalogue's range is a 404 later, not a 400)."""
    if not re.fullmatch(r"\d{1,30}", text):
        raise RequestError(f"item ids are whole numbers, got {text[:40]!r}")
    return int(text)


def only(given: Collection[str], allowed: Collection[str], hint: str) -> None:
    """Refuse parameters an endpoint does not take, rather than ignore a misspelt one."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RequestError(f"unknown parameter(s) {unknown}; this endpoint takes {hint}")


def parse_k(value: Any, default: int = 10) -> int:
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,4}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise RequestError(f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    return value


def parse_where(values: Any) -> list[str]:
    """``where`` as a list of condition strings (one string, a list, or repeated form/query fields), validated."""
    from retrieval.filters import parse_filters

    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError('"where" is a list of conditions like ["label=cat", "tag.camera=X100"]')
    if len(values) > MAX_WHERE:
        raise RequestError(f"at most {MAX_WHERE} conditions in 'where', got {len(values)}")
    try:
        parse_filters(values)
    except ValueError as e:
        raise RequestError(str(e)) from None
    return values


def parse_min_score(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        if len(value) != 1:
            raise RequestError("give min_score once")
        value = value[0]
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"min_score must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(score):
        raise RequestError(f"min_score must be a finite number, got {value!r}")
    return score


def parse_threshold(value: Any, default: float) -> float:
    """A near-duplicate threshold: a cosine in [-1, 1]."""
    threshold = parse_min_score(value)
    threshold = default if threshold is None else threshold
    if not -1.0 <= threshold <= 1.0:
        raise RequestError(f"threshold is a cosine in [-1, 1], got {threshold}")
    return threshold


def per_image(name: str, values: Any, n: int, parse: Callable[[Any], T]) -> list[T | None]:
    """A field given once (for every image) or once per image, in image order."""
    if values is None:
        return [None] * n
    if not isinstance(values, list):
        values = [values]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise RequestError(f"give '{name}' once (for every image) or once per image: {len(values)} for {n} images")
    return [parse(v) for v in values]


def parse_label(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL:
        raise RequestError(f"a label is text of at most {MAX_LABEL} characters")
    return value


def parse_tags(value: Any) -> dict[str, str] | None:
    """Tags as a JSON object (or its text, as a form field carries it) of name: value pairs."""
    from retrieval.catalog import clean_tags

    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RequestError('tags are a JSON object like {"camera": "X100"}') from None
    if not isinstance(value, dict) or len(value) > MAX_TAGS:
        raise RequestError(f'tags are a JSON object of at most {MAX_TAGS} name: value pairs, like {{"camera": "X100"}}')
    try:
        return clean_tags(value)
    except ValueError as e:
        raise RequestError(str(e)) from None
