"""Finetuning and linear probing: parameter groups, frozen probe, weight loading, a short run and its resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cli.main import main as cli
from mae.config import Config
from mae.dist import init_distributed
from mae.model import MaskedAutoencoder
from mae.sources import load_source
from tests.finetune_helpers import config16, labelled_folder, mae_checkpoint
from training import finetune as ft
from training.rundir import RunDir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return labelled_folder(tmp_path_factory.mktemp("data"))


def _mae_state(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MaskedAutoencoder(cfg.model).state_dict()


def test_layer_decay_scales_per_group():
    cfg = config16(layer_decay=0.5)
    vit = ft.build_classifier(cfg, 3, linear_probe=False)
    groups = ft.layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.5)
    scale, decay = {}, {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)], decay[id(p)] = g["lr_scale"], g["weight_decay"]
    depth = cfg.model.depth
    for name, p in vit.named_parameters():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            want = 0.5 ** (depth + 1)
        elif name.startswith("blocks."):
            want = 0.5 ** (depth - int(name.split(".")[1]))
        else:  # fc_norm, head
            want = 1.0
        assert scale[id(p)] == pytest.approx(want), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if no_decay else 0.05), name


def test_finetune_model_layout_and_head_init():
    cfg = config16()
    vit = ft.build_classifier(cfg, 3, linear_probe=False)
    missing = ft.load_encoder(vit, _mae_state(cfg))
    keys = set(vit.state_dict())
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= keys
    assert not any(k.startswith("norm.") for k in keys)  # avg pooling: fc_norm replaces the final norm
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert 0 < vit.head.weight.std() < 1e-4  # trunc_normal(std=2e-5)
    token = ft.build_classifier(config16(global_pool="token"), 3, linear_probe=False)
    assert "norm.weight" in token.state_dict() and "fc_norm.weight" not in token.state_dict()


def test_load_encoder_rejects_another_architecture():
    cfg = config16()
    other = cfg.override(["model.depth=3"])
    vit = ft.build_classifier(cfg, 3, linear_probe=False)
    with pytest.raises(ValueError, match="blocks.2"):
        ft.load_encoder(vit, _mae_state(other))


def test_pos_embed_interpolated_when_resolution_changes():
    cfg = config16()
    big = cfg.override(["model.img_size=24"])
    vit = ft.build_classifier(big, 3, linear_probe=False)
    state = _mae_state(cfg)
    ft.load_encoder(vit, state, source_grid=cfg.model.grid_size)
    assert vit.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(vit.pos_embed[0, 0], state["pos_embed"][0, 0])  # class-token slot kept as is
    out = vit.eval()(torch.randn(2, 1, 24, 24))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_probe_head_has_no_affine_and_encoder_gets_no_gradient(data, tmp_path):
    cfg = ft.finetune_config(config16(probe_optimizer="sgd"), linear_probe=True)
    dist = init_distributed("cpu")
    state = _mae_state(cfg)
    trainer = ft.Finetuner(cfg, RunDir(tmp_path / "probe", dist), dist, load_source(str(data)), state,
                           cfg.model.grid_size, linear_probe=True)
    head = trainer.model.head
    assert isinstance(head[0], nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    assert head[0].weight is None and head[0].bias is None
    assert trainer.model.global_pool == "token"
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trainable == ["head.1.bias", "head.1.weight"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    for name, p in trainer.model.named_parameters():
        if not name.startswith("head."):
            assert p.grad is None, name
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["head.1.weight"], before["head.1.weight"])
    assert not torch.equal(after["head.0.running_mean"], before["head.0.running_mean"])


def test_lars_probe_optimizer_adapts_only_the_weight():
    from timm.optim import Lars

    cfg = ft.finetune_config(config16(probe_optimizer="lars"), linear_probe=True)
    vit = ft.build_classifier(cfg, 3, linear_probe=True)
    ft.freeze_encoder(vit)
    trainer = object.__new__(ft.Finetuner)  # only make_optimizer's inputs are needed
    trainer.linear_probe, trainer.cfg, trainer.base_lr = True, cfg, 0.1
    opt = trainer.make_optimizer([{"params": [vit.head[1].weight], "always_adapt": True},
                                  {"params": [vit.head[1].bias], "always_adapt": False}])
    assert isinstance(opt, Lars) and opt.param_groups[0]["momentum"] == 0.9
    assert [g["always_adapt"] for g in opt.param_groups] == [True, False]


def test_recipe_lives_in_the_finetune_section_only(tmp_path):
    ckpt = mae_checkpoint(tmp_path / "pre.pt")
    base, _ = ft.init_config(ckpt)
    cfg = ft.finetune_config(base, False, ["finetune.blr=2e-3", "finetune.weight_decay=0.1", "finetune.epochs=3",
                                           "finetune.clip_grad=1.0"])
    optim, epochs = ft.recipe(cfg, linear_probe=False)
    assert optim.blr == 2e-3 and optim.weight_decay == 0.1 and epochs == 3 and optim.clip_grad == 1.0
    assert optim.betas == (0.9, 0.999) and cfg.optim == base.optim  # the pretraining's optimiser, untouched
    probe, probe_epochs = ft.recipe(ft.finetune_config(base, True, []), linear_probe=True)
    assert probe.weight_decay == 0.0 and probe.blr == base.finetune.probe_blr
    assert probe_epochs == base.finetune.probe_epochs
    with pytest.raises(ValueError, match="finetune.probe_blr"):  # optim.* is the pretraining's: say where to go
        ft.finetune_config(base, True, ["optim.blr=0.1"])
    with pytest.raises(ValueError, match="finetune.weight_decay"):
        ft.finetune_config(base, False, ["optim.weight_decay=0.1"])
    stepped = base.override(["run.steps=6"])  # a pretraining run stopped by steps does not stop its finetune
    assert ft.finetune_config(stepped, False, []).run.steps is None
    assert ft.finetune_config(stepped, False, ["run.steps=4"]).run.steps == 4


def test_old_checkpoint_without_finetune_section_opens(tmp_path):
    cfg = config16()
    d = cfg.to_dict()
    del d["finetune"]
    assert Config.from_dict(d).finetune == Config().finetune


def test_finetune_run_resumes_exactly_and_exports(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # bit-exact resume is a CPU promise here
    init = mae_checkpoint(tmp_path / "pre.pt")
    common = ["--init", str(init), "--data", str(data), "--set", "run.ckpt_every=2", "--set", "run.steps=4"]
    assert cli(["finetune", "--out", str(tmp_path / "full"), *common]) == 0

    save = ft.Finetuner.save

    def crash_after_step_2(self):
        save(self)
        if self.step == 2:
            raise KeyboardInterrupt  # the process dies right after its step-2 checkpoint

    monkeypatch.setattr(ft.Finetuner, "save", crash_after_step_2)
    assert cli(["finetune", "--out", str(tmp_path / "half"), *common]) == 130
    monkeypatch.setattr(ft.Finetuner, "save", save)
    assert cli(["finetune", "--out", str(tmp_path / "half"), "--resume", *common]) == 0
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "full" / "best.pt").exists()
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in rows)
    # Resumed once more, the finished run trains nothing and reports where it stands.
    again = ft.finetune(Config.from_dict(a["config"]), init, tmp_path / "full", str(data),
                        ft.init_config(init)[1], resume=True)
    assert again["steps"] == 4 and again["val_top1"] == rows[-1]["val_top1"]
    assert cli(["export", "--checkpoint", str(tmp_path / "full" / "best.pt"), "--out", str(tmp_path / "art")]) == 0
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["labels"] == ["class_0", "class_1", "class_2"] and config["pooling"] == "avg" and config["fc_norm"]


def test_bad_init_path_is_one_clear_line(tmp_path, capsys, data):
    out = str(tmp_path / "r")
    assert cli(["finetune", "--init", str(tmp_path / "nope.pt"), "--data", str(data), "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pt" in err[0] and "no weights file" in err[0]


def test_unlabelled_data_is_refused(tmp_path, capsys):
    init = mae_checkpoint(tmp_path / "pre.pt")
    folder = tmp_path / "flat"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{i}.png")
    assert cli(["finetune", "--init", str(init), "--data", str(folder), "--out", str(tmp_path / "r")]) == 1
    assert "no class labels" in capsys.readouterr().err


def test_finetune_transform_is_seeded_and_shaped():
    """Workers crop, flip and RandAugment in uint8 from the sample's own generator; normalisation and random
    erasing run on the batch, on the device."""
    import random

    from training.augment import FinetuneTransform

    cfg = config16(reprob=1.0)
    t = FinetuneTransform(cfg)
    img = (np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)
    a, b = t(img, random.Random(3)), t(img, random.Random(3))
    assert a.shape == (1, 16, 16) and a.dtype == np.uint8 and np.array_equal(a, b)
    batch = torch.from_numpy(np.stack([t(img, random.Random(s)) for s in range(100)]))
    x = t.normalizer()(batch, "cpu")
    torch.manual_seed(0)
    erased = t.erasing("cpu")(x.clone())
    assert torch.isfinite(erased).all() and (erased != x).flatten(1).any(1).all()  # reprob 1: a box in each
    from PIL import Image

    for op in t.randaug.ops:  # every op at the top magnitude (the official policy then asks for 0-bit posterize)
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
        assert op(Image.fromarray(img)).size == (20, 20), op.name
    rgb = FinetuneTransform(cfg.override(["model.in_chans=3", "data.mean=0.5,0.5,0.5", "data.std=0.5,0.5,0.5"]))
    assert rgb(img, random.Random(0)).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="randaug"):
        FinetuneTransform(cfg.override(["model.in_chans=5"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("probe", [False, True])
def test_finetune_and_evaluate_on_cuda_bf16(data, tmp_path, capsys, probe):
    init = mae_checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "run"
    argv = ["finetune", "--init", str(init), "--data", str(data), "--out", str(out), "--set", "run.steps=4", "--json"]
    assert cli(argv + (["--linear-probe"] if probe else [])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"].startswith("cuda") and 0.0 <= summary["best_val_top1"] <= 1.0
    assert Config.from_dict(torch.load(out / "checkpoint.pt", weights_only=True)["config"]).run.amp == "auto"
    assert cli(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(data), "--device", "cuda",
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["top1"] <= 1.0
