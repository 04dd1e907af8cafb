"""ONNX export of an artifact's encoder (fp32 / fp16 / int8), each file proven equal to PyTorch on real images.

Files written into the artifact folder (contract in DESIGN.md):

```
encoder.onnx       fp32, standard ONNX ops only (any runtime; TensorRT builds from it). Input "pixels" float32
                   (N, C, H, W), dynamic N; outputs "embedding" (N, D) L2-normalised, "logits" (N, K) with a
                   head, "tokens" (N, L, D) with --tokens.
encoder.fp16.onnx  for onnxruntime on GPUs: attention fused into com.microsoft MultiHeadAttention by onnxscript's
                   ``optimize_for_ort`` (onnxruntime's own optimiser fuses none of a timm ViT's blocks), then
                   fp16 with LayerNorm and the L2 norm kept fp32 (fp16 LayerNorm overflows in ViTs); float32 in
                   and out. onnxruntime only (contrib ops).
encoder.int8.onnx  for CPUs: static QDQ int8 (per-channel weights) calibrated on real images, from the unfused
                   graph: on this AVX-512 VNNI CPU that was 1.2-1.3x faster than quantising the fused graph
                   (whose fused MatMul+bias/GELU/SkipLayerNorm nodes keep onnxruntime from fusing QDQ chains).
```

Every file is checked (``onnx.checker`` full check, no random op, batch sizes 1/3/17 for the fp32 graph) and run
on a bundled set of real images against eager PyTorch; the figures go into ``config.json`` under ``export`` and
a file past its tolerance is deleted and the export fails (``ParityError``).

Exporter choice: the dynamo exporter (``torch.onnx.export(dynamo=True)``) gives a graph whose attention
onnxscript fuses (the TorchScript exporter's graph fuses none) and, with ``dynamic_shapes`` and an example batch
of 2, keeps N symbolic (checked at 1, 3 and 17). Where it fails (older torch), the TorchScript exporter is
used and the export says so; its graph is equally correct but unfused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mae import artifact as artifact_lib
from mae.artifact import Artifact
from mae.data import Preprocessing, load_source

log = logging.getLogger(__name__)

OPSET = 18
FILES = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx", "int8": "encoder.int8.onnx"}
RECORD_KEYS = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 0.99999},
    "fp16": {"cosine": 0.999},
    "int8": {"cosine": 0.99, "top1_agreement": 0.99},
}
"""Minimum cosine (every image, every output) and top-1 agreement with PyTorch fp32 for each file."""
CHECK_BATCHES = (1, 3, 17)
EXAMPLE_BATCH = 2  # >= 2, so that no exporter can specialise the batch dimension to 1
MAX_BATCH = 1 << 16
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli", "Dropout"})
META_SHA = "mae.artifact_sha256"
META_PRECISION = "mae.precision"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin: larger weights go to FILE.data
DEFAULT_DATA = ("mnist5k", "photos")
# Images drawn for parity (half) and int8 calibration (the other half). With ~256 judged images a 99% top-1
# agreement allows two flips; with 64 it allowed none, and a 5-epoch classifier's near-ties failed on one.
PARITY_IMAGES = 512
NEIGHBOURS = 10


class ParityError(RuntimeError):
    """An exported file whose outputs differ from PyTorch by more than its tolerance."""


class ExportError(RuntimeError):
    """The exporter produced no usable graph (bad shapes, random ops, checker failure)."""


# ----------------------------------------------------------------------------------------------- graph


class _Graph(nn.Module):
    """The artifact's ``Encoder`` with the outputs a file should have (tokens optional)."""

    def __init__(self, encoder: nn.Module, tokens: bool):
        super().__init__()
        self.encoder = encoder
        self.tokens = tokens

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder(pixels, return_tokens=self.tokens)


def output_names(art: Artifact, tokens: bool) -> list[str]:
    return ["embedding"] + (["logits"] if art.labels else []) + (["tokens"] if tokens else [])


