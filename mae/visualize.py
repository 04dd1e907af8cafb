"""Pictures people look at: reconstruction grids, loss curves and thumbnails of any image the project reads (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mae.files import read_json_lines
from mae.model import MaskedAutoencoder, masked_input

ROW_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised (N, C, H, W) batch back to pixels in [0, 1], clamped for display."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    noise: torch.Tensor | None = None,
    mask_ratio: float | None = None,
) -> Image.Image:
    """Four rows per call: original, masked input, reconstruction, reconstruction with visible patches pasted.

    imgs: (N, C, H, W) normalised like the training data. The prediction is un-normalised per patch under
    ``norm_pix_loss`` (``model.reconstruct``) and then with the dataset mean/std, so colours are right.
    """
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        recon = model.reconstruct(imgs, pred.float())
    finally:
        model.train(was_training)
    p = model.cfg.patch_size
    original = denormalize(imgs.float(), mean, std)
    rec = denormalize(recon, mean, std)
    masked = masked_input(original, mask, p, fill=0.5)  # grey where hidden
    pasted = masked_input(original, mask, p, fill=0.0) + rec * _mask_image(mask, p, imgs.shape)
    rows = [original, masked, rec, pasted.clamp(0, 1)]
    return _tile(rows, ROW_TITLES)


def _mask_image(mask: torch.Tensor, p: int, shape: torch.Size) -> torch.Tensor:
    n, _, h, w = shape
    m = mask.reshape(n, 1, h // p, w // p)
    return m.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


def _tile(rows: list[torch.Tensor], titles: Sequence[str], min_cell: int = 96, pad: int = 4) -> Image.Image:
    """rows of (N, C, H, W) in [0, 1] -> one image, each cell upscaled (nearest) to at least ``min_cell`` px."""
    n, c, h, w = rows[0].shape
    scale = max(1, int(np.ceil(min_cell / max(h, w))))
    ch, cw = h * scale, w * scale
    label_w = 150
    grid = Image.new("RGB", (label_w + n * (cw + pad) + pad, len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, title) in enumerate(zip(rows, titles)):
        y = pad + r * (ch + pad)
        draw.text((6, y + ch // 2 - 6), title, fill="black")
        for i in range(n):
            cell = _to_pil(row[i]).resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (label_w + pad + i * (cw + pad), y))
    return grid


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL; 1 channel is grey, 3 RGB, other counts show their first three (or first) channels."""
    arr = (x.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], "L").convert("RGB")
    if arr.shape[0] >= 3:
        return Image.fromarray(np.transpose(arr[:3], (1, 2, 0)), "RGB")
    return Image.fromarray(arr[0], "L").convert("RGB")


def loss_curve(metrics_path: str | Path, out: str | Path, keys: Sequence[str] = ("loss",)) -> Path:
    """Plot the given keys of ``metrics.jsonl`` against the step (log-scale y when positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_json_lines(metrics_path, "metrics log") if isinstance(r, dict)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(", ".join(keys))
    if all(r.get(k, 1) > 0 for r in rows for k in keys if k in r):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def display_array(arr: np.ndarray) -> np.ndarray:
    """Any decoded image (uint8/16-bit/float, 1..N channels) -> uint8 (H, W) grey or (H, W, 3|4) for display.

    N-channel arrays show their first three channels (or first one); other depths are stretched min..max.
    """
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        arr = arr[..., :3] if arr.shape[2] > 4 else arr[..., 0]
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    return arr


def thumbnail(arr: np.ndarray, size: int = 128) -> Image.Image:
    """An RGB picture of an image at most ``size`` pixels a side, aspect kept.

    Large images shrink with a Lanczos filter; small ones (28 px digits) grow by a whole factor with nearest
    neighbours, so that their pixels stay crisp squares people can read.
    """
    im = Image.fromarray(display_array(arr)).convert("RGB")
    if max(im.size) > size:
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    else:
        factor = size // max(im.size)
        if factor > 1:
            im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    return im
