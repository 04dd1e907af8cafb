"""``mae index check [--repair]``: say which parts of an index disagree, and rebuild what the survivors allow.

An index is three parts that must describe the same items: ``manifest.json`` (the committed generation and
its counts), ``index.faiss`` with its append log (the vectors, by id) and ``items.sqlite`` (what each id stands
for). Loading
refuses an index whose parts disagree (``retrieval.index``); this module is the way out.

``check`` reads each part on its own, so that one damaged part does not hide the state of the others, then
compares them: live counts, vector counts, and the id sets themselves (every live item has a vector, every
vector an item or a tombstone, no vector at or past the catalogue's next id).

``repair`` keeps everything two parts still agree on, under the write lock, and commits it as a new
generation whose index.faiss holds every vector (the log folded in, up to any damage in it); what cannot be
kept is listed, never silently lost:

- catalogue missing or damaged: the rows SQLite can still read are kept; vectors left without a row are
  dropped (removed, or tombstoned where the index cannot remove), and the ids of all of them stay reserved,
  so no new item can take an id an old vector holds. The damaged file is kept as ``items.sqlite.damaged``.
- ``index.faiss`` missing or damaged: the vectors are made again from the catalogue's files with the artifact
  that built the index (its sha256 must match); items whose file is gone or changed are dropped.
- manifest missing or damaged: rewritten from the index and the catalogue (``--artifact`` gives the sha256
  when nothing else records it).

Re-adding what was dropped is ``mae index add --index INDEX FOLDER``: files already indexed are skipped by
their sha256.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mae.errors import UsageError
from mae.files import fsync_dir, sha256_file
from retrieval import faiss_log
from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, CatalogError, Item, Row
from retrieval.engine import IndexDamagedError
from retrieval.faiss_store import (
    FORMAT,
    INDEX_FILE,
    MANIFEST,
    METRIC,
    check_artifact,
    commit_base,
    now,
    read_base,
    read_manifest,
    rewritten,
    write_index,
    write_lock,
)
from retrieval.faiss_vectors import faiss_ids, fold, rebuilt, supports_remove
from retrieval.tuning import apply_params, faiss_message, find_sub_index, make_index, train, train_size

DAMAGED = ".damaged"


@dataclass
class Parts:
    """What each part of an index holds, read independently; ``errors`` names the parts that failed."""

    manifest: dict[str, Any] | None = None
    raw_manifest: dict[str, Any] | None = None  # a JSON object that failed validation: its usable fields
    index: Any = None  # the base (index.faiss)
    adds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # the log's (ids, vectors), in order
    rows: list[Row] | None = None
    rows_complete: bool = True
    errors: dict[str, str] = field(default_factory=dict)

    def ids(self) -> np.ndarray:
        """Every id the base and the log hold."""
        return np.concatenate([faiss_ids(self.index), *(a[0] for a in self.adds)])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + sum(len(a[0]) for a in self.adds)


def read_parts(path: Path) -> Parts:
    parts = Parts()
    try:
        parts.manifest = read_manifest(path)
    except (IndexDamagedError, RuntimeError) as e:
        parts.errors["manifest"] = _first(e)
        try:
            raw = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
            parts.raw_manifest = raw if isinstance(raw, dict) else None
        except (OSError, ValueError):
            pass
    try:
        parts.index = _read_index(path, parts.manifest)
    except (IndexDamagedError, RuntimeError, FileNotFoundError) as e:
        parts.errors["index"] = _first(e)
    if parts.manifest is not None:
        try:  # the records before any damage are kept
            for record, _ in faiss_log.read(path, faiss_log.ranges(parts.manifest), parts.manifest["dim"]):
                if record.kind == faiss_log.ADD:
                    parts.adds.append((record.ids, record.vectors))
        except faiss_log.LogDamagedError as e:
            parts.errors["log"] = str(e)
    file = path / CATALOG_FILE
    try:
        catalog = Catalog(file, read_only=True)
    except CatalogError as e:
        parts.errors["catalogue"] = str(e)
        catalog = None
    if catalog is not None:
        try:
            problem = catalog.integrity()
            if problem != "ok":
                parts.errors["catalogue"] = f"{file} fails SQLite's integrity check: {problem}"
            parts.rows = catalog.rows()
        except CatalogError as e:
            parts.errors["catalogue"] = str(e)
            known = parts.ids() if parts.index is not None else None
            parts.rows, parts.rows_complete = _salvage(catalog, known), False
        finally:
            catalog.close()
    return parts


def _read_index(path: Path, manifest: dict[str, Any] | None) -> Any:
    if manifest is not None:
        return read_base(path, manifest, False)
    file = path / INDEX_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing")
    try:
        return faiss.read_index(str(file))
    except RuntimeError as e:
        raise RuntimeError(f"{file} is not a readable FAISS index ({faiss_message(e)})") from e


def _salvage(catalog: Catalog, ids: np.ndarray | None) -> list[Row]:
    """The rows SQLite can still read from a damaged catalogue.

    With the index's ids at hand each is looked up on its own, so that a bad page costs only the rows on it;
    otherwise rows are read in id order up to the first bad page.
    """
    rows: list[Row] = []
    query = f"SELECT {catalog.columns} FROM items"
    if ids is None:
        try:
            for r in catalog.conn.execute(query + " ORDER BY id"):
                rows.append(_salvaged(r))
        except Exception:  # noqa: BLE001 - whatever SQLite says about the rest, what was read is kept
            pass
        return rows
    for i in np.unique(ids).tolist():
        try:
            r = catalog.conn.execute(query + " WHERE id = ?", (i,)).fetchone()
        except Exception:  # noqa: BLE001 - this row sits on a damaged page: the others may not
            continue
        if r is not None:
            rows.append(_salvaged(r))
    return rows


def _salvaged(r: tuple) -> Row:
    try:
        tags = json.loads(r[7]) if r[7] else None
    except ValueError:
        tags = None
    return Row(*r[:7], tags if isinstance(tags, dict) else None)


def _first(e: BaseException) -> str:
    return str(e).split("; run `mae index check")[0]


# ----------------------------------------------------------------------------------------------- check


def check(path: str | Path) -> dict[str, Any]:
    """Every disagreement between the parts of ``path``; ``ok`` when there is none."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no index folder at {path}")
    parts = read_parts(path)
    problems = list(parts.errors.values())
    m = parts.manifest
    report: dict[str, Any] = {"index": str(path), "manifest": m is not None, "index_file": parts.index is not None,
                              "catalogue": "catalogue" not in parts.errors}
    if m is not None and parts.rows is not None:
        gen = m["generation"]
        live = _live(parts.rows, gen)
        report.update(generation=gen, count=len(live))
        if len(live) != m["count"]:
            problems.append(f"{path / CATALOG_FILE} lists {len(live)} live items but {path / MANIFEST} counts "
                            f"{m['count']}")
    if parts.index is not None:
        ids = parts.ids()
        report["vectors"] = parts.ntotal
        if m is not None and parts.index.ntotal != m["base_ntotal"]:
            problems.append(f"{path / INDEX_FILE} holds {parts.index.ntotal} vectors but {path / MANIFEST} says "
                            f"{m['base_ntotal']}")
        elif m is not None and "log" not in parts.errors and parts.ntotal != m["ntotal"]:
            problems.append(f"{path / INDEX_FILE} and its log hold {parts.ntotal} vectors but {path / MANIFEST} "
                            f"says {m['ntotal']}")
        if parts.rows is not None:
            gen = m["generation"] if m is not None else max((r.generation for r in parts.rows), default=0)
            live_ids = {r.id for r in _live(parts.rows, gen)}
            dead_ids = {r.id for r in parts.rows if r.removed is not None and r.removed <= gen}
            in_index = set(ids.tolist())
            lost = sorted(live_ids - in_index)
            orphans = sorted(in_index - live_ids - dead_ids)
            if lost:
                problems.append(f"{len(lost)} live item(s) have no vector in {path / INDEX_FILE} "
                                f"(ids {_few(lost)})")
            if orphans:
                problems.append(f"{len(orphans)} vector(s) in {path / INDEX_FILE} have no catalogue row "
                                f"(ids {_few(orphans)})")
            next_id = max((r.id for r in parts.rows), default=0) + 1
            if len(ids) and int(ids.max()) >= next_id and "catalogue" not in parts.errors:
                seq = _sequence(path)
                if seq is not None and int(ids.max()) > seq:
                    problems.append(f"{path / CATALOG_FILE} would give id {seq + 1} to a new item, but "
                                    f"{path / INDEX_FILE} holds ids up to {int(ids.max())}")
    report["problems"] = problems
    report["ok"] = not problems
    lines = [f"{path}: " + ("consistent" if not problems else f"{len(problems)} problem(s)")]
    if "count" in report:
        lines.append(f"  {report['count']} live items at generation {report['generation']}"
                     + (f", {report['vectors']} vectors" if "vectors" in report else ""))
    lines += [f"  - {p}" for p in problems]
    if problems:
        lines.append(f"  repair: mae index check --index {path} --repair   (keeps what the surviving parts agree "
                     "on and lists what it drops)")
    report["text"] = "\n".join(lines)
    return report


