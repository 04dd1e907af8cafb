"""Retrieval: recall against exact search, changes and their durability, the image pipeline and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

faiss = pytest.importorskip("faiss")

from faiss.contrib.evaluation import knn_intersection_measure  # noqa: E402

from retrieval import tuning as tuning_lib  # noqa: E402
from retrieval.catalog import Item  # noqa: E402
from retrieval.faiss_vectors import selector_params  # noqa: E402
from retrieval.index import Index, IndexMismatchError, build  # noqa: E402
from retrieval.tuning import choose_factory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 64
RNG_W = np.random.default_rng(1).standard_normal((8, 64))


def lowrank(n: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """An 8-d latent through a fixed 8 x 64 map plus noise: structure like real embeddings, unlike i.i.d. data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ RNG_W + noise * rng.standard_normal((n, 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def items_for(n: int, prefix: str = "/images/") -> list[Item]:
    return [Item(f"{prefix}{i:05d}.png", f"sha-{prefix}-{i}", str(i % 3)) for i in range(n)]


def assert_consistent(path: Path) -> Index:
    """The committed generation's index and catalogue describe the same live items."""
    idx = Index.load(path)
    live = set(idx.catalog.live_ids(idx.generation).tolist())
    assert idx.count == len(live) == idx.manifest["count"]
    assert idx.ntotal == idx.manifest["ntotal"] and idx.store.base_ntotal == idx.manifest["base_ntotal"]
    held = faiss_ids(idx.index) | set(idx.store.delta_ids.tolist())
    assert held - set(idx.store.dead.tolist()) == live
    return idx


def faiss_ids(index) -> set[int]:
    """Every id stored in a FAISS index (IDMap's table, or the IVF lists)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return set(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())
    lists = ivf.invlists
    return {int(i) for lst in range(ivf.nlist)
            for i in faiss.rev_swig_ptr(lists.get_ids(lst), lists.list_size(lst))}


# ----------------------------------------------------------------------------------------------- factories


def test_choose_factory_thresholds():
    assert choose_factory(1_000, 256).factory == "Flat"
    assert choose_factory(100_000, 256, max_memory=8 << 30).factory == "HNSW32,Flat"
    assert choose_factory(1_000_000, 256, max_memory=8 << 30).factory == "HNSW32,Flat"
    assert choose_factory(1_000_000, 256, max_memory=8 << 30, gpu=True).factory == "IVF4096_HNSW32,Flat"
    assert choose_factory(1_000_000, 256, max_memory=1200 << 20).factory == "IVF4096_HNSW32,Flat", "graph too big"
    big = choose_factory(8_000_000, 256, max_memory=16 << 30)  # nlist ~ 4 sqrt(n) = 11314 -> 8192
    assert big.factory == "IVF8192_HNSW32,Flat" and big.train_size == 50 * 8192
    assert choose_factory(2_000_000, 256, max_memory=256 << 20).factory == "OPQ64_256,IVF4096_HNSW32,PQ64np"
    assert choose_factory(4_000_000, 256, max_memory=256 << 20).factory == "OPQ32_256,IVF8192_HNSW32,PQ32np"
    assert choose_factory(5_000, 64, on_disk=True).factory.startswith("IVF")
    assert tuning_lib.nlist_for(100) * tuning_lib.MIN_PER_LIST <= 100
    with pytest.raises(ValueError, match="do not fit"):
        choose_factory(10**9, 256, max_memory=1 << 20)


@pytest.mark.parametrize("factory, min_recall", [
    ("Flat", 1.0),
    ("HNSW32,Flat", 0.95),
    ("IVF64_HNSW32,Flat", 0.93),  # tuned to 0.95 on held-out database vectors; fresh queries land close
    ("IVF64_HNSW32,PQ16x4np", 0.45),  # 8 bytes for 64 dims: PQ, not the IVF, bounds recall
])
def test_recall_against_exact(tmp_path, factory, min_recall):
    """Recall@10 of fresh queries against exact search (IndexFlatIP), as faiss's own tests measure it."""
    x, q = lowrank(5000, 0), lowrank(200, 1)
    exact = faiss.IndexFlatIP(64)
    exact.add(x)
    _, gt = exact.search(q, 10)
    idx = build(tmp_path / "i", x, items_for(len(x)), artifact_sha256=SHA, factory=factory)
    _, ids = idx.search_ids(q, 10)
    recall = knn_intersection_measure(ids - 1, gt)  # catalogue ids start at 1
    assert recall >= min_recall
    tuning = idx.manifest["tuning"]
    if factory.startswith(("HNSW", "IVF64_HNSW32,Flat")):
        assert tuning["target_met"] and tuning["recall@10"] >= 0.95
        assert idx.manifest["search_params"] == tuning["params"]
    if "PQ" in factory:  # out of reach: said so, and the cheapest nprobe on the recall plateau is used
        best = max(c["recall@10"] for c in tuning["curve"])
        assert tuning["target_met"] is False and best - tuning_lib.PLATEAU <= tuning["recall@10"] < 0.95
        assert tuning["params"]["nprobe"] == next(c["nprobe"] for c in tuning["curve"]
                                                  if c["recall@10"] >= best - tuning_lib.PLATEAU)
    # what was tuned is what a reload searches with
    again = Index.load(tmp_path / "i")
    np.testing.assert_array_equal(again.search_ids(q, 10)[1], ids)


def test_filtered_search_through_opq_and_idmap_wrappers():
    """Tombstone filtering inside the search keeps the tuned nprobe / efSearch under every wrapper."""
    x = lowrank(1000, 18)
    ids = np.arange(1, 1001, dtype=np.int64)
    dead = np.arange(1, 1001, 2, dtype=np.int64)  # every other id
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead))
    for factory, params in [("OPQ8_64,IVF16_HNSW32,PQ8x4np", {"nprobe": 16}), ("IDMap2,HNSW16,Flat", {"efSearch": 64}),
                            ("IDMap2,Flat", {})]:
        index = tuning_lib.make_index(factory, 64)
        tuning_lib.train(index, x)
        index.add_with_ids(x, ids)
        tuning_lib.apply_params(index, {k: 1 for k in params})  # the selector path must not fall back to these
        p, _keep = selector_params(index, params, sel)
        _, found = index.search(x[:20], 5, params=p)
        assert not np.isin(found, dead).any() and (found > 0).all()
        exact = faiss.IndexFlatIP(64)
        exact.add(x[1::2])
        _, gt = exact.search(x[:20], 5)
        assert knn_intersection_measure(found, 2 * gt + 2) >= (0.99 if "PQ" not in factory else 0.5)


