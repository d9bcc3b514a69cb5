"""What an engine is, as data: used by `kiln inspect` (table and --json) and summaries."""

from __future__ import annotations

from typing import Any

from kiln.runtime.engine import Engine


def describe(engine: Engine) -> dict[str, Any]:
    plan = engine.plan
    slots = plan["slots"]
    steps = []
    for i, step in enumerate(plan["steps"]):
        outs = [slots[o] for o in step["outputs"]]
        steps.append({
            "index": i,
            "name": step["name"],
            "op": step["op"],
            "kernel": step["kernel"],
            "candidates": step["candidates"],
            "timings_ms": step["timings_ms"],
            "concat_copy_ms": step.get("concat_copy_ms"),
            "precision": outs[0]["dtype"] if outs else None,
            "output_shape": outs[0]["shape"] if outs else None,
            "memory": outs[0]["kind"] if outs else None,
            "source": step["source"],
        })
    mem = plan["memory"]
    return {
        "inputs": plan["inputs"],
        "outputs": [o for o in plan["outputs"] if o is not None],
        "steps": steps,
        "memory": {
            "arena_bytes": mem["arena_bytes"],
            "activation_bytes": mem["planned_bytes"],
            "peak_live_bytes": mem["peak_live_bytes"],
            "heap_bytes": mem["heap_bytes"],
            "planned_buffers": len(mem["buffers"]),
            "reuse_ratio": round(mem["planned_bytes"] / mem["arena_bytes"], 2) if mem["arena_bytes"] else None,
        },
        "build": engine.build_info,
    }
