"""Decoding and the geometry of one image, in uint8 where the image allows it: NumPy and PIL only.

Two paths turn a file (or bytes, or a decoded array) into the (C, H, W) pixels a model takes:

- **fast** (8-bit images: JPEG, PNG, WebP, ... with 1-4 bands, and uint8 arrays): the crop box is chosen from
  the header size before any pixel is decoded, a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL's
  ``draft()``) whenever the box still covers the output size at that scale, and PIL crops and resizes in one
  antialiased uint8 pass (``resize(box=...)``). The result is uint8 (C, H, W): a quarter of the bytes of float32
  to ship between processes, converted and normalised on the device that runs the model.
- **general** (16-bit and float images, N-channel ``.npy`` arrays, modes with no 8-bit meaning): the whole
  image becomes float (C, H, W) in [0, 1], then the same box is cropped and resized in float. Slower, exact.

Both paths take the same box and the same flip, so they differ by uint8 rounding only. Evaluation
preprocessing (``Preprocessing``) travels in every artifact and is the same two paths with a centre box.
Nothing here imports torch, so a command that embeds a few images with onnxruntime starts without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mae.errors import UsageError, UserError
from mae.files import FileTooLargeError, NotRegularFileError, open_regular, read_regular

if TYPE_CHECKING:
    import torch

    from mae.config import Config

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy"}
MAX_IMAGE_PIXELS = 40_000_000
"""Default pixel limit for every decoder (training, evaluation, embedding, serving): checked from the header,
before any pixel is decoded. A 12000x12000 image would otherwise take 432 MB as uint8 and 1.7 GB as float."""
MAX_IMAGE_BYTES = 256 * 2**20
"""Byte limit of one image file or shard member, checked before it is read: a 40-megapixel image
(``MAX_IMAGE_PIXELS``) as uncompressed 16-bit RGB TIFF takes 240 MB, so no real image is refused, while
``/dev/zero`` or a gzip bomb in a shard stops here instead of filling memory."""
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # no 8-bit meaning without a full-image rescale
_ORIENTATION = 0x0112
_NPY_MAGIC = b"\x93NUMPY"

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class ImageError(UserError, ValueError):
    """An image that cannot be decoded or converted; the message names the image and the problem."""


class ImageTooLargeError(ImageError):
    """An image over a pixel limit (a decompression bomb, or simply too big to accept)."""


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes with the name errors should carry (a WebDataset member, an upload)."""

    data: bytes
    name: str


ImageItem = str | Path | EncodedImage | np.ndarray
"""What the loaders take: a file path, encoded bytes with a name, or an already decoded array (H, W[, C])."""


class Box(NamedTuple):
    """A crop in source pixels of the upright image (floats allowed: an eval box maps a resize + centre crop)."""

    top: float
    left: float
    height: float
    width: float


# ----------------------------------------------------------------------------------------------- decoding


