"""Reading a FAISS folder: k nearest neighbours with filters inside FAISS, stored vectors, catalogue lookups.

``FaissReads`` is the read half of ``retrieval.faiss_index.FaissIndex`` (a mixin: it reads the handle's
``store``, ``catalog``, ``manifest`` and ``lock``). Filters (``retrieval.filters``) select live ids in the
catalogue; the ids become an id selector inside the FAISS searches of the base and the log's delta
(``faiss_vectors``), so that exactly k come back when k items match. The tuned nprobe / efSearch assume every
vector may answer; with a fraction s selected, the true neighbours among them sit farther out, so the search
widens (``filtered_params``). Below ``EXACT_MAX`` selected items (or a selectivity of ``EXACT_FRACTION``) the
index is not used at all: the selected vectors are scored exactly, which is both cheaper and exact there
(``bench/retrieval.py --filtered``). A filtered approximate search that still finds fewer than k is redone
exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from retrieval.catalog import Condition, Row
from retrieval.engine import ItemNotFoundError
from retrieval.faiss_vectors import Selection, make_selector, replace_rows
from retrieval.tuning import tunables

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


class FaissReads:
    """The reads of a FAISS folder's handle (see the module docstring)."""


    def knn(self, x: np.ndarray, k: int, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.store.ntotal == 0:
                return np.full((len(x), 1), -np.inf, np.float32), np.full((len(x), 1), -1, np.int64)
            if conditions:
                return self._filtered(x, k, self.selection(conditions))
            D, I = self.store.search(x, k, self.manifest.get("search_params", {}))
            short = (I >= 0).sum(axis=1) < min(k, self.count)
            if short.any():  # tombstones crowded the graph's answer: score those queries exactly
                D, I = replace_rows(D, I, short, *self._exact(x[short], k, self.selection(())))
            return D, I

    def _filtered(self, x: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Search among the selected ids only: exactly when few, else inside FAISS with a selector."""
        m = len(sel.ids)
        if m == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        if self.exact_for(m):
            return self._exact(x, k, sel)
        D, I = self.store.search(x, k, self.filtered_params(m / max(self.count, 1)), sel.selector)
        short = (I >= 0).sum(axis=1) < min(k, m)
        if short.any():  # the widened search still missed some: those queries are scored exactly
            D, I = replace_rows(D, I, short, *self._exact(x[short], k, sel))
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
        with self.lock:
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
        """The stored vectors (N, D) of live items (reconstructed from the index: ``faiss_vectors``)."""
        ids = np.asarray(ids, np.int64)
        with self.lock:
            live = self.catalog.get(ids.tolist(), self.generation)
            missing = [int(i) for i in ids if int(i) not in live]
            if missing:
                raise ItemNotFoundError(f"no item {missing[0]} in {self.path}")
            return self._reconstruct(ids)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.store.reconstruct(ids, self.factory)

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        with self.lock:
            return self.catalog.get(ids, self.generation)

    def live_ids(self) -> np.ndarray:
        with self.lock:
            return self.catalog.live_ids(self.generation)

    def ids_by_sha256(self, hashes: Iterable[str]) -> dict[str, int]:
        with self.lock:
            return self.catalog.by_sha256(hashes, self.generation)

    def ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        with self.lock:
            return self.catalog.by_path(paths, self.generation)

    def labels(self) -> dict[str, int]:
        with self.lock:
            return self.catalog.labels(self.generation)

    def tag_keys(self, limit: int = 50) -> dict[str, int]:
        with self.lock:
            return self.catalog.tag_keys(self.generation, limit)
