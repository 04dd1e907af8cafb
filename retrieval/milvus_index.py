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

**Index types** are chosen from the collection size as the FAISS side chooses (``retrieval.tuning.choose_factory``:
Flat, HNSW, IVF, IVF-PQ -> FLAT, HNSW, IVF_FLAT, IVF_PQ) or given as a Milvus type (``FLAT``, ``HNSW``, ``IVF_FLAT``,
``IVF_PQ``) or a FAISS factory of those kinds; milvus-lite has no PQ index, so IVF_PQ needs a server (which also
gets INVERTED indexes on ``sha256``, ``path`` and ``label``, the fields adds and removes look up). ``ef`` /
``nprobe`` are tuned against exact search on held-out items to recall@10 >= 0.95, as on FAISS. A filtered search
widens them as FAISS does, and a search that still comes back short of min(k, matching items) is redone exactly
over the matching vectors (or wider), so a filter never makes an answer short.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from mae.errors import MissingDependencyError, UsageError, UserError
from retrieval.catalog import Condition, Item, Row, check_items
from retrieval.engine import (
    AddResult,
    Index,
    IndexBusyError,
    IndexDamagedError,
    RemoveResult,
    mismatch,
    repair_hint,
    split_duplicates,
)
from retrieval.filters import MAX_ID
from retrieval.milvus_expr import expression, literal, tag_filter
from retrieval.tuning import (
    EF_SEARCHES,
    NPROBES,
    PLATEAU,
    TARGET_RECALL,
    TUNE_QUERIES,
    choose_factory,
    ground_truth,
    nlist_for,
    recall_at,
)

try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError("the Milvus engine needs pymilvus: pip install 'mae-service[milvus]'") from e

# pymilvus logs every failed call with a traceback before raising it; the errors reach users as one line here.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
log = logging.getLogger(__name__)

FORMAT = 1
METRIC = "inner_product"
DEFAULT_COLLECTION = "images"  # the collection of a milvus:PATH.db
LEDGER = "_mae_ledger"
ID_BLOCK = 1024
GENERATIONS_KEPT = 64  # generation claims kept in the ledger (older ones are pruned)
CLAIM_ATTEMPTS = 64
MAX_TOPK = 16384  # Milvus answers at most this many neighbours per query
MAX_TEXT = 65535  # VARCHAR bytes
BATCH = 2000  # rows per insert / ids per query
EXACT_MAX = 20_000  # a filter that selects at most this many items is scored exactly when the index comes back short
# Filtered searches widen ef / nprobe for a kept fraction s as the FAISS engine does (measured there:
# retrieval.faiss_index): ef / s**0.5, nprobe / s**0.2.
HNSW_WIDEN = 0.5
IVF_WIDEN = 0.2
EF_MAX = 2048
HNSW_M = 32
EF_CONSTRUCTION = 40  # FAISS's default for HNSW32: the same graph quality on both engines
SELECTION_CACHE = 16
TIMEOUT = float(os.environ.get("MAE_MILVUS_TIMEOUT", "30"))
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# pymilvus pings an idle connection every 10 s; gRPC servers (milvus-lite's among them) allow one per 5 minutes by
# default and answer more with GOAWAY "too_many_pings", which gRPC logs as an error on stderr
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000}
ROW_FIELDS = ["id", "path", "label", "sha256", "added", "tags"]
SCALAR_INDEXED = ("sha256", "path", "label")

TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_PQ")
LITE_TYPES = ("FLAT", "HNSW", "IVF_FLAT")
FACTORY_HELP = ("auto, FLAT, HNSW (or HNSW16..HNSW64), IVF_FLAT, IVF_PQ, or a FAISS factory of those kinds "
                "(Flat, HNSW32,Flat, IVF4096,Flat, IVF4096_HNSW32,Flat, IVF4096,PQ32)")


class MilvusUnavailableError(UserError, ConnectionError):
    """The Milvus server named by an index does not answer (or milvus-lite cannot open its file)."""


# ----------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Target:
    """Where an index lives: what pymilvus connects to, the database, the collection, and the name users gave."""

    uri: str
    collection: str
    db_name: str = ""
    local: Path | None = None  # the .db folder of embedded milvus-lite

    @property
    def name(self) -> str:
        if self.local is not None:
            return f"milvus:{self.local}"
        db = f"/{self.db_name}" if self.db_name else ""
        return f"milvus://{self.uri.removeprefix('http://')}{db}/{self.collection}"

    @property
    def ledger(self) -> str:
        return self.collection + LEDGER


def parse_target(target: str) -> Target:
    """``//HOST:PORT/[DB/]COLLECTION`` (a server) or ``PATH.db`` (embedded milvus-lite) -> Target."""
    if target.startswith("//"):
        url = urlparse("http:" + target)
        parts = [p for p in url.path.split("/") if p]
        if not url.hostname or len(parts) not in (1, 2):
            raise UsageError(f"cannot read the index milvus:{target}: write milvus://HOST:PORT/COLLECTION "
                             "(or milvus://HOST:PORT/DATABASE/COLLECTION)")
        try:
            port = url.port or 19530
        except ValueError:
            raise UsageError(f"milvus:{target}: the port is not a number") from None
        for part in parts:
            _check_name(part, f"milvus:{target}")
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return Target(f"http://{host}:{port}", parts[-1], parts[0] if len(parts) == 2 else "")
    if not target.endswith(".db"):
        raise UsageError(f"milvus:{target}: an embedded milvus-lite index is a path ending in .db "
                         "(milvus:PATH.db); a server is milvus://HOST:PORT/COLLECTION")
    path = Path(target).expanduser().resolve()
    return Target(str(path), DEFAULT_COLLECTION, local=path)


