"""FAISS similarity index over embeddings: choose, train, fill, tune, change, save, load and search.

On disk, ``INDEX/`` holds::

    index.faiss     the FAISS index (catalogue ids are FAISS ids), inner product on L2-normalised vectors
    items.sqlite    what each id stands for (retrieval.catalog)
    manifest.json   artifact sha256, dim, metric, factory, count, tuned search parameters, build figures;
                    its ``generation`` is the commit point of every write
    lists.G.ivfdata the inverted lists of an on-disk IVF index (sharded builds), memory-mapped

**Writes are two-phase.** A write of generation G+1 (build, add, remove) first stores its catalogue rows
tagged G+1 (one SQLite transaction), then writes ``index.G+1.faiss`` (temp file + fsync + rename), then
replaces ``manifest.json`` (temp file + fsync + rename: the commit point), then renames ``index.G+1.faiss``
over ``index.faiss``. Whatever instant a SIGKILL lands, the manifest names a generation whose index file
exists (``index.G.faiss`` or ``index.faiss``) and whose catalogue rows are exactly those tagged <= G;
readers ignore the rest and the next writer rolls it back (``Index._recover``).

**Choosing a factory** (``choose_factory``, after autofaiss's reasoning):

* n < 50,000: ``Flat``. Exact search costs n x d multiply-adds per query (50k x 256 = 13 MFLOP, about a
  millisecond) and an approximate index would need its own training sample (>= 39 vectors per IVF list) and
  tuning for no measurable gain; exact is also what recall is measured against.
* n < 5,000,000, the HNSW graph fits the memory budget (~ 4d + 8M bytes per vector, plus ids) and no GPU:
  ``HNSW32,Flat``. No training, and the best recall/speed trade-off in memory: at 1M x 256 low-rank vectors
  (bench/retrieval.py, 2 shared cores) HNSW32 at efSearch 128 answered 102x / 7.6x the queries per second of
  exact search at batch 1 / 1000 for recall@10 0.95, where IVF4096 needed nprobe 512 (1/8 of the collection
  scanned) and managed 20x / 1.0x. Its costs: build time (graph insertion, ~n log n: 5 min at 1M here), no
  GPU version in faiss, and no removal, so removals become tombstones filtered at search and the graph is
  rebuilt when they pass 20% of the collection.
* larger, on disk, or with GPUs: ``IVF{nlist}_HNSW32,Flat`` with nlist ~ 4 sqrt(n) rounded to a power of two
  (1M -> 4096, 10M -> 16384), trained on 50 x nlist vectors (faiss warns under 39 per list; autofaiss uses
  30-256), the coarse quantizer an HNSW graph over the centroids so that assigning a query costs log(nlist).
* when the raw vectors (4d bytes each) do not fit the memory budget: ``OPQ{m}_{d},IVF{nlist}_HNSW32,PQ{m}np``,
  m bytes per vector with m the largest of 64, 32, 16, 8 that fits and divides d. Measured here (20k x 64,
  IVF64, PQ16, nprobe 16): the OPQ rotation lifted recall@10 from 0.67 to 0.78 for 4x the training time;
  polysemous training (dropped by ``np``) cost 5x the training time and changed nothing, since search never
  uses its Hamming filter.

``nprobe`` / ``efSearch`` are then tuned against exact search on a held-out sample of the collection (up to
1,000 vectors, added to the index only after tuning; a merged on-disk IVF uses leave-one-out instead, see
``tune``) to the smallest value with recall@10 >= 0.95, and stored in the manifest. Where no value reaches
it (PQ codes bound recall whatever nprobe), the cheapest value within half a point of the best recall is
used and the manifest says ``target_met: false``. ``--factory STRING`` takes
any faiss factory string instead (always with the inner-product metric).
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, Item

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TRAINED_FILE = "trained.faiss"  # on-disk indexes: the trained, empty IVF that new shards start from
LOCK_FILE = ".lock"
METRIC = "inner_product"

FLAT_MAX = 50_000
HNSW_MAX = 5_000_000
HNSW_M = 32
TRAIN_PER_LIST = 50
MIN_PER_LIST = 39
TARGET_RECALL = 0.95
TUNE_QUERIES = 1000
PLATEAU = 0.005  # when the target is out of reach: recall within this of the best counts as the best
REBUILD_FRACTION = 0.2
# ~1.5x steps: with powers of two the first value past the target can cost nearly twice what is needed
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
           6144, 8192)
EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class IndexMismatchError(ValueError):
    """The index was built with another artifact than the one asked to search it: vectors would not compare."""


@dataclass(frozen=True)
class Hit:
    """One neighbour: catalogue id, inner product (cosine) with the query, file path and class label."""

    id: int
    score: float
    path: str
    label: str | None


@dataclass(frozen=True)
class FactoryChoice:
    factory: str
    reason: str
    nlist: int | None = None
    train_size: int | None = None


@dataclass
class AddResult:
    ids: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    """Paths whose bytes are already indexed (or repeat an earlier file of the same call)."""


@dataclass
class RemoveResult:
    ids: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Keys (ids or paths) that name no live item."""
    rebuilt: bool = False


