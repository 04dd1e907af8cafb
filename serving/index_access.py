"""The index as one front worker uses it: every /search, /items, /duplicates, /info and thumbnail goes through here.

One ``IndexAccess`` per worker owns its ``retrieval.index.Index`` and the threads that touch it, and talks to it
only through the index's public methods, so any engine behind that interface serves unchanged:

- **Reads see writes at once.** Every read first calls ``Index.reload()``, which compares the manifest's ``stat``
  with the one this worker loaded (one system call) and reloads on a change. A write's 200 is sent after its
  commit, so any read that starts after that 200, in any worker, sees the write: the bound is the reload itself
  (reading the index file: milliseconds for thousands of items, about a second per GB).
- **Reads run on one thread**, off the event loop: FAISS parallelises each search internally, so more reader
  threads would only compete for the same cores. (The catalogue is one SQLite connection that any thread may use
  under the catalogue's lock; the index has a lock of its own, so a reload never swaps the files under a read.)
- **Writes run on another thread** and take ``INDEX/.lock``, as ``mae index add|remove`` do: one writer at a time
  across the CLI and every worker of every server, so reads go on while a write waits. A write that cannot get the
  lock within ``MAE_WRITE_WAIT_S`` seconds answers 409 (``serving.errors``): nothing changed, try again.
- **The near-duplicate scan** reads the whole index (each scan costs many searches, and holds the index's lock
  block by block): it runs on a third thread, once per generation and threshold. Answers are cached (``_scans``,
  the last ``SCAN_CACHE`` thresholds of the current generation) and a request for a scan already running waits for
  it. A new scan is bounded twice: a client may have one running (a second, at a new threshold, is answered 429
  with ``Retry-After``), and scans may take at most ``SCAN_SHARE`` of the time (after a scan of d seconds, none
  starts for 3d: 429 too). Refused rather than queued: a queued request would hold its connection and still add
  a full scan to the queue, while a 429 costs nothing and says when to come back. So no client, nor several, can
  keep the index busy scanning while /search waits for it.

Uploaded files (``POST /items``) are stored in the index's uploads folder under their sha256 (the catalogue points
at them, thumbnails read them); bytes the index already holds are not stored again, and the answer names the item
that holds them. Images are embedded before the write is queued, so the lock is held only for the commit. Uploads
that a killed writer stored but never committed are removed when the server starts and after its writes
(``retrieval.uploads``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from mae.files import write_bytes_atomic
from serving.errors import NO_INDEX, RequestError
from serving.images import Upload

if TYPE_CHECKING:
    from retrieval.catalog import Item, Row
    from retrieval.index import Hit, Index

log = logging.getLogger("mae.serving")

T = TypeVar("T")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
SCAN_CACHE = 8
"""Near-duplicate answers kept per generation (one per threshold asked)."""
SCAN_SHARE = 0.25
"""The most of the time near-duplicate scans may take: a scan of d seconds is followed by 3d without a new one."""


@dataclass(frozen=True)
class Found(Generic[T]):
    """What a read or write found, with the index's size and generation right after it (answers report both)."""

    value: T
    count: int
    generation: int


@dataclass(frozen=True)
class Added:
    """``POST /items``: the new items, and for each upload whose bytes the index already held, the holder."""

    rows: list[Row]
    duplicates: list[tuple[str, int]]
    """(upload label, id of the item holding the same bytes), in upload order."""


