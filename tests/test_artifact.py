"""The artifact: round trips give identical outputs, official layouts load, timm opens it, errors name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mae import artifact
from mae.checkpoint import save_checkpoint
from mae.model import MaskedAutoencoder
from tests.finetune_helpers import config16, mae_checkpoint
from training import finetune as ft

X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
# Foreign files carry no config: the head count is read from a table of the released widths (192 -> 3 heads).
OFFICIAL_LIKE = config16().override(["model.embed_dim=192", "model.num_heads=3", "model.depth=1"])


@pytest.mark.parametrize("pooling", ["token", "avg"])
def test_pretrained_round_trip_identical(tmp_path, pooling):
    cfg = config16()
    ckpt = mae_checkpoint(tmp_path / "pre.pt", cfg)
    out = artifact.from_checkpoint(ckpt, tmp_path / "art", pooling=pooling)
    art = artifact.load(out)
    assert art.pooling == pooling and art.labels is None and art.embed_dim == 32
    model = MaskedAutoencoder(cfg.model)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    with torch.no_grad():
        tokens = model.eval().forward_features(X)  # (N, 1 + L, D), final norm applied
        pooled = tokens[:, 0] if pooling == "token" else tokens[:, 1:].mean(1)
        (embedding,) = art.encoder(X)
    torch.testing.assert_close(embedding, nn.functional.normalize(pooled, dim=-1), rtol=0, atol=1e-6)
    assert torch.equal(artifact.read_checkpoint(ckpt, pooling).build()(X)[0], embedding)
    assert artifact.read_checkpoint(ckpt).pooling == artifact.DEFAULT_PRETRAINED_POOLING


def _finetuned_state(cfg, classes: int, linear_probe: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = ft.build_classifier(cfg, classes, linear_probe)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # give the fresh head and norms real values, so that a mix-up of keys would show
        for name, p in vit.named_parameters():
            if name.startswith(("head", "fc_norm")):
                p.normal_(0, 0.5)
        if linear_probe:
            vit.head[0].running_mean.normal_(0, 1)
            vit.head[0].running_var.uniform_(0.5, 2.0)
    return vit.eval()


def test_finetuned_round_trip_identical_with_labels(tmp_path):
    cfg = config16()
    vit = _finetuned_state(cfg, 3)
    names = ["cat", "dog", "emu"]
    path = save_checkpoint(tmp_path / "ft.pt", {"model": vit.state_dict(), "step": 1, "config": cfg.to_dict(),
                                                 "labels": names, "task": "finetune"})
    art = artifact.load(artifact.from_checkpoint(path, tmp_path / "art"))
    assert art.labels == names and art.pooling == "avg" and art.config.fc_norm is True
    with torch.no_grad():
        embedding, logits = art.encoder(X)
        assert torch.equal(logits, vit(X))
        pooled = vit.forward_head(vit.forward_features(X), pre_logits=True)
    assert torch.equal(embedding, nn.functional.normalize(pooled, dim=-1))
    with pytest.raises(artifact.ArtifactError, match="trained on avg pooling"):
        artifact.from_checkpoint(path, tmp_path / "other", pooling="token")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_linear_probe_head_is_folded_exactly(tmp_path, pool):
    cfg = config16(probe_pool=pool)
    vit = _finetuned_state(cfg, 4, linear_probe=True)
    assert vit.global_pool == pool and "norm.weight" in vit.state_dict()  # the frozen encoder's own final norm
    path = save_checkpoint(tmp_path / "probe.pt", {"model": vit.state_dict(), "step": 1, "config": cfg.to_dict(),
                                                    "labels": list("abcd"), "task": "linear_probe"})
    art = artifact.load(artifact.from_checkpoint(path, tmp_path / "art"))
    assert art.pooling == pool and not art.config.fc_norm
    with torch.no_grad():
        torch.testing.assert_close(art.encoder(X)[1], vit(X), rtol=1e-5, atol=1e-5)


def test_official_finetuned_layout_loads(tmp_path):
    """An official ``mae_finetuned_vit_*.pth``: {"model": state} with fc_norm/head, no norm, no config."""
    cfg = OFFICIAL_LIKE
    vit = _finetuned_state(cfg, 5)
    state = vit.state_dict()
    assert "norm.weight" not in state and "fc_norm.weight" in state and state["head.weight"].shape == (5, 192)
    torch.save({"model": state}, tmp_path / "mae_finetuned_vit_tiny.pth")
    art = artifact.load(artifact.from_checkpoint(tmp_path / "mae_finetuned_vit_tiny.pth", tmp_path / "art"))
    assert art.labels == ["0", "1", "2", "3", "4"] and art.pooling == "avg"
    assert art.preprocessing.input_size == (1, 16, 16)
    with torch.no_grad():
        assert torch.equal(art.encoder(X)[1], vit(X))
    # and it finetunes further: the head is replaced, the encoder keys load
    target = ft.build_classifier(cfg, 2, linear_probe=False)
    assert sorted(ft.load_encoder(target, state)) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_official_pretrained_layout_loads(tmp_path):
    """An official ``mae_pretrain_vit_*.pth`` holds the encoder only, under timm keys."""
    cfg = OFFICIAL_LIKE
    torch.manual_seed(0)
    state = MaskedAutoencoder(cfg.model).encoder_state_dict()
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_tiny.pth")
    art = artifact.load(artifact.from_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", tmp_path / "art",
                                                 pooling="token"))
    assert art.labels is None and art.embed_dim == 192
    model = MaskedAutoencoder(cfg.model)
    model.load_mae_state_dict(state)
    with torch.no_grad():
        want = nn.functional.normalize(model.eval().forward_features(X)[:, 0], dim=-1)  # the class token
        assert torch.equal(art.encoder(X)[0], want)


@pytest.mark.parametrize("finetuned", [False, True])
def test_timm_create_model_loads_the_artifact_weights(tmp_path, finetuned):
    import timm

    cfg = config16()
    if finetuned:
        vit = _finetuned_state(cfg, 3)
        path = save_checkpoint(tmp_path / "c.pt", {"model": vit.state_dict(), "step": 1, "config": cfg.to_dict()})
    else:
        path = mae_checkpoint(tmp_path / "c.pt", cfg)
    out = artifact.from_checkpoint(path, tmp_path / "art")
    art = artifact.load(out)
    t = art.config.timm
    kwargs = dict(t["kwargs"], img_size=tuple(t["kwargs"]["img_size"]))
    model = timm.create_model(t["model_name"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / artifact.WEIGHTS),
                                                          **t["pretrained_cfg_overlay"]), **kwargs).eval()
    with torch.no_grad():
        outputs = art.encoder(X)
        pooled = model.forward_head(model.forward_features(X), pre_logits=True)
        assert torch.equal(nn.functional.normalize(pooled, dim=-1), outputs[0])
        if finetuned:
            assert torch.equal(model(X), outputs[1])
    assert model.pretrained_cfg["mean"] == list(art.preprocessing.mean)


@pytest.mark.parametrize("channels", [3, 1])
def test_timm_eval_transform_gives_the_same_tensors_as_preprocessing(tmp_path, channels):
    """The README says timm's ``create_transform`` from the artifact's pretrained cfg feeds the model what our
    ``Preprocessing`` does: same geometry (short-side resize, centre crop), same normalisation. PIL resizes in
    uint8 and torch in float, so pixels differ by a few levels of 255 at most, never by a shifted crop."""
    import numpy as np
    import skimage.data
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from mae.config import get_preset

    cfg = get_preset("mae_vit_tiny_patch4_32").override(
        ["model.depth=1", "model.img_size=64", "data.crop_pct=0.875", f"model.in_chans={channels}"])
    art = artifact.load(artifact.from_random_init(tmp_path / "art", cfg))
    t = art.config.timm
    model = timm.create_model(t["model_name"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(art.path / artifact.WEIGHTS), **t["pretrained_cfg_overlay"]), **t["kwargs"])
    transform = create_transform(**resolve_data_config({}, model=model))
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):  # square, landscape, grey
        arr = getattr(skimage.data, name)()
        if channels == 1 and arr.ndim == 3:
            arr = np.asarray(Image.fromarray(arr).convert("L"))
        pil = Image.fromarray(arr).convert("RGB" if channels == 3 else "L")
        ours, theirs = art.preprocessing(arr), transform(pil)
        assert ours.shape == theirs.shape == (channels, 64, 64), name
        diff = (ours - theirs).abs() * torch.tensor(art.preprocessing.std).view(-1, 1, 1)  # in [0, 1] pixel units
        assert diff.mean() < 2 / 255 and diff.max() < 8 / 255, (name, float(diff.mean()), float(diff.max()))


def test_errors_name_the_problem(tmp_path):
    cfg = config16()
    ckpt = mae_checkpoint(tmp_path / "pre.pt", cfg)
    with pytest.raises(artifact.ArtifactError, match="no artifact at"):
        artifact.load(tmp_path / "absent")
    out = artifact.from_checkpoint(ckpt, tmp_path / "art")
    (out / artifact.WEIGHTS).rename(tmp_path / "w")
    with pytest.raises(artifact.ArtifactError, match="model.safetensors is missing"):
        artifact.load(out)
    (tmp_path / "w").rename(out / artifact.WEIGHTS)
    config = json.loads((out / artifact.CONFIG).read_text())
    config["timm"]["kwargs"]["global_pool"] = "token"  # same shapes, other embeddings: must not load silently
    artifact.write_config(out, config)
    with pytest.raises(artifact.ArtifactError, match="timm section disagrees"):
        artifact.load(out)  # the model is built from the hashed fields; the timm copy must agree with them
    config["model"]["depth"] = 3
    artifact.write_config(out, config)
    with pytest.raises(artifact.ArtifactError, match="changed since export"):
        artifact.load(out)
    from mae.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no weights file"):
        artifact.from_checkpoint(tmp_path / "nope.pt", tmp_path / "x")


def test_the_config_is_read_once_into_typed_frozen_fields_and_written_back_unchanged(tmp_path):
    """``ArtifactConfig``: what every consumer reads. The file's JSON survives a rewrite (unknown fields too), and the
    typed view cannot be changed behind the file's back."""
    import dataclasses

    from export.parity import update_export_record
    from mae.artifact_config import ArtifactConfig, ArtifactSource
    from mae.errors import UserError
    from mae.images import Preprocessing

    cfg = config16()
    out = artifact.from_checkpoint(mae_checkpoint(tmp_path / "pre.pt", cfg), tmp_path / "art")
    raw = json.loads((out / artifact.CONFIG).read_text())
    config = ArtifactConfig.read(out)
    assert config.sha256 == raw["sha256"] and config.embed_dim == 32 and config.labels is None
    assert isinstance(config.preprocessing, Preprocessing) and config.pooling == raw["pooling"]
    assert config.source == ArtifactSource(raw["source"]["checkpoint"], raw["source"]["sha256"])
    assert config.model["depth"] == raw["model"]["depth"] and config.export == {} and config.to_dict() == raw
    assert artifact.load(out).config.to_dict() == raw
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sha256 = "0" * 64
    with pytest.raises(TypeError):
        config.model["depth"] = 7
    (out / artifact.CONFIG).write_text(json.dumps({**raw, "from_a_later_version": {"kept": True}}))
    update_export_record(out, {"onnx": {"passed": True}})
    again = json.loads((out / artifact.CONFIG).read_text())
    assert again["from_a_later_version"] == {"kept": True} and again["export"] == {"onnx": {"passed": True}}
    assert {k: v for k, v in again.items() if k not in ("export", "from_a_later_version")} == raw
    artifact.verify_weights(out)  # the identity does not cover export records or unknown fields

    for key, bad, says in (("labels", "cat", "labels must be a list"), ("pooling", "max", "pooling must be one of"),
                           ("export", [], "'export' must be a JSON object"), ("embed_dim", "wide", "embed_dim")):
        (out / artifact.CONFIG).write_text(json.dumps({**raw, key: bad}))
        with pytest.raises(artifact.ArtifactError, match=says) as e:
            ArtifactConfig.read(out)
        assert str(out / artifact.CONFIG) in str(e.value) and isinstance(e.value, UserError), key


def test_reading_an_artifact_config_imports_neither_torch_nor_timm(tmp_path):
    """onnxruntime consumers (mae search, mae embed --backend onnx) read artifacts through mae.artifact_config."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = artifact.from_random_init(tmp_path / "art", config16(), labels=["a", "b"])
    code = ("import sys; from mae.artifact_config import verify_weights; c = verify_weights(sys.argv[1]); "
            "assert c.labels == ('a', 'b') and c.num_classes == 2; "
            "assert not {'torch', 'timm'} & set(sys.modules), sorted({'torch', 'timm'} & set(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
