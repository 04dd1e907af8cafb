"""Stage 7, embed: ViT-B/16 embedding at batch 1 / 32 / 256: torch eager bf16, torch.compile, and the AOTInductor
package (``mae export --inductor``: parity on real images first), on device tensors and through ``Embedder.run``
(numpy in and out); onnxruntime on the CPU as the reference row. The dry run compiles the package for the CPU (for
real) and runs torch.compile with the ``aot_eager`` backend."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.device.stage import SKIPPED, Goal, Stage, device, no_cuda_reason, num

NAME = "embed"
BUDGET = (90, 150)


@dataclass(frozen=True)
class Plan:
    """The model and batches the stage times, and how."""

    cfg: Any
    label: str
    batches: tuple[int, ...]
    seconds: float
    rounds: int
    compile_backend: str
    max_batch: int


def plan(dry: bool) -> Plan:
    from mae.config import get_preset

    if dry:
        return Plan(get_preset("mae_vit_tiny_patch4_32").override(["model.depth=1"]), "toy ViT (32 px, 1 block)",
                    (1, 8, 32), 0.3, 2, "aot_eager", 32)
    return Plan(get_preset("mae_vit_base_patch16"), "ViT-B/16", (1, 32, 256), 0.6, 2, "inductor", 256)


class Bench:
    """The stage's state: the artifact, its real parity images and reference embeddings, and how rows are timed.

    Rows come in the order of what matters if the budget runs out: eager and the Embedder's torch backend, the
    AOTInductor package (export + parity, then speed), onnxruntime on the CPU, torch.compile last.
    """

    def __init__(self, st: Stage, p: Plan):
        import torch

        self.st, self.p = st, p
        self.dev = device()
        self.cuda = self.dev.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # bf16 on a CPU without it would be emulated
        self.prec = "bf16" if self.cuda else "fp32"
        self.eager_name = f"torch eager {self.prec}"
        self.path = st.work / "embed-artifact"
        folder = st.work / ("jpegs-dry" if st.dry else "jpegs")
        self.parity_data = ["photos"] + ([str(folder)] if (folder / ".done").exists() else [])
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.pixels: Any = None
        self.reference: Any = None

    def record(self, view: str, runners: dict[str, Callable[..., Any]], inputs: dict[int, Any], note: str = "") -> None:
        """Time ``runners`` round-robin at each batch in ``inputs``; a row each, saved as it comes (a budget cut keeps
        the ratios measured so far)."""
        from bench.export import round_robin

        result = self.st.result
        for batch in self.p.batches:
            if batch not in inputs:
                continue
            res = round_robin({k: (lambda fn=fn, x=inputs[batch]: fn(x)) for k, fn in runners.items()}, batch,
                              self.p.rounds, self.p.seconds, self.sync)
            for name, r in res.items():
                row = {"view": view, "runner": name, "batch": batch, "images_per_s": round(r["img_s"], 1)}
                base = next((x["images_per_s"] for x in result["rows"] if x["runner"] == self.eager_name
                             and x["batch"] == batch), None)
                if view == "model" and (base or name == self.eager_name):
                    row["vs_eager"] = round(row["images_per_s"] / (base or row["images_per_s"]), 3)
                result["rows"].append({**row, **({"note": note} if note else {})})
            self.st.save()

    def parity(self, name: str, fn: Callable[[Any], Any], on_device: bool) -> None:
        """Minimum cosine of ``fn``'s embeddings of the real images to eager fp32's, into ``parity_cos_min``."""
        import numpy as np
        import torch

        chunks = []
        for i in range(0, len(self.pixels), 16):
            x = self.pixels[i : i + 16]
            got = fn(torch.from_numpy(x).to(self.dev)) if on_device else fn(x)
            chunks.append(got.float().cpu().numpy() if isinstance(got, torch.Tensor) else got)
        got, ref = np.concatenate(chunks), self.reference
        cos = (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        self.st.result["parity_cos_min"][name] = round(float(cos.min()), 6)

    def device_inputs(self) -> dict[int, Any]:
        """The real images repeated to each batch size, on the device (float32: runners cast as they need)."""
        import torch

        real = torch.from_numpy(self.pixels).to(self.dev)
        return {b: real.repeat((b + len(real) - 1) // len(real), 1, 1, 1)[:b].contiguous() for b in self.p.batches}

    def host_inputs(self) -> dict[int, Any]:
        import numpy as np

        return {b: np.ascontiguousarray(np.resize(self.pixels, (b, *self.pixels.shape[1:]))) for b in self.p.batches}


def run(st: Stage) -> None:
    from mae import artifact

    p = plan(st.dry)
    b = Bench(st, p)
    st.result.update(model=p.label, batches=list(p.batches), rows=[], parity_cos_min={})
    shutil.rmtree(b.path, ignore_errors=True)
    with st.item("artifact") as e:
        from export.parity import reference_images, torch_outputs

        artifact.from_random_init(b.path, p.cfg)
        art = artifact.load(b.path)
        b.pixels, _, info = reference_images(b.parity_data, 64, art.preprocessing)
        b.reference = torch_outputs(art, b.pixels, tokens=False)["embedding"]
        e.update(parity_images=info["images"], sources=info["sources"])
    encoder = art.encoder.to(b.dev, b.dtype).eval()
    with st.item("torch_eager") as e:
        e["backend"] = time_eager(b, encoder)
    with st.item("inductor_export") as e:
        e.update(export_package(b))
        st.result["inductor_export"] = {k: e[k] for k in ("precision", "device", "compile_s", "passed", "cos_min")}
    with st.item("inductor_speed") as e:
        if "inductor_export" not in st.result:
            e.update(status=SKIPPED, reason="the package was not exported (see inductor_export)")
        else:
            e["backend"] = time_package(b)
    with st.item("onnxruntime_cpu") as e:  # the reference row: the CPU path every deployment has
        e["backend"] = time_onnxruntime(b)
    with st.item("torch_compile") as e:
        e["first_calls_s"] = time_compiled(b, encoder)
    top = max(p.batches)
    best = [r for r in st.result["rows"] if r["view"] == "model" and r["batch"] == top]
    st.result["summary"] = f"{p.label} batch {top}: " + ", ".join(
        f"{r['runner']} {r['images_per_s']:.0f} img/s ({r.get('vs_eager', '-')}x)" for r in best)
    if not b.cuda:
        st.skip("cuda_rows", no_cuda_reason() + ": every row ran on the CPU, in fp32 (bf16 is CUDA's)")
    st.save()


def time_eager(b: Bench, encoder: Any) -> str:
    """Eager torch on device tensors (the baseline of every ratio) and through the Embedder's torch backend."""
    import torch

    from export.runtime import Embedder

    def eager(x: Any) -> Any:
        with torch.inference_mode():
            return encoder(x.to(b.dtype))[0]

    b.parity(b.eager_name, eager, on_device=True)
    emb = Embedder.load(b.path, backend="torch", device=str(b.dev))
    b.parity(f"Embedder {emb.backend_name}", lambda x: emb.run(x)["embedding"], on_device=False)
    b.record("model", {b.eager_name: eager}, b.device_inputs())
    b.record("embedder", {f"Embedder {emb.backend_name}": lambda x: emb.run(x)}, b.host_inputs())
    return emb.backend_name


