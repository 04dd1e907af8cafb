"""Stage 3, pretrain_step: one training step (forward, backward, fused AdamW) of ViT-B/16 and ViT-L/16 at 224 px,
bf16, ours eager / regionally compiled / fully compiled against Hugging Face ``ViTMAEForPreTraining`` of the same
size, batch and precision; img/s, step time, peak memory, TFLOP/s and MFU (analytic FLOPs:
``bench.pretrain.analytic_step_flops``; against the measured bf16 matmul peak and, where known, the datasheet peak).
The dry run times a toy ViT, and torch.compile uses the ``aot_eager`` backend there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.device.stage import TOY, Goal, Stage, device, free_memory, num, sig

NAME = "pretrain_step"
BUDGET = (110, 90)
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4}
"""Dense bf16 datasheet peaks (SXM parts), by a substring of torch's device name: the usual MFU denominator."""
PHASES = [("eager", [("hf", False), ("ours", False)]), ("regional", [("ours-compiled-regional", "regional")]),
          ("full", [("ours-compiled", True)])]
"""Eager rows first, so that a budget cut costs the compiled rows, not the baseline."""


@dataclass(frozen=True)
class Plan:
    """What the stage times: (label, model config, batch) per model, and how."""

    models: list[tuple[str, Any, int]]
    steps: int
    rounds: int
    backend: str
    warmup: int


def plan(dry: bool) -> Plan:
    from mae.config import get_preset

    if dry:
        return Plan([("toy ViT (32 px, 2+1 blocks)", get_preset("mae_vit_tiny_patch4_32").override(TOY).model, 8)],
                    steps=2, rounds=2, backend="aot_eager", warmup=2)
    return Plan([("ViT-B/16", get_preset("mae_vit_base_patch16").model, 256),
                 ("ViT-L/16", get_preset("mae_vit_large_patch16").model, 256)],
                steps=5, rounds=3, backend="inductor", warmup=3)


def run(st: Stage) -> None:
    """Ours (eager, regionally compiled, fully compiled) against Hugging Face ViTMAE, per model; partial rows are
    saved as they come."""
    import torch

    from bench.pretrain import analytic_step_flops, step_flops

    dev = device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    p = plan(st.dry)
    st.result.update(rows=[], precision="bf16 autocast", compile_backend=p.backend)
    if st.dry:
        st.result["compile_note"] = ("torch.compile rows use the aot_eager backend in the dry run (dynamo + "
                                     "AOTAutograd without inductor's C++ build); inductor on the GPU")
    with st.item("matmul_peak") as e:
        e["tflops"] = measure_peak(st, dev)
    with st.item("flop_formula_check") as e:  # the analytic count against torch's counter, attention unfused
        cfg = p.models[0][1]
        e["counter_over_analytic"] = round(step_flops(cfg, 2, dev, fused_attention=False)
                                           / analytic_step_flops(cfg, 2), 4)
    for phase, impls in PHASES:
        for label, cfg, batch in p.models:
            key = f"{label} {phase}"
            if st.left() < 15:
                st.skip(key, f"out of this stage's time ({st.left():.0f} s left)")
                continue
            try:
                with st.item(key, model=label, batch=batch):
                    time_phase(st, p, label, cfg, batch, impls, dev)
            finally:  # models, optimiser states and compiled graphs go before the next model is built
                free_memory()
    best: dict[str, dict[str, Any]] = {}
    for r in st.result["rows"]:
        if r["impl"] != "hf" and r["images_per_s"] > best.get(r["model"], {}).get("images_per_s", 0):
            best[r["model"]] = r
    st.result["summary"] = "; ".join(f"{m}: {r['images_per_s']:.0f} img/s ({r['impl']}, {r['vs_hf']}x HF)"
                                     for m, r in best.items()) or "no rows"


def measure_peak(st: Stage, dev: Any) -> float:
    """The bf16 matmul rate here (TFLOP/s), and the datasheet peak where the GPU is known: MFU's denominators."""
    import torch

    from bench.pretrain import matmul_peak

    cuda = dev.type == "cuda"
    # A CPU without native bf16 emulates bf16 matmuls slowly while autocast may still reach fp32 kernels: there the
    # better of the two rates is the denominator (MFU over 100% otherwise).
    peak = matmul_peak(dev, torch.bfloat16) if cuda else max(matmul_peak(dev, torch.bfloat16),
                                                             matmul_peak(dev, torch.float32))
    st.result["measured_peak_flops"] = peak
    st.result["measured_peak_tflops"] = round(peak / 1e12, 3)
    name = torch.cuda.get_device_name(0) if cuda else ""
    st.result["nominal_peak_tflops"] = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    return st.result["measured_peak_tflops"]


def time_phase(st: Stage, p: Plan, label: str, cfg: Any, batch: int, impls: list[tuple[str, bool | str]],
               dev: Any) -> None:
    """Time one phase's implementations of one model on a fixed random batch; their rows go into the result."""
    import torch

    from bench.pretrain import bench_candidates

    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=dev)
    cands = bench_candidates([(n, candidate(n, cfg, dev, p.backend, c)) for n, c in impls], x, p.steps, p.rounds,
                             p.warmup)
    st.result["rows"] += rows(st.result, label, cfg, batch, cands)
    st.save()