class IndexAccess:
    """One worker's index, its reader, writer and scan threads, and how answers show its paths."""

    def __init__(self, path: str | None, artifact_sha256: str, *, write_wait_s: float = 10.0,
                 absolute_paths: bool = False) -> None:
        """``path``: the index (none: /search and the item routes answer that there is none). ``absolute_paths``:
        answers show server paths instead of paths relative to the indexed folders."""
        self.absolute_paths = absolute_paths
        self._index: Index | None = None
        if path:
            from retrieval.index import Index

            self._index = Index.open(path, artifact_sha256=artifact_sha256)
            self._index.lock_timeout = write_wait_s
            self._index.compact_in_background = True  # a POST /items must not wait for a fold of the collection
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-index")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-index-write")
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-duplicates")
        self._scans: OrderedDict[tuple[int, float], list[list[tuple[int, float]]]] = OrderedDict()
        self._running: dict[tuple[int, float], asyncio.Future] = {}  # scans under way, shared by their askers
        self._scanning: dict[str, tuple[int, float]] = {}  # client -> the scan it started and waits for
        self._scan_seconds = 1.0  # the last scan's duration: a 429's Retry-After
        self._next_scan = 0.0  # time.monotonic() from which a new scan may start (SCAN_SHARE)
        self._swept = 0.0
        if self._index is not None:
            self._writer.submit(self._sweep)  # uploads a killed writer left behind

    @property
    def loaded(self) -> bool:
        """Whether this server has an index."""
        return self._index is not None

    def require(self) -> None:
        """A 400 now when this server has no index: before a request's images are read and embedded."""
        self._need()

    def _need(self) -> Index:
        """The index, for calls on this object's threads; a 400 naming the way out when the server has none."""
        if self._index is None:
            raise RequestError(NO_INDEX)
        return self._index

    # ------------------------------------------------------------------ threads

    async def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Found[T]:
        """``fn`` on the reader thread after picking up any committed write (see the module docstring)."""
        index = self._need()

        def fresh() -> Found[T]:
            if index.reload():
                log.info("index %s reloaded: %d items, generation %d", index.name, index.count, index.generation)
            return Found(fn(*args, **kwargs), index.count, index.generation)

        return await asyncio.get_running_loop().run_in_executor(self._reader, fresh)

    async def _write(self, fn: Callable[..., T], *args: Any) -> Found[T]:
        index = self._need()

        def commit() -> Found[T]:
            return Found(fn(*args), index.count, index.generation)

        return await asyncio.get_running_loop().run_in_executor(self._writer, commit)

    # ------------------------------------------------------------------ reads

    async def search(self, vectors: np.ndarray, k: int, where: list[str] | None = None,
                     min_score: float | None = None) -> Found[list[list[Hit]]]:
        """The k nearest items to each of ``vectors`` (N, D), best first."""
        return await self._read(partial(self._need().search, where=where or [], min_score=min_score), vectors, k)

    async def row(self, item_id: int) -> Row:
        """The catalogue row of a live item; a 404 for any other id."""
        return (await self._read(self._row, item_id)).value

    async def similar(self, item_id: int, k: int, where: list[str] | None = None,
                      min_score: float | None = None) -> Found[tuple[Row, list[Hit]]]:
        """"More like this": an item and its k nearest others."""

        def run() -> tuple[Row, list[Hit]]:
            return self._row(item_id), self._need().similar(item_id, k, where=where, min_score=min_score)

        return await self._read(run)

    async def duplicates(self, threshold: float, limit: int, client: str = "?"
                         ) -> Found[tuple[list[list[tuple[Row, float]]], int]]:
        """The first ``limit`` groups of near-copies (each member's row and best cosine) and how many there are.

        The scan covers the whole index: it runs on the scan thread, once per generation and threshold (see the
        module docstring); ``client`` (its address) may have one scan running at a time, or gets a 429.
        """
        index = self._need()
        if (index.generation, threshold) not in self._scans and (index.generation, threshold) not in self._running:
            self._refuse_scan(client)  # before the reader thread is asked anything: a refusal costs nothing
        generation = (await self._read(lambda: None)).generation
        key = (generation, threshold)
        groups = self._scans.get(key)
        if groups is not None:
            self._scans.move_to_end(key)
        else:
            groups = await self._scan(index, key, client)
        shown = groups[:limit]

        def rows() -> tuple[list[list[tuple[Row, float]]], int]:
            found = index.rows([i for g in shown for i, _ in g])
            return [[(found[i], s) for i, s in g if i in found] for g in shown], len(groups)

        return await self._read(rows)

    async def _scan(self, index: Index, key: tuple[int, float], client: str) -> list[list[tuple[int, float]]]:
        """The groups of ``key`` = (generation, threshold): a scan already under way is waited for; a new one is
        started unless ``client`` has one running, or scans have had their share of the time (429)."""
        running = self._running.get(key)
        if running is None:
            self._refuse_scan(client)
            self._scanning[client] = key
            running = self._running[key] = asyncio.ensure_future(self._run_scan(index, key, client))
        return await asyncio.shield(running)  # a client that hangs up does not cancel the scan for the others

    def _refuse_scan(self, client: str) -> None:
        """A 429 with Retry-After when a new scan may not start now (see the module docstring)."""
        now = time.monotonic()
        if client in self._scanning:
            why = (f"a near-duplicate scan of yours (threshold {self._scanning[client][1]}) is still running: one at a "
                   "time per client")
            wait = self._scan_seconds
        elif self._running or now < self._next_scan:
            why = (f"near-duplicate scans read the whole index and may take at most {SCAN_SHARE:.0%} of the server's "
                   "time; one is running or has just run")
            wait = max(self._next_scan - now, self._scan_seconds if self._running else 0.0)
        else:
            return
        seconds = max(1, math.ceil(wait))
        raise RequestError(f"{why}; ask again in {seconds} s (thresholds asked before are answered at once)",
                           HTTPStatus.TOO_MANY_REQUESTS, {"Retry-After": str(seconds)})

    async def _run_scan(self, index: Index, key: tuple[int, float], client: str) -> list[list[tuple[int, float]]]:
        started = time.monotonic()
        try:
            groups = await asyncio.get_running_loop().run_in_executor(self._scanner, index.duplicates, key[1])
        finally:
            del self._scanning[client]
            del self._running[key]
            self._scan_seconds = time.monotonic() - started
            self._next_scan = time.monotonic() + self._scan_seconds * (1 / SCAN_SHARE - 1)
        if any(k[0] > key[0] for k in self._scans):  # a write came and was scanned meanwhile: this one is stale
            return groups
        for old in [k for k in self._scans if k[0] < key[0]]:
            del self._scans[old]
        self._scans[key] = groups
        while len(self._scans) > SCAN_CACHE:
            self._scans.popitem(last=False)
        return groups

    async def summary(self) -> dict[str, Any]:
        """The index as /info shows it: its folder's name (the whole path only with absolute paths), size,
        generation, labels and the default near-duplicate threshold."""
        from retrieval.index import DUPLICATE_THRESHOLD

        index = self._need()
        found = await self._read(index.labels)
        return {"path": index.name if self.absolute_paths else Path(index.name).name, "count": found.count,
                "generation": found.generation, "labels": found.value, "duplicate_threshold": DUPLICATE_THRESHOLD}

    def _row(self, item_id: int) -> Row:
        row = self._need().row(item_id)
        if row is None:
            raise RequestError(f"no item {item_id} in the index", 404)
        return row

    # ------------------------------------------------------------------ writes

    async def add(self, uploads: Sequence[Upload], vectors: np.ndarray, labels: Sequence[str | None],
                  tags: Sequence[dict[str, str] | None]) -> Found[Added]:
        """Store the uploads and add them with their embeddings (N, D); see the module docstring."""
        return await self._write(self._add, uploads, vectors, labels, tags)

    async def remove(self, item_id: int) -> Found[list[int]]:
        """Remove an item (a 404 when there is none), and its stored upload if it came over HTTP."""
        return await self._write(self._remove, item_id)

    def _add(self, uploads: Sequence[Upload], vectors: np.ndarray, labels: Sequence[str | None],
             tags: Sequence[dict[str, str] | None]) -> Added:
        from retrieval.catalog import Item

        index = self._need()
        items = [Item(str(index.uploads / f"{sha[:16]}-{_file_name(u)}"), sha, label, tag)
                 for u, sha, label, tag in zip(uploads, [hashlib.sha256(u.data).hexdigest() for u in uploads],
                                               labels, tags)]
        written = self._store(uploads, items)
        try:
            result = index.add(vectors, items)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        self._sweep_now_and_then()
        rows = index.rows(result.ids)
        added = {rows[i].sha256: i for i in result.ids}
        # A writer elsewhere may have indexed the same bytes first: its item keeps its own file, ours goes.
        raced = [str(path) for path, sha in written.items() if sha not in added]
        still_used = index.ids_by_path(raced) if raced else {}
        for path in raced:
            if path not in still_used:
                Path(path).unlink(missing_ok=True)
        # Index.add keeps the first file of each new content and reports every other one, in order, with the
        # live item holding its bytes (None: an earlier file of this call, which is now in ``added``).
        duplicates, first = [], set()
        holders = iter(result.duplicate_ids)
        for upload, it in zip(uploads, items):
            if it.sha256 in added and it.sha256 not in first:
                first.add(it.sha256)
                continue
            holder = next(holders)
            duplicates.append((upload.label, added[it.sha256] if holder is None else holder))
        return Added([rows[i] for i in result.ids], duplicates)

    def _store(self, uploads: Sequence[Upload], items: Sequence[Item]) -> dict[Path, str]:
        """Write the uploads whose bytes neither the index nor an earlier upload of this request holds; returns
        the files written, with their sha256."""
        stored = set(self._need().ids_by_sha256([it.sha256 for it in items]))
        written = {}
        for upload, it in zip(uploads, items):
            path = Path(it.path)
            if it.sha256 not in stored:
                try:
                    os.utime(path)  # a file left by a killed writer, about to be named: not an orphan any more
                except FileNotFoundError:
                    path.parent.mkdir(exist_ok=True)
                    write_bytes_atomic(path, upload.data)
                    written[path] = it.sha256
            stored.add(it.sha256)
        return written

    def _sweep(self) -> None:
        """Remove stored uploads that no committed generation names (``retrieval.uploads``); on the writer thread."""
        from retrieval.uploads import remove_orphan_uploads

        self._swept = time.monotonic()
        try:
            removed = remove_orphan_uploads(self._need())
        except Exception as e:  # noqa: BLE001 - housekeeping: a damaged index is reported by the requests
            log.warning("could not look for orphan uploads: %s", e)
            return
        if removed:
            log.info("removed %d stored upload(s) that no item names (left by a writer killed before its commit)",
                     len(removed))

    def _sweep_now_and_then(self) -> None:
        from retrieval.uploads import SWEEP_EVERY_S

        if time.monotonic() - self._swept >= SWEEP_EVERY_S:
            self._sweep()

    def _remove(self, item_id: int) -> list[int]:
        index = self._need()
        result = index.remove([item_id])
        if not result.ids:
            raise RequestError(f"no item {item_id} in the index", 404)
        self._sweep_now_and_then()
        uploaded = [p for p in result.paths if Path(p).parent == index.uploads]
        still_used = index.ids_by_path(uploaded) if uploaded else {}
        for path in uploaded:
            if path not in still_used:
                Path(path).unlink(missing_ok=True)  # the stored upload; a collection's own files are never deleted
        return result.ids

    # ------------------------------------------------------------------ answers

    def shown(self, path: str) -> str:
        """A path as answers give it: relative to the indexed folders, absolute only when configured so."""
        return path if self.absolute_paths else self._need().relative(path)

    def item_json(self, row: Row) -> dict[str, Any]:
        return {"id": row.id, "path": self.shown(row.path), "label": row.label, "tags": row.tags or {},
                "added": row.added, "thumbnail": f"/thumbnail/{row.id}", "similar": f"/items/{row.id}/similar"}

    def hit_json(self, hit: Hit) -> dict[str, Any]:
        return {"id": hit.id, "score": hit.score, "path": self.shown(hit.path), "label": hit.label,
                "tags": hit.tags or {}, "thumbnail": f"/thumbnail/{hit.id}"}


def _file_name(upload: Upload) -> str:
    """A safe file name for a stored upload: the client's, cleaned, or ``image.<format>``."""
    name = _SAFE.sub("_", Path(upload.filename).name).strip("._")[-80:] if upload.filename else ""
    if "." not in name:
        from PIL import Image

        try:
            fmt = (Image.open(io.BytesIO(upload.data)).format or "bin").lower()
        except Exception:  # noqa: BLE001 - decoding was checked before; only the extension is at stake
            fmt = "bin"
        name = f"{name or 'image'}.{'jpg' if fmt == 'jpeg' else fmt}"
    return name
