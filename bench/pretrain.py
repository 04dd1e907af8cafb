"""Pretraining throughput: images/s of one full step (forward, backward, AdamW), ours vs Hugging Face ViTMAE.

The named baseline is ``transformers.ViTMAEForPreTraining`` with the same architecture, batch, threads and
precision, run eagerly as its users run it. Runs are interleaved (baseline, ours, baseline, ours, ...) and the
median is reported, so load from other processes hits both sides alike.

    python bench/pretrain.py                                  # CPU, tiny preset, eager + bf16 (+ --compile)
    python bench/pretrain.py --preset mae_vit_base_patch16 --batch 8 --steps 3
    python bench/pretrain.py --gpu                            # CUDA: ViT-B/16 and ViT-L/16 at 224, bf16, MFU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
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
    """One implementation + precision, with its optimiser, stepped on a fixed batch."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, device: torch.device,
                 dtype: torch.dtype | None, compile: bool = False):
        self.name = name
        self.model = model.to(device).train()
        self.forward = torch.compile(self.model) if compile else self.model
        self.loss_fn = loss_fn
        self.device = device
        self.dtype = dtype
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                     fused=device.type == "cuda")
        self.samples: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss_fn(self.forward, x)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def measure(self, x: torch.Tensor, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.step(x)
        sync()
        ips = x.shape[0] * steps / (time.perf_counter() - t)
        self.samples.append(ips)
        return ips


def ours_loss(model, x):
    return model(x)[0]


def hf_loss(model, x):
    return model(pixel_values=x).loss


def step_flops(cfg: ModelConfig, batch: int, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MaskedAutoencoder(cfg).to(device)
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)[0].backward()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 50) -> float:
    """Measured dense-matmul FLOP/s of this device in ``dtype`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run(preset: str, batch: int, steps: int, rounds: int, device: torch.device, precisions: list[str],
        compile: bool, overrides: list[str]) -> list[dict]:
    cfg = get_preset(preset).override(overrides).model
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device)
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    cands = []
    for prec in precisions:
        torch.manual_seed(0)
        cands.append(Candidate(f"hf-{prec}", hf_model(cfg), hf_loss, device, dtypes[prec]))
        cands.append(Candidate(f"ours-{prec}", MaskedAutoencoder(cfg), ours_loss, device, dtypes[prec]))
        if compile:
            cands.append(Candidate(f"ours-{prec}-compiled", MaskedAutoencoder(cfg), ours_loss, device, dtypes[prec],
                                   compile=True))
    for c in cands:  # warm-up (and compilation) outside the timed rounds
        for _ in range(3):
            c.step(x)
    for _ in range(rounds):
        for c in cands:
            c.measure(x, steps)
    baseline = statistics.median(cands[0].samples)
    rows = []
    for c in cands:
        prec = c.name.split("-")[1]
        same_prec = statistics.median(next(d for d in cands if d.name == f"hf-{prec}").samples)
        ips = statistics.median(c.samples)
        rows.append({"preset": preset, "impl": c.name, "batch": batch, "images_per_s": round(ips, 1),
                     "vs_hf_fp32": round(ips / baseline, 2), "vs_hf_same_precision": round(ips / same_prec, 2)})
    return rows


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
            flops = step_flops(cfg, batch, device)
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