def export_package(b: Bench) -> dict[str, Any]:
    """``export_inductor`` for this device: compiled, then proven on the real images."""
    from export.inductor import export_inductor

    rec = export_inductor(b.path, device=str(b.dev), data=b.parity_data, parity_images=64, max_batch=b.p.max_batch)
    return {"precision": rec["precision"], "device": f"{rec['device_type']} {rec['device_name']}",
            "compile_s": rec["compile_seconds"], "passed": rec["passed"], "mib": round(rec["bytes"] / 2**20, 1),
            "cos_min": rec["parity"]["embedding"]["cosine_min"],
            "nbr_overlap": rec["parity"]["embedding"].get("top10_neighbour_overlap")}


def time_package(b: Bench) -> str:
    """The AOTInductor package on device tensors and through the Embedder's inductor backend."""
    import torch

    from export.inductor import FILE, load_package
    from export.runtime import Embedder

    package = load_package(b.path / FILE, b.dev)
    pkg_name = f"inductor package {b.st.result['inductor_export']['precision']}"

    def aoti(x: Any) -> Any:
        with torch.inference_mode():
            return package(x)[0]

    b.parity(pkg_name, aoti, on_device=True)
    emb = Embedder.load(b.path, backend="inductor")
    b.parity(f"Embedder {emb.backend_name}", lambda x: emb.run(x)["embedding"], on_device=False)
    b.record("model", {pkg_name: aoti}, b.device_inputs())
    b.record("embedder", {f"Embedder {emb.backend_name}": lambda x: emb.run(x)}, b.host_inputs())
    return emb.backend_name


