"""Small shared pieces for the finetune / evaluate / artifact tests: a 16 px config and a labelled folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae.checkpoint import save_checkpoint
from mae.config import Config, DataConfig, FinetuneConfig, ModelConfig, OptimConfig, RunConfig
from mae.model import MaskedAutoencoder


def config16(**finetune) -> Config:
    """16 px, patch 4 (16 patches), 32 wide, 2 blocks: a step takes milliseconds."""
    return Config(
        model=ModelConfig(img_size=(16, 16), patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                          decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
        data=DataConfig(mean=(0.5,), std=(0.5,), crop_pct=1.0, num_workers=0, val_fraction=0.25),
        optim=OptimConfig(batch_size=8, warmup_epochs=1),
        run=RunConfig(epochs=1, log_every=1, ckpt_every=1000, vis_every=1000),
        finetune=FinetuneConfig(batch_size=8, probe_batch_size=8, epochs=1, probe_epochs=1, warmup_epochs=0.5,
                                probe_warmup_epochs=0.5, crop_scale=(0.6, 1.0), **finetune),
        preset="custom",
    )


def labelled_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """PNG digits-like set: class c is a bright bar at row band c, plus noise (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            band = size // classes
            img[c * band : (c + 1) * band, 2 : size - 2] = 200 + rng.integers(0, 55)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def mae_checkpoint(path: Path, cfg: Config | None = None, seed: int = 0) -> Path:
    """A pretraining checkpoint (random MAE weights) in our training-checkpoint format."""
    cfg = cfg or config16()
    torch.manual_seed(seed)
    model = MaskedAutoencoder(cfg.model)
    return save_checkpoint(path, {"model": model.state_dict(), "step": 0, "epoch": 0, "config": cfg.to_dict()})
