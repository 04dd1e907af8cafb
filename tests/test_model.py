"""The MAE itself: masking, loss, attention, position embeddings, and loading official / timm / HF weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mae.config import ModelConfig
from mae.model import MaskedAutoencoder, infer_model_config, patchify, sincos_pos_embed, unpatchify

SMALL = ModelConfig(img_size=(32, 32), patch_size=4, embed_dim=64, depth=2, num_heads=2,
                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture
def model() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(SMALL)


def test_masking_invariants(model):
    x = torch.randn(5, 64, 8)
    kept, mask, ids_restore = model.random_masking(x, 0.75)
    assert kept.shape == (5, int(64 * 0.25), 8)
    assert torch.equal(mask.sum(1), torch.full((5,), 48.0))
    # ids_restore inverts the shuffle: putting the kept tokens back where they came from gives the originals.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(64).expand(5, -1))
    kept_positions = ids_shuffle[:, :16]
    assert torch.equal(kept, torch.gather(x, 1, kept_positions.unsqueeze(-1).expand(-1, -1, 8)))
    assert (mask.gather(1, kept_positions) == 0).all()
    # Masks differ per sample, and the same noise gives the same mask.
    assert not torch.equal(mask[0], mask[1])
    noise = torch.rand(5, 64)
    assert torch.equal(model.random_masking(x, 0.75, noise)[1], model.random_masking(x, 0.75, noise)[1])


def test_loss_only_on_masked_patches(model):
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    _, pred, mask = model(imgs, noise=noise)
    pred = pred.detach().requires_grad_(True)
    loss = model.forward_loss(imgs, pred, mask)
    loss.backward()
    grad_norm_per_patch = pred.grad.abs().sum(-1)
    assert (grad_norm_per_patch[mask == 0] == 0).all(), "visible patches must not contribute to the loss"
    assert (grad_norm_per_patch[mask == 1] > 0).all()
    # Perfect predictions on the masked patches give zero loss whatever is predicted for the visible ones.
    target = model.patch_targets(imgs)
    perfect = torch.where(mask.unsqueeze(-1).bool(), target, torch.randn_like(target) * 100)
    assert model.forward_loss(imgs, perfect, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_norm_pix_targets_are_per_patch_normalised(model):
    target = model.patch_targets(torch.rand(2, 3, 32, 32))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 64), atol=1e-3)


def test_encoder_sees_only_visible_patches(model):
    latent, mask, _ = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    assert latent.shape == (2, 1 + 16, 64)  # class token + 25% of 64 patches


def test_sdpa_matches_manual_attention(model):
    model.eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    attns = [b.attn for b in list(model.blocks) + list(model.decoder_blocks)]
    assert all(a.fused_attn for a in attns), "timm should route attention through F.scaled_dot_product_attention"
    with torch.no_grad():
        fused = model(imgs, noise=noise)
        for a in attns:
            a.fused_attn = False
        manual = model(imgs, noise=noise)
    torch.testing.assert_close(fused[1], manual[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[0], manual[0], rtol=1e-5, atol=1e-6)


# --- position embeddings: the official implementation, verbatim (models_mae.py / util/pos_embed.py) -------------


def _official_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = _official_1d(embed_dim // 2, grid[0])
    emb_w = _official_1d(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def _official_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@pytest.mark.parametrize("dim,grid", [(64, 8), (768, 14), (32, 3)])
def test_sincos_matches_official(dim, grid):
    ours = sincos_pos_embed(dim, (grid, grid), cls_token=True).numpy()
    official = _official_get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    np.testing.assert_allclose(ours, official, atol=1e-6)


def test_pos_embeds_are_fixed(model):
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].numpy(), _official_get_2d_sincos_pos_embed(64, 8, True), atol=1e-6)


# --- patches, channels, non-square inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(1, (32, 32)), (3, (24, 40)), (5, (16, 48))])
def test_patchify_round_trip_any_channels_non_square(channels, size):
    imgs = torch.randn(2, channels, *size)
    x = patchify(imgs, 8)
    assert x.shape == (2, (size[0] // 8) * (size[1] // 8), 64 * channels)
    assert torch.equal(unpatchify(x, 8, (size[0] // 8, size[1] // 8), channels), imgs)


def test_patchify_matches_official_order():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    # official: reshape (N, 3, h, p, w, p) -> einsum nchpwq->nhwpqc -> (N, h*w, p*p*3)
    ref = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, 2, 4, 2, 4)).reshape(2, 4, 48)
    assert torch.equal(patchify(imgs, 4), ref)


def test_non_square_multichannel_model_trains():
    cfg = ModelConfig(img_size=(16, 48), patch_size=8, in_chans=5, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    m = MaskedAutoencoder(cfg)
    loss, pred, mask = m(torch.randn(2, 5, 16, 48))
    assert pred.shape == (2, 12, 8 * 8 * 5) and mask.shape == (2, 12)
    loss.backward()
    assert torch.isfinite(m.patch_embed.proj.weight.grad).all()


def test_noise_reproduces_reconstruction(model):
    model.eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_loss_falls_on_a_fixed_batch():
    from mae.config import IMAGENET_MEAN, IMAGENET_STD
    from mae.images import Preprocessing
    from mae.sources import load_source

    torch.manual_seed(0)
    m = MaskedAutoencoder(SMALL)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95))
    source = load_source("digits")
    pre = Preprocessing((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, crop_pct=1.0)
    imgs, noise = torch.stack([pre(source.read(i)) for i in range(8)]), torch.rand(8, 64)
    losses = []
    for _ in range(40):
        loss, _, _ = m(imgs, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# --- foreign weights --------------------------------------------------------------------------------------------


def official_keys(depth: int, decoder_depth: int, with_decoder: bool) -> list[str]:
    """The state-dict keys of the official MaskedAutoencoderViT (facebookresearch/mae, models_mae.py)."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    keys += ["norm.weight", "norm.bias"]
    if with_decoder:
        keys += ["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
        keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block]
        keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def _official_state(with_decoder: bool) -> dict[str, torch.Tensor]:
    """An official-layout state dict with the official shapes for SMALL, filled with random values."""
    d, dd, p, c, L = 64, 32, 4, 3, 64
    hidden, dhidden = 4 * d, 4 * dd

    def block_shapes(w: int, h: int) -> dict[str, tuple]:
        return {"norm1.weight": (w,), "norm1.bias": (w,), "attn.qkv.weight": (3 * w, w), "attn.qkv.bias": (3 * w,),
                "attn.proj.weight": (w, w), "attn.proj.bias": (w,), "norm2.weight": (w,), "norm2.bias": (w,),
                "mlp.fc1.weight": (h, w), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (w, h), "mlp.fc2.bias": (w,)}

    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, L + 1, d), "patch_embed.proj.weight": (d, c, p, p),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd),
              "decoder_pos_embed": (1, L + 1, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
              "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * c, dd),
              "decoder_pred.bias": (p * p * c,)}
    for key in official_keys(2, 1, with_decoder):
        if key.startswith(("blocks.", "decoder_blocks.")):
            prefix, _, rest = key.split(".", 2)
            shapes[key] = block_shapes(d if prefix == "blocks" else dd, hidden if prefix == "blocks" else dhidden)[rest]
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(shapes[k], generator=g) for k in official_keys(2, 1, with_decoder)}


