"""Conversion: an FX graph (core ATen + kiln ops) → a TensorRT network → a serialized engine.

- ``registry``: the converter registry (``converter``, ``lookup``, ``registered``, ``unregister``)
  and the list of built-in converter modules (``BUILTINS``)
- ``errors``: ``Decline`` (a converter says no) and ``ConversionError``
- ``context``: ``ConversionContext``, what a converter sees
- ``args``: argument helpers the converters share
- one module per op family: ``elementwise``, ``reduce``, ``shape``, ``nn`` (core ATen),
  ``kiln_ops`` (kiln's fused ops), ``pointwise`` (``kiln::pointwise`` programs), ``quant``
  (kiln's quantize/dequantize as TensorRT Q/DQ layers), and ``activations`` (kiln's
  activation vocabulary as TensorRT layers)
- ``network``: FX graph → TensorRT network (``build_network``, ``supported_nodes``)
- ``build``: network → serialized engine (``build_engine``)

Importing this package imports none of them (the converter modules import the registry).
"""
