"""ONNX export: graph contract, dynamic batch, no random ops, parity figures recorded, loud failure."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import onnx as onnx_export
from export.formats import onnx_key
from export.onnx import FILES, RANDOM_OPS, ExportError, check_graph, op_counts
from export.ort import cpu_session
from export.parity import TOLERANCES, ParityError
from mae import artifact
from tests.export_helpers import LABELS, PARITY_IMAGES, copy_artifact, exported, make_artifact


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return exported(tmp_path_factory, "plain")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return exported(tmp_path_factory, "head")


def _session(path):
    return cpu_session(path, threads=1)


def test_files_and_graph_contract(plain):
    record = artifact.read_config(plain)["export"]
    for precision, name in FILES.items():
        model = onnx.load(str(plain / name))
        assert [i.name for i in model.graph.input] == ["pixels"]
        assert [o.name for o in model.graph.output] == ["embedding", "tokens"]
        pixels = model.graph.input[0].type.tensor_type
        assert pixels.elem_type == TensorProto.FLOAT  # fp16 and int8 files still take float32
        assert not pixels.shape.dim[0].HasField("dim_value")  # dynamic N
        assert [d.dim_value for d in pixels.shape.dim[1:]] == [3, 32, 32]
        assert not set(op_counts(model)) & RANDOM_OPS
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        onnx.checker.check_model(str(plain / name), full_check=True)
        assert record[onnx_key(precision)]["passed"] is True
    assert record["onnx"]["exporter"] == "dynamo"
    assert record["onnx_fp16"]["attention_fusion"]["MultiHeadAttention_nodes"] == 2  # one per block (depth 2)
    fp16 = onnx.load(str(plain / FILES["fp16"]))
    nodes = fp16.graph.node
    assert sum(n.op_type == "MultiHeadAttention" for n in nodes) == 2
    ln_inputs = [n.input[0] for n in nodes if n.op_type in ("LayerNormalization", "SkipLayerNormalization")]
    casts_to_fp32 = {n.output[0] for n in nodes if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT}
    assert ln_inputs and set(ln_inputs) <= casts_to_fp32  # LayerNorm runs in fp32


def test_dynamic_batch_matches_torch(plain):
    art = artifact.load(plain)
    session = _session(plain / FILES["fp32"])
    for n in (1, 3, 17):
        x = torch.randn(n, 3, 32, 32)
        with torch.inference_mode():
            emb, tokens = art.encoder(x, return_tokens=True)
        got_emb, got_tokens = session.run(None, {"pixels": x.numpy()})
        assert got_emb.shape == (n, 192) and got_tokens.shape == (n, 64, 192)
        np.testing.assert_allclose(got_emb, emb.numpy(), atol=1e-5)
        np.testing.assert_allclose(got_tokens, tokens.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got_emb, axis=1), 1.0, atol=1e-5)


def test_parity_recorded_within_tolerance(plain):
    record = artifact.read_config(plain)["export"]
    assert record["artifact_sha256"] == artifact.read_config(plain)["sha256"]
    assert set(record["parity_data"]["sources"]) == {"mnist5k", "photos"}
    assert record["parity_data"]["images"] >= PARITY_IMAGES // 2
    fp32, fp16, int8 = (record[k]["parity"] for k in ("onnx", "onnx_fp16", "onnx_int8"))
    assert fp32["embedding"]["cosine_min"] >= 0.99999 and fp32["tokens"]["cosine_min"] >= 0.99999
    assert fp16["embedding"]["cosine_min"] >= 0.999
    assert int8["embedding"]["cosine_min"] >= 0.99
    assert fp16["embedding"]["top10_neighbour_overlap"] >= 0.9
    assert int8["embedding"]["top10_neighbour_overlap"] >= 0.7
    assert "top10_neighbour_overlap" not in fp32["embedding"]


def test_int8_is_smaller(plain):
    sizes = {p: (plain / name).stat().st_size for p, name in FILES.items()}
    assert sizes["int8"] < 0.4 * sizes["fp32"]
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert onnx.load(str(plain / FILES["int8"])).graph.node  # loads
    assert op_counts(onnx.load(str(plain / FILES["int8"])))["QuantizeLinear"] > 0


def test_top1_agreement_is_a_binomial_test_not_a_flip_count():
    from export.parity import failures, flips_p_value

    assert flips_p_value(0, 267, 0.99) == 1.0
    assert flips_p_value(3, 267, 0.99) == pytest.approx(0.5, abs=0.02)  # the AVX2 demo: 0.9888, chance
    assert flips_p_value(10, 267, 0.99) < 0.01  # 0.9625: too many to be chance for a 99% file

    def figures(flips: int) -> dict:
        return {"logits": {"cosine_min": 0.9999, "top1_flips": flips, "images": 267,
                           "top1_agreement": 1 - flips / 267}}

    tolerance = {"cosine": 0.99, "top1_agreement": 0.99}
    assert failures(figures(3), tolerance) == []
    assert "10 flips in 267" in failures(figures(10), tolerance)[0]


def test_judged_and_calibration_images_never_overlap():
    from export.parity import reference_images
    from mae.images import Preprocessing

    prep = Preprocessing((1, 16, 16), (0.5,), (0.5,), "bicubic", 1.0)
    for count in (8, 64, 512):
        judged, calibration, info = reference_images(["digits", "photos"], count, prep)
        seen = {x.tobytes() for x in judged}
        assert not seen & {x.tobytes() for x in calibration}, count
        assert len(seen) == len(judged) == info["images"] and len(calibration) == info["calibration_images"]


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_weight_type_follows_the_cpu(plain, tmp_path, monkeypatch, vnni):
    """Without VNNI (AVX2) u8 x s8 sums overflow; full-range u8 weights avoid it without 7-bit weights."""
    import onnx

    isa = {"isa": "test", "vnni": vnni, "cpu": "test", "cores": 1}
    monkeypatch.setattr(onnx_export, "cpu_isa", lambda: isa)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    sha = json.loads((plain / "config.json").read_text())["sha256"]
    info = onnx_export.quantize_int8(plain / FILES["fp32"], tmp_path / "q.onnx", calibration, sha)
    assert info["quantization"]["weights"].startswith("int8" if vnni else "uint8")
    weights = {i.name: i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    quantized = [t for n, t in weights.items() if n.endswith("_quantized")]
    assert quantized and set(quantized) == {TensorProto.INT8 if vnni else TensorProto.UINT8}


def test_head_logits_and_top1(head):
    record = artifact.read_config(head)["export"]
    assert record["onnx"]["outputs"] == ["embedding", "logits"]
    assert record["onnx_int8"]["parity"]["logits"]["top1_agreement"] >= 0.99
    assert record["onnx"]["parity"]["logits"]["top1_agreement"] == 1.0
    assert not (head / FILES["fp16"]).exists()
    art = artifact.load(head)
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        emb, logits = art.encoder(x)
    got_emb, got_logits = _session(head / FILES["fp32"]).run(None, {"pixels": x.numpy()})
    assert got_logits.shape == (5, len(LABELS))
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4)


def test_parity_failure_is_loud_and_recorded(head, tmp_path, monkeypatch):
    path = copy_artifact(head, tmp_path / "art")
    monkeypatch.setitem(TOLERANCES, "onnx_fp32", {"cosine": 1.5})  # unreachable: must fail
    with pytest.raises(ParityError, match="encoder.onnx misses its tolerance"):
        onnx_export.export_onnx(path, parity_images=8)
    assert not (path / FILES["fp32"]).exists()
    record = json.loads((path / "config.json").read_text())["export"]["onnx"]
    assert record["passed"] is False and record["parity"]["embedding"]["cosine_min"] > 0.99999


def test_random_op_is_rejected(tmp_path):
    node = helper.make_node("RandomUniformLike", ["pixels"], ["noise"])
    add = helper.make_node("Add", ["pixels", "noise"], ["embedding"])
    graph = helper.make_graph(
        [node, add], "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "random.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="random ops"):
        check_graph(path, ["embedding"])


def test_fixed_batch_is_rejected(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["embedding"])], "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="fixed batch"):
        check_graph(path, ["embedding"])


def test_cli_export_onnx_int8(tmp_path, capsys):
    from cli.main import main
    from mae.checkpoint import save_checkpoint
    from mae.model import MaskedAutoencoder
    from tests.export_helpers import export_config

    cfg = export_config().override(["model.depth=1"])
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt",
                           {"model": MaskedAutoencoder(cfg.model).state_dict(), "step": 0, "config": cfg.to_dict()})
    out = tmp_path / "artifact"
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--parity-data", "mnist5k",
                 "--parity-images", "16", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"encoder.onnx", "encoder.int8.onnx", "config.json", "model.safetensors"} <= set(result["files"])
    assert result["export"]["onnx_int8"]["passed"] is True
    assert json.loads((out / "config.json").read_text())["export"]["parity_data"]["sources"] == {"mnist5k": 16}


def test_export_refuses_missing_artifact(tmp_path):
    with pytest.raises(artifact.ArtifactError, match="no artifact"):
        onnx_export.export_onnx(tmp_path / "nothing")
    make_artifact(tmp_path / "a", head=False)
    with pytest.raises(ValueError, match="opset"):
        onnx_export.export_fp32(artifact.load(tmp_path / "a"), tmp_path / "a" / "x.onnx", opset=13)
