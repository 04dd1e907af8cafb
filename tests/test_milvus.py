"""The Milvus engine beyond the shared contract (tests/test_engines.py runs that on it): values escaped in filters,
``mae index migrate`` there and back, ids handed out by concurrent writers, damage and repair, errors a user can
fix, and two ``mae serve`` processes answering from one collection on a ``milvus-lite server`` process.

Everything runs on the session's one milvus-lite server (tests/milvus_support.py) or an embedded ``milvus:PATH.db``;
a test against a real Milvus server runs when ``MAE_MILVUS_URI`` is set.
"""

from __future__ import annotations

import io
import json
import os
import threading

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from mae.errors import UsageError, UserError  # noqa: E402
from retrieval.catalog import Item  # noqa: E402
from retrieval.index import Index, IndexDamagedError  # noqa: E402
from retrieval.migrate import migrate  # noqa: E402
from retrieval.milvus_expr import literal  # noqa: E402
from tests.milvus_support import real_spec, shared_server  # noqa: E402

SHA = "a" * 64
DIM = 16

# Values that break naive quoting: quotes of both kinds, backslashes (also before a quote), unicode, newlines, and
# text that reads as an expression or as SQL when spliced.
NASTY = ['plain', 'say "hi"', "it's", 'back\\slash', 'end\\', '\\"', "'\"", 'é☃𝄞 中文', 'two\nlines', 'tab\there',
         '" or id > 0 or "', "' or 1 == 1 or '", "x'); DROP TABLE items; --", 'tags["k"] == "v"', '%_*', '',
         ' lead', '\U0010ffff']
TAG_NAMES = ['camera', 'q"uote', "ap'os", 'br[ack]et', 'sp ace', 'bs\\', 'ünï']


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nasty_items() -> list[Item]:
    out = []
    for i, value in enumerate(NASTY * 3):
        tags = {name: NASTY[(i + j) % len(NASTY)] for j, name in enumerate(TAG_NAMES) if (i + j) % 4}
        out.append(Item(f"/data/set/{value.replace('/', '_')}/{i}.png", f"sha-{i}", None if i % 7 == 6 else value,
                        tags))
    return out


def test_literals_mean_exactly_their_text():
    """Each value, quoted, reads back as itself through milvus-lite's own tokenizer (the escapes Milvus reads)."""
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    for value in NASTY:
        tokens = [t for t in tokenize(f"label == {literal(value)}") if t.kind != TokenKind.EOF]
        assert [t.kind for t in tokens][-1] == TokenKind.STRING and tokens[-1].value == value, value
        assert len(tokens) == 3, f"{value!r} split the expression"


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    """The same nasty collection in a FAISS folder and in a Milvus collection."""
    tmp = tmp_path_factory.mktemp("nasty")
    items = nasty_items()
    x = vectors(len(items), 3)
    spec = shared_server().spec("nasty")
    made = [Index.create(s, x, items, artifact_sha256=SHA, extra={"images": ["/data/set"]})
            for s in (str(tmp / "faiss"), spec)]
    yield made, items
    for idx in made:
        idx.close()


def test_filters_with_hostile_values_select_what_faiss_selects(nasty):
    (faiss_idx, milvus_idx), items = nasty
    q = vectors(2, 4)
    conditions = []
    for value in NASTY:
        conditions += [f"label={value}", f"label!={value}", f"label^={value}", f"sha256={value}",
                       f"path^=/data/set/{value}", f"path=set/{value}/0.png"]
    for name in TAG_NAMES:
        conditions += [f"tag.{name}={v}" for v in NASTY[:8]] + [f"tag.{name}!={NASTY[1]}", f"tag.{name}^={NASTY[2]}",
                                                                f"tag.{name}<{NASTY[5]}"]
    checked = 0
    for where in conditions:
        try:
            expected = faiss_idx.search(q, len(items), where=[where])
        except UsageError:
            continue  # a condition the filter language itself refuses (e.g. an empty tag name)
        got = milvus_idx.search(q, len(items), where=[where])
        assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in expected], where
        checked += 1
    assert checked > 150
    for value in ('say "hi"', '" or id > 0 or "', "x'); DROP TABLE items; --"):
        expected = sorted(i + 1 for i, it in enumerate(items) if it.label == value)
        assert 0 < len(expected) < len(items)
        assert sorted(h.id for h in milvus_idx.search(q[:1], 100, where=[f"label={value}"])[0]) == expected


