"""Dead-layer elimination: drop ops whose results nothing uses (seed 000, point 1)."""

from __future__ import annotations

import copy
import dataclasses

from torch import fx

from kiln.capture import CapturedGraph
from kiln.passes import register_pass


@register_pass("dead_code")
def eliminate_dead_code(graph: CapturedGraph) -> CapturedGraph:
    """Remove ops with unused outputs and weights nothing reads."""
    g = copy.deepcopy(graph.module.graph)
    g.eliminate_dead_code()
    for node in list(g.nodes):
        if node.op == "get_attr" and not node.users:
            g.erase_node(node)
    module = fx.GraphModule(graph.module, g)
    return dataclasses.replace(graph, module=module)
