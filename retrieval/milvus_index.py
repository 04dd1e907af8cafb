"""The Milvus engine: a collection behind the ``Index`` interface, so that servers on several hosts share one index.

Names (``retrieval.engine``)::

    milvus:PATH.db                  embedded milvus-lite, started inside this process (one process per file)
    milvus://HOST:PORT/COLLECTION   a Milvus standalone or cluster server (or a ``milvus-lite server`` process)
    milvus://HOST:PORT/DB/COLLECTION    the same in a database other than the default

A server that needs a token reads it from ``MAE_MILVUS_TOKEN`` ("user:password" or an API key).

**The whole index lives in Milvus**, so any host that reaches the server has all of it and no local file:

- the collection: one row per item, ``id`` (INT64 primary key: the item id), ``vector`` (FLOAT_VECTOR, L2-normalised,
  inner product), ``path``, ``label`` (nullable), ``sha256``, ``added`` (UTC ISO text, as the FAISS catalogue
  stores it), ``tags`` (JSON, as given) and ``tag_filter`` (the same tags keyed for filters:
  ``retrieval.milvus_expr``);
- its properties: the facts FAISS keeps in ``manifest.json`` (``mae.artifact_sha256``, ``mae.dim``,
  ``mae.metric``, ``mae.factory`` and ``mae.index_type``/``mae.index_params``, the tuned ``mae.search_params``,
  the artifact's path, the indexed folders, when it was made);
- the ledger, ``COLLECTION_mae_ledger``, a small second collection: its rows claim blocks of ids and
  generations (each with the writer's token and time).

**Many writers, no lock.** Milvus has no transaction to hand out ids under, so each handle claims a block of
``ID_BLOCK`` ids at a time: it writes a claim row, then reads the claims of that block back with Strong
consistency and keeps the block only if its claim is the only one. Of two claims of one block, whichever was
read second sees the first, so at most one keeps it; when both see both, both move on. Ids are never handed out
twice or reused, stay below 2**53 (a browser's integers), and are not contiguous (each server takes its own
block). Every write then claims the next generation the same way, so each write has its own. The newest
generation is what ``reload`` reads before every request (one small query): when it moved, the count and the
properties are read again, so a server sees another server's add or delete on its next request; reads ask for
Strong consistency for the same reason. Within one process, writes to one collection take a lock (milvus-lite
does not take concurrent writers to one collection; a Milvus server does).

Files already indexed (by sha256) are skipped as on FAISS. Two servers adding the same bytes in the same instant
cannot see each other's insert before their own: after inserting, each looks again and drops its copy when an
older id holds the same bytes; the rare copy that survives both checks is what ``mae index duplicates`` finds.

**Searching.** The index type is chosen as FAISS chooses (``retrieval.milvus_store``: FLAT, HNSW, IVF_FLAT, IVF_PQ;
IVF_PQ only on a server) and ``ef`` / ``nprobe`` are tuned against exact search on held-out items to recall@10 >=
0.95, as on FAISS. Filters run inside Milvus (``retrieval.milvus_expr``). A filtered search widens ``ef`` /
``nprobe`` as FAISS does, and a search that still comes back short of min(k, matching items) is redone exactly over
the matching vectors (or wider), so a filter never makes an answer short.

The schema, the ledger, connections and index types are ``retrieval.milvus_store``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mae.errors import UsageError, UserError
from retrieval.catalog import Condition, Item, Row, check_items
from retrieval.engine import (
    AddResult,
    Index,
    IndexBusyError,
    IndexDamagedError,
    ItemNotFoundError,
    RemoveResult,
    mismatch,
    repair_hint,
    split_duplicates,
)
from retrieval.filters import MAX_ID
from retrieval.milvus_expr import expression, literal, tag_filter
from retrieval.milvus_store import (
    BATCH,
    FORMAT,
    ID_BLOCK,
    METRIC,
    MilvusClient,
    MilvusException,
    Target,
    check_sizes,
    choose_index,
    claim_generation,
    claim_id_blocks,
    close_client,
    connect,
    ensure_loaded,
    entity,
    error_text,
    facts_problems,
    json_or,
    knob_of,
    milvus_errors,
    parse_target,
    unit,
    utc_now,
    write_lock,
)

GENERATIONS_KEPT = 64  # generation claims kept in the ledger (older ones are pruned)
MAX_TOPK = 16384  # Milvus answers at most this many neighbours per query
EXACT_MAX = 20_000  # a filter that selects at most this many items is scored exactly when the index comes back short
# Filtered searches widen ef / nprobe for a kept fraction s as the FAISS engine does (measured there:
# retrieval.faiss_index): ef / s**0.5, nprobe / s**0.2.
HNSW_WIDEN = 0.5
IVF_WIDEN = 0.2
EF_MAX = 2048
SELECTION_CACHE = 16
ROW_FIELDS = ["id", "path", "label", "sha256", "added", "tags"]


# ----------------------------------------------------------------------------------------------- the index


class MilvusIndex(Index):
    """A Milvus collection as an index: every read and write goes to the server (nothing is cached but the facts,
    the count and the generation, which ``reload`` refreshes)."""

    engine = "milvus"

    def __init__(self, target: Target, client: MilvusClient, properties: Mapping[str, str], dim: int,
                 index_type: str) -> None:
        super().__init__()
        self.target = target
        self.client = client
        self._dim = dim
        self._index_type = index_type
        self._props: dict[str, str] = dict(properties)
        self._generation = 0
        self._token = ""
        self._updated: str | None = None
        self._count = 0
        self._ids: list[int] = []  # the rest of this handle's claimed block, in order
        self._selections: OrderedDict[tuple[int, str], int] = OrderedDict()
        self.write_token = secrets.token_hex(8)  # names this handle's claims and writes in the ledger
        self._closed = False

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def manifest(self) -> dict[str, Any]:
        p = self._props
        return {"format": int(p.get("mae.format", FORMAT)), "artifact_sha256": p.get("mae.artifact_sha256", ""),
                "dim": self._dim, "metric": p.get("mae.metric", METRIC), "factory": p.get("mae.factory", ""),
                "factory_reason": p.get("mae.factory_reason"), "index_type": self._index_type,
                "index_params": json_or(p.get("mae.index_params"), {}),
                "search_params": json_or(p.get("mae.search_params"), {}), "tuning": json_or(p.get("mae.tuning"), {}),
                "generation": self._generation, "count": self._count, "artifact": p.get("mae.artifact") or None,
                "images": json_or(p.get("mae.images"), []), "build": json_or(p.get("mae.build"), {}),
                "created": p.get("mae.created"), "updated": self._updated}

    @property
    def count(self) -> int:
        return self._count

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def uploads(self) -> Path:
        """Images added over HTTP: beside a milvus-lite file (``PATH.uploads``); for a server,
        ``$MAE_MILVUS_UPLOADS`` or a folder under ``~/.local/share/mae`` named after it. Servers on several hosts
        that take uploads need a folder they all mount at the same path (the items record absolute paths)."""
        t = self.target
        if t.local is not None:
            return t.local.with_suffix(".uploads")
        if os.environ.get("MAE_MILVUS_UPLOADS"):
            return Path(os.environ["MAE_MILVUS_UPLOADS"]).expanduser().resolve()
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        host = re.sub(r"[^A-Za-z0-9.-]+", "_", t.uri.removeprefix("http://"))
        return (base / "mae" / "uploads" / "_".join(filter(None, (host, t.db_name, t.collection)))).resolve()

    @property
    def search_params(self) -> dict[str, int]:
        return json_or(self._props.get("mae.search_params"), {})

    # ------------------------------------------------------------------ opening

    @classmethod
    def canonical_target(cls, target: str) -> str:
        t = parse_target(target)
        return str(t.local) if t.local is not None else target

    @classmethod
    def open_target(cls, target: str, *, artifact_sha256: str | None = None, **options: Any) -> MilvusIndex:
        """Open a collection (``mmap`` and ``gpu``, FAISS's options, mean nothing here)."""
        t = parse_target(target)
        client = connect(t, existing=True)
        try:
            idx = cls._open(t, client)
            if artifact_sha256 is not None and artifact_sha256 != idx.artifact_sha256:
                raise mismatch(t.name, idx.artifact_sha256, artifact_sha256)
            return idx
        except BaseException:
            close_client(t, client)
            raise

    @classmethod
    def _open(cls, t: Target, client: MilvusClient) -> MilvusIndex:
        with milvus_errors(t):
            if not client.has_collection(t.collection):
                raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r} there); make one with "
                                        f"`mae index build --out {t.name}` or `mae index migrate --to {t.name}`")
            desc = client.describe_collection(t.collection)
            problems, dim, index_type = facts_problems(client, t, desc)
            if problems:
                raise IndexDamagedError(f"{t.name}: {problems[0]}; {repair_hint(t.name)}")
            ensure_loaded(client, t.collection)
            ensure_loaded(client, t.ledger)
            idx = cls(t, client, desc.get("properties") or {}, dim, index_type)
            idx._refresh()
        return idx

    def reload(self) -> bool:
        """Read the ledger's generation (one small query); when another writer moved it, re-read the count and
        the properties. True when something changed."""
        with milvus_errors(self.target):
            gen, token, updated = self._ledger_state()
            with self.lock:
                if (gen, token) == (self._generation, self._token):
                    return False
            self._refresh(gen, token, updated)
            return True

    def _refresh(self, gen: int | None = None, token: str | None = None, updated: str | None = None) -> None:
        """Read the facts and the count again (requests outside the lock: searches of this process go on)."""
        if gen is None:
            gen, token, updated = self._ledger_state()
        desc = self.client.describe_collection(self.target.collection)
        count = self._count_where("")
        with self.lock:
            self._props = dict(desc.get("properties") or {})
            self._generation, self._token, self._updated = gen, token or "", updated
            self._count = count
            self._selections.clear()

    def _ledger_state(self) -> tuple[int, str, str | None]:
        """The newest generation claim: (generation, the writer's token, when)."""
        fields = ["key", "generation", "owner", "updated"]
        rows = self.client.query(self.target.ledger, filter=f"generation >= {max(self._generation, 1)}",
                                 output_fields=fields, consistency_level="Strong")
        if not rows:  # a ledger made again by a repair starts lower than this handle has seen
            rows = self.client.query(self.target.ledger, filter="generation > 0", output_fields=fields,
                                     consistency_level="Strong")
        if not rows:
            raise IndexDamagedError(f"{self.name}: the ledger {self.target.ledger!r} has no generation; "
                                    f"{repair_hint(self.name)}")
        newest = max(rows, key=lambda r: (int(r["generation"]), -int(r["key"])))
        return int(newest["generation"]), str(newest["owner"]), newest.get("updated")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close_client(self.target, self.client)

    # ------------------------------------------------------------------ search

    def knn(self, x: np.ndarray, k: int, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
        if k > MAX_TOPK:
            raise UsageError(f"a Milvus index answers at most {MAX_TOPK:,} neighbours per query, not {k:,}")
        with self.lock, milvus_errors(self.target):
            expr = expression(conditions, self.path_prefixes)
            params = dict(self.search_params)
            matching = self.count
            if expr:
                matching = self._selected(expr)
                if matching == 0:
                    return np.full((len(x), 1), -np.inf, np.float32), np.full((len(x), 1), -1, np.int64)
                params = self._widened(params, matching / max(self.count, 1))
            want = min(k, matching)
            D, I = self._search(x, k, expr, params)
            short = (I >= 0).sum(axis=1) < want
            knob = knob_of(self._index_type)
            while short.any() and knob and matching > EXACT_MAX and params.get(knob, 0) < self._knob_max(knob):
                # the index missed some of a large selection: search those queries again, wider
                params[knob] = min(self._knob_max(knob), max(params.get(knob, 1) * 4, k))
                D2, I2 = self._search(x[short], k, expr, params)
                D[short], I[short] = D2, I2
                short = (I >= 0).sum(axis=1) < want
            if short.any() and matching <= EXACT_MAX:  # a small selection: its vectors scored exactly
                D2, I2 = self._exact(x[short], k, expr)
                D[short], I[short] = D2, I2
            return D, I

    def _knob_max(self, knob: str) -> int:
        if knob == "nprobe":
            return int(self.manifest["index_params"].get("nlist", 1))
        return max(EF_MAX, MAX_TOPK)

    def _widened(self, params: dict[str, int], fraction: float) -> dict[str, int]:
        s = min(max(fraction, 1e-9), 1.0)
        out = dict(params)
        if "ef" in out:
            out["ef"] = int(min(max(EF_MAX, out["ef"]), math.ceil(out["ef"] / s**HNSW_WIDEN)))
        if "nprobe" in out:
            out["nprobe"] = int(min(self._knob_max("nprobe"), math.ceil(out["nprobe"] / s**IVF_WIDEN)))
        return out

    def _search(self, x: np.ndarray, k: int, expr: str, params: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """One search request: scores (N, k) and ids (N, k), -inf / -1 past the end of each answer."""
        D = np.full((len(x), k), -np.inf, np.float32)
        I = np.full((len(x), k), -1, np.int64)
        search_params = {"metric_type": "IP", "params": dict(params)}
        if "ef" in params:
            search_params["params"]["ef"] = max(int(params["ef"]), k)  # HNSW needs ef >= k
        for start in range(0, len(x), 1024):
            part = x[start : start + 1024]
            answers = self.client.search(self.target.collection, data=[v for v in part], anns_field="vector",
                                         limit=k, filter=expr, search_params=search_params, output_fields=[],
                                         consistency_level="Strong")
            for j, hits in enumerate(answers):
                row = start + j
                for r, hit in enumerate(list(hits)[:k]):
                    I[row, r], D[row, r] = int(hit["id"]), float(hit["distance"])
        return D, I

    def _exact(self, x: np.ndarray, k: int, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``x`` among the items ``expr`` selects, scored here on their stored vectors."""
        ids, vectors = [], []
        for batch in self._scan(expr, ["id", "vector"]):
            ids += [int(r["id"]) for r in batch]
            vectors += [r["vector"] for r in batch]
        D = np.full((len(x), k), -np.inf, np.float32)
        I = np.full((len(x), k), -1, np.int64)
        if not ids:
            return D, I
        ids_arr, V = np.asarray(ids, np.int64), np.asarray(vectors, np.float32)
        scores = x @ V.T  # (N, M)
        take = min(k, len(ids))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :take]
        D[:, :take] = np.take_along_axis(scores, top, 1)
        I[:, :take] = ids_arr[top]
        return D, I

    def _selected(self, expr: str) -> int:
        """How many items ``expr`` selects now (cached per generation: filters repeat)."""
        key = (self._generation, expr)
        if key in self._selections:
            self._selections.move_to_end(key)
            return self._selections[key]
        n = self._count_where(expr)
        self._selections[key] = n
        while len(self._selections) > SELECTION_CACHE:
            self._selections.popitem(last=False)
        return n

    def _count_where(self, expr: str) -> int:
        rows = self.client.query(self.target.collection, filter=expr, output_fields=["count(*)"],
                                 consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def _scan(self, expr: str, fields: list[str], batch: int = 4096) -> Iterator[list[dict[str, Any]]]:
        """Every item ``expr`` selects, ``fields`` of each, a batch at a time (a query iterator: any size)."""
        it = self.client.query_iterator(self.target.collection, batch_size=batch, filter=expr, output_fields=fields,
                                        consistency_level="Strong")
        try:
            while True:
                rows = it.next()
                if not rows:
                    return
                yield list(rows)
        finally:
            it.close()

    # ------------------------------------------------------------------ reads

    def _query_in(self, field: str, values: Sequence[Any], fields: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(values), BATCH):
            chunk = values[start : start + BATCH]
            listed = ", ".join(str(int(v)) if field == "id" else literal(v) for v in chunk)
            out += self.client.query(self.target.collection, filter=f"{field} in [{listed}]", output_fields=fields,
                                     consistency_level="Strong")
        return out

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        wanted = sorted({int(i) for i in ids if 1 <= int(i) <= MAX_ID})
        with milvus_errors(self.target):
            return {int(r["id"]): _row(r) for r in self._query_in("id", wanted, ROW_FIELDS)}

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        asked = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
        with milvus_errors(self.target):
            found = {int(r["id"]): r["vector"] for r in
                     self._query_in("id", sorted({i for i in asked if 1 <= i <= MAX_ID}), ["id", "vector"])}
        missing = [i for i in asked if i not in found]
        if missing:
            raise ItemNotFoundError(f"no item {missing[0]} in {self.name}")
        if not asked:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray([found[i] for i in asked], np.float32)

    def live_ids(self) -> np.ndarray:
        return np.unique(self.stored_ids())

    def stored_ids(self) -> np.ndarray:
        """The id of every row, in the collection's order (an id held by two rows comes twice: ``check``)."""
        with milvus_errors(self.target):
            return np.asarray([int(r["id"]) for batch in self._scan("", ["id"]) for r in batch], np.int64)

    def ids_by_sha256(self, hashes: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(hashes))
        with milvus_errors(self.target):
            out: dict[str, int] = {}
            for r in sorted(self._query_in("sha256", wanted, ["id", "sha256"]), key=lambda r: int(r["id"])):
                out.setdefault(r["sha256"], int(r["id"]))
            return out

    def ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        wanted = sorted(set(paths))
        with milvus_errors(self.target):
            out: dict[str, list[int]] = {}
            for r in self._query_in("path", wanted, ["id", "path"]):
                out.setdefault(r["path"], []).append(int(r["id"]))
            return {p: sorted(v) for p, v in out.items()}

    def labels(self) -> dict[str, int]:
        """Live items per label: a scan of the label field (Milvus has no GROUP BY)."""
        counts: dict[str, int] = {}
        with milvus_errors(self.target):
            for batch in self._scan("", ["label"]):
                for r in batch:
                    key = r.get("label") or ""
                    counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def tag_keys(self, limit: int = 50) -> dict[str, int]:
        counts: dict[str, int] = {}
        with milvus_errors(self.target):
            for batch in self._scan("", ["tags"]):
                for r in batch:
                    for key in r.get("tags") or {}:
                        counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])

    def info(self) -> dict[str, Any]:
        m = self.manifest
        try:
            suggestion = choose_index("auto", self.count, self.dim).factory
        except (ValueError, UserError) as e:
            suggestion = str(e)
        with milvus_errors(self.target):
            described = self.client.describe_index(self.target.collection, "vector") or {}
        return {
            "index": self.name, "engine": self.engine, "uri": self.target.uri, "collection": self.target.collection,
            "embedded": self.target.local is not None, "count": self.count, "dim": self.dim, "metric": m["metric"],
            "factory": m["factory"], "factory_reason": m["factory_reason"], "index_type": m["index_type"],
            "index_params": m["index_params"], "index_state": described.get("state"),
            "generation": self.generation, "search_params": m["search_params"],
            "tuning": {k: v for k, v in m["tuning"].items() if k != "curve"},
            "artifact_sha256": m["artifact_sha256"], "artifact": m["artifact"], "labels": self.labels(),
            "tags": self.tag_keys(), "build": m["build"], "created": m["created"], "updated": m["updated"],
            "auto_factory_now": suggestion, "roots": [str(r) for r in self.roots],
        }

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer per collection in this process (milvus-lite takes no concurrent writers); a write starts
        from the generation other processes committed. Searches of this process are not held up: the handle's
        lock is taken only to change what it caches."""
        lock = write_lock(self.target)
        timeout = -1 if self.lock_timeout is None else self.lock_timeout
        if not lock.acquire(timeout=timeout):
            raise IndexBusyError(f"another write to {self.name} held it for more than {self.lock_timeout} s")
        try:
            with milvus_errors(self.target):
                self.reload()
                yield
        finally:
            lock.release()

    def add(self, vectors: np.ndarray, items: Sequence[Item], *, roots: Sequence[str | Path] = ()) -> AddResult:
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        check_items(items)
        check_sizes(items)
        with self._writing():
            known = self.ids_by_sha256([it.sha256 for it in items])
            keep, result = split_duplicates(items, known)
            if not keep:
                return result
            ids = self._allocate(len(keep))
            added = utc_now()
            rows = [entity(i, unit(x[j]), items[j], added) for i, j in zip(ids, keep)]
            try:
                for start in range(0, len(rows), BATCH):
                    self.client.insert(self.target.collection, rows[start : start + BATCH])
            except BaseException:
                with contextlib.suppress(Exception):
                    self.client.delete(self.target.collection, ids=ids)
                raise
            ids = self._settle_duplicates(ids, [items[j] for j in keep], result)
            new_roots = self._new_roots(roots)
            if new_roots:
                self._set_properties({"mae.images": json.dumps(new_roots)})
            self._commit()
            result.ids = ids
            return result

    def _settle_duplicates(self, ids: list[int], items: Sequence[Item], result: AddResult) -> list[int]:
        """After an insert: bytes another writer indexed meanwhile under an older id -> ours is removed again."""
        sha = {i: it.sha256 for i, it in zip(ids, items)}
        rows = self._query_in("sha256", sorted(set(sha.values())), ["id", "sha256"])
        oldest: dict[str, int] = {}
        for r in rows:
            oldest[r["sha256"]] = min(oldest.get(r["sha256"], int(r["id"])), int(r["id"]))
        drop = [i for i in ids if oldest.get(sha[i], i) < i]
        if drop:
            self.client.delete(self.target.collection, ids=drop)
            for i, it in zip(ids, items):
                if i in drop:
                    result.duplicates.append(it.path)
                    result.duplicate_ids.append(oldest[sha[i]])
        return [i for i in ids if i not in drop]

    def _new_roots(self, roots: Sequence[str | Path]) -> list[str]:
        known = [Path(r) for r in self.manifest.get("images") or []]
        new = [str(Path(r).expanduser().resolve()) for r in roots]
        new = [r for r in dict.fromkeys(new) if not any(Path(r) == k or k in Path(r).parents for k in known)]
        return [*map(str, known), *new] if new else []

    def delete(self, ids: Sequence[int], paths: Mapping[str, Sequence[str]]) -> RemoveResult:
        with self._writing():
            result = RemoveResult()
            live = self.rows(ids)
            by_path = self.ids_by_path([p for c in paths.values() for p in c])
            found = {given: [i for p in c for i in by_path.get(p, [])] for given, c in paths.items()}
            chosen = [i for i in ids if i in live] + [i for f in found.values() for i in f]
            result.missing = [str(i) for i in ids if i not in live] + [p for p, f in found.items() if not f]
            chosen = sorted(set(chosen))
            if not chosen:
                return result
            rows = self.rows(chosen)
            self.client.delete(self.target.collection, ids=chosen)
            self._commit()
            result.ids = chosen
            result.paths = [rows[i].path for i in chosen if i in rows]
            return result

    def annotate(self, metadata: Mapping[str, tuple[Any, Mapping[str, str] | None]]) -> int:
        from retrieval.catalog import clean_label, clean_tags
        from retrieval.metadata import UNSET

        with self._writing():
            by_path = self.ids_by_path(list(metadata))
            ids = sorted(i for found in by_path.values() for i in found)
            if not ids:
                return 0
            full = {int(r["id"]): r for r in self._query_in("id", ids, [*ROW_FIELDS, "vector"])}
            updates = []
            for path, found in by_path.items():
                label, tags = metadata[path]
                for i in found:
                    if i not in full:
                        continue
                    r = full[i]
                    new_label = r.get("label") if label is UNSET else clean_label(label)
                    new_tags = clean_tags({**(r.get("tags") or {}), **(tags or {})}) or {}
                    updates.append({**r, "label": new_label, "tags": new_tags, "tag_filter": tag_filter(new_tags)})
            if not updates:
                return 0
            check_sizes([Item(u["path"], u["sha256"], u["label"], u["tags"]) for u in updates])
            for start in range(0, len(updates), BATCH):
                self.client.upsert(self.target.collection, updates[start : start + BATCH])
            self._commit()
            return len(updates)

    def compact(self, *, force: bool = True) -> dict[str, Any]:
        """Milvus folds deletes and small segments itself; ``force`` asks it to compact now."""
        if not force:
            return {"index": self.name, "compacted": False, "generation": self.generation}
        with self.lock, milvus_errors(self.target):
            try:
                job = self.client.compact(self.target.collection)
            except MilvusException as e:
                return {"index": self.name, "compacted": False, "generation": self.generation, "reason": error_text(e)}
        return {"index": self.name, "compacted": True, "job": job, "generation": self.generation}

    def _commit(self) -> None:
        """A write is done: claim the next generation (other servers' ``reload`` sees it) and re-count.

        Claimed as id blocks are (the module docstring), so that two servers writing at once never make the same
        generation: every write has its own. Old generation claims are pruned as new ones are made."""
        gen, now = claim_generation(self.client, self.target, self.write_token, lambda: self._ledger_state()[0])
        if gen % GENERATIONS_KEPT == 0:
            self.client.delete(self.target.ledger, filter=f"generation > 0 and generation < {gen - GENERATIONS_KEPT}")
        self._refresh(gen, self.write_token, now)

    def _set_properties(self, values: Mapping[str, str]) -> None:
        self.client.alter_collection_properties(self.target.collection, properties=dict(values))
        with self.lock:
            self._props.update(values)

    def _allocate(self, n: int) -> list[int]:
        """``n`` new ids from this handle's claimed blocks (claiming more as needed: see the module docstring)."""
        while len(self._ids) < n:
            first, last = claim_id_blocks(self.client, self.target, self.write_token,
                                          max(1, math.ceil((n - len(self._ids)) / ID_BLOCK)))
            self._ids += range(max(first * ID_BLOCK, 1), (last + 1) * ID_BLOCK)
        out, self._ids = self._ids[:n], self._ids[n:]
        return out

    # ------------------------------------------------------------------ making one

    @classmethod
    def create_target(cls, target: str, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
                      factory: str = "auto", overwrite: bool = False, extra: dict[str, Any] | None = None,
                      **options: Any) -> MilvusIndex:
        """A new collection (``retrieval.milvus_admin.create``: complete or not at all), opened."""
        from retrieval.milvus_admin import create

        create(target, vectors, items, artifact_sha256=artifact_sha256, factory=factory, overwrite=overwrite,
               extra=extra, **options)
        return cls.open_target(target)

    # ------------------------------------------------------------------ check and repair

    @classmethod
    def check_target(cls, target: str) -> dict[str, Any]:
        """Whether the collection, its properties and the ledger agree (``facts_problems``), then the rows against
        them (``retrieval.milvus_admin.row_problems``)."""
        from retrieval.milvus_admin import row_problems

        t = parse_target(target)
        client = connect(t, existing=True)
        try:
            with milvus_errors(t):
                if not client.has_collection(t.collection):
                    raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r})")
                desc = client.describe_collection(t.collection)
                problems, dim, index_type = facts_problems(client, t, desc)
                report: dict[str, Any] = {"index": t.name, "engine": "milvus", "collection": True,
                                          "ledger": client.has_collection(t.ledger)}
                if not problems:
                    ensure_loaded(client, t.collection)
                    ensure_loaded(client, t.ledger)
                    idx = cls(t, client, desc.get("properties") or {}, dim, index_type)
                    try:
                        idx._refresh()
                    except IndexDamagedError as e:
                        problems.append(str(e).split("; run `mae index check")[0].removeprefix(f"{t.name}: "))
                    else:
                        problems += row_problems(idx, report)
        finally:
            close_client(t, client)
        report["problems"] = problems
        report["ok"] = not problems
        lines = [f"{t.name}: " + ("consistent" if not problems else f"{len(problems)} problem(s)")]
        if "count" in report:
            lines.append(f"  {report['count']} live items at generation {report['generation']}, "
                         f"{report.get('index_type')} index")
        lines += [f"  - {p}" for p in problems]
        if problems:
            lines.append(f"  repair: mae index check --index {t.name} --repair")
        report["text"] = "\n".join(lines)
        return report

    @classmethod
    def repair_target(cls, target: str, artifact: str | Path | None, **options: Any) -> dict[str, Any]:
        """``retrieval.milvus_admin.repair``, then the check again."""
        from retrieval.milvus_admin import repair

        done = repair(target, artifact)
        report = cls.check_target(target)
        report["repaired"] = done
        report["text"] = "\n".join([*(f"repaired: {d}" for d in done), report["text"]])
        return report


# ----------------------------------------------------------------------------------------------- helpers


def _row(r: Mapping[str, Any]) -> Row:
    return Row(int(r["id"]), r["path"], r.get("label"), r["sha256"], r["added"], 0, None, dict(r["tags"]) or None)
