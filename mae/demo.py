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

DEMO_PRESET = "mae_vit_mini_patch4_32"  # the small-data recipe (bench/quality.py)


def stage_pretrain(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    from mae.config import get_preset
    from training.pretrain import pretrain

    cfg = get_preset(DEMO_PRESET).override([f"run.epochs={args.epochs}"])
    run = Path(args.out) / "pretrain"
    print(f"[demo] pretraining {DEMO_PRESET} on {args.data} for {args.epochs} epochs -> {run}", flush=True)
    summary = pretrain(cfg, run, args.data, resume=True)
    ctx["pretrain"] = summary


# -- finetune, linear probe, evaluate, artifact (issue 3) ------------------------------------------------------


def stage_probe_and_finetune(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Linear probe (frozen encoder) and finetune from the pretrained checkpoint; each keeps its best-on-val."""
    from training.finetune import finetune, finetune_config, init_config

    init = ctx["pretrain"]["checkpoint"]
    base, state = init_config(init)
    for name, probe, epochs in (("probe", True, DEMO_PROBE_EPOCHS), ("finetune", False, DEMO_FINETUNE_EPOCHS)):
        cfg = finetune_config(base, probe, [f"run.epochs={epochs}"])
        run = Path(args.out) / name
        print(f"[demo] {'linear probe' if probe else 'finetune'} for {epochs} epochs -> {run}", flush=True)
        ctx[name] = finetune(cfg, init, run, args.data, state, linear_probe=probe, resume=True,
                             source_grid=base.model.grid_size)


def stage_evaluate(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """The table: raw pixels, a random-init encoder, the MAE encoder (kNN, probe) and the finetuned classifier."""
    from mae import artifact
    from mae.config import Config
    from mae.data import Preprocessing, load_source
    from training import evaluate as ev

    pre = artifact.read_checkpoint(ctx["pretrain"]["checkpoint"])
    ft = artifact.read_checkpoint(ctx["finetune"]["best_checkpoint"])
    cfg = Config.from_dict({k: v for k, v in pre.config.items() if k in ("model", "data", "run")})
    split = ev.Split.of(load_source(args.data), cfg.data.val_fraction, cfg.data.split_seed)
    prep = Preprocessing.from_config(cfg)
    print(f"[demo] evaluating on {args.data} ({len(split.train_idx)} train / {len(split.val_idx)} val)", flush=True)
    cache = Path(args.out) / "eval"
    seed = cfg.run.seed
    rows = {}
    for name, encoder, identity in (
        ("raw", ev.RawPixels(), "raw-pixels"),
        ("random", ev.random_init_encoder(cfg.model, pre.pooling, seed), f"random-{cfg.model}-{pre.pooling}-{seed}"),
        ("mae", pre.build(), f"{pre.source['sha256']}-{pre.pooling}"),
        ("finetuned", ft.build(), f"{ft.source['sha256']}-{ft.pooling}"),
    ):
        rows[name] = ev.evaluate_encoder(encoder, prep, split, labels=ft.labels if name == "finetuned" else None,
                                         identity=identity, cache_dir=cache,
                                         confusion_png=cache / "confusion_matrix.png")
    ctx["evaluate"] = {"pooling": pre.pooling, **rows}


def stage_artifact(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Export the finetuned classifier (embeddings + labelled logits) as the artifact later stages serve."""
    from mae import artifact

    out = Path(args.out) / "artifact"
    print(f"[demo] exporting {ctx['finetune']['best_checkpoint']} -> {out}", flush=True)
    art = artifact.load(artifact.from_checkpoint(ctx["finetune"]["best_checkpoint"], out))
    ctx["artifact"] = str(out)
    ctx["artifact_sha256"] = art.sha256


def summary_table(ctx: dict[str, Any]) -> list[str]:
    """The five figures of the demo's evaluation, one line each."""
    e = ctx["evaluate"]
    return [
        f"  {'val top-1 on ' + str(e['mae']['val_images']) + ' images':<34} (pooling: {e['pooling']})",
        f"    raw-pixel kNN                  {e['raw']['knn_top1']:.4f}",
        f"    random-init encoder probe      {e['random']['probe_top1']:.4f}",
        f"    MAE encoder probe              {e['mae']['probe_top1']:.4f}   "
        f"(mae finetune --linear-probe: {ctx['probe']['best_val_top1']:.4f})",
        f"    MAE encoder kNN                {e['mae']['knn_top1']:.4f}",
        f"    finetuned top-1                {e['finetuned']['top1']:.4f}",
        f"  artifact        {ctx['artifact']} (sha256 {ctx['artifact_sha256'][:12]})",
    ]


DEMO_PROBE_EPOCHS = 5
DEMO_FINETUNE_EPOCHS = 5

STAGES = [stage_pretrain, stage_probe_and_finetune, stage_evaluate, stage_artifact]


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    ctx: dict[str, Any] = {"out": str(Path(args.out).resolve())}
    for stage in STAGES:
        stage(ctx, args)
    ctx["seconds"] = round(time.perf_counter() - started, 1)
    p = ctx["pretrain"]
    lines = [
        f"demo finished in {ctx['seconds']} s; everything is under {ctx['out']}",
        f"  pretraining     {p['steps']} steps, loss {_num(p['loss'])}, val_loss {_num(p['val_loss'])}",
        f"  checkpoint      {p['checkpoint']}",
        f"  loss curve      {p['loss_curve']}",
        f"  reconstruction  {p['reconstruction']}",
    ]
    if "evaluate" in ctx:
        lines += summary_table(ctx)
    ctx["text"] = "\n".join(lines)
    return ctx


def _num(value: float | None) -> str:
    """A loss for the summary; None when a rerun found the stage finished and trained nothing."""
    return "(finished earlier)" if value is None else f"{value:.4f}"
