"""The peers `kiln bench` runs side by side with kiln: a registry of small preparers.

A peer turns a :class:`PeerContext` (the fp32 eager model on the CPU, the inputs on the
device, the precision) into a :class:`Prepared` callable that runs one inference on those
fixed inputs. A peer that cannot run here raises :class:`PeerSkipped` with the reason; any
other exception is reported by the runner as a failure. No peer is ever dropped silently.

Register a new peer with the decorator::

    @peer("my-runtime", help="what it is")
    def _my_runtime(ctx: PeerContext) -> Prepared:
        ...
        return Prepared(run=lambda: session(*ctx.inputs))
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PeerSkipped(Exception):
    """The peer cannot run here (package missing, wrong device, unsupported precision)."""


@dataclass
class PeerContext:
    """What a peer gets: one model, one set of inputs, one device, one precision."""

    model: torch.nn.Module | None  # fp32 eager model on the CPU; never mutated by peers
    inputs: tuple[torch.Tensor, ...]  # on `device`, in the model's own dtypes
    device: torch.device
    precision: str
    model_name: str
    workdir: Path  # scratch space (ONNX files), removed after the run
    engine: Any = None  # a loaded kiln Engine when benchmarking an engine file


def _identity(value: Any) -> Any:
    return value


@dataclass
class Prepared:
    """A ready-to-time inference: `run()` does one forward pass on the fixed inputs."""

    run: Callable[[], Any]
    note: str = ""
    fetch: Callable[[Any], Any] = _identity  # raw output of run() → tensors/arrays to compare
    timing_device: torch.device | None = None  # None: the benchmark device
    build_seconds: float | None = None  # None: measured (prepare + first call)
    tracks_memory: bool = True  # False: it allocates outside PyTorch's CUDA allocator
    close: Callable[[], None] | None = None


PeerFn = Callable[[PeerContext], Prepared]


@dataclass(frozen=True)
class Peer:
    name: str
    prepare: PeerFn
    default: bool = True  # run when --against is not given
    help: str = ""


PEERS: dict[str, Peer] = {}


def peer(
    name: str, *, default: bool = True, help: str = "", registry: dict[str, Peer] | None = None
) -> Callable[[PeerFn], PeerFn]:
    """Register `prepare(ctx) -> Prepared` as peer `name` (in PEERS unless `registry`)."""

    def decorate(prepare: PeerFn) -> PeerFn:
        (PEERS if registry is None else registry)[name] = Peer(name, prepare, default, help)
        return prepare

    return decorate


# --- shared helpers -------------------------------------------------------------------------


def require_model(ctx: PeerContext) -> torch.nn.Module:
    if ctx.model is None:
        raise PeerSkipped(
            f"needs the PyTorch model, and {ctx.model_name!r} is not a zoo name or factory "
            "kiln can rebuild; only the engine itself can run"
        )
    return ctx.model


def require_cuda(ctx: PeerContext, what: str) -> None:
    if ctx.device.type != "cuda":
        raise PeerSkipped(f"{what} needs a CUDA device; this run is on {ctx.device}")


def import_optional(module: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerSkipped(f"{module} is not installed ({exc}); {install}") from None


def cast_inputs(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Floating inputs in `dtype`; integer and boolean inputs (token ids, masks) unchanged."""
    return [x.to(dtype) if x.is_floating_point() else x for x in inputs]


