"""WebDataset shards: mae data pack, the exact resumable stream, bad members, and the round trip through every stage."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae.shards import ShardSet, buffer_order, open_shards, stream_slot
from tests.conftest import run_cli, tiny_config, tiny_sets


def labelled_jpegs(root: Path, classes: int = 2, per_class: int = 20, size: tuple[int, int] = (40, 48)) -> Path:
    """Class folders of small JPEGs whose dominant colour is the class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, (*size, 3), dtype=np.uint8)
            arr[..., c % 3] = 230
            Image.fromarray(arr).save(root / f"c{c}" / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    folder = labelled_jpegs(root / "folder")
    run_cli("data", "pack", "--data", str(folder), "--out", str(root / "packed"), "--shard-size", "60KB")
    return folder, root / "packed"


def test_pack_keeps_bytes_labels_and_the_split(packed):
    from mae.sources import load_source, split_data, stratified_split

    folder, out = packed
    index = json.loads((out / "index.json").read_text())
    source = load_source(folder)
    train, val = stratified_split(source.labels, 0.2, 0)
    assert index["classes"] == source.classes == ["c0", "c1"]
    assert sum(e["count"] for e in index["splits"]["train"]) == len(train) == 32
    assert sum(e["count"] for e in index["splits"]["val"]) == len(val) == 8
    assert len(index["splits"]["train"]) >= 3  # 60 KB shards: several of them
    with tarfile.open(out / index["splits"]["train"][0]["name"]) as tar:
        names = tar.getnames()
        first = tar.extractfile(names[0]).read()
        label = int(tar.extractfile(next(n for n in names if n.endswith(".cls"))).read())
    key = int(names[0].split(".")[0])
    assert first == Path(source.items[key]).read_bytes()  # the file's own bytes, not re-encoded
    assert label == source.labels[key]
    shards = open_shards(out)
    assert shards.train.total == 32 and shards.val.total == 8 and shards.classes == ["c0", "c1"]
    split = split_data(out)  # the split every stage reads from --data: the packed one
    assert split.sharded and split.train.total == 32 and split.val_size == 8 and split.labelled
    pattern = f"{out}/train-{{000000..{len(index['splits']['train']) - 1:06d}}}.tar"
    by_pattern = open_shards(pattern)
    assert by_pattern.train.total == 32 and by_pattern.val.total == 8  # the val shards found through index.json


def test_buffer_shuffle_is_a_permutation_known_before_reading():
    order = buffer_order(100, 10, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(order, np.arange(100))
    assert np.array_equal(order, buffer_order(100, 10, np.random.default_rng(0)))
    position = np.empty(100, int)
    position[order] = np.arange(100)
    assert (position - np.arange(100)).max() < 100 and (np.arange(100) - position).max() <= 10  # a buffer's reach


def test_stream_resumes_at_exactly_the_next_sample(packed):
    """The stream of a worker slot, started after k samples, is the tail of the stream started at 0, across data
    epochs; every sample of the split appears once per data epoch over all slots."""
    shards = open_shards(packed[1]).train

    def keys(slot, slots, start, n):
        out = []
        for epoch, sample, _ in stream_slot(shards, slot, slots, seed=3, buffer=6, start=start):
            out.append((epoch, sample.key))
            if len(out) == n:
                return out

    full = keys(0, 2, 0, 60)
    for k in (1, 7, 23, 41):
        assert keys(0, 2, k, 60 - k) == full[k:]
    one_epoch = {k for s in range(2) for e, k in keys(s, 2, 0, 40) if e == 0}
    assert len(one_epoch) == 32
    few = ShardSet(shards.name, shards.shards[:1])  # fewer shards than slots: split by sample
    a, b = ({k for _, k in keys(s, 2, 0, few.total // 2)} for s in range(2))
    assert a.isdisjoint(b) and len(a | b) == few.total


def _corrupt_one_member(shard: Path) -> str:
    """Rewrite a shard with the image bytes of its second sample replaced by garbage; returns that key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.startswith(keys[1]) and m.name.endswith(".jpg"):
                data = b"\xff\xd8 not a jpeg at all"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return keys[1]


def test_corrupt_member_is_skipped_and_counted(packed, tmp_path):
    import shutil

    out = tmp_path / "packed"
    shutil.copytree(packed[1], out)
    first = json.loads((out / "index.json").read_text())["splits"]["train"][0]["name"]
    key = _corrupt_one_member(out / first)
    proc = run_cli("pretrain", "--data", str(out), "--out", str(tmp_path / "run"), "--steps", "6", "--json",
                   *tiny_sets("optim.batch_size=8", "data.num_workers=2"))
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 6 and 1 <= summary["skipped_images"] <= 2  # once per data epoch that reaches it
    assert f"{first}#{key}" in proc.stderr and "skipping unreadable image" in proc.stderr


def test_shard_training_resumes_exactly(packed, tmp_path):
    """N steps straight == stopped at a checkpoint + resumed (two DataLoader workers: per-worker positions)."""
    from mae.dist import init_distributed
    from training.pretrain import Pretrainer
    from training.rundir import RunDir

    cfg = tiny_config("run.steps=10", "run.ckpt_every=4", "optim.batch_size=4", "data.num_workers=2",
                      "data.shuffle_buffer=8")
    dist = init_distributed("cpu")
    straight = Pretrainer(cfg, RunDir(tmp_path / "straight", dist), dist, str(packed[1]))
    straight.fit()

    class Stopped(Exception):
        pass

    class StopsAt6(Pretrainer):
        def loss(self, model, images, labels):
            if self.step == 6:
                raise Stopped
            return super().loss(model, images, labels)

    run = RunDir(tmp_path / "resumed", dist)
    with pytest.raises(Stopped):
        StopsAt6(cfg, run, dist, str(packed[1])).fit()
    resumed = Pretrainer(cfg, run, dist, str(packed[1]))
    resumed.resume()
    assert resumed.step == 4
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_pack_then_evaluate_and_index(packed, tiny_pretrain_run, tmp_path, capsys):
    """The same images through a folder and through its shards: the same split sizes, labels and figures."""
    from cli.main import main as cli

    def run(*argv: str) -> dict:
        assert cli([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    folder, out = packed
    ckpt = tiny_pretrain_run / "checkpoint.pt"
    a, b = (run("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / data.name))
            for data in (folder, out))
    assert (a["train_images"], a["val_images"]) == (b["train_images"], b["val_images"]) == (32, 8)
    assert a["knn_top1"] == b["knn_top1"] and a["probe_top1"] == pytest.approx(b["probe_top1"])
    art = tmp_path / "art"
    run("export", "--checkpoint", str(ckpt), "--out", str(art))
    built = run("index", "build", "--artifact", str(art), "--images", str(out), "--out", str(tmp_path / "index"))
    assert built["count"] == 40 and built["labels"] == {"c0": 20, "c1": 20}
    hits = run("search", "--index", str(tmp_path / "index"), str(folder / "c1" / "005.jpg"), "-k", "1")["neighbours"]
    assert hits[0]["label"] == "c1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    vectors = tmp_path / "v.npy"
    run("embed", "--artifact", str(art), str(out), "--out", str(vectors), "--workers", "2")
    rows = json.loads(vectors.with_suffix(".json").read_text())["paths"]
    index = json.loads((out / "index.json").read_text())
    expected = []
    for split in ("train", "val"):  # rows in collection order: the shards in order, each sample in order
        for entry in index["splits"][split]:
            with tarfile.open(out / entry["name"]) as tar:
                keys = sorted({n.split(".")[0] for n in tar.getnames()})
            expected += [f"{out / entry['name']}#{k}" for k in keys]
    assert np.load(vectors).shape[0] == 40 and rows == expected