def export_fp32(art: Artifact, path: str | Path, *, tokens: bool = False, opset: int = OPSET,
                exporter: str = "auto") -> dict[str, Any]:
    """Write the fp32 graph and check it (checker, random ops, batch sizes). Returns what was done.

    ``exporter``: "dynamo", "torchscript", or "auto" (dynamo, then TorchScript if dynamo fails or its graph
    does not pass the checks).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    path = Path(path)
    graph = _Graph(art.encoder.cpu().eval(), tokens).eval()
    x = torch.randn(EXAMPLE_BATCH, *art.preprocessing.input_size)
    names = output_names(art, tokens)
    order = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    failures: dict[str, str] = {}
    for name in order:
        started = time.perf_counter()
        try:
            (_export_dynamo if name == "dynamo" else _export_torchscript)(graph, x, path, names, opset)
            info = check_graph(path, names)
            info["batches"] = check_batches(path, graph, art.preprocessing.input_size, names)
        except Exception as e:  # noqa: BLE001 - any exporter failure means: try the next one, say why
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("the %s exporter failed: %s", name, failures[name])
            continue
        info.update(exporter=name, opset=opset, outputs=names, seconds=round(time.perf_counter() - started, 1),
                    bytes=_file_bytes(path))
        if failures:
            info["exporter_failures"] = failures
        stamp(path, art.sha256, "fp32")
        return info
    raise ExportError("no exporter produced a correct graph: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))


def _export_dynamo(graph: nn.Module, x: torch.Tensor, path: Path, names: list[str], opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout is for --json
        program = torch.onnx.export(graph, (x,), None, input_names=["pixels"], output_names=names,
                                    opset_version=opset, dynamo=True, dynamic_shapes={"pixels": {0: batch}},
                                    verbose=False)
    model = program.model
    for value in list(model.graph.inputs) + list(model.graph.outputs):  # one name for N everywhere
        if value.shape is not None:
            value.shape = type(value.shape)(["batch", *list(value.shape)[1:]])
    save_ir(model, path)


def _export_torchscript(graph: nn.Module, x: torch.Tensor, path: Path, names: list[str], opset: int) -> None:
    axes = {n: {0: "batch"} for n in ["pixels", *names]}
    with contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(graph, (x,), str(path), input_names=["pixels"], output_names=names, opset_version=opset,
                          dynamo=False, dynamic_axes=axes, do_constant_folding=True)


def save_ir(model: Any, path: Path) -> None:
    """Save an onnx_ir model, weights inline unless they pass protobuf's 2 GiB limit."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    remove_onnx(path)
    if size > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def remove_onnx(path: Path) -> None:
    """Delete an ONNX file and its external weights, if any."""
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def stamp(path: Path, sha256: str, precision: str) -> None:
    """Record in the file which artifact (weights) it was exported from, so a stale file is never run."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({META_SHA: sha256, META_PRECISION: precision})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def read_stamp(path: str | Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def check_graph(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """``onnx.checker`` full check (types and shapes inferred), the I/O contract, and no random op anywhere."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    ops = op_counts(model)
    random_ops = sorted(set(ops) & RANDOM_OPS)
    if random_ops:
        raise ExportError(f"{path.name} contains random ops {random_ops}; an embedding must be deterministic")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != ["pixels"] or outputs != list(names):
        raise ExportError(f"{path.name} has inputs {inputs} and outputs {outputs}; expected ['pixels'] and {names}")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):
        raise ExportError(f"{path.name} has a fixed batch dimension {batch.dim_value}")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": sum(ops.values()), "opset_imported": opset}


def op_counts(model: Any) -> Counter:
    """Op types of every node, in the main graph, subgraphs and local functions."""
    counts: Counter = Counter()

    def visit(nodes: Any) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(model.graph.node)
    for fn in model.functions:
        visit(fn.node)
    return counts


def check_batches(path: Path, graph: nn.Module, input_size: Sequence[int], names: Sequence[str],
                  batches: Sequence[int] = CHECK_BATCHES) -> dict[str, float]:
    """Run the file at several batch sizes against PyTorch: catches dimensions baked in at export time."""
    session = cpu_session(path)
    gen = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    for n in batches:
        x = torch.randn(n, *input_size, generator=gen)
        with torch.inference_mode():
            ref = [t.numpy() for t in graph(x)]
        got = session.run(list(names), {"pixels": x.numpy()})
        for name, r, g in zip(names, ref, got):
            if g.shape != r.shape:
                raise ExportError(f"{path.name} output {name} has shape {g.shape} at batch {n}, expected {r.shape}")
            diff = float(np.abs(g - r).max())
            if not diff < 1e-3 * max(1.0, float(np.abs(r).max())):
                raise ExportError(f"{path.name} output {name} differs from PyTorch by {diff:.3g} at batch {n}")
        worst[str(n)] = float(max(np.abs(g - r).max() for r, g in zip(ref, got)))
    return worst


