"""After Q/DQ insertion: each quantized linear layer's Q → DQ → GEMM ← DQ(weight) as one
kiln::qlinear, the op the 8-bit GEMM kernels implement (kiln.kernels.scaled_mm).

    quantize_per_tensor(x, s, fmt) → dequantize_per_tensor(·, s) [→ layout views] ─┐
    dequantize_per_channel(W_q, w_s, axis) [→ layout views] ──────────────────────┴→ linear_act(·, ·, bias, act)
        ⇒  qlinear(x [→ the same views], s, W_qᵀ as [N, K], w_s, bias, act)

The quantized weight is laid out once, at build time, as the [N, K] row-major tensor whose
transpose is the column-major operand cuBLASLt's 8-bit GEMMs take; nothing is transposed or
converted per call. The views between the activation's DQ and the GEMM are replayed on the
unquantized tensor (per-tensor quantization commutes with them). kiln::qlinear's reference
computes exactly what the Q/DQ graph computed, so the fused graph's outputs are the simulated
graph's, bit for bit, wherever the reference runs (the CPU).

Matched: kiln::linear_act, aten.mm and aten.addmm (1-D bias, unit alpha and beta) whose
activation operand is a per-tensor Q/DQ pair and whose weight operand is a dequantized 8-bit
constant of the same format, all in one float dtype. And horizontal_fuse's sibling projections,
aten.bmm / aten.baddbmm (bias [G, 1, N]) of one input expanded to [G, M, K] against a stacked
[G, K, N] weight: one kiln::qlinear_grouped (weight [G, N, K]), which runs as one 8-bit GEMM
against all G·N columns writing the G dense [M, N] slices. Everything else (convolutions, GEMMs
of two activations, mixed formats) keeps its Q/DQ.
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, copy_origin, finish, infer_meta, op_nodes
from kiln.ops.quant import format_of
from kiln.quant.insert import _replay, stored_axis
from kiln.quant.sites import LAYOUT_OPS, _trace

kiln_ops = torch.ops.kiln
aten = torch.ops.aten
GEMMS = (kiln_ops.linear_act.default, aten.mm.default, aten.addmm.default)
BATCHED = (aten.bmm.default, aten.baddbmm.default)


def fuse_qlinear(graph: CapturedGraph) -> tuple[CapturedGraph, int]:
    """`graph` with every quantized linear layer as one kiln::qlinear, and how many were fused.
    The graph is rewritten in place (quantize_for_build hands over its own copy)."""
    fused = 0
    for node in op_nodes(graph, *BATCHED):
        fused += _fuse_grouped(graph, node)
    for node in op_nodes(graph, *GEMMS):
        operands = _operands(node)
        if operands is None:
            continue
        x_arg, w_arg, bias, act = operands
        activation = _activation(x_arg)
        weight = _weight(graph, w_arg)
        if activation is None or weight is None:
            continue
        producer, chain, scale, fmt_name = activation
        w_q, w_scale, name = weight
        out = node.meta["val"]
        dtype = producer.meta["val"].dtype
        if (
            format_of(w_q.dtype).name != fmt_name
            or out.dtype != dtype
            or out.dim() != 2
            or w_q.shape[0] != out.shape[1]
            or (bias is not None and (tuple(bias.meta["val"].shape) != (out.shape[1],)
                                      or bias.meta["val"].dtype != dtype))  # a broadcast [1] bias stays unfused
            or x_arg.meta["val"].dtype != dtype
            or w_arg.meta["val"].dtype != dtype
        ):
            continue
        g = graph.module.graph
        x = _replay(graph, producer, chain, node)
        w_node = add_weight(graph, f"{name}_nk", w_q, node, dtype=w_q.dtype)
        s_node = add_weight(graph, f"{name}_nk_scale", w_scale, node, dtype=torch.float32)
        with g.inserting_before(node):
            new = g.call_function(kiln_ops.qlinear.default, (x, scale, w_node, s_node, bias, act))
        copy_origin(new, node)
        new.meta["quant"] = {"role": "gemm", "site": node.meta.get("quant", {}).get("site", node.name)}
        infer_meta(new)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        fused += 1
    return (finish(graph), fused) if fused else (graph, 0)


def _fuse_grouped(graph: CapturedGraph, node: fx.Node) -> bool:
    """bmm / baddbmm(bias [G, 1, N], expand(Q/DQ(x) [M, K]), DQ(W) [G, K, N]) → qlinear_grouped."""
    if node.target == aten.baddbmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return False
        bias, x_arg, w_arg = node.args[:3]
    else:
        (x_arg, w_arg), bias = node.args[:2], None
    if not isinstance(x_arg, fx.Node) or not isinstance(w_arg, fx.Node):
        return False
    activation = _activation(x_arg)
    weight = _weight(graph, w_arg, batched=True)
    if activation is None or weight is None:
        return False
    producer, chain, scale, fmt_name = activation
    w_q, w_scale, name = weight
    groups, n = w_q.shape[:2]
    out = node.meta["val"]
    dtype = producer.meta["val"].dtype
    # the input is one [M, K] tensor expanded over the groups: the chain ends in that expand
    if not chain or chain[-1].target != aten.expand.default or chain[-1].args[0].meta["val"].dim() != 2:
        return False
    if format_of(w_q.dtype).name != fmt_name or out.dtype != dtype or tuple(out.shape[::2]) != (groups, n):
        return False
    bias_value = None
    if bias is not None:
        if not isinstance(bias, fx.Node) or bias.op != "get_attr" or tuple(bias.meta["val"].shape) != (groups, 1, n):
            return False
        bias_value = getattr(graph.module, bias.target)
        if bias_value.dtype != dtype:
            return False
    g = graph.module.graph
    x = _replay(graph, producer, chain[:-1], node)
    w_node = add_weight(graph, f"{name}_gnk", w_q, node, dtype=w_q.dtype)
    s_node = add_weight(graph, f"{name}_gnk_scale", w_scale.expand(groups, n).contiguous(), node, dtype=torch.float32)
    b_node = None if bias_value is None else add_weight(graph, f"{bias.target}_gn", bias_value.reshape(groups, n),
                                                        node, dtype=dtype)
    with g.inserting_before(node):
        new = g.call_function(kiln_ops.qlinear_grouped.default, (x, scale, w_node, s_node, b_node, "none"))
    copy_origin(new, node)
    new.meta["quant"] = {"role": "gemm", "site": node.name}
    infer_meta(new)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return True


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, str] | None:
    """(activation operand, [K, N] weight operand, bias, activation name) of a GEMM node."""
    if node.target == kiln_ops.linear_act.default:
        x, w_t, bias, act = node.args
    elif node.target == aten.mm.default:
        (x, w_t), bias, act = node.args, None, "none"
    else:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        (bias, x, w_t), act = node.args[:3], "none"
    if not all(isinstance(a, fx.Node) for a in (x, w_t)) or not (bias is None or isinstance(bias, fx.Node)):
        return None
    return x, w_t, bias, act


def _activation(arg: fx.Node) -> tuple[fx.Node, list[fx.Node], float, str] | None:
    """(unquantized tensor, views from it to `arg`, scale, format) where `arg` is a per-tensor
    Q/DQ of a tensor seen through layout views."""
    dq, chain = _trace(arg, LAYOUT_OPS)
    if dq.op != "call_function" or dq.target != kiln_ops.dequantize_per_tensor.default:
        return None
    q = dq.args[0]
    if not isinstance(q, fx.Node) or q.target != kiln_ops.quantize_per_tensor.default:
        return None
    producer, scale, fmt_name = q.args
    if dq.args[1] != scale or not isinstance(producer, fx.Node) or dq.args[2] != producer.meta["val"].dtype:
        return None
    return producer, chain, float(scale), str(fmt_name)


def _weight(
    graph: CapturedGraph, arg: fx.Node, batched: bool = False
) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(the 8-bit weight as [N, K] contiguous, its [N] fp32 scales, its name) where `arg` is a
    dequantized 8-bit constant seen through layout views as the GEMM's [K, N] operand; with
    `batched`, [G, N, K] from a [G, K, N] operand (the scales still [N], or [G, N])."""
    dq, chain = _trace(arg, LAYOUT_OPS)
    if dq.op != "call_function" or dq.target not in (
        kiln_ops.dequantize_per_channel.default,
        kiln_ops.dequantize_per_tensor.default,
    ):
        return None
    q_node = dq.args[0]
    if not isinstance(q_node, fx.Node) or q_node.op != "get_attr":
        return None
    q = getattr(graph.module, q_node.target)
    try:
        format_of(q.dtype)
    except ValueError:
        return None
    operand = q
    for view in chain:
        if any(isinstance(a, fx.Node) for a in fx.node.map_aggregate((view.args[1:], view.kwargs), lambda a: a)):
            return None
        operand = view.target(operand, *view.args[1:], **view.kwargs)
    if operand.dim() != (3 if batched else 2):
        return None
    n = operand.shape[-1]
    if dq.target == kiln_ops.dequantize_per_channel.default:
        s_node, axis = dq.args[1], dq.args[2]
        if not isinstance(s_node, fx.Node) or s_node.op != "get_attr":
            return None
        if stored_axis(tuple(q.shape), chain, -1) != axis % q.dim():
            return None  # the scales do not run along the GEMM's output channels
        scales = getattr(graph.module, s_node.target).float()
    else:
        scales = torch.full((n,), float(dq.args[1]), dtype=torch.float32, device=q.device)
    if scales.shape != (n,):
        return None
    return operand.transpose(-1, -2).contiguous(), scales.contiguous(), str(q_node.target)
