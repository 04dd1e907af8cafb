"""Embedder: backends agree, auto selection, streaming file embedding, errors; TensorRT (GPU only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.formats import BackendUnavailable
from export.ort import session_options
from export.runtime import Embedder
from mae import artifact
from mae.sources import load_source
from tests.export_helpers import LABELS, copy_artifact, exported


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return exported(tmp_path_factory, "plain")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return exported(tmp_path_factory, "head")


@pytest.fixture(scope="module")
def images():
    source = load_source("mnist5k")
    photos = load_source("photos")
    return [source.read(i) for i in range(0, 5000, 250)] + [photos.read(i) for i in range(0, 21, 4)]


def test_backends_agree(plain, images):
    ref = Embedder.load(plain, backend="torch", device="cpu").embed(images)
    assert ref.shape == (len(images), 192)
    for kwargs, tol in (({"backend": "onnx"}, 0.99999), ({"backend": "onnx", "precision": "fp16"}, 0.999),
                        ({"backend": "onnx", "precision": "int8"}, 0.99), ({"backend": "auto"}, 0.99999)):
        embedder = Embedder.load(plain, batch_size=7, device="cpu", **kwargs)  # 7: several batches, one ragged
        got = embedder.embed(images)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert (got * ref).sum(1).min() >= tol, embedder.backend_name
    assert Embedder.load(plain, device="cpu").backend_name == "onnx-cpu-fp32"  # auto without a GPU
    assert Embedder.load(plain, backend="onnx", precision="int8").backend_name == "onnx-cpu-int8"


def test_classify_agrees(head, images):
    torch_top = Embedder.load(head, backend="torch", device="cpu").classify(images, k=3)
    onnx_top = Embedder.load(head, backend="onnx", device="cpu").classify(images, k=3)
    assert [r[0]["label"] for r in torch_top] == [r[0]["label"] for r in onnx_top]
    for row in onnx_top:
        assert len(row) == 3 and row[0]["label"] in LABELS
        assert row[0]["probability"] >= row[1]["probability"] >= row[2]["probability"]
    e = Embedder.load(head, backend="onnx")
    assert e.labels == LABELS and e.dim == 192 and e.sha256 == artifact.read_config(head)["sha256"]


def test_wrong_input_shape(plain):
    embedder = Embedder.load(plain, backend="onnx")
    with pytest.raises(ValueError, match=r"pixels must have shape \(N, 3, 32, 32\)"):
        embedder.run(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="pixels must have shape"):
        embedder.run(np.zeros((3, 32, 32), np.float32))
    assert embedder.run(np.zeros((0, 3, 32, 32), np.float32))["embedding"].shape == (0, 192)


def test_bad_artifacts(plain, tmp_path):
    with pytest.raises(artifact.ArtifactError, match="no artifact"):
        Embedder.load(tmp_path / "missing")
    broken = copy_artifact(plain, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        Embedder.load(broken, backend="onnx")
    with pytest.raises(ValueError, match="backend must be one of"):
        Embedder.load(plain, backend="tflite")
    bare = copy_artifact(plain, tmp_path / "bare")
    for f in bare.glob("encoder*.onnx"):
        f.unlink()
    with pytest.raises(BackendUnavailable, match="no encoder.onnx"):
        Embedder.load(bare, backend="onnx")
    assert Embedder.load(bare, device="cpu").backend_name == "torch-cpu"  # auto falls back to torch


def test_stale_onnx_file_is_refused(plain, head, tmp_path):
    mixed = copy_artifact(plain, tmp_path / "mixed")
    (mixed / "encoder.onnx").write_bytes((head / "encoder.onnx").read_bytes())  # another artifact's graph
    with pytest.raises(artifact.ArtifactError, match="exported from other weights"):
        Embedder.load(mixed, backend="onnx")
    with pytest.warns(UserWarning, match="onnx backend skipped"):
        assert Embedder.load(mixed, device="cpu").backend_name == "torch-cpu"


def test_session_options_do_not_spin():
    so = session_options(threads=3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_embed_files_streams_and_skips_bad(plain, tmp_path, images):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images[:9]):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    embedder = Embedder.load(plain, backend="onnx", batch_size=4)
    from mae.files import sha256_file
    from mae.sources import list_images

    files, _ = list_images([folder])
    done = embedder.embed_files(files, workers=0, progress=False)
    kept = [files[p] for p in done.positions]
    assert len(files) == 10 and len(kept) == 9 and done.vectors.shape == (9, 192)
    assert len(done.skipped) == 1 and "broken.png" in done.skipped[0]["error"]
    assert done.sha256 == [sha256_file(f) for f in kept]
    np.testing.assert_allclose(done.vectors, embedder.embed(kept), atol=1e-6)


def test_cli_embed(plain, tmp_path, images, capsys):
    from PIL import Image

    from cli.main import main

    for i, im in enumerate(images[:5]):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    out = tmp_path / "out" / "vectors.npy"
    code = main(["embed", "--artifact", str(plain), str(tmp_path / "0.png"), str(tmp_path), "--out", str(out),
                 "--backend", "onnx", "--batch-size", "2", "--workers", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vectors = np.load(out)
    assert vectors.shape == (6, 192) and result["count"] == 6  # 0.png given twice: once alone, once in the dir
    rows = json.loads(out.with_suffix(".json").read_text())
    assert rows["paths"][0].endswith("0.png") and len(rows["paths"]) == 6
    assert main(["embed", "--artifact", str(plain), str(tmp_path / "nope.png"), "--out", str(out)]) == 1
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- TensorRT


def _trt_reason():
    from export.tensorrt import unavailable_reason

    return unavailable_reason()


def test_tensorrt_unavailable_is_plain(plain, tmp_path, capsys):
    reason = _trt_reason()
    if reason is None:
        pytest.skip("TensorRT is available here; the no-GPU message cannot be seen")
    from cli.main import main
    from mae.checkpoint import save_checkpoint
    from mae.model import MaskedAutoencoder
    from tests.export_helpers import export_config

    cfg = export_config().override(["model.depth=1"])
    ckpt = save_checkpoint(tmp_path / "c.pt", {"model": MaskedAutoencoder(cfg.model).state_dict(), "step": 0,
                                                 "config": cfg.to_dict()})
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--tensorrt"])
    assert code == 1
    assert "TensorRT cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before writing anything
    with pytest.raises(BackendUnavailable, match="no encoder.plan"):
        Embedder.load(plain, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(_trt_reason() is not None, reason=f"TensorRT: {_trt_reason()}")
def test_tensorrt_engine_parity(plain, tmp_path, images):
    from export.onnx import export_onnx
    from export.tensorrt import SIDECAR, build_engine, engine_mismatch, tensorrt_parity

    path = copy_artifact(plain, tmp_path / "trt")
    export_onnx(path, fp16=True, parity_images=16)
    side = build_engine(path, precision="fp16", min_batch=1, opt_batch=8, max_batch=16)
    assert side["gpu"] == torch.cuda.get_device_name(0)
    assert json.loads((path / SIDECAR).read_text())["profile"] == {"min": 1, "opt": 8, "max": 16}
    record = tensorrt_parity(path, ["mnist5k", "photos"], 32)
    assert record["passed"] and record["parity"]["embedding"]["cosine_min"] >= 0.999
    assert engine_mismatch(path, artifact.ArtifactConfig.read(path)) is None
    trt = Embedder.load(path, backend="auto", batch_size=40)  # 40 > max 16: sliced
    assert trt.backend_name.startswith("tensorrt")
    ref = Embedder.load(path, backend="torch").embed(images)
    assert (trt.embed(images) * ref).sum(1).min() >= 0.999