def _sequence(path: Path) -> int | None:
    try:
        catalog = Catalog(path / CATALOG_FILE, read_only=True)
    except CatalogError:
        return None
    try:
        return catalog.next_id() - 1
    except CatalogError:
        return None
    finally:
        catalog.close()


def _live(rows: list[Row], gen: int) -> list[Row]:
    return [r for r in rows if r.generation <= gen and (r.removed is None or r.removed > gen)]


def _few(ids: list[int], n: int = 8) -> str:
    return ", ".join(map(str, ids[:n])) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


# ----------------------------------------------------------------------------------------------- repair


def repair(path: str | Path, artifact: str | Path | None = None, *, batch_size: int = 64, workers: int = 0,
           progress: bool = False) -> dict[str, Any]:
    """Bring the parts of ``path`` back into agreement (see the module docstring); returns what was done."""
    path = Path(path).resolve()
    before = check(path)
    if before["ok"]:
        before["repaired"] = False
        before["text"] += "\n  nothing to repair"
        return before
    with write_lock(path):
        parts = read_parts(path)
        actions: list[str] = []
        dropped: list[dict[str, Any]] = []
        manifest = _manifest_for(path, parts, artifact, actions)
        embed = {"batch_size": batch_size, "workers": workers, "progress": progress}
        index, rows = _surviving(path, parts, manifest, artifact, embed, dropped, actions)
        new_gen = _commit_repair(path, parts, manifest, index, rows, dropped, actions)
    after = check(path)
    lines = [f"{path}: repaired, generation {new_gen}, {after.get('count', 0)} live items"]
    lines += [f"  {a}" for a in actions]
    if dropped:
        lines.append(f"  dropped {len(dropped)}:")
        lines += [f"    id {d['id']}: {d['path'] or '(no path)'} ({d['why']})" for d in dropped[:20]]
        if len(dropped) > 20:
            lines.append(f"    ... and {len(dropped) - 20} more (see --json)")
        roots = manifest.get("images") or []
        if roots:
            lines.append("  to index them again: mae index add --index " + str(path) + " " + " ".join(roots))
    lines += [f"  still wrong: {p}" for p in after["problems"]]
    return {"index": str(path), "repaired": True, "ok": after["ok"], "before": before["problems"],
            "actions": actions, "dropped": dropped, "count": after.get("count"), "generation": new_gen,
            "problems": after["problems"], "text": "\n".join(lines)}


