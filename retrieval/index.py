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

How the factory is chosen and the search parameters tuned is in ``retrieval.tuning``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
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

from mae.files import fsync, fsync_dir, write_json_atomic
from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, Item
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
METRIC = "inner_product"

REBUILD_FRACTION = 0.2


class IndexMismatchError(ValueError):
    """The index was built with another artifact than the one asked to search it: vectors would not compare."""


@dataclass(frozen=True)
class Hit:
    """One neighbour: catalogue id, inner product (cosine) with the query, file path and class label."""

    id: int
    score: float
    path: str
    label: str | None


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
        write_index(self.index, staged)
        manifest = dict(self.manifest)
        manifest.update(generation=gen, ntotal=int(self.index.ntotal), count=self.catalog.count(gen),
                        tombstones=0 if _supports_remove(self.index)
                        else len(self.catalog.tombstones(gen, self.manifest.get("compacted", 0))),
                        updated=_now())
        write_json_atomic(self.path / MANIFEST, manifest)  # the commit point
        os.replace(staged, self.path / INDEX_FILE)
        fsync_dir(self.path)
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
        raise RuntimeError(f"{file} is not a readable FAISS index: {faiss_message(e)}") from e


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
def _file_lock(path: Path) -> Iterator[None]:
    with open(path / LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
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