def cpu_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with the project's shared-core settings (export.runtime.session_options)."""
    import onnxruntime as ort

    from export.runtime import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------- fp16


def convert_fp16(src: Path, dst: Path, sha256: str, fuse: bool = True) -> dict[str, Any]:
    """fp32 graph -> fp16 weights and activations; norms stay fp32; I/O stays fp32.

    ``fuse``: first fuse attention for onnxruntime (``encoder.fp16.onnx``); without it the result has standard
    ops only (what TensorRT 11 builds an fp16 engine from).
    """
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep_fp32 = ["LayerNormalization", "SkipLayerNormalization", "ReduceL2"]
    info: dict[str, Any] = {"kept_fp32": keep_fp32}
    if fuse:
        fused, info["attention_fusion"] = fuse_attention(src)
        model = ir.to_proto(fused)
    else:
        model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=keep_fp32)
    del model.graph.value_info[:]  # stale fp32 shapes of converted tensors; the checker re-infers them
    fixed = ir.from_proto(model)
    fixed.graph.sort()  # the converter appends the input casts at the end of the node list
    save_ir(fixed, dst)
    stamp(dst, sha256, "fp16")
    info["bytes"] = _file_bytes(dst)
    return info


# ----------------------------------------------------------------------------------------------- int8


def cpu_isa() -> dict[str, Any]:
    """The x86 vector extensions that decide int8 speed: VNNI does u8 x s8 dot products without saturation."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    parts = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
                                     ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX-512 BF16"),
                                     ("amx_int8", "AMX-INT8")) if flag in flags]
    model = ""
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    return {"isa": " / ".join(parts) or "unknown (no /proc/cpuinfo flags)", "vnni": vnni, "cpu": model,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def fuse_attention(src: Path) -> tuple[Any, dict[str, int]]:
    """onnxscript ``optimize_for_ort``: attention -> com.microsoft MultiHeadAttention, plus LayerNorm/GELU fusions.

    onnxruntime's own transformer optimiser fuses none of a timm ViT's attention blocks; this one does
    (on the dynamo exporter's graph). Returns the model and the fusion counts, with the number of
    MultiHeadAttention nodes that are in the result.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    model, counts = optimize_for_ort(model)
    mha = sum(1 for node in model.graph if node.op_type == "MultiHeadAttention")
    return model, {**{k: int(v) for k, v in counts.items() if v}, "MultiHeadAttention_nodes": mha}


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, sha256: str) -> dict[str, Any]:
    """Static QDQ int8 of the fp32 graph: per-channel s8 weights, u8 activations, MinMax on real images.

    Quantised: the weight MatMuls of the blocks (qkv, projection, MLP), which carry nearly all the FLOPs. Kept
    fp32: activation x activation MatMuls (q.k and attn.v) and softmax, which cost accuracy for little speed,
    and the first and last layers (patch-embedding Conv, head Gemm: under 1% of the FLOPs). Quantising the
    patch embedding took a 5-epoch grey-digit classifier's top-1 agreement from 0.996 to 0.989.
    Without VNNI the weights use 7 bits (``reduce_range``) to avoid u8 x s8
    overflow in AVX2's vpmaddubsw.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    proto = onnx.load(str(src), load_external_data=False)
    weights = {i.name for i in proto.graph.initializer}
    weights |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    act_matmuls = [n.name for n in proto.graph.node
                   if n.op_type == "MatMul" and not any(i in weights for i in n.input)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + 16] for i in range(0, len(calibration), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": np.ascontiguousarray(batch)}

    isa = cpu_isa()
    remove_onnx(dst)
    started = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger at WARNING for every call
    try:
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=act_matmuls, per_channel=True,
            reduce_range=not isa["vnni"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_file_bytes(src) > EXTERNAL_DATA_BYTES,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    finally:
        root.setLevel(level)
    stamp(dst, sha256, "int8")
    quantized = onnx.load(str(dst), load_external_data=False)
    ops = op_counts(quantized)
    return {
        "quantization": {"format": "QDQ", "weights": "int8 per-channel symmetric", "activations": "uint8",
                         "calibration": "MinMax", "calibration_images": int(len(calibration)),
                         "op_types": ["MatMul"], "excluded_activation_matmuls": len(act_matmuls),
                         "reduce_range": not isa["vnni"], "QuantizeLinear": ops["QuantizeLinear"],
                         "seconds": round(time.perf_counter() - started, 1)},
        "isa": isa["isa"],
        "bytes": _file_bytes(dst),
    }


# ----------------------------------------------------------------------------------------------- parity


def reference_images(specs: Sequence[str], count: int, preprocessing: Preprocessing
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Real images from bundled sets (or folders), spread evenly over each: (parity, calibration, description).

    The two sets are disjoint (alternate picks), so int8 is never judged on the images it was calibrated on.
    """
    if count < 2:
        raise ValueError(f"need at least 2 parity images, got {count}")
    per_source = max(1, count // len(specs))
    parity: list[torch.Tensor] = []
    calib: list[torch.Tensor] = []
    used = {}
    for spec in specs:
        source = load_source(spec)
        n = min(len(source), 2 * per_source)
        picks = np.unique(np.linspace(0, len(source) - 1, n).round().astype(int))
        for j, i in enumerate(picks):
            (parity if j % 2 == 0 else calib).append(preprocessing(source.read(int(i))))
        used[source.name] = int((len(picks) + 1) // 2)  # parity images from this source
    info = {"sources": used, "images": len(parity), "calibration_images": len(calib)}
    return torch.stack(parity).numpy(), torch.stack(calib).numpy(), info


def torch_outputs(art: Artifact, pixels: np.ndarray, tokens: bool, batch: int = 32) -> dict[str, np.ndarray]:
    """Eager PyTorch fp32 on CPU: the reference every file is compared with."""
    names = output_names(art, tokens)
    parts: list[tuple[torch.Tensor, ...]] = []
    encoder = art.encoder.cpu().eval()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            parts.append(encoder(torch.from_numpy(pixels[i : i + batch]), return_tokens=tokens))
    return {name: torch.cat([p[k] for p in parts]).numpy() for k, name in enumerate(names)}


def onnx_outputs(path: Path, pixels: np.ndarray, names: Sequence[str], batch: int = 32) -> dict[str, np.ndarray]:
    session = cpu_session(path)
    parts = [session.run(list(names), {"pixels": pixels[i : i + batch]}) for i in range(0, len(pixels), batch)]
    return {name: np.concatenate([p[k] for p in parts]).astype(np.float32) for k, name in enumerate(names)}


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], neighbours: bool) -> dict[str, Any]:
    """Max abs difference and cosine (min and mean over images) per output; top-1 agreement for logits;
    overlap of each image's top-10 neighbours among the set (embeddings) when ``neighbours``."""
    figures: dict[str, Any] = {}
    for name, ref in reference.items():
        out = got[name].astype(np.float32)
        r = ref.reshape(len(ref), -1).astype(np.float64)
        g = out.reshape(len(out), -1).astype(np.float64)
        cos = (r * g).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-12)
        entry = {"max_abs": float(np.abs(ref - out).max()), "cosine_min": float(cos.min()),
                 "cosine_mean": float(cos.mean())}
        if name == "logits":
            entry["top1_agreement"] = float((ref.argmax(1) == out.argmax(1)).mean())
        if name == "embedding" and neighbours:
            entry[f"top{NEIGHBOURS}_neighbour_overlap"] = neighbour_overlap(ref, out, NEIGHBOURS)
        figures[name] = entry
    return figures


