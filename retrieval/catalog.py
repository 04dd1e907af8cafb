"""``items.sqlite``: what each FAISS id stands for (path, label, sha256 of the file, when it was added).

Catalogue ids are the FAISS ids. Every row carries the *generation* that added it and, once removed, the
generation that removed it; ``manifest.json`` names the committed generation. A reader only sees rows of
committed generations, and a writer rolls back what an interrupted write left behind (``recover``), so the
catalogue always describes exactly the index file that the manifest commits to, whatever was killed when.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

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
    removed     INTEGER                             -- the write that removed it (NULL while live)
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_path ON items (path);
"""


@dataclass(frozen=True)
class Item:
    """An image to index: where it is, its class (if any) and the sha256 of its bytes."""

    path: str
    sha256: str
    label: str | None = None


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    label: str | None
    sha256: str
    added: str
    generation: int
    removed: int | None


class Catalog:
    """One SQLite connection, shared by the threads of a server under a lock."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"catalogue {self.path} is missing")
            uri = f"file:{self.path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False, isolation_level=None)
        else:
            self.conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
            self.conn.executescript(_SCHEMA)
        self.lock = threading.RLock()

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

    def insert(self, items: Sequence[Item], generation: int, ids: Sequence[int] | None = None) -> list[int]:
        """Add rows for ``generation`` (pending until the manifest commits it); returns their ids."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.transaction() as c:  # BEGIN IMMEDIATE: no other writer can take ids meanwhile
            if ids is None:
                row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
                last = max(row[0] if row else 0, c.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
                ids = range(last + 1, last + 1 + len(items))
            out = [int(i) for i in ids]
            if len(out) != len(items):
                raise ValueError(f"{len(out)} ids for {len(items)} items")
            c.executemany("INSERT INTO items (id, path, label, sha256, added, generation) VALUES (?,?,?,?,?,?)",
                          ((i, it.path, it.label, it.sha256, now, generation) for i, it in zip(out, items)))
        return out

    def mark_removed(self, ids: Iterable[int], generation: int) -> None:
        with self.transaction() as c:
            for chunk in _chunks([int(i) for i in ids]):
                c.execute(f"UPDATE items SET removed = ? WHERE removed IS NULL AND id IN ({_marks(chunk)})",
                          (generation, *chunk))

    def recover(self, committed: int) -> int:
        """Undo what writes after the committed generation left (a crash between catalogue and manifest)."""
        with self.transaction() as c:
            n = c.execute("DELETE FROM items WHERE generation > ?", (committed,)).rowcount
            n += c.execute("UPDATE items SET removed = NULL WHERE removed > ?", (committed,)).rowcount
        return n

    def purge_removed(self, committed: int) -> int:
        """Forget removed rows once the committed index no longer holds their vectors."""
        with self.transaction() as c:
            return c.execute("DELETE FROM items WHERE removed IS NOT NULL AND removed <= ?", (committed,)).rowcount

    # ------------------------------------------------------------------ reads (as of a committed generation)

    def get(self, ids: Iterable[int], generation: int) -> dict[int, Row]:
        """Live rows by id; ids of removed or uncommitted rows are absent from the answer."""
        ids = [int(i) for i in ids]
        rows: dict[int, Row] = {}
        with self.lock:
            for chunk in _chunks(ids):
                for r in self.conn.execute(
                    f"SELECT * FROM items WHERE id IN ({_marks(chunk)}) AND generation <= ? "
                    "AND (removed IS NULL OR removed > ?)", (*chunk, generation, generation)):
                    rows[r[0]] = Row(*r)
        return rows

    def by_sha256(self, hashes: Iterable[str], generation: int) -> dict[str, int]:
        """Which of these file hashes are already live in the index (sha256 -> id)."""
        hashes = list(dict.fromkeys(hashes))
        found: dict[str, int] = {}
        with self.lock:
            for chunk in _chunks(hashes):
                for i, sha in self.conn.execute(
                    f"SELECT id, sha256 FROM items WHERE sha256 IN ({_marks(chunk)}) AND generation <= ? "
                    "AND (removed IS NULL OR removed > ?)", (*chunk, generation, generation)):
                    found.setdefault(sha, i)
        return found

    def by_path(self, paths: Iterable[str], generation: int) -> dict[str, list[int]]:
        paths = list(dict.fromkeys(paths))
        found: dict[str, list[int]] = {}
        with self.lock:
            for chunk in _chunks(paths):
                for i, p in self.conn.execute(
                    f"SELECT id, path FROM items WHERE path IN ({_marks(chunk)}) AND generation <= ? "
                    "AND (removed IS NULL OR removed > ?)", (*chunk, generation, generation)):
                    found.setdefault(p, []).append(i)
        return found

    def tombstones(self, generation: int, compacted: int = 0) -> np.ndarray:
        """Ids removed after the index was last compacted (by generation ``compacted``) and by ``generation``,
        whose vectors are still in an index that cannot remove them: int64 (T,)."""
        with self.lock:
            rows = self.conn.execute("SELECT id FROM items WHERE removed > ? AND removed <= ? AND generation <= ?",
                                     (compacted, generation, generation)).fetchall()
        return np.array(sorted(r[0] for r in rows), np.int64)

    def live_ids(self, generation: int) -> np.ndarray:
        with self.lock:
            rows = self.conn.execute("SELECT id FROM items WHERE generation <= ? AND (removed IS NULL OR removed > ?) "
                                     "ORDER BY id", (generation, generation)).fetchall()
        return np.array([r[0] for r in rows], np.int64)

    def count(self, generation: int) -> int:
        with self.lock:
            row = self.conn.execute("SELECT COUNT(*) FROM items WHERE generation <= ? "
                                    "AND (removed IS NULL OR removed > ?)", (generation, generation)).fetchone()
        return int(row[0])

    def labels(self, generation: int) -> dict[str, int]:
        """Items per label (None counted under an empty string), for ``mae index info``."""
        with self.lock:
            rows = self.conn.execute("SELECT COALESCE(label, ''), COUNT(*) FROM items WHERE generation <= ? "
                                     "AND (removed IS NULL OR removed > ?) GROUP BY 1 ORDER BY 1",
                                     (generation, generation)).fetchall()
        return {r[0]: r[1] for r in rows}


def _marks(chunk: Sequence) -> str:
    return ",".join("?" * len(chunk))


def _chunks(values: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
