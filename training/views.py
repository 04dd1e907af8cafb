"""Two augmented views of each image, for contrastive tuning (``training.contrastive``).

Three recipes (``contrastive.augment``), each drawn per view from the sample's own generator (seeded from
(seed, epoch, index) as every training transform here), so a resumed run sees exactly the views it would have:

- ``crop``, MAE-CT's (the official ``stage3_maect_contrastive_tuning`` yamls): RandomResizedCrop
  (``contrastive.crop_scale``, ratio 3/4-4/3) and a horizontal flip (``contrastive.hflip``). Nothing else: the
  paper's point is that the MAE encoder already holds what colour augmentations would teach.
- ``colour``, MAE-CT_aug's (the ``stage3_maectaug`` yamls, BYOL's asymmetric pair): the crop and flip, then
  colour jitter with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order), grey with
  p 0.2, a Gaussian blur (sigma 0.1-2 px at 224 px; always on the first view, p 0.1 on the second) and
  solarisation with p 0.2 (second view only).
- ``copy``, copy-detection edits after SSCD (Pizzi et al. 2022) and what the copies of ``bench/retrieval.py``
  and DISC2021 undergo: the crop and flip, then small rotations, a resize down and back up (lost resolution),
  colour changes, blur, an overlay of text or of another image, and JPEG re-encoding at quality 10-95.

Channels: colour jitter acts on what an image has. A grey image (digits) gets brightness and contrast only
(saturation, hue and greying change nothing there); an N-channel array gets brightness, contrast, blur and
solarisation (each channel alike), and none of the 8-bit edits (text, JPEG), which have no meaning for it.
Sizes: blur radii, rotations and text are given for a 224 px image and scaled to the model's input size, so that
a 32 px digit is edited as much, relative to its size, as a photograph.

Each view leaves the worker as uint8 (C, H, W) when the image is 8-bit, float32 in [0, 1] otherwise; the pair is
stacked as (2, C, H, W).
"""

from __future__ import annotations

import io
import random
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mae.config import Config
from mae.datasets import ImageDataset, Normalize, ShardTrainStream
from mae.images import Box, ImageItem, load_pixels, random_resized_crop_box
from training.augment import RRC_RATIO

AUGMENTS = ("crop", "colour", "copy")
REFERENCE_SIDE = 224  # the size the recipes' pixel figures (blur sigma, text size) were chosen for
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale and PIL's "L"

# MAE-CT_aug (BYOL): colour jitter strengths and probabilities per view (first, second)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P, GREY_P, SOLARIZE_P, BLUR_P = 0.8, 0.2, (0.0, 0.2), (1.0, 0.1)
BLUR_SIGMA = (0.1, 2.0)

# Copy edits: (probability, strength); the same for both views, as SSCD treats its pair symmetrically
COPY_ROTATE = (0.4, 10.0)  # degrees either way
COPY_RESIZE = (0.4, (0.3, 0.9))  # shrink to this share of the side, then back up
COPY_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
COPY_JITTER_P, COPY_GREY_P, COPY_BLUR_P = 0.6, 0.1, 0.2
COPY_TEXT = (0.2, (0.08, 0.25))  # text height as a share of the side
COPY_OVERLAY = (0.2, (0.3, 0.6), (0.6, 1.0))  # another image: side share, opacity
COPY_JPEG = (0.6, (10, 95))
OVERLAY_BANK = 64  # images kept for overlays (read once, at the start of a run)


