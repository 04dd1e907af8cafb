"""The index contract (``retrieval.engine.Index``), run against every engine: what the CLI and HTTP layers rely on.

``ENGINE_SPECS`` names how each engine's index is spelled in a temporary folder; an engine joins the suite by
adding a line there (and a skip when its package is missing). Everything here goes through ``Index``'s public
methods only, so a test that passes for one engine and fails for another is a difference users would see.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

pytest.importorskip("faiss")

from mae.errors import UsageError, UserError  # noqa: E402
from retrieval.catalog import Item  # noqa: E402
from retrieval.index import Index, IndexMismatchError, accepted_forms, parse_spec  # noqa: E402
from retrieval.metadata import UNSET  # noqa: E402
from tests.milvus_support import lite_spec, real_spec  # noqa: E402

SHA = "c" * 64
DIM = 32
N = 240
RNG_W = np.random.default_rng(7).standard_normal((6, DIM))

# engine -> how its index is named inside a temporary folder (a spec function may skip: its package is missing)
ENGINE_SPECS = {
    "faiss": lambda tmp: str(tmp / "index"),
    "milvus": lite_spec,  # a collection on the session's milvus-lite server process
    "milvus-server": real_spec,  # a collection on the Milvus server MAE_MILVUS_URI names (skipped without)
}


def vectors(n: int, seed: int) -> np.ndarray:
    """Low-rank unit vectors (structure like real embeddings)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) @ RNG_W + 0.4 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def catalogued(n: int = N, root: str = "/data/photos") -> list[Item]:
    return [Item(f"{root}/{2023 + i % 2}/{['cats', 'dogs', 'birds'][i % 3]}/{i:04d}.png", f"sha-{i}",
                 None if i % 10 == 9 else ["cat", "dog", "bird"][i % 3],
                 {"camera": ["X100", "GR"][i % 2], "bucket": f"{i % 50:02d}"}) for i in range(n)]


def make(engine: str, tmp) -> tuple[str, np.ndarray, list[Item]]:
    spec = ENGINE_SPECS[engine](tmp)
    x, items = vectors(N, 1), catalogued()
    Index.create(spec, x, items, artifact_sha256=SHA, extra={"images": ["/data/photos"]}).close()
    return spec, x, items


@pytest.fixture(params=sorted(ENGINE_SPECS))
def made(request, tmp_path):
    """(spec, vectors, items) of a fresh index of each engine, built through ``Index.create``."""
    return make(request.param, tmp_path)


@pytest.fixture(scope="module", params=sorted(ENGINE_SPECS))
def searched(request, tmp_path_factory):
    """The same, built once per engine for the tests that only read it (a Milvus build costs half a second)."""
    return make(request.param, tmp_path_factory.mktemp(request.param))


def brute(items: list[Item], x: np.ndarray, q: np.ndarray, keep, k: int) -> list[list[int]]:
    """Exact filtered top-k ids (ids are positions + 1)."""
    chosen = np.array([i for i, it in enumerate(items) if keep(it, i + 1)], np.int64)
    if not len(chosen):
        return [[] for _ in q]
    scores = q @ x[chosen].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [(chosen[row] + 1).tolist() for row in order]


def test_names_and_the_engines_that_answer_them(tmp_path):
    assert parse_spec(str(tmp_path)).engine == "faiss" and parse_spec(tmp_path).target == str(tmp_path)
    assert parse_spec("faiss:" + str(tmp_path)).target == str(tmp_path)
    odd = tmp_path / "a:b"  # a folder that looks like a scheme is a folder
    odd.mkdir()
    assert parse_spec(str(odd)).engine == "faiss"
    with pytest.raises(UsageError, match="no index engine is called 'qdrant'") as e:
        Index.open("qdrant://localhost:6333/photos")
    assert accepted_forms() in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):
        parse_spec("")


def test_open_facts_and_artifact(made):
    spec, x, items = made
    idx = Index.open(spec, artifact_sha256=SHA)
    assert isinstance(idx, Index) and len(idx) == idx.count == N and idx.dim == DIM
    assert idx.artifact_sha256 == SHA and idx.generation >= 1 and idx.factory
    info = idx.info()
    for key in ("index", "engine", "count", "dim", "metric", "factory", "generation", "artifact_sha256", "artifact",
                "labels", "tags", "roots", "created", "updated"):
        assert key in info, key
    assert info["count"] == N and info["engine"] == parse_spec(spec).engine
    assert idx.labels()[""] == N // 10 and idx.tag_keys() == {"bucket": N, "camera": N}
    with pytest.raises(IndexMismatchError):
        Index.open(spec, artifact_sha256="d" * 64)
    with pytest.raises(IndexMismatchError):
        idx.check_artifact("d" * 64)
    assert Index.check(spec)["ok"]
    idx.close()


