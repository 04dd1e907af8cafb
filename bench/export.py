"""Benchmark the exported encoder against torch eager (the named baseline): CPU by default, GPU with --gpu.

CPU (``python bench/export.py``): images/s at batch 1 and 32 for torch eager fp32, onnxruntime fp32
(``encoder.onnx``), onnxruntime fp32 with onnxscript's attention fusion (the graph ``encoder.fp16.onnx`` is
made from, timed here in fp32 to show what fusion does on a CPU) and onnxruntime int8 (``encoder.int8.onnx``),
for the tiny preset (32 px) and ViT-B/16 at 224 (random-init weights: speed does not depend on them; parity
is measured on real bundled images all the same). Printed as ratios to torch eager,
with the CPU's ISA. Goals (issue 4): ORT fp32 >= 1.5x eager at batch 1 and >= 1.2x at batch 32; int8 >= 1.5x
ORT fp32 with cosine >= 0.99.

Shared machines: runners are timed round-robin, ``--rounds`` times, and each ratio is the median of the
per-round ratios, so a burst of load from elsewhere hits every runner of a round alike. ``--threads`` is the
thread count of every runner (torch and onnxruntime alike); the default is 1 because multi-threaded torch
eager collapses when another process holds a core (OpenMP barriers wait for the slowest thread), which
would flatter onnxruntime.

GPU (``python bench/export.py --gpu``, one prepared script, no network, a few minutes on one H200): ViT-B/16
at 224, torch eager bf16 vs onnxruntime CUDA fp16 (``encoder.fp16.onnx``: fused attention; I/O bound to CUDA
tensors) vs
TensorRT fp16 (``encoder.plan``), at batch 1 / 32 / 256, with each one's cosine to torch fp32 on real images.
Goal: TensorRT >= 2x torch eager and >= 8,000 img/s at batch 256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx import export_onnx, fuse_attention, save_ir  # noqa: E402
from export.ort import session_options  # noqa: E402
from export.parity import reference_images  # noqa: E402
from mae import artifact  # noqa: E402
from mae.config import get_preset  # noqa: E402
from mae.hardware import cpu_isa  # noqa: E402

MODELS = {"tiny": "mae_vit_tiny_patch4_32", "vitb": "mae_vit_base_patch16"}
LABELS = {"tiny": "tiny (ViT-Ti/4, 32 px)", "vitb": "ViT-B/16, 224 px"}


def make_artifact(name: str, out: Path) -> Path:
    """Random-init encoder artifact of a preset (speed does not depend on training)."""
    return artifact.from_random_init(out, get_preset(MODELS[name]))


def timed(fn: Callable[[], Any], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Calls per second of ``fn`` over at least ``seconds`` (and at least 2 calls)."""
    calls = 0
    sync()
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls >= 2:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls / elapsed


