"""Stage 5, finetune: ``mae finetune`` of the pretrain_loop stage's checkpoint for 100 steps (bf16 autocast, layer
decay, mixup/cutmix); a fresh MAE of the same config stands in when that stage left none."""

from __future__ import annotations

import json
import shutil
import statistics
from typing import Any

from bench.device.inputs import init_checkpoint, loop_plan, photo_folder
from bench.device.stage import Goal, Stage, cli_json

NAME = "finetune"
BUDGET = (35, 60)


def run(st: Stage) -> None:
    plan = loop_plan(st.dry)
    steps, batch = (10, 8) if st.dry else (100, 128)
    with st.item("images") as e:
        folder = photo_folder(st.work, st.dry)
        e["folder"] = str(folder)
    with st.item("init") as e:  # fails alone: a fresh MAE of the same config stands in for the pretraining run
        init, e["source"] = init_checkpoint(st.work, plan)
        e["checkpoint"] = str(init)
    out = st.work / "finetune"
    shutil.rmtree(out, ignore_errors=True)
    args = ["finetune", "--init", str(init), "--data", str(folder), "--out", str(out), "--batch-size", str(batch),
            "--set", f"run.steps={steps}", "--set", "run.log_every=5" if st.dry else "run.log_every=10",
            "--set", f"data.num_workers={plan['workers']}", "--json"]
    st.result["command"] = "mae " + " ".join(args)
    with st.item("finetune") as e:
        summary = cli_json(args, st.left() - 5, st.work / "finetune.log")
        cfg = json.loads((out / "config.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
        import torch

        from training.loop import autocast_dtype

        amp = autocast_dtype(cfg["run"]["amp"], torch.device(summary["device"].split(":")[0]))
        e.update(steps=summary["steps"], device=summary["device"], seconds=summary["seconds"],
                 val_top1=round(summary["val_top1"], 4) if summary.get("val_top1") is not None else None,
                 autocast=str(amp).replace("torch.", "") if amp else "off",
                 layer_decay=cfg["finetune"]["layer_decay"], mixup=cfg["finetune"]["mixup"],
                 cutmix=cfg["finetune"]["cutmix"], batch=cfg["optim"]["batch_size"],
                 images_per_s=round(statistics.median(ips[1:] or ips), 1) if ips else None)
        if summary["steps"] != steps:
            raise RuntimeError(f"finetune stopped at step {summary['steps']}, asked for {steps}")
        losses = [r["loss"] for r in rows if "loss" in r]
        if not losses or not all(map(finite, losses)):
            raise RuntimeError(f"finetune losses are not all finite: {losses}")
        st.result.update({k: e[k] for k in ("steps", "autocast", "layer_decay", "mixup", "images_per_s",
                                            "val_top1")})
    r = st.result
    r["summary"] = (f"{r.get('steps')} steps, autocast {r.get('autocast')}, layer decay {r.get('layer_decay')}, "
                    f"mixup {r.get('mixup')}: {r.get('images_per_s')} img/s, val top-1 {r.get('val_top1')}")


def finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def report(result: dict[str, Any]) -> list[str]:
    if not result.get("items"):
        return []
    f = result["items"].get("finetune", {})
    return ["", "## Finetune", "", f"`{result.get('command', '')}`", "",
            f"{f.get('status')}: {f.get('steps', '-')} steps on {f.get('device', '-')}, autocast "
            f"{f.get('autocast', '-')}, layer decay {f.get('layer_decay', '-')}, mixup {f.get('mixup', '-')} / "
            f"cutmix {f.get('cutmix', '-')}, batch {f.get('batch', '-')}: {f.get('images_per_s', '-')} img/s, "
            f"val top-1 {f.get('val_top1', '-')} (labels: which photograph a crop came from; plumbing, not "
            "accuracy)"
            + (f"; {f.get('error')}" if f.get("error") else "")]


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    return []
