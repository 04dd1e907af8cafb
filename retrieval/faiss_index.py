"""The FAISS engine: an index folder (``retrieval.faiss_store``) behind the ``Index`` interface.

**A write costs what it changes.** ``index.faiss`` is the *base*: the collection as of its last compaction
(the manifest's ``base_generation``). A write of generation G+1 stores its catalogue rows tagged G+1 (one SQLite
transaction), appends one record to the append log (``retrieval.faiss_log``: the b ids and vectors added, or
the ids removed; fsync), then commits by replacing ``manifest.json`` (temp file + fsync + rename), which names
the log's new committed end. Nothing else is rewritten. Whatever instant a SIGKILL lands, the manifest names a
generation whose base and log bytes exist and whose catalogue rows are exactly those tagged <= G; readers ignore
the rest and the next writer undoes it (``faiss_store.recover``). One writer at a time: ``INDEX/.lock`` (flock),
waited for by the CLI, for at most ``lock_timeout`` seconds by the server.

**Readers apply only what they have not seen.** ``reload`` (a server calls it before every read) costs a
``stat`` when nothing changed; otherwise it reads the log bytes past the end it applied and adds their vectors
to the base in memory (or beside it) and their removals to the tombstones (``faiss_vectors.Vectors``),
filtered inside every search. Compaction (``retrieval.faiss_compact``) folds the log into a new base, by size
and by fraction of the collection, or on demand (``mae index compact``), without blocking readers or writers;
a reader that applied the log up to the fold keeps its state (and reads the new base in the background once it
has applied a compaction's worth since its own), one that lags behind the fold reads the new base at once.

**The parts must agree.** Every load checks that the catalogue exists and is readable, that it lists as many
live items as the manifest counts, that the base and the log hold as many vectors as those items plus the
tombstones, and that no id is at or past the catalogue's next id; every write and every reload checks that the
counts it applied add up to the manifest's. An index that fails is refused with ``IndexDamagedError`` naming
the part and pointing at ``mae index check`` (``retrieval.repair``): never searched, never written, because an
empty catalogue beside a full index would hand out ids the index already holds.

**Filters** (``search(where=...)``) run inside the FAISS searches: ``retrieval.faiss_search``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mae.errors import UsageError
from mae.files import write_json_atomic
from retrieval import faiss_compact, faiss_log
from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, CatalogError, Item, check_items
from retrieval.engine import AddResult, Index, IndexDamagedError, RemoveResult, split_duplicates
from retrieval.faiss_build import build_folder, build_on_disk_folder
from retrieval.faiss_compact import Thresholds
from retrieval.faiss_log import ADD, REMOVE, LogDamagedError, Record
from retrieval.faiss_search import FaissReads
from retrieval.faiss_store import (
    COMPACTING,
    FORMAT,
    INDEX_FILE,
    MANIFEST,
    UPLOADS,
    check_artifact,
    commit_base,
    compaction_lock,
    damaged,
    folder_bytes,
    manifest_stat,
    now,
    open_catalog,
    read_base,
    read_manifest,
    recover,
    remove_if_exists,
    write_lock,
)
from retrieval.faiss_vectors import Selection, Vectors, max_faiss_id, supports_remove
from retrieval.tuning import apply_params, choose_factory, faiss_message, use_gpu

log = logging.getLogger(__name__)

LOADS = 5  # a load that races a writer's commit is retried this many times


# ----------------------------------------------------------------------------------------------- the index


class FaissIndex(FaissReads, Index):
    """A committed generation of a FAISS folder: its base and log in memory, its catalogue and its manifest.

    Searching never blocks on writers (another process may ``add`` meanwhile; ``reload`` picks it up). Writes
    take ``INDEX/.lock``, so two writers never interleave. ``compaction`` (thresholds) and
    ``compact_in_background`` (``Index``'s) say when and where the log is folded.
    """

    engine = "faiss"

    def __init__(self, path: Path, manifest: dict[str, Any], base: faiss.Index, catalog: Catalog, *,
                 records: Iterable[tuple[Record, tuple[str, int]]] = (), mmap: bool = False, gpu: bool | None = None):
        super().__init__()
        self.path = path
        self.catalog = catalog
        self.mmap = mmap
        self.compaction = Thresholds()
        self._gpu_wanted = gpu
        self._selections: OrderedDict[tuple, Selection] = OrderedDict()
        self._background: dict[str, threading.Thread] = {}
        self._adopt(manifest, base, records)

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
    def index(self) -> faiss.Index:
        """The base: index.faiss as this handle read it (the log's vectors are beside it, in ``store``)."""
        return self.store.base

    @property
    def ntotal(self) -> int:
        """Vectors this handle holds: live items and tombstones, base and log."""
        return self.store.ntotal

    @property
    def on_disk(self) -> bool:
        return bool(self.manifest.get("ivfdata"))

    @property
    def removable(self) -> bool:
        """Whether a compaction drops removed vectors (else they stay tombstones until a rebuild)."""
        return supports_remove(self.store.base)

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

        ``mmap`` maps the base instead of reading it (read-only: for serving big indexes; on-disk IVF lists are
        always mapped). ``gpu``: None moves search to the GPUs when faiss-gpu sees any, True requires it, False
        keeps it on the CPU. Raises IndexDamagedError when the parts disagree.
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
        for attempt in range(LOADS):
            try:
                return cls._load_once(path, artifact_sha256, mmap, gpu)
            except IndexDamagedError as e:
                # A writer that commits while we read purges rows of the generation we started from: the parts
                # then disagree for us alone. Only a disagreement at an unchanged generation is damage.
                seen = getattr(e, "generation", None)
                if attempt == LOADS - 1 or seen is None or not (path / MANIFEST).exists() \
                        or read_manifest(path)["generation"] == seen:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, path: Path, artifact_sha256: str | None, mmap: bool, gpu: bool | None) -> FaissIndex:
        manifest, base, records = read_committed(path, artifact_sha256, mmap)
        catalog = open_catalog(path)
        try:
            idx = cls(path, manifest, base, catalog, records=records, mmap=mmap, gpu=gpu)
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

    def close(self) -> None:
        self.settle()  # a compaction or base load running on this handle's catalogue finishes first
        self.catalog.close()

    # ------------------------------------------------------------------ state: a base, the log applied

    def _adopt(self, manifest: dict[str, Any], base: faiss.Index,
               records: Iterable[tuple[Record, tuple[str, int]]]) -> None:
        """Take ``base`` (index.faiss as of the manifest's base generation) with the committed log applied."""
        apply_params(base, manifest.get("search_params", {}))
        searcher, self.device = self._gpu_copy(base, manifest)
        # room for the in-place adds until the second compaction from now (a newer base is read by then)
        headroom = min(2 * self._threshold(base.ntotal), max(1024, base.ntotal // 20))
        self.store = Vectors(base, searcher, grow=not self.mmap, headroom=headroom)
        self.store.remove(self.catalog.tombstones(manifest["generation"], manifest["compacted"]))
        self.base_generation = int(manifest["base_generation"])
        self._log_pos: tuple[str, int] | None = None
        self._apply(records, since=self.base_generation)
        st = os.stat(self.catalog.path)
        self.catalog_identity = (st.st_dev, st.st_ino)
        self._set_manifest(manifest)

    def _take(self, other: FaissIndex) -> None:
        """Become ``other`` (a fresh load of the same folder), closing what this handle had open."""
        old = self.catalog
        self.catalog, self.store, self.device = other.catalog, other.store, other.device
        self.base_generation, self._log_pos = other.base_generation, other._log_pos
        self.catalog_identity = other.catalog_identity
        self._set_manifest(other.manifest)
        if old is not self.catalog:
            old.close()

    def _apply(self, records: Iterable[tuple[Record, tuple[str, int]]], since: int) -> None:
        """Apply the log records of generations after ``since`` (the ones before are in the state already)."""
        for record, pos in records:
            if record.generation > since:
                if record.kind == ADD:
                    self.store.add(record.ids, record.vectors)
                else:
                    self.store.remove(record.ids)
            self._log_pos = pos

    def _set_manifest(self, manifest: dict[str, Any], stat: tuple[int, int, int, int] | None = None) -> None:
        """``stat``: of the manifest file as it was before ``manifest`` was read from it (None: unknown, so the
        next reload reads the file once); taken after, it could be a newer commit's, which would go unseen."""
        self.manifest = manifest
        self._stat = stat
        self._selections.clear()

    def _gpu_copy(self, base: faiss.Index, manifest: dict[str, Any]) -> tuple[faiss.Index | None, str]:
        if self.mmap or manifest.get("ivfdata") or not use_gpu(self._gpu_wanted) or not base.ntotal:
            return None, "cpu"
        try:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = faiss.get_num_gpus() > 1
            searcher = faiss.index_cpu_to_all_gpus(base, co)
            apply_params(searcher, {k: v for k, v in manifest.get("search_params", {}).items() if k == "nprobe"},
                         gpu=True)
            return searcher, f"gpu x{faiss.get_num_gpus()}"
        except RuntimeError as e:  # e.g. HNSW has no GPU version in this faiss build
            if self._gpu_wanted:
                raise UsageError(f"cannot move {manifest['factory']} to the GPU: {faiss_message(e)}") from e
            log.info("searching %s on the CPU: %s", manifest["factory"], faiss_message(e))
            return None, "cpu"

    # ------------------------------------------------------------------ other processes' writes

    def reload(self) -> bool:
        """Pick up the generations another process committed; True when something changed.

        Costs a ``stat`` of the manifest and one of the catalogue when nothing did (every commit replaces the
        manifest), so a server calls it before every read: a read that starts after a write's commit sees that
        write, reading only the log records it has not seen, and a catalogue deleted or replaced under a
        running server is noticed by the next read.
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
            self._catch_up(manifest, stat)
            return True

    def _catch_up(self, manifest: dict[str, Any], stat: tuple[int, int, int, int] | None = None) -> None:
        """Come to ``manifest``'s generation: apply the log records not seen yet, or load anew when this handle
        lags behind a compaction (or the folder was rebuilt, repaired or replaced)."""
        same_folder = self._catalog_same() and manifest["artifact_sha256"] == self.artifact_sha256 \
            and manifest["dim"] == self.dim
        if same_folder and self.generation < manifest["generation"] and manifest["base_generation"] <= self.generation:
            try:
                records = list(faiss_log.read(self.path, faiss_log.ranges(manifest), self.dim, after=self._log_pos))
            except LogDamagedError as e:
                if read_manifest(self.path)["generation"] == manifest["generation"]:
                    raise damaged(self.path, str(e)) from e
                records = None  # a compaction committed and deleted a segment meanwhile: load anew
            if records is not None:
                self._apply(records, since=self.generation)
                self._set_manifest(manifest, stat)
                self._check_counts()
                if self.base_generation < manifest["base_generation"] and self._delta_outgrown():
                    self._in_background("base", self._load_newer_base)
                return
        self._take(FaissIndex.load(self.path, mmap=self.mmap, gpu=self._gpu_wanted))

    def _threshold(self, ntotal: int) -> int:
        """Changes in a compaction's worth of log, for a base of ``ntotal`` vectors."""
        return int(max(self.compaction.minimum, self.compaction.fraction * ntotal))

    def _delta_outgrown(self) -> bool:
        """Whether this handle applied a compaction's worth of log since its base (a newer one is on disk)."""
        return self.store.logged >= self._threshold(self.store.base_ntotal)

    def _load_newer_base(self) -> None:
        fresh = FaissIndex.load(self.path, mmap=self.mmap, gpu=self._gpu_wanted)
        with self.lock:
            if fresh.generation >= self.generation:
                self._take(fresh)
                return
        fresh.close()

    def _in_background(self, what: str, work: Any) -> None:
        """Run ``work`` on a thread of its own unless one for ``what`` is running; failures are logged."""
        running = self._background.get(what)
        if running is not None and running.is_alive():
            return

        def run() -> None:
            try:
                work()
            except Exception:  # noqa: BLE001 - a background fold or load must not kill the server; said in the log
                log.exception("%s: background %s failed", self.path, what)

        thread = threading.Thread(target=run, name=f"mae-index-{what}", daemon=True)
        self._background[what] = thread
        thread.start()

    def settle(self, timeout: float | None = None) -> None:
        """Wait for this handle's background work (a compaction, a newer base loading) to finish."""
        for thread in list(self._background.values()):
            thread.join(timeout)

    # ------------------------------------------------------------------ the parts agree

    def _catalog_same(self) -> bool:
        """Whether items.sqlite is still the file this index opened (not deleted, not replaced)."""
        try:
            st = os.stat(self.path / CATALOG_FILE)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.catalog_identity

    def _verify(self) -> None:
        """Refuse an index whose parts disagree (see the module docstring): on every load."""
        path, m = self.path, self.manifest
        if not self._catalog_same():
            raise damaged(path, f"{path / CATALOG_FILE} was deleted or replaced while the index was open")
        live = self.catalog.count(self.generation)
        if live != self.count:
            raise damaged(path, f"{path / CATALOG_FILE} lists {live} live items but {path / MANIFEST} counts "
                                f"{self.count} (generation {self.generation})")
        if self.store.base_ntotal != m["base_ntotal"]:
            raise damaged(path, f"{path / INDEX_FILE} holds {self.store.base_ntotal} vectors but {path / MANIFEST} "
                                f"says {m['base_ntotal']}")
        held, dead = self.store.ntotal, len(self.store.dead)
        if held != self.count + dead:
            raise damaged(path, f"{path / INDEX_FILE} and its log hold {held} vectors but the catalogue has "
                                f"{self.count} live items" + (f" and {dead} tombstones" if dead else ""))
        self._check_counts()
        if held:
            top = max(int(max_faiss_id(self.store.base)), int(self.store.delta_ids.max(initial=-1)))
            if top >= self.catalog.next_id():
                raise damaged(path, f"{path / INDEX_FILE} holds id {top} but {path / CATALOG_FILE} would give "
                                    f"that id to the next item it adds")

    def _check_counts(self) -> None:
        """The vectors and tombstones this handle applied add up to what the manifest commits (O(1): every
        reload and write). A handle whose base is older than the folder's holds more: not comparable."""
        m = self.manifest
        if self.base_generation != m["base_generation"]:
            return
        if self.store.ntotal != m["ntotal"] or len(self.store.dead) != m["tombstones"]:
            raise damaged(self.path, f"{self.path / INDEX_FILE} and its log hold {self.store.ntotal} vectors and "
                                     f"{len(self.store.dead)} tombstones but {self.path / MANIFEST} says {m['ntotal']} "
                                     f"and {m['tombstones']} (generation {self.generation})")

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
            ids = np.asarray(self.catalog.insert([items[j] for j in keep], gen), np.int64)
            x = np.ascontiguousarray(x[keep])
            faiss.normalize_L2(x)
            self._commit(gen, Record(ADD, gen, ids, x), images=self._with_roots(roots))
            result.ids = ids.tolist()
        self._compact_if_due()
        return result

    def delete(self, ids_asked: Sequence[int], paths_asked: Mapping[str, Sequence[str]]) -> RemoveResult:
        """Removed vectors are tombstones in the log, filtered at search, until a compaction drops them (HNSW
        and on-disk lists keep them: a compaction rebuilds HNSW once they pass REBUILD_FRACTION)."""
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
            self._commit(gen, Record(REMOVE, gen, np.asarray(ids, np.int64)))
            result.ids = ids
            result.paths = [rows[i].path for i in ids]
        report = self._compact_if_due()
        result.rebuilt = bool(report and report.get("rebuilt"))
        return result

    def annotate(self, metadata: Mapping[str, tuple[Any, Mapping[str, str] | None]]) -> int:
        """A metadata-only write: catalogue rows change, the log and the base do not."""
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
            self._commit(self.generation + 1, None)
            return len(updates)

    def _with_roots(self, roots: Sequence[str | Path]) -> list[str]:
        """The indexed folders with ``roots`` recorded too (those not under one already)."""
        known = [Path(r) for r in self.manifest.get("images") or []]
        new = [r for r in dict.fromkeys(str(Path(r).expanduser().resolve()) for r in roots)
               if not any(Path(r) == k or k in Path(r).parents for k in known)]
        return [*map(str, known), *new]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The write lock, this handle at the committed generation, and what an interrupted write left undone."""
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
                if manifest["generation"] != self.generation:  # another process wrote: apply what it did
                    self._catch_up(manifest)
                recover(self.path, self.manifest, self.catalog)
                self._check_counts()
            except CatalogError as e:
                raise damaged(self.path, str(e)) from e
            try:
                yield
            except BaseException:
                # the half-done write is undone: disk still holds the last committed generation
                manifest = read_manifest(self.path)
                recover(self.path, manifest, self.catalog)
                if manifest["generation"] != self.generation:
                    self._catch_up(manifest)
                raise

    def _commit(self, gen: int, record: Record | None, **changes: Any) -> None:
        """Phase 2 of a write whose catalogue rows (tagged ``gen``) are stored: append ``record`` to the log,
        then replace the manifest (the commit point); then apply the record here as a reader would."""
        m = dict(self.manifest, generation=gen, format=FORMAT, updated=now(), **changes)
        if record is not None:
            rs = faiss_log.append(self.path, faiss_log.ranges(m), faiss_log.encode(
                record.kind, gen, record.ids, record.vectors), gen)
            added = len(record.ids) if record.kind == ADD else 0
            removed = len(record.ids) - added
            m.update(log=faiss_log.as_manifest(rs), count=m["count"] + added - removed, ntotal=m["ntotal"] + added,
                     log_vectors=m["log_vectors"] + added, log_removed=m["log_removed"] + removed,
                     tombstones=m["tombstones"] + removed)
        write_json_atomic(self.path / MANIFEST, m)  # the commit point (fsync, rename, fsync of the folder)
        stat = manifest_stat(self.path)  # nobody else commits while this handle holds the write lock
        if record is not None:
            last = faiss_log.ranges(m)[-1]
            self._apply([(record, (last.file, last.end))], since=self.generation)
        self._set_manifest(m, stat)

    # ------------------------------------------------------------------ compaction

    def compaction_due(self) -> str | None:
        """Why the log should be folded now (None: it need not); see ``retrieval.faiss_compact``."""
        return faiss_compact.due(self.manifest, self.compaction, self.removable)

    def _compact_if_due(self) -> dict[str, Any] | None:
        if self.compaction_due() is None:
            return None
        if self.compact_in_background:
            self._in_background("compaction", lambda: self.compact(force=False))
            return None
        return self.compact(force=False)

    def compact(self, *, force: bool = True) -> dict[str, Any]:
        """Fold the log into a new index.faiss (see the module docstring); ``force`` False: only when due.

        Holds the write lock only to take the committed state and to commit; the fold in between (seconds for
        a million vectors) holds the compaction lock alone. A compaction another process runs is not waited
        for: the answer says so.
        """
        if self.mmap:
            raise RuntimeError(f"{self.path} was opened memory-mapped (read-only); load it with mmap=False to "
                               "compact it")
        started = time.perf_counter()
        report: dict[str, Any] = {"index": self.name, "compacted": False, "rebuilt": False}
        with compaction_lock(self.path) as mine:
            if not mine:
                return dict(report, reason="another process is compacting this index")
            with self._writing():
                why = self.compaction_due()
                if not force and why is None:
                    return dict(report, reason="the log is under the compaction thresholds")
                if not faiss_compact.worth_folding(self.manifest, self.removable):
                    return dict(report, reason="nothing to fold: the log is empty")
                plan = dict(self.manifest)
            try:
                folded, was_rebuilt, timings = faiss_compact.fold_to_disk(self.path, plan, self.catalog,
                                                                          self._gpu_wanted)
                with self._writing():
                    manifest = faiss_compact.after_fold(plan, self.manifest, folded, was_rebuilt, self.catalog)
                    old_lists = self.manifest.get("ivfdata")
                    manifest = commit_base(self.path, manifest, self.catalog, self.path / COMPACTING)
                    if old_lists and old_lists != manifest.get("ivfdata"):
                        remove_if_exists(self.path / old_lists)
                    records = list(faiss_log.read(self.path, faiss_log.ranges(manifest), self.dim))
                    self._adopt(manifest, folded, records)
            finally:
                remove_if_exists(self.path / COMPACTING)
        return dict(report, compacted=True, rebuilt=was_rebuilt, reason=why or "asked", generation=self.generation,
                    folded_vectors=plan["log_vectors"], folded_removals=plan["log_removed"],
                    vectors=int(folded.ntotal), seconds=round(time.perf_counter() - started, 3), **timings)

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        m = self.manifest
        try:
            suggestion = choose_factory(self.count, self.dim, on_disk=self.on_disk).factory
        except ValueError as e:
            suggestion = str(e)
        log_ranges = faiss_log.ranges(m)
        return {
            "index": str(self.path), "engine": self.engine, "count": self.count, "dim": self.dim,
            "metric": m["metric"], "factory": m["factory"], "factory_reason": m.get("factory_reason"),
            "generation": self.generation, "ntotal": self.store.ntotal, "tombstones": len(self.store.dead),
            "removable": self.removable, "on_disk": self.on_disk, "device": self.device,
            "search_params": m.get("search_params", {}),
            "tuning": {k: v for k, v in m.get("tuning", {}).items() if k != "curve"},
            "artifact_sha256": m["artifact_sha256"], "artifact": m.get("artifact"), "labels": self.labels(),
            "tags": self.tag_keys(), "build": m.get("build", {}), "created": m.get("created"),
            "updated": m.get("updated"), "bytes": folder_bytes(self.path), "auto_factory_now": suggestion,
            "roots": [str(r) for r in self.roots],
            "log": {"base_generation": m["base_generation"], "vectors": m["log_vectors"], "removed": m["log_removed"],
                    "bytes": faiss_log.committed_bytes(log_ranges), "segments": len({r.file for r in log_ranges}),
                    "compaction_due": self.compaction_due(), "thresholds": dataclasses.asdict(self.compaction)},
        }


# ----------------------------------------------------------------------------------------------- module functions


def read_committed(path: Path, artifact_sha256: str | None, mmap: bool
                   ) -> tuple[dict[str, Any], faiss.Index, list[tuple[Record, tuple[str, int]]]]:
    """The committed manifest, its base and its log records, read so that all three are of one generation (a
    writer that commits meanwhile makes it read again)."""
    for attempt in range(LOADS):
        manifest = read_manifest(path)
        check_artifact(path, manifest, artifact_sha256)
        base, records, problem = None, [], None
        try:
            base = read_base(path, manifest, mmap)
            records = list(faiss_log.read(path, faiss_log.ranges(manifest), manifest["dim"]))
        except FileNotFoundError:
            pass  # a writer's rename, or a missing file: told apart below
        except LogDamagedError as e:
            problem = e
        if read_manifest(path)["generation"] == manifest["generation"]:
            if base is None:  # not a writer's rename: the committed generation has no index file
                raise damaged(path, f"{path / INDEX_FILE} is missing")
            if problem is not None:
                raise damaged(path, str(problem))
            return manifest, base, records
        time.sleep(0.05 * (attempt + 1))  # a writer committed meanwhile: read the new generation
    raise RuntimeError(f"{path}: the index changed under every read; is a writer looping?")


def build(out: str | Path, vectors: np.ndarray, items: Sequence[Item], *, gpu: bool | None = None,
          **options: Any) -> FaissIndex:
    """Build a FAISS folder in memory (``faiss_build.build_folder``) and open it."""
    return FaissIndex.load(build_folder(out, vectors, items, gpu=gpu, **options), gpu=gpu)


def build_on_disk(*args: Any, **kwargs: Any) -> FaissIndex:
    """Merge shard files into on-disk lists (``faiss_build.build_on_disk_folder``) and open the folder."""
    return FaissIndex.load(build_on_disk_folder(*args, **kwargs))
