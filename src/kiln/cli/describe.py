"""What an engine is, as data, in the model's language: used by `kiln inspect` (table and --json).

Each step names the model's module (`layer2.0.conv1`) and source line, not only the FX node;
a TensorRT region step carries its region's op counts and engine size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TENSORRT_REGION_OP = "kiln.tensorrt_region.default"


def describe(engine: Any) -> dict[str, Any]:
    plan = engine.plan
    slots = plan["slots"]
    regions = {r["node"]: r for r in (engine.build_info.get("tensorrt") or {}).get("regions", [])}
    steps = []
    for i, step in enumerate(plan["steps"]):
        outs = [slots[o] for o in step["outputs"]]
        region = regions.get(step["name"]) if step["op"] == TENSORRT_REGION_OP else None
        steps.append({
            "index": i,
            "name": step["name"],
            "module": step.get("module") or "",
            "op": step["op"],
            "kernel": step["kernel"],
            "candidates": step["candidates"],
            "timings_ms": step["timings_ms"],
            "concat_copy_ms": step.get("concat_copy_ms"),
            "precision": outs[0]["dtype"] if outs else None,
            "output_shape": outs[0]["shape"] if outs else None,
            "memory": outs[0]["kind"] if outs else None,
            "source": step["source"],
            "fallback": step.get("fallback"),
            "tensorrt_region": None if region is None else {
                "ops": region["ops"], "op_counts": region["op_counts"], "engine_bytes": region["engine_bytes"],
            },
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
        "dims": plan.get("dims", []),
        "planned_at": mem.get("planned_at"),
        "signer": signer_of(engine),
        "signer_verified": bool(getattr(engine, "signer_trusted", False)),
        "build": engine.build_info,
    }


def render_shape(shape: Any) -> str:
    """A shape as the user reads it: (1, 3, 224, 224), or (batch, 3, 224, 224) with dims."""
    if all(isinstance(d, int) for d in shape):
        return str(tuple(shape))
    from kiln.shapes import render_shape as render

    return render(shape)


def dims_line(info: dict[str, Any]) -> str | None:
    """'dims: batch 1..64 (opt 8); memory planned for batch 64', or None for fixed shapes."""
    if not info.get("dims"):
        return None
    ranges = ", ".join(f"{d['name']} {d['min']}..{d['max']} (opt {d['opt']})" for d in info["dims"])
    planned = ", ".join(f"{k} {v}" for k, v in (info.get("planned_at") or {}).items())
    return f"dims: {ranges}; memory planned for {planned}"


def signer_of(engine: Any) -> str | None:
    """Who signed the engine file (the key's fingerprint), or None for an unsigned file."""
    signer = getattr(engine, "signer", None)
    return None if signer is None else str(signer)


def short_op(op: str) -> str:
    """'kiln.conv_bias_act.default' → 'kiln.conv_bias_act' (the overload only when it says something)."""
    return op.removesuffix(".default")


def short_source(source: str) -> str:
    """'/path/to/resnet.py:146 in forward: out = self.conv1(x)' → 'resnet.py:146'."""
    head = source.split(" in ", 1)[0]
    if ":" not in head or head.startswith("unknown"):
        return "-"
    file, _, line = head.rpartition(":")
    return f"{Path(file).name}:{line}"