def _surviving(path: Path, parts: Parts, manifest: dict[str, Any], artifact: str | Path | None,
               embed: dict[str, Any], dropped: list[dict[str, Any]], actions: list[str]) -> tuple[Any, list[Row]]:
    """One index holding every surviving vector (the base with the log folded in, or the files embedded again)
    and the catalogue rows that go with it; live items without a vector are dropped."""
    gen = manifest["generation"]
    rows = parts.rows
    if rows is None:
        rows = []
        actions.append(f"{CATALOG_FILE} was unreadable: no item descriptions survive")
    elif not parts.rows_complete or "catalogue" in parts.errors:
        actions.append(f"salvaged {len(rows)} row(s) from the damaged {CATALOG_FILE}")
    if "log" in parts.errors:
        actions.append(f"read the append log up to its damage ({sum(len(a[0]) for a in parts.adds)} vector(s))")
    live = _live(rows, gen)
    index = parts.index
    if index is None:
        index, live = _reembed(path, manifest, live, artifact, embed, dropped, actions)
        live_ids = {r.id for r in live}
        rows = [r for r in rows if r.id in live_ids or (r.removed is not None and r.removed <= gen)]
        manifest.update(ivfdata=None, tombstones=0, compacted=gen)
    elif parts.adds:
        lists = path / f"lists.{gen + 1}.ivfdata" if manifest.get("ivfdata") else None
        index = fold(index, parts.adds, np.zeros(0, np.int64), False, lists)
        if lists is not None:
            manifest["ivfdata"] = lists.name
    in_index = set(faiss_ids(index).tolist())
    for r in live:
        if r.id not in in_index:
            dropped.append({"id": r.id, "path": r.path, "why": "its vector is not in the index"})
    # Removed rows whose vectors already left the index are forgotten; the others stay tombstones.
    rows = [r for r in rows if r.id in in_index]
    return index, rows


