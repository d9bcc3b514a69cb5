"""The kernel catalog: every way kiln knows to run an op.

A kernel is a factory registered with `@register_kernel(...)` (kiln.kernels.registry) in the
module of its provider; importing this package imports every module below and so fills the
catalog. Build-time selection asks each kernel whether it `supports` a call (device, dtypes,
shapes); the runtime only looks kernels up by name. Adding a kernel touches its own module,
the list below (for a new module), and tests/test_kernel_catalog.py (its case).

    aten                   ATen itself, for every ATen op (the reference)
    reference              the torch.library reference of every kiln:: op
    attention              scaled_dot_product_attention pinned to one backend (flash, efficient, cuDNN)
    cudnn                  cuDNN convolution + the fused op's epilogue
    conv_gemm              1×1 and patch convolutions as cuBLASLt GEMMs
    cublas                 cuBLASLt GEMM with bias + activation epilogue
    scaled_mm              8-bit GEMMs for kiln::qlinear (cuBLASLt int8 / float8, Triton quantize + epilogue)
    triton_conv            cuDNN convolution + one Triton epilogue pass
    triton_gemm            Triton GEMM ending in the fused op's epilogue
    triton_layer_norm      residual add + layer norm in one Triton launch
    triton_mean            spatial mean of channels-last activations in Triton
    triton_pointwise       Triton kernels generated from kiln::pointwise programs
    triton_rowwise         Triton kernels generated from kiln::rowwise programs (one row per instance)
    tensorrt               a TensorRT engine as one step (kiln::tensorrt_region)
    concat                 the concatenation the memory planner already did
"""

from __future__ import annotations

from kiln.kernels import (  # noqa: F401  (each registers its kernels)
    aten,
    attention,
    concat,
    conv_gemm,
    cublas,
    cudnn,
    reference,
    scaled_mm,
    tensorrt,
    triton_conv,
    triton_gemm,
    triton_layer_norm,
    triton_mean,
    triton_pointwise,
    triton_rowwise,
)
from kiln.kernels.registry import (
    KERNELS,
    Kernel,
    OpCall,
    OutVariant,
    Priority,
    StepFn,
    candidates,
    get_kernel,
    op_name,
    register_kernel,
    resolve_op,
)

__all__ = [
    "KERNELS",
    "Kernel",
    "OpCall",
    "OutVariant",
    "Priority",
    "StepFn",
    "candidates",
    "get_kernel",
    "op_name",
    "register_kernel",
    "resolve_op",
]
