"""cuBLASLt kernels for kiln::linear_act: the bias and ReLU/GELU(tanh) run in the GEMM's
epilogue (aten._addmm_activation), so the activation costs no extra pass over memory.

`EPILOGUES` maps the vocabulary's activations (kiln.ops.vocabulary) that cuBLASLt has as an
epilogue; the others follow the GEMM as cuDNN's in-place activations (kiln.kernels.cudnn.INPLACE).
"""

from __future__ import annotations

import torch

from kiln.kernels.cudnn import INPLACE
from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel

LINEAR_OP = "kiln.linear_act.default"
EPILOGUES = {"relu": False, "gelu_tanh": True}  # activation → _addmm_activation's use_gelu


def _epilogue_fits(call: OpCall) -> bool:
    x, w, bias = call.inputs[:3]
    return (
        call.device_type == "cuda"
        and x is not None
        and len(x.shape) == 2
        and (bias is None or len(bias.shape) == 1)
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@register_kernel(
    "cublaslt.linear_epilogue",
    provider="cublaslt",
    implements=LINEAR_OP,
    supports=_epilogue_fits,
    writes_planned_outputs=False,
    priority=Priority.DEFAULT,
)
def make_epilogue(name: str, out: OutVariant | None) -> StepFn:
    """One cuBLASLt GEMM with bias + ReLU/GELU-tanh epilogue; other activations follow in place.
    Without a bias (T5's linears) it is one cuBLAS GEMM and the activation in place."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, w_t, bias, act = args
        if bias is None:
            return INPLACE[act](torch.mm(x, w_t))
        if act in EPILOGUES:
            return torch.ops.aten._addmm_activation(bias, x, w_t, use_gelu=EPILOGUES[act])
        return INPLACE[act](torch.addmm(bias, x, w_t))

    return run


def _half_precision_gelu(call: OpCall) -> bool:
    return (
        _epilogue_fits(call)
        and call.inputs[2] is not None
        and call.inputs[0].dtype in (torch.float16, torch.bfloat16)
        and call.constant(3) == "gelu"
    )


@register_kernel(
    "cublaslt.linear_gelu_tanh",
    provider="cublaslt",
    implements=LINEAR_OP,
    supports=_half_precision_gelu,
    writes_planned_outputs=False,
    approximate=True,
    priority=Priority.CANDIDATE,
)
def make_gelu_tanh_epilogue(name: str, out: OutVariant | None) -> StepFn:
    """fp16/bf16 only: exact GELU as cuBLASLt's tanh-approximated GELU epilogue, in the GEMM.

    An approximation, offered as a timed candidate only: the two GELUs differ by at most
    4.7e-4 in absolute terms (at |x| ≈ 2.7), under half an fp16 ulp wherever |GELU(x)| ≥ 1;
    where GELU(x) is tiny (x ≲ -3) the relative difference is large while the absolute one
    stays that small. In exchange the separate pass over the [rows, 4·hidden] activation
    disappears. The tuner keeps it only where it is faster and the whole output agrees with
    the reference within kiln.select.tune.REL_TOL (relative L2), which this bound always meets."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, w_t, bias, _ = args
        return torch.ops.aten._addmm_activation(bias, x, w_t, use_gelu=True)

    return run

