"""Filters as Milvus boolean expressions: ``retrieval.filters`` conditions -> the text of a search's ``filter``.

**Values are never spliced as text.** Each becomes a double-quoted string literal in which every character that
could end it or change its meaning is escaped (``\\``, ``"``, newline, carriage return, tab): the escapes that
Milvus's parser (``convertEscapeSingle``, then Go's ``strconv.Unquote``) and milvus-lite's read alike. Everything
else, Unicode included, stands for itself inside the quotes. Ids and times are numbers and dates the filter parser
already checked. (Milvus's expression templates, ``filter_params``, would keep values out of the text altogether,
but milvus-lite ignores them.)

**Tag names are not values either**, and Milvus takes a JSON key between brackets as raw text (``tags["a"]``: no
escapes), so a name holding a quote or a bracket could not be addressed. Filters read ``tag_filter``, a copy of the
tags keyed by each name's UTF-8 bytes in hex (``tag_key``); ``tags`` keeps the names as given.

**Semantics are the FAISS catalogue's** (``retrieval.catalog``), so that one filter selects the same items on
both engines: ``label=`` (nothing after it) matches items without a label and ``label!=`` those with one; ``!=``
also matches items without the field (no label, no such tag); ``^=`` is a prefix, written as the range
``[v, v + U+10FFFF)`` the catalogue uses; ``path`` values are absolute or relative to the indexed folders
(``Index.path_prefixes`` gives the absolute candidates); ``added`` compares the stored UTC text with the bounds
``filters.time_bounds`` gives. Negations are written so that a missing field never leaves a comparison
undecided under ``not``: ``label is null or not (...)``, ``not (exists tag and ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from retrieval.filters import Condition, time_bounds

TOP = "\U0010ffff"  # the last code point: every text that starts with a prefix sorts below prefix + TOP
NOTHING = "id < 0"  # ids are >= 1: true of no item
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def literal(text: str) -> str:
    """``text`` as a Milvus string literal that means exactly ``text``."""
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in text) + '"'


def tag_key(name: str) -> str:
    """The key of tag ``name`` in ``tag_filter``: its UTF-8 bytes in hex (digits and a-f only)."""
    return name.encode("utf-8").hex()


def tag_filter(tags: dict[str, str] | None) -> dict[str, str]:
    """The ``tag_filter`` field of an item with these tags."""
    return {tag_key(k): v for k, v in (tags or {}).items()}


def stamp(t: datetime) -> str:
    """A time as ``added`` stores it (the FAISS catalogue's format): 2026-01-01T00:00:00+00:00."""
    return t.isoformat(timespec="seconds")


def expression(conditions: Sequence[Condition], path_prefixes: Callable[[str], list[str]]) -> str:
    """All conditions as one expression ("" when there is none)."""
    return " and ".join(f"({clause(c, path_prefixes)})" for c in conditions)


def clause(c: Condition, path_prefixes: Callable[[str], list[str]]) -> str:
    """One condition (``retrieval.filters.Condition``) as a Milvus boolean expression."""
    negate = c.op == "!="
    op = "==" if c.op in ("=", "!=") else c.op
    if c.tag is not None:
        field = f'tag_filter["{tag_key(c.tag)}"]'
        if negate:
            return f"not (exists {field} and {field} == {literal(c.value)})"
        return _prefix(field, c.value) if op == "^=" else f"{field} {op} {literal(c.value)}"
    if c.field == "id":
        return f"id {'!=' if negate else op} {int(c.number)}"
    if c.field == "added":
        return " and ".join(f"added {o} {literal(stamp(t))}" for o, t in time_bounds(c))
    if c.field == "path":
        values = path_prefixes(c.value)
        if not values:
            return "id > 0" if negate else NOTHING
        if op == "^=":
            sql = " or ".join(f"({_prefix('path', v)})" for v in values)
        else:
            sql = f"path in [{', '.join(literal(v) for v in values)}]"
        return f"not ({sql})" if negate else sql
    if c.field == "label":
        if c.value == "" and op == "==":
            return "label is not null" if negate else "label is null"
        test = _prefix("label", c.value) if op == "^=" else f"label == {literal(c.value)}"
        return f"label is null or not ({test})" if negate else test
    if c.field == "sha256":
        return f"sha256 {'!=' if negate else '=='} {literal(c.value)}"
    raise ValueError(f"no Milvus expression for the filter {c}")


def _prefix(field: str, value: str) -> str:
    return f"{field} >= {literal(value)} and {field} < {literal(value + TOP)}"
