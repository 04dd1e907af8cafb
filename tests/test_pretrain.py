"""Pretraining end to end: the CLI, checkpoints, resume after a kill, torchrun DDP, bad data and bad losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, run_cli, tiny_config, tiny_sets


def test_pretrain_cli_writes_the_run_folder(tiny_pretrain_run: Path):
    run = tiny_pretrain_run
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "loss_curve.png", "summary.json"):
        assert (run / name).exists(), name
    assert list((run / "reconstructions").glob("step_*.png"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # no pickle needed to open it
    assert set(ckpt) >= {"model", "optimizer", "scaler", "step", "epoch", "config", "format"}
    assert ckpt["step"] == 6 and ckpt["format"] == 1
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"]["embed_dim"] == 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert "val_loss" in rows[-1]
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["effective_batch"] == 16 and resolved["lr"] == pytest.approx(1.5e-4 * 16 / 256)


def test_model_from_our_checkpoint(tiny_pretrain_run: Path):
    from mae.model import MaskedAutoencoder

    m = MaskedAutoencoder.from_checkpoint(tiny_pretrain_run / "checkpoint.pt")
    state = torch.load(tiny_pretrain_run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())


def test_json_output_and_presets():
    out = json.loads(run_cli("pretrain", "--list-presets", "--json").stdout)
    names = [p["name"] for p in out["presets"]]
    paper = {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"}
    assert paper | {"mae_vit_tiny_patch4_32"} <= set(names)


def test_existing_run_is_not_overwritten(tiny_pretrain_run: Path):
    proc = run_cli("pretrain", "--data", "mnist5k", "--out", str(tiny_pretrain_run), "--steps", "6", *tiny_sets(),
                   check=False)
    assert proc.returncode == 1 and "pass --resume" in proc.stderr
    proc = run_cli("pretrain", "--data", "mnist5k", "--out", str(tiny_pretrain_run), "--steps", "9", "--resume",
                   *tiny_sets(), check=False)
    assert proc.returncode == 1 and "run.steps: saved 6, asked 9" in proc.stderr
    # Resuming a finished run trains nothing, leaves the weights alone and reports the run's last losses.
    before = _final_weights(tiny_pretrain_run)
    last = [json.loads(ln) for ln in (tiny_pretrain_run / "metrics.jsonl").read_text().splitlines()][-1]
    out = json.loads(run_cli("pretrain", "--data", "mnist5k", "--out", str(tiny_pretrain_run), "--resume",
                             "--json").stdout)
    assert out["steps"] == 6 and out["loss"] == last["loss"] and out["val_loss"] == last["val_loss"]
    assert all(torch.equal(before[k], v) for k, v in _final_weights(tiny_pretrain_run).items())


def test_bad_config_key_is_a_clear_error(tmp_path):
    proc = run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--set", "model.detph=2", check=False)
    assert proc.returncode == 1 and "did you mean model.depth" in proc.stderr and "Traceback" not in proc.stderr


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_resume_after_kill_is_bit_exact(tmp_path):
    """N steps straight == killed part-way + --resume to N: same weights, same schedule."""
    steps = 24
    args = ["--data", "digits", "--steps", str(steps), *tiny_sets("run.ckpt_every=4", "run.log_every=4")]
    straight = tmp_path / "straight"
    run_cli("pretrain", "--out", str(straight), *args)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "pretrain", "--out", str(killed), *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    step = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=True)["step"]
            if step >= 8:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step < steps, "the run finished before it could be killed; make it longer"

    run_cli("pretrain", "--out", str(killed), "--resume", *args)
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {step}"
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(4, steps + 1, 4)), "metrics must not repeat steps after a resume"


def test_torchrun_two_agents_on_cpu(tmp_path):
    """DDP as two machines run it: two torchrun agents of one process each (--nnodes 2), gloo over loopback."""
    from tests.test_distributed import two_agents

    out = tmp_path / "ddp"
    two_agents("pretrain", "--data", "digits", "--out", str(out), "--steps", "4", "--json", *tiny_sets())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch"] == 32 and summary["steps"] == 4
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (data / "b" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--data", str(data), "--out", str(out), "--steps", "6", "--json",
                   *tiny_sets("optim.batch_size=8", "data.val_fraction=0.1"))
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 6 and 1 <= summary["skipped_images"] <= 2 * 6  # each bad file once per epoch seen
    assert "skipping unreadable image" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == summary["skipped_images"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from mae.dist import init_distributed
    from mae.sources import load_source
    from training.loop import NonFiniteLossError
    from training.pretrain import Pretrainer
    from training.rundir import RunDir

    class Exploding(Pretrainer):
        def loss(self, model, images, labels):
            loss, metrics = super().loss(model, images, labels)
            return (loss * float("nan") if self.step == 5 else loss), metrics

    cfg = tiny_config("run.steps=8", "run.ckpt_every=2")
    dist = init_distributed("cpu")
    run = RunDir(tmp_path / "run", dist)
    trainer = Exploding(cfg, run, dist, load_source("digits"))
    with pytest.raises(NonFiniteLossError, match=r"step 5.*last good checkpoint \(step 4\)"):
        trainer.fit()
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 4


def test_a_new_stage_gets_the_run_lifecycle_in_a_few_lines(tmp_path):
    """What a further training stage writes to get the run folder, config.json, resume and summary.json."""
    from mae.errors import AlreadyExistsError
    from training.pretrain import Pretrainer
    from training.run import run_training

    class Stage(Pretrainer):
        def summary(self, last):
            return {"stage_loss": last.get("loss")}

    cfg = tiny_config("run.steps=2", "data.val_fraction=0.05")

    def stage(resume: bool = False) -> dict:
        return run_training(tmp_path, lambda run, dist: Stage(cfg, run, dist, "digits"), resume=resume,
                            record={"task": "third", "data_source": "digits"})

    summary = stage()
    assert summary["task"] == "third" and summary["steps"] == 2 and summary["stage_loss"] == summary["loss"]
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "third"
    assert json.loads((tmp_path / "summary.json").read_text())["stage_loss"] == summary["loss"]
    with pytest.raises(AlreadyExistsError, match="pass --resume"):
        stage()
    assert stage(resume=True)["resumed_from_step"] == 2


def test_gradient_accumulation_matches_one_big_batch():
    """accum_iter=2 x batch 8 gives the same update as batch 16 (same images, same masks)."""
    from mae.model import MaskedAutoencoder

    cfg = tiny_config().model
    torch.manual_seed(0)
    a = MaskedAutoencoder(cfg)
    b = MaskedAutoencoder(cfg)
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(16, 3, 32, 32), torch.rand(16, 64)
    a(imgs, noise=noise)[0].backward()
    for half in (slice(0, 8), slice(8, 16)):
        (b(imgs[half], noise=noise[half])[0] / 2).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_weight_decay_groups_and_schedule():
    from mae.model import MaskedAutoencoder
    from training.loop import cosine_lr, param_groups

    m = MaskedAutoencoder(tiny_config().model)
    no_decay, decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token"} <= nd  # pos embeds are fixed (no grad), so in no group
    assert all(n.endswith(".bias") or "norm" in n or n in ("cls_token", "mask_token") for n in nd)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert "pos_embed" not in {n for n, p in m.named_parameters() if p.requires_grad}
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.0) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))


def test_bad_images_in_the_validation_split_are_skipped_and_the_run_finishes(tmp_path):
    """All but one held-out image unreadable: pretraining still ends with its checkpoint, metrics and summary,
    and counts them (it used to die at the end with a TypeError and keep nothing)."""
    from mae.sources import load_source, stratified_split

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    source = load_source(data)
    _, val = stratified_split(source.labels, 0.25, 0)
    for i in val[1:]:
        source.items[i].write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--data", str(data), "--out", str(out), "--steps", "3", "--json",
                   *tiny_sets("optim.batch_size=8", "data.val_fraction=0.25", "run.vis_every=2"))
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 3 and summary["val_skipped_images"] == len(val) - 1 and summary["skipped_images"] == 0
    assert math.isfinite(summary["val_loss"]) and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_skipped_images"] == len(val) - 1 and (out / "summary.json").exists()
    assert str(source.items[val[1]]) in proc.stderr


def test_a_non_finite_array_is_a_bad_image_not_a_divergence(tmp_path):
    """One NaN .npy among the training images: skipped, counted and named, and the run trains on (it used to stop
    at step 0 advising a lower learning rate)."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        np.save(data / f"{i:02d}.npy", rng.random((16, 16, 3)).astype(np.float32))
    bad = rng.random((16, 16, 3)).astype(np.float32)
    bad[3, 4, 0] = np.nan
    np.save(data / "nan.npy", bad)
    proc = run_cli("pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "4", "--json",
                   *tiny_sets("optim.batch_size=8", "data.val_fraction=0"))
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 4 and math.isfinite(summary["loss"]) and summary["skipped_images"] >= 1
    assert "nan.npy: 1 non-finite value(s)" in proc.stderr
