"""``items.sqlite``: what each FAISS id stands for (path, label, sha256 of the file, when it was added, tags).

Catalogue ids are the FAISS ids. Every row carries the *generation* that added it and, once removed, the
generation that removed it; ``manifest.json`` names the committed generation. A reader only sees rows of
committed generations, and a writer rolls back what an interrupted write left behind (``recover``), so the
catalogue always describes exactly the index file that the manifest commits to, whatever was killed when.

An existing catalogue is never created anew: a missing, empty or damaged file is a ``CatalogError``, because
an empty catalogue beside a full FAISS index would hand out ids that the index already holds (an old vector
would then answer as a new file). Only ``Catalog.create`` makes one, when an index is built.

Filters (``mae search --where``, ``/search``'s ``where``) are parsed by ``retrieval.filters`` and turned into
SQL here (``Catalog.select``), then into an id selector for FAISS by the FAISS engine: ``label=cat``,
``path^=photos/2024/``, ``added>=2026-01-01``, ``tag.camera=X100``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mae.errors import UsageError, UserError
from retrieval.filters import MAX_ID, Condition, is_unicode, parse_filters, parse_where, time_bounds

__all__ = ["FILENAME", "MAX_ID", "Catalog", "CatalogError", "Condition", "Item", "Row", "check_items", "clean_label",
           "clean_tags", "parse_filters", "parse_where", "row_of"]

FILENAME = "items.sqlite"
_CHUNK = 900  # stays under SQLite's default limit of 999 bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; AUTOINCREMENT never reuses an id
    path        TEXT NOT NULL,                      -- absolute path of the image file
    label       TEXT,                               -- class folder name, when the collection has them
    sha256      TEXT NOT NULL,                      -- of the file's bytes: duplicate files are indexed once
    added       TEXT NOT NULL,                      -- UTC, ISO 8601
    generation  INTEGER NOT NULL,                   -- the write that added the row
    removed     INTEGER,                            -- the write that removed it (NULL while live)
    tags        TEXT                                -- JSON object of free-form tags, or NULL
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_path ON items (path);
"""
# Added after the first release: created on open (writable) for catalogues that predate them.
_SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS tags (            -- the same tags, one row per (key, value), for filtering
    id     INTEGER NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL
);
-- not a WITHOUT ROWID table: SQLite 3.40's quick_check reports false NULLs in those
CREATE UNIQUE INDEX IF NOT EXISTS tags_key ON tags (key, value, id);
CREATE INDEX IF NOT EXISTS tags_id ON tags (id);
CREATE INDEX IF NOT EXISTS items_label ON items (label);
CREATE INDEX IF NOT EXISTS items_added ON items (added);
"""
# Added with the append log: a write's recovery and the tombstone query look rows up by generation and removal,
# which without these would scan the whole table (50-100 ms at a million rows) on every write.
_SCHEMA_3 = """
CREATE INDEX IF NOT EXISTS items_generation ON items (generation);
CREATE INDEX IF NOT EXISTS items_removed ON items (removed);
"""
_LIVE = "generation <= ? AND (removed IS NULL OR removed > ?)"


class CatalogError(UserError, RuntimeError):
    """``items.sqlite`` is missing, empty or damaged: the index cannot say what its vectors stand for."""


@dataclass(frozen=True)
class Item:
    """An image to index: where it is, the sha256 of its bytes, its class (if any) and free-form tags."""

    path: str
    sha256: str
    label: str | None = None
    tags: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    label: str | None
    sha256: str
    added: str
    generation: int
    removed: int | None
    tags: dict[str, str] | None = None


# ----------------------------------------------------------------------------------------------- filters as SQL


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="seconds")  # the stored format: 2026-01-01T00:00:00+00:00


def _prefix_range(column: str, prefix: str) -> tuple[str, list[Any]]:
    """``column`` starts with ``prefix``, as a range an index can serve (text compares by UTF-8 bytes)."""
    return f"({column} >= ? AND {column} < ?)", [prefix, prefix + "\U0010ffff"]


def _clause(c: Condition, path_prefixes: Callable[[str], list[str]], has_tags: bool) -> tuple[str, list[Any]]:
    """SQL for one condition (``retrieval.filters``) over ``items``, and its parameters."""
    negate = c.op == "!="
    op = "=" if negate else c.op
    if c.tag is not None:
        if not has_tags:
            return ("1" if negate else "0"), []
        if op == "^=":
            inner, params = _prefix_range("value", c.value)
        else:
            inner, params = f"value {op} ?", [c.value]
        sql = f"id {'NOT IN' if negate else 'IN'} (SELECT id FROM tags WHERE key = ? AND {inner})"
        return sql, [c.tag, *params]
    if c.field == "id":
        return f"id {'!=' if negate else op} ?", [c.number]
    if c.field == "added":
        bounds = time_bounds(c)
        return "(" + " AND ".join(f"added {o} ?" for o, _ in bounds) + ")", [_stamp(t) for _, t in bounds]
    if c.field == "label" and c.value == "" and op == "=":
        return ("label IS NOT NULL" if negate else "label IS NULL"), []
    if c.field == "path":
        values = path_prefixes(c.value)
        if op == "^=":
            parts = [_prefix_range("path", v) for v in values]
        else:
            parts = [("path = ?", [v]) for v in values]
        sql = "(" + " OR ".join(p[0] for p in parts) + ")" if parts else "0"
        params = [x for p in parts for x in p[1]]
        return (f"NOT {sql}" if negate else sql), params
    column = c.field
    if op == "^=":
        sql, params = _prefix_range(column, c.value)
    else:
        sql, params = f"{column} = ?", [c.value]
    return (f"({column} IS NULL OR NOT {sql})" if negate else sql), params


# ----------------------------------------------------------------------------------------------- the catalogue

T = TypeVar("T")


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn SQLite's corruption errors into a CatalogError that names the file (not a traceback)."""

    @wraps(method)
    def call(self: Catalog, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
                raise
            raise CatalogError(f"{self.path} is damaged ({e})") from e

    return call


class Catalog:
    """One SQLite connection, shared by the threads of a server under a lock."""

    def __init__(self, path: str | Path, read_only: bool = False, *, create: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.lock = threading.RLock()
        if not create:
            if not self.path.exists():
                raise CatalogError(f"{self.path} is missing")
            if self.path.stat().st_size == 0:
                raise CatalogError(f"{self.path} is empty (0 bytes)")
        try:
            if read_only:
                uri = f"file:{self.path}?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False, isolation_level=None)
            else:
                self.conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                            isolation_level=None)
        except sqlite3.Error as e:
            raise CatalogError(f"cannot open {self.path} ({e})") from e
        try:
            self._prepare(create)
        except BaseException:
            self.conn.close()
            raise

    @classmethod
    def create(cls, path: str | Path) -> Catalog:
        """A new, empty catalogue (``mae index build``); refuses to reuse a file that exists."""
        if Path(path).exists():
            raise FileExistsError(f"{path} already exists")
        return cls(path, create=True)

    @_guarded
    def _prepare(self, create: bool) -> None:
        if create:
            self.conn.executescript(_SCHEMA + _SCHEMA_2 + _SCHEMA_3)
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "items" not in tables:
            raise CatalogError(f"{self.path} has no items table: it is not an index catalogue")
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(items)")}
        if not self.read_only and ("tags" not in columns or "tags" not in tables):
            with self.transaction() as c:  # a catalogue from before tags: add them (a quick schema change)
                if "tags" not in columns:
                    c.execute("ALTER TABLE items ADD COLUMN tags TEXT")
            self.conn.executescript(_SCHEMA_2)
            columns.add("tags")
            tables.add("tags")
        indexes = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        if not self.read_only and not {"items_generation", "items_removed"} <= indexes:
            self.conn.executescript(_SCHEMA_3)  # once, for a catalogue from before the log (seconds at 1M rows)
        self._has_tags = "tags" in tables
        # the SELECT list that ``row_of`` reads (tags as NULL in a read-only catalogue from before tags)
        self.columns = "id, path, label, sha256, added, generation, removed, " + (
            "tags" if "tags" in columns else "NULL")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing: a crash inside leaves the catalogue as it was before ``BEGIN``."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    @_guarded
    def insert(self, items: Sequence[Item], generation: int, ids: Sequence[int] | None = None) -> list[int]:
        """Add rows for ``generation`` (pending until the manifest commits it); returns their ids."""
        check_items(items)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.transaction() as c:  # BEGIN IMMEDIATE: no other writer can take ids meanwhile
            if ids is None:
                first = self._next_id(c)
                ids = range(first, first + len(items))
            out = [int(i) for i in ids]
            if len(out) != len(items):
                raise ValueError(f"{len(out)} ids for {len(items)} items")
            tags = [clean_tags(it.tags) for it in items]
            c.executemany("INSERT INTO items (id, path, label, sha256, added, generation, tags) VALUES (?,?,?,?,?,?,?)",
                          ((i, it.path, it.label, it.sha256, now, generation,
                            json.dumps(t, ensure_ascii=False, sort_keys=True) if t else None)
                           for i, it, t in zip(out, items, tags)))
            c.executemany("INSERT OR IGNORE INTO tags (id, key, value) VALUES (?,?,?)",
                          ((i, k, v) for i, t in zip(out, tags) for k, v in (t or {}).items()))
        return out

    @_guarded
    def restore(self, rows: Sequence[Row]) -> None:
        """Insert rows exactly as they were (ids, dates, generations, tags): ``mae index check --repair``."""
        with self.transaction() as c:
            c.executemany("INSERT INTO items (id, path, label, sha256, added, generation, removed, tags) "
                          "VALUES (?,?,?,?,?,?,?,?)",
                          ((r.id, r.path, r.label, r.sha256, r.added, r.generation, r.removed,
                            json.dumps(r.tags, ensure_ascii=False, sort_keys=True) if r.tags else None)
                           for r in rows))
            c.executemany("INSERT OR IGNORE INTO tags (id, key, value) VALUES (?,?,?)",
                          ((r.id, k, v) for r in rows for k, v in (r.tags or {}).items()))

    @_guarded
    def update_metadata(self, updates: Sequence[tuple[int, str | None, Mapping[str, Any] | None]]) -> int:
        """Set (id, label, tags) of existing rows; tags replace the old ones. Returns the rows changed."""
        n = 0
        with self.transaction() as c:
            for i, label, tags in updates:
                clean, label = clean_tags(tags), clean_label(label)
                n += c.execute("UPDATE items SET label = ?, tags = ? WHERE id = ?",
                               (label, json.dumps(clean, ensure_ascii=False, sort_keys=True) if clean else None,
                                int(i))).rowcount
                c.execute("DELETE FROM tags WHERE id = ?", (int(i),))
                c.executemany("INSERT OR IGNORE INTO tags (id, key, value) VALUES (?,?,?)",
                              ((int(i), k, v) for k, v in (clean or {}).items()))
        return n

    @_guarded
    def mark_removed(self, ids: Iterable[int], generation: int) -> None:
        with self.transaction() as c:
            for chunk in _chunks([int(i) for i in ids]):
                c.execute(f"UPDATE items SET removed = ? WHERE removed IS NULL AND id IN ({_marks(chunk)})",
                          (generation, *chunk))

    @_guarded
    def recover(self, committed: int) -> int:
        """Undo what writes after the committed generation left (a crash between catalogue and manifest)."""
        with self.lock:  # a read first: most writes find nothing to undo, and a transaction costs an fsync
            if not self.conn.execute("SELECT EXISTS (SELECT 1 FROM items WHERE generation > ?) OR EXISTS "
                                     "(SELECT 1 FROM items WHERE removed > ?)", (committed, committed)).fetchone()[0]:
                return 0
        with self.transaction() as c:
            c.execute("DELETE FROM tags WHERE id IN (SELECT id FROM items WHERE generation > ?)", (committed,))
            n = c.execute("DELETE FROM items WHERE generation > ?", (committed,)).rowcount
            n += c.execute("UPDATE items SET removed = NULL WHERE removed > ?", (committed,)).rowcount
        return n

    @_guarded
    def purge_removed(self, committed: int) -> int:
        """Forget removed rows once the committed index no longer holds their vectors."""
        with self.lock:
            found = self.conn.execute("SELECT EXISTS (SELECT 1 FROM items WHERE removed <= ?)", (committed,))
            if not found.fetchone()[0]:
                return 0
        with self.transaction() as c:
            c.execute("DELETE FROM tags WHERE id IN (SELECT id FROM items WHERE removed IS NOT NULL AND removed <= ?)",
                      (committed,))
            return c.execute("DELETE FROM items WHERE removed IS NOT NULL AND removed <= ?", (committed,)).rowcount

    @_guarded
    def delete(self, ids: Iterable[int]) -> int:
        """Forget rows outright, whatever their generation (``mae index check --repair`` only)."""
        n = 0
        with self.transaction() as c:
            for chunk in _chunks([int(i) for i in ids]):
                c.execute(f"DELETE FROM tags WHERE id IN ({_marks(chunk)})", chunk)
                n += c.execute(f"DELETE FROM items WHERE id IN ({_marks(chunk)})", chunk).rowcount
        return n

    @_guarded
    def reserve_ids(self, above: int) -> None:
        """Make every future id larger than ``above`` (ids must never repeat one the FAISS index holds)."""
        with self.transaction() as c:
            if self._next_id(c) <= above:
                if c.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'items'").fetchone():
                    c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'items'", (int(above),))
                else:
                    c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('items', ?)", (int(above),))

    # ------------------------------------------------------------------ reads (as of a committed generation)

    @_guarded
    def get(self, ids: Iterable[int], generation: int) -> dict[int, Row]:
        """Live rows by id; ids of removed or uncommitted rows (or beyond any id) are absent from the answer."""
        ids = [int(i) for i in ids if 0 <= int(i) <= MAX_ID]
        rows: dict[int, Row] = {}
        with self.lock:
            for chunk in _chunks(ids):
                for r in self.conn.execute(
                    f"SELECT {self.columns} FROM items WHERE id IN ({_marks(chunk)}) AND {_LIVE}",
                    (*chunk, generation, generation)):
                    rows[r[0]] = row_of(r)
        return rows

    @_guarded
    def by_sha256(self, hashes: Iterable[str], generation: int) -> dict[str, int]:
        """Which of these file hashes are already live in the index (sha256 -> id)."""
        hashes = list(dict.fromkeys(hashes))
        found: dict[str, int] = {}
        with self.lock:
            for chunk in _chunks(hashes):
                for i, sha in self.conn.execute(
                    f"SELECT id, sha256 FROM items WHERE sha256 IN ({_marks(chunk)}) AND {_LIVE}",
                    (*chunk, generation, generation)):
                    found.setdefault(sha, i)
        return found

    @_guarded
    def by_path(self, paths: Iterable[str], generation: int) -> dict[str, list[int]]:
        paths = list(dict.fromkeys(paths))
        found: dict[str, list[int]] = {}
        with self.lock:
            for chunk in _chunks(paths):
                for i, p in self.conn.execute(
                    f"SELECT id, path FROM items WHERE path IN ({_marks(chunk)}) AND {_LIVE}",
                    (*chunk, generation, generation)):
                    found.setdefault(p, []).append(i)
        return found

    @_guarded
    def select(self, conditions: Sequence[Condition], generation: int,
               path_prefixes: Callable[[str], list[str]] = lambda v: [v]) -> np.ndarray:
        """Ids of the live items that meet every condition, ascending: int64 (M,).

        ``path_prefixes`` turns a path value as users write it (relative to the indexed roots) into the
        absolute values stored here.
        """
        sql, params = [_LIVE], [generation, generation]
        for c in conditions:
            s, p = _clause(c, path_prefixes, self._has_tags)
            sql.append(s)
            params += p
        with self.lock:
            cursor = self.conn.execute(f"SELECT id FROM items WHERE {' AND '.join(sql)} ORDER BY id", params)
            return np.fromiter((r[0] for r in cursor), np.int64)

    @_guarded
    def tombstones(self, generation: int, compacted: int = 0) -> np.ndarray:
        """Ids removed after the index was last compacted (by generation ``compacted``) and by ``generation``,
        whose vectors are still in an index that cannot remove them: int64 (T,)."""
        with self.lock:
            rows = self.conn.execute("SELECT id FROM items WHERE removed > ? AND removed <= ? AND generation <= ?",
                                     (compacted, generation, generation)).fetchall()
        return np.array(sorted(r[0] for r in rows), np.int64)

    @_guarded
    def live_ids(self, generation: int) -> np.ndarray:
        with self.lock:
            cursor = self.conn.execute(f"SELECT id FROM items WHERE {_LIVE} ORDER BY id", (generation, generation))
            return np.fromiter((r[0] for r in cursor), np.int64)

    @_guarded
    def rows(self, generation: int | None = None) -> list[Row]:
        """Every row (all generations when ``generation`` is None), for ``mae index check``."""
        with self.lock:
            if generation is None:
                cursor = self.conn.execute(f"SELECT {self.columns} FROM items ORDER BY id")
            else:
                cursor = self.conn.execute(f"SELECT {self.columns} FROM items WHERE {_LIVE} ORDER BY id",
                                           (generation, generation))
            return [row_of(r) for r in cursor]

    @_guarded
    def count(self, generation: int) -> int:
        with self.lock:
            row = self.conn.execute(f"SELECT COUNT(*) FROM items WHERE {_LIVE}", (generation, generation)).fetchone()
        return int(row[0])

    @_guarded
    def next_id(self) -> int:
        """The id the next insert would take (never one used before, even by a removed row)."""
        with self.lock:
            return self._next_id(self.conn)

    @staticmethod
    def _next_id(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        return max(row[0] if row else 0, c.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]) + 1

    @_guarded
    def max_generation(self) -> int:
        with self.lock:
            row = self.conn.execute("SELECT MAX(MAX(generation), COALESCE(MAX(removed), 0)) FROM items").fetchone()
        return int(row[0] or 0)

    @_guarded
    def labels(self, generation: int) -> dict[str, int]:
        """Items per label (None counted under an empty string), for ``mae index info``."""
        with self.lock:
            rows = self.conn.execute(f"SELECT COALESCE(label, ''), COUNT(*) FROM items WHERE {_LIVE} "
                                     "GROUP BY 1 ORDER BY 1", (generation, generation)).fetchall()
        return {r[0]: r[1] for r in rows}

    @_guarded
    def tag_keys(self, generation: int, limit: int = 50) -> dict[str, int]:
        """Items per tag key (most used first), for ``mae index info`` and the page's filter hints."""
        if not self._has_tags:
            return {}
        with self.lock:
            rows = self.conn.execute(
                f"SELECT t.key, COUNT(*) FROM tags t JOIN items i ON i.id = t.id WHERE {_LIVE} "
                "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", (generation, generation, limit)).fetchall()
        return {r[0]: r[1] for r in rows}

    @_guarded
    def integrity(self) -> str:
        """SQLite's own check of the file ("ok" when sound)."""
        with self.lock:
            rows = self.conn.execute("PRAGMA quick_check").fetchall()
        return "; ".join(str(r[0]) for r in rows[:5])


def row_of(r: Sequence[Any]) -> Row:
    """A Row from one result of ``SELECT {Catalog.columns}``."""
    tags = json.loads(r[7]) if r[7] else None
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tags)


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Tags as text: keys non-empty strings, values strings (numbers and booleans written as JSON would).

    A UsageError (a ValueError) for anything else, text that is not valid Unicode included: nothing is stored.
    """
    if not tags:
        return None
    if not isinstance(tags, Mapping):
        raise UsageError(f"tags must be an object of name: value, got {type(tags).__name__}")
    out = {}
    for k, v in tags.items():
        if not isinstance(k, str) or not k.strip() or any(ch in k for ch in "=!<>^"):
            raise UsageError(f"tag name {k!r} must be non-empty text without = ! < > ^")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float)):
            v = json.dumps(v)
        elif not isinstance(v, str):
            raise UsageError(f"tag {k!r}: values are text or numbers, got {type(v).__name__}")
        if not is_unicode(k) or not is_unicode(v):
            raise UsageError(f"tag {k!r}: names and values must be valid Unicode text (no lone surrogates)")
        out[k.strip()] = v
    return out


_clean_tags = clean_tags  # the old name, for callers that have not moved yet


def clean_label(label: Any) -> str | None:
    """A label as stored: text (valid Unicode) or None; a UsageError otherwise, before anything is written."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise UsageError(f"a label is text, got {type(label).__name__}")
    if not is_unicode(label):
        raise UsageError(f"the label {label!r} is not valid Unicode text (it holds a lone surrogate)")
    return label


def check_items(items: Sequence[Item]) -> None:
    """Refuse, before anything is stored, an item whose path, label or tags cannot be stored."""
    for it in items:
        if not isinstance(it.path, str) or not is_unicode(it.path):
            raise UsageError(f"the path {it.path!r} is not valid Unicode text")
        clean_label(it.label)
        clean_tags(it.tags)


def _marks(chunk: Sequence) -> str:
    return ",".join("?" * len(chunk))


def _chunks(values: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
