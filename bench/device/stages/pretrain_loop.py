"""Stage 4, pretrain_loop: ``mae pretrain`` of ViT-B/16 on generated photo-sized JPEGs (500x375, cut from
scikit-image's photographs): loop img/s over step img/s (what the data path and the loop cost), the data path
alone, then SIGKILL after the first checkpoint and ``--resume``, which must continue from it."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.device.inputs import loop_plan, photo_folder
from bench.device.stage import SKIPPED, Goal, Stage, cli_json, device, free_memory, popen, signal_group, tail

NAME = "pretrain_loop"
BUDGET = (65, 90)


def run(st: Stage) -> None:
    plan = loop_plan(st.dry)
    st.result["plan"] = plan
    with st.item("images") as e:
        folder = photo_folder(st.work, st.dry)
        files = sorted(folder.rglob("*.jpg"))
        e.update(folder=str(folder), images=len(files), mib=round(sum(f.stat().st_size for f in files) / 2**20, 1))
    run = st.work / "pretrain"
    shutil.rmtree(run, ignore_errors=True)
    args = ["--data", str(folder), "--preset", plan["preset"], "--out", str(run), "--steps", str(plan["steps"]),
            "--batch-size", str(plan["batch"])]
    for s in [*plan["sets"], f"run.ckpt_every={plan['ckpt_every']}", f"run.log_every={plan['log_every']}",
              f"run.vis_every={plan['steps']}", f"data.num_workers={plan['workers']}"]:
        args += ["--set", s]
    st.result["command"] = "mae pretrain " + " ".join(args)

    with st.item("step_reference") as e:  # the same model, batch and precision policy, minus data and loop
        e.update(step_images_per_s=step_reference(plan, st.dry))
        st.result["step_images_per_s"] = e["step_images_per_s"]
    free_memory()
    with st.item("data_path_alone") as e:  # decode + crop in the workers, no model: the data path's ceiling
        e.update(**data_path_rate(folder, plan, seconds=3.0 if not st.dry else 1.0))
        st.result["data_images_per_s"] = e["images_per_s"]
    ckpt_step = None
    with st.item("run_then_sigkill") as e:
        ckpt_step = run_and_kill(st, run, args, plan, e)
    with st.item("resume") as e:
        if ckpt_step is None:
            e.update(status=SKIPPED, reason="no run was killed after a checkpoint (see run_then_sigkill)")
        else:
            summary = cli_json(["pretrain", *args, "--resume", "--json"], st.left() - 5, st.work / "resume.log")
            e.update(resumed_from_step=summary.get("resumed_from_step"), final_step=summary.get("steps"),
                     device=summary.get("device"), seconds=summary.get("seconds"))
            if summary.get("resumed_from_step") != ckpt_step or summary.get("steps") != plan["steps"]:
                raise RuntimeError(f"--resume started at step {summary.get('resumed_from_step')} (checkpoint: "
                                   f"{ckpt_step}) and ended at {summary.get('steps')} (asked: {plan['steps']})")
            steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            if steps != sorted(set(steps)):
                raise RuntimeError(f"metrics.jsonl repeats or reorders steps after the resume: {steps}")
            st.result["checkpoint"] = str(run / "checkpoint.pt")
    with st.item("loop_throughput") as e:
        e.update(**loop_rate(run, plan, ckpt_step))
        st.result["loop_images_per_s"] = e["images_per_s"]
        step = st.result.get("step_images_per_s")
        if step:
            st.result["loop_over_step"] = round(e["images_per_s"] / step, 3)
    r = st.result
    r["summary"] = (f"{plan['model']} batch {plan['batch']}: loop {r.get('loop_images_per_s')} img/s, step "
                    f"{r.get('step_images_per_s')} img/s (ratio {r.get('loop_over_step')}), data path alone "
                    f"{r.get('data_images_per_s')} img/s; killed after checkpoint step {ckpt_step}, resume "
                    f"{r['items'].get('resume', {}).get('status', 'not run')}")


def step_reference(plan: dict[str, Any], dry: bool) -> float:
    """img/s of the bare training step (bench.pretrain.Candidate) at the loop's model, batch and autocast policy."""
    import torch

    from bench.pretrain import Candidate, bench_candidates, ours_loss
    from mae.config import get_preset
    from mae.model import MaskedAutoencoder
    from training.loop import autocast_dtype

    cfg = get_preset(plan["preset"]).override(plan["sets"]).model
    dev = device()
    dtype = autocast_dtype("auto", dev)  # what the loop uses (run.amp=auto)
    x = torch.randn(plan["batch"], cfg.in_chans, *cfg.img_size, device=dev)

    def make() -> Candidate:
        torch.manual_seed(0)
        with torch.device(dev):
            model = MaskedAutoencoder(cfg)
        return Candidate("ours", model, ours_loss, dev, dtype)

    cands = bench_candidates([("ours", make)], x, steps=2 if dry else 10, rounds=2 if dry else 3)
    return round(cands[0].median(), 1)


