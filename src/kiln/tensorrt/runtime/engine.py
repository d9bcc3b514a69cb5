"""The ``kiln::tensorrt_region`` op, and running it: deserialize once, bind torch tensors,
enqueue on torch's stream.

The op's reference implementation runs the engine with the TensorRT runtime where it can (a
CUDA GPU the installed TensorRT supports) and otherwise raises ``RegionRuntimeError`` saying
why; the fake implementation returns empty tensors shaped by the spec
(``kiln.tensorrt.runtime.region``).

No host staging and no pycuda: inputs and outputs are torch CUDA tensors whose addresses are
handed to the execution context, and the engine runs on the current torch CUDA stream, so a
region is captured into kiln's CUDA graph like any other step. A region is deserialized once
per engine tensor (the uint8 weight that holds it) and device, and kept as long as that
tensor lives.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from kiln.tensorrt import api
from kiln.tensorrt.runtime.region import RegionRuntimeError, RegionSpec, parse_spec

__all__ = ["RegionRunner", "check_runnable", "run_region", "runner_for", "tensorrt_region", "torch_dtypes"]


def check_runnable(device: torch.device, spec: RegionSpec) -> None:
    """Raise RegionRuntimeError unless the installed TensorRT can run ``spec``'s engine on ``device``."""
    ok, reason = api.runtime_usable(device)
    if not ok:
        raise RegionRuntimeError(
            f"this engine contains TensorRT regions (built with {spec.flavor} {spec.version}); the installed "
            f"TensorRT ({api.flavor() or 'none'}, {api.version() or 'not installed'}) cannot run on {device} "
            f"because {reason.rstrip('.')}. Rebuild with --backend kiln, or install tensorrt "
            "(`pip install tensorrt`) and run on a GPU it supports."
        )
    if api.flavor() != spec.flavor:
        raise RegionRuntimeError(
            f"this engine's TensorRT regions were built with {spec.flavor} {spec.version}, but {api.flavor()} "
            f"{api.version()} is installed: a serialized engine only loads in the TensorRT that built it. "
            f"Rebuild the engine here (kiln build ... --backend tensorrt), or install {spec.flavor} {spec.version}."
        )


class RegionRunner:
    """One deserialized region engine and its execution context, bound per call to torch tensors."""

    def __init__(self, serialized: bytes, spec: RegionSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        trt = api.trt()
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(api.logger())
            with api.capture_log() as log:
                self.engine = self.runtime.deserialize_cuda_engine(serialized)
            if self.engine is None:
                errors = [m for level, m in log if level in ("error", "internal_error")]
                raise RegionRuntimeError(
                    f"{api.flavor()} {api.version()} could not load a TensorRT region built with {spec.flavor} "
                    f"{spec.version} ({'; '.join(errors[-3:]) or 'no error logged'}). Serialized engines are tied "
                    "to the TensorRT version and GPU family that built them: rebuild the kiln engine here."
                )
            self._check_io(trt)
            self.context = self._create_context(trt)
        self._capturable: dict[int, bool] = {}

    def _check_io(self, trt: Any) -> None:
        engine, problems = self.engine, []
        dtypes = torch_dtypes(trt)
        expected = [(s, trt.TensorIOMode.INPUT) for s in self.spec.inputs]
        expected += [(s, trt.TensorIOMode.OUTPUT) for s in self.spec.outputs]
        if engine.num_io_tensors != len(expected):
            problems.append(f"the engine has {engine.num_io_tensors} I/O tensors, the spec {len(expected)}")
        for spec, mode in expected:
            if engine.get_tensor_mode(spec.name) != mode:
                problems.append(f"{spec.name} is not an engine {str(mode).rsplit('.', 1)[-1].lower()}")
                continue
            shape = tuple(engine.get_tensor_shape(spec.name))
            dtype = dtypes.get(engine.get_tensor_dtype(spec.name))
            if shape != spec.shape or dtype != spec.dtype:
                problems.append(f"{spec.name} is {shape} {dtype} in the engine, {spec.shape} {spec.dtype} in the spec")
        if problems:
            raise RegionRuntimeError(
                "a TensorRT region's engine does not match its spec (" + "; ".join(problems) + "): the engine "
                "file is damaged or was edited. Rebuild it."
            )

    def _create_context(self, trt: Any) -> Any:
        engine = self.engine
        if hasattr(engine, "create_runtime_config") and hasattr(trt, "CudaGraphStrategy"):
            # TensorRT-RTX can capture its own CUDA graphs; kiln captures the whole plan instead.
            config = engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context()
        if context is None:
            raise RegionRuntimeError(
                f"{api.flavor()} {api.version()} could not create an execution context for a TensorRT region on "
                f"{self.device} (out of GPU memory?)"
            )
        return context

    def for_context(self) -> RegionRunner:
        """A runner sharing this one's deserialized engine, with a TensorRT execution context of its
        own. An execution context holds per-call state (tensor addresses, and scratch memory that a
        captured CUDA graph keeps using), so each kiln execution context needs its own
        (kiln.runtime.context); the engine and its weights stay shared."""
        twin = copy.copy(self)
        with torch.cuda.device(self.device):
            twin.context = self._create_context(api.trt())
        twin._capturable = {}
        return twin

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        spec, context = self.spec, self.context
        if len(inputs) != len(spec.inputs):
            raise RegionRuntimeError(f"a TensorRT region takes {len(spec.inputs)} input(s), got {len(inputs)}")
        stream = torch.cuda.current_stream(self.device)
        if torch.cuda.is_current_stream_capturing():
            self._check_capturable(stream)
        bound = []
        for want, x in zip(spec.inputs, inputs, strict=True):
            if x.dtype != want.dtype or tuple(x.shape) != want.shape or x.device != self.device:
                raise RegionRuntimeError(
                    f"TensorRT region input {want.name} must be {want.shape} {want.dtype} on {self.device}, "
                    f"got {tuple(x.shape)} {x.dtype} on {x.device}"
                )
            x = x if x.is_contiguous() else x.contiguous()  # TensorRT reads dense row-major tensors
            context.set_tensor_address(want.name, x.data_ptr())
            bound.append(x)
        outputs = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in spec.outputs]
        for want, out in zip(spec.outputs, outputs, strict=True):
            context.set_tensor_address(want.name, out.data_ptr())
        with torch.cuda.device(self.device):
            ok = context.execute_async_v3(stream.cuda_stream)
        if not ok:
            raise RuntimeError(
                f"{api.flavor()} {api.version()} failed to enqueue a TensorRT region ({spec.describe()}); "
                "see the kiln.tensorrt log"
            )
        # `bound` may hold contiguous copies: freeing them after the enqueue is safe because torch's caching
        # allocator only hands their memory to later work on this same stream.
        return outputs

    def _check_capturable(self, stream: torch.cuda.Stream) -> None:
        handle = stream.cuda_stream
        if handle not in self._capturable:
            check = getattr(self.context, "is_stream_capturable", None)
            self._capturable[handle] = True if check is None else bool(check(handle))
        if not self._capturable[handle]:
            raise RuntimeError(
                f"{api.flavor()} {api.version()} says this TensorRT region cannot be captured into a CUDA graph "
                "on this stream; kiln runs the engine step by step instead"
            )


