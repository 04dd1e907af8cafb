"""The filter language of ``--where`` and ``/search``'s ``where``: text -> typed conditions, in linear time.

A filter is a list of conditions that must all hold, each ``FIELD OP VALUE``: ``label=cat``,
``path^=photos/2024/``, ``added>=2026-01-01``, ``id<100``, ``sha256=...``, ``tag.camera=X100``. Parsing is a
scan for the first operator character, not a regular expression: the one it replaces backtracked, quadratic in
runs of spaces (a 30 KB ``where`` held a server for 23 s). Sizes are checked before any parsing (at most
``MAX_FILTERS`` conditions of at most ``MAX_CONDITION_CHARS`` characters), and every value is checked against
what the engines can store: a date beyond year 9999 or before year 1 (after its time zone), an id past int64,
text that is not valid Unicode (a lone surrogate). Each of those is a ``UsageError`` that names the condition,
raised before anything is read or written.

The result is engine-neutral: each engine maps a ``Condition`` to its own query (SQL for the FAISS folder's
catalogue, a boolean expression for Milvus), with ``time_bounds`` giving the stored-time comparisons an
``added`` condition means. The parser is pure (no state, no I/O), so it can run on any thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from mae.errors import UsageError

FIELDS = ("label", "path", "added", "id", "sha256")
OPERATORS = ("^=", "!=", ">=", "<=", "=", ">", "<")  # two-character ones first: "a>=b" is >=, not >
ALLOWED = {"label": ("=", "!=", "^="), "path": ("=", "!=", "^="), "sha256": ("=", "!="),
           "added": ("=", ">=", "<=", ">", "<"), "id": ("=", "!=", ">=", "<=", ">", "<"),
           "tag": ("=", "!=", "^=", ">=", "<=", ">", "<")}
OPERATOR_CHARS = "=!<>^"
MAX_ID = 2**63 - 1  # SQLite INTEGER and FAISS idx_t: larger numbers name no item
# A condition is a name, an operator and a path, tag or date: 4,096 characters hold the longest path Linux allows.
MAX_CONDITION_CHARS = 4096
MAX_FILTERS = 64
SYNTAX = ("write FIELD OP VALUE, e.g. label=cat, path^=photos/2024/, added>=2026-01-01, tag.camera=X100 (fields: "
          "label, path, added, id, sha256, tag.NAME; operators: = != ^= < <= > >=)")


class FilterError(UsageError):
    """A filter that cannot be read, or names a value out of range: the message names the condition."""


@dataclass(frozen=True)
class Condition:
    """One filter term: ``field op value`` (``tag.NAME`` fields compare the tag's value as text).

    ``value`` is the text as given (stripped); ``number`` is the id of an ``id`` condition and ``time`` the UTC
    instant of an ``added`` one (``whole_day`` when only a date was given: it then means the whole UTC day).
    """

    field: str
    op: str
    value: str
    number: int | None = None
    time: datetime | None = None
    whole_day: bool = False

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"

    @property
    def tag(self) -> str | None:
        return self.field[4:] if self.field.startswith("tag.") else None


def parse_where(text: str | Condition) -> Condition:
    """``"label=cat"`` -> Condition; a FilterError that shows the syntax for anything else.

    Fields: label, path (absolute, or relative as answers show it), added (an ISO date or time, UTC unless it
    says otherwise), id, sha256, and tag.NAME. Operators: ``=``, ``!=``, ``^=`` (starts with), ``<``, ``<=``,
    ``>``, ``>=``. ``label=`` (nothing after it) matches items without a label; ``!=`` also matches items
    without the field.
    """
    if isinstance(text, Condition):
        return text
    if not isinstance(text, str):
        raise FilterError(f"a filter must be a string like 'label=cat', got {type(text).__name__}")
    if len(text) > MAX_CONDITION_CHARS:
        raise FilterError(f"filter {_show(text)} is {len(text):,} characters long; a condition may have at most "
                          f"{MAX_CONDITION_CHARS:,}")
    if not is_unicode(text):
        raise FilterError(f"filter {_show(text)} is not valid Unicode text (it holds a lone surrogate)")
    at = _first_operator(text)
    op = next((o for o in OPERATORS if text.startswith(o, at)), None) if at >= 0 else None
    field = text[:at].strip() if at >= 0 else ""
    kind = "tag" if field.startswith("tag.") else field
    tag_name = field[4:]
    if op is None or kind not in ALLOWED or kind == "tag" and (not tag_name or tag_name[0].isspace()):
        raise FilterError(f"cannot read the filter {_show(text)}: {SYNTAX}")
    if op not in ALLOWED[kind]:
        raise FilterError(f"filter {_show(text)}: {kind} takes {' '.join(ALLOWED[kind])}, not {op}")
    value = text[at + len(op):].strip()
    if field == "id":
        return Condition(field, op, value, number=_id(value, text))
    if field == "added":
        t, whole_day = parse_time(value, text)
        return Condition(field, op, value, time=t, whole_day=whole_day)
    return Condition(field, op, value)


def parse_filters(where: Iterable[str | Condition] | str | None) -> tuple[Condition, ...]:
    """Every condition of a filter (all must hold), validated; ``None`` or empty: no filter.

    The number of conditions and the length of each are checked before any is parsed.
    """
    if where is None:
        return ()
    if isinstance(where, (str, Condition)):
        where = [where]
    where = list(where) if not isinstance(where, (list, tuple)) else where
    if len(where) > MAX_FILTERS:
        raise FilterError(f"a filter has at most {MAX_FILTERS} conditions, got {len(where):,}")
    for w in where:
        if isinstance(w, str) and len(w) > MAX_CONDITION_CHARS:
            raise FilterError(f"filter {_show(w)} is {len(w):,} characters long; a condition may have at most "
                              f"{MAX_CONDITION_CHARS:,}")
    return tuple(parse_where(w) for w in where)


def parse_time(value: str, text: str = "") -> tuple[datetime, bool]:
    """An ``added`` value -> (UTC time, whether only a date was given); FilterError when it is not a date or time,
    or when it (or the day after it, which a date's ``=`` / ``>`` / ``<=`` need) lies outside years 1..9999."""
    text = text or f"added={value}"
    try:
        if len(value) == 10 and value[4] == "-" and value[7] == "-" and (value[:4] + value[5:7] + value[8:]).isdigit():
            d = date.fromisoformat(value)
            t, whole_day = datetime(d.year, d.month, d.day, tzinfo=timezone.utc), True
        else:
            t = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
            whole_day = False
    except ValueError as e:
        raise FilterError(f"filter {_show(text)}: added takes an ISO date or time (2026-01-01 or 2026-01-01T12:00), "
                          f"got {_show(value)}") from e
    try:
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
        if whole_day:
            t + timedelta(days=1)  # the end of the day must exist too
    except OverflowError:
        raise FilterError(f"filter {_show(text)}: the time is out of range (dates run from 0001-01-01 to "
                          "9999-12-30 in UTC)") from None
    return t, whole_day


def time_bounds(c: Condition) -> list[tuple[str, datetime]]:
    """The comparisons on the stored UTC time that an ``added`` condition means, all of which must hold.

    A date means its whole UTC day: ``added=D`` is ``>= D and < D+1``, ``added>D`` is ``>= D+1``, ``added<=D``
    is ``< D+1``; a time compares as it is.
    """
    if c.field != "added" or c.time is None:
        raise ValueError(f"{c} is not an 'added' condition")
    if not c.whole_day:
        return [(c.op, c.time)]
    start, end = c.time, c.time + timedelta(days=1)
    return {"=": [(">=", start), ("<", end)], ">=": [(">=", start)], "<": [("<", start)], ">": [(">=", end)],
            "<=": [("<", end)]}[c.op]


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (a lone surrogate, which JSON's \\ud800 escapes allow, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _id(value: str, text: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 25:
        raise FilterError(f"filter {_show(text)}: id takes a whole number")
    number = int(value)
    if number > MAX_ID:
        raise FilterError(f"filter {_show(text)}: id {value} is out of range (ids run from 1 to {MAX_ID})")
    return number


def _first_operator(text: str) -> int:
    """Where the first operator character is (-1: none): one pass per character class, so linear."""
    found = [i for i in (text.find(c) for c in OPERATOR_CHARS) if i >= 0]
    return min(found) if found else -1


def _show(text: str, limit: int = 80) -> str:
    """A condition as messages quote it: escaped (no lone surrogate reaches a terminal), and cut when long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
