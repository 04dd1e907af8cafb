"""The FAISS engine: an index folder (``retrieval.faiss_store``) behind the ``Index`` interface.

**Writes are two-phase.** A write of generation G+1 (build, add, remove) first stores its catalogue rows
tagged G+1 (one SQLite transaction), then writes ``index.G+1.faiss`` (temp file + fsync + rename), then
replaces ``manifest.json`` (temp file + fsync + rename: the commit point), then renames ``index.G+1.faiss``
over ``index.faiss``. Whatever instant a SIGKILL lands, the manifest names a generation whose index file
exists (``index.G.faiss`` or ``index.faiss``) and whose catalogue rows are exactly those tagged <= G;
readers ignore the rest and the next writer rolls it back (``faiss_store.recover``). One writer at a time:
``INDEX/.lock`` (flock), waited for by the CLI, for at most ``lock_timeout`` seconds by the server.

**The parts must agree.** Every load and every write checks that the catalogue exists and is readable, that
it lists as many live items as the manifest counts, that the FAISS index holds as many vectors as those
items (plus tombstones) and that no FAISS id is at or past the catalogue's next id. An index that fails is
refused with ``IndexDamagedError`` naming the part and pointing at ``mae index check`` (``retrieval.repair``):
never searched, never written, because an empty catalogue beside a full index would hand out ids the index
already holds and an old vector would answer as a new file.

**Filters** (``search(where=...)``) are conditions on the catalogue (``retrieval.filters``). The live ids they
select become an id selector inside the FAISS search (``retrieval.faiss_vectors``), so that it returns exactly
k when k items match. The tuned nprobe / efSearch assume every vector may answer; with a fraction s selected,
the true neighbours among them sit farther out, so the search widens (``filtered_params``). Below
``EXACT_MAX`` selected items (or a selectivity of ``EXACT_FRACTION``) the index is not used at all: the
selected vectors are scored exactly, which is both cheaper and exact there (the measurements are in
``bench/retrieval.py --filtered`` and the README). A filtered approximate search that still finds fewer than k
is redone exactly.

How the factory is chosen and the search parameters tuned is in ``retrieval.tuning``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, CatalogError, Condition, Item, Row, check_items
from retrieval.engine import AddResult, Index, IndexDamagedError, RemoveResult, split_duplicates
from retrieval.faiss_store import (
    INDEX_FILE,
    MANIFEST,
    TRAINED_FILE,
    UPLOADS,
    blocks,
    check_artifact,
    commit_first,
    commit_generation,
    damaged,
    folder_bytes,
    manifest_stat,
    new_manifest,
    open_catalog,
    read_base,
    read_manifest,
    recover,
    remove_if_exists,
    staging,
    stdout_to_stderr,
    write_lock,
)
from retrieval.faiss_vectors import (
    Selection,
    make_selector,
    max_faiss_id,
    rebuilt,
    reconstruct,
    replace_rows,
    selector_params,
    supports_remove,
)
from retrieval.tuning import (
    TARGET_RECALL,
    TUNE_QUERIES,
    FactoryChoice,
    apply_params,
    choose_factory,
    faiss_message,
    gpu_count,
    make_index,
    train,
    train_size,
    tunables,
    tune_on,
    use_gpu,
)

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------- the index


class FaissIndex(Index):
    """A committed generation of a FAISS folder: the FAISS index, its catalogue and its manifest.

    Searching never blocks on writers (another process may ``add`` meanwhile; ``reload`` picks it up). Writes
    take ``INDEX/.lock``, so two writers never interleave.
    """

    engine = "faiss"

    def __init__(self, path: Path, manifest: dict[str, Any], index: faiss.Index, catalog: Catalog,
                 *, mmap: bool = False, gpu: bool | None = None):
        super().__init__()
        self.path = path
        self.manifest = manifest
        self.index = index  # the CPU master copy; what is written to disk
        self.catalog = catalog
        self.mmap = mmap
        self._gpu_wanted = gpu
        self._selections: OrderedDict[tuple, Selection] = OrderedDict()
        self._stat = manifest_stat(path)
        self.refresh()

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @manifest.setter
    def manifest(self, value: dict[str, Any]) -> None:
        self._manifest = value

    @property
    def uploads(self) -> Path:
        return self.path / UPLOADS

    @property
    def count(self) -> int:
        """Live items (removed ones excluded)."""
        return int(self.manifest["count"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def on_disk(self) -> bool:
        return bool(self.manifest.get("ivfdata"))

    @property
    def removable(self) -> bool:
        """Whether removed ids leave the FAISS index (else they are tombstones filtered at search)."""
        return supports_remove(self.index)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open_target(cls, target: str, *, artifact_sha256: str | None = None, mmap: bool = False,
                    gpu: bool | None = None) -> FaissIndex:
        return cls.load(target, artifact_sha256=artifact_sha256, mmap=mmap, gpu=gpu)

    @classmethod
    def create_target(cls, target: str, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
                      factory: str = "auto", overwrite: bool = False, extra: dict[str, Any] | None = None,
                      **options: Any) -> FaissIndex:
        options.pop("progress", None)  # a build in memory shows no bar
        return build(target, vectors, items, artifact_sha256=artifact_sha256, factory=factory, overwrite=overwrite,
                     extra=extra, **options)

    @classmethod
    def check_target(cls, target: str) -> dict[str, Any]:
        from retrieval import repair

        return repair.check(target)

    @classmethod
    def repair_target(cls, target: str, artifact: str | Path | None, **options: Any) -> dict[str, Any]:
        from retrieval import repair

        return repair.repair(target, artifact, **options)

    @classmethod
    def canonical_target(cls, target: str) -> str:
        return str(Path(target).expanduser().resolve())

    @classmethod
    def load(cls, path: str | Path, *, artifact_sha256: str | None = None, mmap: bool = False,
             gpu: bool | None = None) -> FaissIndex:
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
                raise damaged(path, f"{path / MANIFEST} is missing")
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
    def _load_once(cls, path: Path, artifact_sha256: str | None, mmap: bool, gpu: bool | None) -> FaissIndex:
        for attempt in range(5):
            manifest = read_manifest(path)
            check_artifact(path, manifest, artifact_sha256)
            try:
                index = read_base(path, manifest, mmap)
            except FileNotFoundError:
                index = None
            fresh = read_manifest(path)
            if fresh["generation"] == manifest["generation"]:
                if index is None:  # not a writer's rename: the committed generation has no index file
                    raise damaged(path, f"{path / INDEX_FILE} is missing")
                break
            time.sleep(0.05 * (attempt + 1))  # a writer committed meanwhile: read the new generation
        else:
            raise RuntimeError(f"{path}: the index changed under every read; is a writer looping?")
        catalog = open_catalog(path)
        try:
            idx = cls(path, manifest, index, catalog, mmap=mmap, gpu=gpu)
            idx._verify()
        except (CatalogError, IndexDamagedError) as e:
            catalog.close()
            error = e if isinstance(e, IndexDamagedError) else damaged(path, str(e))
            error.generation = int(manifest["generation"])  # type: ignore[attr-defined]
            raise error from (e if error is not e else None)
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
        with self.lock:
            stat = manifest_stat(self.path)
            if stat == self._stat and stat is not None and self._catalog_same():
                return False
            if stat is None:
                raise damaged(self.path, f"{self.path / MANIFEST} is missing")
            manifest = read_manifest(self.path)
            if manifest["generation"] == self.generation and self._catalog_same():
                self._stat = stat
                return False
            other = FaissIndex.load(self.path, mmap=self.mmap, gpu=self._gpu_wanted)
            old = self.catalog
            self.manifest, self.index, self.catalog = other.manifest, other.index, other.catalog
            self._stat = other._stat
            old.close()
            self.refresh()
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
            raise damaged(path, f"{path / CATALOG_FILE} was deleted or replaced while the index was open")
        live = self.catalog.count(self.generation)
        if live != self.count:
            raise damaged(path, f"{path / CATALOG_FILE} lists {live} live items but {path / MANIFEST} counts "
                                 f"{self.count} (generation {self.generation})")
        expected = self.count + len(self._tombstones)
        if self.index.ntotal != expected:
            raise damaged(path, f"{path / INDEX_FILE} holds {self.index.ntotal} vectors but the catalogue has "
                                 f"{self.count} live items" + (f" and {len(self._tombstones)} tombstones"
                                                                if len(self._tombstones) else ""))
        if self.index.ntotal != m["ntotal"]:
            raise damaged(path, f"{path / INDEX_FILE} holds {self.index.ntotal} vectors but {path / MANIFEST} "
                                 f"says {m['ntotal']}")
        if self.index.ntotal:
            top = int(max_faiss_id(self.index))
            if top >= self.catalog.next_id():
                raise damaged(path, f"{path / INDEX_FILE} holds id {top} but {path / CATALOG_FILE} would give "
                                     f"that id to the next item it adds")

    # ------------------------------------------------------------------ search

    def knn(self, x: np.ndarray, k: int, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.index.ntotal == 0:
                return np.full((len(x), 1), -np.inf, np.float32), np.full((len(x), 1), -1, np.int64)
            if conditions:
                return self._filtered(x, k, self.selection(conditions))
            D, I = self._unfiltered(x, k)
            short = (I >= 0).sum(axis=1) < min(k, self.count)
            if short.any():  # tombstones crowded the graph's answer: score those queries exactly
                D, I = replace_rows(D, I, short, *self._exact(x[short], k, self.selection(())))
            return D, I

    def _unfiltered(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(k, self.index.ntotal)
        if len(self._tombstones) == 0:
            return self._searcher.search(x, fetch)
        if self._searcher is self.index:  # CPU: filter inside the search, so k stays exact
            params, _keep = selector_params(self.index, self.manifest.get("search_params", {}), self._selector)
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
        params, _keep = selector_params(self.index, self.filtered_params(m / max(self.count, 1)), sel.selector)
        D, I = self.index.search(x, min(k, self.index.ntotal), params=params)
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
        """The stored vectors (N, D) of live items (reconstructed from the index; see the module docstring)."""
        ids = np.asarray(ids, np.int64)
        with self.lock:
            live = self.catalog.get(ids.tolist(), self.generation)
            missing = [int(i) for i in ids if int(i) not in live]
            if missing:
                raise KeyError(f"no item {missing[0]} in {self.path}")
            return self._reconstruct(ids)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return reconstruct(self.index, ids, self.factory)

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

    # ------------------------------------------------------------------ writes

    def add(self, vectors: np.ndarray, items: Sequence[Item], *, roots: Sequence[str | Path] = ()) -> AddResult:
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        check_items(items)
        with self._writing():
            known = self.catalog.by_sha256([it.sha256 for it in items], self.generation)
            keep, result = split_duplicates(items, known)
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
            self.commit(gen)
            result.ids = ids
            return result

    def delete(self, ids_asked: Sequence[int], paths_asked: Mapping[str, Sequence[str]]) -> RemoveResult:
        """HNSW and on-disk lists keep the vectors as tombstones, filtered at search; once they pass
        REBUILD_FRACTION of the collection an in-memory index is rebuilt without them."""
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
                    self.rebuild(gen)
                    self.manifest["compacted"] = gen  # every vector removed so far has left the index
                    result.rebuilt = True
            self.commit(gen)
            result.ids = ids
            result.paths = [rows[i].path for i in ids]
            return result

    def annotate(self, metadata: Mapping[str, tuple[Any, Mapping[str, str] | None]]) -> int:
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
            self.commit(self.generation + 1, index_changed=False)
            return len(updates)

    def rebuild(self, gen: int) -> None:
        """A fresh index of the same factory over the live vectors (reconstructed), dropping tombstones."""
        params = self.manifest.get("search_params", {})
        self.index = rebuilt(self.index, self.factory, self.catalog.live_ids(gen), params, gpu=self._gpu_wanted)

    def _add_on_disk(self, x: np.ndarray, ids: np.ndarray, gen: int) -> None:
        """New vectors go to an in-memory shard, then current lists + shard merge into ``lists.G.ivfdata``."""
        ivf = faiss.extract_index_ivf(self.index)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # the merge bypasses it: rebuilt on next use
        shard = faiss.read_index(str(self.path / TRAINED_FILE))
        shard.add_with_ids(x, ids)
        shard_ivf = faiss.extract_index_ivf(shard)
        name = f"lists.{gen}.ivfdata"
        remove_if_exists(self.path / name)
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
        with write_lock(self.path, self.lock_timeout), self.lock:
            try:
                manifest = read_manifest(self.path)
                if not self._catalog_same():
                    raise damaged(self.path, f"{self.path / CATALOG_FILE} was deleted or replaced")
                if manifest["generation"] != self.generation:  # another process wrote: start from its generation
                    self.manifest, self.index = manifest, read_base(self.path, manifest, False)
                recover(self.path, self.manifest, self.catalog, supports_remove(self.index))
                self.refresh()
                self._verify()
            except CatalogError as e:
                raise damaged(self.path, str(e)) from e
            try:
                yield
            except BaseException:
                # the half-done write is undone: disk still holds the last generation, reread it
                self.manifest = read_manifest(self.path)
                recover(self.path, self.manifest, self.catalog, supports_remove(self.index))
                self.index = read_base(self.path, self.manifest, False)
                raise
            finally:
                self.refresh()

    def commit(self, gen: int, index_changed: bool = True) -> None:
        """Phase 2 of a write whose catalogue rows (tagged ``gen``) are stored: index file, then manifest.

        ``index_changed`` False (a metadata-only write): the committed index file stays as it is.
        """
        self.manifest = commit_generation(self.path, self.manifest, self.catalog, gen, removable=self.removable,
                                          index=self.index if index_changed else None)
        self._stat = manifest_stat(self.path)

    def refresh(self) -> None:
        """Derived state after a load or write: tombstones, their selector, the GPU copy, search params."""
        apply_params(self.index, self.manifest.get("search_params", {}))
        self._selections.clear()
        st = os.stat(self.catalog.path)
        self.catalog_identity = (st.st_dev, st.st_ino)
        self._tombstones = (np.zeros(0, np.int64) if supports_remove(self.index)
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

    def compact(self, *, force: bool = True) -> dict[str, Any]:
        return {"index": self.name, "compacted": False, "generation": self.generation}

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        m = self.manifest
        try:
            suggestion = choose_factory(self.count, self.dim, on_disk=self.on_disk).factory
        except ValueError as e:
            suggestion = str(e)
        return {
            "index": str(self.path), "engine": self.engine, "count": self.count, "dim": self.dim, "metric": m["metric"],
            "factory": m["factory"], "factory_reason": m.get("factory_reason"), "generation": self.generation,
            "ntotal": int(self.index.ntotal), "tombstones": len(self._tombstones), "removable": self.removable,
            "on_disk": self.on_disk, "device": self.device, "search_params": m.get("search_params", {}),
            "tuning": {k: v for k, v in m.get("tuning", {}).items() if k != "curve"},
            "artifact_sha256": m["artifact_sha256"], "artifact": m.get("artifact"), "labels": self.catalog.labels(
                self.generation), "tags": self.catalog.tag_keys(self.generation), "build": m.get("build", {}),
            "created": m.get("created"), "updated": m.get("updated"), "bytes": folder_bytes(self.path),
            "auto_factory_now": suggestion, "roots": [str(r) for r in self.roots],
        }


# ----------------------------------------------------------------------------------------------- building


def build(out: str | Path, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
          factory: str = "auto", max_memory: int | None = None, target_recall: float = TARGET_RECALL,
          gpu: bool | None = None, seed: int = 0, extra: dict[str, Any] | None = None,
          overwrite: bool = False, rows: Sequence[Row] | None = None) -> Index:
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
    return Index.load(out, gpu=gpu)


def build_on_disk(out: str | Path, trained: faiss.Index, shards: Sequence[str | Path], items: Sequence[Item],
                  ids: Sequence[int], *, artifact_sha256: str, choice: FactoryChoice, factory: str,
                  tune_blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                  tune_sample: tuple[np.ndarray, np.ndarray], target_recall: float = TARGET_RECALL,
                  extra: dict[str, Any] | None = None, overwrite: bool = False) -> Index:
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
    return Index.load(out)
