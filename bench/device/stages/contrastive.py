"""Stage 6, contrastive: ``mae finetune --contrastive`` (MAE-CT) of the pretrain_loop stage's checkpoint, ViT-B/16 at
224 px in bf16 autocast on the photo folder: 60 steps at batch 128 (two views per image), 15 of the NNCLR heads on
the frozen encoder then 45 of the upper 6 blocks with the heads, a 4,096-projection queue. Reported: img/s of the
tuning stage (median of its log windows after the first, from metrics.jsonl: the loop, data path included), step
time, TFLOP/s and MFU from analytic FLOPs (``tuning_step_flops``, checked against torch's counter on the same model)
against the measured bf16 matmul peak and, where known, the datasheet's. A fresh MAE of the same config stands in
when pretrain_loop left no checkpoint of its model. The dry run tunes the toy ViT with narrow heads on the CPU."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from typing import Any

from bench.device.inputs import init_checkpoint, loop_plan, photo_folder
from bench.device.stage import Goal, Stage, cli_json, device, free_memory, num, sig
from bench.device.stages.pretrain_step import measure_peak

NAME = "contrastive"
BUDGET = (40, 60)
VIEWS = 2  # training.contrastive.VIEWS: each image goes through the encoder twice
CONFIG_SECTIONS = ("model", "data", "optim", "run", "finetune", "contrastive", "preset")
"""The Config sections of a run folder's config.json (the rest is the run's record: stage steps, frozen blocks)."""


def plan(dry: bool) -> dict[str, Any]:
    """The tuning run: the pretraining run's model (``loop_plan``), its steps (shared heads : tuning as
    ``head_epochs : epochs``, 1 : 3), batch and ``--set`` overrides."""
    loop = loop_plan(dry)
    sets = ["contrastive.head_epochs=1", "contrastive.epochs=3", f"data.num_workers={loop['workers']}"]
    if dry:  # the toy encoder is 64 wide: the default 2048 / 4096 heads would be most of its work
        sets += ["contrastive.queue_size=64", "contrastive.proj_hidden_dim=128", "contrastive.pred_hidden_dim=256",
                 "contrastive.output_dim=32", "run.log_every=2"]
        return {**loop, "steps": 12, "batch": 8, "overrides": sets}
    sets += ["contrastive.queue_size=4096", "run.log_every=5", "run.amp=bf16", "data.val_fraction=0.05"]
    return {**loop, "steps": 60, "batch": 128, "overrides": sets}


def run(st: Stage) -> None:
    p = plan(st.dry)
    dev = device()
    with st.item("images") as e:
        folder = photo_folder(st.work, st.dry)
        e["folder"] = str(folder)
    with st.item("init") as e:
        init, source = init_checkpoint(st.work, p)
        e.update(checkpoint=str(init), source=source)
    with st.item("matmul_peak") as e:
        e["tflops"] = measure_peak(st, dev)
    free_memory()
    out = st.work / "contrastive"
    shutil.rmtree(out, ignore_errors=True)
    args = ["finetune", "--contrastive", "--init", str(init), "--data", str(folder), "--out", str(out),
            "--batch-size", str(p["batch"]), "--set", f"run.steps={p['steps']}"]
    for s in p["overrides"]:
        args += ["--set", s]
    st.result["command"] = "mae " + " ".join(args)
    with st.item("tune") as e:
        summary = cli_json([*args, "--json"], st.left() - 5, st.work / "contrastive.log")
        record = json.loads((out / "config.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        e.update(measure(record, rows, summary, st.result), model=p["model"])
        if summary["steps"] != p["steps"]:
            raise RuntimeError(f"contrastive tuning stopped at step {summary['steps']}, asked for {p['steps']}")
        if not e["losses_finite"]:
            raise RuntimeError(f"contrastive losses are not all finite: {[r.get('loss') for r in rows]}")
        st.result.update({k: e.get(k) for k in ("model", "stage_steps", "batch", "frozen_blocks", "autocast",
                                                "images_per_s", "step_ms", "gflop_per_image", "tflops",
                                                "mfu_measured_peak", "mfu_nominal_peak", "losses_finite")})
    free_memory()
    if not (out / "config.json").exists():
        st.skip("flop_formula_check", "the tuning run wrote no config.json (see the tune item)")
    else:
        with st.item("flop_formula_check") as e:  # the analytic count against torch's counter, attention unfused
            cfg = run_config(json.loads((out / "config.json").read_text()))
            e.update({f"{stage}_counter_over_analytic": round(counted_step_flops(cfg, 2, stage, dev)
                                                              / tuning_step_flops(cfg, 2, stage), 4)
                      for stage in ("head", "tune")})
    r = st.result
    steps = r.get("stage_steps") or {}
    r["summary"] = (f"{r.get('model')}, {steps.get('head', '-')} heads + {steps.get('tune', '-')} tuning steps at "
                    f"batch {r.get('batch')} x {VIEWS} views, autocast {r.get('autocast')}: tuning "
                    f"{r.get('images_per_s')} img/s, {r.get('tflops')} TFLOP/s, MFU "
                    f"{num(r.get('mfu_measured_peak'), '.1%')} of the measured peak")


def measure(record: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any], result: dict[str, Any]
            ) -> dict[str, Any]:
    """The run's figures from its config.json (``record``), metrics.jsonl (``rows``) and JSON summary: each stage's
    img/s (median of its log windows after the first, which holds the workers' start), step time, FLOP/s, MFU."""
    import torch

    from training.loop import autocast_dtype

    cfg = run_config(record)
    amp = autocast_dtype(cfg.run.amp, torch.device(summary["device"].split(":")[0]))
    batch = record["effective_batch"]
    out: dict[str, Any] = {"steps": summary["steps"], "device": summary["device"], "run_seconds": summary["seconds"],
                           "stage_steps": record["stage_steps"], "batch": batch,
                           "frozen_blocks": record["frozen_blocks"], "queue": cfg.contrastive.queue_size,
                           "autocast": str(amp).replace("torch.", "") if amp else "off",
                           "losses_finite": bool(rows) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r),
                           "final_loss": round(rows[-1]["loss"], 4) if rows and "loss" in rows[-1] else None}
    peak, nominal = result.get("measured_peak_flops"), result.get("nominal_peak_tflops")
    for stage in ("head", "tune"):
        ips = [r["images_per_s"] for r in rows if r.get("stage") == stage and "images_per_s" in r]
        if not ips:
            continue
        rate = statistics.median(ips[1:] or ips)
        flops = tuning_step_flops(cfg, batch, stage) / batch  # per image, both views
        key = "" if stage == "tune" else "head_"
        out.update({f"{key}images_per_s": round(rate, 1), f"{key}step_ms": round(batch / rate * 1e3, 2),
                    f"{key}gflop_per_image": round(flops / 1e9, 3), f"{key}tflops": sig(flops * rate / 1e12),
                    f"{key}mfu_measured_peak": sig(flops * rate / peak) if peak else None,
                    f"{key}mfu_nominal_peak": sig(flops * rate / (nominal * 1e12)) if nominal else None,
                    f"{key}windows": len(ips[1:] or ips)})
    return out