def round_robin(runners: dict[str, Callable[[], Any]], batch: int, rounds: int, seconds: float,
                sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Median images/s per runner and median per-round ratio to the first runner (the baseline)."""
    names = list(runners)
    for fn in runners.values():  # warm-up: allocations, ORT's first-run graph work, cuDNN/TRT tactics
        fn()
    sync()
    speed: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            speed[n].append(timed(runners[n], seconds, sync) * batch)
    base = names[0]
    return {n: {"img_s": statistics.median(v), "ratio": statistics.median(a / b for a, b in zip(v, speed[base])),
                "samples": v} for n, v in speed.items()}


def cpu_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnxruntime as ort


    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        print(f"[bench] {LABELS[name]}: artifact, ONNX export and int8 calibration ...", file=sys.stderr, flush=True)
        path = make_artifact(name, work / name)
        record = export_onnx(path, int8=True, parity_images=args.parity_images)
        fused_path = work / f"{name}.fused.onnx"
        fused, counts = fuse_attention(path / "encoder.onnx")
        save_ir(fused, fused_path)
        art = artifact.load(path)
        encoder = art.encoder.eval()
        sessions = {k: ort.InferenceSession(str(p), session_options(args.threads), providers=["CPUExecutionProvider"])
                    for k, p in (("fp32", path / "encoder.onnx"), ("fused", fused_path),
                                 ("int8", path / "encoder.int8.onnx"))}
        pixels, _, _ = reference_images(["photos", "mnist5k"], 64, art.preprocessing)
        rows = {}
        for batch in (1, 32):
            x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
            xt = torch.from_numpy(x)

            def eager(xt: torch.Tensor = xt, encoder: torch.nn.Module = encoder) -> Any:
                with torch.inference_mode():
                    return encoder(xt)

            runners: dict[str, Callable[[], Any]] = {"torch eager fp32": eager}
            for label, key in (("ORT fp32", "fp32"), ("ORT fp32 fused attn", "fused"), ("ORT int8", "int8")):
                runners[label] = (lambda s=sessions[key], x=x: s.run(["embedding"], {"pixels": x}))
            print(f"[bench] {name} batch {batch}: {args.rounds} rounds ...", file=sys.stderr, flush=True)
            rows[batch] = round_robin(runners, batch, args.rounds, args.seconds)
            pairs = zip(rows[batch]["ORT int8"]["samples"], rows[batch]["ORT fp32"]["samples"])
            rows[batch]["int8 / ORT fp32"] = statistics.median(a / b for a, b in pairs)
        results[name] = {"rows": rows, "int8_parity": record["onnx_int8"]["parity"]["embedding"],
                         "mha_nodes": counts["MultiHeadAttention_nodes"]}
    return results


def print_cpu(results: dict[str, Any], args: argparse.Namespace, load: tuple[float, float]) -> None:
    isa = cpu_isa()
    print(f"CPU: {isa['cpu']} | ISA: {isa['isa']} | {isa['cores']} cores visible, {args.threads} thread(s) per "
          f"runner | torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    print(f"load average before/after: {load[0]:.1f} / {load[1]:.1f} (shared machine: absolute img/s are noisy; "
          f"ratios are medians of {args.rounds} round-robin rounds)")
    header = f"| {'model':<22} | batch | {'torch eager':>12} | {'ORT fp32':>17} | {'ORT fp32 fused':>17} | " \
             f"{'ORT int8':>17} | int8/fp32 | int8 cos min |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, res in results.items():
        for batch, row in res["rows"].items():
            def cell(k: str, row: dict[str, Any] = row) -> str:
                return f"{row[k]['img_s']:8.1f} ({row[k]['ratio']:.2f}x)"

            print(f"| {LABELS[name]:<22} | {batch:>5} | {row['torch eager fp32']['img_s']:12.1f} | "
                  f"{cell('ORT fp32'):>17} | {cell('ORT fp32 fused attn'):>17} | {cell('ORT int8'):>17} | "
                  f"{row['int8 / ORT fp32']:8.2f}x | {res['int8_parity']['cosine_min']:12.5f} |")
    print("img/s (ratio to torch eager fp32, the baseline). Goals: ORT fp32 >= 1.5x at batch 1, >= 1.2x at 32; "
          "int8 >= 1.5x ORT fp32 with cos >= 0.99.")
    for name, res in results.items():
        r1, r32 = res["rows"][1], res["rows"][32]
        ok = [r1["ORT fp32"]["ratio"] >= 1.5, r32["ORT fp32"]["ratio"] >= 1.2,
              min(r1["int8 / ORT fp32"], r32["int8 / ORT fp32"]) >= 1.5, res["int8_parity"]["cosine_min"] >= 0.99]
        print(f"  {LABELS[name]}: fp32 b1 {'met' if ok[0] else 'MISSED'}, fp32 b32 {'met' if ok[1] else 'MISSED'}, "
              f"int8 speed {'met' if ok[2] else 'MISSED'}, int8 cos {'met' if ok[3] else 'MISSED'}; "
              f"{res['mha_nodes']} MultiHeadAttention nodes after fusion")


# ----------------------------------------------------------------------------------------------- GPU


def gpu_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """ViT-B/16: torch eager bf16 vs ORT CUDA fp16 vs TensorRT fp16 at batch 1/32/256 (one H200)."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA GPU visible to torch")
    dev = torch.device("cuda")
    batches = [int(b) for b in args.gpu_batches.split(",")]
    print("[bench] ViT-B/16 artifact + ONNX fp32/fp16 export (parity on CPU) ...", file=sys.stderr, flush=True)
    path = make_artifact("vitb", work / "vitb")
    record = export_onnx(path, fp16=True, parity_images=args.parity_images)
    art = artifact.load(path)
    pixels, _, _ = reference_images(["photos", "mnist5k"], 64, art.preprocessing)
    real = torch.from_numpy(pixels).to(dev)
    with torch.inference_mode():
        reference = art.encoder.to(dev).float()(real)[0]
    encoder_bf16 = art.encoder.to(dev, torch.bfloat16).eval()

    def torch_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encoder_bf16(x.to(torch.bfloat16))[0]

    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"torch eager bf16": torch_bf16}
    notes: dict[str, str] = {}
    try:
        import onnxruntime as ort


        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA provider (install onnxruntime-gpu, not onnxruntime)")
        session = ort.InferenceSession(str(path / "encoder.fp16.onnx"), session_options(),
                                       providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])

        def ort_fp16(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous()
            out = torch.empty((len(x), art.embed_dim), dtype=torch.float32, device=dev)
            binding = session.io_binding()
            binding.bind_input("pixels", "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
            binding.bind_output("embedding", "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
            session.run_with_iobinding(binding)
            return out

        runners["ORT CUDA fp16"] = ort_fp16
    except Exception as e:  # noqa: BLE001 - a missing runtime is reported, the others still run
        notes["ORT CUDA fp16"] = str(e)
    try:
        from export.tensorrt import TensorRTRunner, build_engine

        print("[bench] building the TensorRT fp16 engine ...", file=sys.stderr, flush=True)
        side = build_engine(path, precision="fp16", min_batch=1, opt_batch=args.trt_opt, max_batch=max(batches))
        notes["TensorRT"] = (f"TensorRT {side['tensorrt']} on {side['gpu']} (sm {side['compute_capability']}), "
                             f"built in {side['build_seconds']} s, strongly typed: {side['strongly_typed']}")
        runner = TensorRTRunner(path / "encoder.plan")
        runners["TensorRT fp16"] = lambda x: runner(x)["embedding"]
    except Exception as e:  # noqa: BLE001
        notes["TensorRT fp16"] = f"{type(e).__name__}: {e}"
    parity = {}
    for name, fn in runners.items():
        got = torch.cat([fn(real[i : i + 16]).float() for i in range(0, len(real), 16)])
        parity[name] = float(torch.nn.functional.cosine_similarity(got, reference.float()).min())
    rows = {}
    for batch in batches:
        x = real.repeat((batch + len(real) - 1) // len(real), 1, 1, 1)[:batch].contiguous()
        print(f"[bench] GPU batch {batch} ...", file=sys.stderr, flush=True)
        rows[batch] = round_robin({k: (lambda fn=fn, x=x: fn(x)) for k, fn in runners.items()}, batch,
                                  args.rounds, args.gpu_seconds, sync=torch.cuda.synchronize)
    return {"rows": rows, "parity_cos_min": parity, "notes": notes, "gpu": torch.cuda.get_device_name(0),
            "onnx_fp16_parity": record["onnx_fp16"]["parity"]["embedding"]}


def print_gpu(res: dict[str, Any]) -> None:
    print(f"GPU: {res['gpu']} | torch {torch.__version__} | ViT-B/16 at 224, random-init weights")
    for k, v in res["notes"].items():
        print(f"  {k}: {v}")
    names = list(res["parity_cos_min"])
    print("| batch | " + " | ".join(f"{n:>24}" for n in names) + " |")
    print("|------:|" + "|".join("-" * 26 for _ in names) + "|")
    for batch, row in res["rows"].items():
        print(f"| {batch:>5} | " + " | ".join(f"{row[n]['img_s']:11.0f} img/s ({row[n]['ratio']:.2f}x)" for n in names)
              + " |")
    cos = res["parity_cos_min"]
    print("cos min vs torch fp32 on real images: " + ", ".join(f"{k} {v:.5f}" for k, v in cos.items()))
    last = res["rows"][max(res["rows"])]
    if "TensorRT fp16" in last:
        trt = last["TensorRT fp16"]
        print(f"Goal at batch {max(res['rows'])}: TensorRT {trt['ratio']:.2f}x torch eager bf16 (goal >= 2x), "
              f"{trt['img_s']:.0f} img/s (goal >= 8,000)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,vitb", help="comma-separated: tiny, vitb")
    p.add_argument("--threads", type=int, default=1, help="threads per runner (torch and onnxruntime alike)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds; ratios are per-round medians")
    p.add_argument("--seconds", type=float, default=1.5, help="minimum seconds per runner per round (CPU)")
    p.add_argument("--parity-images", type=int, default=32, help="real images for the exports' parity checks")
    p.add_argument("--gpu", action="store_true", help="run the GPU benchmark instead of the CPU one")
    p.add_argument("--gpu-batches", default="1,32,256")
    p.add_argument("--gpu-seconds", type=float, default=2.0)
    p.add_argument("--trt-opt", type=int, default=256, help="TensorRT profile's opt batch")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mae-bench-") as tmp:
        load_before = os.getloadavg()[0]
        if args.gpu:
            res = gpu_bench(args, Path(tmp))
            print_gpu(res)
        else:
            res = cpu_bench(args, Path(tmp))
            print_cpu(res, args, (load_before, os.getloadavg()[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"platform": platform.platform(), "results": res}, indent=1,
                                              default=str) + "\n")


if __name__ == "__main__":
    main()