def time_onnxruntime(b: Bench) -> str:
    """onnxruntime on the CPU through the Embedder, at the batches a CPU answers in well under a second."""
    from export.onnx import export_onnx
    from export.runtime import Embedder

    # The TorchScript exporter: for fp32 on the CPU its standard-ops graph runs like the dynamo one (fusion matters
    # for encoder.fp16.onnx only) and it exports ViT-B in a fraction of the time.
    export_onnx(b.path, parity_images=16, data=["photos"], exporter="torchscript")
    emb = Embedder.load(b.path, backend="onnx", device="cpu")
    b.parity(f"Embedder {emb.backend_name}", lambda x: emb.run(x)["embedding"], on_device=False)
    host = b.host_inputs()
    cpu_batches = {n: host[n] for n in b.p.batches if n <= 32}
    note = "" if len(cpu_batches) == len(b.p.batches) else "CPU reference: batches above 32 not timed (seconds a call)"
    b.record("embedder", {f"Embedder {emb.backend_name}": lambda x: emb.run(x)}, cpu_batches, note)
    if len(cpu_batches) < len(b.p.batches):
        b.st.skip("onnxruntime_cpu_large_batches", "the CPU reference row is timed at batch 1 and 32 only: a ViT-B "
                                                   "batch of 256 takes seconds a call on the CPU")
    return emb.backend_name


def time_compiled(b: Bench, encoder: Any) -> float:
    """torch.compile of the eager encoder (dynamic shapes); returns the seconds its first calls took."""
    import torch

    compiled = torch.compile(encoder, dynamic=True, backend=b.p.compile_backend)
    name = f"torch.compile {b.prec}" + (" (aot_eager)" if b.p.compile_backend != "inductor" else "")

    def comp(x: Any) -> Any:
        with torch.inference_mode():
            return compiled(x.to(b.dtype))[0]

    started = time.perf_counter()
    b.parity(name, comp, on_device=True)
    first = round(time.perf_counter() - started, 1)
    b.record("model", {name: comp}, b.device_inputs())
    return first


def report(result: dict[str, Any]) -> list[str]:
    rows = result.get("rows", [])
    if not rows:
        return []
    exp = result.get("inductor_export", {})
    lines = ["", f"## Embedding ({result.get('model')})", "",
             f"AOTInductor package: {exp.get('precision', '-')} for {exp.get('device', '-')}, compiled in "
             f"{exp.get('compile_s', '-')} s, parity passed {exp.get('passed', '-')} (cos min "
             f"{num(exp.get('cos_min'), '.6f')}). 'model' rows time device tensors in and out; 'embedder' rows time "
             "Embedder.run (numpy in and out, transfers included)."]
    for view in ("model", "embedder"):
        names = list(dict.fromkeys(r["runner"] for r in rows if r["view"] == view))
        if not names:
            continue
        lines += ["", f"| {view} view: batch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for batch in result.get("batches", []):
            cells = []
            for n in names:
                r = next((r for r in rows if r["view"] == view and r["runner"] == n and r["batch"] == batch), None)
                cells.append("-" if r is None else f"{r['images_per_s']:.0f}" + (
                    f" ({r['vs_eager']:.2f}x)" if "vs_eager" in r else ""))
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    cos = result.get("parity_cos_min", {})
    if cos:
        lines += ["", "Cosine to eager fp32 on real images (min): " + ", ".join(f"{k} {v:.6f}" for k, v in cos.items())]
    return lines


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    top = max(result.get("batches", [256]))
    pkg = next((r for r in result.get("rows", []) if r["view"] == "model" and r["batch"] == top
                and r["runner"].startswith("inductor package")), None)
    return [Goal(f"GPU-compiled embedding at batch {top} >= 2x torch eager bf16", pkg and pkg.get("vs_eager"), 2.0,
                 "{:.2f}x"),
            Goal(f"GPU-compiled embedding at batch {top} >= 8,000 img/s", pkg and pkg["images_per_s"], 8000)]
