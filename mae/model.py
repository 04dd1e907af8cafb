"""The Masked Autoencoder (He et al., 2021) as a timm ``VisionTransformer`` with a decoder attached.

Subclassing timm keeps the encoder's state-dict keys identical to timm's and to the official release
(``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*``), so official and timm weights load as they
are, and the encoder keeps timm's two faces: ``forward_features`` (all tokens, no masking) for embeddings and
``forward_head`` for pooled features. Attention goes through timm's ``Attention``, which calls
``F.scaled_dot_product_attention`` (SDPA) whenever timm's fused attention is enabled (the default).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mae.config import Config, ModelConfig
from mae.errors import UserError

NORM_EPS = 1e-6  # the official code's LayerNorm eps (timm's default is 1e-5)
NORM_PIX_EPS = 1e-6  # added to the per-patch variance of the targets, as in the official code


class WeightsError(UserError, KeyError, ValueError):
    """Weights that do not fit the model: keys missing or unexpected, shapes that differ, not a ViT at all."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


class MaskedAutoencoder(VisionTransformer):
    """MAE with a ViT encoder that only sees the visible patches and a light decoder that rebuilds all pixels."""

    def __init__(self, cfg: ModelConfig):
        cfg.validate()
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=NORM_EPS),
            weight_init="skip",
        )
        self.cfg = cfg
        grid = cfg.grid_size
        patch_dim = cfg.patch_size**2 * cfg.in_chans

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, cfg.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(
                cfg.decoder_embed_dim,
                cfg.decoder_num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=NORM_EPS),
            )
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=NORM_EPS)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, patch_dim, bias=True)

        # Fixed sin-cos position embeddings (not learned during pretraining, as in the paper).
        self.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.requires_grad_(False)
        self.pos_embed.data.copy_(sincos_pos_embed(cfg.embed_dim, grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(cfg.decoder_embed_dim, grid, cls_token=True).unsqueeze(0))
        self._init_official()

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def _init_official(self) -> None:
        """The official initialisation: xavier-uniform linears (patch projection as a linear), N(0, .02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and name != "patch_embed.proj":
                nn.init.xavier_uniform_(m.weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------------------------------ patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> (N, L, p*p*C), patch pixels in (row, column, channel) order as in the official code."""
        return patchify(imgs, self.cfg.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, p*p*C) -> (N, C, H, W)."""
        return unpatchify(x, self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_chans)

    # ------------------------------------------------------------------------------------------ forward

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample by sorting uniform noise (small noise is kept).

        x: (N, L, D) -> kept (N, L_keep, D), mask (N, L) with 0 = kept and 1 = removed, ids_restore (N, L).
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, C, H, W) -> latent (N, 1 + L_keep, D), mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        # The class token is appended after masking so that it is always visible.
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = self._run_blocks(self.blocks, x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: (N, 1 + L_keep, D) -> predicted patches (N, L, p*p*C)."""
        x = self.decoder_embed(x)  # (N, 1 + L_keep, Dd)
        n, kept, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - kept, -1)
        x_ = torch.cat((x[:, 1:, :], mask_tokens), dim=1)  # (N, L, Dd), kept tokens first
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # back to spatial order
        x = torch.cat((x[:, :1, :], x_), dim=1)
        x = x + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def _run_blocks(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The blocks in order; with timm's ``set_grad_checkpointing()`` each block's activations are recomputed in
        the backward pass instead of kept (``run.grad_checkpointing``)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            return checkpoint_seq(list(blocks), x)
        for blk in blocks:
            x = blk(x)
        return x

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The regression targets: patches, normalised per patch when ``norm_pix_loss`` is on. (N, L, p*p*C)."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        target = self.patch_targets(imgs)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (N, L): per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)). Pass ``noise`` (N, L) to repeat a mask."""
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches -> images in the input's normalisation (N, C, H, W).

        Under ``norm_pix_loss`` the prediction lives in per-patch normalised space; each patch is mapped back
        with the mean and variance of the original patch, as the official visualisation does.
        """
        if self.cfg.norm_pix_loss:
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
        return self.unpatchify(pred)

    # ------------------------------------------------------------------------------------------ loading

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's keys (what a ``VisionTransformer`` or an artifact loads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, strict: bool = True) -> MaskedAutoencoder:
        """Rebuild a model from our training checkpoint, or from official / timm MAE weights.

        Foreign weights carry no config, so the architecture is read off the tensor shapes. Weights without a
        decoder (``mae_pretrain_vit_*.pth``, timm ``vit_*.mae``) load the encoder and keep a fresh decoder.
        """
        from mae.checkpoint import load_weights

        state, config = load_weights(path)
        model_cfg = Config.from_dict(config).model if config else infer_model_config(state)
        model = cls(model_cfg)
        model.load_mae_state_dict(state, strict=strict)
        return model

    def load_mae_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load official/timm/our weights. Returns the keys the model kept from its own init (e.g. the decoder).

        Position embeddings are recomputed sin-cos in our layout, so they are taken from the file only when
        their shape matches; a finetuned file's ``fc_norm``/``head`` are not part of an MAE and are ignored.
        """
        own = self.state_dict()
        classifier = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
        state = {k: v for k, v in state.items() if k not in classifier}
        has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
        expected = set(own) if has_decoder else {k for k in own if not k.startswith(DECODER_PREFIXES)}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise WeightsError(f"weights do not match the MAE: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise WeightsError(f"{k}: file has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=False)
        return sorted(set(own) - set(state))


DECODER_PREFIXES = ("decoder_", "mask_token")


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: (N, C, H, W) -> (N, h*w, p*p*C)."""
    n, c, hp, wp = imgs.shape
    h, w = hp // p, wp // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int) -> torch.Tensor:
    """x: (N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
    h, w = grid
    n = x.shape[0]
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * p, w * p)


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings in the official layout: (gh*gw [+1], dim).

    The first half of the channels encodes the column (x) coordinate and the second half the row, because the
    official code builds ``np.meshgrid(grid_w, grid_h)`` and names the halves h then w. A zero row is
    prepended for the class token.
    """
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w goes first
    coords = np.stack([ys, xs], axis=0).reshape(2, 1, gh, gw)
    emb = np.concatenate([_sincos_1d(dim // 2, coords[0]), _sincos_1d(dim // 2, coords[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: any shape, M values -> (M, dim): sin of the first half, cos of the second."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# Official/timm checkpoints carry no config: widths and depths are read off the shapes, heads from this table.
_KNOWN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def infer_model_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Read a ModelConfig off an MAE/ViT state dict (official ``mae_*.pth``, timm ``vit_*.mae``)."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    except KeyError as e:
        raise WeightsError("not a ViT/MAE state dict: no 'patch_embed.proj.weight'") from e
    embed_dim, in_chans, patch, _ = proj.shape
    num_tokens = state["pos_embed"].shape[1] - 1
    side = int(round(math.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise WeightsError(f"cannot infer a non-square image size from {num_tokens} position embeddings")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    kwargs = {}
    if "decoder_embed.weight" in state:
        dec_dim = state["decoder_embed.weight"].shape[0]
        kwargs = dict(
            decoder_embed_dim=dec_dim,
            decoder_depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
            decoder_num_heads=16 if dec_dim == 512 else max(1, dec_dim // 32),
        )
    return ModelConfig(
        img_size=(side * patch, side * patch),
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=_KNOWN_HEADS.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=mlp_ratio,
        **kwargs,
    )


def masked_input(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, fill: float = 0.0) -> torch.Tensor:
    """imgs (N, C, H, W) with the masked patches (mask (N, L), 1 = removed) replaced by ``fill``."""
    n, c, h, w = imgs.shape
    m = mask.reshape(n, 1, h // patch_size, w // patch_size)
    m = F.interpolate(m, scale_factor=patch_size, mode="nearest")
    return imgs * (1 - m) + fill * m