def data_path_rate(folder: Path, plan: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The pretraining data path alone (the loop's dataset, transform, workers and collate; no model)."""
    import torch

    from mae.config import get_preset
    from mae.datasets import ImageDataset, collate_skipping_bad
    from mae.sources import load_source
    from training.augment import PretrainTransform

    cfg = get_preset(plan["preset"]).override(plan["sets"])
    source = load_source(folder)
    dataset = ImageDataset(source, list(range(len(source))), PretrainTransform(cfg), 0)
    order = [(int(i), 0) for i in torch.randperm(len(source))]  # (index, epoch) keys, as the loop's sampler gives
    loader = torch.utils.data.DataLoader(dataset, batch_size=plan["batch"], sampler=order,
                                         num_workers=plan["workers"], collate_fn=collate_skipping_bad, drop_last=True)
    images, started, first = 0, None, True
    for batch, _, _ in loader:
        if first:  # the workers' start-up is not the path's rate
            started, first = time.perf_counter(), False
            continue
        images += len(batch)
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started if started else 0.0
    return {"images_per_s": round(images / elapsed, 1) if elapsed and images else None, "workers": plan["workers"],
            "images": images}


def run_and_kill(st: Stage, run: Path, args: list[str], plan: dict[str, Any], entry: dict[str, Any]) -> int:
    """Start ``mae pretrain``; once the first checkpoint is written and training has gone past it, SIGKILL the
    process group (the DataLoader workers go too). Returns the checkpoint's step."""
    import torch

    log = st.work / "pretrain-killed.log"
    proc = popen([sys.executable, "-m", "cli", "pretrain", *args], log)
    ckpt, metrics = run / "checkpoint.pt", run / "metrics.jsonl"
    deadline = time.monotonic() + max(5.0, st.left() * 0.6)  # leave time for the resume
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            seen = max((r["step"] for r in rows), default=0)
            if seen > plan["ckpt_every"]:
                break
        time.sleep(0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"mae pretrain ended (status {proc.returncode}) before it could be killed; "
                           f"tail of its log:\n{tail(log)}")
    if seen <= plan["ckpt_every"]:
        signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"no checkpoint within the time left (last step logged {seen}); log:\n{tail(log)}")
    signal_group(proc, signal.SIGKILL)
    proc.wait()
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"])
    entry.update(killed_after_logged_step=seen, checkpoint_step=step, signal="SIGKILL")
    if step >= plan["steps"]:
        raise RuntimeError(f"the checkpoint is already the final one (step {step}); nothing left to resume")
    return step


def loop_rate(run: Path, plan: dict[str, Any], ckpt_step: int | None) -> dict[str, Any]:
    """The loop's img/s from metrics.jsonl: the median over log windows that are neither a process's first
    (worker start-up, first kernels) nor hold a checkpoint write or the final evaluation."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise RuntimeError("metrics.jsonl is empty")
    every, ckpt = plan["log_every"], plan["ckpt_every"]
    firsts = {rows[0]["step"]}  # the killed process's first window
    if ckpt_step is not None:  # the resumed process's (rows past the checkpoint were dropped on resume)
        firsts.add(min((r["step"] for r in rows if r["step"] > ckpt_step), default=-1))

    def saves_in(step: int) -> bool:  # a checkpoint written after logging step k falls in the next window
        return any(k % ckpt == 0 for k in range(max(step - every, 1), step))

    steady = [r for r in rows if r["step"] not in firsts and not saves_in(r["step"]) and "val_loss" not in r]
    used = steady or rows
    return {"images_per_s": round(statistics.median(r["images_per_s"] for r in used), 1),
            "windows": len(used), "windows_all": len(rows), "steady_only": bool(steady),
            "window_steps": every}



def report(result: dict[str, Any]) -> list[str]:
    if not result.get("plan"):
        return []
    it = result.get("items", {})
    kill, res = it.get("run_then_sigkill", {}), it.get("resume", {})
    return ["", "## Pretraining loop, kill and resume", "", f"`{result.get('command', '')}`", "",
            "| loop img/s | step img/s | loop / step | data path alone img/s | killed after step | checkpoint "
            "step | resumed from | final step |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {result.get('loop_images_per_s', '-')} | {result.get('step_images_per_s', '-')} | "
            f"{result.get('loop_over_step', '-')} | {result.get('data_images_per_s', '-')} | "
            f"{kill.get('killed_after_logged_step', '-')} | {kill.get('checkpoint_step', '-')} | "
            f"{res.get('resumed_from_step', '-')} | {res.get('final_step', '-')} |"]


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    return [Goal("real loop within 10% of the step throughput (loop / step >= 0.9)", result.get("loop_over_step"),
                 0.9, "{:.2f}")]
