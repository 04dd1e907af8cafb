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
                   graph, which ran faster than int8 of the fused one (bench/export.py): the fused graph's
                   MatMul+bias/GELU/SkipLayerNorm nodes keep onnxruntime from fusing QDQ chains.
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
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.formats import FILES as FILES_TABLE
from export.formats import (  # noqa: F401  (ExportError: re-exported)
    META_SHA,
    ONNX_PRECISIONS,
    ExportError,
    onnx_file,
    onnx_key,
    require_made_from,
    tolerance,
)
from export.ort import cpu_session
from export.parity import (
    DEFAULT_DATA,
    NEIGHBOURS,
    PARITY_IMAGES,
    output_names,
    prove,
    read_onnx_stamp,
    reference_images,
    stamp_onnx,
    torch_outputs,
    update_export_record,
)
from mae import artifact as artifact_lib
from mae.artifact import Artifact
from mae.artifact_config import ArtifactConfig
from mae.errors import UsageError
from mae.hardware import cpu_isa

log = logging.getLogger(__name__)

OPSET = 18
FILES = {p: FILES_TABLE[onnx_key(p)] for p in ONNX_PRECISIONS}
"""ONNX file name per precision (from export.formats)."""
CHECK_BATCHES = (1, 3, 17)
EXAMPLE_BATCH = 2  # >= 2, so that no exporter can specialise the batch dimension to 1
MAX_BATCH = 1 << 16
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli", "Dropout"})
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin: larger weights go to FILE.data


# ----------------------------------------------------------------------------------------------- graph


class _Graph(nn.Module):
    """The artifact's ``Encoder`` with the outputs a file should have (tokens optional)."""

    def __init__(self, encoder: nn.Module, tokens: bool):
        super().__init__()
        self.encoder = encoder
        self.tokens = tokens

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder(pixels, return_tokens=self.tokens)


def export_fp32(art: Artifact, path: str | Path, *, tokens: bool = False, opset: int = OPSET,
                exporter: str = "auto") -> dict[str, Any]:
    """Write the fp32 graph and check it (checker, random ops, batch sizes). Returns what was done.

    ``exporter``: "dynamo", "torchscript", or "auto" (dynamo, then TorchScript if dynamo fails or its graph
    does not pass the checks).
    """
    if opset < 17:
        raise UsageError(f"opset must be >= 17 (LayerNormalization), got {opset}")
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
        stamp_onnx(path, art.sha256, "fp32")
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
    stamp_onnx(dst, sha256, "fp16")
    info["bytes"] = _file_bytes(dst)
    return info


# ----------------------------------------------------------------------------------------------- int8


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
    and the first and last layers (patch-embedding Conv, head Gemm: under 1% of the FLOPs; quantising the patch
    embedding cost a small grey-digit classifier a visible share of its top-1 agreement).

    The weight type depends on the CPU that will run the file, which is assumed to be this one: with VNNI,
    symmetric s8 weights (u8 x s8 dot products, the fast path). Without it (AVX2), u8 x s8 pairs overflow
    vpmaddubsw's int16 sums; the usual remedy, 7-bit weights (``reduce_range``), costs accuracy, while
    asymmetric u8 weights take onnxruntime's u8 x u8 kernels, which do not overflow: full 8 bits, closer to
    PyTorch, at about the same speed (figures in the README, "Export and embed").
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
    weight_type = QuantType.QInt8 if isa["vnni"] else QuantType.QUInt8
    remove_onnx(dst)
    started = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger at WARNING for every call
    try:
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=act_matmuls, per_channel=True,
            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=weight_type,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_file_bytes(src) > EXTERNAL_DATA_BYTES,
            extra_options={"WeightSymmetric": isa["vnni"], "ActivationSymmetric": False},
        )
    finally:
        root.setLevel(level)
    stamp_onnx(dst, sha256, "int8")
    quantized = onnx.load(str(dst), load_external_data=False)
    ops = op_counts(quantized)
    return {
        "quantization": {"format": "QDQ", "activations": "uint8",
                         "weights": "int8 per-channel symmetric" if isa["vnni"] else "uint8 per-channel asymmetric",
                         "calibration": "MinMax", "calibration_images": int(len(calibration)),
                         "op_types": ["MatMul"], "excluded_activation_matmuls": len(act_matmuls),
                         "QuantizeLinear": ops["QuantizeLinear"],
                         "seconds": round(time.perf_counter() - started, 1)},
        "isa": isa["isa"],
        "bytes": _file_bytes(dst),
    }


