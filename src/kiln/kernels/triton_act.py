"""The activations of kiln's fused ops as one Triton function, shared by the Triton kernels
that end in an epilogue (conv epilogue, GEMM epilogue). Computes in whatever precision it is
given (the kernels pass fp32 accumulators).

It maps every name of kiln.ops.vocabulary.ACTIVATIONS ("none" is the fall-through);
tests/test_vocabulary.py runs each through it in Triton's interpreter against the reference.
"""

from __future__ import annotations

from kiln.kernels.triton_lang import jit, tl


@jit
def activation(y, ACT: tl.constexpr):
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "relu6":
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == "silu":
        y = y * tl.sigmoid(y)
    elif ACT == "sigmoid":
        y = tl.sigmoid(y)
    elif ACT == "hardswish":
        y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACT == "tanh":
        y = 2.0 * tl.sigmoid(2.0 * y) - 1.0
    elif ACT == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + 2.0 * tl.sigmoid(2.0 * inner) - 1.0)
    return y
