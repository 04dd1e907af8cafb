"""TensorRT: build ``encoder.plan`` from the artifact's ONNX file, run it on CUDA tensors, prove parity.

Both API generations:

* TensorRT 10 (weakly typed networks): parse the fp32 ``encoder.onnx`` and enable fp16 / bf16 kernels with
  ``BuilderFlag.FP16`` / ``BuilderFlag.BF16``; LayerNorm layers are pinned to fp32 with layer precisions and
  ``OBEY_PRECISION_CONSTRAINTS`` (fp16 LayerNorm overflows in ViTs).
* TensorRT 11 removed those flags: every network is strongly typed and takes its precision from the ONNX
  types. fp32 builds from ``encoder.onnx``; fp16 from an fp16 graph converted from it for the build with the
  same converter as ``encoder.fp16.onnx`` (LayerNorm kept fp32) but without onnxruntime's contrib-op fusions,
  which TensorRT cannot parse. bf16 would need a bf16 ONNX graph, which this project does not write.

Beside the engine, ``encoder.plan.json`` records the TensorRT version, GPU name and compute capability it was
built for (an engine only runs there), the batch profile and the artifact sha256; ``Embedder`` auto-selects
the engine only when all of them match. A timing cache (``--timing-cache``, default beside the artifact)
makes rebuilds of the same shapes fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.formats import FILES, TENSORRT_PRECISIONS, BackendUnavailable, MissingFileError, require_made_from
from export.parity import check_onnx_stamp
from mae import artifact as artifact_lib
from mae.artifact_config import ArtifactConfig, ArtifactError
from mae.errors import UsageError
from mae.files import DamagedFileError, read_json, write_json_atomic

PLAN = FILES["tensorrt"]
SIDECAR = FILES["tensorrt_sidecar"]


class TensorRTUnavailable(BackendUnavailable):
    """No CUDA GPU or no ``tensorrt`` package here."""


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (TensorRT needs one)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'mae-service[gpu]' on a GPU machine)"
    return None


def _trt() -> Any:
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailable(f"TensorRT cannot run here: {reason}")
    import tensorrt as trt

    return trt


def major_version() -> int:
    return int(_trt().__version__.split(".")[0])


def gpu_identity(device: int = 0) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def build_engine(path: str | Path, *, precision: str = "fp16", min_batch: int = 1, opt_batch: int = 32,
                 max_batch: int = 256, workspace_gib: float = 8.0, timing_cache: str | Path | None = None
                 ) -> dict[str, Any]:
    """Build ``encoder.plan`` for this GPU from the artifact's ONNX file; write the JSON sidecar."""
    trt = _trt()
    path = Path(path)
    config_json = ArtifactConfig.read(path)
    if precision not in TENSORRT_PRECISIONS:
        raise UsageError(f"TensorRT precision must be one of {TENSORRT_PRECISIONS}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"need 1 <= min <= opt <= max batch, got {min_batch}/{opt_batch}/{max_batch}")
    major = major_version()
    typed = major >= 11
    if typed and precision == "bf16":
        raise UsageError("TensorRT 11 takes precision from the ONNX types and this project writes no bf16 ONNX "
                         "graph; build fp16, or use TensorRT 10 for bf16")
    onnx_file = path / FILES["onnx"]
    if not onnx_file.exists():
        raise MissingFileError(f"{onnx_file} is missing; TensorRT builds from it (mae export ... --onnx)")
    check_onnx_stamp(onnx_file, config_json)
    source = onnx_file.name
    if typed and precision == "fp16":
        from export.onnx import convert_fp16, remove_onnx

        typed_file = path / "encoder.fp16.tensorrt.tmp.onnx"
        convert_fp16(onnx_file, typed_file, config_json.sha256, fuse=False)
        source = f"{onnx_file.name}, converted to fp16 (norms fp32) for the strongly typed network"
        try:
            return _build(trt, path, typed_file, source, config_json, precision, typed, min_batch, opt_batch,
                          max_batch, workspace_gib, timing_cache)
        finally:
            remove_onnx(typed_file)
    return _build(trt, path, onnx_file, source, config_json, precision, typed, min_batch, opt_batch, max_batch,
                  workspace_gib, timing_cache)


def _build(trt: Any, path: Path, onnx_file: Path, source: str, config_json: ArtifactConfig, precision: str,
           typed: bool, min_batch: int, opt_batch: int, max_batch: int, workspace_gib: float,
           timing_cache: str | Path | None) -> dict[str, Any]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: 0 = weakly typed (precision from builder flags); TensorRT 11: always strongly typed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    pinned = 0
    if not typed and precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):  # keep norms (and the final L2 norm's reduction) in fp32
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1

    c, h, w = config_json.preprocessing.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape("pixels", (min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else path / FILES["tensorrt_timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    seconds = time.perf_counter() - started
    (path / PLAN).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "tensorrt": trt.__version__,
        **gpu_identity(),
        "precision": precision,
        "strongly_typed": typed,
        "onnx_source": source,
        "fp32_layers_pinned": pinned,
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "artifact_sha256": config_json.sha256,
        "build_seconds": round(seconds, 1),
        "timing_cache": str(cache_path),
    }
    write_json_atomic(path / SIDECAR, sidecar)
    return sidecar


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """``encoder.plan.json``; a damaged one is an ArtifactError naming it (re-building the engine rewrites it)."""
    file = Path(path) / SIDECAR
    if not file.exists():
        raise ArtifactError(f"{file} is missing: the engine beside it cannot be matched to a GPU and weights; re-run "
                            "mae export --tensorrt")
    try:
        side = read_json(file, "TensorRT engine record")
    except DamagedFileError as e:
        raise ArtifactError(f"{e}; re-run mae export --tensorrt") from None
    if not isinstance(side, dict):
        raise ArtifactError(f"{file} is not a TensorRT engine record; re-run mae export --tensorrt")
    return side


def engine_mismatch(path: str | Path, config: ArtifactConfig) -> str | None:
    """Why the artifact's engine cannot run here (None when it can): missing, other GPU / TensorRT / weights."""
    path = Path(path)
    if not (path / PLAN).exists() or not (path / SIDECAR).exists():
        return f"no {PLAN} (mae export --tensorrt)"
    reason = unavailable_reason()
    if reason:
        return reason
    import tensorrt as trt

    side = read_sidecar(path)
    here = {"tensorrt": trt.__version__, **gpu_identity(), "artifact_sha256": config.sha256}
    diffs = [f"{k} {side.get(k)} != {v}" for k, v in here.items() if side.get(k) != v]
    return f"{PLAN} was built for another setup ({', '.join(diffs)})" if diffs else None


class TensorRTRunner:
    """Execute an engine on CUDA tensors: (N, C, H, W) float32 on the GPU -> dict of output tensors (GPU)."""

    def __init__(self, plan: str | Path, device: int = 0):
        trt = _trt()
        self.trt = trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not load {plan} (built with another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape("pixels", 0)[2][0])
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype("pixels"))

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if pixels.device != self.device:
            raise ValueError(f"pixels must be on {self.device}, got {pixels.device}")
        if len(pixels) > self.max_batch:  # the profile's max: run in slices
            parts = [self(pixels[i : i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        x = pixels.to(self.input_dtype).contiguous()
        self.context.set_input_shape("pixels", tuple(x.shape))
        self.context.set_tensor_address("pixels", x.data_ptr())
        result = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            result[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, result[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.float() for k, v in result.items()}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TensorRTBackend:
    """``Embedder`` backend: numpy in, numpy out, the engine in between."""

    def __init__(self, path: Path, config: ArtifactConfig, device: str | None = None, precision: str | None = None):
        reason = self.unavailable(path, config, device, precision)
        if reason:
            raise BackendUnavailable(f"tensorrt backend: {reason}")
        index = int(device.split(":")[1]) if device and ":" in device else 0
        self.runner = TensorRTRunner(path / PLAN, index)
        side = read_sidecar(path)
        self.name = f"tensorrt-{side['precision']}"

    @staticmethod
    def unavailable(path: Path, config: ArtifactConfig, device: str | None, precision: str | None) -> str | None:
        reason = engine_mismatch(path, config)
        if reason is None and precision is not None:
            built = read_sidecar(path).get("precision")
            if built != precision:
                reason = f"{PLAN} was built for {built}, not {precision}"
        return reason

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.runner.device)
        out = self.runner(x)
        return {k: v.cpu().numpy() for k, v in out.items() if k in ("embedding", "logits")}


def tensorrt_parity(path: str | Path, data: Any = None, parity_images: int | None = None) -> dict[str, Any]:
    """Run the engine on the bundled real images and compare with eager PyTorch fp32; record; fail loudly."""
    from export.formats import tolerance
    from export.parity import DEFAULT_DATA, PARITY_IMAGES, prove, reference_images, torch_outputs

    path = Path(path)
    art = artifact_lib.load(path)
    side = read_sidecar(path)
    pixels, _, info = reference_images(list(data or DEFAULT_DATA), parity_images or PARITY_IMAGES, art.preprocessing)
    reference = torch_outputs(art, pixels)
    runner = TensorRTRunner(path / PLAN)
    with torch.inference_mode():
        out = runner(torch.from_numpy(pixels).to(runner.device))
    got = {k: v.cpu().numpy() for k, v in out.items() if k in reference}
    record = {**side, "file": PLAN, "bytes": (path / PLAN).stat().st_size, "parity_data": info}
    return prove(path, "tensorrt", record, reference, got, tolerance=tolerance("tensorrt", side["precision"]),
                 files=[path / PLAN])


# ----------------------------------------------------------------------------------------------- the registry's hooks


def export_from_args(path: Path, args: Any, data: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``mae export --tensorrt`` (the TensorRT row of ``export.formats``; the ONNX row has run): the engine for this
    GPU, its parity record and the line that summarises it."""
    build_engine(path, precision=args.trt_precision, min_batch=args.batch_min, opt_batch=args.batch_opt,
                 max_batch=args.batch_max, timing_cache=args.timing_cache)
    record = tensorrt_parity(path, data, args.parity_images)
    emb = record["parity"]["embedding"]
    line = (f"  {PLAN:<18} TensorRT {record['tensorrt']} {record['precision']} on {record['gpu']} (sm "
            f"{record['compute_capability']}): cos min {emb['cosine_min']:.6f}, top-10 nbr overlap "
            f"{emb['top10_neighbour_overlap']:.3f}")
    return {"tensorrt": record}, [line]


def verify(path: Path, config: ArtifactConfig) -> None:
    """An engine (or its record) in the artifact has a readable record and was built from these weights."""
    if (path / PLAN).exists() or (path / SIDECAR).exists():
        require_made_from(read_sidecar(path).get("artifact_sha256"), config, path / PLAN,
                          "re-run `mae export --tensorrt` for this artifact")
