"""Fields of a request other than its images -> checked values, or a 400 that names the field.

The same rules hold wherever a field comes from: a query string (``GET /items/{id}/similar?k=&where=``), a
multipart form or a JSON body (``POST /search``, ``POST /items``). Sizes are checked before anything is parsed
(a filter's conditions, their length, the length of the name before the operator), and every value is checked
against what the index can store before anything is written: text must be valid Unicode (JSON can carry a lone
surrogate such as ``"\\ud800"``, which no UTF-8 store takes), ids fit in 64 bits, dates lie within years 1-9999.

BentoML's own client (``bentoml.SyncHTTPClient``) sends every field of a multipart request as JSON text: a list
as ``["label=3"]``, ``None`` as ``null``. Those forms are accepted too (``serving.bentoml_workarounds``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any, TypeVar

from serving.errors import RequestError
from serving.images import MAX_K

MAX_WHERE = 16
"""Conditions in one filter."""
MAX_CONDITION_CHARS = 4096
"""Characters in one condition: room for the longest path Linux allows."""
MAX_WHERE_CHARS = 16384
"""Characters in a whole filter, checked before any of it is parsed."""
MAX_FIELD_CHARS = 128
"""Characters before a condition's operator (``label``, ``tag.NAME``): this bounds the parser's work per
condition (the regular expression it replaces was quadratic in that part)."""
MAX_LABEL = 200
MAX_TAGS = 64
MAX_TAG_NAME = 100
MAX_TAG_VALUE = 4096
MAX_ID = 2**63 - 1
"""Item ids are SQLite INTEGERs and FAISS idx_t: signed 64-bit."""
_OPERATOR_CHARS = re.compile(r"[=!<>^]")

T = TypeVar("T")


def parse_id(text: str) -> int:
    """An item id from a path: whole numbers only; one past 64 bits names no item (a 404, as any unknown id)."""
    if not re.fullmatch(r"\d{1,30}", text):
        raise RequestError(f"item ids are whole numbers, got {text[:40]!r}")
    item_id = int(text)
    if item_id > MAX_ID:
        raise RequestError(f"no item {item_id} in the index (ids are below 2**63)", HTTPStatus.NOT_FOUND)
    return item_id


def check_text(value: str, what: str) -> str:
    """``value`` if it is valid Unicode (encodable as UTF-8); a 400 naming ``what`` otherwise."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid Unicode: character {e.start} is a lone surrogate "
                           f"({value[e.start]!a})") from None
    return value


def json_text(value: Any) -> Any:
    """A field as BentoML's client sends it in a multipart form (JSON text: ``["a"]``, ``"a"``, ``null``), decoded;
    any other value as it is. Only text that can be nothing but JSON is decoded: no condition, number or label
    the API takes starts with ``[`` or ``"`` or is ``null``."""
    if not isinstance(value, str) or not (value.startswith(("[", '"')) or value == "null"):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


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
    """``where`` as a list of condition strings (one string, a list, repeated form/query fields, or the JSON text of
    a list), validated: sizes first, then Unicode, then the parser, then the values' ranges.

    The parser's cost is bounded by the sizes (at most ``MAX_WHERE`` conditions of ``MAX_FIELD_CHARS`` before the
    operator); routes still call it off the event loop (``parse_where_off_loop``).
    """
    from retrieval.filters import parse_filters

    if values is None:
        return []
    values = _where_list(values)
    if not values:
        return []
    for v in values:
        check_text(v, f"filter {v[:60]!r}")
        head = _OPERATOR_CHARS.search(v, 0, MAX_FIELD_CHARS + 1)
        if head is None:
            raise RequestError(f"filter {v[:60]!r}{'...' if len(v) > 60 else ''}: no operator (= != ^= < <= > >=) "
                               f"in its first {MAX_FIELD_CHARS} characters; write FIELD OP VALUE, e.g. label=cat")
    try:
        conditions = parse_filters(values)
    except (ValueError, OverflowError) as e:
        raise RequestError(f"{e}" if not isinstance(e, OverflowError) else f"a filter is out of range ({e})") from None
    for c in conditions:
        _check_range(c.field, c.value, str(c))
    return values


async def parse_where_off_loop(values: Any) -> list[str]:
    """``parse_where`` on a worker thread: no request work that grows with its input runs on the event loop."""
    import anyio

    if values is None or values == []:
        return []
    if isinstance(values, (str, list)) and all(isinstance(v, str) for v in values):
        _check_where_size([values] if isinstance(values, str) else values)  # sizes first, before a thread is taken
    return await anyio.to_thread.run_sync(parse_where, values)


def _where_list(values: Any) -> list[str]:
    """The conditions of ``where`` in any of its forms, held to ``MAX_WHERE``, ``MAX_CONDITION_CHARS`` and
    ``MAX_WHERE_CHARS`` before anything is decoded or parsed."""
    shape = '"where" is a list of conditions like ["label=cat", "tag.camera=X100"]'
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError(shape)
    _check_where_size(values)
    out: list[str] = []
    for v in values:  # BentoML's client: one form field holding a JSON list (or a JSON string)
        decoded = json_text(v)
        if decoded is None:  # null: no filter
            continue
        if isinstance(decoded, str):
            out.append(decoded)
        elif isinstance(decoded, list) and all(isinstance(d, str) for d in decoded):
            out.extend(decoded)
        else:
            raise RequestError(shape)
    if out != values:
        _check_where_size(out)
    return out


def _check_where_size(values: list[str]) -> None:
    total = sum(len(v) for v in values)
    if total > MAX_WHERE_CHARS:
        raise RequestError(f"'where' holds {total:,} characters, over the limit of {MAX_WHERE_CHARS:,}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if len(values) > MAX_WHERE:
        raise RequestError(f"at most {MAX_WHERE} conditions in 'where', got {len(values)}")
    for v in values:
        if len(v) > MAX_CONDITION_CHARS:
            raise RequestError(f"filter {v[:60]!r}...: {len(v):,} characters, over the limit of "
                               f"{MAX_CONDITION_CHARS:,} a condition", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def _check_range(field: str, value: str, text: str) -> None:
    """A condition's value against what the catalogue stores: ids in 64 bits, times within years 1-9999 (whole
    days included: ``added<=9999-12-31`` needs the day after)."""
    if field == "id" and value.isdigit() and int(value) > MAX_ID:
        raise RequestError(f"filter {text!r}: the id is out of range (ids are below 2**63)")
    if field == "added":
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
            t + timedelta(days=1)
        except OverflowError:
            raise RequestError(f"filter {text!r}: the time is out of range (years 1 to 9999, UTC)") from None
        except ValueError:
            pass  # not ISO: the parser has said so already


def parse_min_score(value: Any) -> float | None:
    if isinstance(value, list):
        if len(value) != 1:
            raise RequestError("give min_score once")
        value = value[0]
    if value is None or value == "" or value == "null":  # null: BentoML's client sends None so
        return None
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
    return check_text(value, f"label {value[:40]!r}")


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
        tags = clean_tags(value)
    except ValueError as e:
        raise RequestError(str(e)) from None
    for name, text in (tags or {}).items():
        check_text(name, f"tag name {name[:40]!r}")
        check_text(text, f"tag {name[:40]!r}")
        if len(name) > MAX_TAG_NAME or len(text) > MAX_TAG_VALUE:
            raise RequestError(f"tag {name[:40]!r}: names are at most {MAX_TAG_NAME} characters and values at most "
                               f"{MAX_TAG_VALUE}")
    return tags
