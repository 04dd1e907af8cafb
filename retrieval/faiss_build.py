"""Building a FAISS folder: in memory (``build``), or from shard files merged into on-disk lists (``build_on_disk``).

The folder appears complete or not at all: everything is written in a sibling temp folder and renamed. How the
factory is chosen and the search parameters tuned is in ``retrieval.tuning``; how the shards are filled (worker
processes, torchrun ranks) is in ``retrieval.build``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, Item, Row
from retrieval.faiss_store import TRAINED_FILE, blocks, commit_first, new_manifest, staging, stdout_to_stderr
from retrieval.tuning import (
    TARGET_RECALL,
    TUNE_QUERIES,
    FactoryChoice,
    choose_factory,
    gpu_count,
    make_index,
    train,
    train_size,
    tunables,
    tune_on,
)


def build_folder(out: str | Path, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
                 factory: str = "auto", max_memory: int | None = None, target_recall: float = TARGET_RECALL,
                 gpu: bool | None = None, seed: int = 0, extra: dict[str, Any] | None = None,
                 overwrite: bool = False, rows: Sequence[Row] | None = None) -> Path:
    """Build a new index folder from vectors (N, D) and their items, in memory; duplicates (sha256) once.

    The folder appears complete or not at all: everything is written in a sibling temp folder and renamed.
    ``rows``: catalogue rows to keep as they are, one per item (``mae index migrate``): ids, dates and tags kept,
    none dropped as a duplicate.
    """
    x = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if x.ndim != 2 or len(x) != len(items):
        raise ValueError(f"expected vectors (N, D) for {len(items)} items, got shape {x.shape}")
    keep, seen = [], set()
    for j, it in enumerate(items):
        if rows is not None or it.sha256 not in seen:
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
    with staging(out, overwrite) as tmp:
        catalog = Catalog.create(tmp / CATALOG_FILE)
        if rows is None:
            ids = np.asarray(catalog.insert(items, 1), np.int64)
        else:
            catalog.restore([dataclasses.replace(r, generation=1, removed=None) for r in rows])
            ids = np.asarray([r.id for r in rows], np.int64)
        # Tuning queries are held out: added only after the search parameters are chosen on them.
        held = np.zeros(n, bool)
        if tunables(index) and n > 10 * (10 + 1):
            held[rng.choice(n, min(TUNE_QUERIES, n // 10), replace=False)] = True
        started = time.perf_counter()
        if n:
            index.add_with_ids(x[~held], ids[~held])
        figures["add_seconds"] = round(time.perf_counter() - started, 2)
        tuning = tune_on(index, lambda: blocks(x[~held], ids[~held]), None, x[held], target_recall)
        if held.any():
            index.add_with_ids(x[held], ids[held])
        manifest = new_manifest(artifact_sha256, dim, choice, factory, tuning, figures, extra)
        commit_first(tmp, manifest, index, catalog)
        catalog.close()
    return Path(out)


def build_on_disk_folder(out: str | Path, trained: faiss.Index, shards: Sequence[str | Path], items: Sequence[Item],
                         ids: Sequence[int], *, artifact_sha256: str, choice: FactoryChoice, factory: str,
                         tune_blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                         tune_sample: tuple[np.ndarray, np.ndarray], target_recall: float = TARGET_RECALL,
                         extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Merge shard index files (same trained IVF, disjoint ids) into on-disk inverted lists, memory-mapped."""
    if faiss.try_extract_index_ivf(trained) is None:
        raise ValueError(f"an on-disk index needs an IVF factory, got {choice.factory!r}")
    with staging(out, overwrite) as tmp:
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
        manifest = new_manifest(artifact_sha256, trained.d, choice, factory, tuning, figures, extra)
        manifest["ivfdata"] = "lists.1.ivfdata"
        commit_first(tmp, manifest, index, catalog)
        catalog.close()
    return Path(out)
