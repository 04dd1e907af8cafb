"""``mae demo``: a small real run of every stage on a bundled dataset, on a laptop CPU.

Part of the CLI layer (like ``mae.cli``), so it may import the stage folders, lazily. Each stage is a
function ``(ctx, args) -> None`` that reads what earlier stages left in ``ctx`` and adds its own results;
re-running the demo continues finished stages instead of repeating them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEMO_PRESET = "mae_vit_tiny_patch4_32"


def stage_pretrain(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    from mae.config import get_preset
    from training.pretrain import pretrain

    cfg = get_preset(DEMO_PRESET).override([f"run.epochs={args.epochs}"])
    run = Path(args.out) / "pretrain"
    print(f"[demo] pretraining {DEMO_PRESET} on {args.data} for {args.epochs} epochs -> {run}", flush=True)
    summary = pretrain(cfg, run, args.data, resume=True)
    ctx["pretrain"] = summary


STAGES = [stage_pretrain]


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    ctx: dict[str, Any] = {"out": str(Path(args.out).resolve())}
    for stage in STAGES:
        stage(ctx, args)
    ctx["seconds"] = round(time.perf_counter() - started, 1)
    p = ctx["pretrain"]
    lines = [
        f"demo finished in {ctx['seconds']} s; everything is under {ctx['out']}",
        f"  pretraining     {p['steps']} steps, loss {p['loss']:.4f}, val_loss {p['val_loss']:.4f}",
        f"  checkpoint      {p['checkpoint']}",
        f"  loss curve      {p['loss_curve']}",
        f"  reconstruction  {p['reconstruction']}",
    ]
    ctx["text"] = "\n".join(lines)
    return ctx