class TwoViews:
    """The transform of a contrastive run: an item -> its two views, (2, C, H, W)."""

    def __init__(self, cfg: Config):
        c = cfg.contrastive
        if c.augment not in AUGMENTS:
            raise ValueError(f"contrastive.augment must be one of {', '.join(AUGMENTS)}; got {c.augment!r}")
        self.augment = c.augment
        self.channels = cfg.model.in_chans
        self.size = tuple(cfg.model.img_size)
        self.mean, self.std = cfg.data.channel_stats(self.channels)
        self.scale, self.hflip = tuple(c.crop_scale), c.hflip
        self.interpolation = cfg.data.interpolation
        self.max_pixels = cfg.data.max_image_pixels
        self.pixel_scale = min(self.size) / REFERENCE_SIDE
        self.overlays: list[np.ndarray] = []
        """uint8 (C, H, W) images the copy recipe pastes onto a view (``set_overlays``)."""

    def set_overlays(self, images: Sequence[np.ndarray]) -> None:
        """Images for the copy recipe's overlays: a fixed bank, so that a sample's edits depend on its seed alone
        (a worker's recent images would make them depend on the worker and the resume point)."""
        self.overlays = [_as_uint8(x) for x in images]

    def __call__(self, item: ImageItem, rng: random.Random) -> np.ndarray:
        views = [self.view(item, rng, i) for i in range(2)]
        if views[0].dtype != views[1].dtype:
            views = [_as_float(v) for v in views]
        return np.stack(views)  # (2, C, H, W)

    def view(self, item: ImageItem, rng: random.Random, which: int) -> np.ndarray:
        """One view: crop and flip in the decoder (crop first, stay in uint8), then the recipe's edits."""
        flip = rng.random() < self.hflip

        def box(h: int, w: int) -> Box:
            return random_resized_crop_box(h, w, self.scale, RRC_RATIO, rng)

        x = load_pixels(item, box, self.size, self.channels, interpolation=self.interpolation, flip=flip,
                        max_pixels=self.max_pixels, engine="torch")
        if self.augment == "crop":
            return x
        eight_bit = x.dtype == np.uint8
        f = _as_float(x)  # (C, H, W) in [0, 1]
        f = self.colour_view(f, rng, which) if self.augment == "colour" else self.copy_view(f, rng, eight_bit)
        return _as_uint8(f) if eight_bit else f

    def colour_view(self, f: np.ndarray, rng: random.Random, which: int) -> np.ndarray:
        """MAE-CT_aug's (BYOL's) colour, blur and solarisation, with the per-view probabilities."""
        if rng.random() < JITTER_P:
            f = colour_jitter(f, rng, **JITTER)
        if len(f) == 3 and rng.random() < GREY_P:
            f = grey(f)
        if rng.random() < BLUR_P[which]:
            f = gaussian_blur(f, rng.uniform(*BLUR_SIGMA) * self.pixel_scale)
        if rng.random() < SOLARIZE_P[which]:
            f = np.where(f >= 0.5, 1.0 - f, f).astype(np.float32)
        return f

    def copy_view(self, f: np.ndarray, rng: random.Random, eight_bit: bool) -> np.ndarray:
        """The edits a copy of an image goes through before someone posts it again."""
        h, w = f.shape[1:]
        if rng.random() < COPY_ROTATE[0]:
            f = rotate(f, rng.uniform(-COPY_ROTATE[1], COPY_ROTATE[1]))
        if rng.random() < COPY_RESIZE[0]:
            share = rng.uniform(*COPY_RESIZE[1])
            f = resample(resample(f, (max(2, round(h * share)), max(2, round(w * share)))), (h, w))
        if rng.random() < COPY_JITTER_P:
            f = colour_jitter(f, rng, **COPY_JITTER)
        if len(f) == 3 and rng.random() < COPY_GREY_P:
            f = grey(f)
        if rng.random() < COPY_BLUR_P:
            f = gaussian_blur(f, rng.uniform(*BLUR_SIGMA) * self.pixel_scale)
        if self.overlays and rng.random() < COPY_OVERLAY[0]:
            f = overlay(f, _as_float(self.overlays[rng.randrange(len(self.overlays))]), rng,
                        COPY_OVERLAY[1], COPY_OVERLAY[2])
        eight_bit_edits = eight_bit and len(f) in (1, 3)
        if eight_bit_edits and rng.random() < COPY_TEXT[0]:
            f = text_overlay(f, rng, COPY_TEXT[1])
        if eight_bit_edits and rng.random() < COPY_JPEG[0]:
            f = jpeg(f, rng.randint(*COPY_JPEG[1]))
        return f

    def normalizer(self) -> Normalize:
        """(N, 2, C, H, W) batches as workers ship them -> the model's float input (Normalize broadcasts)."""
        return Normalize(self.mean, self.std, self.size, self.interpolation)