def candidate(name: str, cfg: Any, dev: Any, backend: str, compile: bool | str = False) -> Callable[[], Any]:
    """A ``bench.pretrain.Candidate`` factory: ours or Hugging Face's, initialised on the device."""

    def make() -> Any:
        import torch

        from bench.pretrain import Candidate, hf_loss, hf_model, ours_loss
        from mae.model import MaskedAutoencoder

        torch.manual_seed(0)
        with torch.device(dev):  # initialise on the device: ViT-L's init on the CPU alone takes seconds
            model = hf_model(cfg) if name == "hf" else MaskedAutoencoder(cfg)
        loss = hf_loss if name == "hf" else ours_loss
        return Candidate(name, model, loss, dev, torch.bfloat16, compile=compile, backend=backend)

    return make


def rows(result: dict[str, Any], label: str, cfg: Any, batch: int, cands: list[Any]) -> list[dict[str, Any]]:
    """A row per candidate: img/s, against HF's (the eager phase's row of the same model), FLOP/s, MFU, memory."""
    from bench.pretrain import analytic_step_flops

    flops = analytic_step_flops(cfg, batch)
    peak, nominal = result.get("measured_peak_flops"), result.get("nominal_peak_tflops")
    hf = next((r["images_per_s"] for r in result["rows"] if r["model"] == label and r["impl"] == "hf"), None)
    out = []
    for c in cands:
        ips = c.median()
        hf = ips if c.name == "hf" else hf
        out.append({"model": label, "impl": c.name, "batch": batch, "precision": "bf16",
                    "images_per_s": round(ips, 1), "step_ms": round(batch / ips * 1e3, 2),
                    "vs_hf": round(ips / hf, 3) if hf else None, "gflop_per_image": round(flops / batch / 1e9, 2),
                    "tflops": sig(flops * ips / batch / 1e12),
                    "mfu_measured_peak": sig(flops * ips / batch / peak) if peak else None,
                    "mfu_nominal_peak": sig(flops * ips / batch / (nominal * 1e12)) if nominal else None,
                    "peak_memory_gib": round(c.peak_bytes / 2**30, 2) if c.peak_bytes is not None else None,
                    "warmup_s": round(c.warmup_seconds, 1)})
    return out


def report(result: dict[str, Any]) -> list[str]:
    rows_ = result.get("rows", [])
    if not rows_:
        return []
    lines = ["", "## Pretraining step (forward + backward + fused AdamW, bf16 autocast)", "",
             f"Measured bf16 matmul peak {result.get('measured_peak_tflops')} TFLOP/s; datasheet "
             f"{result.get('nominal_peak_tflops') or '-'} TFLOP/s. FLOPs are analytic (bench.pretrain."
             f"analytic_step_flops); torch's counter / formula = "
             f"{result.get('items', {}).get('flop_formula_check', {}).get('counter_over_analytic', '-')}. "
             + result.get("compile_note", ""), "",
             "| model | impl | batch | img/s | vs HF | step ms | TFLOP/s | MFU (measured / datasheet peak) | "
             "peak GiB | warm-up s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_:
        mfu = " / ".join(num(r.get(k), ".1%") for k in ("mfu_measured_peak", "mfu_nominal_peak"))
        lines.append(f"| {r['model']} | {r['impl']} | {r.get('batch', '-')} | {r['images_per_s']:.1f} | "
                     f"{r.get('vs_hf') or '-'} | {r.get('step_ms', '-')} | {r.get('tflops', '-')} | {mfu} | "
                     f"{r.get('peak_memory_gib') or '-'} | {r.get('warmup_s', '-')} |")
    return lines


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    rows_ = result.get("rows", [])

    def best(model: str) -> dict[str, Any] | None:
        ours = [r for r in rows_ if r["model"] == model and r["impl"] != "hf"]
        return max(ours, key=lambda r: r["images_per_s"]) if ours else None

    vit_l, vit_b = best("ViT-L/16"), best("ViT-B/16")
    if dry:  # the toy model's row stands in for both, so that the dry run rehearses every goal
        vit_l = vit_b = next((best(m) for m in {r["model"] for r in rows_}), None)
    nominal = bool(result.get("nominal_peak_tflops"))
    mfu_key = "mfu_nominal_peak" if nominal else "mfu_measured_peak"
    return [
        Goal("ViT-L/16 MAE pretraining >= 2,500 img/s", vit_l and vit_l["images_per_s"], 2500,
             detail=vit_l["impl"] if vit_l else ""),
        Goal(f"ViT-L/16 MFU >= 40% (of the {'datasheet' if nominal else 'measured matmul'} bf16 peak)",
             vit_l and vit_l.get(mfu_key), 0.40, "{:.1%}"),
        Goal("ViT-B/16 MAE pretraining >= 5,000 img/s", vit_b and vit_b["images_per_s"], 5000,
             detail=vit_b["impl"] if vit_b else ""),
        *(Goal(f"{name} >= 1.3x Hugging Face ViTMAE at the same batch and precision", r and r.get("vs_hf"), 1.3,
               "{:.2f}x") for name, r in (("ViT-B/16", vit_b), ("ViT-L/16", vit_l))),
    ]