def read_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a file into (H, W) or (H, W, C) uint8 (or a .npy array as stored); ImageError if it cannot."""
    return _read(Path(path), max_pixels)[0]


def read_image_hashed(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, str]:
    """``read_image`` and the sha256 of the file's bytes, from one read (the catalogue's duplicate check)."""
    arr, data = _read(Path(path), max_pixels)
    return arr, hashlib.sha256(data).hexdigest()


def read_bytes(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """A file's bytes; an unreadable file (missing, a symlink loop, no permission), one that is not a regular file
    (a device, a FIFO, a socket) or one over ``max_bytes`` is an ImageError naming it, raised before reading."""
    try:
        return read_regular(path, max_bytes)
    except FileTooLargeError as e:
        raise ImageTooLargeError(str(e)) from e
    except NotRegularFileError as e:
        raise ImageError(str(e)) from e
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from e


def _read(path: Path, max_pixels: int | None) -> tuple[np.ndarray, bytes]:
    data = read_bytes(path)
    if is_npy(data):
        return decode_npy(data, name=str(path), max_pixels=max_pixels), data
    return decode_image(data, name=str(path), max_pixels=max_pixels), data


def is_npy(data: bytes) -> bool:
    return data[:6] == _NPY_MAGIC


def decode_npy(data: bytes, name: str = "array", max_pixels: int | None = None) -> np.ndarray:
    """A .npy file's bytes -> its (H, W) or (H, W, C) array (no pickles; finite values only).

    The shape is read from the header first, so an array over ``max_pixels`` is refused before it is read. NaN
    and infinite values make the array a bad image, never a training input: one of them would turn the loss
    into NaN and look like a divergence.
    """
    f = io.BytesIO(data)
    try:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape = read_header(f)[0]  # (shape, fortran_order, dtype)
    except Exception as e:
        raise ImageError(f"{name}: not a readable .npy array ({e})") from e
    if len(shape) not in (2, 3):
        raise ImageError(f"{name}: expected a (H, W) or (H, W, C) array, got shape {tuple(shape)}")
    if max_pixels is not None and shape[0] * shape[1] > max_pixels:
        raise ImageTooLargeError(f"{name}: {shape[1]}x{shape[0]} pixels is over the limit of {max_pixels}")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ImageError(f"{name}: not a readable .npy array ({e})") from e
    if arr.dtype.kind == "c" or arr.dtype.kind not in "biuf":
        raise ImageError(f"{name}: arrays of {arr.dtype} are not images")
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ImageError(f"{name}: {bad} non-finite value(s) (NaN or Inf) in the array")
    return arr


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None,
                 formats: Sequence[str] | None = None) -> np.ndarray:
    """Decode encoded bytes (PNG, JPEG, ...) into a uint8 array; the first frame of an animation.

    Every PIL mode is handled: palette and 16-bit images are converted, EXIF orientation applied, alpha kept
    (``to_channels`` decides what to do with it). ``max_pixels`` is checked from the header, before any pixel
    is decoded; ``formats`` (PIL format names) restricts which decoders may run on untrusted bytes.
    """
    with open_image(data, name, max_pixels, formats) as im:
        im.seek(0)
        im.load()
        return pil_to_array(ImageOps.exif_transpose(im))


class open_image:
    """``with open_image(bytes_or_path, name, max_pixels) as im``: ``Image.open`` with the pixel limit checked from
    the header (nothing decoded yet) and PIL's errors turned into ImageError naming ``name``."""

    def __init__(self, source: bytes | str | Path, name: str, max_pixels: int | None,
                 formats: Sequence[str] | None = None):
        self.source, self.name, self.max_pixels, self.formats = source, name, max_pixels, formats
        self.im: Image.Image | None = None
        self.file: IO[bytes] | None = None

    def __enter__(self) -> Image.Image:
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            src: IO[bytes] = io.BytesIO(self.source)
        else:  # a path: a regular file within the byte limit only (PIL would open a FIFO and wait forever)
            try:
                src = self.file = open_regular(self.source, MAX_IMAGE_BYTES)
            except FileTooLargeError as e:
                raise ImageTooLargeError(str(e)) from e
            except NotRegularFileError as e:
                raise ImageError(str(e)) from e
            except OSError as e:
                self._raise(e)
        try:
            self.im = Image.open(src, formats=list(self.formats) if self.formats is not None else None)
        except BaseException as e:
            self._close_file()
            self._raise(e)
        if self.max_pixels is not None and self.im.width * self.im.height > self.max_pixels:
            self.im.close()
            self._close_file()
            raise ImageTooLargeError(f"{self.name}: {self.im.width}x{self.im.height} pixels is over the limit of "
                                     f"{self.max_pixels}")
        return self.im

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if self.im is not None:
            self.im.close()
        self._close_file()
        if exc is not None and not isinstance(exc, ImageError):
            self._raise(exc)
        return False

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _raise(self, e: BaseException) -> None:
        if isinstance(e, Image.DecompressionBombError):
            raise ImageTooLargeError(f"{self.name}: too many pixels ({e})") from e
        if isinstance(e, UnidentifiedImageError):
            allowed = f" (accepted: {', '.join(self.formats)})" if self.formats is not None else ""
            raise ImageError(f"{self.name}: not a recognised image format{allowed}") from e
        if isinstance(e, OSError) and e.errno is not None:  # the file itself: missing, a loop, no permission
            raise ImageError(f"{self.name}: cannot read ({e.strerror or e})") from e
        if isinstance(e, (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError)):
            raise ImageError(f"{self.name}: corrupt or truncated image ({e})") from e
        raise e


def pil_to_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W) for grey, (H, W, 3) for colour, (H, W, 4) when there is alpha."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
    if im.mode == "F":
        return to_uint8(np.asarray(im))
    return np.asarray(_eight_bit(im, keep_alpha=True))