def run_config(record: dict[str, Any]) -> Any:
    """The run's Config from its config.json."""
    from mae.config import Config

    return Config.from_dict({k: v for k, v in record.items() if k in CONFIG_SECTIONS})


def tuning_step_flops(cfg: Any, batch: int, stage: str = "tune") -> float:
    """FLOPs of one contrastive step of ``stage`` ("head" or "tune") on ``batch`` images, from the shapes alone.

    Matrix products only, 2 FLOPs per multiply-add, each image's two views through the encoder (the class token
    included: T = L + 1 tokens); ``block(T, D, H)`` and the patch embedding as ``bench.pretrain.analytic_step_flops``
    counts them. With ``k`` frozen blocks (``contrastive.frozen_blocks``), per view::

        heads: P = 2(D*Hp + Hp*Hp + Hp*O) projector, Q = 2(O*Hq + Hq*O) predictor    (forward)
        head stage = 2L*Pix*D + depth * block             the whole encoder forward, without autograd
                   + 3(P + Q) - 2D*Hp                     heads forward + backward (the first layer's input
                                                          gradient is not needed: the encoder is frozen)
        tune stage = 2L*Pix*D (x2 when k = 0: the stem's weight gradient)
                   + k * block                            frozen blocks: forward only, without autograd
                   + 3 (depth - k) * block                upper blocks: forward + backward (2x forward)
                   + 3(P + Q) + P                         heads forward + backward, the EMA target projector

    The queue's nearest-neighbour search (2 x Q_size x O per view) and the loss are left out: under 0.1% of a
    ViT-B step. ViT-B/16 at 224 with 6 of 12 blocks frozen and the default heads: 140.2 GFLOP per tuned image
    (70.3 per image in the head stage), against 58.5 per MAE pretraining image.
    """
    from training.contrastive import frozen_depth

    m, c = cfg.model, cfg.contrastive
    d, length = m.embed_dim, m.num_patches
    t, h = length + 1, m.mlp_ratio * d
    block = 8 * t * d * d + 4 * t * d * h + 4 * t * t * d
    patch = 2 * length * m.patch_size**2 * m.in_chans * d
    first = 2 * d * c.proj_hidden_dim
    proj = first + 2 * c.proj_hidden_dim**2 + 2 * c.proj_hidden_dim * c.output_dim
    pred = 4 * c.output_dim * c.pred_hidden_dim
    if stage == "head":
        view = patch + m.depth * block + 3 * (proj + pred) - first
    elif stage == "tune":
        k = frozen_depth(cfg)
        view = patch * (2 if k == 0 else 1) + k * block + 3 * (m.depth - k) * block + 3 * (proj + pred) + proj
    else:
        raise ValueError(f"stage must be head or tune, got {stage!r}")
    return float(VIEWS * view * batch)


