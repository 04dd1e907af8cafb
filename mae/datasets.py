"""Torch datasets over ``mae.sources``, and what turns a batch into the model's input on the device.

A sample leaves a DataLoader worker as uint8 (C, H, W) whenever the image is 8-bit (the fast path of
``mae.images``: crop box chosen from the header, JPEG decoded at reduced scale, crop + resize in uint8), or as
float32 (C, H, W) in [0, 1] on the general path (16-bit, float, N-channel arrays). It is never normalised in
the worker: ``Normalize`` turns a batch into the model's float input on the device that runs the step, so
a quarter of the bytes cross process boundaries and pinned memory. With ``data.decode=gpu`` a JPEG sample
leaves the worker undecoded (its bytes, crop box and flip: ``jpeg_crop``) and is decoded in the batch by nvjpeg.

Augmentations (``training.augment``) are seeded per sample from (seed, epoch, index) (``sample_rng``):
independent of worker count and assignment, so a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from mae.errors import UsageError
from mae.images import (
    MAX_IMAGE_PIXELS,
    Box,
    EncodedImage,
    ImageError,
    ImageItem,
    Preprocessing,
    open_image,
    orientation,
    read_bytes,
)
from mae.shards import Sample, ShardSet, slot_samples, stream_slot, worker_batches
from mae.sources import Source

SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF
"""Seeds are non-negative 63-bit integers (what ``random.Random`` and ``torch.manual_seed`` take alike)."""


# ----------------------------------------------------------------------------------------------- datasets


def sample_rng(seed: int, epoch: int, key: int | str) -> random.Random:
    """The generator of one sample's augmentation: a function of (seed, epoch, key) alone.

    A string key (a WebDataset member) is hashed with blake2b, not ``hash()``, which differs between processes.
    """
    if isinstance(key, str):
        key = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return random.Random(hash((seed, epoch, key)) & SEED_MASK)


Transform = Callable[[ImageItem, random.Random], "np.ndarray | JpegCrop"]
"""A training augmentation (``training.augment``): an item and its sample's generator -> pixels (C, H, W)."""


class ImageDataset(torch.utils.data.Dataset):
    """Items of a source through a transform (or an eval ``Preprocessing``); an unreadable image yields None
    (see ``collate_skipping_bad``), with a warning that names it.

    Keys may be ``(index, epoch)``: the augmentation of that sample is then seeded from (seed, epoch, index),
    which makes it independent of worker assignment and lets a resumed run see exactly the same crops.
    """

    def __init__(self, source: Source, indices: Sequence[int], transform: Transform | Preprocessing,
                 seed: int = 0, max_pixels: int | None = MAX_IMAGE_PIXELS):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | JpegCrop, int] | None:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        j = int(self.indices[i])
        item = self.source.items[j]
        try:
            if isinstance(self.transform, Preprocessing):
                x = self.transform.load(item, self.max_pixels)
            else:
                x = self.transform(item, sample_rng(self.seed, epoch, j))
        except (ImageError, OSError) as e:
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
            return None
        return (x if isinstance(x, JpegCrop) else torch.from_numpy(x)), int(self.source.labels[j])


def collate_skipping_bad(batch: list[tuple[torch.Tensor | JpegCrop, int] | None]
                         ) -> tuple[torch.Tensor | PendingDecode, torch.Tensor, int]:
    """Stack the good samples; return (images, labels, number of images skipped).

    uint8 and float samples in one batch (an 8-bit JPEG beside a 16-bit array) are stacked as float in [0, 1];
    JPEGs left for the device make a ``PendingDecode``. A batch with no good sample is an empty batch (the
    caller counts it; the last images of a split may all be bad), never an error here.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
    if not good:
        return torch.zeros(0, dtype=torch.uint8), labels, skipped
    xs = [g[0] for g in good]
    if any(isinstance(x, JpegCrop) for x in xs):
        return PendingDecode(xs), labels, skipped
    if len({x.dtype for x in xs}) > 1:
        xs = [x.float() / 255.0 if x.dtype == torch.uint8 else x.float() for x in xs]
    return torch.stack(xs), labels, skipped


# ----------------------------------------------------------------------------------------------- shard streams


class ShardTrainStream(torch.utils.data.IterableDataset):
    """A training split in WebDataset shards: each DataLoader worker streams its slot endlessly (``mae.shards``),
    yielding (pixels, label) or None for a bad sample, exactly as ``ImageDataset`` does.

    Set ``start_batches`` (micro-batches the run has consumed) before iterating to resume exactly.
    """

    def __init__(self, shards: ShardSet, transform: Transform, seed: int, rank: int, world: int, buffer: int,
                 batch_size: int):
        self.shards, self.transform, self.seed = shards, transform, seed
        self.rank, self.world, self.buffer, self.batch_size = rank, world, buffer, batch_size
        self.start_batches = 0

    def __len__(self) -> int:
        return self.shards.total

    def __iter__(self) -> Iterator[tuple[torch.Tensor | JpegCrop, int] | None]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = worker_batches(self.start_batches, w, workers) * self.batch_size
        stream = stream_slot(self.shards, self.rank * workers + w, self.world * workers, self.seed, self.buffer,
                             start)
        for epoch, sample, error in stream:
            yield _transformed(sample, error, lambda item, s=sample, e=epoch: self.transform(
                item, sample_rng(self.seed, e, s.seed_key)))


class ShardEvalStream(torch.utils.data.IterableDataset):
    """A split in shards, in order, through an eval ``Preprocessing``: (pixels, label) or None per sample; the
    shards are divided between DataLoader workers (and ``world`` processes when given)."""

    def __init__(self, shards: ShardSet, preprocessing: Preprocessing, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 rank: int = 0, world: int = 1):
        self.shards, self.preprocessing, self.max_pixels = shards, preprocessing, max_pixels
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.shards.total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | None]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, sample, error in slot_samples(self.shards, self.rank * workers + w, self.world * workers):
            yield _transformed(sample, error, lambda item: self.preprocessing.load(item, self.max_pixels))


def _transformed(sample: Sample | None, error: str | None, fn: Callable[[EncodedImage], Any]
                 ) -> tuple[torch.Tensor | JpegCrop, int] | None:
    if sample is None:
        warnings.warn(f"skipping unreadable image: {error}", stacklevel=3)
        return None
    try:
        x = fn(sample.image())
    except (ImageError, OSError) as e:
        warnings.warn(f"skipping unreadable image: {e}", stacklevel=3)
        return None
    return (x if isinstance(x, JpegCrop) else torch.from_numpy(x)), sample.label



# ----------------------------------------------------------------------------------------------- on the device


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One float (C, H, W) image in [0, 1] -> (x - mean) / std, where it lies (a benchmark's CPU reference)."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class Normalize:
    """A batch as workers ship it (uint8, or float in [0, 1], or JPEGs to decode) -> the model's float input, on
    ``device``: (x / 255 - mean) / std, the float32 operations of ``mae.images.normalize_pixels``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: tuple[int, int] | None = None,
                 interpolation: str = "bicubic"):
        self.mean, self.std = tuple(mean), tuple(std)
        self.size, self.interpolation = size, interpolation
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor | PendingDecode, device: torch.device | str,
                 non_blocking: bool = True) -> torch.Tensor:
        device = torch.device(device)
        if isinstance(images, PendingDecode):
            if self.size is None:
                raise ValueError("this batch holds JPEGs to decode, but Normalize was given no output size")
            x = decode_on_device(images.items, self.size, len(self.mean), self.interpolation, device)
        else:
            x = images.to(device, non_blocking=non_blocking)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                                   torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1))
        m, s = self._stats[device]
        return (x - m) / s