def _check_name(name: str, spec: str) -> None:
    if not _NAME.fullmatch(name) or len(name) + len(LEDGER) > 255:
        raise UsageError(f"{spec}: {name!r} cannot name a Milvus collection or database (letters, digits and "
                         f"underscores, not starting with a digit, at most {255 - len(LEDGER)} characters)")


# ----------------------------------------------------------------------------------------------- connections


_local_lock = threading.Lock()
_local_users: dict[str, int] = {}  # embedded milvus-lite files this process has open -> open handles
_write_locks: dict[tuple[str, str, str], threading.Lock] = {}


def connect(t: Target, *, existing: bool = False) -> MilvusClient:
    """A client for ``t``; MilvusUnavailableError (one line with the URI) when nothing answers there.

    ``existing``: the index must be there already (milvus-lite would make an empty file for a mistyped name)."""
    if existing and t.local is not None and not (t.local / "LOCK").exists():
        raise FileNotFoundError(f"no index at {t.name}" + ("" if t.local.exists() else " (no such file)"))
    if t.local is not None:
        if importlib.util.find_spec("milvus_lite") is None:
            raise MissingDependencyError(
                f"{t.name} runs embedded milvus-lite, which is not installed: pip install milvus-lite (it comes with "
                "mae-service[dev]), or use a Milvus server: milvus://HOST:PORT/COLLECTION")
        if not t.local.parent.is_dir():
            raise FileNotFoundError(f"no folder {t.local.parent} to hold {t.name}")
        with _local_lock:
            _local_users[t.uri] = _local_users.get(t.uri, 0) + 1
    try:
        client = MilvusClient(t.uri, token=os.environ.get("MAE_MILVUS_TOKEN", ""), db_name=t.db_name,
                              timeout=TIMEOUT, dedicated=True, grpc_options=GRPC_OPTIONS)
    except MilvusException as e:
        if t.local is not None:
            _release_local(t)
            if _locked_elsewhere(t.local):
                raise MilvusUnavailableError(
                    f"{t.name} is open in another process (milvus-lite runs one process per file): serve it with "
                    f"`milvus-lite server --data-dir {t.local} --max-workers 1` and name the index "
                    f"milvus://127.0.0.1:19530/{t.collection}") from None
            raise MilvusUnavailableError(f"milvus-lite cannot open {t.local} ({_message(e)})") from None
        raise MilvusUnavailableError(f"cannot reach the Milvus server at {t.uri} for {t.name} ({_message(e)}); is "
                                     "it running?") from None
    return client