# ----------------------------------------------------------------------------------------------- factories


def default_memory_budget() -> int:
    """Half of the machine's physical memory: room for the index next to the model and the rest of the server."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def nlist_for(n: int) -> int:
    """IVF list count ~ 4 sqrt(n), a power of two, never fewer than MIN_PER_LIST training vectors per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * MIN_PER_LIST > n:
        nlist //= 2
    return int(min(nlist, 1 << 18))


def choose_factory(n: int, dim: int, *, max_memory: int | None = None, on_disk: bool = False,
                   gpu: bool = False) -> FactoryChoice:
    """The factory string for ``n`` vectors of ``dim`` (see the module docstring for the thresholds and why).

    ``gpu``: search will run on GPUs, where faiss has IVF but no HNSW.
    """
    budget = max_memory if max_memory is not None else default_memory_budget()
    raw = n * (4 * dim + 8)
    nlist = nlist_for(n)
    train = min(n, TRAIN_PER_LIST * nlist)
    if not on_disk and n < FLAT_MAX and raw <= budget:
        return FactoryChoice("Flat", f"{n} vectors < {FLAT_MAX:,}: exact search is fast enough and exact")
    hnsw = n * (4 * dim + 8 * HNSW_M * 1.1 + 16)
    if not on_disk and not gpu and n < HNSW_MAX and hnsw <= budget:
        return FactoryChoice(f"HNSW{HNSW_M},Flat",
                             f"{n:,} vectors < {HNSW_MAX:,} and the graph ({hnsw / 2**20:.0f} MiB) fits "
                             f"{budget / 2**20:.0f} MiB: HNSW needs no training")
    if raw * 1.1 <= budget:
        where = ("on disk" if on_disk else "GPU search" if gpu else f"{n:,} vectors >= {HNSW_MAX:,}"
                 if n >= HNSW_MAX else "HNSW graph too big")
        return FactoryChoice(f"IVF{nlist}_HNSW{HNSW_M},Flat",
                             f"{where}: IVF with {nlist} lists (~4 sqrt(n)), raw vectors fit "
                             f"{budget / 2**20:.0f} MiB", nlist, train)
    for m in (64, 32, 16, 8):
        if dim % m == 0 and n * (m + 8) * 1.2 <= budget:
            return FactoryChoice(f"OPQ{m}_{dim},IVF{nlist}_HNSW{HNSW_M},PQ{m}np",
                                 f"raw vectors ({raw / 2**20:.0f} MiB) exceed {budget / 2**20:.0f} MiB: "
                                 f"{m}-byte PQ codes, IVF with {nlist} lists", nlist, train)
    raise ValueError(f"{n:,} vectors of {dim} dims do not fit {budget / 2**20:.0f} MiB even as 8-byte codes; "
                     "build on disk (--shards) or raise --max-memory")


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for the factory string, inner product, taking external ids (IDMap2 unless IVF)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build factory {factory!r}: {_faiss_message(e)}") from e
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"factory {factory!r} does not support the inner-product metric")
    if faiss.try_extract_index_ivf(index) is None and not isinstance(faiss.downcast_index(index),
                                                                     (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def train_size(index: faiss.Index, n: int) -> int:
    """How many vectors to train on: TRAIN_PER_LIST per IVF list, or enough for the PQ codebooks."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    want = TRAIN_PER_LIST * ivf.nlist if ivf is not None else 256 * TRAIN_PER_LIST
    return min(n, max(want, 10_000))


def train(index: faiss.Index, sample: np.ndarray, gpu: bool | None = None) -> float:
    """Train on ``sample`` (N, D); k-means runs on the GPUs when faiss-gpu has any. Returns seconds."""
    if index.is_trained:
        return 0.0
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and len(sample) < ivf.nlist:
        raise ValueError(f"{len(sample)} vectors cannot train {ivf.nlist} IVF lists; use a smaller factory "
                         f"(nlist <= {max(1, len(sample) // MIN_PER_LIST)}) or --factory auto")
    if ivf is not None and _use_gpu(gpu):
        # plain k-means (L2), as faiss's CPU path trains a coarse quantizer; only the assignment moves
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    started = time.perf_counter()
    index.train(np.ascontiguousarray(sample, np.float32))
    if ivf is not None:
        ivf.clustering_index = None
    return time.perf_counter() - started


def ground_truth(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) of ``queries`` over (vectors, ids) blocks, streamed (fits any collection)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    id_parts: list[np.ndarray] = []

    def vectors() -> Iterator[np.ndarray]:
        for x, ids in blocks:
            id_parts.append(np.asarray(ids, np.int64))
            yield np.ascontiguousarray(x, np.float32)

    D, I = knn_ground_truth(np.ascontiguousarray(queries, np.float32), vectors(), k, faiss.METRIC_INNER_PRODUCT)
    all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    return D, np.where(I >= 0, all_ids[np.clip(I, 0, max(len(all_ids) - 1, 0))], -1)


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int, exclude: np.ndarray | None = None) -> float:
    """Mean |approx top-k ∩ exact top-k| / k; ``exclude`` (one id per query) is dropped from both first."""
    total = 0.0
    for j in range(len(exact)):
        a, e = approx[j], exact[j]
        if exclude is not None:
            a, e = a[a != exclude[j]], e[e != exclude[j]]
        a, e = a[a >= 0][:k], e[e >= 0][:k]
        if len(e):
            total += len(np.intersect1d(a, e)) / len(e)
    return total / max(len(exact), 1)


def tunables(index: faiss.Index) -> list[str]:
    """The search-time knob tuning turns: nprobe (IVF), efSearch (HNSW), or none (exact, PQ)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ["nprobe"]
    if _find(index, faiss.IndexHNSW) is not None:
        return ["efSearch"]
    return []


def apply_params(index: faiss.Index, params: dict[str, Any], gpu: bool = False) -> None:
    """Set search parameters through any wrapper (IDMap, OPQ; GPU copies with ``gpu``); the HNSW coarse
    quantizer's efSearch follows nprobe."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for key, value in params.items():
        space.set_index_parameter(index, key, value)
    ivf = None if gpu else faiss.try_extract_index_ivf(index)
    if ivf is not None and "nprobe" in params:
        quantizer = _find(ivf.quantizer, faiss.IndexHNSW)
        if quantizer is not None:
            quantizer.hnsw.efSearch = _quantizer_ef(int(params["nprobe"]))


def tune(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray | None, exact_ids: np.ndarray, *,
         k: int = 10, target: float = TARGET_RECALL) -> dict[str, Any]:
    """Smallest nprobe / efSearch whose recall@k against exact search reaches ``target``.

    ``exact_ids``: each query's exact top-k in the index. Queries should be held out of the index; where they
    cannot be (a merged on-disk IVF), ``query_ids`` names each query's own id, ``exact_ids`` are top-(k+1)
    and the own id is dropped from both answers. That leave-one-out is unbiased for IVF, whose lists are
    scanned whatever they hold, but not for HNSW: a query that is a node of the graph finds its neighbours
    through its own edges, and measured here it overstated recall@10 (0.95 tuned, 0.82 on fresh queries).
    Returns the chosen parameters and the curve that led to them.
    """
    knobs = tunables(index)
    if not knobs or not len(queries):
        return {"params": {}, "target": target, "reason": "exact" if not knobs else "no queries"}
    knob = knobs[0]
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        candidates = [p for p in NPROBES if p < nlist] + [nlist]
    else:
        candidates = list(EF_SEARCHES)
    curve = []
    chosen = None
    fetch = k + 1 if query_ids is not None else k
    for value in candidates:
        apply_params(index, {knob: value})
        started = time.perf_counter()
        _, I = index.search(queries, fetch)
        seconds = time.perf_counter() - started
        r10 = recall_at(I, exact_ids, k, exclude=query_ids)
        r1 = recall_at(I, exact_ids, 1, exclude=query_ids)
        curve.append({knob: value, f"recall@{k}": round(r10, 4), "recall@1": round(r1, 4),
                      "qps": round(len(queries) / max(seconds, 1e-9), 1)})
        if r10 >= target:
            chosen = value
            break
    met = chosen is not None
    if not met:  # out of reach (compressed codes bound recall): the cheapest setting on the plateau
        best = max(c[f"recall@{k}"] for c in curve)
        chosen = next(c[knob] for c in curve if c[f"recall@{k}"] >= best - PLATEAU)
        log.warning("recall@%d reaches at most %.3f < target %.2f; using %s=%s", k, best, target, knob, chosen)
    params = {knob: chosen}
    apply_params(index, params)
    at = next(c for c in curve if c[knob] == chosen)
    return {"params": params, "target": target, "target_met": met, "queries": len(queries), "k": k,
            f"recall@{k}": at[f"recall@{k}"], "recall@1": at["recall@1"], "curve": curve}


def tune_on(index: faiss.Index, blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
            sample_ids: np.ndarray | None, sample: np.ndarray, target: float = TARGET_RECALL, k: int = 10
            ) -> dict[str, Any]:
    """``tune`` with exact neighbours computed over the ``blocks`` of what the index holds."""
    knobs = tunables(index)
    if not knobs:
        return {"params": {}, "target": target, "reason": "exact"}
    if index.ntotal <= k + 1 or not len(sample):  # too small to measure: search exhaustively, it is cheap
        params = {knobs[0]: faiss.extract_index_ivf(index).nlist if knobs[0] == "nprobe" else EF_SEARCHES[-1]}
        apply_params(index, params)
        return {"params": params, "target": target, "reason": "too few vectors to tune"}
    started = time.perf_counter()
    _, exact = ground_truth(sample, blocks(), k + 1 if sample_ids is not None else k)
    result = tune(index, sample, sample_ids, exact, k=k, target=target)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


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
        self._gpu_wanted = gpu
        self._lock = threading.RLock()
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

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {self.count} items, {self.factory}, {self.device})"

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, path: str | Path, *, artifact_sha256: str | None = None, mmap: bool = False,
             gpu: bool | None = None) -> Index:
        """Open ``INDEX/``. ``artifact_sha256``: refuse an index built by another artifact.

        ``mmap`` maps the index file instead of reading it (read-only: for serving big indexes; on-disk IVF
        lists are always mapped). ``gpu``: None moves search to the GPUs when faiss-gpu sees any, True
        requires it, False keeps it on the CPU.
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            if not path.exists():
                raise FileNotFoundError(f"no index at {path}")
            raise FileNotFoundError(f"{path} is not an index (no {MANIFEST}); build one with `mae index build`")
        for attempt in range(5):
            manifest = read_manifest(path)
            check_artifact(path, manifest, artifact_sha256)
            try:
                index = _read_faiss(path, manifest, mmap)
            except FileNotFoundError:
                index = None
            fresh = read_manifest(path)
            if index is not None and fresh["generation"] == manifest["generation"]:
                break
            time.sleep(0.05 * (attempt + 1))  # a writer committed meanwhile: read the new generation
        else:
            raise RuntimeError(f"{path}: the index changed under every read; is a writer looping?")
        if index.ntotal != manifest["ntotal"]:
            raise RuntimeError(f"{path}: {INDEX_FILE} holds {index.ntotal} vectors but {MANIFEST} of generation "
                               f"{manifest['generation']} says {manifest['ntotal']}; the index is damaged")
        catalog = Catalog(path / CATALOG_FILE, read_only=not os.access(path, os.W_OK))
        return cls(path, manifest, index, catalog, mmap=mmap, gpu=gpu)

    def reload(self) -> bool:
        """Pick up a generation another process committed; True when something changed."""
        with self._lock:
            manifest = read_manifest(self.path)
            if manifest["generation"] == self.generation:
                return False
            other = Index.load(self.path, mmap=self.mmap, gpu=self._gpu_wanted)
            self.manifest, self.index = other.manifest, other.index
            other.catalog.close()
            self._refresh()
            return True

    def close(self) -> None:
        self.catalog.close()

    # ------------------------------------------------------------------ search

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k neighbours of each query (N, D), best first; fewer when the index holds fewer items."""
        scores, ids = self.search_ids(vectors, k)
        rows = self.catalog.get(np.unique(ids[ids >= 0]).tolist(), self.generation)
        out = []
        for srow, irow in zip(scores, ids):
            hits = [Hit(int(i), float(s), rows[int(i)].path, rows[int(i)].label)
                    for s, i in zip(srow, irow) if i >= 0 and int(i) in rows]
            out.append(hits[:k])
        return out

    def search_ids(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS answer: scores (N, k) float32 and ids (N, k) int64, -1 where there is no neighbour."""
        x = self._queries(vectors)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(x)
        empty = (np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64))
        with self._lock:
            if self.index.ntotal == 0 or self.count == 0 or n == 0:
                return empty
            fetch = min(k, self.index.ntotal)
            if len(self._tombstones) == 0:
                D, I = self._searcher.search(x, fetch)
            elif self._searcher is self.index:  # CPU: filter inside the search, so k stays exact
                params, _keep = _selector_params(self.index, self.manifest.get("search_params", {}), self._selector)
                D, I = self.index.search(x, fetch, params=params)
            else:  # GPU indexes take no selector: over-fetch and filter
                D, I = self._searcher.search(x, min(k + len(self._tombstones), self.index.ntotal))
                dead = np.isin(I, self._tombstones)
                I, D = np.where(dead, -1, I), np.where(dead, -np.inf, D)
                order = np.argsort(I < 0, axis=1, kind="stable")
                I, D = np.take_along_axis(I, order, 1)[:, :fetch], np.take_along_axis(D, order, 1)[:, :fetch]
        if fetch < k:
            D = np.concatenate([D, empty[0][:, : k - fetch]], axis=1)
            I = np.concatenate([I, empty[1][:, : k - fetch]], axis=1)
        return D.astype(np.float32), I.astype(np.int64)

    def item(self, id: int) -> Hit | None:
        """Catalogue lookup of a live id (score 1.0: an item is its own best match), for thumbnails."""
        row = self.catalog.get([int(id)], self.generation).get(int(id))
        return None if row is None else Hit(row.id, 1.0, row.path, row.label)

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

    def add(self, vectors: np.ndarray, items: Sequence[Item]) -> AddResult:
        """Add L2-normalised vectors (N, D) of ``items``; files already indexed (same sha256) are skipped."""
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        with self._writing():
            known = self.catalog.by_sha256([it.sha256 for it in items], self.generation)
            keep, seen, result = [], set(known), AddResult()
            for j, it in enumerate(items):
                if it.sha256 in seen:
                    result.duplicates.append(it.path)
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
            self._commit(gen)
            result.ids = ids
            return result

    def remove(self, keys: Iterable[int | str | Path]) -> RemoveResult:
        """Remove items by id (int, or a string of digits) or by file path.

        HNSW and on-disk lists keep the vectors as tombstones, filtered at search; once they pass
        REBUILD_FRACTION of the collection an in-memory index is rebuilt without them.
        """
        ids_asked, paths_asked = [], []
        for key in keys:
            if isinstance(key, (int, np.integer)) or isinstance(key, str) and key.isdigit():
                ids_asked.append(int(key))
            else:
                paths_asked.append(str(Path(key).expanduser().resolve()))
        with self._writing():
            result = RemoveResult()
            live = self.catalog.get(ids_asked, self.generation)
            by_path = self.catalog.by_path(paths_asked, self.generation)
            ids = [i for i in ids_asked if i in live] + [i for p in paths_asked for i in by_path.get(p, [])]
            result.missing = [str(i) for i in ids_asked if i not in live] + [p for p in paths_asked if p not in by_path]
            ids = sorted(set(ids))
            if not ids:
                return result
            gen = self.generation + 1
            self.catalog.mark_removed(ids, gen)
            if self.removable:
                self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
            else:
                tomb = len(self.catalog.tombstones(gen, self.manifest.get("compacted", 0)))
                if not self.on_disk and tomb > REBUILD_FRACTION * max(self.index.ntotal, 1):
                    self._rebuild(gen)
                    self.manifest["compacted"] = gen  # every vector removed so far has left the index
                    result.rebuilt = True
            self._commit(gen)
            result.ids = ids
            return result

    def _rebuild(self, gen: int) -> None:
        """A fresh index of the same factory over the live vectors (reconstructed), dropping tombstones."""
        live = self.catalog.live_ids(gen)
        fresh = make_index(self.factory, self.dim)
        if len(live):
            x = self.index.reconstruct_batch(live)
            train(fresh, x[: train_size(fresh, len(x))] if not fresh.is_trained else x[:0], gpu=self._gpu_wanted)
            fresh.add_with_ids(x, live)
        apply_params(fresh, self.manifest.get("search_params", {}))
        self.index = fresh

    def _add_on_disk(self, x: np.ndarray, ids: np.ndarray, gen: int) -> None:
        """New vectors go to an in-memory shard, then current lists + shard merge into ``lists.G.ivfdata``."""
        ivf = faiss.extract_index_ivf(self.index)
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
        with self._lock, _file_lock(self.path):
            manifest = read_manifest(self.path)
            if manifest["generation"] != self.generation:  # another process wrote: start from its generation
                self.manifest, self.index = manifest, _read_faiss(self.path, manifest, False)
            _recover(self.path, self.manifest, self.catalog, _supports_remove(self.index))
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

    def _commit(self, gen: int) -> None:
        """Phase 2 of a write whose catalogue rows (tagged ``gen``) are stored: index file, then manifest."""
        staged = self.path / f"index.{gen}.faiss"
        tmp = self.path / f"index.{gen}.faiss.tmp"
        faiss.write_index(self.index, str(tmp))
        _fsync(tmp)
        os.replace(tmp, staged)
        manifest = dict(self.manifest)
        manifest.update(generation=gen, ntotal=int(self.index.ntotal), count=self.catalog.count(gen),
                        tombstones=0 if _supports_remove(self.index)
                        else len(self.catalog.tombstones(gen, self.manifest.get("compacted", 0))),
                        updated=_now())
        write_json_atomic(self.path / MANIFEST, manifest)  # the commit point
        os.replace(staged, self.path / INDEX_FILE)
        _fsync_dir(self.path)
        self.manifest = manifest
        _recover(self.path, manifest, self.catalog, _supports_remove(self.index))

    def _refresh(self) -> None:
        """Derived state after a load or write: tombstones, their selector, the GPU copy, search params."""
        apply_params(self.index, self.manifest.get("search_params", {}))
        self._tombstones = (np.zeros(0, np.int64) if _supports_remove(self.index)
                            else self.catalog.tombstones(self.generation, self.manifest.get("compacted", 0)))
        self._selector = (faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
                          if len(self._tombstones) else None)
        self._searcher, self.device = self.index, "cpu"
        if not self.mmap and not self.on_disk and _use_gpu(self._gpu_wanted) and self.index.ntotal:
            try:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = faiss.get_num_gpus() > 1
                self._searcher = faiss.index_cpu_to_all_gpus(self.index, co)
                apply_params(self._searcher, {k: v for k, v in self.manifest.get("search_params", {}).items()
                                              if k == "nprobe"}, gpu=True)
                self.device = f"gpu x{faiss.get_num_gpus()}"
            except RuntimeError as e:  # e.g. HNSW has no GPU version in this faiss build
                if self._gpu_wanted:
                    raise RuntimeError(f"cannot move {self.factory} to the GPU: {_faiss_message(e)}") from e
                log.info("searching %s on the CPU: %s", self.factory, _faiss_message(e))

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
                self.generation), "build": m.get("build", {}), "created": m.get("created"),
            "updated": m.get("updated"), "bytes": _folder_bytes(self.path),
            "auto_factory_now": suggestion,
        }


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
        catalog = Catalog(tmp / CATALOG_FILE)
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
        catalog = Catalog(tmp / CATALOG_FILE)
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
    tmp = folder / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    _fsync(tmp)
    os.replace(tmp, folder / INDEX_FILE)
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
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _blocks(x: np.ndarray, ids: np.ndarray, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(x), size):
        yield x[i : i + size], ids[i : i + size]