CONDITIONS = [
    ("label=cat", lambda it, i: it.label == "cat"),
    ("label!=cat", lambda it, i: it.label != "cat"),
    ("label=", lambda it, i: it.label is None),
    ("label^=b", lambda it, i: (it.label or "").startswith("b")),
    ("path^=/data/photos/2023/", lambda it, i: it.path.startswith("/data/photos/2023/")),
    ("path^=photos/2024/dogs/", lambda it, i: it.path.startswith("/data/photos/2024/dogs/")),
    ("path=photos/2023/cats/0000.png", lambda it, i: it.path == "/data/photos/2023/cats/0000.png"),
    ("path!=/data/photos/2023/cats/0000.png", lambda it, i: it.path != "/data/photos/2023/cats/0000.png"),
    ("id<=10", lambda it, i: i <= 10),
    ("id>200", lambda it, i: i > 200),
    ("id!=5", lambda it, i: i != 5),
    ("sha256=sha-7", lambda it, i: it.sha256 == "sha-7"),
    ("sha256!=sha-7", lambda it, i: it.sha256 != "sha-7"),
    ("tag.camera=X100", lambda it, i: it.tags["camera"] == "X100"),
    ("tag.camera!=X100", lambda it, i: it.tags["camera"] != "X100"),
    ("tag.bucket<05", lambda it, i: it.tags["bucket"] < "05"),
    ("tag.bucket>=45", lambda it, i: it.tags["bucket"] >= "45"),
    ("tag.camera^=G", lambda it, i: it.tags["camera"].startswith("G")),
    ("tag.nosuch=1", lambda it, i: False),
    ("tag.nosuch!=1", lambda it, i: True),
    ("added>=2000-01-01", lambda it, i: True),
    ("added<2000-01-01T00:00:00Z", lambda it, i: False),
]


