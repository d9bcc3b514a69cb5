"""Built-in converters for the core ATen ops the zoo uses (registered on import).

The converters live in one module per op family; importing this module imports (and so
registers) all of them:

- ``convert_elementwise``: identity/casts, arithmetic, comparisons, logic, unary math, activations
- ``convert_reduce``: reductions and softmax
- ``convert_shape``: views, permutes, slicing, cat/split, padding, creation, indexing
- ``convert_nn``: pooling, linear algebra (mm, convolution, attention), normalization
- ``convert_common``: argument helpers they share

Each converter takes a ``ConversionContext`` and returns the node's value. Arguments follow the
ATen schema; optional trailing arguments may be missing from ``ctx.args`` and are read with
``_arg``. ``act_layer``, ``conv_nd`` and ``matmul`` (re-exported here) are shared with
``kiln.tensorrt.kiln_ops``; ``expand`` is too.
"""

from __future__ import annotations

from kiln.tensorrt import convert_elementwise, convert_nn, convert_reduce, convert_shape
from kiln.tensorrt.convert_elementwise import act_layer
from kiln.tensorrt.convert_nn import conv_nd, matmul
from kiln.tensorrt.convert_shape import expand

__all__ = [
    "act_layer",
    "conv_nd",
    "convert_elementwise",
    "convert_nn",
    "convert_reduce",
    "convert_shape",
    "expand",
    "matmul",
]