# ----------------------------------------------------------------------------------------------- datasets


class IndexedViews(ImageDataset):
    """``ImageDataset`` whose samples carry their source index beside the label, ``(views, (label, index))``, so
    that a batch's labels are (N, 2): the queue never offers an image its own earlier projection as a neighbour
    (the official ``exclude_self_from_queue``)."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]] | None:
        sample = super().__getitem__(key)
        if sample is None:
            return None
        i = key[0] if isinstance(key, tuple) else key
        return sample[0], (sample[1], int(self.indices[i]))


class IndexedShardStream(ShardTrainStream):
    """A shard stream in ``IndexedViews``'s layout; shard samples have no index, so -1 (a shard set is far larger
    than the queue, whose entries are then never the same image's)."""

    def __iter__(self):
        for sample in super().__iter__():
            yield None if sample is None else (sample[0], (sample[1], -1))


def indexed(train: Any, transform: TwoViews, seed: int) -> IndexedViews | IndexedShardStream:
    """A training set of ``training.data.training_data`` as the same set, through ``transform``, with indices."""
    if isinstance(train, ShardTrainStream):
        return IndexedShardStream(train.shards, transform, seed, train.rank, train.world, train.buffer,
                                  train.batch_size)
    return IndexedViews(train.source, train.indices, transform, seed)


def overlay_bank(train: Any, cfg: Config, n: int = OVERLAY_BANK) -> list[np.ndarray]:
    """Up to ``n`` training images (seeded picks; the first ones of a shard stream) at the model's input size, for
    the copy recipe's image overlays. Unreadable ones are left out."""
    from mae.images import ImageError
    from mae.sources import head_source

    if isinstance(train, ShardTrainStream):
        source = head_source(train.shards, n)
        picks = list(range(len(source)))
    else:
        source = train.source
        rng = np.random.default_rng(cfg.run.seed)
        picks = [int(train.indices[i]) for i in rng.choice(len(train.indices), min(n, len(train.indices)),
                                                              replace=False)]
    out = []
    for j in picks:
        try:
            out.append(load_pixels(source.items[j], lambda h, w: Box(0, 0, h, w), tuple(cfg.model.img_size),
                                   cfg.model.in_chans, interpolation=cfg.data.interpolation,
                                   max_pixels=cfg.data.max_image_pixels))
        except (ImageError, OSError):
            continue
    return out


# ----------------------------------------------------------------------------------------------- pixel edits
# All on float32 (C, H, W) arrays in [0, 1], with torchvision's definitions (adjust_brightness, ...).


def colour_jitter(f: np.ndarray, rng: random.Random, brightness: float, contrast: float, saturation: float,
                  hue: float) -> np.ndarray:
    """torchvision's ColorJitter: each factor drawn uniformly, applied in a random order; saturation and hue only
    where there is colour (3 channels)."""
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if len(f) == 3 else [])
    rng.shuffle(ops)
    for op in ops:
        if op == "brightness":
            f = np.clip(f * rng.uniform(max(0.0, 1 - brightness), 1 + brightness), 0, 1)
        elif op == "contrast":
            factor = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
            f = np.clip(factor * f + (1 - factor) * float(luminance(f).mean()), 0, 1)
        elif op == "saturation":
            factor = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
            f = np.clip(factor * f + (1 - factor) * luminance(f)[None], 0, 1)
        else:
            f = shift_hue(f, rng.uniform(-hue, hue))
    return f.astype(np.float32)


