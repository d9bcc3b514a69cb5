"""Planning: an optimized graph and its kernel choices → ordered steps + a memory plan.

Every tensor an op produces is a *slot*. A slot written through an op's `.out`
overload owns a *buffer* placed in the arena by kiln.plan.memory; a view shares the
buffer of the tensor it aliases, and keeps it alive as long as the view lives;
ops with no `.out` overload allocate for themselves ("heap" slots). The plan is
plain JSON: the runtime reads it without importing any of this.

Concatenation elimination: where every input of an `aten.cat` is produced for the cat
alone by a step that can write into a given view (an `.out` overload, or a kernel
registered `writes_into`), the cat's output gets the buffer, each input becomes a "slice"
slot inside it that its producer writes straight into, and the cat step launches nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from kiln.graph import CapturedGraph, module_path, source_line
from kiln.kernels import concat, get_kernel
from kiln.kernels.aten import out_variant
from kiln.plan import memory, streams
from kiln.select.selection import PLANNER_OPS, Selection, concat_inputs, is_scalar_node, node_op_name
from kiln.shapes import evaluate, expr_of, make, nondecreasing, probe_bindings
from kiln.specs import dtype_from_name, dtype_name, encode_value


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _dense_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int | None:
    """Elements of storage a strided tensor spans, or None if it overlaps itself or has gaps."""
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return 0
    dims = sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return None
        expected *= sz
    return numel


class _Planner:
    def __init__(self, graph: CapturedGraph, selections: dict[fx.Node, Selection], multi_stream: bool = False):
        self.graph = graph
        self.multi_stream = multi_stream
        self.first: dict[int, int] = {}  # owner slot → earliest step its buffer may be written (side streams)
        self.side_branches = 0
        self.selections = selections
        self.slots: list[dict[str, Any]] = []
        self.value: dict[fx.Node, Any] = {}  # node → slot id, list of slot ids, or weight ref
        self.steps: list[dict[str, Any]] = []
        self.alias = _UnionFind()
        self.owner: dict[int, int] = {}  # slot → step that writes its buffer
        self.uses: dict[int, int] = {}  # slot → last step reading it
        self.producer: dict[int, int] = {}  # slot → step whose only output it is (not a view)
        # dynamic shapes (docs/dynamic-shapes.md): sizes are expressions over the dims
        self.dims = list(graph.dims.values())
        self.symbols = graph.symbols
        self.probes = probe_bindings(self.dims) if self.dims else []
        self.max_binding = {d.name: d.max for d in self.dims}

    def expr(self, size: Any) -> Any:
        return expr_of(size, self.symbols) if self.dims else size

    def new_slot(self, val: torch.Tensor, kind: str) -> int:
        self.slots.append({
            "shape": [self.expr(d) for d in val.shape], "stride": [self.expr(d) for d in val.stride()],
            "dtype": dtype_name(val.dtype), "kind": kind,
        })
        return len(self.slots) - 1

    def dense(self, val: torch.Tensor) -> bool:
        """Dense and non-overlapping: at its own sizes, or for a dynamic graph at every probe
        binding; and (dynamic) its size never shrinks as the dims grow, so one arena placement
        at max holds for every size (shapes.nondecreasing)."""
        if not self.dims:
            return _dense_extent(tuple(val.shape), tuple(val.stride())) is not None
        shape, stride = [self.expr(d) for d in val.shape], [self.expr(d) for d in val.stride()]
        numel = make("mul", list(shape)) if shape else 1
        lows = {d.name: d.min for d in self.dims}
        if not nondecreasing(numel, lows):
            return False
        return all(
            _dense_extent(tuple(evaluate(d, b) for d in shape), tuple(evaluate(d, b) for d in stride)) is not None
            for b in self.probes
        )

    def ref(self, value: Any) -> dict[str, Any] | None:
        if isinstance(value, torch.SymInt):
            return {"sym": self.expr(value)}
        if not isinstance(value, fx.Node):
            return None
        v = self.value[value]
        if isinstance(v, int):
            self.uses[v] = len(self.steps)
            return {"slot": v}
        if isinstance(v, dict):
            return v
        raise TypeError(f"node {value.name} yields several tensors; index it with getitem")

    def run(self) -> dict[str, Any]:
        nodes = list(self.graph.module.graph.nodes)
        # the graph inputs are the first slots, in order, even where a pass (channels_last) put
        # a node between two placeholders
        for node in [n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op != "placeholder"]:
            getattr(self, f"on_{node.op}")(node)
        if self.multi_stream:
            self.use_side_streams()
        return self.finish()

    def use_side_streams(self) -> None:
        """Put short independent branches on a side stream (kiln.plan.streams), keeping every slot
        they touch alive, and apart in the arena, over their whole fork → join span."""
        outputs = {r["slot"] for r in self.output_refs if isinstance(r, dict) and "slot" in r}
        branches = [
            b for b in streams.side_branches(self.steps, outputs)
            if not any(self.slots[o]["kind"] == "slice" for i in b.chain for o in self.steps[i]["outputs"])
        ]
        streams.mark(self.steps, branches)
        for b in branches:
            for i in b.chain:
                for slot in streams.reads(self.steps[i]) | set(self.steps[i]["outputs"]):
                    self.uses[slot] = max(self.uses.get(slot, i), b.join)
                    if self.owner.get(slot) == i:
                        self.first[slot] = b.fork + 1
        self.side_branches = len(branches)

    def on_placeholder(self, node: fx.Node) -> None:
        self.value[node] = self.new_slot(node.meta["val"], "input")

    def on_get_attr(self, node: fx.Node) -> None:
        self.value[node] = {"weight": node.target}

    def on_call_function(self, node: fx.Node) -> None:
        if node.target in PLANNER_OPS:
            source, index = node.args
            self.value[node] = self.value[source][index]
            return
        if self.dims and is_scalar_node(node):
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt):  # a size: its value is an expression, no step
                self.value[node] = {"sym": self.expr(val)}
            elif node.users:
                raise ValueError(f"node {node.name} ({node_op_name(node)}) computes a non-integer size; "
                                 "kiln plans integer sizes only")
            return
        op = node_op_name(node)
        selection = self.selections[node]
        kernel = get_kernel(selection.kernel)
        val = node.meta["val"]
        multi = isinstance(val, (tuple, list))
        vals = list(val) if multi else [val]
        schema = node.target._schema
        is_view = any(r.alias_info is not None for r in schema.returns)
        out = out_variant(op, self.graph.device.type) if kernel.writes_planned_outputs and not is_view else None
        if out is not None and not all(isinstance(v, torch.Tensor) and self.dense(v) for v in vals):
            out = None
        args = encode_value(list(node.args), self.ref)
        kwargs = {k: encode_value(v, self.ref) for k, v in node.kwargs.items()}
        kind = "view" if is_view else "buffer" if out is not None else "heap"
        outputs = [self.new_slot(v, kind) for v in vals]
        step_index = len(self.steps)
        for slot in outputs:
            self.uses.setdefault(slot, step_index)
            if kind == "buffer":
                self.owner[slot] = step_index
            elif kind == "view":
                for arg in node.all_input_nodes:
                    src = self.value.get(arg)
                    if isinstance(src, int):
                        self.alias.union(slot, src)
        self.value[node] = outputs if multi else outputs[0]
        if not multi and kind != "view":
            self.producer[outputs[0]] = step_index
        self.steps.append({
            "name": node.name,
            "op": op,
            "kernel": kernel.name,
            "candidates": selection.candidates,
            "timings_ms": selection.timings_ms,
            "concat_copy_ms": selection.concat_copy_ms,
            "args": args,
            "kwargs": kwargs,
            "outputs": outputs,
            "multi": multi,
            "out_variant": None if out is None else {"op": out.op, "out_args": list(out.out_args)},
            "source": source_line(node),
            "module": module_path(node),
            **({"fallback": selection.fallback} if selection.fallback else {}),
        })
        if op == "aten.cat.default" and not multi and not self.dims:  # (not yet with symbolic offsets)
            self.concat_in_place(node, outputs[0])

    def concat_in_place(self, node: fx.Node, cat_slot: int) -> bool:
        """Let the cat's producers write into its output; False (nothing changed) where any cannot."""
        tensors = concat_inputs(node)
        val = node.meta["val"]
        if tensors is None or _dense_extent(tuple(val.shape), tuple(val.stride())) is None:
            return False
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % val.dim()
        found: list[tuple[int, int, int]] = []  # (slot, producing step, length along dim)
        for t in tensors:
            slot = self.value.get(t)
            if not isinstance(slot, int) or slot not in self.producer:
                return False
            step = self.steps[self.producer[slot]]
            writes = step["out_variant"] is not None or get_kernel(step["kernel"]).writes_into
            if not writes or step["kernel"] == concat.NAME:
                return False
            found.append((slot, self.producer[slot], t.meta["val"].shape[dim]))
        start = 0
        for slot, step_index, length in found:
            self.slots[slot].update(kind="slice", stride=list(val.stride()), base=cat_slot,
                                    base_offset=start * val.stride()[dim])
            start += length
            self.owner.pop(slot, None)
            self.alias.union(slot, cat_slot)
            self.steps[step_index]["writes_into"] = True
        cat_step = self.steps[-1]
        cat_step.update(kernel=concat.NAME, out_variant=None, writes_into=True)
        self.slots[cat_slot]["kind"] = "buffer"
        self.owner[cat_slot] = min(step_index for _, step_index, _ in found)
        return True

    def on_output(self, node: fx.Node) -> None:
        self.output_refs = [encode_value(v, self.ref) for v in node.args[0]]
        end = len(self.steps)
        for ref in self.output_refs:
            if isinstance(ref, dict) and "slot" in ref:
                self.uses[ref["slot"]] = end

    def finish(self) -> dict[str, Any]:
        groups: dict[int, list[int]] = {}
        for slot in range(len(self.slots)):
            groups.setdefault(self.alias.find(slot), []).append(slot)
        buffers: list[memory.Buffer] = []
        buffer_slots: list[int] = []
        symbolic: list[Any] = []  # dynamic: each buffer's bytes as an expression
        for members in groups.values():
            owners = [s for s in members if s in self.owner]
            if not owners:
                continue
            assert len(owners) == 1, f"slots {owners} alias each other yet each owns a buffer"
            slot = owners[0]
            spec = self.slots[slot]
            itemsize = dtype_from_name(spec["dtype"]).itemsize
            last = max(self.uses.get(s, self.owner[slot]) for s in members)
            if self.dims:  # placed at max: every buffer's size is nondecreasing (dense())
                symbolic.append(make("mul", [itemsize, *spec["shape"]]))
                nbytes = evaluate(symbolic[-1], self.max_binding)
            else:
                nbytes = _dense_extent(tuple(spec["shape"]), tuple(spec["stride"])) * itemsize
            buffers.append(memory.Buffer(nbytes, self.first.get(slot, self.owner[slot]), last))
            buffer_slots.append(slot)
        offsets, arena = memory.place(buffers)
        for i, (slot, offset, buf) in enumerate(zip(buffer_slots, offsets, buffers)):
            self.slots[slot]["offset"] = offset
            self.slots[slot]["nbytes"] = symbolic[i] if self.dims else buf.nbytes
        for spec in self.slots:
            if spec["kind"] == "slice":
                itemsize = dtype_from_name(spec["dtype"]).itemsize
                span = 1 + sum((d - 1) * st for d, st in zip(spec["shape"], spec["stride"]))
                spec["offset"] = self.slots[spec["base"]]["offset"] + spec["base_offset"] * itemsize
                spec["nbytes"] = span * itemsize
        heap_bytes = sum(_nbytes(s, self.max_binding) for s in self.slots if s["kind"] == "heap")
        dynamic: dict[str, Any] = {}
        if self.dims:
            dynamic["dims"] = [d.to_json() for d in self.dims]
        plan = {
            **dynamic,
            "inputs": [s.to_json() for s in self.graph.inputs],
            "graph_inputs": [s.to_json() for s in self.graph.graph_inputs],
            "outputs": [None if s is None else s.to_json() for s in self.graph.outputs],
            "output_refs": self.output_refs,
            "structure": self.graph.structure,
            "slots": self.slots,
            "steps": self.steps,
            "last_use": [self.uses.get(s, -1) for s in range(len(self.slots))],
            "side_branches": self.side_branches,
            "memory": {
                "arena_bytes": arena,
                "alignment": memory.ALIGNMENT,
                "planned_bytes": sum(memory.align(b.nbytes) for b in buffers),
                "peak_live_bytes": memory.peak_live_bytes(buffers),
                "heap_bytes": heap_bytes,
                "buffers": [
                    {"slot": s, "offset": o, "nbytes": b.nbytes, "first": b.first, "last": b.last}
                    for s, o, b in zip(buffer_slots, offsets, buffers)
                ],
            },
        }
        if self.dims:
            plan["memory"]["planned_at"] = dict(self.max_binding)
        return plan


def _nbytes(slot: dict[str, Any], binding: dict[str, int] | None = None) -> int:
    numel = 1
    for d in slot["shape"]:
        numel *= evaluate(d, binding or {}) if binding else d
    return numel * dtype_from_name(slot["dtype"]).itemsize


def make_plan(
    graph: CapturedGraph, selections: dict[fx.Node, Selection], multi_stream: bool = False
) -> dict[str, Any]:
    """The JSON plan for `graph` with the chosen kernels (see docs/engine-format.md); with
    `multi_stream`, short independent branches run on a side stream (kiln.plan.streams)."""
    return _Planner(graph, selections, multi_stream).run()