def _release_local(t: Target) -> None:
    """One handle of an embedded file closed: the last one stops its milvus-lite, freeing the file for others."""
    with _local_lock:
        left = _local_users.get(t.uri, 0) - 1
        if left > 0:
            _local_users[t.uri] = left
            return
        _local_users.pop(t.uri, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(t.uri)


def _locked_elsewhere(path: Path) -> bool:
    import fcntl

    lock = path / "LOCK"
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _message(e: BaseException) -> str:
    return str(getattr(e, "message", "") or e).splitlines()[0][:300]


def _unavailable(e: MilvusException) -> bool:
    text = _message(e).lower()
    return any(w in text for w in ("unavailable", "connect", "deadline", "timeout", "timed out", "closed channel"))


# ----------------------------------------------------------------------------------------------- index types


@dataclass(frozen=True)
class IndexChoice:
    """A Milvus index: its type and build parameters, the FAISS factory of the same kind, and why it was chosen."""

    index_type: str
    params: dict[str, int]
    factory: str
    reason: str


def choose_index(factory: str, n: int, dim: int, *, max_memory: int | None = None) -> IndexChoice:
    """``--factory`` -> the Milvus index: "auto" chooses by size as FAISS does (``tuning.choose_factory``)."""
    if not isinstance(factory, str) or not factory.strip():
        raise UsageError(f"--factory for a Milvus index: {FACTORY_HELP}")
    if factory.strip().lower() == "auto":
        choice = choose_factory(n, dim, max_memory=max_memory)
        return replace(parse_factory(choice.factory, n, dim), reason=f"as FAISS chooses: {choice.reason}")
    return parse_factory(factory, n, dim)


def parse_factory(text: str, n: int, dim: int) -> IndexChoice:
    """A Milvus index type or a FAISS factory string of one of the four kinds -> IndexChoice."""
    s = text.strip().upper().replace(" ", "")
    given = "given with --factory"
    nlist = nlist_for(n)
    if s in ("FLAT", "FLAT,FLAT", "IDMAP,FLAT", "IDMAP2,FLAT"):
        return IndexChoice("FLAT", {}, "Flat", given)
    m = re.fullmatch(r"HNSW(\d+)?(,FLAT)?", s)
    if m:
        links = int(m.group(1) or HNSW_M)
        if not 4 <= links <= 64:
            raise UsageError(f"--factory {text}: HNSW takes M from 4 to 64")
        return IndexChoice("HNSW", {"M": links, "efConstruction": EF_CONSTRUCTION}, f"HNSW{links},Flat", given)
    m = re.fullmatch(r"IVF_FLAT|IVF(\d+)(_HNSW\d+)?,FLAT", s)
    if m:
        lists = int(m.group(1) or nlist)
        return IndexChoice("IVF_FLAT", {"nlist": _nlist(lists, text)}, f"IVF{lists},Flat", given)
    m = re.fullmatch(r"IVF_PQ|(?:OPQ\d+(?:_\d+)?,)?IVF(\d+)(?:_HNSW\d+)?,PQ(\d+)(?:X8)?(?:NP)?", s)
    if m:
        lists = int(m.group(1) or nlist)
        codes = int(m.group(2)) if m.group(2) else next((c for c in (64, 32, 16, 8) if dim % c == 0), 0)
        if not codes or dim % codes:
            raise UsageError(f"--factory {text}: PQ needs a code count that divides the dimension {dim}")
        return IndexChoice("IVF_PQ", {"nlist": _nlist(lists, text), "m": codes, "nbits": 8},
                           f"IVF{lists},PQ{codes}", given)
    raise UsageError(f"--factory {text!r} is not an index Milvus builds; give {FACTORY_HELP}")


def _nlist(nlist: int, text: str) -> int:
    if not 1 <= nlist <= 65536:
        raise UsageError(f"--factory {text}: Milvus takes nlist from 1 to 65536")
    return nlist


def _knob(index_type: str) -> str | None:
    return {"HNSW": "ef", "IVF_FLAT": "nprobe", "IVF_PQ": "nprobe"}.get(index_type)


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
                "index_params": _json(p.get("mae.index_params"), {}),
                "search_params": _json(p.get("mae.search_params"), {}), "tuning": _json(p.get("mae.tuning"), {}),
                "generation": self._generation, "count": self._count, "artifact": p.get("mae.artifact") or None,
                "images": _json(p.get("mae.images"), []), "build": _json(p.get("mae.build"), {}),
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
        return _json(self._props.get("mae.search_params"), {})

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
            _close_client(t, client)
            raise

    @classmethod
    def _open(cls, t: Target, client: MilvusClient) -> MilvusIndex:
        with _errors(t):
            if not client.has_collection(t.collection):
                raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r} there); make one with "
                                        f"`mae index build --out {t.name}` or `mae index migrate --to {t.name}`")
            desc = client.describe_collection(t.collection)
            problems, dim, index_type = _facts_problems(client, t, desc)
            if problems:
                raise IndexDamagedError(f"{t.name}: {problems[0]}; {repair_hint(t.name)}")
            _ensure_loaded(client, t.collection)
            _ensure_loaded(client, t.ledger)
            idx = cls(t, client, desc.get("properties") or {}, dim, index_type)
            idx._refresh()
        return idx

    def reload(self) -> bool:
        """Read the ledger's generation (one small query); when another writer moved it, re-read the count and
        the properties. True when something changed."""
        with _errors(self.target):
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
            _close_client(self.target, self.client)

    # ------------------------------------------------------------------ search

    def knn(self, x: np.ndarray, k: int, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
        if k > MAX_TOPK:
            raise UsageError(f"a Milvus index answers at most {MAX_TOPK:,} neighbours per query, not {k:,}")
        with self.lock, _errors(self.target):
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
            knob = _knob(self._index_type)
            while short.any() and knob and matching > EXACT_MAX and params.get(knob, 0) < self._knob_max(knob):
                # the index missed some of a large selection: search those queries again, wider
                params[knob] = min(self._knob_max(knob), max(params.get(knob, 1) * 4, k))
                D2, I2 = self._search(x[short], k, expr, params)
                D[short], I[short] = D2, I2
                short = (I >= 0).sum(axis=1) < want
            if short.any():  # a small selection: its vectors scored exactly
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
        with _errors(self.target):
            return {int(r["id"]): _row(r) for r in self._query_in("id", wanted, ROW_FIELDS)}

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        asked = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
        with _errors(self.target):
            found = {int(r["id"]): r["vector"] for r in
                     self._query_in("id", sorted({i for i in asked if 1 <= i <= MAX_ID}), ["id", "vector"])}
        missing = [i for i in asked if i not in found]
        if missing:
            raise KeyError(f"no item {missing[0]} in {self.name}")
        if not asked:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray([found[i] for i in asked], np.float32)

    def live_ids(self) -> np.ndarray:
        with _errors(self.target):
            ids = [int(r["id"]) for batch in self._scan("", ["id"]) for r in batch]
        return np.unique(np.asarray(ids, np.int64))

    def ids_by_sha256(self, hashes: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(hashes))
        with _errors(self.target):
            out: dict[str, int] = {}
            for r in sorted(self._query_in("sha256", wanted, ["id", "sha256"]), key=lambda r: int(r["id"])):
                out.setdefault(r["sha256"], int(r["id"]))
            return out

    def ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        wanted = sorted(set(paths))
        with _errors(self.target):
            out: dict[str, list[int]] = {}
            for r in self._query_in("path", wanted, ["id", "path"]):
                out.setdefault(r["path"], []).append(int(r["id"]))
            return {p: sorted(v) for p, v in out.items()}

    def labels(self) -> dict[str, int]:
        """Live items per label: a scan of the label field (Milvus has no GROUP BY)."""
        counts: dict[str, int] = {}
        with _errors(self.target):
            for batch in self._scan("", ["label"]):
                for r in batch:
                    key = r.get("label") or ""
                    counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def tag_keys(self, limit: int = 50) -> dict[str, int]:
        counts: dict[str, int] = {}
        with _errors(self.target):
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
        with _errors(self.target):
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
        key = (self.target.uri, self.target.db_name, self.target.collection)
        with _local_lock:
            lock = _write_locks.setdefault(key, threading.Lock())
        timeout = -1 if self.lock_timeout is None else self.lock_timeout
        if not lock.acquire(timeout=timeout):
            raise IndexBusyError(f"another write to {self.name} held it for more than {self.lock_timeout} s")
        try:
            with _errors(self.target):
                self.reload()
                yield
        finally:
            lock.release()

    def add(self, vectors: np.ndarray, items: Sequence[Item], *, roots: Sequence[str | Path] = ()) -> AddResult:
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        check_items(items)
        _check_sizes(items)
        with self._writing():
            known = self.ids_by_sha256([it.sha256 for it in items])
            keep, result = split_duplicates(items, known)
            if not keep:
                return result
            ids = self._allocate(len(keep))
            added = _now()
            rows = [_entity(i, _unit(x[j]), items[j], added) for i, j in zip(ids, keep)]
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
            _check_sizes([Item(u["path"], u["sha256"], u["label"], u["tags"]) for u in updates])
            for start in range(0, len(updates), BATCH):
                self.client.upsert(self.target.collection, updates[start : start + BATCH])
            self._commit()
            return len(updates)

    def compact(self, *, force: bool = True) -> dict[str, Any]:
        """Milvus folds deletes and small segments itself; ``force`` asks it to compact now."""
        if not force:
            return {"index": self.name, "compacted": False, "generation": self.generation}
        with self.lock, _errors(self.target):
            try:
                job = self.client.compact(self.target.collection)
            except MilvusException as e:
                return {"index": self.name, "compacted": False, "generation": self.generation, "reason": _message(e)}
        return {"index": self.name, "compacted": True, "job": job, "generation": self.generation}

    def _commit(self) -> None:
        """A write is done: claim the next generation (other servers' ``reload`` sees it) and re-count.

        Claimed as id blocks are (the module docstring), so that two servers writing at once never make the same
        generation: every write has its own. Old generation claims are pruned as new ones are made."""
        ledger = self.target.ledger
        for attempt in range(CLAIM_ATTEMPTS):
            gen = self._ledger_state()[0] + 1
            key, now = secrets.randbits(62) + 1, _now()
            self.client.insert(ledger, [_ledger_row(key, -1, -1, self.write_token, gen, now)])
            rivals = self.client.query(ledger, filter=f"generation == {gen}", output_fields=["key"],
                                       consistency_level="Strong")
            if [int(r["key"]) for r in rivals] == [key]:
                break
            self.client.delete(ledger, ids=[key])
            time.sleep(secrets.randbelow(20) / 1000 * (attempt + 1))
        else:
            raise RuntimeError(f"{self.name}: could not claim a generation after {CLAIM_ATTEMPTS} attempts")
        if gen % GENERATIONS_KEPT == 0:
            self.client.delete(ledger, filter=f"generation > 0 and generation < {gen - GENERATIONS_KEPT}")
        self._refresh(gen, self.write_token, now)

    def _set_properties(self, values: Mapping[str, str]) -> None:
        self.client.alter_collection_properties(self.target.collection, properties=dict(values))
        with self.lock:
            self._props.update(values)

    def _allocate(self, n: int) -> list[int]:
        """``n`` new ids from this handle's claimed blocks (claiming more as needed: see the module docstring)."""
        while len(self._ids) < n:
            first, last = self._claim(max(1, math.ceil((n - len(self._ids)) / ID_BLOCK)))
            self._ids += range(max(first * ID_BLOCK, 1), (last + 1) * ID_BLOCK)
        out, self._ids = self._ids[:n], self._ids[n:]
        return out

    def _claim(self, blocks: int) -> tuple[int, int]:
        """Claim ``blocks`` consecutive id blocks no other writer holds; returns (first, last) block."""
        ledger = self.target.ledger
        for attempt in range(CLAIM_ATTEMPTS):
            claims = self.client.query(ledger, filter="block >= 0", output_fields=["last"],
                                       consistency_level="Strong")
            first = max((int(c["last"]) for c in claims), default=-1) + 1
            last = first + blocks - 1
            if (last + 1) * ID_BLOCK > 2**53:
                raise UserError(f"{self.name} has handed out every id below 2**53")
            key = secrets.randbits(62) + 1
            self.client.insert(ledger, [_ledger_row(key, first, last, self.write_token, 0, _now())])
            rivals = self.client.query(ledger, filter=f"block >= 0 and block <= {last} and last >= {first}",
                                       output_fields=["key"], consistency_level="Strong")
            if [int(r["key"]) for r in rivals] == [key]:
                return first, last
            time.sleep(secrets.randbelow(50) / 1000 * (attempt + 1))  # another writer claimed it too: move on
        raise RuntimeError(f"{self.name}: could not claim ids after {CLAIM_ATTEMPTS} attempts (too many writers?)")

    # ------------------------------------------------------------------ making one

    @classmethod
    def create_target(cls, target: str, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
                      factory: str = "auto", overwrite: bool = False, extra: dict[str, Any] | None = None,
                      max_memory: int | None = None, target_recall: float = TARGET_RECALL, seed: int = 0,
                      rows: Sequence[Row] | None = None, progress: bool = False, **_options: Any) -> MilvusIndex:
        """A new collection from vectors (N, D) and their items; it appears complete or not at all (built under a
        temporary name, then renamed). ``rows``: catalogue rows to keep (ids, dates, tags: ``mae index migrate``);
        ``vectors`` may then be a memory-mapped array, read a batch at a time."""
        t = parse_target(target)
        x = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors, np.float32)
        if x.ndim != 2 or len(x) != len(items) or (rows is not None and len(rows) != len(items)):
            raise ValueError(f"expected vectors (N, D) for {len(items)} items, got shape {x.shape}")
        check_items(items)
        _check_sizes(items)
        if rows is None:
            keep, seen = [], set()
            for j, it in enumerate(items):
                if it.sha256 not in seen:
                    seen.add(it.sha256)
                    keep.append(j)
            ids = list(range(1, len(keep) + 1))
            stamp = _now()
            added = [stamp] * len(keep)
        else:
            keep = list(range(len(items)))
            ids = [int(r.id) for r in rows]
            added = [r.added for r in rows]
            if len(set(ids)) != len(ids) or any(not 1 <= i <= MAX_ID for i in ids):
                raise ValueError("rows to keep must have distinct ids from 1 to 2**63 - 1")
        n, dim = len(keep), int(x.shape[1])
        choice = choose_index(factory, n, dim, max_memory=max_memory)
        if t.local is not None:
            _check_lite_type(t, choice)
        client = connect(t)
        tmp = Target(t.uri, f"{t.collection[:180]}_mae_new_{secrets.token_hex(4)}", t.db_name, t.local)
        try:
            with _errors(t):
                lite = _is_lite(client)
                if lite:  # a milvus-lite server process
                    _check_lite_type(t, choice)
                if client.has_collection(t.collection) and not overwrite:
                    raise FileExistsError(f"{t.name} already exists (--overwrite replaces it)")
                extra = dict(extra or {})
                props = {"mae.format": str(FORMAT), "mae.artifact_sha256": artifact_sha256, "mae.dim": str(dim),
                         "mae.metric": METRIC, "mae.factory": choice.factory, "mae.factory_reason": choice.reason,
                         "mae.index_type": choice.index_type, "mae.index_params": json.dumps(choice.params),
                         "mae.created": _now(), "mae.artifact": str(extra.pop("artifact", "") or ""),
                         "mae.images": json.dumps([str(p) for p in extra.pop("images", []) or []]),
                         "mae.build": json.dumps({**extra.pop("build", {}), **extra}, default=str)}
                _create_collection(client, tmp.collection, dim, props)
                _create_ledger(client, tmp.ledger, max(ids, default=0))
                rng = np.random.default_rng(seed)
                held = np.zeros(n, bool)
                if _knob(choice.index_type) and n > 10 * (10 + 1):
                    held[rng.choice(n, min(TUNE_QUERIES, n // 10), replace=False)] = True
                order = [p for p in range(n) if not held[p]]
                bar = _progress(progress, n, f"writing {t.name}")
                _insert(client, tmp.collection, x, items, keep, ids, added, order, bar)
                client.flush(tmp.collection)
                _build_index(client, tmp.collection, choice, scalars=not lite)
                if held.any():
                    tuning = _tune(client, tmp.collection, choice, x, keep, ids, held, target_recall)
                    client.alter_collection_properties(tmp.collection, properties={
                        "mae.search_params": json.dumps(tuning.pop("params")), "mae.tuning": json.dumps(tuning)})
                    _insert(client, tmp.collection, x, items, keep, ids, added, list(np.flatnonzero(held)), bar)
                    client.flush(tmp.collection)
                bar.close()
                if client.has_collection(t.collection):  # --overwrite: the old index goes just before the rename
                    client.drop_collection(t.collection)
                if client.has_collection(t.ledger):
                    client.drop_collection(t.ledger)
                client.rename_collection(tmp.ledger, t.ledger)
                client.rename_collection(tmp.collection, t.collection)
                _ensure_loaded(client, t.ledger)
                _ensure_loaded(client, t.collection)
        except BaseException:
            with contextlib.suppress(Exception):
                for name in (tmp.collection, tmp.ledger):
                    if client.has_collection(name):
                        client.drop_collection(name)
            _close_client(t, client)
            raise
        _close_client(t, client)
        return cls.open_target(target)

    # ------------------------------------------------------------------ check and repair

    @classmethod
    def check_target(cls, target: str) -> dict[str, Any]:
        """Whether the collection, its properties and the ledger agree (see ``_facts_problems`` and below)."""
        t = parse_target(target)
        client = connect(t, existing=True)
        try:
            with _errors(t):
                if not client.has_collection(t.collection):
                    raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r})")
                desc = client.describe_collection(t.collection)
                problems, dim, index_type = _facts_problems(client, t, desc)
                report: dict[str, Any] = {"index": t.name, "engine": "milvus", "collection": True,
                                          "ledger": client.has_collection(t.ledger)}
                if not problems:
                    _ensure_loaded(client, t.collection)
                    _ensure_loaded(client, t.ledger)
                    idx = cls(t, client, desc.get("properties") or {}, dim, index_type)
                    try:
                        idx._refresh()
                    except IndexDamagedError as e:
                        problems.append(str(e).split("; run `mae index check")[0].removeprefix(f"{t.name}: "))
                    else:
                        problems += idx._check_rows(report)
        finally:
            _close_client(t, client)
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

    def _check_rows(self, report: dict[str, Any]) -> list[str]:
        """The rows against the facts: the count, one row per id, every id below what the ledger has handed out,
        unit vectors of the recorded dimension (a sample), the artifact's sha256 where its folder is here."""
        problems = []
        ids: list[int] = []
        for batch in self._scan("", ["id"]):
            ids += [int(r["id"]) for r in batch]
        report.update(count=self.count, generation=self.generation, index_type=self._index_type, rows=len(ids))
        if len(ids) != self.count:
            problems.append(f"the collection counts {self.count} items but lists {len(ids)}")
        if len(set(ids)) != len(ids):
            problems.append(f"{len(ids) - len(set(ids))} id(s) are held by more than one row")
        claims = self.client.query(self.target.ledger, filter="block >= 0", output_fields=["last"],
                                   consistency_level="Strong")
        top = (max((int(c["last"]) for c in claims), default=-1) + 1) * ID_BLOCK - 1
        if ids and max(ids) > top:
            problems.append(f"id {max(ids)} is past the ids the ledger has handed out (up to {top}): a new item "
                            "could be given an id that is taken")
        sample = sorted(set(ids))[:: max(1, len(set(ids)) // 64)][:64]
        if sample:
            norms = np.linalg.norm(self.vectors(sample), axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                problems.append("stored vectors are not unit length (not written by this engine?)")
        artifact = self.manifest.get("artifact")
        config = Path(artifact) / "config.json" if artifact else None
        if config is not None and config.is_file():
            try:
                sha = json.loads(config.read_text()).get("sha256")
            except ValueError:
                sha = None
            if sha and sha != self.artifact_sha256:
                problems.append(f"the artifact {artifact} now has sha256 {sha[:12]}, not the "
                                f"{self.artifact_sha256[:12]} that built the index")
        return problems

    @classmethod
    def repair_target(cls, target: str, artifact: str | Path | None, **options: Any) -> dict[str, Any]:
        """What can be repaired without the vectors: a missing or emptied ledger is made again above the highest
        id (ids of items removed at the top may then be handed out again) and missing facts are taken from the
        artifact (``--artifact``). Rows themselves are never rewritten: a problem in them is reported."""
        t = parse_target(target)
        client = connect(t, existing=True)
        done: list[str] = []
        try:
            with _errors(t):
                if not client.has_collection(t.collection):
                    raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r}): nothing to repair")
                desc = client.describe_collection(t.collection)
                props = desc.get("properties") or {}
                dim = _vector_dim(desc)
                if dim and not props.get("mae.artifact_sha256") and artifact is not None:
                    config = json.loads((Path(artifact) / "config.json").read_text())
                    if int(config.get("embed_dim", dim)) != dim:
                        raise UsageError(f"{artifact} makes {config.get('embed_dim')}-d vectors; {t.name} holds "
                                         f"{dim}-d")
                    client.alter_collection_properties(t.collection, properties={
                        "mae.format": str(FORMAT), "mae.artifact_sha256": config["sha256"], "mae.dim": str(dim),
                        "mae.metric": METRIC, "mae.artifact": str(Path(artifact).resolve())})
                    done.append(f"recorded the artifact {config['sha256'][:12]} and the dimension {dim}")
                index_type = _index_type(client, t.collection)
                if index_type and not props.get("mae.index_type"):
                    client.alter_collection_properties(t.collection, properties={
                        "mae.index_type": index_type, "mae.factory": index_type})
                    done.append(f"recorded the index type {index_type}")
                ledger_ok = client.has_collection(t.ledger)
                if ledger_ok:
                    _ensure_loaded(client, t.ledger)
                    ledger_ok = bool(client.query(t.ledger, filter="generation > 0", output_fields=["key"],
                                                  consistency_level="Strong"))
                if not ledger_ok:
                    _ensure_loaded(client, t.collection)
                    it = client.query_iterator(t.collection, batch_size=4096, filter="", output_fields=["id"])
                    top = 0
                    while batch := it.next():
                        top = max([top, *(int(r["id"]) for r in batch)])
                    it.close()
                    if client.has_collection(t.ledger):
                        client.drop_collection(t.ledger)
                    _create_ledger(client, t.ledger, top)
                    _ensure_loaded(client, t.ledger)
                    done.append(f"made the ledger again (new ids start above {top})")
        finally:
            _close_client(t, client)
        report = cls.check_target(target)
        report["repaired"] = done
        report["text"] = "\n".join([*(f"repaired: {d}" for d in done), report["text"]])
        return report


# ----------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _errors(t: Target) -> Iterator[None]:
    """Milvus errors a user can act on as one line: an unreachable server, a collection that went away."""
    try:
        yield
    except MilvusException as e:
        text = _message(e)
        if _unavailable(e):
            raise MilvusUnavailableError(f"the Milvus server at {t.uri} stopped answering for {t.name} ({text})") from e
        if "not found" in text.lower() or "not exist" in text.lower():
            raise IndexDamagedError(f"{t.name}: {text}; {repair_hint(t.name)}") from e
        raise


def _close_client(t: Target, client: MilvusClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
    if t.local is not None:
        _release_local(t)


def _schema(dim: int) -> Any:
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("path", DataType.VARCHAR, max_length=MAX_TEXT)
    s.add_field("label", DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
    s.add_field("sha256", DataType.VARCHAR, max_length=1024)
    s.add_field("added", DataType.VARCHAR, max_length=64)
    s.add_field("tags", DataType.JSON)
    s.add_field("tag_filter", DataType.JSON)
    return s


FIELDS = {"id": DataType.INT64, "vector": DataType.FLOAT_VECTOR, "path": DataType.VARCHAR,
          "label": DataType.VARCHAR, "sha256": DataType.VARCHAR, "added": DataType.VARCHAR, "tags": DataType.JSON,
          "tag_filter": DataType.JSON}


def _create_collection(client: MilvusClient, name: str, dim: int, properties: Mapping[str, str]) -> None:
    client.create_collection(name, schema=_schema(dim), consistency_level="Strong", properties=dict(properties))


def _create_ledger(client: MilvusClient, name: str, top_id: int) -> None:
    """The ledger of a new index: generation 1, and the blocks of ids up to ``top_id`` claimed."""
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("key", DataType.INT64, is_primary=True)
    s.add_field("block", DataType.INT64)
    s.add_field("last", DataType.INT64)
    s.add_field("owner", DataType.VARCHAR, max_length=64)
    s.add_field("generation", DataType.INT64)
    s.add_field("updated", DataType.VARCHAR, max_length=64)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
    client.create_collection(name, schema=s, consistency_level="Strong")
    params = client.prepare_index_params()
    params.add_index("v", index_type="FLAT", metric_type="IP")
    client.create_index(name, params, sync=False)
    _wait_index(client, name, "v")
    client.load_collection(name)
    now = _now()
    rows = [_ledger_row(0, -1, -1, "create", 1, now)]
    if top_id > 0:  # the ids the index starts with
        rows.append(_ledger_row(secrets.randbits(62) + 1, 0, top_id // ID_BLOCK, "create", 0, now))
    client.insert(name, rows)


def _ledger_row(key: int, block: int, last: int, owner: str, generation: int, updated: str) -> dict[str, Any]:
    return {"key": key, "block": block, "last": last, "owner": owner, "generation": generation, "updated": updated,
            "v": [1.0, 0.0]}


def _build_index(client: MilvusClient, name: str, choice: IndexChoice, scalars: bool) -> None:
    """The vector index and, on a Milvus server, INVERTED indexes on the fields every add and remove looks up
    (``sha256``, ``path``) and on ``label`` (milvus-lite scans either way: measured no faster with them)."""
    params = client.prepare_index_params()
    params.add_index("vector", index_type=choice.index_type, metric_type="IP", params=dict(choice.params))
    for field in SCALAR_INDEXED if scalars else ():
        params.add_index(field, index_type="INVERTED")
    client.create_index(name, params, sync=False)  # pymilvus's own wait polls every half second
    for field in ["vector", *(SCALAR_INDEXED if scalars else ())]:
        _wait_index(client, name, field)
    client.load_collection(name)


def _is_lite(client: MilvusClient) -> bool:
    """Whether the server is milvus-lite (embedded, or a ``milvus-lite server`` process)."""
    return "lite" in str(client.get_server_version()).lower()


def _check_lite_type(t: Target, choice: IndexChoice) -> None:
    if choice.index_type not in LITE_TYPES:
        raise UsageError(f"{t.name}: milvus-lite has no {choice.index_type} index ({choice.reason}); give "
                         "--factory IVF_FLAT (or HNSW), or use a Milvus server (milvus://HOST:PORT/COLLECTION)")


def _wait_index(client: MilvusClient, name: str, field: str, timeout: float = 24 * 3600) -> None:
    started, pause = time.monotonic(), 0.005
    while True:
        state = client.describe_index(name, field) or {}
        if str(state.get("state", "")).lower() in ("finished", "3") and \
                int(state.get("pending_index_rows", 0) or 0) == 0:
            return
        if str(state.get("state", "")).lower() in ("failed", "4"):
            raise RuntimeError(f"Milvus failed to build the {field} index of {name}: {state.get('fail_reason')}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the {field} index of {name} was not built within {timeout:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _ensure_loaded(client: MilvusClient, name: str) -> None:
    state = str((client.get_load_state(name) or {}).get("state", ""))
    if "Loaded" not in state:
        client.load_collection(name)


def _insert(client: MilvusClient, name: str, x: np.ndarray, items: Sequence[Item], keep: Sequence[int],
            ids: Sequence[int], added: Sequence[str], positions: Sequence[int], bar: Any) -> None:
    """Rows at ``positions`` (into keep / ids / added) inserted a batch at a time, vectors normalised per batch."""
    for start in range(0, len(positions), BATCH):
        part = list(positions[start : start + BATCH])
        vecs = _unit(np.asarray(x[[keep[p] for p in part]], np.float32))
        client.insert(name, [_entity(ids[p], vecs[j], items[keep[p]], added[p]) for j, p in enumerate(part)])
        bar.update(len(part))


def _entity(id: int, vector: np.ndarray, it: Item, added: str) -> dict[str, Any]:
    tags = dict(it.tags or {})
    return {"id": int(id), "vector": vector, "path": it.path, "label": it.label, "sha256": it.sha256, "added": added,
            "tags": tags, "tag_filter": tag_filter(tags)}


def _row(r: Mapping[str, Any]) -> Row:
    return Row(int(r["id"]), r["path"], r.get("label"), r["sha256"], r["added"], 0, None, dict(r["tags"]) or None)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.array(x, np.float32, ndmin=1)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _check_sizes(items: Sequence[Item]) -> None:
    """What Milvus cannot store is refused before anything is written (its VARCHAR holds 65,535 bytes)."""
    for it in items:
        for what, text in (("path", it.path), ("label", it.label or ""), ("sha256", it.sha256)):
            if len(text.encode("utf-8")) > (1024 if what == "sha256" else MAX_TEXT):
                raise UsageError(f"{what} {text[:40]!r}... is too long for a Milvus index")


def _tune(client: MilvusClient, name: str, choice: IndexChoice, x: np.ndarray, keep: Sequence[int],
          ids: Sequence[int], held: np.ndarray, target: float, k: int = 10) -> dict[str, Any]:
    """Smallest ef / nprobe whose recall@k against exact search reaches ``target`` on the held-out items (not yet
    in the collection, as FAISS tunes: a query that is a node of an HNSW graph overstates its recall)."""
    knob = _knob(choice.index_type)
    positions = np.flatnonzero(held)
    queries = _unit(np.asarray(x[[keep[p] for p in positions]], np.float32))
    rest = np.flatnonzero(~held)

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(rest), 65536):
            part = rest[start : start + 65536]
            yield _unit(np.asarray(x[[keep[p] for p in part]], np.float32)), np.asarray([ids[p] for p in part])

    _, exact = ground_truth(queries, blocks(), k)
    if knob == "nprobe":
        nlist = int(choice.params["nlist"])
        candidates = [p for p in NPROBES if p < nlist] + [nlist]
    else:
        candidates = [e for e in EF_SEARCHES if e >= k]
    curve, chosen = [], None
    for value in candidates:
        started = time.perf_counter()
        answers = client.search(name, data=[q for q in queries], anns_field="vector", limit=k,
                                search_params={"metric_type": "IP", "params": {knob: value}}, output_fields=[])
        seconds = time.perf_counter() - started
        found = np.full((len(queries), k), -1, np.int64)
        for j, hits in enumerate(answers):
            got = [int(h["id"]) for h in list(hits)[:k]]
            found[j, : len(got)] = got
        r10 = recall_at(found, exact, k)
        curve.append({knob: value, f"recall@{k}": round(r10, 4), "qps": round(len(queries) / max(seconds, 1e-9), 1)})
        if r10 >= target:
            chosen = value
            break
    met = chosen is not None
    if not met:
        best = max(c[f"recall@{k}"] for c in curve)
        chosen = next(c[knob] for c in curve if c[f"recall@{k}"] >= best - PLATEAU)
    at = next(c for c in curve if c[knob] == chosen)
    return {"params": {knob: chosen}, "target": target, "target_met": met, "queries": len(queries), "k": k,
            f"recall@{k}": at[f"recall@{k}"], "curve": curve}


def _facts_problems(client: MilvusClient, t: Target, desc: Mapping[str, Any]) -> tuple[list[str], int, str]:
    """What is wrong with a collection's schema, properties and ledger (empty when nothing is); its dim and index."""
    problems = []
    props = desc.get("properties") or {}
    fields = {f["name"]: f for f in desc.get("fields", [])}
    for name, kind in FIELDS.items():
        if name not in fields or fields[name].get("type") != kind:
            problems.append(f"the collection {t.collection!r} has no {name} field of type {kind.name}: it was not "
                            "made by mae (mae index build / migrate make one)")
            return problems, 0, ""
    dim = _vector_dim(desc)
    missing = [k for k in ("mae.format", "mae.artifact_sha256", "mae.dim", "mae.metric", "mae.index_type")
               if not props.get(k)]
    if missing:
        problems.append(f"the collection's properties lack {', '.join(missing)}")
    if props.get("mae.format") and props["mae.format"] != str(FORMAT):
        problems.append(f"the collection has format {props['mae.format']}; this version reads format {FORMAT}")
    if props.get("mae.dim") and props["mae.dim"] != str(dim):
        problems.append(f"the properties say {props['mae.dim']}-d vectors but the vector field holds {dim}-d")
    if props.get("mae.metric") and props["mae.metric"] != METRIC:
        problems.append(f"the properties say metric {props['mae.metric']}, not {METRIC}")
    sha = props.get("mae.artifact_sha256", "")
    if sha and not re.fullmatch(r"[0-9a-f]{64}|[0-9a-zA-Z._-]{1,128}", sha):
        problems.append(f"the artifact sha256 {sha[:40]!r} is not a sha256")
    index_type = _index_type(client, t.collection)
    if not index_type:
        problems.append("the vector field has no index")
    elif props.get("mae.index_type") and props["mae.index_type"] != index_type:
        problems.append(f"the properties say a {props['mae.index_type']} index but the vector field has {index_type}")
    metric = (client.describe_index(t.collection, "vector") or {}).get("metric_type") if index_type else None
    if metric and metric != "IP":
        problems.append(f"the vector index compares by {metric}, not inner product (IP)")
    if not client.has_collection(t.ledger):
        problems.append(f"the ledger collection {t.ledger!r} is missing")
    return problems, dim, index_type


def _vector_dim(desc: Mapping[str, Any]) -> int:
    for f in desc.get("fields", []):
        if f["name"] == "vector":
            return int((f.get("params") or {}).get("dim", 0))
    return 0


def _index_type(client: MilvusClient, name: str) -> str:
    if "vector" not in (client.list_indexes(name) or []):
        return ""
    return str((client.describe_index(name, "vector") or {}).get("index_type", ""))


def _progress(enabled: bool, total: int, desc: str) -> Any:
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=None if enabled else True, file=sys.stderr)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = ["FACTORY_HELP", "ID_BLOCK", "LITE_TYPES", "TYPES", "IndexChoice", "MilvusIndex", "MilvusUnavailableError",
           "Target", "choose_index", "connect", "parse_factory", "parse_target"]
