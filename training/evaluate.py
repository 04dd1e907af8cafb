"""``mae evaluate``: how good an encoder is, measured on the seeded train/val split of a labelled source.

Three figures, each computed from one pass of the encoder over the images (embeddings are cached per run):

- **kNN top-1**: cosine similarity between L2-normalised embeddings, the k = 20 nearest training images vote
  with weight ``exp(similarity / 0.07)`` (the weighted kNN of Wu et al. 2018, used by DINO and MAE's authors).
- **linear-probe top-1**: BatchNorm1d(affine=False, eps=1e-6) + Linear trained on the frozen, cached training
  embeddings (no augmentation), so it costs seconds instead of an encoder pass per step. ``mae finetune
  --linear-probe`` is the paper's full probe (augmented crops through the frozen encoder).
- **finetuned top-1 / top-5** and a confusion-matrix PNG, when the model has a classification head.

Baselines for the same split (used by ``mae demo`` and ``bench/quality.py``): raw pixels (the preprocessed
image flattened) and a randomly initialised encoder of the same architecture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mae import artifact as artifact_lib
from mae.config import DataConfig, ModelConfig
from mae.datasets import ImageDataset, Normalize, ShardEvalStream
from mae.errors import UsageError
from mae.files import atomic_path, write_json_atomic
from mae.images import Preprocessing
from mae.model import MaskedAutoencoder
from mae.shards import ShardSource
from mae.sources import DataError, Source, Split, split_data
from training.data import eval_loader

KNN_K = 20
KNN_TEMPERATURE = 0.07
CACHE_FORMAT = 1


@dataclass
class Embedded:
    """One pass of an encoder over a split."""

    embedding: np.ndarray
    """(N, D) float32, L2-normalised (the artifact's embedding)."""
    labels: np.ndarray
    """(N,) int64 class indices of the source."""
    logits: np.ndarray | None = None
    """(N, K) float32 when the encoder has a classification head."""
    skipped: int = 0
    """Images of the split that could not be read (named in the warnings), left out of the figures."""


# ----------------------------------------------------------------------------------------------- embedding


@torch.no_grad()
def embed_dataset(encoder: nn.Module, dataset: ImageDataset | ShardEvalStream, batch_size: int = 256,
                  workers: int = 0, device: str | torch.device = "cpu") -> Embedded:
    """Run ``encoder`` (an artifact ``Encoder``: pixels -> (embedding, logits?)) over every image of ``dataset``.

    Workers ship uint8 pixels; they are normalised on ``device``. An unreadable image is skipped, named in a
    warning and counted (``Embedded.skipped``, reported beside the figures), so that one bad file costs one image,
    not the evaluation.
    """
    encoder = encoder.eval().to(device)
    prep = dataset.transform if isinstance(dataset, ImageDataset) else dataset.preprocessing
    normalize = Normalize(prep.mean, prep.std)
    embs, logits, labels = [], [], []
    skipped = 0
    for images, y, bad in eval_loader(dataset, batch_size, workers):
        skipped += bad
        if len(images) == 0:
            continue
        out = encoder(normalize(images, device))
        embs.append(out[0].float().cpu())
        if len(out) > 1:
            logits.append(out[1].float().cpu())
        labels.append(y)
    if not embs:
        raise DataError(f"none of the images of {getattr(dataset, 'name', 'the split')} could be read "
                        f"({skipped} skipped; the warnings name them)")
    return Embedded(torch.cat(embs).numpy(), torch.cat(labels).numpy(),
                    torch.cat(logits).numpy() if logits else None, skipped)


class RawPixels(nn.Module):
    """The raw-pixel baseline as an encoder: the preprocessed image, flattened and L2-normalised."""

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (nn.functional.normalize(pixels.flatten(1).float(), dim=-1),)  # (N, C*H*W)


def random_init_encoder(model_cfg: ModelConfig, pooling: str, seed: int = 0) -> nn.Module:
    """The random-init baseline: an MAE encoder exactly as pretraining starts it (official init), not trained."""
    torch.manual_seed(seed)
    state = MaskedAutoencoder(model_cfg).encoder_state_dict()
    return artifact_lib.build_encoder(state, dataclasses.asdict(model_cfg), pooling)


# ----------------------------------------------------------------------------------------------- figures


def knn_predict(train_emb: np.ndarray, train_labels: np.ndarray, query_emb: np.ndarray, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """Class scores (Q, num_classes) from the temperature-weighted votes of the k most cosine-similar items.

    Embeddings are L2-normalised, so the inner product is the cosine similarity.
    """
    bank = torch.from_numpy(np.ascontiguousarray(train_emb, dtype=np.float32))  # (N, D)
    bank_labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(query_emb), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query_emb[start : start + chunk], dtype=np.float32))
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (Q, k)
        weight = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_labels[idx], weight)  # (Q, classes)
        scores.append(votes)
    return torch.cat(scores).numpy() if scores else np.zeros((0, num_classes), np.float32)