@pytest.mark.parametrize("where, keep", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_every_operator_exactly_k_against_brute_force(searched, where, keep):
    spec, x, items = searched
    q = vectors(3, 2)
    with Index.open(spec) as idx:
        hits = idx.search(q, 10, where=[where])
    expected = brute(items, x, q, keep, 10)
    assert [[h.id for h in row] for row in hits] == expected, where


def test_added_today_as_a_date_and_a_time(searched):
    spec, x, items = searched
    now = datetime.now(timezone.utc)
    with Index.open(spec) as idx:
        q = vectors(1, 3)
        stamp = datetime.fromisoformat(idx.row(1).added)
        day = stamp.date()
        assert len(idx.search(q, 5, where=[f"added={day}"])[0]) == 5
        assert idx.search(q, 5, where=[f"added>{day}"])[0] == []
        assert len(idx.search(q, 5, where=[f"added<={day}"])[0]) == 5
        assert idx.search(q, 5, where=[f"added>{(now + timedelta(hours=1)).isoformat()}"])[0] == []


def test_min_score_k_capped_and_combined_filters(searched):
    spec, x, items = searched
    q = vectors(2, 4)
    with Index.open(spec) as idx:
        full = idx.search(q, 30)
        cut = full[0][12].score
        kept = idx.search(q[:1], 30, min_score=cut)[0]
        assert [h.id for h in kept] == [h.id for h in full[0] if h.score >= cut]
        scores, ids = idx.search_ids(q, 10**9)
        assert ids.shape == (2, N)
        both = idx.search(q, 50, where=["label=dog", "tag.camera=GR"])
    keep = lambda it, i: it.label == "dog" and it.tags["camera"] == "GR"  # noqa: E731
    assert [[h.id for h in row] for row in both] == brute(items, x, q, keep, 50)
    assert all(h.label == "dog" and h.tags["camera"] == "GR" for row in both for h in row)


def test_by_id_similar_vectors_and_rows(searched):
    spec, x, items = searched
    with Index.open(spec) as idx:
        np.testing.assert_allclose(idx.vectors([5, 9]), x[[4, 8]], atol=1e-5)
        similar = idx.similar(5, 8)
        assert len(similar) == 8 and 5 not in [h.id for h in similar]
        assert [h.id for h in similar] == [h.id for h in idx.search(x[4:5], 9)[0] if h.id != 5][:8]
        assert all(h.label == "cat" for h in idx.similar(5, 5, where=["label=cat"]))
        with pytest.raises(KeyError):
            idx.similar(10**6)
        assert idx.row(3).path == items[2].path and idx.item(3).score == 1.0 and idx.row(10**30) is None
        assert idx.ids_by_sha256(["sha-2", "nope"]) == {"sha-2": 3}
        assert idx.ids_by_path([items[2].path]) == {items[2].path: [3]}
        assert idx.live_ids().tolist() == list(range(1, N + 1))
        assert idx.relative(items[2].path) == items[2].path.removeprefix("/data/")


def test_add_remove_annotate_seen_by_another_handle(made):
    spec, x, items = made
    writer, reader = Index.open(spec), Index.open(spec)
    g = writer.generation
    new = vectors(4, 5)
    added = writer.add(new, [Item(f"/new/{i}.png", f"new-{i}", "new", {"src": "t"}) for i in range(3)]
                       + [Item("/new/again.png", "sha-0")])
    assert len(added.ids) == 3 and added.duplicates == ["/new/again.png"] and added.duplicate_ids == [1]
    assert writer.generation == g + 1 and writer.count == N + 3
    assert reader.reload() and reader.count == N + 3 and reader.generation == g + 1
    hit = reader.search(new[1:2], 1, where=["tag.src=t"])[0][0]
    assert hit.id == added.ids[1] and hit.score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(reader.vectors([added.ids[2]]), new[2:3], atol=1e-5)
    like = reader.similar(added.ids[2], 5)  # more like a new item, which it leaves out
    assert added.ids[2] not in [h.id for h in like]
    assert [h.id for h in like] == [h.id for h in reader.search(new[2:3], 6)[0] if h.id != added.ids[2]][:5]
    removed = writer.remove([added.ids[0], "photos/2023/cats/0000.png", 10**6])
    assert removed.ids == [1, added.ids[0]] and removed.missing == [str(10**6)]
    assert reader.reload() and reader.count == N + 1
    assert not {1, added.ids[0]} & {h.id for row in reader.search(vectors(5, 6), 50) for h in row}
    assert writer.annotate({items[2].path: ("renamed", {"trip": "oslo"}), items[3].path: (UNSET, {"x": "1"})}) == 2
    assert reader.reload() and reader.row(3).label == "renamed" and reader.row(3).tags["trip"] == "oslo"
    assert reader.row(4).label == items[3].label and reader.row(4).tags["x"] == "1"
    assert [h.id for h in reader.search(x[2:3], 3, where=["tag.trip=oslo"])[0]] == [3]
    assert not reader.reload(), "nothing new: nothing changes"
    assert writer.add(new[:1], [Item("/dup.png", "new-1")]).ids == [] and writer.generation == reader.generation
    assert Index.check(spec)["ok"]
    writer.close()
    reader.close()


def test_duplicates_group_near_copies(made):
    spec, x, items = made
    with Index.open(spec) as idx:
        copies = x[:3] + 0.01 * np.random.default_rng(8).standard_normal((3, DIM)).astype(np.float32)
        added = idx.add(copies, [Item(f"/copy/{i}.png", f"copy-{i}") for i in range(3)])
        groups = idx.duplicates(0.99)
    assert sorted(sorted(i for i, _ in g) for g in groups) == [[i + 1, a] for i, a in enumerate(added.ids)]


def test_wrong_queries_are_usage_errors(searched):
    spec, _, _ = searched
    with Index.open(spec) as idx:
        for call in (lambda: idx.search(np.zeros((1, DIM + 1), np.float32)),
                     lambda: idx.search(np.full((1, DIM), np.nan, np.float32)),
                     lambda: idx.search(vectors(1, 1), 0),
                     lambda: idx.search(vectors(1, 1), 5, min_score=float("inf")),
                     lambda: idx.search(vectors(1, 1), 5, where=["colour=red"])):
            with pytest.raises(UsageError):
                call()


def test_create_refuses_an_existing_index(made):
    spec, x, items = made
    with pytest.raises(FileExistsError):
        Index.create(spec, x, items, artifact_sha256=SHA)
    with Index.create(spec, x[:10], items[:10], artifact_sha256=SHA, overwrite=True) as again:
        assert again.count == 10
