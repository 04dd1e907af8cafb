"""The pixel check of near-duplicate candidates: do two images line up, pixel for pixel, once one is moved?

An embedding tells images *of the same kind* apart only so far: with the demo's digit encoder another digit is
closer than one of an image's own edited copies for most images, so no cosine threshold separates copies from
look-alikes (README, "Near-duplicates"). Copy detection therefore checks its candidates geometrically, and so
does ``Index.duplicates`` when given a ``PixelCheck``: the embedding proposes pairs (cosine at or above a loose
threshold among each item's nearest), and a pair is kept only when a grey SIDE x SIDE thumbnail of one image,
moved by the best similarity transform (scale, rotation, shift: what resizing, cropping and tilting do), matches
the other's with a normalised correlation at or above ``PIXEL_THRESHOLD`` over the area both cover. Brightness
and contrast drop out of a correlation; JPEG noise and the blur of a resize mostly drop out of a small thumbnail.

The transform is found by Gauss-Newton on the mean/variance-normalised difference (Lucas-Kanade), from the
identity, coarse to fine, limited to the zoom and tilt copies are made with; in numpy, a thousand pairs at a time
per thread (no torch: ``mae index duplicates`` stays as light as search); in both directions (a crop lines up
with its original better one way than the other), and the better one counts. About 0.7 ms a pair on 2 cores.
Thumbnails are read once per item with the loaders' bounded decoding (JPEG decoded at a reduced scale).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mae.images import Box, ImageError, load_pixels

SIDE = 24
ITERATIONS = 12
BLUR_PASSES = 3
# Measured with bench/retrieval.py --duplicates (demo artifact, 200 held-out digits x 5 edited copies among 800
# distractors, files read as an index reads them): candidates at cosine >= 0.80 among the 16 nearest, kept at
# aligned correlation >= 0.9875, give pair precision 0.986 at recall 0.933 (README table; a second draw of
# digits: 0.949 at 0.911); at 0.985 precision falls to 0.86 (distinct digits chain), at 0.99 recall to 0.91
# (resized copies drop out first). Tilts beyond 10 degrees let any two straight 1s line up (precision 0.97 with
# 30 degrees allowed; among the demo's 1,000 digits, which hold no copies, 26 ones were grouped, now 18).
CANDIDATE_THRESHOLD = 0.80
PIXEL_THRESHOLD = 0.9875
MAX_ZOOM = 1.25  # a 90% crop is 1.11
MAX_TILT = np.radians(10)
_BLOCK = 1024  # pairs aligned at once by one thread: about 25 MB of float32 working arrays at SIDE 24


def thumbnail(path: str | Path, side: int = SIDE) -> np.ndarray:
    """A file as a (side, side) float32 grey thumbnail in [0, 1], the whole image squeezed (aspect not kept:
    a resized copy keeps its aspect, a 90% crop changes it by little); ImageError when it cannot be read."""
    pixels = load_pixels(path, lambda h, w: Box(0, 0, h, w), (side, side), 1, interpolation="bilinear")
    grey = pixels[0]
    return grey.astype(np.float32) / 255 if grey.dtype == np.uint8 else grey.astype(np.float32)


def _normalised(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, N) values with zero mean and unit variance over each row's mask (zero outside it), and the (P, 1)
    standard deviations they were divided by."""
    count = np.maximum(mask.sum(1, keepdims=True), 1.0)
    mean = (x * mask).sum(1, keepdims=True) / count
    centred = (x - mean) * mask
    std = np.maximum(np.sqrt((centred**2).sum(1, keepdims=True) / count), 1e-4)
    return centred / std, std


