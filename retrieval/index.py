"""FAISS similarity index over embeddings: choose, train, fill, tune, change, save, load and search.

On disk, ``INDEX/`` holds::

    index.faiss     the FAISS index (catalogue ids are FAISS ids), inner product on L2-normalised vectors
    items.sqlite    what each id stands for (retrieval.catalog)
    manifest.json   artifact sha256, dim, metric, factory, count, tuned search parameters, build figures,
                    the indexed folders (``images``); its ``generation`` is the commit point of every write
    lists.G.ivfdata the inverted lists of an on-disk IVF index (sharded builds), memory-mapped
    uploads/        images added over HTTP (``POST /items``), named by their sha256

**Writes are two-phase.** A write of generation G+1 (build, add, remove) first stores its catalogue rows
tagged G+1 (one SQLite transaction), then writes ``index.G+1.faiss`` (temp file + fsync + rename), then
replaces ``manifest.json`` (temp file + fsync + rename: the commit point), then renames ``index.G+1.faiss``
over ``index.faiss``. Whatever instant a SIGKILL lands, the manifest names a generation whose index file
exists (``index.G.faiss`` or ``index.faiss``) and whose catalogue rows are exactly those tagged <= G;
readers ignore the rest and the next writer rolls it back (``Index._recover``). One writer at a time:
``INDEX/.lock`` (flock), waited for by the CLI, for at most ``lock_timeout`` seconds by the server.

**The parts must agree.** Every load and every write checks that the catalogue exists and is readable, that
it lists as many live items as the manifest counts, that the FAISS index holds as many vectors as those
items (plus tombstones) and that no FAISS id is at or past the catalogue's next id. An index that fails is
refused with ``IndexDamagedError`` naming the part and pointing at ``mae index check`` (``retrieval.repair``):
never searched, never written, because an empty catalogue beside a full index would hand out ids the index
already holds and an old vector would answer as a new file.

**Filters** (``search(where=...)``) are conditions on the catalogue (``retrieval.catalog.parse_where``). The
live ids they select become an ``IDSelectorBitmap`` passed to FAISS in ``SearchParameters``, so the search
itself skips everything else and returns exactly k when k items match. The tuned nprobe / efSearch assume
every vector may answer; with a fraction s selected, the true neighbours among them sit farther out, so the
search widens (``filtered_params``). Below ``EXACT_MAX`` selected items (or a selectivity of
``EXACT_FRACTION``) the index is not used at all: the selected vectors are scored exactly, which is both
cheaper and exact there (the measurements are in ``bench/retrieval.py --filtered`` and the README). A
filtered approximate search that still finds fewer than k is redone exactly.

**Stored vectors** ("more like this", near-duplicates, exact filtered search) are reconstructed from the index
itself, not kept in a second store: Flat and HNSW,Flat hold the vectors as they were added (IDMap2 maps ids),
an IVF index answers by id through a direct map built on first use (a hash table of id -> list, offset;
about 40 bytes per vector, kept in the file once built). PQ indexes give back the decoded code, an
approximation of the vector: what they search with anyway. A float16 copy beside the index would have cost
2 x dim bytes per vector, a third file in every commit, and bought nothing for the uncompressed factories
``auto`` picks under the memory budget.

How the factory is chosen and the search parameters tuned is in ``retrieval.tuning``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mae.files import fsync, fsync_dir, write_json_atomic
from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import MAX_ID, Catalog, CatalogError, Condition, Item, Row, parse_filters
from retrieval.tuning import (
    TARGET_RECALL,
    TUNE_QUERIES,
    FactoryChoice,
    apply_params,
    choose_factory,
    faiss_message,
    find_sub_index,
    gpu_count,
    make_index,
    quantizer_ef,
    train,
    train_size,
    tunables,
    tune_on,
    use_gpu,
)

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TRAINED_FILE = "trained.faiss"  # on-disk indexes: the trained, empty IVF that new shards start from
LOCK_FILE = ".lock"
UPLOADS = "uploads"
METRIC = "inner_product"

REBUILD_FRACTION = 0.2
# Filtered search: at most this many selected items (or this fraction of the index) are scored exactly
# instead of searched through the index; bench/retrieval.py --filtered measured the crossover (README).
EXACT_MAX = 20_000
EXACT_FRACTION = 0.02
# How far a filtered approximate search widens: nprobe / s**IVF_WIDEN and efSearch / s**HNSW_WIDEN for a kept
# fraction s (capped). Measured on 200k low-rank vectors with a filter independent of them (bench/retrieval.py's
# data), recall@10 0.95 needed about 1.4x the unfiltered nprobe at s = 10%, 2x at 2%, 2.5x at 1% (s**-0.2 gives
# 1.6x, 2.2x, 2.5x), and 2x / 4-5x the efSearch at 10% / 2% (s**-0.5: 3.2x, 7x). An IVF list costs less to scan
# under a filter (only members are scored), an HNSW hop does not. At 1M, s**-0.5 for IVF too gave recall 0.988 /
# 0.998 at 50% / 10% for 1-3x the work needed; widening by 1 / s would scan every list below s = 1 / nprobe.
IVF_WIDEN = 0.2
HNSW_WIDEN = 0.5
EF_MAX = 2048
SELECTION_CACHE = 16
EXACT_BLOCK = 65536
DUPLICATE_K = 16
# Near-duplicates by the embedding alone (no pixel check): cosine at or above which two items count as copies of
# one image. Measured with bench/retrieval.py --duplicates on the demo's artifact (mnist5k held-out digits, each
# with a resized, cropped, JPEG-30, rotated and recoloured copy, among distractors): 0.998 is the lowest threshold
# whose groups are precise (pair precision 0.99), but it finds only 6% of the copy pairs, mostly re-encodes; at
# 0.95 the groups would chain distinct digits (precision 0.02). That encoder puts another digit closer than one
# of the copies for 80% of the originals, so no threshold does better with it alone: the pixel check
# (retrieval.verify, the default of ``mae index duplicates``) does, from the looser candidates it proposes.
DUPLICATE_THRESHOLD = 0.998


class IndexMismatchError(ValueError):
    """The index was built with another artifact than the one asked to search it: vectors would not compare."""


class IndexDamagedError(RuntimeError):
    """The parts of an index disagree or cannot be read: it is refused until ``mae index check --repair``."""


class IndexBusyError(RuntimeError):
    """Another writer held the index for longer than this one may wait (HTTP answers 409)."""


def repair_hint(path: Path | str) -> str:
    return (f"run `mae index check --index {path}` to see what disagrees and `--repair` to rebuild what the "
            "surviving parts allow")


def _damaged(path: Path, message: str) -> IndexDamagedError:
    return IndexDamagedError(f"{message}; {repair_hint(path)}")


@dataclass(frozen=True)
class Hit:
    """One neighbour: catalogue id, inner product (cosine) with the query, file path, class label and tags."""

    id: int
    score: float
    path: str
    label: str | None
    tags: dict[str, str] | None = None


@dataclass
class AddResult:
    ids: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    """Paths whose bytes are already indexed (or repeat an earlier file of the same call)."""
    duplicate_ids: list[int | None] = field(default_factory=list)
    """For each duplicate, the live id holding the same bytes (None: an earlier file of this call)."""


@dataclass
class RemoveResult:
    ids: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Keys (ids or paths) that name no live item."""
    rebuilt: bool = False
    paths: list[str] = field(default_factory=list)
    """The files of the removed items."""


