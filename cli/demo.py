"""``mae demo``: a small real run of every stage on a bundled dataset, on a laptop CPU.

Part of the face (``cli``), above every stage, so it may import the stage folders, lazily. Each stage is a
function ``(ctx, args) -> None`` that reads what earlier stages left in ``ctx`` and adds its own results;
re-running the demo continues finished stages instead of repeating them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mae.flags import add_json_flag

DEMO_PRESET = "mae_vit_mini_patch4_32"  # the small-data recipe (bench/quality.py)
DEMO_PROBE_EPOCHS = 5
DEMO_FINETUNE_EPOCHS = 5
# Contrastive steps per pretraining step: a tuning step embeds two whole views of each image where a pretraining
# step encodes a quarter of one, so 1/12 of the steps costs about a quarter of the pretraining's time.
DEMO_TUNE_STEPS_PER_PRETRAIN_STEP = 1 / 12


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to ``mae``."""
    p = sub.add_parser("demo", help="a small real run of every stage on a bundled dataset")
    p.add_argument("--out", default="demo", help="folder for the demo's runs, artifact and index")
    p.add_argument("--data", default="mnist5k", help="bundled dataset to use")
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs (15 take about 3 minutes on 2 cores)")
    p.add_argument("--no-serve", action="store_true", help="stop before starting the HTTP server")
    add_json_flag(p)
    p.set_defaults(handler="cli.demo:main")


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the summary (one JSON object with --json)."""
    print(message, file=sys.stderr, flush=True)


def stage_pretrain(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    from mae.config import get_preset
    from training.pretrain import pretrain

    cfg = get_preset(DEMO_PRESET).override([f"run.epochs={args.epochs}"])
    run = Path(args.out) / "pretrain"
    say(f"[demo] pretraining {DEMO_PRESET} on {args.data} for {args.epochs} epochs -> {run}")
    summary = pretrain(cfg, run, args.data, resume=True)
    ctx["pretrain"] = summary


def stage_contrastive(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Contrastive tuning (MAE-CT, no labels) of the pretrained encoder into a search embedding, in about a quarter
    of the pretraining's time: the preset's recipe, shortened in proportion to the pretraining."""
    from mae.sources import load_source
    from training.contrastive import contrastive_config, tune
    from training.finetune import init_config

    init = ctx["pretrain"]["checkpoint"]
    loaded = init_config(init)
    steps = max(2, round(ctx["pretrain"]["steps"] * DEMO_TUNE_STEPS_PER_PRETRAIN_STEP))
    cfg = contrastive_config(loaded[0], [f"run.steps={steps}"])
    run = Path(args.out) / "contrastive"
    say(f"[demo] contrastive tuning ({cfg.contrastive.augment} views, no labels) for {steps} steps -> {run}")
    ctx["contrastive"] = tune(cfg, init, run, args.data, resume=True, loaded=loaded)
    ctx["labelled"] = load_source(args.data).labelled


