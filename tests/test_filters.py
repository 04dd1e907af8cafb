"""Filtered search, min_score, "more like this" and near-duplicates on the index, against brute force."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

faiss = pytest.importorskip("faiss")

from retrieval import faiss_search  # noqa: E402
from retrieval.catalog import Item, parse_where  # noqa: E402
from retrieval.index import Index, build  # noqa: E402
from retrieval.metadata import read_sidecar  # noqa: E402
from tests.test_retrieval import lowrank  # noqa: E402

SHA = "a" * 64
N = 600


def catalogued(n: int = N, root: str = "/data/photos") -> list[Item]:
    """Items with labels, folders and tags that filters can pick apart."""
    out = []
    for i in range(n):
        tags = {"camera": ["X100", "GR", "Q2"][i % 3], "bucket": f"{i % 100:03d}"}
        if i % 5 == 0:
            tags["starred"] = "yes"
        out.append(Item(f"{root}/{2023 + i % 2}/{['cats', 'dogs', 'birds', 'fish'][i % 4]}/{i:04d}.png",
                        f"sha-{i}", None if i % 10 == 9 else ["cat", "dog", "bird", "fish"][i % 4], tags))
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    x = lowrank(N, 40)
    items = catalogued()
    folder = tmp_path_factory.mktemp("filters") / "i"
    build(folder, x, items, artifact_sha256=SHA, factory="Flat", extra={"images": ["/data/photos"]})
    return folder, x, items


def brute(items: list[Item], test) -> set[int]:
    return {i + 1 for i, it in enumerate(items) if test(it)}


# Dates are relative to the day the fixture's rows were stamped ({day}), read back from the catalogue: a
# run that collects before midnight UTC and builds after it must not see "yesterday".
CASES = [
    ("label=cat", lambda it: it.label == "cat"),
    ("label!=cat", lambda it: it.label != "cat"),
    ("label=", lambda it: it.label is None),
    ("label^=b", lambda it: (it.label or "").startswith("b")),
    ("path^=/data/photos/2023/", lambda it: it.path.startswith("/data/photos/2023/")),
    ("path^=photos/2024/dogs/", lambda it: it.path.startswith("/data/photos/2024/dogs/")),  # as answers show it
    ("path=photos/2023/cats/0000.png", lambda it: it.path == "/data/photos/2023/cats/0000.png"),
    ("path!=/data/photos/2023/cats/0000.png", lambda it: it.path != "/data/photos/2023/cats/0000.png"),
    ("added>={day}", lambda it: True),
    ("added={day}", lambda it: True),
    ("added<{day}", lambda it: False),
    ("added>{day_before}", lambda it: True),
    ("added<={day_before}", lambda it: False),
    ("added<2999-01-01T00:00:00Z", lambda it: True),
    ("tag.camera=X100", lambda it: it.tags["camera"] == "X100"),
    ("tag.camera!=X100", lambda it: it.tags["camera"] != "X100"),
    ("tag.camera^=G", lambda it: it.tags["camera"].startswith("G")),
    ("tag.bucket<010", lambda it: it.tags["bucket"] < "010"),
    ("tag.bucket>=095", lambda it: it.tags["bucket"] >= "095"),
    ("tag.starred=yes", lambda it: it.tags.get("starred") == "yes"),
    ("tag.starred!=yes", lambda it: it.tags.get("starred") != "yes"),
    ("tag.nosuch=1", lambda it: False),
    ("id<=10", lambda it: False),  # replaced below: ids are positions + 1
    ("sha256=sha-7", lambda it: it.sha256 == "sha-7"),
]


@pytest.mark.parametrize("where, test", CASES, ids=[c[0] for c in CASES])
def test_each_operator_selects_what_brute_force_selects(collection, where, test):
    folder, _, items = collection
    idx = Index.load(folder)
    if where == "id<=10":
        expected = set(range(1, 11))
    else:
        expected = brute(items, test)
    with sqlite3.connect(folder / "items.sqlite") as c:
        stamped = {datetime.fromisoformat(a.replace("Z", "+00:00")).astimezone(timezone.utc).date()
                   for (a,) in c.execute("SELECT DISTINCT added FROM items")}
    assert len(stamped) == 1, stamped  # one write, one stamp
    day = stamped.pop()
    where = where.format(day=day, day_before=day - timedelta(days=1))
    assert set(idx.selection([parse_where(where)]).ids.tolist()) == expected


def test_conditions_combine_and_bad_filters_say_how(collection):
    folder, _, items = collection
    idx = Index.load(folder)
    got = idx.selection([parse_where(w) for w in ("label=dog", "tag.camera=GR", "path^=photos/2023/")]).ids
    assert set(got.tolist()) == brute(items, lambda it: it.label == "dog" and it.tags["camera"] == "GR"
                                      and "/2023/" in it.path)
    for bad, words in [("colour=red", "FIELD OP VALUE"), ("label>cat", r"label takes = != \^="),
                       ("added>=yesterday", "ISO date"), ("id=abc", "whole number")]:
        with pytest.raises(ValueError, match=words):
            idx.search(lowrank(1, 1), 5, where=[bad])


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat"])
@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "selector"])
def test_filtered_search_is_exactly_k_and_matches_exact_filtered_search(tmp_path, monkeypatch, factory, approximate):
    """Whether scored exactly (few selected) or searched with an IDSelector (forced here), the answer holds k
    matching items, with recall@10 against exact filtered search."""
    if approximate:
        monkeypatch.setattr(faiss_search, "EXACT_MAX", 0)
        monkeypatch.setattr(faiss_search, "EXACT_FRACTION", 0.0)
    x, q = lowrank(3000, 41), lowrank(50, 42)
    items = [Item(f"/c/{i}.png", f"s{i}", None, {"bucket": f"{i % 100:02d}"}) for i in range(len(x))]
    idx = build(tmp_path / "i", x, items, artifact_sha256=SHA, factory=factory)
    for where, keep in [("tag.bucket<50", lambda i: i % 100 < 50), ("tag.bucket<10", lambda i: i % 100 < 10),
                        ("tag.bucket=07", lambda i: i % 100 == 7)]:
        chosen = np.array([i for i in range(len(x)) if keep(i)])
        exact = faiss.IndexFlatIP(64)
        exact.add(x[chosen])
        _, gt = exact.search(q, 10)
        gt = chosen[gt] + 1
        hits = idx.search(q, 10, where=[where])
        assert all(len(h) == 10 for h in hits), where
        assert all(keep(hit.id - 1) for h in hits for hit in h), f"{where}: an item outside the filter"
        got = np.array([[hit.id for hit in h] for h in hits])
        recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, gt)])
        assert recall >= (1.0 if factory == "Flat" or not approximate else 0.9), (where, recall)
        scores = [[hit.score for hit in h] for h in hits]
        assert all(s == sorted(s, reverse=True) for s in scores)


def test_fewer_matches_than_k_and_none_and_min_score(collection):
    folder, x, items = collection
    idx = Index.load(folder)
    assert [[h.id for h in row] for row in idx.search(x[:2], 10, where=["sha256=sha-7"])] == [[8], [8]]
    assert idx.search(x[:2], 10, where=["label=zebra"]) == [[], []]
    hits = idx.search(x[:1], 50)[0]
    cut = hits[20].score
    kept = idx.search(x[:1], 50, min_score=cut)[0]
    assert [h.id for h in kept] == [h.id for h in hits if h.score >= cut] and len(kept) >= 21
    assert idx.search(x[:1], 5, min_score=1.01)[0] == []
    with pytest.raises(ValueError, match="finite"):
        idx.search(x[:1], 5, min_score=float("nan"))


def test_k_is_capped_at_the_index_size(collection):
    folder, x, _ = collection
    idx = Index.load(folder)
    scores, ids = idx.search_ids(x[:1], 10**9)
    assert ids.shape == (1, N) and len(idx.search(x[:1], 10**9)[0]) == N


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat", "IVF16,PQ8x4np"])
def test_more_like_this_uses_the_stored_vector_and_leaves_the_item_out(tmp_path, factory):
    x = lowrank(1000, 43)
    items = [Item(f"/c/{i}.png", f"s{i}", str(i % 2)) for i in range(len(x))]
    idx = build(tmp_path / "i", x, items, artifact_sha256=SHA, factory=factory)
    stored = idx.vectors([5, 17])
    if "PQ" not in factory:  # uncompressed factories give back exactly what was added
        np.testing.assert_allclose(stored, x[[4, 16]], atol=1e-6)
    similar = idx.similar(5, 10)
    assert len(similar) == 10 and 5 not in [h.id for h in similar]
    expected = [h.id for h in idx.search(stored[:1], 11)[0] if h.id != 5][:10]
    assert [h.id for h in similar] == expected
    assert all(h.label == "0" for h in idx.similar(5, 10, where=["label=0"]))
    with pytest.raises(KeyError, match="no item 99999"):
        idx.similar(99999)
    removed = idx.remove([17])  # IVF's id hash table (built by vectors()) goes along with removal
    assert removed.ids == [17] and 17 not in [h.id for h in idx.similar(5, 50)]
    with pytest.raises(KeyError):
        idx.vectors([17])
    again = Index.load(tmp_path / "i")
    assert [h.id for h in again.similar(5, 10)] == [h.id for h in idx.similar(5, 10)]


def test_near_duplicates_are_grouped(tmp_path):
    rng = np.random.default_rng(44)
    base = lowrank(300, 45)
    copies = base[:20] + 0.02 * rng.standard_normal((20, 64)).astype(np.float32)  # 20 slightly edited copies
    triple = base[20:21] + 0.02 * rng.standard_normal((1, 64)).astype(np.float32)
    x = np.concatenate([base, copies, triple, triple * 1.0 + 0.001])
    items = [Item(f"/c/{i}.png", f"s{i}") for i in range(len(x))]
    idx = build(tmp_path / "i", x, items, artifact_sha256=SHA, factory="HNSW16,Flat")
    groups = idx.duplicates(0.97)
    as_sets = sorted(sorted(i for i, _ in g) for g in groups)
    expected = sorted([[j + 1, 300 + j + 1] for j in range(20)] + [[21, 321, 322]])
    assert as_sets == expected
    assert all(s >= 0.97 for g in groups for _, s in g)
    assert len(groups[0]) == 3, "largest group first"
    with pytest.raises(ValueError, match="threshold"):
        idx.duplicates(1.5)
    asked = []

    def check(pairs: np.ndarray) -> np.ndarray:  # a second opinion (the pixel check's place): odd ids only
        asked.extend(map(tuple, pairs.tolist()))
        return pairs[:, 0] % 2 == 1

    checked = idx.duplicates(0.97, check=check)
    assert sorted(asked) == sorted(set(asked)) and set(asked) == {(a, b) for g in expected for a in g for b in g
                                                                 if a < b}, "each candidate pair asked about once"
    assert sorted(sorted(i for i, _ in g) for g in checked) == [g for g in expected if g[0] % 2 == 1]


def test_answers_show_paths_relative_to_the_indexed_folders(collection):
    folder, _, _ = collection
    idx = Index.load(folder)
    assert idx.relative("/data/photos/2023/cats/0000.png") == "photos/2023/cats/0000.png"
    assert idx.relative(str(folder / "uploads" / "ab12-x.png")) == "uploads/ab12-x.png"
    assert idx.relative("/elsewhere/secret/x.png") == "x.png", "outside every root: the name only"


def test_remove_takes_paths_as_answers_show_them(tmp_path):
    x = lowrank(5, 48)
    idx = build(tmp_path / "i", x, [Item(f"/data/photos/{i}.png", f"s{i}") for i in range(5)], artifact_sha256=SHA,
                extra={"images": ["/data/photos"]})
    removed = idx.remove(["photos/2.png", "/data/photos/3.png", "photos/nope.png"])
    assert removed.ids == [3, 4] and len(removed.missing) == 1 and removed.missing[0].endswith("photos/nope.png")


def test_metadata_sidecar_and_annotate(tmp_path, collection):
    folder = tmp_path / "copy"
    shutil.copytree(collection[0], folder)
    sidecar = tmp_path / "items.jsonl"
    sidecar.write_text("\n".join(json.dumps(r) for r in [
        {"path": "photos/2023/cats/0000.png", "label": "kitten", "tags": {"trip": "rome"}},
        {"path": "/data/photos/2024/dogs/0001.png", "trip": "oslo", "rating": 5},
        {"path": "nowhere/x.png", "trip": "none"},
    ]) + "\n")
    parsed = read_sidecar(sidecar, ["/data/photos"])
    assert parsed.records == 3
    idx = Index.load(folder)
    generation = idx.generation
    assert idx.annotate(parsed.entries) == 2 and idx.generation == generation + 1
    assert idx.row(1).label == "kitten" and idx.row(1).tags["trip"] == "rome" and idx.row(1).tags["camera"] == "X100"
    assert idx.row(2).label == "dog" and idx.row(2).tags["rating"] == "5"
    assert set(idx.selection([parse_where("tag.trip=oslo")]).ids.tolist()) == {2}
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("path,label,trip\nphotos/2023/birds/0002.png,,lima\n")
    csv = read_sidecar(csv_file, ["/data/photos"])
    assert idx.annotate(csv.entries) == 1 and idx.row(3).label == "bird" and idx.row(3).tags["trip"] == "lima"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": "x"}\n')
    with pytest.raises(ValueError, match="line 1: every record needs a 'path'"):
        read_sidecar(bad, [])


def test_a_catalogue_from_before_tags_gains_them(tmp_path):
    """Indexes built by the previous release (no tags column or table) open, search, filter and take tags."""
    x = lowrank(20, 46)
    build(tmp_path / "i", x, [Item(f"/c/{i}.png", f"s{i}", "a") for i in range(20)], artifact_sha256=SHA)
    with sqlite3.connect(tmp_path / "i" / "items.sqlite") as c:
        c.executescript("DROP TABLE tags; CREATE TABLE old AS SELECT id, path, label, sha256, added, generation, "
                        "removed FROM items; DROP TABLE items; ALTER TABLE old RENAME TO items;")
    idx = Index.load(tmp_path / "i")
    assert len(idx.search(x[:1], 5, where=["label=a"])[0]) == 5
    added = idx.add(lowrank(1, 47), [Item("/c/new.png", "new", "b", {"k": "v"})])
    assert [h.id for h in idx.search(x[:1], 5, where=["tag.k=v"])[0]] == added.ids


def test_a_search_that_comes_back_short_is_redone_exactly(tmp_path, monkeypatch):
    """An IVF probing one list finds fewer than k: the missing neighbours come from exact scoring, also when k
    is larger than what the filter selects."""
    monkeypatch.setattr(faiss_search, "EXACT_MAX", 0)
    monkeypatch.setattr(faiss_search, "EXACT_FRACTION", 0.0)
    x = lowrank(400, 49)
    idx = build(tmp_path / "i", x, [Item(f"/c/{i}.png", f"s{i}", str(i % 2)) for i in range(400)],
                artifact_sha256=SHA, factory="IVF8,Flat")
    idx.manifest["search_params"] = {"nprobe": 1}
    filtered = idx.search(x[:3], 300, where=["label=0"])
    assert [len(h) for h in filtered] == [200, 200, 200] and all(hit.label == "0" for h in filtered for hit in h)
    assert [len(h) for h in idx.search(x[:3], 100)] == [100, 100, 100]