def knn_top1(train: Embedded, val: Embedded, num_classes: int, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> float:
    scores = knn_predict(train.embedding, train.labels, val.embedding, num_classes, k, temperature)
    return float((scores.argmax(1) == val.labels).mean())


def linear_probe_top1(train: Embedded, val: Embedded, num_classes: int, epochs: int = 100, batch_size: int = 256,
                      lr: float = 0.1, seed: int = 0) -> float:
    """Top-1 of BatchNorm1d(affine=False) + Linear trained on cached embeddings (SGD, momentum 0.9, cosine lr).

    SGD rather than the paper's LARS: LARS exists for the paper's 16,384-image batches, and at a few hundred
    images its trust ratio (1e-3 x |w| / |g|) only slows a 10-way linear head down. Features are not augmented
    (they are cached), so this is the cheap probe; ``mae finetune --linear-probe`` is the full one.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train.embedding).float()
    y = torch.from_numpy(train.labels).long()
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6), nn.Linear(x.shape[1], num_classes))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=gen).clamp_(-2, 2) * 0.01)
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size : (i + 1) * batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(head(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        pred = head(torch.from_numpy(val.embedding).float()).argmax(1).numpy()
    return float((pred == val.labels).mean())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: share of rows whose true label is among the k highest logits} (k capped at the class count)."""
    order = np.argsort(-logits, axis=1)
    return {k: float((order[:, : min(k, logits.shape[1])] == labels[:, None]).any(1).mean()) for k in ks}


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def save_confusion_png(cm: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Draw the confusion matrix with counts in the cells (row-normalised colour) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90 if n > 12 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(title or f"confusion matrix, top-1 {np.trace(cm) / max(cm.sum(), 1):.4f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- a whole evaluation


def split_of(data: str | Source | ShardSource, val_fraction: float = DataConfig.val_fraction,
             seed: int = DataConfig.split_seed) -> Split:
    """``--data`` as an evaluation split (``mae.sources.split_data``): the seeded stratified split of a source, or
    a packed shard split; labelled, with two classes or more and a validation split that holds images."""
    split = split_data(data, val_fraction, seed)
    if not split.labelled:
        raise DataError(f"{split.name} has no class labels: evaluation needs a bundled labelled set "
                        "(mnist5k, digits), a folder with one subfolder per class, or shards packed from one")
    if split.num_classes < 2:
        raise DataError(f"{split.name} has {split.num_classes} class; evaluation needs at least two")
    if split.val_size == 0:
        if split.sharded:
            raise DataError(f"{split.name}: these shards have no validation split; pack the source with "
                            "mae data pack (it writes val-*.tar) and pass the packed folder")
        raise DataError(f"{split.name}: the validation split is empty (val_fraction {val_fraction})")
    return split


def split_key(split: Split) -> str:
    """What names a split in the embedding cache: the source and exactly which images are on either side."""
    h = hashlib.sha256(split.name.encode())
    if split.sharded:
        for part in (split.train, split.val):
            h.update(json.dumps([[Path(s.url).name, s.count] for s in part.shards]).encode())
    else:
        h.update(split.train.tobytes())
        h.update(split.val.tobytes())
    return h.hexdigest()[:16]


def split_datasets(split: Split, preprocessing: Preprocessing) -> tuple[ImageDataset | ShardEvalStream, ...]:
    """The train and val images of a split, each once and in order, through ``preprocessing``."""
    if split.sharded:
        return ShardEvalStream(split.train, preprocessing), ShardEvalStream(split.val, preprocessing)
    return ImageDataset(split.source, split.train, preprocessing), ImageDataset(split.source, split.val, preprocessing)


def embed_split(encoder: nn.Module, preprocessing: Preprocessing, split: Split,
                identity: str | None = None,
                cache_dir: str | Path | None = None, batch_size: int = 256, workers: int = 0,
                device: str | torch.device = "cpu") -> tuple[Embedded, Embedded, bool]:
    """Embed the train and val images once; with ``cache_dir`` and an ``identity`` (weights + pooling hash) the
    result is stored as ``embeddings-<key>.npz`` and reused by the next evaluation of the same model and split.

    Returns (train, val, whether the cache answered).
    """
    path = None
    if cache_dir is not None and identity is not None:
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity, split_key(split), preprocessing.to_dict()],
                                        sort_keys=True).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"embeddings-{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                parts = [Embedded(z[f"{s}_embedding"], z[f"{s}_labels"], z.get(f"{s}_logits"),
                                  int(z[f"{s}_skipped"]) if f"{s}_skipped" in z else 0) for s in ("train", "val")]
            return parts[0], parts[1], True
    parts = [embed_dataset(encoder, ds, batch_size, workers, device) for ds in split_datasets(split, preprocessing)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, e in zip(("train", "val"), parts):
            arrays[f"{name}_embedding"], arrays[f"{name}_labels"] = e.embedding, e.labels
            arrays[f"{name}_skipped"] = np.asarray(e.skipped)
            if e.logits is not None:
                arrays[f"{name}_logits"] = e.logits
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return parts[0], parts[1], False


def score(train: Embedded, val: Embedded, num_classes: int, probe_epochs: int = 100) -> dict[str, float]:
    """kNN and linear-probe top-1 (and a head's top-1/top-5) from embeddings of one split."""
    out = {"knn_top1": knn_top1(train, val, num_classes),
           "probe_top1": linear_probe_top1(train, val, num_classes, epochs=probe_epochs)}
    if val.logits is not None:
        acc = topk_accuracy(val.logits, val.labels, (1, 5))
        out["top1"], out["top5"] = acc[1], acc[5]
    return out


def evaluate_encoder(encoder: nn.Module, preprocessing: Preprocessing, split: Split, *,
                     labels: Sequence[str] | None = None, identity: str | None = None,
                     cache_dir: str | Path | None = None, confusion_png: str | Path | None = None,
                     probe_epochs: int = 100, workers: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every figure for one encoder on one split. ``labels``: the head's class names, which must match the
    source's classes (a head trained on other classes cannot be scored on these)."""
    if labels is not None and list(labels) != list(split.classes):
        raise UsageError(f"the model's head predicts {list(labels)[:12]}, but {split.name} has classes "
                         f"{split.classes[:12]}; evaluate a head on the classes it was trained for")
    started = time.perf_counter()
    train, val, cached = embed_split(encoder, preprocessing, split, identity, cache_dir, workers=workers,
                                     device=device)
    embed_seconds = time.perf_counter() - started
    result: dict[str, Any] = score(train, val, split.num_classes, probe_epochs)
    result.update({"train_images": len(train.labels), "val_images": len(val.labels),
                   "train_skipped_images": train.skipped, "val_skipped_images": val.skipped,
                   "embed_dim": int(train.embedding.shape[1]), "embeddings_cached": cached,
                   "embed_seconds": round(embed_seconds, 2)})
    if val.logits is not None and confusion_png is not None:
        cm = confusion_matrix(val.logits.argmax(1), val.labels, split.num_classes)
        result["confusion_matrix"] = str(save_confusion_png(cm, split.classes, confusion_png,
                                                            f"{split.name} val: top-1 {result['top1']:.4f}"))
    return result


# ----------------------------------------------------------------------------------------------- CLI


def main(args) -> dict[str, Any]:
    """``mae evaluate --checkpoint C | --artifact A --data SRC``."""
    from mae.config import Config

    if bool(args.checkpoint) == bool(args.artifact):
        raise UsageError("give exactly one of --checkpoint and --artifact")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_cfg = DataConfig()
    if args.artifact:
        art = artifact_lib.load(args.artifact, device=device)
        encoder, preprocessing, labels, identity = art.encoder, art.preprocessing, art.labels, art.sha256
        cache_dir = Path(args.out or Path(args.artifact) / "eval")
        what = f"artifact {args.artifact}"
    else:
        info = artifact_lib.read_checkpoint(args.checkpoint, args.pooling)
        encoder, preprocessing, labels = info.build(device), info.preprocessing, info.labels
        identity = json.dumps([info.source["sha256"], info.pooling])
        run_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
        cache_dir = Path(args.out or run_dir / "eval")
        what = f"checkpoint {args.checkpoint} ({info.pooling} pooling)"
        if info.config and "data" in info.config:
            data_cfg = Config.from_dict({"data": info.config["data"]}).data
    split = split_of(args.data, data_cfg.val_fraction, data_cfg.split_seed)
    result = evaluate_encoder(encoder, preprocessing, split, labels=labels, identity=identity, cache_dir=cache_dir,
                              confusion_png=cache_dir / "confusion_matrix.png", workers=args.workers,
                              device=device)
    result = {"model": what, "data": args.data, **result}
    write_json_atomic(cache_dir / "eval.json", result)
    skipped = result["train_skipped_images"] + result["val_skipped_images"]
    lines = [f"{what} on {args.data} ({result['train_images']} train / {result['val_images']} val images"
             + (f"; {skipped} unreadable skipped" if skipped else "") + ")",
             f"  kNN top-1 (k={KNN_K}, cosine)  {result['knn_top1']:.4f}",
             f"  linear-probe top-1         {result['probe_top1']:.4f}"]
    if "top1" in result:
        lines += [f"  finetuned top-1 / top-5    {result['top1']:.4f} / {result['top5']:.4f}",
                  f"  confusion matrix           {result['confusion_matrix']}"]
    lines.append(f"  embeddings {'reused from' if result['embeddings_cached'] else 'cached in'} {cache_dir}")
    result["text"] = "\n".join(lines)
    return result