def torch_dtypes(trt: Any) -> dict[Any, torch.dtype]:
    """TensorRT DataType → torch dtype, for the types this TensorRT has."""
    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
        "fp8": torch.float8_e4m3fn,
    }
    return {getattr(trt, name): dtype for name, dtype in table.items() if hasattr(trt, name)}


# engine tensor id → (weak reference to it, spec text, runner); entries leave with the tensor.
_RUNNERS: dict[int, tuple[weakref.ref, str, RegionRunner]] = {}


def runner_for(engine: torch.Tensor, spec_text: str, device: torch.device) -> RegionRunner:
    """The region runner of ``engine`` on ``device``, deserialized on first use and then cached."""
    key = id(engine)
    entry = _RUNNERS.get(key)
    if entry is not None and entry[0]() is engine and entry[1] == spec_text and entry[2].device == device:
        return entry[2]
    spec = parse_spec(spec_text)
    check_runnable(device, spec)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a TensorRT region must run once before CUDA graph capture (it loads its engine then)")
    if engine.dtype != torch.uint8 or engine.dim() != 1:
        shape = tuple(engine.shape)
        raise RegionRuntimeError(f"a TensorRT region's engine must be a 1-D uint8 tensor, got {engine.dtype} {shape}")
    serialized = engine.detach().cpu().numpy().tobytes()
    runner = RegionRunner(serialized, spec, device)
    if entry is None or entry[0]() is not engine:
        weakref.finalize(engine, _RUNNERS.pop, key, None)
    _RUNNERS[key] = (weakref.ref(engine), spec_text, runner)
    return runner


def region_device(inputs: Sequence[torch.Tensor], engine: torch.Tensor) -> torch.device:
    """The device a region runs on: its inputs' (the engine tensor's where it has none)."""
    device = inputs[0].device if inputs else engine.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_region(inputs: Sequence[torch.Tensor], engine: torch.Tensor, spec_text: str) -> list[torch.Tensor]:
    """Run a region on its shared runner (what ``kiln::tensorrt_region`` does; an engine's
    ``tensorrt`` steps run on runners of their own execution context, see kiln.kernels.tensorrt)."""
    return runner_for(engine, spec_text, region_device(inputs, engine))(inputs)


@torch.library.custom_op("kiln::tensorrt_region", mutates_args=())
def tensorrt_region(inputs: list[torch.Tensor], engine: torch.Tensor, spec: str) -> list[torch.Tensor]:
    """Run the serialized TensorRT engine ``engine`` on ``inputs``; outputs as ``spec`` lists them."""
    return run_region(inputs, engine, spec)


@tensorrt_region.register_fake
def _fake(inputs: list[torch.Tensor], engine: torch.Tensor, spec: str) -> list[torch.Tensor]:
    return [engine.new_empty(s.shape, dtype=s.dtype) for s in parse_spec(spec).outputs]
