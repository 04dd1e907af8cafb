"""Configs: presets, overrides that reject unknown keys, and the dict round trip checkpoints rely on."""

from __future__ import annotations

import json

import pytest

from mae.config import PRESETS, Config, describe_presets, get_preset


def test_paper_presets_have_the_paper_shapes():
    base, large, huge = (get_preset(n).model for n in
                         ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"))
    assert (base.embed_dim, base.depth, base.num_heads, base.patch_size) == (768, 12, 12, 16)
    assert (large.embed_dim, large.depth, large.num_heads) == (1024, 24, 16)
    assert (huge.embed_dim, huge.depth, huge.num_heads, huge.patch_size) == (1280, 32, 16, 14)
    for m in (base, large, huge):
        assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
        assert m.mask_ratio == 0.75 and m.norm_pix_loss
    tiny = get_preset("mae_vit_tiny_patch4_32").model
    assert tiny.img_size == (32, 32) and tiny.patch_size == 4


def test_describe_presets_counts_parameters():
    rows = {r["name"]: r for r in describe_presets()}
    assert set(rows) == set(PRESETS)
    assert rows["mae_vit_base_patch16"]["params_m"] == pytest.approx(111.9, abs=0.3)  # official MAE ViT-B total


def test_overrides_parse_types():
    cfg = get_preset("mae_vit_tiny_patch4_32").override([
        "model.mask_ratio=0.6", "optim.lr=1e-3", "run.steps=7", "model.img_size=48", "data.crop_scale=0.3,1",
        "run.compile=true", "optim.clip_grad=null", "data.interpolation=bilinear",
    ])
    assert cfg.model.mask_ratio == 0.6 and cfg.optim.lr == 1e-3 and cfg.run.steps == 7
    assert cfg.model.img_size == (48, 48) and cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.run.compile is True and cfg.optim.clip_grad is None and cfg.data.interpolation == "bilinear"


@pytest.mark.parametrize("item,message", [
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("nope.depth=1", "unknown config key"),
    ("model=1", "is a section"),
    ("model.depth=1.5", "expects an integer"),
    ("run.compile=maybe", "expects true or false"),
    ("model.depth", "expects key=value"),
    ("model.img_size=30", "not a multiple"),
    ("model.mask_ratio=1.0", "mask_ratio"),
])
def test_bad_overrides_are_rejected(item, message):
    with pytest.raises(ValueError, match=message):
        get_preset("mae_vit_tiny_patch4_32").override([item])


def test_unknown_key_message_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        get_preset("mae_vit_tiny_patch4_32").override(["model.dpeth=3"])
    assert "model.depth" in str(e.value)


def test_dict_round_trip_through_json():
    cfg = get_preset("mae_vit_large_patch16").override(["run.steps=10", "data.mean=0.5", "data.std=0.25"])
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_keys():
    d = get_preset("mae_vit_tiny_patch4_32").to_dict()
    d["model"]["wat"] = 1
    with pytest.raises(ValueError, match="model.wat"):
        Config.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        get_preset("vit_gigantic")


def test_channel_stats_broadcast():
    cfg = get_preset("mae_vit_tiny_patch4_32")
    assert cfg.data.channel_stats(3) == (cfg.data.mean, cfg.data.std)
    mean, std = cfg.data.channel_stats(1)
    assert len(mean) == 1 and mean[0] == pytest.approx(sum(cfg.data.mean) / 3)
    assert len(cfg.override(["data.mean=0.5", "data.std=0.5"]).data.channel_stats(5)[0]) == 5
