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

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

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