# ----------------------------------------------------------------------------------------------- parity


def onnx_outputs(path: Path, pixels: np.ndarray, names: Sequence[str], batch: int = 32) -> dict[str, np.ndarray]:
    session = cpu_session(path)
    parts = [session.run(list(names), {"pixels": pixels[i : i + batch]}) for i in range(0, len(pixels), batch)]
    return {name: np.concatenate([p[k] for p in parts]).astype(np.float32) for k, name in enumerate(names)}


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
    kept = {k: v for k, v in art.config.export.items() if k not in map(onnx_key, ONNX_PRECISIONS)}
    pixels, calibration, data_info = reference_images(list(data), parity_images, art.preprocessing)
    record = update_export_record(path, {**kept, "artifact_sha256": art.sha256, "versions": _versions(),
                                         "parity_data": data_info}, reset=True)
    names = output_names(art, tokens)
    reference = torch_outputs(art, pixels, tokens)

    def judge(precision: str, info: dict[str, Any]) -> None:
        file = path / FILES[precision]
        info["file"] = file.name
        key = onnx_key(precision)
        record[key] = prove(path, key, info, reference, onnx_outputs(file, pixels, names),
                            tolerance=tolerance("onnx", precision), neighbours=precision != "fp32", files=[file])

    judge("fp32", export_fp32(art, path / FILES["fp32"], tokens=tokens, opset=opset, exporter=exporter))
    if fp16:
        info = convert_fp16(path / FILES["fp32"], path / FILES["fp16"], art.sha256)
        mha, depth = info["attention_fusion"]["MultiHeadAttention_nodes"], int(art.config.model["depth"])
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
    for key in map(onnx_key, ONNX_PRECISIONS):
        info = record.get(key)
        if not info:
            continue
        figs = info["parity"]
        emb = figs["embedding"]
        parts = [f"cos min {emb['cosine_min']:.7f}", f"max|d| {emb['max_abs']:.2e}"]
        if f"top{NEIGHBOURS}_neighbour_overlap" in emb:
            parts.append(f"top-{NEIGHBOURS} nbr overlap {emb[f'top{NEIGHBOURS}_neighbour_overlap']:.3f}")
        if "logits" in figs:
            logits = figs["logits"]
            parts.append(f"top-1 agree {logits['top1_agreement']:.3f}" + (
                f" ({logits['top1_flips']} flip{'s' if logits['top1_flips'] > 1 else ''}, "
                f"p={logits['top1_p_value']:.2g})" if logits.get("top1_flips") else ""))
        if "tokens" in figs:
            parts.append(f"tokens cos min {figs['tokens']['cosine_min']:.6f}")
        extra = ""
        if "attention_fusion" in info:
            extra = f", {info['attention_fusion']['MultiHeadAttention_nodes']} MultiHeadAttention"
        lines.append(f"  {info['file']:<18} {info['bytes'] / 1e6:7.1f} MB  {', '.join(parts)}{extra}")
    return lines


# ----------------------------------------------------------------------------------------------- the registry's hooks


def export_from_args(path: Path, args: Any, data: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``mae export --onnx / --fp16 / --int8 / --tokens`` (the ONNX row of ``export.formats``): the files, their
    export record and the lines that summarise it."""
    record = export_onnx(path, fp16=args.fp16, int8=args.int8, tokens=args.tokens, data=data,
                         parity_images=args.parity_images)
    lines = [f"ONNX ({record['onnx']['exporter']} exporter, opset {record['onnx']['opset']}); parity vs PyTorch on "
             f"{record['parity_data']['images']} real images ({', '.join(record['parity_data']['sources'])}):"]
    return record, lines + summary_lines(record)


def verify(path: Path, config: ArtifactConfig) -> None:
    """Every ONNX file of the artifact parses and was made from its weights (its bytes: ``check_recorded``)."""
    for precision in ONNX_PRECISIONS:
        file = onnx_file(path, precision)
        if file.exists():
            require_made_from(read_onnx_stamp(file).get(META_SHA), config, file,
                              "re-run `mae export --onnx` for this artifact")