# ----------------------------------------------------------------------------------------------- changes


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat"])
def test_add_remove_save_load_round_trip(tmp_path, factory):
    x = lowrank(600, 2)
    idx = build(tmp_path / "i", x[:500], items_for(500), artifact_sha256=SHA, factory=factory)
    added = idx.add(x[500:], items_for(100, "/more/"))
    assert len(added.ids) == 100 and not added.duplicates and idx.count == 600
    first_new = added.ids[0]
    removed = idx.remove([1, "/images/00001.png", first_new, 999_999, "/not/indexed.png"])
    assert removed.ids == [1, 2, first_new]
    assert removed.missing == ["999999", str(Path("/not/indexed.png").resolve())]
    assert idx.count == 597

    again = assert_consistent(tmp_path / "i")
    assert again.generation == 3 and again.count == 597
    assert again.manifest["tombstones"] == 3 and again.manifest["log_vectors"] == 100, "writes went to the log"
    assert again.manifest["base_ntotal"] == 500 and again.manifest["base_generation"] == 1
    logged = [h.id for h in again.search(x[:40], 5)[0]]
    report = Index.load(tmp_path / "i").compact()  # the log folded into index.faiss; removed vectors dropped
    assert report["compacted"] and report["folded_vectors"] == 100 and report["folded_removals"] == 3
    compacted = assert_consistent(tmp_path / "i")
    assert compacted.manifest["log"] == [] and compacted.manifest["base_generation"] == 3
    assert compacted.manifest["tombstones"] == (3 if factory.startswith("HNSW") else 0)
    assert again.reload() and again.generation == compacted.generation == 4
    for view in (again, compacted):  # a reader that kept its base and log, and one that read the new base
        hits = view.search(x[:3], 5)
        returned = {h.id for row in hits for h in row}
        assert not returned & {1, 2, first_new}, "removed items are never returned"
        assert hits[2][0].id == 3 and hits[2][0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[2][0].path == "/images/00002.png" and hits[2][0].label == "2"
        new_hit = view.search(x[501:502], 1)[0][0]
        assert (new_hit.id, new_hit.path) == (added.ids[1], "/more/00001.png")
        assert view.item(3) == dataclasses.replace(hits[2][0], score=1.0)
        assert view.item(1) is None
        if factory == "Flat":
            assert [h.id for h in view.search(x[:40], 5)[0]] == logged


def test_hnsw_rebuilds_when_tombstones_pile_up(tmp_path):
    x = lowrank(300, 3)
    idx = build(tmp_path / "i", x, items_for(300), artifact_sha256=SHA, factory="HNSW16,Flat")
    assert not idx.remove(range(1, 40)).rebuilt  # 39 tombstones: under 20% of 300
    assert idx.manifest["tombstones"] == 39
    result = idx.remove(range(40, 80))
    assert result.rebuilt
    again = assert_consistent(tmp_path / "i")
    assert again.index.ntotal == again.count == 221 and again.manifest["tombstones"] == 0
    assert again.catalog.tombstones(again.generation, again.manifest["compacted"]).size == 0
    assert again.search(x[100:101], 1)[0][0].id == 101


def test_duplicate_add_skipped(tmp_path):
    x = lowrank(20, 4)
    items = items_for(20)
    idx = build(tmp_path / "i", x[:10], items[:10], artifact_sha256=SHA)
    result = idx.add(x[5:], items[5:] + [])
    assert result.duplicates == [it.path for it in items[5:10]]
    assert len(result.ids) == 10 and idx.count == 20
    same_bytes_twice = idx.add(x[:2], [Item("/a.png", "new"), Item("/b.png", "new")])
    assert len(same_bytes_twice.ids) == 1 and same_bytes_twice.duplicates == ["/b.png"]
    nothing = idx.add(x[:1], items[:1])
    assert nothing.ids == [] and idx.generation == 3, "a write that adds nothing commits no generation"


def test_mismatch_refused(tmp_path):
    build(tmp_path / "i", lowrank(5, 5), items_for(5), artifact_sha256=SHA)
    other = "b" * 64
    with pytest.raises(IndexMismatchError) as e:
        Index.load(tmp_path / "i", artifact_sha256=other)
    assert SHA in str(e.value) and other in str(e.value)
    assert Index.load(tmp_path / "i", artifact_sha256=SHA).count == 5


def test_search_of_an_empty_index(tmp_path):
    idx = build(tmp_path / "empty", np.zeros((0, 64), np.float32), [], artifact_sha256=SHA)
    assert idx.count == 0 and idx.search(lowrank(2, 6), 5) == [[], []]
    scores, ids = idx.search_ids(lowrank(1, 6), 3)
    assert (ids == -1).all() and ids.shape == (1, 1), "k is capped at the size of the index (at least 1)"
    hnsw = build(tmp_path / "h", lowrank(10, 7), items_for(10), artifact_sha256=SHA, factory="HNSW16,Flat")
    hnsw.remove(range(1, 11))
    assert Index.load(tmp_path / "h").search(lowrank(1, 8), 5) == [[]]
    assert len(hnsw.search(lowrank(1, 8), 50)[0]) == 0


def test_search_validates_queries_and_k(tmp_path):
    idx = build(tmp_path / "i", lowrank(30, 9), items_for(30), artifact_sha256=SHA)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        idx.search(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="finite"):
        idx.search(np.full((1, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="k must be"):
        idx.search(lowrank(1, 1), 0)
    assert len(idx.search(lowrank(1, 1), 100)[0]) == 30, "k beyond the collection returns all of it"
    assert len(idx.search(lowrank(1, 1)[0] * 7.0, 3)[0]) == 3, "one unnormalised vector is a query too"


def test_mmap_load_is_read_only(tmp_path):
    x = lowrank(200, 10)
    build(tmp_path / "i", x, items_for(200), artifact_sha256=SHA, factory="IVF8,Flat")
    mapped = Index.load(tmp_path / "i", mmap=True)
    np.testing.assert_array_equal(mapped.search_ids(x[:5], 5)[1], Index.load(tmp_path / "i").search_ids(x[:5], 5)[1])
    with pytest.raises(RuntimeError, match="memory-mapped"):
        mapped.add(x[:1], [Item("/x.png", "x")])


def test_build_refuses_existing_index_and_bad_factory(tmp_path):
    build(tmp_path / "i", lowrank(5, 11), items_for(5), artifact_sha256=SHA)
    with pytest.raises(FileExistsError, match="already holds an index"):
        build(tmp_path / "i", lowrank(5, 11), items_for(5), artifact_sha256=SHA)
    assert build(tmp_path / "i", lowrank(7, 11), items_for(7), artifact_sha256=SHA, overwrite=True).count == 7
    with pytest.raises(ValueError, match="cannot build factory"):
        build(tmp_path / "j", lowrank(5, 11), items_for(5), artifact_sha256=SHA, factory="Bogus7")
    with pytest.raises(ValueError, match="cannot train 64 IVF lists"):
        build(tmp_path / "k", lowrank(20, 11), items_for(20), artifact_sha256=SHA, factory="IVF64,Flat")
    assert not (tmp_path / "j").exists() and not (tmp_path / "k").exists()


# ----------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A depth-1 32 px encoder with random weights: real code paths, seconds to make."""
    import torch

    from mae import artifact as artifact_lib
    from mae.config import get_preset
    from mae.images import Preprocessing
    from mae.model import MaskedAutoencoder

    cfg = get_preset("mae_vit_tiny_patch4_32").override(["model.depth=1"])
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model)
    return artifact_lib.save(tmp_path_factory.mktemp("artifact"), model.state_dict(),
                             model_cfg=dataclasses.asdict(cfg.model), preprocessing=Preprocessing.from_config(cfg),
                             pooling="token")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight distinct bundled photographs as PNG files, plus a corrupt and a truncated one."""
    from mae.sources import export_source, load_source

    out = tmp_path_factory.mktemp("photos")
    export_source(load_source("photos"), out / "good", [0, 1, 2, 3, 4, 6, 7, 8])  # not 5: chelsea is cat
    (out / "bad").mkdir()
    (out / "bad" / "garbage.png").write_bytes(b"this is not a png")
    whole = sorted((out / "good").glob("*.png"))[0].read_bytes()
    (out / "bad" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return out


def test_corrupt_images_skipped_and_reported(tmp_path, artifact, photos):
    from retrieval.build import build_index

    summary = build_index(artifact, [photos], tmp_path / "i", workers=0, progress=False)
    assert summary["count"] == 8 and summary["images_seen"] == 10
    assert sorted(Path(s["path"]).name for s in summary["skipped"]) == ["garbage.png", "truncated.png"]
    assert "skipped 2 unreadable image(s)" in summary["text"]
    assert summary["labels"] == {"good": 8}, "first-level folders are the labels"
    idx = Index.load(tmp_path / "i", artifact_sha256=summary["artifact_sha256"])
    assert all(Path(h.path).is_absolute() and h.label == "good" for h in idx.search(np.ones((1, idx.dim)), 8)[0])


def test_cli_build_add_search_remove_info(tmp_path, artifact, photos, capsys):
    """The commands people type, on the photos, through the real argument parser."""
    from cli.main import main

    def run(*argv: str) -> dict:
        capsys.readouterr()
        assert main([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    good = sorted((photos / "good").glob("*.png"))
    out = tmp_path / "index"
    built = run("index", "build", "--artifact", str(artifact), "--images", *map(str, good[:5]), "--out", str(out))
    assert built["count"] == 5 and built["factory"] == "Flat"
    added = run("index", "add", "--index", str(out), str(photos / "good"), "--workers", "0")
    assert added["added"] == 3 and len(added["duplicates"]) == 5 and added["count"] == 8
    found = run("search", "--index", str(out), str(good[6]), "-k", "3", "--show", str(tmp_path / "sheet.png"))
    assert found["neighbours"][0]["file"] == str(good[6]) and found["neighbours"][0]["score"] > 0.999
    assert found["neighbours"][0]["path"] == f"good/{good[6].name}", "as answers show it: relative to the folders"
    assert [n["rank"] for n in found["neighbours"]] == [1, 2, 3]
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] > 4 * 128
    removed = run("index", "remove", "--index", str(out), str(good[6]))
    assert removed["count"] == 7 and len(removed["removed"]) == 1
    info = run("index", "info", "--index", str(out))
    assert info["count"] == 7 and info["generation"] == 3
    # a missing item is one line on stderr and exit 1
    assert main(["index", "remove", "--index", str(out), "/no/such.png"]) == 1
    assert "nothing removed" in capsys.readouterr().err
    bundled = ["index", "build", "--artifact", str(artifact), "--images", "photos", "--out", str(tmp_path / "x")]
    assert main(bundled) == 1
    assert "mae data export" in capsys.readouterr().err


def test_cli_filters_more_like_this_metadata_and_duplicates(tmp_path, artifact, photos, capsys):
    """--metadata at build, --where / --min-score / --id at search, and mae index duplicates, as typed."""
    from cli.main import main

    def run(*argv: str) -> dict:
        capsys.readouterr()
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    good = sorted((photos / "good").glob("*.png"))
    copy = tmp_path / "copies" / "copy.png"  # a re-encoded, slightly shrunk copy of one photo
    copy.parent.mkdir()
    from PIL import Image

    im = Image.open(good[2])
    im.resize((im.width * 9 // 10, im.height * 9 // 10)).save(copy)
    sidecar = tmp_path / "items.csv"
    sidecar.write_text("path,label,camera\n" + "".join(f"good/{p.name},,{'X100' if i < 3 else 'GR'}\n"
                                                         for i, p in enumerate(good)))
    out = tmp_path / "index"
    built = run("index", "build", "--artifact", str(artifact), "--images", str(photos / "good"), str(copy.parent),
                "--out", str(out), "--metadata", str(sidecar), "--workers", "0")
    assert built["count"] == 9 and built["metadata_items"] == 8 and built["tags"] == {"camera": 8}
    found = run("search", "--index", str(out), str(good[5]), "--where", "tag.camera=X100", "-k", "5")
    assert [n["path"] for n in found["neighbours"]] and len(found["neighbours"]) == 3
    assert all(n["tags"]["camera"] == "X100" for n in found["neighbours"])
    found = run("search", "--index", str(out), str(good[5]), "--where", "path^=copies/")
    assert [n["path"] for n in found["neighbours"]] == ["copies/copy.png"]
    cut = run("search", "--index", str(out), str(good[5]), "--min-score", "0.999")
    assert [n["file"] for n in cut["neighbours"]] == [str(good[5])]
    similar = run("search", "--index", str(out), "--id", "3", "-k", "4")
    assert len(similar["neighbours"]) == 4 and 3 not in [n["id"] for n in similar["neighbours"]]
    assert similar["query"] == str(good[2])
    near = run("search", "--index", str(out), str(good[2]), "-k", "3")["neighbours"]  # itself, its copy, the next
    assert {n["file"] for n in near[:2]} == {str(good[2]), str(copy)}, "a resized copy is next to its original"
    threshold = (near[1]["score"] + near[2]["score"]) / 2
    twins = run("index", "duplicates", "--index", str(out), "--threshold", str(threshold), "--show",
                str(tmp_path / "d.png"))
    assert [sorted(m["file"] for m in g) for g in twins["groups"]] == [sorted([str(good[2]), str(copy)])]
    assert (tmp_path / "d.png").stat().st_size > 1000
    # Every pair a candidate: the pixel check alone tells the copy from the other photographs; without it, the
    # cosine at -1 joins everything.
    pixels = run("index", "duplicates", "--index", str(out), "--threshold", "-1")
    assert [sorted(m["file"] for m in g) for g in pixels["groups"]] == [sorted([str(good[2]), str(copy)])]
    assert pixels["pixel_check"]["pairs_checked"] == 36 and pixels["pixel_check"]["pairs_kept"] == 1
    assert [len(g) for g in run("index", "duplicates", "--index", str(out), "--threshold", "-1",
                                "--no-pixel-check")["groups"]] == [9]
    assert main(["index", "duplicates", "--index", str(out), "--no-pixel-check", "--pixel-threshold", "0.9"]) == 1
    assert "--no-pixel-check" in capsys.readouterr().err
    good[7].rename(good[7].with_suffix(".moved"))  # a file gone since indexing: not grouped, and said so
    try:
        gone = run("index", "duplicates", "--index", str(out), "--threshold", "-1")
    finally:
        good[7].with_suffix(".moved").rename(good[7])
    assert len(gone["groups"]) == 1 and list(gone["pixel_check"]["unreadable"]) == ["8"]
    assert gone["pixel_check"]["pairs_checked"] == 28
    assert run("index", "check", "--index", str(out))["ok"]
    assert main(["search", "--index", str(out), str(good[0]), "--id", "2"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["search", "--index", str(out), str(good[0]), "--where", "colour=red"]) == 1
    assert "FIELD OP VALUE" in capsys.readouterr().err


def test_search_with_another_artifact_is_refused(tmp_path, artifact, photos, tmp_path_factory):
    import torch

    from mae import artifact as artifact_lib
    from retrieval.build import build_index, load_embedder

    build_index(artifact, [photos / "good"], tmp_path / "i", workers=0, progress=False)
    other = artifact_lib.load(artifact)
    state = {k: v + 0.01 for k, v in other.encoder.vit.state_dict().items()}
    cfg = artifact_lib.read_config(artifact)
    changed = artifact_lib.save(tmp_path_factory.mktemp("other"), {k: torch.as_tensor(v) for k, v in state.items()},
                                model_cfg=cfg["model"], preprocessing=other.preprocessing, pooling="token")
    idx = Index.load(tmp_path / "i")
    with pytest.raises(IndexMismatchError) as e:
        load_embedder(idx, changed)
    assert cfg["sha256"] in str(e.value) and artifact_lib.read_config(changed)["sha256"] in str(e.value)


def test_sharded_on_disk_build_add_remove(tmp_path, artifact):
    """Two worker processes fill shards of one trained IVF, merged into memory-mapped on-disk lists."""
    from mae.sources import export_source, load_source
    from retrieval.build import add_images, build_index

    source = load_source("digits")
    export_source(source, tmp_path / "digits", range(0, 400))
    export_source(source, tmp_path / "more", range(400, 420))
    summary = build_index(artifact, [tmp_path / "digits"], tmp_path / "i", shards=2, workers=0, progress=False)
    assert summary["on_disk"] and summary["factory"].startswith("IVF") and summary["shards"] == 2
    assert summary["count"] + len(summary["duplicates"]) == 400
    idx = Index.load(tmp_path / "i")
    assert idx.manifest["ivfdata"] == "lists.1.ivfdata" and not idx.removable
    first = idx.search_ids(np.ones((1, idx.dim), np.float32), 5)[1]
    added = add_images(tmp_path / "i", [tmp_path / "more"], workers=0, progress=False)
    assert added["count"] == summary["count"] + added["added"] and added["added"] > 0
    idx = Index.load(tmp_path / "i")
    assert idx.manifest["ivfdata"] == "lists.1.ivfdata" and idx.manifest["log_vectors"] == added["added"]
    victim = int(first[0, 0])
    idx.remove([victim])
    again = assert_consistent(tmp_path / "i")
    assert again.manifest["tombstones"] == 1
    assert victim not in again.search_ids(np.ones((1, idx.dim), np.float32), 5)[1]
    new = added["ids"][0]
    assert again.search(again.vectors([new]), 1)[0][0].id == new, "an added item answers from the log"
    report = again.compact()  # the mapped lists and the log merge into a new lists file
    assert report["compacted"] and again.manifest["ivfdata"] == f"lists.{report['generation'] - 1}.ivfdata"
    assert not (tmp_path / "i" / "lists.1.ivfdata").exists() and again.manifest["tombstones"] == 1
    compacted = assert_consistent(tmp_path / "i")
    assert compacted.manifest["log"] == [] and compacted.search(compacted.vectors([new]), 1)[0][0].id == new
    assert victim not in compacted.search_ids(np.ones((1, idx.dim), np.float32), 5)[1]


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(tuning_lib.gpu_count() == 0, reason="needs faiss-gpu and a CUDA GPU")
def test_gpu_training_and_search_match_cpu(tmp_path):
    x, q = lowrank(20_000, 16), lowrank(100, 17)
    idx = build(tmp_path / "i", x, items_for(len(x)), artifact_sha256=SHA, factory="IVF256,Flat", gpu=True)
    assert idx.device.startswith("gpu")
    cpu = Index.load(tmp_path / "i", gpu=False)
    gpu_ids, cpu_ids = idx.search_ids(q, 10)[1], cpu.search_ids(q, 10)[1]
    assert knn_intersection_measure(gpu_ids, cpu_ids) > 0.99
    idx.remove([1, 2, 3])
    assert not {1, 2, 3} & set(idx.search_ids(x[:3], 10)[1].ravel().tolist())


def test_added_files_keep_the_class_folder_of_the_collection(tmp_path):
    from retrieval.build import collection_label

    root = tmp_path / "collection"
    assert collection_label(root / "7" / "a.png", [str(root)]) == "7"
    assert collection_label(root / "a.png", [str(root)]) is None
    assert collection_label(tmp_path / "elsewhere" / "7" / "a.png", [str(root)]) is None
