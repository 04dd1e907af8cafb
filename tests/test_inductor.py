"""AOTInductor (``encoder.pt2``): compiled on this CPU through ``mae export --inductor``, parity recorded, the
Embedder's inductor backend agrees with torch, and stale or mismatched packages are refused; CUDA on a GPU.

One compile for the module (a 16 px, 2-block encoder with a head: ~20-45 s of gcc on a 2-core CPU); the
refusal tests edit copies of it instead of compiling again.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from export import inductor
from export.formats import BackendUnavailable
from export.parity import TOLERANCES, ParityError
from export.runtime import Embedder
from mae import artifact
from mae.artifact_config import ArtifactConfig
from mae.checkpoint import save_checkpoint
from mae.sources import load_source
from tests.finetune_helpers import config16
from training import finetune as ft

LABELS = ["bar0", "bar1", "bar2"]
REASON = inductor.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"AOTInductor: {REASON}")


def _finetuned_checkpoint(path):
    """A finetuned-layout checkpoint (avg pooling + fc_norm + a 3-class head) with a spread head, so that top-1
    is a real decision for the agreement check."""
    cfg = config16()
    torch.manual_seed(0)
    vit = ft.build_classifier(cfg, len(LABELS), linear_probe=False)
    nn.init.normal_(vit.head.weight, std=0.5)
    return save_checkpoint(path, {"model": vit.state_dict(), "step": 1, "config": cfg.to_dict(), "labels": LABELS,
                                  "task": "finetune"})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``mae export --inductor`` on the CPU, as a user runs it; returns (artifact path, the CLI's JSON)."""
    from cli.main import main

    tmp = tmp_path_factory.mktemp("inductor")
    ckpt = _finetuned_checkpoint(tmp / "ft.pt")
    out = tmp / "artifact"
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--inductor", "--inductor-device", "cpu",
                 "--parity-data", "digits,photos", "--parity-images", "48", "--batch-max", "16", "--json"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def images():
    digits, photos = load_source("digits"), load_source("photos")
    return [digits.read(i) for i in range(0, 1797, 60)] + [photos.read(i) for i in range(0, 21, 3)]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_export_records_parity_and_the_setup_it_is_bound_to(compiled):
    assert (compiled / inductor.FILE).exists() and (compiled / inductor.SIDECAR).exists()
    config = ArtifactConfig.read(compiled)
    record = config.export["inductor"]
    assert record["passed"] is True and record["precision"] == "fp32" and record["device_type"] == "cpu"
    assert record["torch"] == torch.__version__ and record["artifact_sha256"] == config.sha256
    assert record["batch"] == {"min": 1, "max": 16} and record["cpu_isa"] in inductor.cpu_isas()
    assert record["parity_data"]["images"] >= 20 and set(record["parity_data"]["sources"]) == {"digits", "photos"}
    assert record["parity"]["embedding"]["cosine_min"] >= TOLERANCES["inductor_fp32"]["cosine"]
    assert record["parity"]["logits"]["top1_agreement"] >= 0.99
    assert set(record["batches_cosine_min"]) == {"1", "3", "17"}  # 17 > max batch 16: the sliced path too
    assert inductor.InductorBackend.unavailable(compiled, config, None) is None


def test_embedder_inductor_agrees_with_torch(compiled, images):
    ref = Embedder.load(compiled, backend="torch", device="cpu")
    got = Embedder.load(compiled, backend="inductor", batch_size=40)  # 40 > the package's max batch 16: sliced
    assert got.backend_name == "inductor-cpu-fp32"
    a, b = ref.embed(images), got.embed(images)
    assert b.shape == a.shape == (len(images), 32) and b.dtype == np.float32
    assert (a * b).sum(1).min() >= 0.9999
    top_ref = [r[0]["label"] for r in ref.classify(images, k=2)]
    top_got = [r[0]["label"] for r in got.classify(images, k=2)]
    assert top_got == top_ref
    # auto picks the package compiled for this device (no encoder.onnx here, no GPU: before eager torch)
    if not torch.cuda.is_available():
        assert Embedder.load(compiled).backend_name == "inductor-cpu-fp32"


def test_mae_embed_runs_the_inductor_backend(compiled, tmp_path):
    from PIL import Image

    from cli.main import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    digits = load_source("digits")
    for i in range(5):
        Image.fromarray(digits.read(i * 100)).save(folder / f"{i}.png")
    assert main(["embed", "--artifact", str(compiled), str(folder), "--out", str(tmp_path / "v.npy"),
                 "--backend", "inductor", "--workers", "0"]) == 0
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["backend"] == "inductor-cpu-fp32" and np.load(tmp_path / "v.npy").shape == (5, 32)