def _commit_repair(path: Path, parts: Parts, manifest: dict[str, Any], index: Any, rows: list[Row],
                   dropped: list[dict[str, Any]], actions: list[str]) -> int:
    """Commit ``index`` and ``rows`` as the next generation, with an empty log: vectors no row describes are
    removed (or tombstoned under rows of their own, or rebuilt away, where the index cannot remove)."""
    new_gen = manifest["generation"] + 1
    ids = faiss_ids(index)
    orphans = np.asarray(sorted(set(ids.tolist()) - {r.id for r in rows}), np.int64)
    if len(orphans):
        dropped += [{"id": int(i), "path": None, "why": "a vector with no catalogue row"} for i in orphans]
    catalog = _fresh_catalog(path, rows, parts, actions)
    catalog.reserve_ids(int(ids.max()) if len(ids) else 0)
    removable = supports_remove(index)
    if removable:
        dead = np.asarray([r.id for r in rows if r.removed is not None], np.int64)
        if len(orphans) or len(dead):
            index.remove_ids(faiss.IDSelectorBatch(np.concatenate([orphans, dead])))
        if len(orphans):
            actions.append(f"removed {len(orphans)} vector(s) that no catalogue row describes")
    elif len(orphans):
        catalog.insert([Item(f"<lost vector {i}>", f"lost-{i}") for i in orphans.tolist()], new_gen,
                       ids=orphans.tolist())
        catalog.mark_removed(orphans.tolist(), new_gen)
        if manifest.get("ivfdata"):
            actions.append(f"tombstoned {len(orphans)} vector(s) that no catalogue row describes "
                           "(on-disk lists cannot remove vectors)")
        else:
            index = rebuilt(index, manifest["factory"], catalog.live_ids(new_gen), manifest.get("search_params", {}))
            manifest["compacted"] = new_gen
            actions.append(f"rebuilt the {manifest['factory']} index without {len(orphans)} vector(s) that no "
                           "catalogue row describes")
    staged = path / f"index.{new_gen}.faiss"
    write_index(index, staged)
    commit_base(path, rewritten(manifest, catalog, new_gen, index, removable), catalog, staged)
    catalog.close()
    return new_gen


def _manifest_for(path: Path, parts: Parts, artifact: str | Path | None, actions: list[str]) -> dict[str, Any]:
    """The committed manifest, or one rebuilt from what survives (old fields, the index, the artifact)."""
    if parts.manifest is not None:
        return dict(parts.manifest)
    raw = dict(parts.raw_manifest or {})
    sha = None
    if artifact is not None:
        from mae.artifact_config import ArtifactConfig

        sha = ArtifactConfig.read(artifact).sha256
        raw["artifact"] = str(Path(artifact).resolve())
    elif isinstance(raw.get("artifact_sha256"), str) and raw["artifact_sha256"]:
        sha = raw["artifact_sha256"]
    if sha is None:
        raise UsageError(f"{path / MANIFEST} is unreadable and records no artifact: pass --artifact (the one "
                         "that built the index) to rebuild it")
    index = parts.index
    dim = int(index.d) if index is not None else _artifact_dim(artifact or raw.get("artifact"))
    rows = parts.rows or []
    gen = max([r.generation for r in rows] + [r.removed or 0 for r in rows] + [1])
    factory = raw.get("factory") if isinstance(raw.get("factory"), str) else _describe(index)
    params: dict[str, Any] = {}
    if index is not None:
        ivf = faiss.try_extract_index_ivf(index)
        hnsw = find_sub_index(index, faiss.IndexHNSW)
        if ivf is not None:
            params["nprobe"] = int(ivf.nprobe)
        elif hnsw is not None:
            params["efSearch"] = int(hnsw.hnsw.efSearch)
    manifest = {
        "format": FORMAT, "generation": gen, "artifact_sha256": sha, "dim": dim,
        "metric": METRIC, "normalized": True, "factory": factory, "factory_requested": factory,
        "factory_reason": "recovered by mae index check --repair", "nlist": None, "ivfdata": None,
        "search_params": params, "tuning": {}, "build": {}, "faiss_version": faiss.__version__,
        "created": raw.get("created") if isinstance(raw.get("created"), str) else now(),
        "updated": now(), "count": 0, "ntotal": 0, "tombstones": 0, "compacted": 0,
    }
    for key in ("artifact", "images", "embed_backend"):
        if key in raw:
            manifest[key] = raw[key]
    if not isinstance(manifest.get("images"), list):
        manifest.pop("images", None)
    actions.append(f"rebuilt {MANIFEST} (generation {gen}, factory {factory}, search parameters {params or 'exact'})")
    return manifest