def _eight_bit(im: Image.Image, keep_alpha: bool) -> Image.Image:
    """An 8-bit image in L, LA, RGB or RGBA (palette, bilevel, CMYK, YCbCr, LAB, HSV are converted).

    Without ``keep_alpha`` a transparent image is composited on black (premultiplied, then alpha dropped),
    which is what ``to_channels`` does in float; premultiplying first also keeps a resize from bleeding the
    colour of transparent pixels into visible ones.
    """
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("1", "L"):
        im = im.convert("L") if im.mode == "1" else im
    elif im.mode in ("LA", "PA"):
        im = im.convert("LA") if im.mode == "PA" else im
    elif im.mode not in ("RGB", "RGBA", "LA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    if keep_alpha or im.mode not in ("RGBA", "LA"):
        return im
    if im.mode == "RGBA":
        return Image.merge("RGB", im.convert("RGBa").split()[:3])
    return im.convert("La").split()[0]


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any array as uint8 of the same shape: booleans as 0/255, floats in [0, 1] scaled, any other range stretched
    to 0..255 (a float or 16-bit picture, for display and the bundled photographs)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1:
        return (arr * 255).round().astype(np.uint8)
    return ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)


def to_unit_float(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W[, C]) array -> float32 (channels, H, W) in [0, 1] (the general path's first step).

    Grey is replicated to colour and colour averaged to grey (ITU-R 601 weights); alpha is composited on
    black; an N-channel array must already have N channels.
    """
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    x = np.array(arr, dtype=np.float32)  # a writable float copy
    if scale != 1.0:
        x /= np.float32(scale)
    x = x[..., None] if x.ndim == 2 else x
    x = x.transpose(2, 0, 1)  # (C, H, W)
    c = x.shape[0]
    if c == channels:
        return np.ascontiguousarray(x)
    if c in (2, 4) and channels in (1, 3):  # colour or grey with alpha: composite on black
        x, c = x[:-1] * x[-1:], c - 1
    if c == channels:
        return np.ascontiguousarray(x)
    if c == 1 and channels == 3:
        return np.ascontiguousarray(np.broadcast_to(x, (3, *x.shape[1:])))
    if c == 3 and channels == 1:
        return (np.float32(0.299) * x[0] + np.float32(0.587) * x[1] + np.float32(0.114) * x[2])[None]
    raise ImageError(f"image has {arr.shape[-1] if arr.ndim == 3 else 1} channels; the model takes {channels}")


def to_channels(arr: np.ndarray, channels: int) -> torch.Tensor:
    """``to_unit_float`` as a torch tensor (channels, H, W)."""
    import torch

    return torch.from_numpy(to_unit_float(arr, channels))


# ----------------------------------------------------------------------------------------------- geometry


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` (ten tries, then the central crop that fits the ratio),
    drawn from ``rng`` so that a sample's crop depends on its own seed only."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return Box(rng.randint(0, height - h), rng.randint(0, width - w), h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return Box((height - h) // 2, (width - w) // 2, h, w)


def load_pixels(item: ImageItem, box: Callable[[int, int], Box], size: tuple[int, int], channels: int, *,
                interpolation: str = "bicubic", flip: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS,
                draft: bool = True, fast: bool = True, engine: str = "pil") -> np.ndarray:
    """An image item -> its ``box`` (chosen from the upright size) resized to ``size`` = (H, W), maybe flipped.

    Returns uint8 (channels, H, W) on the fast path, float32 (channels, H, W) in [0, 1] on the general path
    (see the module docstring); ``fast=False`` forces the general path (benchmarks, equality tests). ``draft``
    lets libjpeg decode at a reduced scale when the box allows it. ``engine``: who resizes on the fast path,
    ``pil`` (exact boxes; no torch import) or ``torch`` (its uint8 antialiased kernels: the training
    transforms, whose boxes are whole pixels and whose workers hold torch anyway).
    """
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(item, np.ndarray):
        if fast and _fast_array(item, channels):
            return _pil_path(Image.fromarray(item), box, size, channels, interpolation, flip, False, engine)
        return _general_path(item, box, size, channels, interpolation, flip)
    name = str(item.name if isinstance(item, EncodedImage) else item)
    data = item.data if isinstance(item, EncodedImage) else None
    if data is None and str(item).lower().endswith(".npy"):
        data = read_bytes(item)
    if data is not None and is_npy(data):
        return _general_path(decode_npy(data, name, max_pixels), box, size, channels, interpolation, flip)
    with open_image(data if data is not None else str(item), name, max_pixels) as im:
        if fast and im.mode not in _WIDE_MODES and channels in (1, 3):
            return _pil_path(im, box, size, channels, interpolation, flip, draft and im.format == "JPEG", engine)
        im.seek(0)
        im.load()
        arr = pil_to_array(ImageOps.exif_transpose(im))  # 16-bit and float images: to 8 bits first, as ever
    if fast and _fast_array(arr, channels):
        return _pil_path(Image.fromarray(arr), box, size, channels, interpolation, flip, False, engine)
    return _general_path(arr, box, size, channels, interpolation, flip)


def _fast_array(arr: np.ndarray, channels: int) -> bool:
    """A decoded array PIL can crop and resize as it is: uint8 grey, grey + alpha, RGB or RGBA."""
    bands = 1 if arr.ndim == 2 else arr.shape[2]
    return arr.dtype == np.uint8 and channels in (1, 3) and (arr.ndim == 2 or bands in (2, 3, 4))


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; 5-8 swap width and height)."""
    if im.format == "JPEG" and "exif" not in im.info:  # a JPEG's EXIF block precedes its pixels: absent is absent
        return 1
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not cost the image: decode it as stored
        return 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) of the image after its EXIF rotation."""
    return (im.width, im.height) if orientation(im) in (5, 6, 7, 8) else (im.height, im.width)


def _pil_path(im: Image.Image, box_fn: Callable[[int, int], Box], size: tuple[int, int], channels: int,
              interpolation: str, flip: bool, draft: bool, engine: str = "pil") -> np.ndarray:
    turn = orientation(im)
    height, width = (im.width, im.height) if turn in (5, 6, 7, 8) else (im.height, im.width)
    top, left, bh, bw = box_fn(height, width)
    out_h, out_w = size
    scale = 1.0
    if draft:
        k = 1
        while k < 8 and bh / (2 * k) >= out_h and bw / (2 * k) >= out_w:
            k *= 2
        grey = "L" if channels == 1 and im.mode == "RGB" else None  # libjpeg writes luma directly
        if k > 1 or grey:
            stored_width = im.width
            got = im.draft(grey, (im.width // k, im.height // k) if k > 1 else None)
            if got is not None:  # (mode, (0, 0, W / s, H / s)): where the stored image lands at scale 1/s
                scale = got[1][2] / stored_width
    im.seek(0)
    im.load()
    if turn != 1:
        im = ImageOps.exif_transpose(im)
    im = _eight_bit(im, keep_alpha=False)
    region = (left * scale, top * scale, (left + bw) * scale, (top + bh) * scale)
    if engine == "torch":
        arr = _torch_resize(im, region, size, interpolation)  # (C, H, W) uint8
        if flip:
            arr = arr[:, :, ::-1]
        if channels == 1 and arr.shape[0] == 3:
            return np.asarray(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))).convert("L"))[None]
        return np.array(np.broadcast_to(arr, (channels, *arr.shape[1:])), order="C")
    out = im.resize((out_w, out_h), _RESAMPLE[interpolation], box=region)
    if channels == 1 and out.mode != "L":
        out = out.convert("L")
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out)  # read-only, PIL's memory: copied below into a writable (C, H, W)
    if arr.ndim == 2:
        return np.array(np.broadcast_to(arr, (channels, *arr.shape)))  # (H, W) -> (C, H, W)
    return np.array(arr.transpose(2, 0, 1), order="C")  # (H, W, 3) -> (3, H, W)


def _torch_resize(im: Image.Image, region: tuple[float, float, float, float], size: tuple[int, int],
                  interpolation: str) -> np.ndarray:
    """torch's antialiased uint8 resize of a region of an 8-bit L or RGB image -> (C, *size) uint8.

    The same filters as PIL's (bicubic a = -0.5, triangle) within a level or two of 255, and several times
    faster on AVX2 (0.5 ms against 2.6 ms for a 300x250 -> 224 bicubic crop here). The region is rounded to
    whole pixels (it is whole already unless a reduced-scale JPEG decode divided it) and cut out by PIL first,
    so only its pixels are copied out of PIL's memory.
    """
    import torch
    import torch.nn.functional as F

    left, top = min(int(round(region[0])), im.width - 1), min(int(round(region[1])), im.height - 1)
    right, bottom = max(int(round(region[2])), left + 1), max(int(round(region[3])), top + 1)
    crop = im.crop((left, top, right, bottom))
    bands = len(crop.getbands())
    x = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(crop.height, crop.width, bands)
    x = x.permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last in memory: what the uint8 kernels like
    if interpolation == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        out = F.interpolate(x, size=size, mode=interpolation, antialias=True)
    return out[0].numpy()


def _general_path(arr: np.ndarray, box_fn: Callable[[int, int], Box], size: tuple[int, int], channels: int,
                  interpolation: str, flip: bool) -> np.ndarray:
    """The whole image in float, then the box: cropped then resized when it is whole pixels (a training crop, as
    torchvision does it), resized then cropped when it is not (an eval box: short-side resize, centre crop)."""
    import torch

    x = torch.from_numpy(to_unit_float(arr, channels))  # (C, H, W)
    top, left, bh, bw = box_fn(x.shape[1], x.shape[2])
    out_h, out_w = size
    if all(float(v).is_integer() for v in (top, left, bh, bw)):
        t, lf, h, w = int(top), int(left), int(bh), int(bw)
        x = resize(x[:, t : t + h, lf : lf + w], (out_h, out_w), interpolation)
    else:
        sy, sx = out_h / bh, out_w / bw
        full = (int(round(x.shape[1] * sy)), int(round(x.shape[2] * sx)))
        x = resize(x, full, interpolation)
        t, lf = int(round(top * sy)), int(round(left * sx))
        x = x[:, t : t + out_h, lf : lf + out_w]
    if flip:
        x = x.flip(-1)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(C, H, W) float -> (C, *size), antialiased when shrinking, clamped to [0, 1] (bicubic overshoots)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    antialias = interpolation != "nearest"
    x = F.interpolate(x.unsqueeze(0), size=size, mode=interpolation, antialias=antialias,
                      **({} if interpolation == "nearest" else {"align_corners": False}))
    return x.squeeze(0).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------- normalisation


def stats_arrays(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std as float32 (C, 1, 1), for ``normalize_pixels``."""
    return (np.asarray(mean, np.float32).reshape(-1, 1, 1), np.asarray(std, np.float32).reshape(-1, 1, 1))