def stage_probe_and_finetune(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Linear probe (frozen encoder) and finetune from the pretrained checkpoint; each keeps its best-on-val.
    Data without labels has nothing to classify: the tuned encoder is then what the demo exports."""
    from training.finetune import finetune, finetune_config, init_config

    if not ctx.get("labelled", True):
        say(f"[demo] {args.data} has no labels: no probe or finetune; the tuned encoder is the demo's artifact")
        return
    init = ctx["pretrain"]["checkpoint"]
    base, state = init_config(init)
    for name, probe, epochs in (("probe", True, DEMO_PROBE_EPOCHS), ("finetune", False, DEMO_FINETUNE_EPOCHS)):
        cfg = finetune_config(base, probe, [f"finetune.{'probe_' if probe else ''}epochs={epochs}"])
        run = Path(args.out) / name
        say(f"[demo] {'linear probe' if probe else 'finetune'} for {epochs} epochs -> {run}")
        ctx[name] = finetune(cfg, init, run, args.data, state, linear_probe=probe, resume=True,
                             source_grid=base.model.grid_size)


def stage_evaluate(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """The table: raw pixels, a random-init encoder, the MAE encoder and the tuned one (kNN, probe) and the
    finetuned classifier."""
    from mae import artifact
    from mae.config import Config
    from mae.images import Preprocessing
    from training import evaluate as ev

    if "finetune" not in ctx:  # no labels: nothing to score against
        return
    pre = artifact.read_checkpoint(ctx["pretrain"]["checkpoint"])
    tuned = artifact.read_checkpoint(ctx["contrastive"]["checkpoint"])
    ft = artifact.read_checkpoint(ctx["finetune"]["best_checkpoint"])
    cfg = Config.from_dict({k: v for k, v in pre.config.items() if k in ("model", "data", "run")})
    split = ev.split_of(args.data, cfg.data.val_fraction, cfg.data.split_seed)
    prep = Preprocessing.from_config(cfg)
    say(f"[demo] evaluating on {args.data} ({len(split.train)} train / {split.val_size} val)")
    cache = Path(args.out) / "eval"
    seed = cfg.run.seed
    rows = {}
    for name, encoder, identity in (
        ("raw", ev.RawPixels(), "raw-pixels"),
        ("random", ev.random_init_encoder(cfg.model, pre.pooling, seed), f"random-{cfg.model}-{pre.pooling}-{seed}"),
        ("mae", pre.build(), f"{pre.source['sha256']}-{pre.pooling}"),
        ("tuned", tuned.build(), f"{tuned.source['sha256']}-{tuned.pooling}"),
        ("finetuned", ft.build(), f"{ft.source['sha256']}-{ft.pooling}"),
    ):
        rows[name] = ev.evaluate_encoder(encoder, prep, split, labels=ft.labels if name == "finetuned" else None,
                                         identity=identity, cache_dir=cache,
                                         confusion_png=cache / "confusion_matrix.png")
    ctx["evaluate"] = {"pooling": pre.pooling, **rows}


def stage_artifact(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Export the finetuned classifier (embeddings + labelled logits) as the artifact later stages serve; without
    labels, the contrastively tuned encoder (the better search embedding)."""
    from mae import artifact
    from mae.files import sha256_file

    out = Path(args.out) / "artifact"
    checkpoint = ctx["finetune"]["best_checkpoint"] if "finetune" in ctx else ctx["contrastive"]["checkpoint"]
    made_from = artifact.read_config(out).get("source", {}).get("sha256") if (out / artifact.CONFIG).exists() else None
    if made_from != sha256_file(checkpoint):  # a rerun keeps the artifact (and its ONNX files) of the same weights
        say(f"[demo] exporting {checkpoint} -> {out}")
        artifact.from_checkpoint(checkpoint, out)
    art = artifact.load(out)
    ctx["artifact"] = str(out)
    ctx["artifact_sha256"] = art.sha256


def stage_export(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """ONNX fp32 + int8 of the demo artifact, each checked against PyTorch on real images (figures printed)."""
    from export.onnx import export_onnx, summary_lines
    from mae import artifact

    path = Path(ctx.get("artifact") or Path(args.out) / "artifact")
    if not (path / artifact.CONFIG).exists():
        artifact.from_checkpoint(ctx["pretrain"]["checkpoint"], path)
    config = artifact.read_config(path)
    record = config.get("export", {})
    done = (record.get("artifact_sha256") == config["sha256"] and (path / "encoder.onnx").exists()
            and (path / "encoder.int8.onnx").exists())
    if not done:
        say(f"[demo] exporting {path} to ONNX fp32 + int8 and checking both against PyTorch")
        record = export_onnx(path, int8=True)
    ctx["artifact"] = str(path)
    ctx["export"] = {"artifact": str(path), "lines": summary_lines(record),
                     "parity_images": record["parity_data"]["images"]}


def stage_retrieval(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Index the held-out images of the demo set with the demo artifact and search it by image."""
    import numpy as np

    from mae import artifact as artifact_lib
    from mae.sources import export_source, load_source, split_data
    from retrieval.build import build_index, collection, load_embedder
    from retrieval.index import Index
    from retrieval.pictures import contact_sheet

    out = Path(args.out)
    art = ctx.get("artifact") or ctx.get("export", {}).get("artifact")
    if not art:  # no export stage ran before this one: export the pretrained encoder here
        art = str(artifact_lib.from_checkpoint(ctx["pretrain"]["checkpoint"], out / "artifact"))
        ctx["artifact"] = art
    images = out / "images"
    if not any(images.glob("*/*.png")):
        held_out = split_data(load_source(args.data))
        say(f"[demo] writing the {held_out.val_size} held-out {args.data} images to {images}")
        export_source(held_out.source, images, held_out.val)
    index_dir = out / "index"
    sha = artifact_lib.read_config(art)["sha256"]
    if (index_dir / "manifest.json").exists() and Index.load(index_dir).artifact_sha256 == sha:
        say(f"[demo] reusing the index {index_dir}")
    else:
        say(f"[demo] indexing {images} with {art} -> {index_dir}")
        build_index(art, [images], index_dir, overwrite=True)
    idx = Index.load(index_dir, artifact_sha256=sha)
    embedder = load_embedder(idx, art)
    files, labels = collection([images])
    picks = np.linspace(0, len(files) - 1, min(200, len(files))).round().astype(int)
    hits = idx.search(embedder.embed([files[i] for i in picks]), 6)
    # kNN agreement: share of the 5 nearest other images that carry the query's label (chance is ~1/classes)
    agree = [np.mean([h.label == labels[i] for h in row if h.path != str(files[i])][:5]) for i, row in zip(picks, hits)]
    query, neighbours = files[picks[0]], [h for h in hits[0] if h.path != str(files[picks[0]])][:5]
    sheet = contact_sheet(query, hits[0], out / "search.png")
    say(f"[demo] nearest neighbours of {query} (label {labels[picks[0]]}):")
    for r, h in enumerate(neighbours):
        say(f"         {r + 1}. {h.score:.4f}  label {h.label}  {h.path}")
    ctx["retrieval"] = {"index": str(index_dir), "count": idx.count, "factory": idx.factory,
                        "label_agreement@5": round(float(np.mean(agree)), 4), "query": str(query),
                        "neighbours": [{"score": h.score, "label": h.label, "path": h.path} for h in neighbours],
                        "contact_sheet": str(sheet)}


def stage_serve(ctx: dict[str, Any], args: argparse.Namespace) -> None:
    """Plan the HTTP server on the demo's artifact and index (``--no-serve`` skips it).

    The server itself is started by ``main`` once the summary is written, so that nothing can fail between
    starting it and handing it to ``_serve_until_interrupted``, which stops it however the demo ends.
    """
    if args.no_serve:
        return
    from mae.artifact import read_config

    out = Path(args.out)
    artifact = Path(ctx.get("artifact") or out / "artifact")
    read_config(artifact)  # a missing artifact is reported here, in one line, not from inside the server
    index = ctx.get("retrieval", {}).get("index") or (out / "index" if (out / "index" / "manifest.json").exists()
                                                       else None)
    example = ctx.get("retrieval", {}).get("query") or _example_image(out, args.data)
    ctx["serve"] = {"artifact": str(artifact), "index": str(index) if index else None, "example": str(example),
                    "log": str(out / "serve.log")}


def _example_image(out: Path, data: str) -> Path:
    """An image for the printed curl line: the first of the demo's data set, written out as PNG."""
    from mae.sources import export_source, load_source

    return export_source(load_source(data), out / "example", [0])[0]



STAGES = [stage_pretrain, stage_contrastive, stage_probe_and_finetune, stage_evaluate, stage_artifact, stage_export,
          stage_retrieval, stage_serve]


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
        f"    tuned encoder kNN (no labels)  {e['tuned']['knn_top1']:.4f}   (mae finetune --contrastive, "
        f"{ctx['contrastive']['steps']} steps, {ctx['contrastive']['pooling']} pooling; probe "
        f"{e['tuned']['probe_top1']:.4f})",
        f"    finetuned top-1                {e['finetuned']['top1']:.4f}",
        f"  artifact        {ctx['artifact']} (sha256 {ctx['artifact_sha256'][:12]})",
    ]


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
    if "contrastive" in ctx:
        c = ctx["contrastive"]
        share = (f" ({c['seconds'] / p['seconds']:.0%} of the pretraining's)"
                 if p["resumed_from_step"] is None and c["resumed_from_step"] is None and p["seconds"] else "")
        lines += [f"  contrastive     {c['steps']} steps in {c['seconds']} s{share}",
                  f"  neighbours      {c.get('neighbours')} (untuned / tuned)"]
    if "evaluate" in ctx:
        lines += summary_table(ctx)
    if "export" in ctx:
        e = ctx["export"]
        lines.append(f"  export          {e['artifact']}: parity vs PyTorch on {e['parity_images']} real images")
        lines += ["  " + line for line in e["lines"]]
    if "retrieval" in ctx:
        r = ctx["retrieval"]
        lines += [
            f"  index           {r['index']} ({r['count']} images, {r['factory']}); "
            f"top-5 label agreement {r['label_agreement@5']:.1%}",
            f"  search sheet    {r['contact_sheet']}",
        ]
    ctx["text"] = "\n".join(lines)
    if "serve" in ctx:
        return _serve_until_interrupted(ctx, args)
    return ctx


def _serve_until_interrupted(ctx: dict[str, Any], args: argparse.Namespace) -> int:
    """Start the server, print the summary with its URL and a curl line, then serve until Ctrl-C, SIGTERM or
    SIGHUP (or until the server exits). The server has its own process group; it is stopped here in every case."""
    import json
    import signal

    from serving.command import curl_line, start, stop

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    s = ctx["serve"]
    say(f"[demo] starting the server on {s['artifact']}" + (f" with index {s['index']}" if s["index"] else ""))
    proc, url = start(s["artifact"], s["index"], port=3000, log=Path(s["log"]))
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupt)
        s.update(url=url, curl=curl_line(url, s["example"], "search" if s["index"] else "embed"))
        ctx["text"] += "\n" + "\n".join([f"  page            {url}", f"  try             {s['curl']}",
                                         f"  server log      {s['log']}   (Ctrl-C stops the server)"])
        print(json.dumps({k: v for k, v in ctx.items() if k != "text"}, default=str) if args.json else ctx["text"],
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
