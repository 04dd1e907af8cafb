"""Evaluation: the kNN vote, the cached-feature probe, top-k, and ``mae evaluate`` on a tiny labelled split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main as cli
from tests.finetune_helpers import config16, labelled_folder, mae_checkpoint
from training import evaluate as ev


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_votes_are_temperature_weighted():
    # One very close neighbour of class 1 against two distant ones of class 0: a plain majority says 0,
    # exp(sim / 0.07) weighting says 1.
    bank = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]))
    labels = np.array([1, 0, 0])
    query = _unit(np.array([[1.0, 0.02]]))
    scores = ev.knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07)
    assert scores.argmax(1).tolist() == [1]
    flat = ev.knn_predict(bank, labels, query, num_classes=2, k=3, temperature=1e3)  # ~uniform weights
    assert flat.argmax(1).tolist() == [0]
    assert ev.knn_predict(bank, labels, query, num_classes=2, k=20).shape == (1, 2)  # k capped at the bank size


def test_knn_and_probe_on_separable_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3

    def sample(n):
        y = rng.integers(0, 4, n)
        return ev.Embedded(_unit(centres[y] + rng.normal(size=(n, 16))), y)

    train, val = sample(400), sample(100)
    assert ev.knn_top1(train, val, 4) > 0.97
    assert ev.linear_probe_top1(train, val, 4, epochs=30) > 0.97
    noise = ev.Embedded(_unit(rng.normal(size=(100, 16))), rng.integers(0, 4, 100))
    assert ev.linear_probe_top1(noise, noise.__class__(_unit(rng.normal(size=(100, 16))), noise.labels), 4,
                                epochs=30) < 0.6  # nothing to learn: near chance on fresh noise


def test_topk_and_confusion_matrix(tmp_path):
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = np.array([0, 2, 1, 1])
    acc = ev.topk_accuracy(logits, labels, (1, 2, 5))
    assert acc == {1: 0.25, 2: 0.75, 5: 1.0}
    cm = ev.confusion_matrix(logits.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    png = ev.save_confusion_png(cm, ["a", "b", "c"], tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = labelled_folder(root / "data", per_class=8)
    cfg = config16()
    init = mae_checkpoint(root / "pre.pt", cfg)
    assert cli(["finetune", "--init", str(init), "--data", str(data), "--out", str(root / "ft"),
                "--set", "run.steps=2"]) == 0
    return root, data, init


def test_evaluate_checkpoint_and_artifact_on_tiny_split(finetuned, capsys):
    root, data, _ = finetuned
    ckpt = root / "ft" / "best.pt"
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    for key in ("knn_top1", "probe_top1", "top1", "top5"):
        assert 0.0 <= first[key] <= 1.0, key
    assert first["top5"] == 1.0  # three classes
    assert first["val_images"] == 6 and first["train_images"] == 18
    assert first["embeddings_cached"] is False
    assert (root / "ft" / "eval" / "confusion_matrix.png").exists()
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["embeddings_cached"] is True and again["top1"] == first["top1"]
    assert again["knn_top1"] == first["knn_top1"]

    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(root / "art")]) == 0
    capsys.readouterr()
    assert cli(["evaluate", "--artifact", str(root / "art"), "--data", str(data), "--json"]) == 0
    art = json.loads(capsys.readouterr().out)
    assert art["top1"] == first["top1"] and art["knn_top1"] == first["knn_top1"]


def test_evaluate_pretrained_checkpoint_has_no_head_figures(finetuned, capsys):
    root, data, init = finetuned
    assert cli(["evaluate", "--checkpoint", str(init), "--data", str(data), "--pooling", "avg",
                "--out", str(root / "pre_eval"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "top1" not in out and out["embed_dim"] == 32 and "avg pooling" in out["model"]


def test_evaluate_errors_are_clear(finetuned, tmp_path, capsys):
    root, data, _ = finetuned
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "missing.pt" in err and len(err.strip().splitlines()) == 1
    assert cli(["evaluate", "--artifact", str(tmp_path / "none"), "--data", str(data)]) == 1
    assert "no artifact at" in capsys.readouterr().err
    other = labelled_folder(tmp_path / "other", classes=4, per_class=4)
    assert cli(["evaluate", "--checkpoint", str(root / "ft" / "best.pt"), "--data", str(other)]) == 1
    assert "head predicts" in capsys.readouterr().err


def test_random_init_and_raw_pixel_baselines(finetuned):
    _, data, _ = finetuned
    from mae.images import Preprocessing

    cfg = config16()
    split = ev.split_of(str(data), cfg.data.val_fraction, cfg.data.split_seed)
    prep = Preprocessing.from_config(cfg)
    train, val, _ = ev.embed_split(ev.RawPixels(), prep, split)
    assert train.embedding.shape == (18, 256)
    np.testing.assert_allclose(np.linalg.norm(train.embedding, axis=1), 1.0, rtol=1e-5)
    assert ev.knn_top1(train, val, 3) == 1.0  # the bars are far apart in pixel space
    enc = ev.random_init_encoder(cfg.model, "avg")
    emb = ev.embed_dataset(enc, ev.ImageDataset(split.source, split.val, prep))
    assert emb.embedding.shape == (6, 32) and emb.logits is None
    again = ev.embed_dataset(ev.random_init_encoder(cfg.model, "avg"), ev.ImageDataset(split.source, split.val,
                                                                                         prep))
    np.testing.assert_array_equal(emb.embedding, again.embedding)  # seeded