def _warp(b: np.ndarray, p: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample each image of ``b`` (P, S, S) at the similarity transform ``p`` = (a, b, tx, ty) of the centred
    pixel grid (u, v): x = (1+a)u - b v + tx. Bilinear, edges clamped; returns (P, S*S) values and the mask of
    grid points that land inside the image."""
    n, s, _ = b.shape
    c = (s - 1) / 2
    a, r, tx, ty = (p[:, i : i + 1] for i in range(4))
    x = (1 + a) * u - r * v + tx + c
    y = r * u + (1 + a) * v + ty + c
    inside = ((x >= 0) & (x <= s - 1) & (y >= 0) & (y <= s - 1)).astype(np.float32)
    x, y = np.clip(x, 0, s - 1), np.clip(y, 0, s - 1)
    x0, y0 = np.minimum(np.floor(x), s - 2).astype(np.int64), np.minimum(np.floor(y), s - 2).astype(np.int64)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    flat = b.reshape(n, -1)
    at = y0 * s + x0

    def take(offset: int) -> np.ndarray:
        return np.take_along_axis(flat, at + offset, axis=1)

    top = take(0) * (1 - fx) + take(1) * fx
    bottom = take(s) * (1 - fx) + take(s + 1) * fx
    return top * (1 - fy) + bottom * fy, inside


def _blurred(x: np.ndarray, passes: int) -> np.ndarray:
    """(P, S, S) smoothed by ``passes`` rounds of the [1, 2, 1] / 4 kernel along both axes (edges repeated)."""
    for _ in range(passes):
        for axis in (1, 2):
            padded = np.pad(x, [(0, 0) if d != axis else (1, 1) for d in range(3)], mode="edge")
            lo, mid, hi = (np.take(padded, np.arange(k, k + x.shape[axis]), axis=axis) for k in range(3))
            x = (lo + 2 * mid + hi) / 4
    return x


def _aligned_one_way(a: np.ndarray, b: np.ndarray, iterations: int) -> np.ndarray:
    """Correlation of each ``a`` with its ``b`` moved onto it by the fitted similarity transform, (P,)."""
    n, s, _ = a.shape
    grid = np.arange(s, dtype=np.float32) - (s - 1) / 2
    v, u = (g.reshape(1, -1) for g in np.meshgrid(grid, grid, indexing="ij"))
    p = np.zeros((n, 4), np.float32)
    eye = np.eye(4, dtype=np.float32)
    # Coarse to fine: the first half of the steps on blurred thumbnails, where fine texture cannot trap the fit.
    coarse = (_blurred(a, BLUR_PASSES), _blurred(b, BLUR_PASSES))
    for step_number in range(iterations):
        fixed_image, moving_image = coarse if step_number < iterations // 2 else (a, b)
        target = fixed_image.reshape(n, -1)
        moved, inside = _warp(moving_image, p, u, v)
        fixed, _ = _normalised(target, inside)
        normalised, std = _normalised(moved, inside)
        residual = fixed - normalised
        gy, gx = np.gradient(moved.reshape(n, s, s), axis=(1, 2))
        gx, gy = gx.reshape(n, -1) / std, gy.reshape(n, -1) / std
        jac = np.stack([gx * u + gy * v, gy * u - gx * v, gx, gy], axis=2) * inside[..., None]  # d moved / d p
        jac_t = jac.transpose(0, 2, 1)
        hessian = jac_t @ jac
        hessian += eye * (1e-4 * np.trace(hessian, axis1=1, axis2=2)[:, None, None] + 1e-6)
        step = np.linalg.solve(hessian, jac_t @ residual[..., None])[..., 0]
        p = p + step.astype(np.float32)
        # Only the moves copies are made with: a modest zoom and tilt (a crop, a straightened scan). Wider, and
        # any straight stroke would line up with any other (distinct 1s of a digit collection do).
        zoom = np.clip(np.hypot(1 + p[:, 0], p[:, 1]), 1 / MAX_ZOOM, MAX_ZOOM)
        tilt = np.clip(np.arctan2(p[:, 1], 1 + p[:, 0]), -MAX_TILT, MAX_TILT)
        p[:, 0], p[:, 1] = zoom * np.cos(tilt) - 1, zoom * np.sin(tilt)
        np.clip(p[:, 2:], -s / 6, s / 6, out=p[:, 2:])
    target = a.reshape(n, -1)
    moved, inside = _warp(b, p, u, v)
    count = np.maximum(inside.sum(1), 1.0)
    return (_normalised(target, inside)[0] * _normalised(moved, inside)[0]).sum(1) / count


def aligned_correlation(a: np.ndarray, b: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
    """For thumbnail pairs ``a[i]``, ``b[i]`` (P, S, S): the correlation once they are lined up, in [-1, 1]."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"thumbnail pairs must both be (P, S, S), got {a.shape} and {b.shape}")
    def block(i: int) -> np.ndarray:
        j = slice(i, i + _BLOCK)
        return np.maximum(_aligned_one_way(a[j], b[j], iterations), _aligned_one_way(b[j], a[j], iterations))

    if len(a) <= _BLOCK:
        return block(0) if len(a) else np.empty(0, np.float32)
    with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:  # numpy lets go of the GIL in the heavy parts
        return np.concatenate(list(pool.map(block, range(0, len(a), _BLOCK))))


class PixelCheck:
    """Confirms candidate pairs of item ids by aligned thumbnail correlation (``Index.duplicates(check=...)``).

    ``path_of`` gives each id's file. A file that cannot be read confirms nothing; its id is kept in
    ``unreadable`` so the caller can say so. ``scores`` keeps the correlation of every pair it judged.
    """

    def __init__(self, path_of: Callable[[Sequence[int]], dict[int, str]], threshold: float = PIXEL_THRESHOLD):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"pixel threshold must be a correlation in [-1, 1], got {threshold}")
        self.path_of, self.threshold = path_of, threshold
        self.thumbnails: dict[int, np.ndarray | None] = {}
        self.unreadable: dict[int, str] = {}
        self.scores: dict[tuple[int, int], float] = {}

    def _load(self, ids: Sequence[int]) -> None:
        missing = sorted({int(i) for i in ids} - self.thumbnails.keys())
        paths = self.path_of(missing) if missing else {}
        for i in missing:
            try:  # kept as 8 bits (what the decoder gives): 576 bytes an item, 0.6 GB for a million
                self.thumbnails[i] = np.round(thumbnail(paths[i]) * 255).astype(np.uint8)
            except KeyError:
                self.thumbnails[i], self.unreadable[i] = None, "no longer in the index"
            except (ImageError, OSError) as e:
                self.thumbnails[i], self.unreadable[i] = None, str(e)

    def __call__(self, pairs: np.ndarray) -> np.ndarray:
        """(P, 2) ids -> (P,) bool: whether each pair lines up at the threshold."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        self._load(pairs.ravel().tolist())
        ok = np.array([self.thumbnails[a] is not None and self.thumbnails[b] is not None for a, b in pairs.tolist()],
                      bool)
        keep = np.zeros(len(pairs), bool)
        if ok.any():
            judged = pairs[ok]
            score = aligned_correlation(np.stack([self.thumbnails[a] for a in judged[:, 0].tolist()]) / 255,
                                        np.stack([self.thumbnails[b] for b in judged[:, 1].tolist()]) / 255)
            self.scores.update(zip(map(tuple, judged.tolist()), score.tolist()))
            keep[ok] = score >= self.threshold
        return keep