def luminance(f: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W): ITU-R 601-2 luma for RGB, the channel mean otherwise."""
    if len(f) == 3:
        return LUMA[0] * f[0] + LUMA[1] * f[1] + LUMA[2] * f[2]
    return f.mean(axis=0)


def grey(f: np.ndarray) -> np.ndarray:
    return np.repeat(luminance(f)[None], len(f), axis=0).astype(np.float32)


def shift_hue(f: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an RGB (3, H, W) image by ``shift`` turns (HSV round trip, as torchvision's adjust_hue)."""
    r, g, b = f
    mx, mn = f.max(axis=0), f.min(axis=0)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(mx == r, (g - b) / safe % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = np.where(delta > 0, h, 0.0)
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    h = (h + shift) % 1.0
    i = np.floor(h * 6) % 6
    frac = h * 6 - np.floor(h * 6)
    p, q, t = mx * (1 - s), mx * (1 - s * frac), mx * (1 - s * (1 - frac))
    v = mx
    out = np.stack([np.choose(i.astype(int), ch) for ch in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                             (p, p, t, v, v, q))])
    return np.clip(out, 0, 1).astype(np.float32)


def gaussian_blur(f: np.ndarray, sigma: float) -> np.ndarray:
    """Per-channel Gaussian blur of standard deviation ``sigma`` pixels (reflected edges)."""
    from scipy.ndimage import gaussian_filter

    if sigma < 0.05:  # under a twentieth of a pixel it is the identity, and scipy's kernel would be one tap anyway
        return f
    return gaussian_filter(f, sigma=(0, sigma, sigma), mode="reflect").astype(np.float32)


def rotate(f: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, same size, black where the rotation brings in no pixel (as a rotated copy has)."""
    planes = [np.asarray(Image.fromarray(c, mode="F").rotate(degrees, Image.Resampling.BILINEAR, fillcolor=0.0))
              for c in f]
    return np.clip(np.stack(planes), 0, 1).astype(np.float32)


def resample(f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize each channel to ``size`` = (H, W), bilinear (what a re-posted smaller copy goes through)."""
    planes = [np.asarray(Image.fromarray(c, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR))
              for c in f]
    return np.clip(np.stack(planes), 0, 1).astype(np.float32)


def overlay(f: np.ndarray, other: np.ndarray, rng: random.Random, side: tuple[float, float],
            opacity: tuple[float, float]) -> np.ndarray:
    """Paste a shrunk copy of ``other`` at a random place with a random opacity."""
    h, w = f.shape[1:]
    share = rng.uniform(*side)
    ph, pw = max(2, round(h * share)), max(2, round(w * share))
    patch = resample(other, (ph, pw))
    top, left = rng.randint(0, h - ph), rng.randint(0, w - pw)
    alpha = rng.uniform(*opacity)
    out = f.copy()
    region = out[:, top : top + ph, left : left + pw]
    out[:, top : top + ph, left : left + pw] = (1 - alpha) * region + alpha * patch
    return out


def text_overlay(f: np.ndarray, rng: random.Random, height: tuple[float, float]) -> np.ndarray:
    """Draw a few random characters at a random place, size and shade (a caption, a watermark)."""
    im = _to_pil(f)
    side = min(im.size)
    size = max(4, round(side * rng.uniform(*height)))
    font = _font(size)
    text = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(3, 10)))
    draw = ImageDraw.Draw(im)
    x, y = rng.randint(-size, max(0, im.width - size)), rng.randint(-size // 2, max(0, im.height - size))
    shade = tuple(rng.randint(0, 255) for _ in range(len(im.getbands())))
    draw.text((x, y), text, fill=shade if len(shade) > 1 else shade[0], font=font)
    return _from_pil(im)


def jpeg(f: np.ndarray, quality: int) -> np.ndarray:
    """Encode as a JPEG of ``quality`` and decode it again."""
    buf = io.BytesIO()
    _to_pil(f).save(buf, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return _from_pil(im)


_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _to_pil(f: np.ndarray) -> Image.Image:
    arr = _as_uint8(f)
    return Image.fromarray(arr[0] if len(arr) == 1 else arr.transpose(1, 2, 0))


def _from_pil(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _as_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    return np.ascontiguousarray(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))


def describe(augment: str) -> str:
    """One line naming a recipe (for logs and summaries)."""
    return {"crop": "RandomResizedCrop + flip (MAE-CT)",
            "colour": "crop, flip, colour jitter, grey, blur, solarize (MAE-CT_aug / BYOL)",
            "copy": "crop, flip, rotation, resize, colour, blur, text/image overlay, JPEG (copy detection, SSCD)"
            }.get(augment, augment)