def test_a_package_from_other_weights_is_refused(compiled, tmp_path):
    path = _copy(compiled, tmp_path / "stale")
    artifact.from_random_init(path, config16(), labels=LABELS, seed=7)  # new weights, old encoder.pt2 left behind
    config = ArtifactConfig.read(path)
    reason = inductor.InductorBackend.unavailable(path, config, None)
    assert reason and "other weights" in reason
    with pytest.raises(BackendUnavailable, match="other weights"):
        Embedder.load(path, backend="inductor")
    assert Embedder.load(path, device="cpu").backend_name.startswith("torch")  # auto falls back, does not run it


def test_another_torch_or_device_is_refused(compiled, tmp_path):
    path = _copy(compiled, tmp_path / "other-torch")
    side = json.loads((path / inductor.SIDECAR).read_text())
    (path / inductor.SIDECAR).write_text(json.dumps({**side, "torch": "2.0.0"}))
    config = ArtifactConfig.read(path)
    with pytest.raises(BackendUnavailable, match=r"compiled with torch 2\.0\.0; this is torch"):
        Embedder.load(path, backend="inductor")
    with pytest.raises(BackendUnavailable, match="compiled for cpu, not cuda"):
        Embedder.load(compiled, backend="inductor", device="cuda")
    (path / inductor.SIDECAR).write_text(json.dumps({**side, "cpu_isa": "an-isa-no-cpu-has"}))
    assert "an-isa-no-cpu-has CPUs" in inductor.InductorBackend.unavailable(path, config, None)
    (path / inductor.SIDECAR).write_text(json.dumps({**side, "device_type": "cuda", "compute_capability": "1.0"}))
    reason = inductor.InductorBackend.unavailable(path, config, None)
    assert ("no CUDA GPU" in reason) if not torch.cuda.is_available() else ("compute capability 1.0" in reason)
    (path / inductor.FILE).unlink()
    assert "no encoder.pt2" in inductor.InductorBackend.unavailable(path, config, None)


def test_a_failed_parity_deletes_the_package_and_records_why(compiled, tmp_path, monkeypatch):
    """Parity judged against a wrong reference: the export must fail, record why and leave no package behind."""
    path = _copy(compiled, tmp_path / "bad")
    real = inductor.torch_outputs

    def negated(art, pixels, tokens=False, batch=32):
        return {k: -v for k, v in real(art, pixels, tokens, batch).items()}  # cosine -1 for every image

    monkeypatch.setattr(inductor, "torch_outputs", negated)
    shutil.copy(compiled / inductor.FILE, tmp_path / "keep.pt2")

    def keep(art, file, device, precision, max_batch):  # the already compiled package: no second gcc run
        shutil.copy(tmp_path / "keep.pt2", file)
        return 0.0

    monkeypatch.setattr(inductor, "compile_package", keep)
    with pytest.raises(ParityError, match="misses its tolerance"):
        inductor.export_inductor(path, device="cpu", data=["digits"], parity_images=24, max_batch=16)
    assert not (path / inductor.FILE).exists() and not (path / inductor.SIDECAR).exists()
    assert artifact.read_config(path)["export"]["inductor"]["passed"] is False


def test_an_onnx_export_keeps_the_inductor_record(compiled, tmp_path):
    from export.onnx import export_onnx

    path = _copy(compiled, tmp_path / "both")
    export_onnx(path, parity_images=8, data=["digits"], exporter="torchscript")  # the faster exporter
    config = artifact.read_config(path)
    assert config["export"]["inductor"]["passed"] and config["export"]["onnx"]["passed"]
    assert Embedder.load(path, device="cpu").backend_name == "onnx-cpu-fp32"  # on a CPU, onnxruntime comes first
    (path / "encoder.onnx").unlink()
    assert Embedder.load(path, device="cpu").backend_name == "inductor-cpu-fp32"  # then the package, then torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_package(tmp_path, images):
    """The GPU fast path: compiled for this GPU in bf16, proven against eager fp32, run by the Embedder. No head: a
    random head's near-ties would make bf16 top-1 agreement a coin toss (the CPU tests cover logits)."""
    path = artifact.from_random_init(tmp_path / "gpu", config16())
    record = inductor.export_inductor(path, device="cuda", data=["digits", "photos"], parity_images=48,
                                      max_batch=16)
    assert record["passed"] and record["precision"] == "bf16" and record["device_type"] == "cuda"
    assert record["device_name"] == torch.cuda.get_device_name(0)
    got = Embedder.load(path, batch_size=40)  # auto: the package beats onnxruntime and torch on this GPU
    assert got.backend_name == "inductor-cuda-bf16"
    ref = Embedder.load(path, backend="torch", device="cpu").embed(images)
    assert (got.embed(images) * ref).sum(1).min() >= TOLERANCES["inductor_bf16"]["cosine"]
    with pytest.raises(BackendUnavailable, match="compiled for cuda, not cpu"):
        Embedder.load(path, backend="inductor", device="cpu")