def _artifact_dim(artifact: str | Path | None) -> int:
    if not artifact:
        raise UsageError("neither the index file nor the manifest survives: pass --artifact to start over")
    from mae.artifact_config import ArtifactConfig

    return ArtifactConfig.read(artifact).embed_dim


def _describe(index: Any) -> str:
    """A factory string for an index whose manifest is lost (what ``make_index`` can rebuild it from)."""
    if index is None:
        return "Flat"
    ivf = faiss.try_extract_index_ivf(index)
    hnsw = find_sub_index(index, faiss.IndexHNSW)
    if ivf is not None:
        inner = faiss.downcast_index(ivf)
        codes = f"PQ{inner.pq.M}" if isinstance(inner, faiss.IndexIVFPQ) else "Flat"
        return f"IVF{ivf.nlist},{codes}"
    if hnsw is not None:
        return f"HNSW{hnsw.hnsw.nb_neighbors(1)},Flat"
    return "Flat"


def _fresh_catalog(path: Path, rows: list[Row], parts: Parts, actions: list[str]) -> Catalog:
    """A sound ``items.sqlite`` holding ``rows``: the old file when only its contents were wrong, else a new one
    (the damaged file kept beside it as items.sqlite.damaged)."""
    file = path / CATALOG_FILE
    tmp = path / (CATALOG_FILE + ".repair")
    tmp.unlink(missing_ok=True)
    catalog = Catalog.create(tmp)
    catalog.restore(rows)
    old_seq = _sequence(path) if "catalogue" not in parts.errors else None
    if old_seq:
        catalog.reserve_ids(old_seq)
    catalog.close()
    if file.exists():
        damaged = "catalogue" in parts.errors
        aside = path / (CATALOG_FILE + (DAMAGED if damaged else f".before-repair-{int(time.time())}"))
        os.replace(file, aside)
        actions.append(f"kept the previous {CATALOG_FILE} as {aside.name}")
    os.replace(tmp, file)
    fsync_dir(path)
    return Catalog(file)


def _reembed(path: Path, manifest: dict[str, Any], live: list[Row], artifact: str | Path | None,
             embed: dict[str, Any], dropped: list[dict[str, Any]], actions: list[str]) -> tuple[Any, list[Row]]:
    """A new FAISS index of the same factory from the catalogue's files, embedded with the index's artifact."""
    from export.runtime import Embedder
    from retrieval.embedding import embed_items

    source = artifact or manifest.get("artifact")
    if not source or not Path(source).exists():
        raise UsageError(f"{path / INDEX_FILE} is lost and the artifact that built it is not at hand: pass "
                         f"--artifact to embed the {len(live)} catalogued images again")
    embedder = Embedder.load(source, batch_size=embed["batch_size"])
    check_artifact(path, manifest, embedder.sha256)
    keep, files = [], []
    for r in live:
        p = Path(r.path)
        if not p.is_file():
            dropped.append({"id": r.id, "path": r.path, "why": "its file is gone"})
        elif sha256_file(p) != r.sha256:
            dropped.append({"id": r.id, "path": r.path, "why": "its file changed since it was indexed"})
        else:
            keep.append(r)
            files.append(p)
    emb, items = embed_items(embedder, files, [r.label for r in keep], desc="re-embedding", **embed)
    done = set(emb.positions)
    for j, r in enumerate(keep):
        if j not in done:
            dropped.append({"id": r.id, "path": r.path, "why": "its file no longer decodes"})
    kept = [keep[j] for j in emb.positions]
    factory = manifest["factory"]
    index = make_index(factory, int(manifest["dim"]))
    x = np.ascontiguousarray(emb.vectors, np.float32)
    if len(x):
        faiss.normalize_L2(x)
    if not index.is_trained:
        try:
            train(index, x[: train_size(index, len(x))])
        except (ValueError, RuntimeError):
            index = make_index("Flat", int(manifest["dim"]))
            actions.append(f"too few images left to train {factory}: rebuilt as Flat")
            manifest["factory"] = "Flat"
            manifest["search_params"] = {}
    if len(x):
        index.add_with_ids(x, np.asarray([r.id for r in kept], np.int64))
    apply_params(index, manifest.get("search_params", {}))
    actions.append(f"embedded {len(kept)} catalogued image(s) again with {source} into a new {manifest['factory']} "
                   "index")
    return index, kept
