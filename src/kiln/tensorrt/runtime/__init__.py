"""Runtime: a ``kiln::tensorrt_region`` step run by TensorRT inside a kiln plan.

- ``region``: the region spec an engine file stores (``RegionSpec``, ``parse_spec``); never imports TensorRT
- ``engine``: the ``kiln::tensorrt_region`` op and how it runs (``run_region``), TensorRT loaded on first use

Nothing here imports the conversion or partitioning stages.
"""