def model_copy(ctx: PeerContext, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return copy.deepcopy(require_model(ctx)).to(device=device, dtype=dtype).eval()


def wants_channels_last(model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device) -> bool:
    """NHWC feeds cuDNN's tensor-core convolutions directly: worth it for CNNs on the GPU."""
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    image = bool(inputs) and inputs[0].dim() == 4 and inputs[0].is_floating_point()
    return device.type == "cuda" and has_conv and image


def eager_setup(ctx: PeerContext) -> tuple[torch.nn.Module, list[torch.Tensor], str]:
    """The eager model and inputs at the peer's precision, channels_last where it helps."""
    dtype = PRECISION_DTYPES[ctx.precision]
    model = model_copy(ctx, dtype, ctx.device)
    inputs = cast_inputs(ctx.inputs, dtype)
    if not wants_channels_last(model, inputs, ctx.device):
        return model, inputs, ""
    model = model.to(memory_format=torch.channels_last)
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    return model, inputs, "channels_last"


# --- PyTorch eager ----------------------------------------------------------------------


@peer("eager", help="PyTorch eager (cudnn.benchmark on; channels_last for CNNs on the GPU)")
def _eager(ctx: PeerContext) -> Prepared:
    model, inputs, note = eager_setup(ctx)
    return Prepared(run=lambda: model(*inputs), note=note)


@peer("eager-cudagraph", help="PyTorch eager captured once in a CUDA graph and replayed")
def _eager_cudagraph(ctx: PeerContext) -> Prepared:
    require_cuda(ctx, "CUDA-graph replay")
    model, inputs, note = eager_setup(ctx)
    static = [x.clone() for x in inputs]
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        for _ in range(3):  # cuDNN/cuBLAS pick algorithms and allocate outside the capture
            model(*static)
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(*static)

    def run() -> Any:
        for s, x in zip(static, inputs, strict=True):  # what a caller pays: copy into the static inputs
            s.copy_(x)
        graph.replay()
        return out

    return Prepared(run=run, note=", ".join(n for n in (note, "input copy included") if n))


# --- torch.compile ----------------------------------------------------------------------


def _compile_peer(ctx: PeerContext, mode: str | None) -> Prepared:
    require_model(ctx)
    if mode == "reduce-overhead" and ctx.device.type != "cuda":
        raise PeerSkipped(f"mode={mode!r} is about CUDA graphs; on {ctx.device} it is the 'compile' peer")
    dtype = PRECISION_DTYPES[ctx.precision]
    compiled = torch.compile(model_copy(ctx, dtype, ctx.device), mode=mode)
    inputs = cast_inputs(ctx.inputs, dtype)
    graphs = mode in ("reduce-overhead", "max-autotune") and ctx.device.type == "cuda"

    def run() -> Any:
        if graphs:  # each call is a new step: outputs of the last replay may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs)

    def fetch(out: Any) -> Any:
        return _clone_tensors(out)

    dynamo = importlib.import_module("torch._dynamo")
    return Prepared(run=run, fetch=fetch, note=f"mode={mode or 'default'}", close=dynamo.reset)


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clone_tensors(v) for v in value]
    return value


@peer("compile", help="torch.compile, default mode (Inductor)")
def _compile(ctx: PeerContext) -> Prepared:
    return _compile_peer(ctx, None)


@peer("compile-reduce-overhead", help="torch.compile(mode='reduce-overhead'): Inductor + CUDA graphs")
def _compile_reduce_overhead(ctx: PeerContext) -> Prepared:
    return _compile_peer(ctx, "reduce-overhead")


@peer(
    "compile-max-autotune",
    default=False,
    help="torch.compile(mode='max-autotune'); slow to build, so only when asked by name",
)
def _compile_max_autotune(ctx: PeerContext) -> Prepared:
    return _compile_peer(ctx, "max-autotune")


# --- ONNX ----------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> str:
    """Export to `path` with the dynamo exporter, else the TorchScript one; returns which."""
    problems = []
    for dynamo in (True, False):
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), torch.no_grad():
                kwargs: dict[str, Any] = {} if dynamo else {"opset_version": 17}
                torch.onnx.export(model, tuple(inputs), str(path), dynamo=dynamo, **kwargs)
            return "dynamo export" if dynamo else "TorchScript export (dynamo export failed)"
        except Exception as exc:  # each exporter has its own failure types
            exporter = "dynamo" if dynamo else "TorchScript"
            problems.append(f"{exporter}: {type(exc).__name__}: {first_line(exc)}")
    raise RuntimeError("ONNX export failed: " + "; ".join(problems))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _onnx_inputs(model: torch.nn.Module, ctx: PeerContext, dtype: torch.dtype) -> tuple[Path, str, list[torch.Tensor]]:
    """Export the model at `dtype` (on the GPU for fp16, the CPU for fp32)."""
    where = ctx.device if dtype != torch.float32 else torch.device("cpu")
    inputs = cast_inputs([x.to(where) for x in ctx.inputs], dtype)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in ctx.model_name)
    path = ctx.workdir / f"{stem}_{dtype_tag(dtype)}.onnx"
    how = export_onnx(copy.deepcopy(model).to(device=where, dtype=dtype).eval(), inputs, path)
    return path, how, inputs


