"""The TensorRT kernel: a ``kiln::tensorrt_region`` step run by the TensorRT runtime.

Each region's engine is deserialized once (per engine weight and device) and bound to torch
tensors directly: inputs by address, outputs allocated with ``torch.empty`` on the inputs'
device, the engine enqueued on the current torch CUDA stream, so CUDA-graph replay captures it
like any other step. TensorRT is imported on first use only: importing the catalog never loads
it. Where the runtime cannot run (no GPU, or a GPU the installed TensorRT does not support),
the step raises ``RegionRuntimeError`` saying why and what to do.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.tensorrt.runtime.engine import region_device, runner_for
from kiln.tensorrt.runtime.region import REGION_OP


@functools.cache
def _usable_on(device_index: int) -> bool:
    from kiln.tensorrt.api import runtime_usable

    return runtime_usable(torch.device("cuda", device_index))[0]


def _runtime_usable(call: OpCall) -> bool:
    if call.device_type != "cuda" or not torch.cuda.is_available():
        return False
    return _usable_on(torch.cuda.current_device())


@register_kernel(
    "tensorrt",
    provider="tensorrt",
    implements=REGION_OP,
    supports=_runtime_usable,
    writes_planned_outputs=False,
    priority=Priority.PREFERRED,
)
def make_tensorrt_region(name: str, out: OutVariant | None) -> StepFn:
    """A TensorRT engine run on the current CUDA stream, bound to torch tensors (no host staging)."""
    # The runtime makes a step function per execution context: this one's TensorRT execution
    # context (tensor addresses, scratch memory a captured graph keeps using) is its own, made
    # on first use from the shared, deserialized engine.
    own: list[Any] = [None, None]  # [the shared runner, this step function's runner]

    def run(args: tuple, kwargs: dict, outs: list) -> list[torch.Tensor]:
        inputs, engine, spec = args
        shared = runner_for(engine, spec, region_device(inputs, engine))
        if own[0] is not shared:
            fork = getattr(shared, "for_context", None)  # (test stand-ins for runner_for are plain functions)
            own[:] = [shared, fork() if fork is not None else shared]
        return own[1](inputs)

    return run
