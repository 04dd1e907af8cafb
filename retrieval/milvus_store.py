"""What a Milvus index is made of, and how it is reached: names, connections, the schema, the ledger, index types,
building, and the checks that the parts agree. ``retrieval.milvus_index`` is the engine built on it.

A name is ``//HOST:PORT/[DB/]COLLECTION`` (a server) or ``PATH.db`` (embedded milvus-lite, started in this process
by pymilvus; one process per file: a second process is told to serve it with ``milvus-lite server``). Errors a user
can act on (a server that does not answer, a collection that went away) become one line naming the URI.

**Index types** are chosen from the collection size as the FAISS side chooses (``retrieval.tuning.choose_factory``:
Flat, HNSW, IVF, IVF-PQ -> FLAT, HNSW, IVF_FLAT, IVF_PQ) or given as a Milvus type or a FAISS factory of those
kinds, and recorded as the FAISS-style name of the same kind (so that ``mae index migrate`` keeps the kind both
ways). milvus-lite has no PQ index: IVF_PQ is refused there with what to do instead. A server also gets INVERTED
indexes on ``sha256``, ``path`` and ``label``, the fields adds and removes look up (milvus-lite scans either way:
measured no faster with them). ``ef`` / ``nprobe`` are tuned as FAISS tunes them (``tune``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from mae.errors import MissingDependencyError, UsageError, UserError
from retrieval.catalog import Item
from retrieval.engine import IndexDamagedError, repair_hint
from retrieval.milvus_expr import tag_filter
from retrieval.tuning import EF_SEARCHES, NPROBES, PLATEAU, choose_factory, ground_truth, nlist_for, recall_at

try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError("the Milvus engine needs pymilvus: pip install 'mae-service[milvus]'") from e

# pymilvus logs every failed call with a traceback before raising it; the errors reach users as one line here.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

FORMAT = 1
METRIC = "inner_product"
DEFAULT_COLLECTION = "images"  # the collection of a milvus:PATH.db
LEDGER = "_mae_ledger"
ID_BLOCK = 1024
MAX_TEXT = 65535  # VARCHAR bytes
BATCH = 2000  # rows per insert / ids per query
HNSW_M = 32
EF_CONSTRUCTION = 40  # FAISS's default for HNSW32: the same graph quality on both engines
TIMEOUT = float(os.environ.get("MAE_MILVUS_TIMEOUT", "30"))
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# pymilvus pings an idle connection every 10 s; gRPC servers (milvus-lite's among them) allow one per 5 minutes by
# default and answer more with GOAWAY "too_many_pings", which gRPC logs as an error on stderr
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000}
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


def write_lock(t: Target) -> threading.Lock:
    """The lock writes to ``t``'s collection take in this process (milvus-lite takes no concurrent writers)."""
    with _local_lock:
        return _write_locks.setdefault((t.uri, t.db_name, t.collection), threading.Lock())


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
            raise MilvusUnavailableError(f"milvus-lite cannot open {t.local} ({error_text(e)})") from None
        raise MilvusUnavailableError(f"cannot reach the Milvus server at {t.uri} for {t.name} ({error_text(e)}); is "
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


def error_text(e: BaseException) -> str:
    return str(getattr(e, "message", "") or e).splitlines()[0][:300]


def _unavailable(e: MilvusException) -> bool:
    text = error_text(e).lower()
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


def knob_of(index_type: str) -> str | None:
    return {"HNSW": "ef", "IVF_FLAT": "nprobe", "IVF_PQ": "nprobe"}.get(index_type)


# ----------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def milvus_errors(t: Target) -> Iterator[None]:
    """Milvus errors a user can act on as one line: an unreachable server, a collection that went away."""
    try:
        yield
    except MilvusException as e:
        text = error_text(e)
        if _unavailable(e):
            raise MilvusUnavailableError(f"the Milvus server at {t.uri} stopped answering for {t.name} ({text})") from e
        if "not found" in text.lower() or "not exist" in text.lower():
            raise IndexDamagedError(f"{t.name}: {text}; {repair_hint(t.name)}") from e
        raise


def close_client(t: Target, client: MilvusClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
    if t.local is not None:
        _release_local(t)


def schema(dim: int) -> Any:
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


def create_collection(client: MilvusClient, name: str, dim: int, properties: Mapping[str, str]) -> None:
    client.create_collection(name, schema=schema(dim), consistency_level="Strong", properties=dict(properties))


def create_ledger(client: MilvusClient, name: str, top_id: int) -> None:
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
    wait_index(client, name, "v")
    client.load_collection(name)
    now = utc_now()
    rows = [ledger_row(0, -1, -1, "create", 1, now)]
    if top_id > 0:  # the ids the index starts with
        rows.append(ledger_row(secrets.randbits(62) + 1, 0, top_id // ID_BLOCK, "create", 0, now))
    client.insert(name, rows)


def ledger_row(key: int, block: int, last: int, owner: str, generation: int, updated: str) -> dict[str, Any]:
    return {"key": key, "block": block, "last": last, "owner": owner, "generation": generation, "updated": updated,
            "v": [1.0, 0.0]}


def create_indexes(client: MilvusClient, name: str, choice: IndexChoice, scalars: bool) -> None:
    """The vector index and, on a Milvus server, INVERTED indexes on the fields every add and remove looks up
    (``sha256``, ``path``) and on ``label`` (milvus-lite scans either way: measured no faster with them)."""
    params = client.prepare_index_params()
    params.add_index("vector", index_type=choice.index_type, metric_type="IP", params=dict(choice.params))
    for field in SCALAR_INDEXED if scalars else ():
        params.add_index(field, index_type="INVERTED")
    client.create_index(name, params, sync=False)  # pymilvus's own wait polls every half second
    for field in ["vector", *(SCALAR_INDEXED if scalars else ())]:
        wait_index(client, name, field)
    client.load_collection(name)


def is_lite(client: MilvusClient) -> bool:
    """Whether the server is milvus-lite (embedded, or a ``milvus-lite server`` process)."""
    return "lite" in str(client.get_server_version()).lower()


def check_lite_type(t: Target, choice: IndexChoice) -> None:
    if choice.index_type not in LITE_TYPES:
        raise UsageError(f"{t.name}: milvus-lite has no {choice.index_type} index ({choice.reason}); give "
                         "--factory IVF_FLAT (or HNSW), or use a Milvus server (milvus://HOST:PORT/COLLECTION)")


def wait_index(client: MilvusClient, name: str, field: str, timeout: float = 24 * 3600) -> None:
    started, pause = time.monotonic(), 0.005
    while True:
        state = client.describe_index(name, field) or {}
        if str(state.get("state", "")).lower() in ("finished", "3") and \
                int(state.get("pending_index_rows", 0) or 0) == 0:
            return
        if str(state.get("state", "")).lower() in ("failed", "4"):
            raise UserError(f"Milvus failed to build the {field} index of {name}: {state.get('fail_reason')}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the {field} index of {name} was not built within {timeout:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def ensure_loaded(client: MilvusClient, name: str) -> None:
    state = str((client.get_load_state(name) or {}).get("state", ""))
    if "Loaded" not in state:
        client.load_collection(name)


def insert_rows(client: MilvusClient, name: str, x: np.ndarray, items: Sequence[Item], keep: Sequence[int],
            ids: Sequence[int], added: Sequence[str], positions: Sequence[int], bar: Any) -> None:
    """Rows at ``positions`` (into keep / ids / added) inserted a batch at a time, vectors normalised per batch."""
    for start in range(0, len(positions), BATCH):
        part = list(positions[start : start + BATCH])
        vecs = unit(np.asarray(x[[keep[p] for p in part]], np.float32))
        client.insert(name, [entity(ids[p], vecs[j], items[keep[p]], added[p]) for j, p in enumerate(part)])
        bar.update(len(part))


def entity(id: int, vector: np.ndarray, it: Item, added: str) -> dict[str, Any]:
    tags = dict(it.tags or {})
    return {"id": int(id), "vector": vector, "path": it.path, "label": it.label, "sha256": it.sha256, "added": added,
            "tags": tags, "tag_filter": tag_filter(tags)}




def unit(x: np.ndarray) -> np.ndarray:
    x = np.array(x, np.float32, ndmin=1)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def check_sizes(items: Sequence[Item]) -> None:
    """What Milvus cannot store is refused before anything is written (its VARCHAR holds 65,535 bytes)."""
    for it in items:
        for what, text in (("path", it.path), ("label", it.label or ""), ("sha256", it.sha256)):
            if len(text.encode("utf-8")) > (1024 if what == "sha256" else MAX_TEXT):
                raise UsageError(f"{what} {text[:40]!r}... is too long for a Milvus index")


def tune(client: MilvusClient, name: str, choice: IndexChoice, x: np.ndarray, keep: Sequence[int],
          ids: Sequence[int], held: np.ndarray, target: float, k: int = 10) -> dict[str, Any]:
    """Smallest ef / nprobe whose recall@k against exact search reaches ``target`` on the held-out items (not yet
    in the collection, as FAISS tunes: a query that is a node of an HNSW graph overstates its recall)."""
    knob = knob_of(choice.index_type)
    positions = np.flatnonzero(held)
    queries = unit(np.asarray(x[[keep[p] for p in positions]], np.float32))
    rest = np.flatnonzero(~held)

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(rest), 65536):
            part = rest[start : start + 65536]
            yield unit(np.asarray(x[[keep[p] for p in part]], np.float32)), np.asarray([ids[p] for p in part])

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


def facts_problems(client: MilvusClient, t: Target, desc: Mapping[str, Any]) -> tuple[list[str], int, str]:
    """What is wrong with a collection's schema, properties and ledger (empty when nothing is); its dim and index."""
    problems = []
    props = desc.get("properties") or {}
    fields = {f["name"]: f for f in desc.get("fields", [])}
    for name, kind in FIELDS.items():
        if name not in fields or fields[name].get("type") != kind:
            problems.append(f"the collection {t.collection!r} has no {name} field of type {kind.name}: it was not "
                            "made by mae (mae index build / migrate make one)")
            return problems, 0, ""
    dim = vector_dim(desc)
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
    index_type = index_type_of(client, t.collection)
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


def vector_dim(desc: Mapping[str, Any]) -> int:
    for f in desc.get("fields", []):
        if f["name"] == "vector":
            return int((f.get("params") or {}).get("dim", 0))
    return 0


def index_type_of(client: MilvusClient, name: str) -> str:
    if "vector" not in (client.list_indexes(name) or []):
        return ""
    return str((client.describe_index(name, "vector") or {}).get("index_type", ""))




def json_or(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- claims in the ledger

CLAIM_ATTEMPTS = 64


def claim_generation(client: MilvusClient, t: Target, owner: str, newest: Callable[[], int]) -> tuple[int, str]:
    """Claim the generation after ``newest()`` for a write of ``owner``; returns (generation, when).

    A claim is kept only when, read back with Strong consistency, it is the only one of its generation (the
    module docstring of ``retrieval.milvus_index``); otherwise it is withdrawn and the next one tried."""
    for attempt in range(CLAIM_ATTEMPTS):
        gen = newest() + 1
        key, now = secrets.randbits(62) + 1, utc_now()
        client.insert(t.ledger, [ledger_row(key, -1, -1, owner, gen, now)])
        rivals = client.query(t.ledger, filter=f"generation == {gen}", output_fields=["key"],
                              consistency_level="Strong")
        if [int(r["key"]) for r in rivals] == [key]:
            return gen, now
        client.delete(t.ledger, ids=[key])
        time.sleep(secrets.randbelow(20) / 1000 * (attempt + 1))
    raise RuntimeError(f"{t.name}: could not claim a generation after {CLAIM_ATTEMPTS} attempts")


def ledger_top_id(client: MilvusClient, t: Target) -> int:
    """The highest id the ledger's claims have handed out (-1 before the first claim)."""
    claims = client.query(t.ledger, filter="block >= 0", output_fields=["last"], consistency_level="Strong")
    return (max((int(c["last"]) for c in claims), default=-1) + 1) * ID_BLOCK - 1


def claim_id_blocks(client: MilvusClient, t: Target, owner: str, blocks: int) -> tuple[int, int]:
    """Claim ``blocks`` consecutive id blocks no other writer holds; returns (first, last) block."""
    for attempt in range(CLAIM_ATTEMPTS):
        claims = client.query(t.ledger, filter="block >= 0", output_fields=["last"], consistency_level="Strong")
        first = max((int(c["last"]) for c in claims), default=-1) + 1
        last = first + blocks - 1
        if (last + 1) * ID_BLOCK > 2**53:
            raise UserError(f"{t.name} has handed out every id below 2**53")
        key = secrets.randbits(62) + 1
        client.insert(t.ledger, [ledger_row(key, first, last, owner, 0, utc_now())])
        rivals = client.query(t.ledger, filter=f"block >= 0 and block <= {last} and last >= {first}",
                              output_fields=["key"], consistency_level="Strong")
        if [int(r["key"]) for r in rivals] == [key]:
            return first, last
        time.sleep(secrets.randbelow(50) / 1000 * (attempt + 1))  # another writer claimed it too: move on
    raise RuntimeError(f"{t.name}: could not claim ids after {CLAIM_ATTEMPTS} attempts (too many writers?)")