def dtype_tag(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISION_DTYPES.items()}.get(dtype, str(dtype))


@peer("onnxruntime", help="ONNX Runtime: CUDA provider when available, else CPU provider")
def _onnxruntime(ctx: PeerContext) -> Prepared:
    ort = import_optional("onnxruntime", "pip install 'kiln[onnx]'")
    model = require_model(ctx)
    if ctx.precision == "bf16":
        raise PeerSkipped("ONNX Runtime lacks bf16 kernels for most operators; use fp32 or fp16")
    cuda = ctx.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    if ctx.precision == "fp16" and not cuda:
        raise PeerSkipped("fp16 needs ONNX Runtime's CUDA provider, which is not available here")
    path, how, _ = _onnx_inputs(model, ctx, PRECISION_DTYPES[ctx.precision])
    session = ort.InferenceSession(str(path), providers=_ort_providers(ctx.device, cuda))
    if len(session.get_inputs()) != len(ctx.inputs):
        raise RuntimeError(
            f"the exported ONNX model takes {len(session.get_inputs())} inputs; "
            f"the PyTorch model takes {len(ctx.inputs)}"
        )
    notes = [how]
    if cuda and "CUDAExecutionProvider" in session.get_providers():
        return _ort_cuda(session, ctx, ", ".join([*notes, "CUDA provider"]))
    if cuda:
        notes.append("CUDA provider failed to load (version mismatch?); ran on the CPU provider")
    return _ort_cpu(session, ctx, ", ".join([*notes, "CPU provider"]))


def _ort_providers(device: torch.device, cuda: bool) -> list[Any]:
    if not cuda:
        return ["CPUExecutionProvider"]
    stream = str(torch.cuda.current_stream(device).cuda_stream)  # same stream as the CUDA events
    options = {"device_id": device.index or 0, "user_compute_stream": stream}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def _ort_cpu(session: Any, ctx: PeerContext, note: str) -> Prepared:
    dtype = PRECISION_DTYPES[ctx.precision]
    feeds = {
        m.name: x.detach().cpu().numpy()
        for m, x in zip(session.get_inputs(), cast_inputs(ctx.inputs, dtype), strict=True)
    }
    return Prepared(
        run=lambda: session.run(None, feeds), note=note, timing_device=torch.device("cpu"), tracks_memory=False
    )


def _ort_cuda(session: Any, ctx: PeerContext, note: str) -> Prepared:
    import numpy as np

    numpy_dtypes = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.bool: np.bool_,
    }
    inputs = [x.contiguous() for x in cast_inputs(ctx.inputs, PRECISION_DTYPES[ctx.precision])]
    binding = session.io_binding()
    index = ctx.device.index or 0
    for meta, x in zip(session.get_inputs(), inputs, strict=True):
        binding.bind_input(meta.name, "cuda", index, numpy_dtypes[x.dtype], list(x.shape), x.data_ptr())
    for meta in session.get_outputs():
        binding.bind_output(meta.name, "cuda", index)
    return Prepared(
        run=lambda: session.run_with_iobinding(binding),
        fetch=lambda _: binding.copy_outputs_to_cpu(),
        note=f"{note}, I/O binding; memory not tracked (ONNX Runtime's own allocator)",
        tracks_memory=False,
        close=lambda: inputs.clear(),
    )


# --- TensorRT ------------------------------------------------------------------------------


