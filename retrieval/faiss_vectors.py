"""The vectors of a FAISS index in memory: searching them with an id filter inside FAISS, and giving them back.

**Filters** become an ``IDSelectorBitmap`` over the selected ids, passed to FAISS in ``SearchParameters``, so
the search itself skips everything else and returns exactly k when k items match; ``selector_params`` keeps the
tuned nprobe / efSearch under every wrapper (IDMap, PreTransform, an HNSW quantizer).

**Stored vectors** ("more like this", near-duplicates, exact filtered search) are reconstructed from the index
itself, not kept in a second store: Flat and HNSW,Flat hold the vectors as they were added (IDMap2 maps ids),
an IVF index answers by id through a direct map built on first use (a hash table of id -> list, offset;
about 40 bytes per vector, kept in the file once built). PQ indexes give back the decoded code, an
approximation of the vector: what they search with anyway. A float16 copy beside the index would have cost
2 x dim bytes per vector, a third file in every commit, and bought nothing for the uncompressed factories
``auto`` picks under the memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.faiss_store import stdout_to_stderr
from retrieval.tuning import apply_params, faiss_message, find_sub_index, make_index, quantizer_ef, train, train_size


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


def supports_remove(index: faiss.Index) -> bool:
    """remove_ids works (flat, PQ, in-memory IVF) rather than raising (HNSW, read-only on-disk lists)."""
    if find_sub_index(index, faiss.IndexHNSW) is not None:
        return False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    return True


def selector_params(index: faiss.Index, params: dict[str, Any], sel: faiss.IDSelector
                     ) -> tuple[faiss.SearchParameters, list]:
    """Search parameters that filter ``sel`` inside the search and keep the tuned nprobe / efSearch.

    Returns the parameters and the SWIG objects they point to, which must outlive the search.
    """
    keep: list = [sel]
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):  # IDMap translates the selector itself
        inner, k = selector_params(idx.index, params, sel)
        return inner, keep + k
    if isinstance(idx, faiss.IndexPreTransform):
        inner, k = selector_params(idx.index, params, sel)
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


def replace_rows(D: np.ndarray, I: np.ndarray, rows: np.ndarray, D2: np.ndarray, I2: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """D, I with the ``rows`` (a mask) replaced by D2, I2, which may have fewer columns (padded with no-hit)."""
    D, I = D.copy(), I.copy()
    width = D.shape[1]
    D[rows], I[rows] = -np.inf, -1
    D[rows, : min(width, D2.shape[1])] = D2[:, :width]
    I[rows, : min(width, I2.shape[1])] = I2[:, :width]
    return D, I


def reconstruct(index: faiss.Index, ids: np.ndarray, factory: str = "") -> np.ndarray:
    """The stored vectors (N, D) of ``ids`` (an IVF gets its id hash table on first use)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    try:
        return index.reconstruct_batch(np.ascontiguousarray(ids, np.int64))
    except RuntimeError as e:
        raise RuntimeError(f"{factory or 'this index'} cannot give back stored vectors: {faiss_message(e)}") from e


def rebuilt(index: faiss.Index, factory: str, live: np.ndarray, params: dict[str, Any], gpu: bool | None = None
            ) -> faiss.Index:
    """A fresh index of ``factory`` over the ``live`` ids' vectors (reconstructed from ``index``), trained anew
    where it needs training: what an index that cannot remove vectors becomes once tombstones pile up."""
    fresh = make_index(factory, index.d)
    if len(live):
        x = reconstruct(index, live, factory)
        train(fresh, x[: train_size(fresh, len(x))] if not fresh.is_trained else x[:0], gpu=gpu)
        fresh.add_with_ids(x, live)
    apply_params(fresh, params)
    return fresh


# ----------------------------------------------------------------------------------------------- the vectors in memory

IN_PLACE_MAX = 256  # a write of more vectors goes beside the base (cheap to apply) until a compaction folds it


