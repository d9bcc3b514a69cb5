"""Partitioning: what TensorRT can take becomes ``kiln::tensorrt_region`` steps inside a kiln graph.

- ``partition``: group convertible nodes into regions (``find_regions``) and replace each by
  its engine (``partition_graph``, the ``--backend tensorrt`` stage of ``kiln.build``)
- ``splice``: replace one region of the graph by one region call
"""