def normalize_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (or float in [0, 1]) (..., C, H, W) -> float32 normalised: (x / 255 - mean) / std.

    The same float32 operations, in the same order, as ``mae.datasets.Normalize`` on a device, so a batch
    normalised here and one normalised there are equal on a CPU.
    """
    m, s = stats_arrays(mean, std)
    x = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        x /= np.float32(255.0)
    return (x - m) / s


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing; travels with the weights in every artifact (timm's ``pretrained_cfg``).

    The geometry is timm's eval transform (short side to size / crop_pct, centre crop), done as one box: PIL
    resizes only the pixels that survive the crop, in uint8. ``load`` gives the pixels before normalisation
    (what workers ship); ``__call__`` and ``pixels`` give the normalised float input of the model. A file, its
    bytes and its decoded array give the same pixels.
    """

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

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

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

    def box(self, ih: int, iw: int) -> Box:
        """The region of an (ih, iw) image that resize + centre crop keep, in source pixels."""
        _, h, w = self.input_size
        rh, rw = self.resized_size(ih, iw)
        # torchvision's CenterCrop rounding (half to even), so that timm's eval transform crops the same pixels
        top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
        sy, sx = ih / rh, iw / rw
        return Box(top * sy, left * sx, h * sy, w * sx)

    def load(self, item: ImageItem, max_pixels: int | None = MAX_IMAGE_PIXELS, draft: bool = False,
             fast: bool = True) -> np.ndarray:
        """An image item -> uint8 (C, H, W) (fast path) or float32 (C, H, W) in [0, 1] (general path).

        ``draft`` (a JPEG decoded at reduced scale) is off by default: the server decodes uploads at full scale,
        and an image embedded offline must get the vector the server gives it, to the last bit.
        """
        return load_pixels(item, self.box, self.size, self.channels, interpolation=self.interpolation,
                           max_pixels=max_pixels, draft=draft, fast=fast)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """``load`` output, one (C, H, W) or a batch (N, C, H, W) -> float32 model input."""
        return normalize_pixels(pixels, self.mean, self.std)

    def pixels(self, items: Sequence[ImageItem], max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Items -> float32 (N, C, H, W), normalised: the model input, without torch."""
        if not items:
            return np.zeros((0, *self.input_size), np.float32)
        return np.stack([self.normalize(self.load(it, max_pixels)) for it in items])

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Decoded image (H, W[, C]) array, or (C, H, W) float tensor in [0, 1] -> normalised (C, H, W) tensor."""
        import torch

        if not isinstance(image, np.ndarray):
            image = image.detach().cpu().numpy().transpose(1, 2, 0)  # (C, H, W) -> (H, W, C), float in [0, 1]
        return torch.from_numpy(self.normalize(self.load(image, max_pixels=None)))