class Vectors:
    """A FAISS folder's vectors in memory: the base (``index.faiss`` as read), what the append log added since,
    and the ids removed since (``dead``: tombstones, filtered inside every search).

    Where logged vectors go is chosen so that a search costs what it would on one index holding everything, and
    applying a write costs what the write holds:

    - into the base itself, for an in-memory HNSW graph or IVF lists and writes of at most ``IN_PLACE_MAX``
      vectors (an HNSW base is given room at load, so that the reallocation of its arrays happens then, not in
      a request); the tuned efSearch / nprobe stay right, as for an index built with them;
    - beside it, in ``delta``, for everything else: an exact index beside an exact base (the same work as
      searching one exact index, and no reallocation of a million vectors on a reader's first add) or beside an
      HNSW base for a large write (exact and cheap to apply, until the compaction that such a write triggers);
      an empty copy of the IVF beside an IVF base whose lists are mapped from disk (same quantizer and codes:
      nprobe keeps its meaning). Answers of the base and the delta are merged by score.
    """

    def __init__(self, base: faiss.Index, searcher: faiss.Index | None = None, *, grow: bool = False,
                 headroom: int = 0):
        self.base = base
        self.searcher = searcher if searcher is not None else base  # a GPU copy of the base, when there is one
        self.base_ntotal = int(base.ntotal)  # as read
        self.delta = empty_like(base)
        self.delta_ids = np.zeros(0, np.int64)  # the ids in ``delta``
        self.dead = np.zeros(0, np.int64)  # ascending
        self.logged = 0  # vectors and removals applied from the log
        self.in_place = grow and self.searcher is base and grows_in_place(base)
        if self.in_place and headroom:
            reserve(base, headroom)
        self._dead_selector: tuple[Any, ...] | None = None

    @property
    def ntotal(self) -> int:
        """Vectors held (live and dead)."""
        return int(self.base.ntotal + self.delta.ntotal)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Vectors (N, D) the log added (already L2-normalised), under their ids."""
        if not len(ids):
            return
        x, ids = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64)
        if self.in_place and len(ids) <= IN_PLACE_MAX:
            self.base.add_with_ids(x, ids)
        else:
            self.delta.add_with_ids(x, ids)
            self.delta_ids = np.concatenate([self.delta_ids, ids])
        self.logged += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Ids the log removed: their vectors stay, filtered out of every search (tombstones)."""
        if len(ids):
            self.dead = np.union1d(self.dead, np.asarray(ids, np.int64))
            self.logged += len(ids)
            self._dead_selector = None

    def live_selector(self) -> Any:
        """An IDSelector that keeps everything but the dead (None when nothing is dead)."""
        if not len(self.dead):
            return None
        if self._dead_selector is None:
            inner = faiss.IDSelectorBatch(self.dead)
            self._dead_selector = (faiss.IDSelectorNot(inner), inner)
        return self._dead_selector[0]

    def search(self, x: np.ndarray, k: int, params: dict[str, Any], sel: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the base and the delta, merged: scores (N, k') and ids (N, k'), best first.

        ``sel``: an IDSelector applied inside both searches (a filter's bitmap); None: all live vectors.
        """
        sel = sel if sel is not None else self.live_selector()
        if self.base.ntotal and self.delta.ntotal and self.searcher is self.base and both_ivf(self.base, self.delta):
            return merge(ivf_pair_search(self.base, self.delta, x, k, params, sel), k)
        parts = []
        if self.base.ntotal:
            parts.append(self._search_one(self.base, x, k, params, sel, gpu=self.searcher is not self.base))
        if self.delta.ntotal:
            parts.append(self._search_one(self.delta, x, k, params, sel))
        if not parts:
            return np.full((len(x), 1), -np.inf, np.float32), np.full((len(x), 1), -1, np.int64)
        return merge(parts, k)

    def _search_one(self, index: faiss.Index, x: np.ndarray, k: int, params: dict[str, Any], sel: Any,
                    gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(k, index.ntotal)
        if sel is None:
            return (self.searcher if gpu else index).search(x, fetch)
        if gpu and sel is self.live_selector():  # GPU indexes take no selector: over-fetch and drop the dead
            D, I = self.searcher.search(x, min(k + len(self.dead), index.ntotal))
            dead = np.isin(I, self.dead)
            I, D = np.where(dead, -1, I), np.where(dead, -np.inf, D)
            order = np.argsort(I < 0, axis=1, kind="stable")
            return np.take_along_axis(D, order, 1)[:, :fetch], np.take_along_axis(I, order, 1)[:, :fetch]
        p, _keep = selector_params(index, params, sel)
        return index.search(x, fetch, params=p)

    def reconstruct(self, ids: np.ndarray, factory: str = "") -> np.ndarray:
        """The stored vectors (N, D) of ``ids``, from the delta or the base."""
        ids = np.ascontiguousarray(ids, np.int64)
        in_delta = np.isin(ids, self.delta_ids) if len(self.delta_ids) else np.zeros(len(ids), bool)
        if not in_delta.any():
            return reconstruct(self.base, ids, factory)
        out = np.empty((len(ids), self.base.d), np.float32)
        out[in_delta] = reconstruct(self.delta, ids[in_delta], factory)
        if (~in_delta).any():
            out[~in_delta] = reconstruct(self.base, ids[~in_delta], factory)
        return out

    def ids(self) -> np.ndarray:
        """Every id held (live and dead): int64 (ntotal,)."""
        return np.concatenate([faiss_ids(self.base), self.delta_ids])

def grows_in_place(index: faiss.Index) -> bool:
    """Whether vectors can go into ``index`` itself cheaply: an HNSW graph, or IVF lists held in memory."""
    if find_sub_index(index, faiss.IndexHNSW) is not None:
        return True
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def reserve(index: faiss.Index, extra: int) -> None:
    """Room for at least ``extra`` more vectors in an HNSW index's arrays (vectors, levels, links, ids), so that
    the reallocation a first add would make (std::vector grows to twice its size, copying everything) happens
    here, while the index loads, not in the request that applies a write. Growing then shrinking a vector keeps
    its capacity; the room past the vectors is address space, not resident memory, until vectors fill it."""
    hnsw = find_sub_index(index, faiss.IndexHNSW)
    if hnsw is None or extra <= 0:
        return
    graph = hnsw.hnsw
    per_vector = graph.neighbors.size() / max(hnsw.ntotal, 1)
    storage = faiss.downcast_index(hnsw.storage)
    room = [(storage.codes, extra * storage.code_size), (graph.levels, extra), (graph.offsets, extra),
            (graph.neighbors, int(extra * per_vector * 1.25) + 64)]
    idmap = faiss.downcast_index(index)
    if isinstance(idmap, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        room.append((idmap.id_map, extra))
    for vector, more in room:
        size = vector.size()
        vector.resize(size + more)
        vector.resize(size)


def both_ivf(base: faiss.Index, delta: faiss.Index) -> bool:
    """Whether ``base`` and ``delta`` are bare IVF indexes (no wrapper), as an IVF base and its empty copy are."""
    return isinstance(faiss.downcast_index(base), faiss.IndexIVF) and isinstance(faiss.downcast_index(delta),
                                                                                  faiss.IndexIVF)


def ivf_pair_search(base: faiss.Index, delta: faiss.Index, x: np.ndarray, k: int, params: dict[str, Any], sel: Any
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Both IVF searches with one coarse assignment: the queries meet the quantizer once, and the delta's lists
    are scanned for the same nprobe lists as the base's (what one index holding both would scan)."""
    base_ivf, delta_ivf = faiss.downcast_index(base), faiss.downcast_index(delta)
    nprobe = min(int(params.get("nprobe", base_ivf.nprobe)), base_ivf.nlist)
    if sel is None:  # the quantizer's own efSearch (apply_params set it for the tuned nprobe)
        p = faiss.SearchParametersIVF()
        p.nprobe = nprobe  # how many lists each row of the assignment holds
        coarse_d, coarse_i = base_ivf.quantizer.search(x, nprobe)
    else:
        p, _keep = selector_params(base_ivf, dict(params, nprobe=nprobe), sel)
        coarse_d, coarse_i = base_ivf.quantizer.search(x, nprobe, params=p.quantizer_params)
    out = []
    for ivf in (base_ivf, delta_ivf):
        if ivf.ntotal:
            fetch = min(k, int(ivf.ntotal))
            D, I = np.empty((len(x), fetch), np.float32), np.empty((len(x), fetch), np.int64)
            # the C++ call: faiss's Python wrapper takes no search parameters (the filter, the nprobe)
            ivf.search_preassigned_c(len(x), faiss.swig_ptr(x), fetch, faiss.swig_ptr(coarse_i),
                                     faiss.swig_ptr(coarse_d), faiss.swig_ptr(D), faiss.swig_ptr(I), False, p)
            out.append((D, I))
    return out


def empty_like(base: faiss.Index) -> faiss.Index:
    """An empty index that new vectors beside ``base`` go to: an empty copy of an IVF (same quantizer and codes,
    with an id hash table so that it gives vectors back), an exact inner-product index beside anything else."""
    ivf = faiss.try_extract_index_ivf(base)
    top = faiss.downcast_index(base)
    if ivf is None or not (isinstance(top, faiss.IndexIVF)
                           or isinstance(top, faiss.IndexPreTransform) and faiss.try_extract_index_ivf(top.index)):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(base.d))
    # Copy the structure, not the lists: swap in empty lists for the time of the copy.
    lists, own, inner_total, outer_total = ivf.invlists, ivf.own_invlists, ivf.ntotal, base.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.invlists = empty
    ivf.ntotal = base.ntotal = 0
    try:
        clone = faiss.clone_index(base)
    finally:
        ivf.invlists, ivf.own_invlists = lists, own
        ivf.ntotal, base.ntotal = inner_total, outer_total
    clone_ivf = faiss.extract_index_ivf(clone)
    clone_ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    clone_ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return clone


def merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Answers of several indexes over disjoint ids -> the best k of each row: scores (N, k'), ids (N, k')."""
    if len(parts) == 1:
        return parts[0]
    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    D = np.where(I < 0, -np.inf, D)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1).astype(np.float32), np.take_along_axis(I, order, 1)


def fold(base: faiss.Index, adds: Sequence[tuple[np.ndarray, np.ndarray]], dead: np.ndarray, removable: bool,
         lists_file: Path | None = None) -> faiss.Index:
    """``base`` (a copy the caller owns: it is changed) with the vectors of ``adds`` ((ids, x) pairs, in log order)
    added and, when ``removable``, the ``dead`` ids removed: the log folded into one index.

    Vectors are added as the log holds them (exact floats), so an IVF or PQ base encodes them as it encodes
    everything. An on-disk IVF base (read-only mapped lists) gets a new lists file, ``lists_file``: its lists
    and the new ones merged there.
    """
    ids = np.concatenate([a[0] for a in adds]) if adds else np.zeros(0, np.int64)
    x = np.concatenate([a[1] for a in adds]) if adds else np.zeros((0, base.d), np.float32)
    ivf = faiss.try_extract_index_ivf(base)
    on_disk = ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    if on_disk:
        if lists_file is None:
            raise ValueError("folding into an on-disk IVF needs the new lists file")
        merge_on_disk(base, x, ids, lists_file)
    elif len(ids):
        base.add_with_ids(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64))
    if removable and len(dead):
        hashed = ivf is not None and ivf.direct_map.type == faiss.DirectMap.Hashtable
        sel = faiss.IDSelectorArray if hashed else faiss.IDSelectorBatch  # faiss's IVF hash table wants an array
        base.remove_ids(sel(np.ascontiguousarray(dead, np.int64)))
    return base


def merge_on_disk(index: faiss.Index, x: np.ndarray, ids: np.ndarray, lists_file: Path) -> None:
    """New vectors go to an in-memory copy of the (empty) IVF, then the mapped lists and it merge into
    ``lists_file``, which ``index`` then maps."""
    ivf = faiss.extract_index_ivf(index)
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # the merge bypasses it: rebuilt on next use
    shard = empty_like(index)
    if len(ids):
        shard.add_with_ids(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64))
    shard_ivf = faiss.extract_index_ivf(shard)
    lists_file.unlink(missing_ok=True)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_file))
    parts = faiss.InvertedListsPtrVector()
    parts.push_back(ivf.invlists)
    parts.push_back(shard_ivf.invlists)
    with stdout_to_stderr():  # faiss prints "resizing ..." on stdout, which belongs to --json
        ntotal = invlists.merge_from_multiple(parts.data(), parts.size(), False)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    index.ntotal = ivf.ntotal = ntotal