@dataclass
class Selection:
    """The live ids a filter selects at one generation, as FAISS wants them (a bitmap over ids)."""

    ids: np.ndarray  # int64 (M,), ascending
    selector: Any = None
    bitmap: np.ndarray | None = None  # must outlive the selector, which points into it
    vectors: np.ndarray | None = None  # (M, D), kept when M is small enough to score exactly
    seconds: float = 0.0


def make_selector(ids: np.ndarray) -> tuple[Any, np.ndarray | None]:
    """An IDSelector for ``ids``: a bitmap when they are dense (catalogue ids are), else a hash set.

    A bitmap answers ``is_member`` with one load and a shift; it costs max_id / 8 bytes (125 kB per million ids).
    """
    ids = np.asarray(ids, np.int64)
    top = int(ids.max()) if len(ids) else 0
    if top < max(1 << 20, 64 * len(ids)):
        bits = np.zeros(top + 1, bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap  # n counts bytes
    return faiss.IDSelectorBatch(ids), None


# ----------------------------------------------------------------------------------------------- the index


class Index:
    """A committed index generation: the FAISS index, its catalogue and its manifest.

    Searching never blocks on writers (another process may ``add`` meanwhile; ``reload`` picks it up). Writes
    take ``INDEX/.lock``, so two writers never interleave.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], index: faiss.Index, catalog: Catalog,
                 *, mmap: bool = False, gpu: bool | None = None):
        self.path = path
        self.manifest = manifest
        self.index = index  # the CPU master copy; what is written to disk
        self.catalog = catalog
        self.mmap = mmap
        self.lock_timeout: float | None = None
        """Seconds a write waits for another writer's lock before IndexBusyError (None: as long as it takes)."""
        self._gpu_wanted = gpu
        self._lock = threading.RLock()
        self._selections: OrderedDict[tuple, Selection] = OrderedDict()
        self._stat = _manifest_stat(path)
        self._refresh()

    # ------------------------------------------------------------------ facts

    @property
    def count(self) -> int:
        """Live items (removed ones excluded)."""
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def factory(self) -> str:
        return self.manifest["factory"]

    @property
    def artifact_sha256(self) -> str:
        return self.manifest["artifact_sha256"]

    @property
    def on_disk(self) -> bool:
        return bool(self.manifest.get("ivfdata"))

    @property
    def removable(self) -> bool:
        """Whether removed ids leave the FAISS index (else they are tombstones filtered at search)."""
        return _supports_remove(self.index)

    @property
    def roots(self) -> list[Path]:
        """The indexed folders (and files): answers show paths relative to them; uploads are one of them."""
        return [Path(p) for p in self.manifest.get("images") or []] + [self.uploads]

    @property
    def uploads(self) -> Path:
        """Where images added over HTTP (``POST /items``) are stored, named by their sha256."""
        return self.path / UPLOADS

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {self.count} items, {self.factory}, {self.device})"

    # ------------------------------------------------------------------ paths as answers show them

    def relative(self, path: str) -> str:
        """``path`` as answers show it: relative to the folder above the indexed folder that holds it
        (``/data/photos/2024/a.jpg`` under root ``/data/photos`` -> ``photos/2024/a.jpg``), so that a client
        learns where an item sits in the collection but nothing about the server's file system."""
        p = Path(path)
        for root in sorted(self.roots, key=lambda r: len(r.parts), reverse=True):
            if p == root or root in p.parents:
                return p.relative_to(root.parent).as_posix()
        return p.name

    def path_prefixes(self, value: str) -> list[str]:
        """A path as a filter gives it (absolute, or relative as answers show it) -> absolute candidates."""
        if value.startswith("/"):
            return [value]
        parents = dict.fromkeys(str(r.parent).rstrip("/") for r in self.roots)
        return [f"{parent}/{value}" for parent in parents]

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, path: str | Path, *, artifact_sha256: str | None = None, mmap: bool = False,
             gpu: bool | None = None) -> Index:
        """Open ``INDEX/``. ``artifact_sha256``: refuse an index built by another artifact.

        ``mmap`` maps the index file instead of reading it (read-only: for serving big indexes; on-disk IVF
        lists are always mapped). ``gpu``: None moves search to the GPUs when faiss-gpu sees any, True
        requires it, False keeps it on the CPU. Raises IndexDamagedError when the parts disagree.
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            if not path.exists():
                raise FileNotFoundError(f"no index at {path}")
            if not path.is_dir():
                raise FileNotFoundError(f"{path} is a file, not an index folder")
            if (path / INDEX_FILE).exists() or (path / CATALOG_FILE).exists():
                raise _damaged(path, f"{path / MANIFEST} is missing")
            raise FileNotFoundError(f"{path} is not an index (no {MANIFEST}); build one with `mae index build`")
        for attempt in range(5):
            try:
                return cls._load_once(path, artifact_sha256, mmap, gpu)
            except IndexDamagedError as e:
                # A writer that commits while we read purges rows of the generation we started from: the parts
                # then disagree for us alone. Only a disagreement at an unchanged generation is damage.
                seen = getattr(e, "generation", None)
                if attempt == 4 or seen is None or not (path / MANIFEST).exists() \
                        or read_manifest(path)["generation"] == seen:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, path: Path, artifact_sha256: str | None, mmap: bool, gpu: bool | None) -> Index:
        for attempt in range(5):
            manifest = read_manifest(path)
            check_artifact(path, manifest, artifact_sha256)
            try:
                index = _read_faiss(path, manifest, mmap)
            except FileNotFoundError:
                index = None
            fresh = read_manifest(path)
            if fresh["generation"] == manifest["generation"]:
                if index is None:  # not a writer's rename: the committed generation has no index file
                    raise _damaged(path, f"{path / INDEX_FILE} is missing")
                break
            time.sleep(0.05 * (attempt + 1))  # a writer committed meanwhile: read the new generation
        else:
            raise RuntimeError(f"{path}: the index changed under every read; is a writer looping?")
        catalog = _open_catalog(path)
        try:
            idx = cls(path, manifest, index, catalog, mmap=mmap, gpu=gpu)
            idx._verify()
        except (CatalogError, IndexDamagedError) as e:
            catalog.close()
            damaged = e if isinstance(e, IndexDamagedError) else _damaged(path, str(e))
            damaged.generation = int(manifest["generation"])  # type: ignore[attr-defined]
            raise damaged from (e if damaged is not e else None)
        except BaseException:
            catalog.close()
            raise
        return idx

    def reload(self) -> bool:
        """Pick up a generation another process committed; True when something changed.

        Costs a ``stat`` of the manifest and one of the catalogue when nothing did (every commit replaces the
        manifest), so a server calls it before every read: a read that starts after a write's commit sees that
        write, and a catalogue deleted or replaced under a running server is noticed by the next read.
        """
        with self._lock:
            stat = _manifest_stat(self.path)
            if stat == self._stat and stat is not None and self._catalog_same():
                return False
            if stat is None:
                raise _damaged(self.path, f"{self.path / MANIFEST} is missing")
            manifest = read_manifest(self.path)
            if manifest["generation"] == self.generation and self._catalog_same():
                self._stat = stat
                return False
            other = Index.load(self.path, mmap=self.mmap, gpu=self._gpu_wanted)
            old = self.catalog
            self.manifest, self.index, self.catalog = other.manifest, other.index, other.catalog
            self._stat = other._stat
            old.close()
            self._refresh()
            return True

    def close(self) -> None:
        self.catalog.close()

    def _catalog_same(self) -> bool:
        """Whether items.sqlite is still the file this index opened (not deleted, not replaced)."""
        try:
            st = os.stat(self.path / CATALOG_FILE)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.catalog_identity

    def _verify(self) -> None:
        """Refuse an index whose parts disagree (see the module docstring); cheap enough for every load."""
        path, m = self.path, self.manifest
        if not self._catalog_same():
            raise _damaged(path, f"{path / CATALOG_FILE} was deleted or replaced while the index was open")
        live = self.catalog.count(self.generation)
        if live != self.count:
            raise _damaged(path, f"{path / CATALOG_FILE} lists {live} live items but {path / MANIFEST} counts "
                                 f"{self.count} (generation {self.generation})")
        expected = self.count + len(self._tombstones)
        if self.index.ntotal != expected:
            raise _damaged(path, f"{path / INDEX_FILE} holds {self.index.ntotal} vectors but the catalogue has "
                                 f"{self.count} live items" + (f" and {len(self._tombstones)} tombstones"
                                                                if len(self._tombstones) else ""))
        if self.index.ntotal != m["ntotal"]:
            raise _damaged(path, f"{path / INDEX_FILE} holds {self.index.ntotal} vectors but {path / MANIFEST} "
                                 f"says {m['ntotal']}")
        if self.index.ntotal:
            top = int(max_faiss_id(self.index))
            if top >= self.catalog.next_id():
                raise _damaged(path, f"{path / INDEX_FILE} holds id {top} but {path / CATALOG_FILE} would give "
                                     f"that id to the next item it adds")

    # ------------------------------------------------------------------ search

    def search(self, vectors: np.ndarray, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
               min_score: float | None = None, exclude: Sequence[int] | None = None) -> list[list[Hit]]:
        """Top-k neighbours of each query (N, D), best first.

        ``where``: filter conditions (all must hold; ``retrieval.catalog.parse_where``); exactly k come back
        when at least k live items match. ``min_score``: drop neighbours below this cosine. ``exclude``: one id
        per query left out of its answer (the item itself, for "more like this"). Fewer than k when fewer
        items qualify; k is capped at the size of the index.
        """
        conditions = parse_filters(where)
        with self._lock:
            extra = 1 if exclude is not None else 0
            scores, ids = self.search_ids(vectors, k + extra, where=conditions, min_score=min_score)
            rows = self.catalog.get(np.unique(ids[ids >= 0]).tolist(), self.generation)
        out = []
        for j, (srow, irow) in enumerate(zip(scores, ids)):
            skip = int(exclude[j]) if exclude is not None else None
            hits = [_hit(rows[int(i)], float(s)) for s, i in zip(srow, irow)
                    if i >= 0 and int(i) in rows and int(i) != skip]
            out.append(hits[:k])
        return out

    def search_ids(self, vectors: np.ndarray, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
                   min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS answer: scores (N, k') float32 and ids (N, k') int64, -1 where there is no neighbour.

        k' is k capped at the number of vectors in the index (at least 1): asking for a billion neighbours
        must not allocate a billion slots.
        """
        x = self._queries(vectors)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        conditions = parse_filters(where)
        n = len(x)
        with self._lock:
            k = min(int(k), max(int(self.index.ntotal), 1))
            empty = (np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64))
            if self.index.ntotal == 0 or self.count == 0 or n == 0:
                return empty
            if conditions:
                D, I = self._filtered(x, k, self.selection(conditions))
            else:
                D, I = self._unfiltered(x, k)
                short = (I >= 0).sum(axis=1) < min(k, self.count)
                if short.any():  # tombstones crowded the graph's answer: score those queries exactly
                    D, I = _replace_rows(D, I, short, *self._exact(x[short], k, self.selection(())))
        if I.shape[1] < k:
            D = np.concatenate([D, empty[0][:, : k - I.shape[1]]], axis=1)
            I = np.concatenate([I, empty[1][:, : k - I.shape[1]]], axis=1)
        D, I = D.astype(np.float32), I.astype(np.int64)
        if min_score is not None:
            if not math.isfinite(min_score):
                raise ValueError(f"min_score must be a finite number, got {min_score}")
            low = (min_score > D) | (I < 0)
            D, I = np.where(low, -np.inf, D).astype(np.float32), np.where(low, -1, I)
        return D, I

    def _unfiltered(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(k, self.index.ntotal)
        if len(self._tombstones) == 0:
            return self._searcher.search(x, fetch)
        if self._searcher is self.index:  # CPU: filter inside the search, so k stays exact
            params, _keep = _selector_params(self.index, self.manifest.get("search_params", {}), self._selector)
            return self.index.search(x, fetch, params=params)
        # GPU indexes take no selector: over-fetch and filter
        D, I = self._searcher.search(x, min(k + len(self._tombstones), self.index.ntotal))
        dead = np.isin(I, self._tombstones)
        I, D = np.where(dead, -1, I), np.where(dead, -np.inf, D)
        order = np.argsort(I < 0, axis=1, kind="stable")
        return np.take_along_axis(D, order, 1)[:, :fetch], np.take_along_axis(I, order, 1)[:, :fetch]

    def _filtered(self, x: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Search among the selected ids only: exactly when few, else inside FAISS with a selector."""
        m = len(sel.ids)
        if m == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        if self.exact_for(m):
            return self._exact(x, k, sel)
        params, _keep = _selector_params(self.index, self.filtered_params(m / max(self.count, 1)), sel.selector)
        D, I = self.index.search(x, min(k, self.index.ntotal), params=params)
        short = (I >= 0).sum(axis=1) < min(k, m)
        if short.any():  # the widened search still missed some: those queries are scored exactly
            D, I = _replace_rows(D, I, short, *self._exact(x[short], k, sel))
        return D, I

    def exact_for(self, selected: int) -> bool:
        """Whether a filter selecting ``selected`` items is scored exactly rather than searched (see module)."""
        return not tunables(self.index) or selected <= EXACT_MAX or selected <= EXACT_FRACTION * self.count

    def filtered_params(self, fraction: float) -> dict[str, Any]:
        """The tuned search parameters, widened for a filter that keeps ``fraction`` of the items."""
        params = dict(self.manifest.get("search_params", {}))
        s = min(max(fraction, 1e-9), 1.0)
        if "nprobe" in params:
            nlist = faiss.extract_index_ivf(self.index).nlist
            params["nprobe"] = int(min(nlist, math.ceil(params["nprobe"] / s**IVF_WIDEN)))
        if "efSearch" in params:
            ef = params["efSearch"]
            params["efSearch"] = int(min(max(EF_MAX, ef), math.ceil(ef / s**HNSW_WIDEN)))
        return params

    def _exact(self, x: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``x`` among the selected items, scored on their stored vectors, in blocks."""
        k = min(k, len(sel.ids))
        if sel.vectors is not None:
            D, I = faiss.knn(x, sel.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
            return D, np.where(I >= 0, sel.ids[np.clip(I, 0, None)], -1)
        heap = faiss.ResultHeap(len(x), k, keep_max=True)
        for i in range(0, len(sel.ids), EXACT_BLOCK):
            ids = sel.ids[i : i + EXACT_BLOCK]
            D, I = faiss.knn(x, self._reconstruct(ids), min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, np.where(I >= 0, ids[np.clip(I, 0, None)], -1))
        heap.finalize()
        return heap.D, heap.I

    def selection(self, conditions: Sequence[Condition]) -> Selection:
        """The ids a filter selects now, with their selector; cached per generation (filters repeat)."""
        key = (self.generation, tuple(conditions), tuple(map(str, self.roots)))
        with self._lock:
            sel = self._selections.get(key)
            if sel is not None:
                self._selections.move_to_end(key)
                return sel
            started = time.perf_counter()
            ids = self.catalog.select(conditions, self.generation, self.path_prefixes)
            selector, bitmap = make_selector(ids)
            sel = Selection(ids, selector, bitmap)
            if len(ids) and self.exact_for(len(ids)) and len(ids) <= EXACT_MAX:
                sel.vectors = self._reconstruct(ids)
            sel.seconds = time.perf_counter() - started
            self._selections[key] = sel
            while len(self._selections) > SELECTION_CACHE:
                self._selections.popitem(last=False)
            return sel

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors (N, D) of live items (reconstructed from the index; see the module docstring)."""
        ids = np.asarray(ids, np.int64)
        with self._lock:
            live = self.catalog.get(ids.tolist(), self.generation)
            missing = [int(i) for i in ids if int(i) not in live]
            if missing:
                raise KeyError(f"no item {missing[0]} in {self.path}")
            return self._reconstruct(ids)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return self.index.reconstruct_batch(np.ascontiguousarray(ids, np.int64))
        except RuntimeError as e:
            raise RuntimeError(f"{self.factory} cannot give back stored vectors: {faiss_message(e)}") from e

    def similar(self, item_id: int, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
                min_score: float | None = None) -> list[Hit]:
        """"More like this": the k items nearest to a stored item's vector, the item itself left out."""
        vector = self.vectors([item_id])
        return self.search(vector, k, where=where, min_score=min_score, exclude=[int(item_id)])[0]

    def item(self, id: int) -> Hit | None:
        """Catalogue lookup of a live id (score 1.0: an item is its own best match), for thumbnails."""
        row = self.row(id)
        return None if row is None else _hit(row, 1.0)

    def row(self, id: int) -> Row | None:
        """The catalogue row of a live id (None for removed, uncommitted or impossible ids)."""
        if not 0 <= int(id) <= MAX_ID:
            return None
        with self._lock:
            return self.catalog.get([int(id)], self.generation).get(int(id))

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        """The catalogue rows of the live ids among ``ids`` (removed, uncommitted and impossible ids are absent)."""
        with self._lock:
            return self.catalog.get(ids, self.generation)

    def by_sha256(self, hashes: Iterable[str]) -> dict[str, int]:
        """The live item holding each of these contents (sha256 of a file's bytes), for those the index holds."""
        with self._lock:
            return self.catalog.by_sha256(hashes, self.generation)

    def by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        """The live items of each of these files (paths as stored: absolute), for those the index holds."""
        with self._lock:
            return self.catalog.by_path(paths, self.generation)

    def labels(self) -> dict[str, int]:
        """Live items per label (unlabelled ones under "")."""
        with self._lock:
            return self.catalog.labels(self.generation)

    def duplicates(self, threshold: float = DUPLICATE_THRESHOLD, k: int = DUPLICATE_K,
                   progress: Callable[[int, int], None] | None = None,
                   check: Callable[[np.ndarray], np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """Groups of near-copies: items whose cosine with another reaches ``threshold``, joined transitively.

        Each live item is a query (its stored vector) for its k nearest; pairs at or above the threshold are
        edges and the groups are their connected components (union-find), largest first. ``check`` (e.g. a
        ``retrieval.verify.PixelCheck``) takes the candidate pairs, (P, 2) ids, and says which to keep: then
        the threshold only proposes. Each group lists (id, best cosine of that item with a member it joined).
        """
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        with self._lock:
            ids = self.catalog.live_ids(self.generation)
        parent = {int(i): int(i) for i in ids}
        best: dict[int, float] = {}
        seen: set[tuple[int, int]] = set()

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        block = 1024
        for i in range(0, len(ids), block):
            with self._lock:  # a block at a time: searches of other threads interleave
                live = self.catalog.get(ids[i : i + block].tolist(), self.generation)  # a write may have come
                chunk = np.asarray(sorted(live), np.int64)
                if not len(chunk):
                    continue
                vectors = self._reconstruct(chunk)
                D, I = self.search_ids(vectors, k + 1, min_score=threshold)
            edges: dict[tuple[int, int], float] = {}
            for a, drow, irow in zip(chunk.tolist(), D, I):
                for s, b in zip(drow.tolist(), irow.tolist()):
                    pair = (min(a, b), max(a, b))
                    if b >= 0 and b != a and b in parent and pair not in seen:
                        edges[pair] = s
            seen.update(edges)
            pairs = np.asarray(list(edges), np.int64).reshape(-1, 2)
            kept = np.asarray(check(pairs), bool) if check is not None and len(pairs) else np.ones(len(pairs), bool)
            for (a, b), s in zip(pairs[kept].tolist(), np.asarray(list(edges.values()))[kept].tolist()):
                best[a] = max(best.get(a, -1.0), s)
                best[b] = max(best.get(b, -1.0), s)
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if progress:
                progress(min(i + block, len(ids)), len(ids))
        groups: dict[int, list[int]] = {}
        for a in best:
            groups.setdefault(find(a), []).append(a)
        out = [sorted((m, round(best[m], 6)) for m in members) for members in groups.values() if len(members) > 1]
        return sorted(out, key=lambda g: (-len(g), g[0][0]))

    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (N, {self.dim}), got {tuple(np.shape(vectors))}")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise ValueError("query vectors must be finite floating-point numbers")
        x = np.array(x, dtype=np.float32, order="C")  # a copy: normalised in place below
        faiss.normalize_L2(x)
        return x

    # ------------------------------------------------------------------ writes

    def add(self, vectors: np.ndarray, items: Sequence[Item], *, roots: Sequence[str | Path] = ()) -> AddResult:
        """Add L2-normalised vectors (N, D) of ``items``; files already indexed (same sha256) are skipped.

        ``roots``: the folders the items came from, recorded so that answers can show paths relative to them.
        """
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        with self._writing():
            known = self.catalog.by_sha256([it.sha256 for it in items], self.generation)
            keep, seen, result = [], set(known), AddResult()
            for j, it in enumerate(items):
                if it.sha256 in seen:
                    result.duplicates.append(it.path)
                    result.duplicate_ids.append(known.get(it.sha256))
                else:
                    seen.add(it.sha256)
                    keep.append(j)
            if not keep:
                return result
            gen = self.generation + 1
            ids = self.catalog.insert([items[j] for j in keep], gen)
            x = np.ascontiguousarray(x[keep])
            faiss.normalize_L2(x)
            id_arr = np.asarray(ids, np.int64)
            if self.on_disk:
                self._add_on_disk(x, id_arr, gen)
            else:
                self.index.add_with_ids(x, id_arr)
            new_roots = [str(Path(r).expanduser().resolve()) for r in roots]
            known_roots = [Path(r) for r in self.manifest.get("images") or []]
            new_roots = [r for r in dict.fromkeys(new_roots)
                         if not any(Path(r) == k or k in Path(r).parents for k in known_roots)]
            if new_roots:
                self.manifest["images"] = [*map(str, known_roots), *new_roots]
            self._commit(gen)
            result.ids = ids
            return result

    def remove(self, keys: Iterable[int | str | Path]) -> RemoveResult:
        """Remove items by id (int, or a string of digits) or by file path.

        HNSW and on-disk lists keep the vectors as tombstones, filtered at search; once they pass
        REBUILD_FRACTION of the collection an in-memory index is rebuilt without them.
        """
        ids_asked, paths_asked = [], {}  # path as given -> the absolute paths it may mean
        for key in keys:
            if isinstance(key, (int, np.integer)) or isinstance(key, str) and key.isdigit():
                ids_asked.append(int(key))
            else:
                given = str(Path(key).expanduser().resolve())
                # also as answers show paths: relative to the indexed folders
                shown = [] if Path(key).is_absolute() else self.path_prefixes(Path(key).as_posix())
                paths_asked[given] = [given, *shown]
        with self._writing():
            result = RemoveResult()
            live = self.catalog.get(ids_asked, self.generation)
            by_path = self.catalog.by_path([p for c in paths_asked.values() for p in c], self.generation)
            found = {given: [i for p in c for i in by_path.get(p, [])] for given, c in paths_asked.items()}
            ids = [i for i in ids_asked if i in live] + [i for f in found.values() for i in f]
            result.missing = [str(i) for i in ids_asked if i not in live] + [p for p, f in found.items() if not f]
            ids = sorted(set(ids))
            if not ids:
                return result
            rows = self.catalog.get(ids, self.generation)
            gen = self.generation + 1
            self.catalog.mark_removed(ids, gen)
            if self.removable:
                ivf = faiss.try_extract_index_ivf(self.index)
                hashed = ivf is not None and ivf.direct_map.type == faiss.DirectMap.Hashtable
                # faiss removes from an IVF's id hash table only through an IDSelectorArray
                sel = faiss.IDSelectorArray if hashed else faiss.IDSelectorBatch
                self.index.remove_ids(sel(np.asarray(ids, np.int64)))
            else:
                tomb = len(self.catalog.tombstones(gen, self.manifest.get("compacted", 0)))
                if not self.on_disk and tomb > REBUILD_FRACTION * max(self.index.ntotal, 1):
                    self._rebuild(gen)
                    self.manifest["compacted"] = gen  # every vector removed so far has left the index
                    result.rebuilt = True
            self._commit(gen)
            result.ids = ids
            result.paths = [rows[i].path for i in ids]
            return result

    def annotate(self, metadata: dict[str, tuple[Any, dict[str, str] | None]]) -> int:
        """Set labels and tags of live items by absolute path (``retrieval.metadata.Sidecar.entries``): a
        metadata-only write, committed as a new generation without rewriting the FAISS index. Returns the
        number of items changed. A label of ``metadata.UNSET`` keeps the item's label; tags merge over its own.
        """
        from retrieval.metadata import UNSET

        with self._writing():
            by_path = self.catalog.by_path(list(metadata), self.generation)
            ids = [i for p in by_path for i in by_path[p]]
            rows = self.catalog.get(ids, self.generation)
            updates = []
            for p, found in by_path.items():
                label, tags = metadata[p]
                for i in found:
                    row = rows[i]
                    updates.append((i, row.label if label is UNSET else label, {**(row.tags or {}), **(tags or {})}))
            if not updates:
                return 0
            self.catalog.update_metadata(updates)
            self._commit(self.generation + 1, index_changed=False)
            return len(updates)

    def _rebuild(self, gen: int) -> None:
        """A fresh index of the same factory over the live vectors (reconstructed), dropping tombstones."""
        live = self.catalog.live_ids(gen)
        fresh = make_index(self.factory, self.dim)
        if len(live):
            x = self._reconstruct(live)
            train(fresh, x[: train_size(fresh, len(x))] if not fresh.is_trained else x[:0], gpu=self._gpu_wanted)
            fresh.add_with_ids(x, live)
        apply_params(fresh, self.manifest.get("search_params", {}))
        self.index = fresh

    def _add_on_disk(self, x: np.ndarray, ids: np.ndarray, gen: int) -> None:
        """New vectors go to an in-memory shard, then current lists + shard merge into ``lists.G.ivfdata``."""
        ivf = faiss.extract_index_ivf(self.index)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # the merge bypasses it: rebuilt on next use
        shard = faiss.read_index(str(self.path / TRAINED_FILE))
        shard.add_with_ids(x, ids)
        shard_ivf = faiss.extract_index_ivf(shard)
        name = f"lists.{gen}.ivfdata"
        _remove_if_exists(self.path / name)
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(self.path / name))
        parts = faiss.InvertedListsPtrVector()
        parts.push_back(ivf.invlists)
        parts.push_back(shard_ivf.invlists)
        with stdout_to_stderr():
            ntotal = invlists.merge_from_multiple(parts.data(), parts.size(), False)
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        self.index.ntotal = ivf.ntotal = ntotal
        self.manifest["ivfdata"] = name

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        if self.mmap:
            raise RuntimeError(f"{self.path} was opened memory-mapped (read-only); "
                               "load it with mmap=False to change it")
        if self.catalog.read_only:
            raise PermissionError(f"{self.path} is not writable")
        # The file lock first, then the in-process lock: searches of this process go on while it waits.
        with _file_lock(self.path, self.lock_timeout), self._lock:
            try:
                manifest = read_manifest(self.path)
                if not self._catalog_same():
                    raise _damaged(self.path, f"{self.path / CATALOG_FILE} was deleted or replaced")
                if manifest["generation"] != self.generation:  # another process wrote: start from its generation
                    self.manifest, self.index = manifest, _read_faiss(self.path, manifest, False)
                _recover(self.path, self.manifest, self.catalog, _supports_remove(self.index))
                self._refresh()
                self._verify()
            except CatalogError as e:
                raise _damaged(self.path, str(e)) from e
            try:
                yield
            except BaseException:
                # the half-done write is undone: disk still holds the last generation, reread it
                self.manifest = read_manifest(self.path)
                _recover(self.path, self.manifest, self.catalog, _supports_remove(self.index))
                self.index = _read_faiss(self.path, self.manifest, False)
                raise
            finally:
                self._refresh()

    def _commit(self, gen: int, index_changed: bool = True) -> None:
        """Phase 2 of a write whose catalogue rows (tagged ``gen``) are stored: index file, then manifest.

        ``index_changed`` False (a metadata-only write): the committed index file stays as it is.
        """
        staged = self.path / f"index.{gen}.faiss"
        if index_changed:
            write_index(self.index, staged)
        manifest = dict(self.manifest)
        manifest.update(generation=gen, ntotal=int(self.index.ntotal), count=self.catalog.count(gen),
                        tombstones=0 if _supports_remove(self.index)
                        else len(self.catalog.tombstones(gen, self.manifest.get("compacted", 0))),
                        updated=_now())
        write_json_atomic(self.path / MANIFEST, manifest)  # the commit point
        if index_changed:
            os.replace(staged, self.path / INDEX_FILE)
        fsync_dir(self.path)
        self.manifest = manifest
        self._stat = _manifest_stat(self.path)
        _recover(self.path, manifest, self.catalog, _supports_remove(self.index))

    def _refresh(self) -> None:
        """Derived state after a load or write: tombstones, their selector, the GPU copy, search params."""
        apply_params(self.index, self.manifest.get("search_params", {}))
        self._selections.clear()
        st = os.stat(self.catalog.path)
        self.catalog_identity = (st.st_dev, st.st_ino)
        self._tombstones = (np.zeros(0, np.int64) if _supports_remove(self.index)
                            else self.catalog.tombstones(self.generation, self.manifest.get("compacted", 0)))
        self._selector = (faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
                          if len(self._tombstones) else None)
        self._searcher, self.device = self.index, "cpu"
        if not self.mmap and not self.on_disk and use_gpu(self._gpu_wanted) and self.index.ntotal:
            try:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = faiss.get_num_gpus() > 1
                self._searcher = faiss.index_cpu_to_all_gpus(self.index, co)
                apply_params(self._searcher, {k: v for k, v in self.manifest.get("search_params", {}).items()
                                              if k == "nprobe"}, gpu=True)
                self.device = f"gpu x{faiss.get_num_gpus()}"
            except RuntimeError as e:  # e.g. HNSW has no GPU version in this faiss build
                if self._gpu_wanted:
                    raise RuntimeError(f"cannot move {self.factory} to the GPU: {faiss_message(e)}") from e
                log.info("searching %s on the CPU: %s", self.factory, faiss_message(e))

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        m = self.manifest
        try:
            suggestion = choose_factory(self.count, self.dim, on_disk=self.on_disk).factory
        except ValueError as e:
            suggestion = str(e)
        return {
            "index": str(self.path), "count": self.count, "dim": self.dim, "metric": m["metric"],
            "factory": m["factory"], "factory_reason": m.get("factory_reason"), "generation": self.generation,
            "ntotal": int(self.index.ntotal), "tombstones": len(self._tombstones), "removable": self.removable,
            "on_disk": self.on_disk, "device": self.device, "search_params": m.get("search_params", {}),
            "tuning": {k: v for k, v in m.get("tuning", {}).items() if k != "curve"},
            "artifact_sha256": m["artifact_sha256"], "artifact": m.get("artifact"), "labels": self.catalog.labels(
                self.generation), "tags": self.catalog.tag_keys(self.generation), "build": m.get("build", {}),
            "created": m.get("created"), "updated": m.get("updated"), "bytes": _folder_bytes(self.path),
            "auto_factory_now": suggestion, "roots": [str(r) for r in self.roots],
        }


def _replace_rows(D: np.ndarray, I: np.ndarray, rows: np.ndarray, D2: np.ndarray, I2: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """D, I with the ``rows`` (a mask) replaced by D2, I2, which may have fewer columns (padded with no-hit)."""
    D, I = D.copy(), I.copy()
    width = D.shape[1]
    D[rows], I[rows] = -np.inf, -1
    D[rows, : min(width, D2.shape[1])] = D2[:, :width]
    I[rows, : min(width, I2.shape[1])] = I2[:, :width]
    return D, I


def _hit(row: Row, score: float) -> Hit:
    return Hit(row.id, score, row.path, row.label, row.tags)


def _open_catalog(path: Path) -> Catalog:
    try:
        return Catalog(path / CATALOG_FILE, read_only=not os.access(path, os.W_OK))
    except CatalogError as e:
        raise _damaged(path, str(e)) from e


def _manifest_stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path / MANIFEST)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------------------------- building


def build(out: str | Path, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
          factory: str = "auto", max_memory: int | None = None, target_recall: float = TARGET_RECALL,
          gpu: bool | None = None, seed: int = 0, extra: dict[str, Any] | None = None,
          overwrite: bool = False) -> Index:
    """Build a new index folder from vectors (N, D) and their items, in memory; duplicates (sha256) once.

    The folder appears complete or not at all: everything is written in a sibling temp folder and renamed.
    """
    x = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if x.ndim != 2 or len(x) != len(items):
        raise ValueError(f"expected vectors (N, D) for {len(items)} items, got shape {x.shape}")
    keep, seen = [], set()
    for j, it in enumerate(items):
        if it.sha256 not in seen:
            seen.add(it.sha256)
            keep.append(j)
    duplicates = len(items) - len(keep)
    x, items = x[keep], [items[j] for j in keep]
    faiss.normalize_L2(x)
    n, dim = x.shape
    choice = choose_factory(n, dim, max_memory=max_memory, gpu=gpu_count() > 0 and gpu is not False) \
        if factory == "auto" else \
        FactoryChoice(factory, "given with --factory")
    index = make_index(choice.factory, dim)
    rng = np.random.default_rng(seed)
    figures: dict[str, Any] = {"vectors": n, "duplicates_skipped": duplicates}
    if not index.is_trained:
        m = train_size(index, n)
        sample = x[np.sort(rng.choice(n, m, replace=False))] if m < n else x
        figures["train_vectors"] = len(sample)
        figures["train_seconds"] = round(train(index, sample, gpu), 2)
    with _staging(out, overwrite) as tmp:
        catalog = Catalog.create(tmp / CATALOG_FILE)
        ids = np.asarray(catalog.insert(items, 1), np.int64)
        # Tuning queries are held out: added only after the search parameters are chosen on them.
        held = np.zeros(n, bool)
        if tunables(index) and n > 10 * (10 + 1):
            held[rng.choice(n, min(TUNE_QUERIES, n // 10), replace=False)] = True
        started = time.perf_counter()
        if n:
            index.add_with_ids(x[~held], ids[~held])
        figures["add_seconds"] = round(time.perf_counter() - started, 2)
        tuning = tune_on(index, lambda: _blocks(x[~held], ids[~held]), None, x[held], target_recall)
        if held.any():
            index.add_with_ids(x[held], ids[held])
        manifest = _new_manifest(artifact_sha256, dim, choice, factory, tuning, figures, extra)
        _commit_first(tmp, manifest, index, catalog)
        catalog.close()
    return Index.load(out, gpu=gpu)


def build_on_disk(out: str | Path, trained: faiss.Index, shards: Sequence[str | Path], items: Sequence[Item],
                  ids: Sequence[int], *, artifact_sha256: str, choice: FactoryChoice, factory: str,
                  tune_blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                  tune_sample: tuple[np.ndarray, np.ndarray], target_recall: float = TARGET_RECALL,
                  extra: dict[str, Any] | None = None, overwrite: bool = False) -> Index:
    """Merge shard index files (same trained IVF, disjoint ids) into on-disk inverted lists, memory-mapped."""
    if faiss.try_extract_index_ivf(trained) is None:
        raise ValueError(f"an on-disk index needs an IVF factory, got {choice.factory!r}")
    with _staging(out, overwrite) as tmp:
        catalog = Catalog.create(tmp / CATALOG_FILE)
        catalog.insert(items, 1, ids=list(ids))
        started = time.perf_counter()
        index = faiss.clone_index(trained)
        from faiss.contrib.ondisk import merge_ondisk

        faiss.write_index(trained, str(tmp / TRAINED_FILE))
        with stdout_to_stderr():  # faiss prints "resizing ..." on stdout, which belongs to --json
            merge_ondisk(index, [str(s) for s in shards], str(tmp / "lists.1.ivfdata"))
        merge_seconds = time.perf_counter() - started
        tuning = tune_on(index, tune_blocks, tune_sample[0], tune_sample[1], target_recall)
        figures = dict(extra.pop("build", {}) if extra else {}, merge_seconds=round(merge_seconds, 2))
        manifest = _new_manifest(artifact_sha256, trained.d, choice, factory, tuning, figures, extra)
        manifest["ivfdata"] = "lists.1.ivfdata"
        _commit_first(tmp, manifest, index, catalog)
        catalog.close()
    return Index.load(out)


def fill_shard(trained_path: str | Path, vectors: np.ndarray, ids: np.ndarray, out: str | Path) -> int:
    """One shard of a sharded build: the trained (empty) IVF + these vectors, written to ``out``."""
    index = faiss.read_index(str(trained_path))
    x = np.ascontiguousarray(vectors, np.float32)
    faiss.normalize_L2(x)
    if len(x):
        index.add_with_ids(x, np.asarray(ids, np.int64))
    faiss.write_index(index, str(out))
    return int(index.ntotal)


def _new_manifest(artifact_sha256: str, dim: int, choice: FactoryChoice, requested: str, tuning: dict[str, Any],
                  figures: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    build_figures = dict(extra.pop("build", {}), **figures, tuning_seconds=tuning.get("seconds"))
    return {
        "format": FORMAT, "generation": 1, "artifact_sha256": artifact_sha256, "dim": int(dim),
        "metric": METRIC, "normalized": True, "factory": choice.factory, "factory_requested": requested,
        "factory_reason": choice.reason, "nlist": choice.nlist, "ivfdata": None,
        "search_params": tuning.get("params", {}), "tuning": tuning, "build": build_figures,
        "faiss_version": faiss.__version__, "created": _now(), "updated": _now(), **extra,
    }


def _commit_first(folder: Path, manifest: dict[str, Any], index: faiss.Index, catalog: Catalog) -> None:
    manifest.update(ntotal=int(index.ntotal), count=catalog.count(1), tombstones=0)
    write_index(index, folder / INDEX_FILE)
    write_json_atomic(folder / MANIFEST, manifest)


@contextlib.contextmanager
def _staging(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` that replaces it (atomically, when it did not exist) on success."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        if (out / MANIFEST).exists():
            raise FileExistsError(f"{out} already holds an index; add to it with `mae index add`, or pass --overwrite")
        if out.is_file() or any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the index is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _blocks(x: np.ndarray, ids: np.ndarray, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(x), size):
        yield x[i : i + size], ids[i : i + size]


# ----------------------------------------------------------------------------------------------- disk plumbing


def read_manifest(path: Path) -> dict[str, Any]:
    """The committed manifest, checked field by field: a damaged one is refused by name, not with a TypeError."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _damaged(path, f"{file} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"{file} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise _damaged(path, f"{file} is not a JSON object")
    fmt = manifest.get("format", 0)
    if not _whole(fmt):
        raise _damaged(path, f"{file}: 'format' must be a whole number, got {fmt!r}")
    if fmt > FORMAT:
        raise RuntimeError(f"{path} has index format {fmt}; this version reads up to {FORMAT}")
    for key, valid, what in (("generation", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
                             ("dim", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
                             ("count", _whole, "a whole number >= 0"), ("ntotal", _whole, "a whole number >= 0"),
                             ("artifact_sha256", lambda v: isinstance(v, str) and v != "", "a sha256 string"),
                             ("factory", lambda v: isinstance(v, str) and v != "", "a factory string")):
        if key not in manifest:
            raise _damaged(path, f"{file} lacks {key!r}")
        if not valid(manifest[key]):
            raise _damaged(path, f"{file}: {key!r} must be {what}, got {manifest[key]!r}")
    for key in ("search_params", "tuning", "build"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise _damaged(path, f"{file}: {key!r} must be an object, got {manifest[key]!r}")
    images = manifest.get("images")
    if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise _damaged(path, f"{file}: 'images' must be a list of folders, got {images!r}")
    return manifest


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def write_index(index: faiss.Index, path: str | Path) -> None:
    """Write a FAISS index file atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    fsync(tmp)
    os.replace(tmp, path)


def remove_from_file(path: str | Path, ids: Sequence[int]) -> None:
    """Drop ``ids`` from the index stored in ``path`` (a shard of a sharded build)."""
    index = faiss.read_index(str(path))
    index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
    write_index(index, path)


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads in this process (a shard worker gets its share of the cores)."""
    faiss.omp_set_num_threads(max(1, int(threads)))


def check_artifact(path: Path, manifest: dict[str, Any], sha256: str | None) -> None:
    if sha256 is not None and sha256 != manifest["artifact_sha256"]:
        raise IndexMismatchError(
            f"index {path} was built with artifact sha256 {manifest['artifact_sha256']}, but the artifact given "
            f"has sha256 {sha256}: its embeddings are not comparable. Rebuild the index with this artifact "
            "(mae index build) or search with the artifact it was built with")


def _read_faiss(path: Path, manifest: dict[str, Any], mmap: bool) -> faiss.Index:
    """The committed generation's index file: ``index.G.faiss`` while its rename is pending, else index.faiss."""
    gen = manifest["generation"]
    staged = path / f"index.{gen}.faiss"
    candidates = [staged, path / INDEX_FILE] if staged.exists() else [path / INDEX_FILE]
    for i, file in enumerate(candidates):
        try:
            return _read_file(file, path, manifest, mmap)
        except FileNotFoundError:
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def _read_file(file: Path, folder: Path, manifest: dict[str, Any], mmap: bool) -> faiss.Index:
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing")
    if file.stat().st_size == 0:
        raise _damaged(folder, f"{file} is empty (0 bytes)")
    if manifest.get("ivfdata"):
        data = folder / manifest["ivfdata"]
        if not data.exists():
            raise _damaged(folder, f"{data} (the on-disk inverted lists) is missing")
    try:
        if manifest.get("ivfdata"):
            # The lists file path stored inside the index is absolute: point it at this folder's copy.
            index = faiss.read_index(str(file), faiss.IO_FLAG_SKIP_IVF_DATA)
            ivf = faiss.extract_index_ivf(index)
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            lists.filename = str(folder / manifest["ivfdata"])
            lists.read_only = True
            lists.do_mmap()
            return index
        index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing") from e
        raise _damaged(folder, f"{file} is not a readable FAISS index ({faiss_message(e)})") from e
    if index.d != manifest["dim"]:
        raise _damaged(folder, f"{file} holds {index.d}-d vectors but {folder / MANIFEST} says {manifest['dim']}")
    return index


def _recover(path: Path, manifest: dict[str, Any], catalog: Catalog, removable: bool) -> None:
    """Finish or undo what an interrupted write left (call under the write lock)."""
    gen = manifest["generation"]
    staged = path / f"index.{gen}.faiss"
    if staged.exists():  # committed, rename pending
        os.replace(staged, path / INDEX_FILE)
    for f in path.iterdir():
        stray_index = re.fullmatch(r"index\.\d+\.faiss(\.tmp)?|index\.faiss\.tmp|manifest\.json(\.\w+)?\.tmp", f.name)
        stray_lists = f.name.endswith(".ivfdata") and f.name != manifest.get("ivfdata")
        if stray_index or stray_lists:
            _remove_if_exists(f)
    catalog.recover(gen)
    catalog.purge_removed(gen if removable else manifest.get("compacted", 0))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C++ code prints on file descriptor 1 to stderr while inside (stdout carries --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """``INDEX/.lock``, exclusively: wait for it (``timeout`` None) or give up after ``timeout`` seconds."""
    with open(path / LOCK_FILE, "a+") as f:
        if timeout is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IndexBusyError(f"another writer has held {path} for over {timeout:g} s; "
                                             "try again when it is done") from None
                    time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_if_exists(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- faiss helpers




def faiss_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in a FAISS index (IDMap's table, or the IVF lists): int64 (ntotal,)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        idx = faiss.downcast_index(index)
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.vector_to_array(idx.id_map).astype(np.int64)
        return np.arange(index.ntotal, dtype=np.int64)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)
             if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def max_faiss_id(index: faiss.Index) -> int:
    ids = faiss_ids(index)
    return int(ids.max()) if len(ids) else -1


def _supports_remove(index: faiss.Index) -> bool:
    """remove_ids works (flat, PQ, in-memory IVF) rather than raising (HNSW, read-only on-disk lists)."""
    if find_sub_index(index, faiss.IndexHNSW) is not None:
        return False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    return True


def _selector_params(index: faiss.Index, params: dict[str, Any], sel: faiss.IDSelector
                     ) -> tuple[faiss.SearchParameters, list]:
    """Search parameters that filter ``sel`` inside the search and keep the tuned nprobe / efSearch.

    Returns the parameters and the SWIG objects they point to, which must outlive the search.
    """
    keep: list = [sel]
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):  # IDMap translates the selector itself
        inner, k = _selector_params(idx.index, params, sel)
        return inner, keep + k
    if isinstance(idx, faiss.IndexPreTransform):
        inner, k = _selector_params(idx.index, params, sel)
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        return p, keep + k + [inner]
    if isinstance(idx, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.sel = sel
        p.nprobe = int(params.get("nprobe", idx.nprobe))
        quantizer = find_sub_index(idx.quantizer, faiss.IndexHNSW)
        if quantizer is not None:
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = quantizer_ef(p.nprobe)
            p.quantizer_params = qp
            keep.append(qp)
        return p, keep
    if isinstance(idx, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.sel = sel
        p.efSearch = int(params.get("efSearch", idx.hnsw.efSearch))
        return p, keep
    p = faiss.SearchParameters()
    p.sel = sel
    return p, keep