# ----------------------------------------------------------------------------------------------- disk plumbing


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path / MANIFEST} is not valid JSON ({e})") from e
    if manifest.get("format", 0) > FORMAT:
        raise RuntimeError(f"{path} has index format {manifest['format']}; this version reads up to {FORMAT}")
    for key in ("generation", "artifact_sha256", "dim", "factory", "count", "ntotal"):
        if key not in manifest:
            raise RuntimeError(f"{path / MANIFEST} lacks {key!r}")
    return manifest


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    try:
        if manifest.get("ivfdata"):
            # The lists file path stored inside the index is absolute: point it at this folder's copy.
            index = faiss.read_index(str(file), faiss.IO_FLAG_SKIP_IVF_DATA)
            ivf = faiss.extract_index_ivf(index)
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            data = folder / manifest["ivfdata"]
            if not data.exists():
                raise RuntimeError(f"{data} (the on-disk inverted lists) is missing")
            lists.filename = str(data)
            lists.read_only = True
            lists.do_mmap()
            return index
        return faiss.read_index(str(file), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        if "No such file" in str(e) or not file.exists():
            raise FileNotFoundError(f"{file} is missing") from e
        raise RuntimeError(f"{file} is not a readable FAISS index: {_faiss_message(e)}") from e


def _recover(path: Path, manifest: dict[str, Any], catalog: Catalog, removable: bool) -> None:
    """Finish or undo what an interrupted write left (call under the write lock)."""
    gen = manifest["generation"]
    staged = path / f"index.{gen}.faiss"
    if staged.exists():  # committed, rename pending
        os.replace(staged, path / INDEX_FILE)
    for f in path.iterdir():
        stray_index = re.fullmatch(r"index\.\d+\.faiss(\.tmp)?|index\.faiss\.tmp|manifest\.json\.tmp", f.name)
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
def _file_lock(path: Path) -> Iterator[None]:
    with open(path / LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(path)


def _remove_if_exists(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- faiss helpers


def _find(index: faiss.Index, kind: type) -> Any:
    """The first sub-index of ``kind`` under IDMap / PreTransform wrappers, or None."""
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, kind):
            return idx
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            idx = faiss.downcast_index(idx.index)
        else:
            return None


def _supports_remove(index: faiss.Index) -> bool:
    """remove_ids works (flat, PQ, in-memory IVF) rather than raising (HNSW, read-only on-disk lists)."""
    if _find(index, faiss.IndexHNSW) is not None:
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
        quantizer = _find(idx.quantizer, faiss.IndexHNSW)
        if quantizer is not None:
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = _quantizer_ef(p.nprobe)
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


def _quantizer_ef(nprobe: int) -> int:
    return max(64, 2 * nprobe)


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _use_gpu(wanted: bool | None) -> bool:
    n = gpu_count()
    if wanted and not n:
        raise RuntimeError("a GPU was asked for, but this faiss has no GPU support or sees no GPU (install faiss-gpu)")
    return bool(n) and wanted is not False


def _faiss_message(e: Exception) -> str:
    """The useful last part of a faiss C++ exception ('Error in ... at file:line: message')."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return text.split(": ", 1)[-1] if " at /" in text else text
