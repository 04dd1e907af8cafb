"""The training augmentations: what a DataLoader worker does to an image before it ships it.

Each is called with an item and its sample's generator (``mae.datasets.sample_rng``: a function of seed, epoch
and index alone), so that a resumed run draws exactly the crops it would have drawn. Both return pixels before
normalisation (uint8 (C, H, W) on the fast path of ``mae.images``); ``normalizer()`` gives the ``Normalize`` that
turns a batch of them into the model's input on the device.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mae.config import Config
from mae.datasets import JpegCrop, Normalize, jpeg_crop
from mae.errors import UsageError
from mae.images import Box, ImageItem, load_pixels, random_resized_crop_box

RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (the paper's, torchvision's default)


class PretrainTransform:
    """The paper's pretraining augmentation: RandomResizedCrop (scale data.crop_scale, ratio 3/4-4/3) and a flip,
    cropped before decoding (``mae.images.load_pixels``); returns uint8 (C, H, W) on the fast path."""

    def __init__(self, cfg: Config):
        d = cfg.data
        self.channels = cfg.model.in_chans
        self.size = tuple(cfg.model.img_size)
        self.mean, self.std = d.channel_stats(self.channels)
        self.scale, self.hflip, self.interpolation = tuple(d.crop_scale), d.hflip, d.interpolation
        self.max_pixels = d.max_image_pixels
        self.gpu_decode = d.decode == "gpu"

    def __call__(self, item: ImageItem, rng: random.Random) -> np.ndarray | JpegCrop:
        flip = rng.random() < self.hflip

        def box(h: int, w: int) -> Box:
            return random_resized_crop_box(h, w, self.scale, RRC_RATIO, rng)

        if self.gpu_decode:
            crop = jpeg_crop(item, box, flip, self.channels, self.max_pixels)
            if crop is not None:
                return crop
        return load_pixels(item, box, self.size, self.channels, interpolation=self.interpolation, flip=flip,
                           max_pixels=self.max_pixels, engine="torch")

    def normalizer(self) -> Normalize:
        return Normalize(self.mean, self.std, self.size, self.interpolation)


class FinetuneTransform:
    """The official finetune augmentation (timm ``create_transform``): RandomResizedCrop(finetune.crop_scale),
    flip, RandAugment, in the worker (uint8); normalisation and random erasing on the device (``erasing``).
    ``linear_probe=True`` keeps only crop + flip, as the paper's probe.

    RandAugment is timm's PIL implementation (the official policy ``rand-m9-mstd0.5-inc1``), so it runs on 1- and
    3-channel images; N-channel data must set ``finetune.randaug=null``. timm's RandAugment draws from Python's
    and NumPy's global generators, so each call seeds them from the sample's generator and restores them after:
    a resumed run sees the same augmentations.
    """

    def __init__(self, cfg: Config, linear_probe: bool = False):
        ft = cfg.finetune
        self.channels = cfg.model.in_chans
        self.size = tuple(cfg.model.img_size)
        self.mean, self.std = cfg.data.channel_stats(self.channels)
        self.scale, self.hflip, self.interpolation = tuple(ft.crop_scale), ft.hflip, cfg.data.interpolation
        self.max_pixels = cfg.data.max_image_pixels
        self.randaug = None
        self.reprob = 0.0 if linear_probe else ft.reprob
        if linear_probe:
            return
        if ft.randaug:
            if self.channels not in (1, 3):
                raise UsageError(f"finetune.randaug works on 1- or 3-channel images, the model takes {self.channels}; "
                                 "set finetune.randaug=null")
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(min(255, round(255 * m)) for m in self.mean)
            hparams = {"translate_const": int(min(cfg.model.img_size) * 0.45),
                       "img_mean": fill if self.channels == 3 else fill[0]}
            self.randaug = rand_augment_transform(ft.randaug, hparams)
            for op in self.randaug.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keeping_a_bit

    def __call__(self, item: ImageItem, rng: random.Random) -> np.ndarray:
        flip = rng.random() < self.hflip

        def box(h: int, w: int) -> Box:
            return random_resized_crop_box(h, w, self.scale, RRC_RATIO, rng)

        x = load_pixels(item, box, self.size, self.channels, interpolation=self.interpolation, flip=flip,
                        max_pixels=self.max_pixels, engine="torch")
        if self.randaug is None:
            return x
        if x.dtype != np.uint8:  # the general path: RandAugment is an 8-bit PIL policy
            x = (x * 255.0).round().clip(0, 255).astype(np.uint8)
        arr = x.transpose(1, 2, 0)  # (H, W, C)
        with _global_rngs_from(rng):
            im = self.randaug(Image.fromarray(arr[..., 0] if self.channels == 1 else arr))
        out = np.asarray(im)
        return np.array(out[None] if out.ndim == 2 else out.transpose(2, 0, 1), order="C")  # (C, H, W), writable

    def normalizer(self) -> Normalize:
        return Normalize(self.mean, self.std, self.size, self.interpolation)

    def erasing(self, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """timm's RandomErasing (pixel mode, after normalisation) for a normalised batch on ``device``, or None;
        it draws from the generators the step reseeds from (seed, rank, step)."""
        if self.reprob <= 0:
            return None
        from timm.data.random_erasing import RandomErasing

        return RandomErasing(probability=self.reprob, mode="pixel", max_count=1, num_splits=0, device=str(device))


def _posterize_keeping_a_bit(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with at least one bit kept: the official ``inc1`` policy asks for 0 bits at top
    magnitude, which Pillow >= 10 rejects (older Pillow returned a black image; one bit is the nearest valid)."""
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


class _global_rngs_from:
    """Seed Python's ``random`` and NumPy's global generator from a sample's generator for a block, then restore."""

    def __init__(self, rng: random.Random):
        self.seed = rng.getrandbits(31)

    def __enter__(self) -> None:
        self.saved = random.getstate(), np.random.get_state()
        random.seed(self.seed)
        np.random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
