"""``mae pretrain``, ``mae finetune`` and ``mae evaluate``: their flags. The handlers live beside the stages
(``training.pretrain:main`` ...) and are imported only when the command runs, so this module stays stdlib-only."""

from __future__ import annotations

import argparse
from typing import Any

from mae.flags import DATA_HELP, LABELLED_DATA_HELP, add_json_flag, add_overrides_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain``, ``finetune`` and ``evaluate`` to ``mae``."""
    p = sub.add_parser("pretrain", help="pretrain a masked autoencoder")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--preset", default="mae_vit_tiny_patch4_32", help="a preset name (mae pretrain --list-presets)")
    p.add_argument("--out", help="run folder: checkpoint.pt, config.json, metrics.jsonl, pictures")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training split (run.epochs)")
    length.add_argument("--steps", type=int, help="total optimiser steps (run.steps; overrides epochs)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step (optim.batch_size)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (starts fresh when there is none)")
    add_overrides_flag(p, "model.mask_ratio=0.8 or optim.blr=1e-3")
    add_json_flag(p)
    p.set_defaults(handler="training.pretrain:main")

    p = sub.add_parser("finetune", help="finetune (or linear-probe) a pretrained encoder for classification, or "
                                        "tune it into a search embedding without labels (--contrastive)")
    p.add_argument("--init", required=True, help="RUN/checkpoint.pt of a pretraining run, or official MAE weights")
    p.add_argument("--data", required=True, help=LABELLED_DATA_HELP + "; --contrastive needs no labels: any "
                                                  "folder, list or shards")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, config.json, metrics.jsonl")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--linear-probe", action="store_true",
                       help="frozen encoder, class token (finetune.probe_pool), BatchNorm1d(affine=False) + Linear, "
                            "crop + flip only")
    stage.add_argument("--contrastive", action="store_true",
                       help="MAE-CT: NNCLR heads on the frozen encoder, then the upper blocks with layer decay; no "
                            "labels (contrastive.*); mae export of its checkpoint serves the tuned embedding")
    p.add_argument("--augment", choices=("crop", "colour", "copy"),
                   help="--contrastive views (contrastive.augment): crop (MAE-CT), colour (MAE-CT_aug), copy "
                        "(to find copies: JPEG, crops of 70-100%%, rotations, resizes, colour, text and image "
                        "overlays, each view pulled towards its own image's other view: contrastive.positive=view)")
    p.add_argument("--epochs", type=int, help="epochs (finetune.epochs, finetune.probe_epochs with --linear-probe, "
                                              "contrastive.epochs with --contrastive)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step (finetune.batch_size, "
                                                  "finetune.probe_batch_size or contrastive.batch_size)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    # The recipe is finetune.* (contrastive.*); optim.* describes the pretraining and is refused here.
    add_overrides_flag(p, "finetune.layer_decay=0.65, finetune.blr=1e-3 or contrastive.queue_size=8192")
    add_json_flag(p)
    p.set_defaults(handler="training.command:finetune")

    p = sub.add_parser("evaluate", help="kNN, linear-probe and (finetuned) top-1/top-5 on a labelled split")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a pretraining / finetuning / probe checkpoint, or official weights")
    what.add_argument("--artifact", help="an artifact folder written by mae export")
    p.add_argument("--data", required=True, help=LABELLED_DATA_HELP)
    p.add_argument("--pooling", choices=("token", "avg"), help="embedding pooling of a pretrained --checkpoint")
    p.add_argument("--out", help="folder for the embeddings cache, eval.json and confusion_matrix.png "
                                 "(default: RUN/eval or ARTIFACT/eval)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for decoding images")
    add_json_flag(p)
    p.set_defaults(handler="training.evaluate:main")


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """``mae finetune``: ``--contrastive`` is a stage of its own (``training.contrastive``), the rest
    ``training.finetune``; imported here, when the command runs."""
    from importlib import import_module

    return import_module("training.contrastive" if args.contrastive else "training.finetune").main(args)