def neighbour_overlap(reference: np.ndarray, other: np.ndarray, k: int) -> float:
    """Mean share of each image's k nearest neighbours (cosine, self excluded) that both embeddings agree on."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return 1.0

    def knn(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(reference.astype(np.float64)), knn(other.astype(np.float64))
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def failures(figures: dict[str, Any], precision: str) -> list[str]:
    """What misses the tolerance of ``precision``: an empty list means the file passes."""
    tol = TOLERANCES[precision]
    bad = []
    for name, entry in figures.items():
        if not entry["cosine_min"] >= tol["cosine"]:
            bad.append(f"{name} cosine {entry['cosine_min']:.6f} < {tol['cosine']}")
        if "top1_agreement" in entry and "top1_agreement" in tol and not entry["top1_agreement"] >= tol[
                "top1_agreement"]:
            bad.append(f"{name} top-1 agreement {entry['top1_agreement']:.4f} < {tol['top1_agreement']}")
    return bad


# ----------------------------------------------------------------------------------------------- driver


def export_onnx(path: str | Path, *, fp16: bool = False, int8: bool = False, tokens: bool = False,
                data: Sequence[str] = DEFAULT_DATA, parity_images: int = PARITY_IMAGES, exporter: str = "auto",
                opset: int = OPSET) -> dict[str, Any]:
    """Export an artifact folder's encoder to ONNX (+ fp16, int8), check parity, record it in config.json.

    Raises ``ParityError`` (after recording the figures and deleting the file) when a file misses its
    tolerance, so a file that is on disk has passed.
    """
    path = Path(path)
    art = artifact_lib.load(path)
    for precision in ("fp16", "int8"):  # a fresh fp32 export makes older derived files stale
        if not {"fp16": fp16, "int8": int8}[precision]:
            remove_onnx(path / FILES[precision])
    config = dict(art.config)
    # engines and AOTInductor packages are built from the weights, not from encoder.onnx: their records stay
    kept = {k: v for k, v in config.get("export", {}).items() if k in ("tensorrt", "inductor")}
    record: dict[str, Any] = {**kept, "artifact_sha256": art.sha256, "tolerances": TOLERANCES,
                              "versions": _versions()}
    config["export"] = record
    artifact_lib.write_config(path, config)

    pixels, calibration, data_info = reference_images(list(data), parity_images, art.preprocessing)
    record["parity_data"] = data_info
    names = output_names(art, tokens)
    reference = torch_outputs(art, pixels, tokens)

    def judge(precision: str, info: dict[str, Any]) -> None:
        file = path / FILES[precision]
        info["file"] = file.name
        info["parity"] = compare(reference, onnx_outputs(file, pixels, names), neighbours=precision != "fp32")
        problems = failures(info["parity"], precision)
        info["passed"] = not problems
        record[RECORD_KEYS[precision]] = info
        artifact_lib.write_config(path, config)
        if problems:
            remove_onnx(file)
            raise ParityError(f"{file.name} misses its tolerance on {len(pixels)} real images: "
                              f"{'; '.join(problems)} (figures in {path / artifact_lib.CONFIG}; file deleted)")

    judge("fp32", export_fp32(art, path / FILES["fp32"], tokens=tokens, opset=opset, exporter=exporter))
    if fp16:
        info = convert_fp16(path / FILES["fp32"], path / FILES["fp16"], art.sha256)
        mha, depth = info["attention_fusion"]["MultiHeadAttention_nodes"], int(art.config["model"]["depth"])
        if mha != depth:
            log.warning("attention fusion: %d MultiHeadAttention nodes for %d blocks (%s exporter)", mha, depth,
                        record["onnx"]["exporter"])
        info.update(check_graph(path / FILES["fp16"], names))
        judge("fp16", info)
    if int8:
        info = quantize_int8(path / FILES["fp32"], path / FILES["int8"], calibration, art.sha256)
        info.update(check_graph(path / FILES["int8"], names))
        info["bytes_vs_fp32"] = round(info["bytes"] / _file_bytes(path / FILES["fp32"]), 3)
        judge("int8", info)
    return record


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}


def summary_lines(record: dict[str, Any]) -> list[str]:
    """People-readable parity lines of an ``export`` record."""
    lines = []
    for key in RECORD_KEYS.values():
        info = record.get(key)
        if not info:
            continue
        figs = info["parity"]
        emb = figs["embedding"]
        parts = [f"cos min {emb['cosine_min']:.7f}", f"max|d| {emb['max_abs']:.2e}"]
        if f"top{NEIGHBOURS}_neighbour_overlap" in emb:
            parts.append(f"top-{NEIGHBOURS} nbr overlap {emb[f'top{NEIGHBOURS}_neighbour_overlap']:.3f}")
        if "logits" in figs:
            parts.append(f"top-1 agree {figs['logits']['top1_agreement']:.3f}")
        if "tokens" in figs:
            parts.append(f"tokens cos min {figs['tokens']['cosine_min']:.6f}")
        extra = ""
        if "attention_fusion" in info:
            extra = f", {info['attention_fusion']['MultiHeadAttention_nodes']} MultiHeadAttention"
        lines.append(f"  {info['file']:<18} {info['bytes'] / 1e6:7.1f} MB  {', '.join(parts)}{extra}")
    return lines
