"""Pretraining throughput: images/s of one full step (forward, backward, AdamW), ours vs Hugging Face ViTMAE.

The named baseline is ``transformers.ViTMAEForPreTraining`` with the same architecture, batch, threads and
precision, run eagerly as its users run it. Runs are interleaved (baseline, ours, baseline, ours, ...) and the
median is reported, so load from other processes hits both sides alike.

    python bench/pretrain.py                                  # CPU, tiny preset, eager + bf16 (+ --compile)
    python bench/pretrain.py --preset mae_vit_base_patch16 --batch 8 --steps 3
    python bench/pretrain.py --gpu                            # CUDA: ViT-B/16 and ViT-L/16 at 224, bf16, MFU

The pieces (``Candidate``, ``bench_candidates``, ``analytic_step_flops``, ``matmul_peak``) are importable:
``bench/device/stages/pretrain_step.py`` builds its stage from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae.config import ModelConfig, get_preset  # noqa: E402
from mae.model import MaskedAutoencoder  # noqa: E402


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    assert cfg.img_size[0] == cfg.img_size[1], "HF ViTMAE takes square images"
    return ViTMAEForPreTraining(ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size[0], patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss, layer_norm_eps=1e-6, attn_implementation="sdpa",
    ))


class Candidate:
    """One implementation + precision, with its optimiser, stepped on a fixed batch.

    ``compile``: False, True (the whole model under ``torch.compile``), or "regional" (each encoder and decoder
    block compiled on its own: identical blocks share one compiled graph, so compile time stays that of one
    block, the PyTorch "regional compilation" recipe). ``backend`` is torch.compile's backend (inductor; the
    CPU rehearsal uses aot_eager, which traces the same graphs without a C++ build).
    """

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, device: torch.device,
                 dtype: torch.dtype | None, compile: bool | str = False, backend: str = "inductor"):
        self.name = name
        self.model = model.to(device).train()
        if compile == "regional":
            for blocks in (getattr(self.model, "blocks", []), getattr(self.model, "decoder_blocks", [])):
                for block in blocks:
                    block.compile(backend=backend)
            self.forward = self.model
        else:
            self.forward = torch.compile(self.model, backend=backend) if compile else self.model
        self.loss_fn = loss_fn
        self.device = device
        self.dtype = dtype
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                     fused=device.type == "cuda")
        self.samples: list[float] = []
        self.warmup_seconds = 0.0
        self.peak_bytes: int | None = None

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss_fn(self.forward, x)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def measure(self, x: torch.Tensor, steps: int) -> float:
        sync = _sync(self.device)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.step(x)
        sync()
        ips = x.shape[0] * steps / (time.perf_counter() - t)
        self.samples.append(ips)
        return ips

    def median(self) -> float:
        return statistics.median(self.samples)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_candidates(factories: Sequence[tuple[str, Callable[[], Candidate]]], x: torch.Tensor, steps: int,
                     rounds: int, warmup: int = 3) -> list[Candidate]:
    """Build and warm each candidate in turn (its compilation and its peak memory are its own: later ones do not
    exist yet), then time them in interleaved rounds so that drifting load hits all alike."""
    cuda = x.device.type == "cuda"
    cands = []
    for _, make in factories:
        sync = _sync(x.device)
        base = torch.cuda.memory_allocated(x.device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(x.device)
        started = time.perf_counter()
        c = make()
        for _ in range(warmup):  # allocations, cuDNN / kernel choice, compilation
            c.step(x)
        sync()
        c.warmup_seconds = time.perf_counter() - started
        if cuda:
            c.peak_bytes = torch.cuda.max_memory_allocated(x.device) - base
        cands.append(c)
    for _ in range(rounds):
        for c in cands:
            c.measure(x, steps)
    return cands


def ours_loss(model, x):
    return model(x)[0]


def hf_loss(model, x):
    return model(pixel_values=x).loss


def analytic_step_flops(cfg: ModelConfig, batch: int) -> float:
    """FLOPs of one MAE training step (forward + backward), counted from the shapes alone.

    Matrix products only (norms, softmax, GELU and the loss are well under 1%), 2 FLOPs per multiply-add::

        P = patch_size^2 * in_chans        pixels per patch          L = patches per image
        V = int(L * (1 - mask_ratio))      visible patches           T_e = V + 1, T_d = L + 1 (class token)
        D, D_d = encoder / decoder widths                            H = mlp_ratio * D, H_d = mlp_ratio * D_d
        block(T, D, H) = 2T*3D*D (qkv) + 2T*T*D (q k^T) + 2T*T*D (attn v) + 2T*D*D (proj) + 2*2T*D*H (MLP)
                       = 8T*D^2 + 4T*D*H + 4T^2*D
        forward = 2L*P*D                                patch embedding (all L patches: masking comes after it)
                + depth * block(T_e, D, H)              encoder over the visible 25% and the class token
                + 2T_e*D*D_d                            decoder embedding
                + decoder_depth * block(T_d, D_d, H_d)  decoder over every token
                + 2T_d*D_d*P                            pixel prediction
        step    = (3 * forward - 2L*P*D) * batch       backward = 2 x forward (activation + weight gradients),
                                                        except the images' gradient, which nobody needs

    ViT-B/16 at 224: 19.6 GFLOP per image forward (encoder 8.8 over 50 tokens, decoder 10.7 over 197), 58.5 per
    training image; ViT-L/16: 41.5 forward, 124.2 per training image (so 2,500 img/s is 311 TFLOP/s). It is the
    MFU numerator: the work the model needs, not what an implementation spends (recomputation does not
    count). With timm's fused attention off, torch's FlopCounterMode agrees with it (tests/test_device.py).
    """
    p_dim = cfg.patch_size**2 * cfg.in_chans
    length = cfg.num_patches
    t_e, t_d = int(length * (1 - cfg.mask_ratio)) + 1, length + 1

    def block(t: int, d: int) -> float:
        h = cfg.mlp_ratio * d
        return 8 * t * d * d + 4 * t * d * h + 4 * t * t * d

    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    forward = (2 * length * p_dim * d + cfg.depth * block(t_e, d) + 2 * t_e * d * dd
               + cfg.decoder_depth * block(t_d, dd) + 2 * t_d * dd * p_dim)
    return (3.0 * forward - 2 * length * p_dim * d) * batch


def step_flops(cfg: ModelConfig, batch: int, device: torch.device, fused_attention: bool = True) -> float:
    """FLOPs of one training step (forward + backward) counted by torch's FlopCounterMode (checks the formula).

    ``fused_attention=False`` swaps timm's fused SDPA for explicit matmuls: the counter does not see every
    fused attention kernel (none of the CPU ones), but it sees q k^T and attn v as matmuls.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = MaskedAutoencoder(cfg).to(device)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attention
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)[0].backward()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                reps: int | None = None) -> float:
    """Measured dense-matmul FLOP/s of this device in ``dtype`` (the measured-peak MFU denominator)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    reps = reps or (50 if cuda else 5)
    sync = _sync(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run(preset: str, batch: int, steps: int, rounds: int, device: torch.device, precisions: list[str],
        compile: bool, overrides: list[str]) -> list[dict]:
    cfg = get_preset(preset).override(overrides).model
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device)
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    factories: list[tuple[str, Callable[[], Candidate]]] = []
    for prec in precisions:
        dt = dtypes[prec]
        factories.append((f"hf-{prec}", lambda dt=dt, prec=prec: _seeded(
            lambda: Candidate(f"hf-{prec}", hf_model(cfg), hf_loss, device, dt))))
        factories.append((f"ours-{prec}", lambda dt=dt, prec=prec: _seeded(
            lambda: Candidate(f"ours-{prec}", MaskedAutoencoder(cfg), ours_loss, device, dt))))
        if compile:
            factories.append((f"ours-{prec}-compiled", lambda dt=dt, prec=prec: _seeded(
                lambda: Candidate(f"ours-{prec}-compiled", MaskedAutoencoder(cfg), ours_loss, device, dt,
                                  compile=True))))
    cands = bench_candidates(factories, x, steps, rounds)
    baseline = cands[0].median()
    rows = []
    for c in cands:
        prec = c.name.split("-")[1]
        same_prec = next(d for d in cands if d.name == f"hf-{prec}").median()
        ips = c.median()
        rows.append({"preset": preset, "impl": c.name, "batch": batch, "images_per_s": round(ips, 1),
                     "vs_hf_fp32": round(ips / baseline, 2), "vs_hf_same_precision": round(ips / same_prec, 2)})
    return rows


def _seeded(make: Callable[[], Candidate]) -> Candidate:
    torch.manual_seed(0)
    return make()


def print_table(rows: list[dict], extra: str = "") -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    if extra:
        print(extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mae_vit_tiny_patch4_32")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="model config overrides")
    p.add_argument("--gpu", action="store_true", help="CUDA: ViT-B/16 and ViT-L/16 at 224 in bf16, with MFU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = matmul_peak(device)
        rows = []
        for preset, batch in (("mae_vit_base_patch16", 256), ("mae_vit_large_patch16", 256)):
            cfg = get_preset(preset).model
            flops = analytic_step_flops(cfg, batch)
            for r in run(preset, batch, args.steps, args.rounds, device, ["bf16"], args.compile, []):
                r["tflops"] = round(flops * r["images_per_s"] / batch / 1e12, 1)
                r["mfu"] = round(flops * r["images_per_s"] / batch / peak, 3)
                rows.append(r)
        extra = f"device: {torch.cuda.get_device_name()}, measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
    else:
        device = torch.device("cpu")
        rows = run(args.preset, args.batch, args.steps, args.rounds, device, args.precision, args.compile,
                   args.overrides)
        extra = f"device: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, " \
                f"ISA {torch.backends.cpu.get_cpu_capability()}"
    if args.json:
        print(json.dumps({"rows": rows, "note": extra}))
    else:
        print_table(rows, extra)


if __name__ == "__main__":
    main()
