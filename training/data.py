"""What a training run reads, and in which order: the train/val datasets of ``--data`` and their loaders.

The data order is a function of (seed, epoch) alone and each sample's augmentation of (seed, epoch, index), so a
``ResumableSampler`` started part-way through an epoch continues a run exactly; shard streams position
themselves by the micro-batches consumed (``mae.shards``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mae.config import Config
from mae.datasets import ImageDataset, ShardEvalStream, ShardTrainStream, Transform, collate_skipping_bad
from mae.dist import Dist
from mae.images import Preprocessing
from mae.shards import ShardSource, check_slots
from mae.sources import DataError, Source, Split, head_source, split_data


@dataclass
class TrainingData:
    """What a training run reads: a training set (map-style or a shard stream), a validation set, the classes."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    labelled: bool


def training_data(spec: str | Path | Source | ShardSource, cfg: Config, dist: Dist, transform: Transform,
                  batch_size: int, *, val_limit: int | None = None, val_fallback: int = 0) -> TrainingData:
    """``--data`` (or a source already opened by ``mae.sources.open_data``) as training and validation sets.

    A bundled set, folder or list is split with the seeded stratified split (data.val_fraction,
    data.split_seed); shards come split by ``mae data pack`` (their val shards). ``batch_size`` is the loader's,
    which positions a resumed shard stream. ``val_limit`` caps the validation set, which is then held in memory
    (pretraining's fixed val_loss images); without it a shard validation split is streamed. ``val_fallback``:
    with an empty validation split, validate on that many training images instead (pretraining's pictures)
    rather than refuse.
    """
    split = split_data(spec, cfg.data.val_fraction, cfg.data.split_seed)
    if split.sharded:
        return _shard_data(split, cfg, dist, transform, batch_size, val_limit, val_fallback)
    d, source = cfg.data, split.source
    for note in source.notes:
        warnings.warn(f"{source.name}: {note}", stacklevel=2)
    train_idx, val_idx = split.train, split.val
    if len(val_idx) == 0:
        if not val_fallback:
            raise DataError("the validation split is empty: raise data.val_fraction")
        val_idx = train_idx[:val_fallback]
    if val_limit is not None:
        val_idx = val_idx[:val_limit]
    preprocessing = Preprocessing.from_config(cfg)
    return TrainingData(source.name, ImageDataset(source, train_idx, transform, cfg.run.seed),
                        ImageDataset(source, val_idx, preprocessing, max_pixels=d.max_image_pixels),
                        source.classes, source.labelled)


def _shard_data(split: Split, cfg: Config, dist: Dist, transform: Transform, batch_size: int,
                val_limit: int | None, val_fallback: int) -> TrainingData:
    d, shards = cfg.data, split.source
    preprocessing = Preprocessing.from_config(cfg)
    train = ShardTrainStream(split.train, transform, cfg.run.seed, dist.rank, dist.world, d.shuffle_buffer,
                             batch_size)
    if val_limit is not None:
        held = head_source(split.val or split.train, val_limit if split.val else min(val_limit, val_fallback),
                           shards.classes)
        val: Dataset = ImageDataset(held, range(len(held)), preprocessing, max_pixels=d.max_image_pixels)
    elif split.val is not None:
        val = ShardEvalStream(split.val, preprocessing, d.max_image_pixels)
    else:
        raise DataError(f"{shards.name}: these shards have no validation split; pack the source with mae data pack "
                        "(it writes val-*.tar beside train-*.tar) and pass the packed folder")
    return TrainingData(shards.name, train, val, shards.classes, shards.labelled)


# ----------------------------------------------------------------------------------------------- data order


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields ``(index, epoch)`` and can start part-way through an epoch.

    The epoch travels with the index so the dataset can seed each sample's augmentation from it.
    """

    def __init__(self, dataset: Dataset, dist: Dist, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset: Dataset, batch_size: int, dist: Dist, seed: int, workers: int, shuffle: bool = True
                ) -> tuple[DataLoader, ResumableSampler | None]:
    """The training loader: a resumable DistributedSampler over a map-style dataset, or a shard stream (which
    splits itself by rank and worker and has no sampler)."""
    # Its own generator: starting an iterator must not draw from the global RNG that masks are seeded from.
    common = {"batch_size": batch_size, "num_workers": workers, "collate_fn": collate_skipping_bad,
              "pin_memory": dist.device.type == "cuda", "prefetch_factor": 4 if workers > 0 else None,
              "generator": torch.Generator().manual_seed(seed)}
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **common), None
    sampler = ResumableSampler(dataset, dist, seed, shuffle=shuffle)
    loader = DataLoader(dataset, sampler=sampler, drop_last=True, persistent_workers=workers > 0, **common)
    return loader, sampler


def samples_per_rank(dataset: Dataset, sampler: ResumableSampler | None, dist: Dist, workers: int) -> int:
    """How many training images one process sees per epoch (a shard stream first checks that every reader of
    every process gets at least one sample)."""
    if sampler is not None:
        return len(sampler)
    check_slots(dataset.shards, dist.world * max(workers, 1))
    return len(dataset) // dist.world


def eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """In-order loader for evaluation (no sampler games; every image once; a shard stream divides its shards
    between the workers itself)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_skipping_bad)