def tensorrt_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether a TensorRT engine can run on `device`, and why not."""
    if device.type != "cuda":
        try:
            importlib.import_module("tensorrt")
        except ImportError:
            return False, "TensorRT is not installed (pip install tensorrt); this run is on the CPU"
        return False, f"TensorRT engines run on CUDA GPUs; this run is on {device}"
    try:
        api = importlib.import_module("kiln.tensorrt.api")
    except ImportError:
        try:
            importlib.import_module("tensorrt")
        except ImportError as exc:
            return False, f"TensorRT is not installed ({exc}): pip install tensorrt"
        return True, "tensorrt"
    return api.runtime_usable(device)


def _tensorrt_module() -> ModuleType:
    try:
        return importlib.import_module("kiln.tensorrt.api").trt()
    except ImportError:
        return importlib.import_module("tensorrt")


@peer("tensorrt", help="NVIDIA TensorRT via ONNX (only when a runnable TensorRT is installed)")
def _tensorrt(ctx: PeerContext) -> Prepared:
    ok, reason = tensorrt_runnable(ctx.device)
    if not ok:
        raise PeerSkipped(reason)
    model = require_model(ctx)
    trt = _tensorrt_module()
    flag = {"fp16": "FP16", "bf16": "BF16"}.get(ctx.precision)
    if flag and not hasattr(trt.BuilderFlag, flag):
        raise PeerSkipped(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{flag}")
    # fp32 ONNX, weakly typed: the builder flag lets TensorRT lower precision per layer
    path, how, _ = _onnx_inputs(model, ctx, torch.float32)
    engine = _trt_engine(trt, path, flag)
    return _trt_prepared(trt, engine, ctx, f"{how}, TensorRT {trt.__version__}")


def _trt_engine(trt: ModuleType, onnx_path: Path, flag: str | None) -> Any:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    if flag:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build an engine (see its log)")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def _trt_prepared(trt: ModuleType, engine: Any, ctx: PeerContext, note: str) -> Prepared:
    from kiln.tensorrt.runtime.engine import torch_dtypes

    dtypes = torch_dtypes(trt)
    context = engine.create_execution_context()
    inputs = iter(x.contiguous() for x in ctx.inputs)
    buffers: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            x = next(inputs).to(dtypes[engine.get_tensor_dtype(name)])
        else:
            shape = tuple(context.get_tensor_shape(name))
            x = torch.empty(shape, dtype=dtypes[engine.get_tensor_dtype(name)], device=ctx.device)
            outputs.append(x)
        buffers.append(x)
        context.set_tensor_address(name, x.data_ptr())

    def run() -> Any:
        context.execute_async_v3(torch.cuda.current_stream(ctx.device).cuda_stream)
        return outputs

    return Prepared(run=run, fetch=_clone_tensors, note=note, tracks_memory=False, close=buffers.clear)


# --- kiln ----------------------------------------------------------------------------------


@peer("kiln", help="kiln.build (or the engine file given)")
def _kiln(ctx: PeerContext) -> Prepared:
    if ctx.engine is not None:
        engine = ctx.engine
        built = engine.build_info.get("build_seconds")
        note = "engine file"
        if getattr(engine, "dims", None):  # dynamic shapes: the first call at this size, then replays
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine(*ctx.inputs)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            dims = ", ".join(d.describe() for d in engine.dims.values())
            note = f"dynamic engine ({dims}); first call at these shapes {(time.perf_counter() - t0) * 1e3:.1f} ms"
        return Prepared(run=lambda: engine(*ctx.inputs), note=note, build_seconds=built)
    from kiln.builder import BuildConfig, build

    config = BuildConfig(precision=ctx.precision, device=str(ctx.device), model_name=ctx.model_name)
    engine = build(require_model(ctx), ctx.inputs, config=config)
    return Prepared(run=lambda: engine(*ctx.inputs), note=f"{len(engine.plan['steps'])} steps")


@peer(
    "kiln-static",
    default=False,
    help="beside a dynamic-shape engine: a static kiln engine built for each size (kiln bench ENGINE --batch)",
)
def _kiln_static(ctx: PeerContext) -> Prepared:
    if ctx.engine is None or not getattr(ctx.engine, "dims", None):
        raise PeerSkipped("runs only beside a dynamic-shape engine (one built with --batch MIN:OPT:MAX)")
    model = require_model(ctx)
    from kiln.builder import BuildConfig, build

    config = BuildConfig(precision=ctx.precision, device=str(ctx.device), model_name=ctx.model_name)
    engine = build(model, ctx.inputs, config=config)
    shapes = ", ".join(str(tuple(x.shape)) for x in ctx.inputs)
    return Prepared(run=lambda: engine(*ctx.inputs), note=f"static engine built for {shapes}")


def known(registry: dict[str, Peer] | None = None) -> list[str]:
    return list(PEERS if registry is None else registry)


__all__ = [
    "PEERS",
    "Peer",
    "PeerContext",
    "PeerSkipped",
    "Prepared",
    "export_onnx",
    "first_line",
    "peer",
    "tensorrt_runnable",
]