@pytest.mark.parametrize("with_decoder", [False, True], ids=["mae_pretrain_vit", "full_or_visualize"])
def test_official_checkpoints_load_strictly(tmp_path, with_decoder):
    state = _official_state(with_decoder)
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)  # how the official release wraps its weights
    m = MaskedAutoencoder.from_checkpoint(path)
    own = m.state_dict()
    assert set(state) <= set(own)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    # Strict: a renamed or missing key is an error, not a silent partial load.
    broken = dict(state)
    broken["blocks.0.attn.qkv_renamed.weight"] = broken.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(KeyError, match="missing"):
        MaskedAutoencoder(SMALL).load_mae_state_dict(broken)


def test_official_finetuned_layout_loads_encoder(tmp_path):
    state = _official_state(False)
    state.pop("norm.weight"), state.pop("norm.bias")  # official finetuned models use fc_norm instead of norm
    state.update({"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64),
                  "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    with pytest.raises(KeyError, match="norm.weight"):
        MaskedAutoencoder(SMALL).load_mae_state_dict(state)


def test_timm_vit_mae_weights_load(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    m = MaskedAutoencoder.from_checkpoint(path)
    for k, v in vit.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert m.cfg.embed_dim == 64 and m.cfg.depth == 2 and m.cfg.patch_size == 4 and m.cfg.img_size == (32, 32)


def test_infer_model_config_reads_shapes():
    m = MaskedAutoencoder(SMALL)
    cfg = infer_model_config(m.state_dict())
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.in_chans, cfg.img_size) == (64, 2, 4, 3, (32, 32))
    assert (cfg.decoder_embed_dim, cfg.decoder_depth) == (32, 1)


def test_matches_hugging_face_vitmae():
    """Same weights and noise as transformers' ViTMAEForPreTraining -> the same loss, prediction and mask."""
    transformers = pytest.importorskip("transformers")
    from mae.checkpoint import from_hf_vitmae

    hf_cfg = transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
        patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=128, norm_pix_loss=True, layer_norm_eps=1e-6,
    )
    hf = transformers.ViTMAEForPreTraining(hf_cfg).eval()
    m = MaskedAutoencoder(SMALL).eval()
    assert m.load_mae_state_dict(from_hf_vitmae(hf.state_dict())) == []
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    with torch.no_grad():
        ref = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = m(imgs, noise=noise)
    torch.testing.assert_close(pred, ref.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref.mask)
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