def test_migrate_there_and_back_loses_nothing(tmp_path):
    """FAISS folder -> embedded milvus-lite -> FAISS folder: counts, ids, rows, tags, dates, vectors, facts."""
    x, items = vectors(400, 5), nasty_items()[:40] * 10
    items = [Item(f"{it.path}.{i}", f"s{i}", it.label, it.tags) for i, it in enumerate(items)]
    first = Index.create(str(tmp_path / "a"), x, items, artifact_sha256=SHA, factory="HNSW32,Flat",
                         extra={"images": ["/data/set"], "artifact": "/models/a"})
    first.remove([2, 3, 50])  # gaps in the ids, tombstones in the graph
    first.add(vectors(2, 6), [Item("/new/a.png", "new-a", "dog", {"k": "v"}), Item("/new/b.png", "new-b")])
    first.close()
    there = migrate(tmp_path / "a", f"milvus:{tmp_path / 'm.db'}", progress=False)
    assert there["migrated"] == 399 and there["engine"] == "milvus" and there["index_type"] == "HNSW"
    back = migrate(f"milvus:{tmp_path / 'm.db'}", tmp_path / "b", progress=False)
    assert back["factory"] == "HNSW32,Flat"
    with Index.open(tmp_path / "a") as a, Index.open(tmp_path / "b") as b, \
            Index.open(f"milvus:{tmp_path / 'm.db'}") as m:
        ids = a.live_ids()
        for other in (m, b):
            assert other.count == a.count == 399 and np.array_equal(other.live_ids(), ids)
            ra, ro = a.rows(ids), other.rows(ids)
            assert all((ra[i].path, ra[i].label, ra[i].sha256, ra[i].added, ra[i].tags)
                       == (ro[i].path, ro[i].label, ro[i].sha256, ro[i].added, ro[i].tags) for i in ids)
            np.testing.assert_allclose(other.vectors(ids), a.vectors(ids), atol=1e-6)
            assert other.artifact_sha256 == SHA and other.manifest["images"] == ["/data/set"]
            assert other.manifest["artifact"] == "/models/a"
        q = vectors(3, 7)
        assert [[h.id for h in r] for r in m.search(q, 5, where=["label=dog"])] == \
            [[h.id for h in r] for r in a.search(q, 5, where=["label=dog"])]
        new = b.add(vectors(1, 8), [Item("/new/c.png", "new-c")])
        assert new.ids[0] > int(ids.max()), "ids are never reused after a migration"
    with pytest.raises(FileExistsError):
        migrate(tmp_path / "a", f"milvus:{tmp_path / 'm.db'}", progress=False)
    with pytest.raises(UsageError, match="milvus-lite has no IVF_PQ"):
        migrate(tmp_path / "a", f"milvus:{tmp_path / 'p.db'}", factory="IVF_PQ", progress=False)