def counted_step_flops(cfg: Any, batch: int, stage: str, dev: Any) -> float:
    """FLOPs of one step of ``stage`` on ``batch`` random images, counted by torch's FlopCounterMode on the model
    the run trains (``training.contrastive.ContrastiveViT``, frozen as the stage freezes it), attention unfused."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.contrastive import ContrastiveViT, frozen_depth

    c = cfg.contrastive
    torch.manual_seed(0)
    with torch.device(dev):
        model = ContrastiveViT(cfg.model, c.pooling, c.proj_hidden_dim, c.pred_hidden_dim, c.output_dim)
    model.freeze(frozen_depth(cfg) if stage == "tune" else None)
    model.use_target = stage == "tune"
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.randn(batch, VIEWS, cfg.model.in_chans, *cfg.model.img_size, device=dev)  # (N, 2, C, H, W)
    with FlopCounterMode(display=False) as counter:
        predicted, _, _ = model(x)
        predicted.float().square().mean().backward()
    return float(counter.get_total_flops())


def report(result: dict[str, Any]) -> list[str]:
    if not result.get("items"):
        return []
    t = result["items"].get("tune", {})
    check = result["items"].get("flop_formula_check", {})
    steps = t.get("stage_steps") or {}
    lines = ["", "## Contrastive tuning (MAE-CT: NNCLR heads, then the upper blocks)", "",
             f"`{result.get('command', '')}`", "",
             f"{t.get('status')} on {t.get('device', '-')}, {t.get('model', '-')}, autocast {t.get('autocast', '-')}, "
             f"batch {t.get('batch', '-')} images x {VIEWS} views, {t.get('frozen_blocks', '-')} blocks frozen while "
             f"tuning, queue {t.get('queue', '-')}; losses finite: {t.get('losses_finite', '-')} (final "
             f"{t.get('final_loss', '-')}); {t.get('run_seconds', '-')} s for the run"
             + (f"; {t.get('error')}" if t.get("error") else ""), "",
             f"img/s are the loop's (median of metrics.jsonl windows after each stage's first; two views decoded and "
             f"cropped per image in the workers). FLOPs are analytic (bench.device.stages.contrastive."
             f"tuning_step_flops); torch's counter / formula = {check.get('head_counter_over_analytic', '-')} "
             f"(heads), {check.get('tune_counter_over_analytic', '-')} (tuning). Measured bf16 matmul peak "
             f"{result.get('measured_peak_tflops', '-')} TFLOP/s; datasheet "
             f"{result.get('nominal_peak_tflops') or '-'} TFLOP/s.", "",
             "| stage | steps | img/s | step ms | GFLOP/image | TFLOP/s | MFU (measured / datasheet peak) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, stage, key in (("heads (encoder frozen)", "head", "head_"), ("tuning (upper blocks + heads)", "tune",
                                                                             "")):
        mfu = " / ".join(num(t.get(f"{key}{k}"), ".1%") for k in ("mfu_measured_peak", "mfu_nominal_peak"))
        lines.append(f"| {label} | {steps.get(stage, '-')} | {num(t.get(f'{key}images_per_s'), '.1f')} | "
                     f"{t.get(f'{key}step_ms', '-')} | {t.get(f'{key}gflop_per_image', '-')} | "
                     f"{t.get(f'{key}tflops', '-')} | {mfu} |")
    return lines


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    ips = result.get("images_per_s")
    nominal = bool(result.get("nominal_peak_tflops"))
    mfu = result.get("mfu_nominal_peak" if nominal else "mfu_measured_peak")
    if ips is None:
        value, shown = None, None
    else:
        missing = [why for why, bad in (("autocast " + str(result.get("autocast")), result.get("autocast")
                                         != "bfloat16"), ("non-finite losses", not result.get("losses_finite")),
                                        ("no MFU", mfu is None)) if bad]
        value = 0.0 if missing else 1.0
        shown = (f"{ips:.0f} img/s, MFU {num(mfu, '.1%')} ({'datasheet' if nominal else 'measured'} peak)"
                 + (f"; {', '.join(missing)}" if missing else ""))
    return [Goal("ViT-B/16 contrastive tuning runs in bf16 with finite losses; img/s and MFU reported", value, 1.0,
                 shown=shown)]
