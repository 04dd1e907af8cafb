"""Choosing, training and tuning FAISS indexes: which factory for a collection, and the search parameters
that reach a recall target against exact search.

**Choosing a factory** (``choose_factory``, after autofaiss's reasoning):

* n < 50,000: ``Flat``. Exact search costs n x d multiply-adds per query (50k x 256 = 13 MFLOP, about a
  millisecond) and an approximate index would need its own training sample (>= 39 vectors per IVF list) and
  tuning for no measurable gain; exact is also what recall is measured against.
* n < 5,000,000, the HNSW graph fits the memory budget (~ 4d + 8M bytes per vector, plus ids) and no GPU:
  ``HNSW32,Flat``. No training, and the best recall/speed trade-off in memory: at 1M low-rank vectors HNSW32
  reached recall@10 0.95 at a small efSearch where IVF needed to scan a large share of its lists
  (bench/retrieval.py; figures in the README). Its costs: build time (graph insertion, ~n log n), no GPU
  version in faiss, and no removal, so removals become tombstones filtered at search and the graph is rebuilt
  when they pass 20% of the collection.
* larger, on disk, or with GPUs: ``IVF{nlist}_HNSW32,Flat`` with nlist ~ 4 sqrt(n) rounded to a power of two
  (1M -> 4096, 10M -> 16384), trained on 50 x nlist vectors (faiss warns under 39 per list; autofaiss uses
  30-256), the coarse quantizer an HNSW graph over the centroids so that assigning a query costs log(nlist).
* when the raw vectors (4d bytes each) do not fit the memory budget: ``OPQ{m}_{d},IVF{nlist}_HNSW32,PQ{m}np``,
  m bytes per vector with m the largest of 64, 32, 16, 8 that fits and divides d. The OPQ rotation buys
  recall for training time; polysemous training (dropped by ``np``) costs training time and changes nothing,
  since search never uses its Hamming filter.

``nprobe`` / ``efSearch`` are then tuned against exact search on a held-out sample of the collection (up to
1,000 vectors, added to the index only after tuning; a merged on-disk IVF uses leave-one-out instead, see
``tune``) to the smallest value with recall@10 >= 0.95, and stored in the manifest. Where no value reaches
it (PQ codes bound recall whatever nprobe), the cheapest value within half a point of the best recall is
used and the manifest says ``target_met: false``. ``--factory STRING`` takes
any faiss factory string instead (always with the inner-product metric).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from mae.errors import UsageError

log = logging.getLogger(__name__)

FLAT_MAX = 50_000
HNSW_MAX = 5_000_000
HNSW_M = 32
TRAIN_PER_LIST = 50
MIN_PER_LIST = 39
TARGET_RECALL = 0.95
TUNE_QUERIES = 1000
PLATEAU = 0.005  # when the target is out of reach: recall within this of the best counts as the best
# ~1.5x steps: with powers of two the first value past the target can cost nearly twice what is needed
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
           6144, 8192)
EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class FactoryChoice:
    factory: str
    reason: str
    nlist: int | None = None
    train_size: int | None = None


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
    raise UsageError(f"{n:,} vectors of {dim} dims do not fit {budget / 2**20:.0f} MiB even as 8-byte codes; "
                     "build on disk (--shards) or raise --max-memory")


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for the factory string, inner product, taking external ids (IDMap2 unless IVF)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(f"faiss cannot build factory {factory!r}: {faiss_message(e)}") from e
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UsageError(f"factory {factory!r} does not support the inner-product metric")
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
        raise UsageError(f"{len(sample)} vectors cannot train {ivf.nlist} IVF lists; use a smaller factory "
                         f"(nlist <= {max(1, len(sample) // MIN_PER_LIST)}) or --factory auto")
    if ivf is not None and use_gpu(gpu):
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
    if find_sub_index(index, faiss.IndexHNSW) is not None:
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
        quantizer = find_sub_index(ivf.quantizer, faiss.IndexHNSW)
        if quantizer is not None:
            quantizer.hnsw.efSearch = quantizer_ef(int(params["nprobe"]))


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


# ----------------------------------------------------------------------------------------------- faiss helpers


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def find_sub_index(index: faiss.Index, kind: type) -> Any:
    """The first sub-index of ``kind`` under IDMap / PreTransform wrappers, or None."""
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, kind):
            return idx
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            idx = faiss.downcast_index(idx.index)
        else:
            return None


def quantizer_ef(nprobe: int) -> int:
    return max(64, 2 * nprobe)


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def use_gpu(wanted: bool | None) -> bool:
    n = gpu_count()
    if wanted and not n:
        raise UsageError("a GPU was asked for, but this faiss has no GPU support or sees no GPU (install faiss-gpu)")
    return bool(n) and wanted is not False


def faiss_message(e: Exception) -> str:
    """The useful last part of a faiss C++ exception ('Error in ... at file:line: message')."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return text.split(": ", 1)[-1] if " at /" in text else text