# ----------------------------------------------------------------------------------------------- GPU decoding


class JpegCrop(NamedTuple):
    """A JPEG left undecoded for ``data.decode=gpu``: its bytes, the crop box and the flip drawn for it."""

    data: torch.Tensor
    """uint8 (B,): the file's bytes."""
    box: Box
    flip: bool


@dataclass
class PendingDecode:
    """A batch with JPEGs still to decode (``data.decode=gpu``): each item a JpegCrop or pixels decoded on a CPU
    (a PNG, a rotated or CMYK JPEG: what nvjpeg cannot take as it is)."""

    items: list[JpegCrop | torch.Tensor]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.items),)


def decode_on_device(items: Sequence[JpegCrop | torch.Tensor], size: tuple[int, int], channels: int,
                     interpolation: str, device: torch.device) -> torch.Tensor:
    """Decode the JPEGs of a batch in one ``torchvision.io.decode_jpeg`` call on ``device`` (nvjpeg on CUDA), crop
    and resize each on the device (antialiased, in float) and flip: float (N, C, H, W) in [0, 1].

    Items decoded on a CPU (uint8 or float (C, H, W)) join the batch as they are. The boxes are the ones the
    CPU path would have used, so both paths see the same crops.
    """
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, it in enumerate(items) if isinstance(it, JpegCrop)]
    out: list[torch.Tensor | None] = [None] * len(items)
    if jpegs:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        decoded = decode_jpeg([items[i].data for i in jpegs], mode=mode, device=device)
        for i, full in zip(jpegs, decoded):
            top, left, h, w = (int(v) for v in items[i].box)
            crop = full[:, top : top + h, left : left + w].float().unsqueeze(0) / 255.0  # (1, C, h, w)
            kw = {} if interpolation == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(crop, size=size, mode=interpolation, **kw).squeeze(0).clamp_(0.0, 1.0)
            out[i] = x.flip(-1) if items[i].flip else x
    for i, it in enumerate(items):
        if out[i] is None:
            x = it.to(device)
            out[i] = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return torch.stack(out)  # (N, C, H, W)


def jpeg_crop(item: ImageItem, box_fn: Callable[[int, int], Box], flip: bool, channels: int,
              max_pixels: int | None) -> JpegCrop | None:
    """The item as a JpegCrop when nvjpeg can decode it as stored (a baseline or progressive RGB/grey JPEG,
    upright); None when it must be decoded on a CPU. Reads the header only."""
    if isinstance(item, np.ndarray):
        return None
    data = item.data if isinstance(item, EncodedImage) else read_bytes(item)
    name = item.name if isinstance(item, EncodedImage) else str(item)
    with open_image(data, name, max_pixels) as im:
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or orientation(im) != 1:
            return None
        if channels == 3 and im.mode != "RGB":
            return None
        box = box_fn(im.height, im.width)
    return JpegCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)


def check_gpu_decode(device: torch.device) -> None:
    """``data.decode=gpu`` needs nvjpeg on the training GPU; anywhere else it is refused before any work."""
    if device.type != "cuda":
        raise UsageError(f"data.decode=gpu decodes JPEGs with nvjpeg on the training GPU, but this run is on "
                         f"{device.type}; set data.decode=cpu")
    from torchvision.io import decode_jpeg

    probe = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
    try:
        decode_jpeg([probe], device=device)
    except Exception as e:  # a torchvision built without nvjpeg
        raise UsageError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({e}); "
                         "set data.decode=cpu") from e


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()