def test_the_migrate_command_moves_a_folder_to_a_server(tmp_path):
    from tests.conftest import run_cli

    x = vectors(50, 9)
    x[1] = x[0] + 1e-3 * vectors(1, 10)[0]  # a near-copy of item 1
    Index.create(str(tmp_path / "a"), x, nasty_items()[:50], artifact_sha256=SHA).close()
    spec = shared_server().spec("cli")
    done = run_cli("index", "migrate", "--from", str(tmp_path / "a"), "--to", spec, "--json")
    answer = json.loads(done.stdout)
    assert answer["migrated"] == 50 and answer["count"] == 50 and answer["target"] == spec
    check = run_cli("index", "check", "--index", spec, check=False)
    assert check.returncode == 0 and "consistent" in check.stdout
    groups = json.loads(run_cli("index", "duplicates", "--index", spec, "--no-pixel-check", "--json").stdout)
    assert [[m["id"] for m in g] for g in groups["groups"]] == [[1, 2]]
    bad = run_cli("index", "info", "--index", "milvus://127.0.0.1:9/photos", check=False)
    assert bad.returncode == 1 and "cannot reach the Milvus server at http://127.0.0.1:9" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_concurrent_writers_never_share_an_id_or_a_generation():
    """Handles in threads (as servers would) claim id blocks and generations at once: each is handed out once."""
    spec = shared_server().spec("ids")
    Index.create(spec, vectors(5, 10), [Item(f"/x/{i}", f"x{i}") for i in range(5)], artifact_sha256=SHA).close()
    handles = [Index.open(spec) for _ in range(3)]
    for h in handles:
        h._ids = []  # noqa: SLF001 - each starts with no block, so all claim at once
    got: list[list[int]] = [[] for _ in handles]

    def claim(j: int) -> None:
        for _ in range(4):
            got[j] += handles[j]._allocate(600)  # noqa: SLF001 - the allocator alone, without the lock around adds

    threads = [threading.Thread(target=claim, args=(j,)) for j in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for g in got for i in g]
    assert len(every) == len(set(every)) == 3 * 4 * 600 and min(every) > 5 and max(every) < 2**53
    start = handles[0].generation
    generations: list[int] = []

    def commit(j: int) -> None:
        for _ in range(5):
            handles[j]._commit()  # noqa: SLF001 - the generation claim alone, as writes on three servers make it
            generations.append(handles[j].generation)

    threads = [threading.Thread(target=commit, args=(j,)) for j in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every write its own generation (a round where two claims see each other is skipped: gaps are allowed)
    assert len(set(generations)) == 15 and min(generations) > start
    for h in handles:
        h.close()


def test_damage_is_refused_and_repaired():
    from pymilvus import MilvusClient

    server = shared_server()
    spec = server.spec("damage")
    Index.create(spec, vectors(30, 11), [Item(f"/d/{i}", f"d{i}") for i in range(30)], artifact_sha256=SHA).close()
    collection = spec.rsplit("/", 1)[1]
    client = MilvusClient(f"http://127.0.0.1:{server.port}")
    client.drop_collection(collection + "_mae_ledger")
    with pytest.raises(IndexDamagedError, match="ledger"):
        Index.open(spec)
    report = Index.check(spec)
    assert not report["ok"] and any("ledger" in p for p in report["problems"])
    repaired = Index.repair(spec)
    assert repaired["ok"] and repaired["repaired"]
    with Index.open(spec) as idx:
        assert idx.count == 30 and idx.add(vectors(1, 12), [Item("/d/new", "dnew")]).ids[0] > 30
    client.alter_collection_properties(collection, properties={"mae.dim": "99"})
    with pytest.raises(IndexDamagedError, match="99-d"):
        Index.open(spec)
    client.close()


def test_names_and_errors_a_user_can_fix(tmp_path):
    from retrieval.milvus_store import MilvusUnavailableError, choose_index, parse_target

    assert parse_target("//db.example:19530/photos").uri == "http://db.example:19530"
    assert parse_target("//db.example/prod/photos").db_name == "prod"
    for bad in ("//host:19530/", "//host:1/9photos", "//host:1/a/b/c", "photos.sqlite", "//host:x/photos"):
        with pytest.raises(UsageError):
            parse_target(bad)
    with pytest.raises(MilvusUnavailableError, match="127.0.0.1:9"):
        Index.open("milvus://127.0.0.1:9/photos")
    with pytest.raises(FileNotFoundError, match="no index at"):
        Index.open(shared_server().spec("absent"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        Index.open(f"milvus:{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists(), "a mistyped name makes no empty index"
    with pytest.raises(UsageError, match="milvus-lite has no IVF_PQ"):  # a milvus-lite server process too
        Index.create(shared_server().spec("pq"), vectors(10, 1), [Item(f"/q/{i}", f"q{i}") for i in range(10)],
                     artifact_sha256=SHA, factory="IVF_PQ")
    with pytest.raises(UserError):
        choose_index("IVF9,Flat,PQ", 100, DIM)
    assert choose_index("auto", 10_000, 256).index_type == "FLAT"
    assert choose_index("auto", 200_000, 256).index_type == "HNSW"
    assert choose_index("auto", 200_000, 256, max_memory=2**20 * 100).index_type == "IVF_PQ"
    assert choose_index("OPQ64_256,IVF4096_HNSW32,PQ64np", 10**6, 256).params == {"nlist": 4096, "m": 64, "nbits": 8}


@pytest.mark.skipif(not os.environ.get("MAE_MILVUS_URI"), reason="MAE_MILVUS_URI names no Milvus server")
def test_a_real_server_builds_pq_and_hnsw(tmp_path):
    """What milvus-lite cannot stand in for: IVF_PQ, and HNSW on a real server's segments."""
    x = vectors(3000, 13)
    items = [Item(f"/r/{i}.png", f"r{i}", ["a", "b"][i % 2]) for i in range(3000)]
    for factory in ("IVF_PQ", "HNSW"):
        spec = real_spec(tmp_path)
        with Index.create(spec, x, items, artifact_sha256=SHA, factory=factory) as idx:
            assert idx.manifest["index_type"] == factory and Index.check(spec)["ok"]
            hits = idx.search(x[:5], 10, where=["label=a"])
            assert all(len(row) == 10 and all(h.label == "a" for h in row) for row in hits)


# ----------------------------------------------------------------------------------------------- many servers


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_two_servers_answer_from_one_collection(tmp_path):
    """Two real ``mae serve`` processes on one milvus-lite server process: an item added through one is found
    through the other on its next request, and deleted through the other it is gone from the first."""
    from retrieval.build import build_index
    from tests.serving_support import Server, multipart, request, tiny_artifact

    artifact = tiny_artifact(tmp_path / "artifact")
    for i in range(12):
        folder = tmp_path / "images" / ["a", "b"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png(i))
    spec = shared_server().spec("serve")
    build_index(artifact, [tmp_path / "images"], spec, workers=0, progress=False)
    write_key = "write-key-1f0e9d8c7b6a5948"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"write {write_key} test\n")
    env = {"MAE_MILVUS_UPLOADS": str(tmp_path / "uploads")}  # one folder both mount, as hosts would share one
    servers = [Server(artifact, spec, tmp_path / f"{name}.log", ["--api-keys", str(keys)], env=env)
               for name in ("a", "b")]
    auth = {"Authorization": f"Bearer {write_key}"}

    def call(server: Server, path: str, body: bytes | None = None, ctype: str | None = None,
             method: str | None = None) -> tuple[int, dict]:
        status, raw = request(server.url + path, body, ctype, method, headers=auth)
        return status, json.loads(raw)

    try:
        for s in servers:
            s.wait_ready()
        a, b = servers
        body, ctype = multipart([("images", "new.png", png(99), "image/png")], {"label": "fresh"})
        status, added = call(a, "/items", body, ctype)
        assert status == 200, added
        new = added["added"][0]["id"]
        status, item = call(b, f"/items/{new}")
        assert status == 200 and item["label"] == "fresh" and item["path"].endswith("new.png")
        body, ctype = multipart([("images", "q.png", png(99), "image/png")], {"k": "1"})
        status, found = call(b, "/search", body, ctype)
        assert status == 200 and found["neighbours"][0][0]["id"] == new, found
        status, thumbnail = request(b.url + f"/items/{new}/thumbnail", headers=auth)
        assert status == 200 and thumbnail[:4] == b"\x89PNG", "the file a stored is read by b"
        status, gone = call(b, f"/items/{new}", method="DELETE")
        assert status == 200 and gone["removed"] == [new]
        assert call(a, f"/items/{new}")[0] == 404
        status, found = call(a, "/search", body, ctype)
        assert status == 200 and found["neighbours"][0][0]["id"] != new
        infos = [call(s, "/info")[1]["index"] for s in servers]
        assert infos[0]["count"] == infos[1]["count"] == 12
    finally:  # side by side: each waits seconds for its workers to finish
        stopping = [threading.Thread(target=s.stop) for s in servers]
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()
