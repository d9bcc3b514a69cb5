"""Checking an engine file's plan before anything runs: kiln's closed vocabulary.

An engine file is data. Loading one must never read or write a file, touch another device,
draw random numbers or write into its weights or the caller's inputs, whatever the file says.
`validate_header` checks the whole header against the rules below *before* any kernel is
made, any tensor is allocated from a size the header gives, or any step runs; a violation is
an EngineFileError naming the step (index and name) and the rule. The rules:

- **Ops**: every step's op is in `ALLOWED_OPS`, a hand-reviewed table of side-effect-free
  compute ops (below); every argument matches the op's schema (count, names, types: tensors
  only by reference to a slot or a weight, constants only of the kinds kiln.specs encodes,
  never a Generator); per-op constraints hold (no dropout, a valid pointwise program ...).
- **Kernels**: every step's kernel is registered and declares that it implements the op; a
  planned out-variant is the `.out` overload of that very op whose arguments match it.
- **References**: every slot and weight a step reads exists and, for slots, was written by an
  earlier step (or is an input); every slot is written by at most one step; `last_use` never
  frees a slot before its last reader; output references point at written slots.
- **Memory**: every size is bounded (`MAX_TENSOR_BYTES` per tensor, `MAX_ARENA_BYTES` for the
  arena, `MAX_RANK`, `MAX_DIM`); a planned slot's dtype/shape/strides fit in its `nbytes`,
  which lies inside the arena at an offset aligned for its dtype; a concatenation's slices
  tile its buffer exactly; the arena is no larger than its slots need (plus alignment).
- **Shapes**: every step's op is run once on the *meta* device (shapes and dtypes only, no
  data, no memory) with its declared inputs, and must give the shapes and dtypes the plan
  declares for the outputs that are read. So no step can later allocate more than its
  declared, bounded, outputs.
- **Structure**: inputs, graph inputs, outputs, output references and the output structure
  agree (kiln.specs.validate_structure).
- **Descriptive fields** (names, source lines, module paths, timings) are bounded in size and
  hold no terminal control characters; the runtime never interprets them.

The JSON nesting depth of the whole header is bounded (`MAX_JSON_DEPTH`) before anything
walks it recursively. See docs/engine-format.md for what these rules guarantee and what they
do not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kiln import specs
from kiln.errors import EngineFileError
from kiln.kernels import KERNELS, resolve_op

__all__ = [
    "ALLOWED_OPS",
    "MAX_ARENA_BYTES",
    "MAX_TENSOR_BYTES",
    "WeightSpec",
    "check_json_depth",
    "check_weight_indices",
    "out_variant_matches",
    "validate_header",
]

GiB = 1 << 30
MAX_TENSOR_BYTES = 64 * GiB  # any one weight, input, output or intermediate
MAX_ARENA_BYTES = 64 * GiB  # the memory plan's arena
MAX_RANK = 32
MAX_DIM = 1 << 40
MAX_STEPS = 1 << 20
MAX_SLOTS = 1 << 21
MAX_NAME_CHARS = 1024  # step names, tensor names, kernel names
MAX_TEXT_CHARS = 1 << 16  # source lines, module paths and other descriptive text
MAX_STRING_ARG_CHARS = 1 << 20  # a string argument (a pointwise program, a TensorRT region spec)
MAX_JSON_DEPTH = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

WeightSpec = tuple[torch.dtype, tuple[int, ...]]  # a weight's dtype and shape, from the file's tensor index

# -- the closed vocabulary ----------------------------------------------------------------------
#
# How this table was derived. A plan's ops come from (1) torch.export + run_decompositions with
# the default (core ATen) table: the ops tagged `core` in this torch, plus the view/layout ops
# export keeps and KEPT_OPS in kiln.capture.export (scaled_dot_product_attention; on CUDA its
# backend ops); (2) kiln's passes, which emit the kiln:: ops of kiln.ops and kiln.tensorrt.region
# and a few ATen ops (reshape, mm/addmm, mul/add, clone for channels-last); (3) the planner,
# which adds no op of its own. Starting from the core-tagged list, each op was reviewed by hand
# and kept only if it computes a fresh result (or a view) from its arguments and nothing else:
#   refused: file or device I/O (from_file, _copy_from, save/load-like ops, record_stream ...);
#            in-place or out= variants as a step's op (anything ending in `_`, every `.out`
#            overload, _native_batch_norm_legit, whose schema writes the running stats; its
#            .no_stats overload has none to write: instance norm and batch statistics);
#            random numbers (rand, randn, randperm, native_dropout, bernoulli ...);
#            uninitialized memory (empty.memory_format, empty_strided: a result could carry
#            whatever the allocator last held); backward ops (never in an inference graph);
#            printing, profiling, asserts and other debug ops.
# tests/test_engine_validate.py builds representative models (conv nets, transformers,
# torchvision/timm/transformers zoo models, a pointwise-fusion case, a grab bag of ops) and
# asserts every op their plans hold is listed here, and that every kiln:: op torch knows
# has been reviewed: a new op a pass emits fails that test until it is reviewed and added.
# `.out` overloads are never listed: a planned step's out-variant is accepted only as the
# `.out` overload of its own (listed) op with the same arguments (out_variant_matches).

_ALLOWED_TABLE: dict[str, str] = {
    "views, layout and copies (results alias or copy their input)": """
        aten.view.default aten._unsafe_view.default aten.reshape.default aten.alias.default
        aten.as_strided.default aten.expand.default aten.permute.default aten.t.default
        aten.transpose.int aten.squeeze.default aten.squeeze.dim aten.squeeze.dims
        aten.unsqueeze.default aten.select.int aten.slice.Tensor aten.diagonal.default
        aten.detach.default aten.split.Tensor aten.split_with_sizes.default aten.unbind.int
        aten.unfold.default aten.narrow.default aten.clone.default aten._to_copy.default
        aten.copy.default aten.lift_fresh_copy.default aten.flip.default aten.roll.default
        aten.repeat.default aten.cat.default aten.stack.default aten.constant_pad_nd.default
        aten.reflection_pad1d.default aten.reflection_pad2d.default aten.reflection_pad3d.default
        aten.replication_pad1d.default aten.replication_pad2d.default aten.replication_pad3d.default
        aten.pixel_shuffle.default aten.pixel_unshuffle.default aten.tril.default aten.triu.default
        aten.im2col.default aten.col2im.default
    """,
    "constants (filled, never uninitialized)": """
        aten.full.default aten.full_like.default aten.zeros.default aten.zeros_like.default
        aten.ones.default aten.ones_like.default aten.scalar_tensor.default aten.fill.Scalar
        aten.fill.Tensor aten.arange.default aten.arange.start aten.arange.start_step
    """,
    "elementwise arithmetic and comparison": """
        aten.add.Tensor aten.add.Scalar aten.sub.Tensor aten.sub.Scalar aten.rsub.Tensor
        aten.rsub.Scalar aten.mul.Tensor aten.mul.Scalar aten.div.Tensor aten.div.Scalar
        aten.div.Tensor_mode aten.div.Scalar_mode aten.floor_divide.default aten.remainder.Tensor
        aten.remainder.Scalar aten.fmod.Tensor aten.fmod.Scalar aten.pow.Tensor_Tensor
        aten.pow.Tensor_Scalar aten.pow.Scalar aten.neg.default aten.abs.default aten.sign.default
        aten.sgn.default aten.reciprocal.default aten.sqrt.default aten.rsqrt.default
        aten.exp.default aten.exp2.default aten.expm1.default aten.log.default aten.log2.default
        aten.log10.default aten.log1p.default aten.sin.default aten.cos.default aten.tan.default
        aten.asin.default aten.acos.default aten.atan.default aten.atan2.default
        aten.sinh.default aten.cosh.default aten.tanh.default aten.asinh.default
        aten.acosh.default aten.atanh.default aten.erf.default aten.erfc.default
        aten.erfinv.default aten.floor.default aten.ceil.default aten.round.default
        aten.round.decimals aten.trunc.default aten.frac.default aten.clamp.default
        aten.clamp.Tensor aten.clamp_min.default aten.clamp_max.default aten.maximum.default
        aten.minimum.default aten.where.self aten.lerp.Scalar aten.lerp.Tensor
        aten.addcmul.default aten.addcdiv.default aten.nan_to_num.default aten.isnan.default
        aten.isinf.default aten.isfinite.default aten.masked_fill.Scalar aten.masked_fill.Tensor
        aten.eq.Tensor aten.eq.Scalar aten.ne.Tensor aten.ne.Scalar aten.lt.Tensor aten.lt.Scalar
        aten.le.Tensor aten.le.Scalar aten.gt.Tensor aten.gt.Scalar aten.ge.Tensor aten.ge.Scalar
        aten.logical_and.default aten.logical_or.default aten.logical_xor.default
        aten.logical_not.default aten.bitwise_and.Tensor aten.bitwise_and.Scalar
        aten.bitwise_or.Tensor aten.bitwise_or.Scalar aten.bitwise_xor.Tensor
        aten.bitwise_xor.Scalar aten.bitwise_not.default
    """,
    "activations": """
        aten.relu.default aten.hardtanh.default aten.leaky_relu.default aten.elu.default
        aten.gelu.default aten.silu.default aten.mish.default aten.hardswish.default
        aten.hardsigmoid.default aten.sigmoid.default aten.softplus.default aten.glu.default
        aten.threshold.default aten.prelu.default aten._prelu_kernel.default
        aten.logit.default
    """,
    "reductions and normalization": """
        aten.sum.default aten.sum.dim_IntList aten.mean.default aten.mean.dim aten.prod.default
        aten.prod.dim_int aten.amax.default aten.amin.default aten.max.default aten.max.dim
        aten.min.default aten.min.dim aten.argmax.default aten.argmin.default aten.any.default
        aten.any.dim aten.any.dims aten.all.default aten.all.dim aten.all.dims aten.var.dim
        aten.var.correction aten.std.dim aten.std.correction aten.var_mean.correction
        aten.cumsum.default aten.cumprod.default aten.logsumexp.default
        aten.linalg_vector_norm.default aten._softmax.default aten._log_softmax.default
        aten.native_layer_norm.default aten.native_group_norm.default
        aten._native_batch_norm_legit_no_training.default
        aten._native_batch_norm_legit.no_stats
    """,
    "matrix products, convolution, pooling, resampling": """
        aten.mm.default aten.addmm.default aten.bmm.default aten.baddbmm.default
        aten.convolution.default aten._adaptive_avg_pool2d.default
        aten._adaptive_avg_pool3d.default aten.avg_pool1d.default aten.avg_pool2d.default
        aten.avg_pool3d.default aten.max_pool2d_with_indices.default
        aten.max_pool3d_with_indices.default aten.adaptive_max_pool2d.default
        aten.upsample_nearest1d.vec aten.upsample_nearest1d.default aten.upsample_nearest2d.vec
        aten.upsample_nearest2d.default aten.upsample_nearest3d.vec aten.upsample_nearest3d.default
        aten._upsample_nearest_exact2d.vec aten._upsample_nearest_exact2d.default
        aten.upsample_linear1d.vec aten.upsample_linear1d.default aten.upsample_bilinear2d.vec
        aten.upsample_bilinear2d.default aten.upsample_bicubic2d.vec aten.upsample_bicubic2d.default
        aten.grid_sampler_2d.default aten._cdist_forward.default aten._pdist_forward.default
        aten._fft_r2c.default aten._fft_c2r.default aten._fft_c2c.default
    """,
    "indexing, gathering, sorting (indices are bounds-checked by ATen)": """
        aten.embedding.default aten._embedding_bag.default aten.index.Tensor
        aten.index_select.default aten.gather.default aten.scatter.src aten.scatter.value
        aten.scatter_add.default aten.scatter_reduce.two aten.index_put.default
        aten.index_add.default aten.masked_scatter.default aten.select_scatter.default
        aten.slice_scatter.default aten.diagonal_scatter.default aten.sort.default
        aten.sort.stable aten.topk.default
    """,
    "attention (dropout_p must be 0: no random numbers)": """
        aten.scaled_dot_product_attention.default aten._scaled_dot_product_flash_attention.default
        aten._scaled_dot_product_efficient_attention.default
        aten._scaled_dot_product_cudnn_attention.default
        aten._scaled_dot_product_flash_attention_for_cpu.default
    """,
    "data-dependent and symbolic scalars (read only)": """
        aten._local_scalar_dense.default aten.nonzero.default aten.sym_size.int
        aten.sym_stride.int aten.sym_numel.default aten.sym_storage_offset.default
    """,
    "kiln's own ops (torch.library, mutates_args=(), reference implementations in kiln.ops)": """
        kiln.conv_bias_act.default kiln.linear_act.default kiln.add_layer_norm.default
        kiln.pointwise.default kiln.rowwise.default kiln.tensorrt_region.default
        kiln.quantize_per_tensor.default kiln.dequantize_per_tensor.default
        kiln.quantize_per_channel.default kiln.dequantize_per_channel.default kiln.qlinear.default
        kiln.qlinear_grouped.default
    """,
}

ALLOWED_OPS: frozenset[str] = frozenset(name for names in _ALLOWED_TABLE.values() for name in names.split())

# kiln:: ops that exist but a plan may not hold (reviewed, not allowed); none so far.
REVIEWED_NOT_ALLOWED: frozenset[str] = frozenset()

# Kernels the planner substitutes (never selection candidates), and the ops they stand for.
PLANNER_KERNELS: dict[str, frozenset[str]] = {"planner.concat_in_place": frozenset({"aten.cat.default"})}
CONCAT_KERNEL = "planner.concat_in_place"

# The runtime runs these view ops as reshape (kiln.kernels.aten.RESHAPING_VIEWS).
_RESHAPING_VIEWS = frozenset({"aten.view.default", "aten._unsafe_view.default"})
# Ops whose result shape depends on data: not checked on the meta device.
_DATA_DEPENDENT = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default"})
_ATTENTION = frozenset(n for n in ALLOWED_OPS if "scaled_dot_product" in n)


Shapes = dict[str, "tuple[int, ...] | None"]  # an argument's declared shape, where it is one tensor


def _check_no_dropout(args: dict[str, Any], shapes: Shapes) -> str | None:
    p = args.get("dropout_p", 0.0)
    if p in (0, 0.0, None):
        return None
    return f"dropout_p must be 0 in an engine (dropout draws random numbers), got {p!r}"


def _check_activation(args: dict[str, Any], shapes: Shapes) -> str | None:
    act = args.get("act")
    if act not in _activations():
        return f"unknown activation {act!r}; known: {', '.join(sorted(_activations()))}"
    return None


# An 8-bit activation scale: a normal, finite, positive fp32 number (what kiln.ops.quant.QuantFormat.scale
# writes). Zero, negative, NaN, infinite or denormal scales make x / scale meaningless or overflow.
_MIN_X_SCALE = torch.finfo(torch.float32).tiny
_MAX_X_SCALE = torch.finfo(torch.float32).max


def _check_qlinear(args: dict[str, Any], shapes: Shapes) -> str | None:
    """kiln::qlinear / qlinear_grouped: x_scale is a normal positive fp32 number, act is known."""
    scale = args.get("x_scale")
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if ok:
        try:
            ok = _MIN_X_SCALE <= float(scale) <= _MAX_X_SCALE  # False for NaN
        except OverflowError:  # an int beyond any float
            ok = False
    if not ok:
        return (f"x_scale must be a finite number between {_MIN_X_SCALE} and {_MAX_X_SCALE} (a normal positive fp32 "
                f"value), got {_brief(scale)}")
    return _check_activation(args, shapes)


def _check_conv(args: dict[str, Any], shapes: Shapes) -> str | None:
    """What convolution's kernels check and its meta function does not: list lengths and signs."""
    x = shapes.get("input", shapes.get("x"))
    spatial = len(x) - 2 if x is not None else None
    limits = {"stride": 1, "dilation": 1, "padding": 0, "output_padding": 0}
    for name, lowest in limits.items():
        if name not in args:
            continue
        value = args[name]
        values = [value] if _is_int(value) else value if isinstance(value, list) else None
        if values is None or not all(_is_int(v) and v >= lowest for v in values):
            return f"convolution {name} must be integers >= {lowest}, got {_brief(value)}"
        if spatial is not None and len(values) not in (1, spatial):
            return f"convolution {name} {values} does not match the input's {spatial} spatial dims"
    groups = args.get("groups", 1)
    if not _is_int(groups) or groups < 1:
        return f"convolution groups must be a positive integer, got {_brief(groups)}"
    return _check_activation(args, shapes) if "act" in args else None


def _check_program(kind: str) -> Callable[[dict[str, Any], Shapes], str | None]:
    """The rule for a kiln::pointwise or kiln::rowwise step: its program parses."""

    def check(args: dict[str, Any], shapes: Shapes) -> str | None:
        from kiln.ops import pointwise

        parse = pointwise.parse_program if kind == "pointwise" else pointwise.parse_row_program
        try:
            parse(args.get("program"))
        except Exception as exc:  # PointwiseProgramError, or anything a malformed program provokes
            return f"invalid {kind} program: {_first_line(exc)}"
        return None

    return check


def _check_region(args: dict[str, Any], shapes: Shapes) -> str | None:
    try:
        _region_module().parse_spec(args.get("spec"))
    except Exception as exc:  # RegionRuntimeError
        return f"invalid TensorRT region spec: {_first_line(exc)}"
    return None


# Constant-argument rules per op, given its arguments by schema name (JSON as in the file) and
# the declared shapes of its tensor arguments; each returns what is wrong, or None.
OP_RULES: dict[str, Callable[[dict[str, Any], Shapes], str | None]] = {
    **{name: _check_no_dropout for name in _ATTENTION},
    "aten.convolution.default": _check_conv,
    "kiln.conv_bias_act.default": _check_conv,
    "kiln.linear_act.default": _check_activation,
    "kiln.qlinear.default": _check_qlinear,
    "kiln.qlinear_grouped.default": _check_qlinear,
    "kiln.pointwise.default": _check_program("pointwise"),
    "kiln.rowwise.default": _check_program("rowwise"),
    "kiln.tensorrt_region.default": _check_region,
}

# Index tensors that are weights are checked against the size they index, once the weights are
# read (check_weight_indices): op → (index argument, indexed argument, dim argument or fixed
# dim, whether negative indices count from the end).
INDEX_ARGUMENTS: dict[str, tuple[str, str, str | int, bool]] = {
    "aten.embedding.default": ("indices", "weight", 0, False),
    "aten.index_select.default": ("index", "self", "dim", False),
    "aten.gather.default": ("index", "self", "dim", False),
    "aten.scatter.src": ("index", "self", "dim", False),
    "aten.scatter.value": ("index", "self", "dim", False),
    "aten.scatter_add.default": ("index", "self", "dim", False),
    "aten.scatter_reduce.two": ("index", "self", "dim", False),
    "aten.index_add.default": ("index", "self", "dim", False),
}
# Kernels whose `supports` describes the machine (is a runtime installed?) rather than the call:
# where it says no, the step itself explains at run time (RegionRuntimeError).
_ENVIRONMENT_KERNELS = frozenset({"tensorrt"})
# Arguments naming a dimension of the op's first tensor (unsqueeze/stack may name one past it).
_DIM_ARGUMENTS = ("dim", "dims", "dim0", "dim1")


def _region_module() -> Any:
    """The module defining kiln::tensorrt_region (imported by kiln.kernels.tensorrt)."""
    import sys

    from kiln.kernels import tensorrt  # noqa: F401  (imports the region module)

    for name in ("kiln.tensorrt.runtime.region", "kiln.tensorrt.region"):
        if name in sys.modules:
            return sys.modules[name]
    raise ImportError("the kiln::tensorrt_region op's module is not loaded")


def _activations() -> Iterable[str]:
    try:
        from kiln.ops.vocabulary import ACTIVATIONS
    except ImportError:
        from kiln.ops.fused import ACTIVATIONS
    return ACTIVATIONS


# -- entry point --------------------------------------------------------------------------------


class _Invalid(Exception):
    """One broken rule; turned into an EngineFileError naming the file (and step)."""


def validate_header(
    header: Any, weights: dict[str, WeightSpec], where: str = "the engine file", saving: bool = False
) -> None:
    """Check an engine header (parsed JSON) against the rules of this module, given the file's
    weights' dtypes and shapes; raise EngineFileError naming `where`, the step and the rule.
    With `saving`, the header is one kiln built and is about to write (Engine.save)."""
    try:
        check_json_depth(header)
        plan = header.get("plan") if isinstance(header, dict) else None
        if isinstance(plan, dict) and "dims" in plan:  # dynamic shapes: the plan at min, opt and max
            for fixed in _specialized_plans(plan):
                _Validator({**header, "plan": fixed}, weights).run()
        else:
            _Validator(header, weights).run()
    except _Invalid as exc:
        if saving:
            raise EngineFileError(
                f"kiln will not write {where}: its plan breaks a rule every load enforces ({exc}). "
                "kiln built this plan itself, so this is a kiln bug: please report it with the model."
            ) from None
        raise EngineFileError(
            f"{where} is not a valid kiln engine: {exc}. The file is damaged, was written by an "
            "incompatible kiln, or was crafted; rebuild it with `kiln build`."
        ) from None


def _specialized_plans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A dynamic-shape plan's dims and expressions checked (kiln.shapes), then the plan as the
    static plans it is at all-min, all-opt and all-max (at max also with every fallback kernel),
    for the checks of a static plan. The runtime checks each binding's slots against the arena."""
    from kiln.kernels import get_kernel
    from kiln.shapes import Buckets, ShapeExprError, as_static_plan, check_bindable, dims_from_json, validate_plan

    try:
        dims = dims_from_json(plan["dims"])
        validate_plan(plan, dims)
        check_bindable(_input_shapes(plan), dims)
        paddable = plan.get("paddable", [])
        if not isinstance(paddable, list) or not all(isinstance(p, str) and p in dims for p in paddable):
            raise ValueError(f"paddable must list dims of this plan, got {str(paddable)[:80]}")
        buckets = plan.get("buckets", {})
        if not isinstance(buckets, dict) or not all(k in paddable for k in buckets):
            raise ValueError("buckets may only name paddable dims")
        for name, sizes in buckets.items():
            Buckets(dims[name], sizes)
        points = [{n: getattr(d, k) for n, d in dims.items()} for k in ("min", "opt", "max")]
        plans = [as_static_plan(plan, b, fallbacks=False, tight=b is not points[-1]) for b in points]
        writes = {}
        for step in plan.get("steps", []):
            name = step.get("fallback") if isinstance(step, dict) else None
            if isinstance(name, str):
                writes[name] = get_kernel(name).writes_planned_outputs
        plans.append(as_static_plan(plan, points[-1], fallbacks=writes))
        return plans
    except (ShapeExprError, KeyError, TypeError, ValueError) as exc:
        raise _Invalid(f"plan (dynamic shapes): {_first_line(exc)}") from None


def _input_shapes(plan: dict[str, Any]) -> list[Any]:
    from kiln.shapes import InputShape

    inputs = plan.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(s, dict) and isinstance(s.get("shape"), list)
                                               for s in inputs):
        raise TypeError("inputs must be a list of objects with a shape")
    return [InputShape(str(s.get("name")), tuple(s["shape"])) for s in inputs]


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (iteratively: any depth is safe to check)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise _Invalid(f"the header nests deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def out_variant_matches(op: str, out_op: str, out_args: list[str]) -> str | None:
    """None if `out_op` is the `.out` overload of `op` (same packet, the same arguments plus
    out tensors named `out_args` in order, one per result); else why not."""
    functional = resolve_op(op)._schema
    try:
        candidate = resolve_op(out_op)
    except ValueError as exc:
        return str(exc)
    schema = candidate._schema
    if out_op.rsplit(".", 1)[0] != op.rsplit(".", 1)[0]:
        return f"{out_op} is not an overload of {op.rsplit('.', 1)[0]}"
    outs = [a for a in schema.arguments if a.is_out]
    rest = [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]
    wanted = [(a.name, str(a.type)) for a in functional.arguments]
    if not outs or rest != wanted or len(outs) != len(functional.returns):
        return f"{out_op} is not the out= overload of {op} (its arguments differ)"
    if [a.name for a in outs] != list(out_args):
        return f"out_args {out_args!r} are not {out_op}'s out arguments {[a.name for a in outs]!r}"
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments if not a.is_out):
        return f"{out_op} writes into an argument other than its outputs"
    return None


# -- the checks ------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # tab, LF and CR are fine
_SLOT_KINDS = ("input", "buffer", "view", "heap", "slice")
_SLOT_FIELDS = {  # the fields each kind of slot has (kiln.plan.planner)
    "input": {"kind", "shape", "stride", "dtype"},
    "view": {"kind", "shape", "stride", "dtype"},
    "heap": {"kind", "shape", "stride", "dtype"},
    "buffer": {"kind", "shape", "stride", "dtype", "offset", "nbytes"},
    "slice": {"kind", "shape", "stride", "dtype", "offset", "nbytes", "base", "base_offset"},
}
_VALUE_KINDS = ("slot", "weight", "tuple", "float", "dtype", "device", "memory_format", "layout")
_SPECIAL_FLOATS = ("inf", "-inf", "nan")
_DEVICE_TYPES = ("cpu", "cuda")
_STEP_FIELDS = {  # field → required; other fields are descriptive (see _check_descriptive)
    "name": True, "op": True, "kernel": True, "args": True, "kwargs": True, "outputs": True, "multi": True,
    "out_variant": False, "writes_into": False, "stream": False, "fork": False, "join": False,
}
_DESCRIPTIVE_LIMIT = MAX_TEXT_CHARS  # per descriptive step field
_BUILD_INFO_LIMIT = 1 << 24  # per build info field (a TensorRT partition report can be long)


def _number_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


# The shapes of the descriptive step fields kiln writes (tools such as `kiln inspect` read them).
_DESCRIPTIVE_TYPES: dict[str, Callable[[Any], bool]] = {
    "source": lambda v: v is None or isinstance(v, str),
    "module": lambda v: v is None or isinstance(v, str),
    "candidates": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "timings_ms": lambda v: isinstance(v, dict) and all(_number_or_none(x) for x in v.values()),
    "concat_copy_ms": _number_or_none,
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Validator:
    def __init__(self, header: Any, weights: dict[str, WeightSpec]):
        self.header = header
        self.weights = weights
        self.where = "header"

    def fail(self, message: str) -> None:
        raise _Invalid(f"{self.where}: {message}" if self.where else message)

    # -- small type checks ------------------------------------------------------------------

    def obj(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{what} must be an object, got {type(value).__name__}")
        return value

    def lst(self, value: Any, what: str, limit: int) -> list[Any]:
        if not isinstance(value, list):
            self.fail(f"{what} must be a list, got {type(value).__name__}")
        if len(value) > limit:
            self.fail(f"{what} has {len(value)} entries, more than the limit {limit}")
        return value

    def integer(self, value: Any, what: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            self.fail(f"{what} must be an integer in [{lo}, {hi}], got {_brief(value)}")
        return value

    def text(self, value: Any, what: str, limit: int = MAX_NAME_CHARS, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > limit:
            self.fail(f"{what} must be a string of at most {limit} characters, got {_brief(value)}")
        if _CONTROL.search(value):
            self.fail(f"{what} holds control characters")
        return value

    def dtype(self, value: Any, what: str) -> torch.dtype:
        if not isinstance(value, str) or value not in specs.DTYPES:
            self.fail(f"{what} must be one of the dtypes {', '.join(specs.DTYPES)}, got {_brief(value)}")
        return specs.DTYPES[value]

    def shape(self, value: Any, what: str, lo: int = 0) -> tuple[int, ...]:
        dims = self.lst(value, what, MAX_RANK)
        return tuple(self.integer(d, f"{what}[{i}]", lo, MAX_DIM) for i, d in enumerate(dims))

    def sized(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> int:
        nbytes = _numel(shape) * dtype.itemsize
        if nbytes > MAX_TENSOR_BYTES:
            self.fail(f"{what} would take {nbytes} bytes, more than the limit {MAX_TENSOR_BYTES}")
        return nbytes

    def tensor_spec(self, value: Any, what: str) -> tuple[tuple[int, ...], torch.dtype]:
        spec = self.obj(value, what)
        if set(spec) != {"name", "shape", "dtype"}:
            self.fail(f"{what} must have exactly the fields name, shape, dtype")
        self.text(spec["name"], f"{what}.name")
        shape = self.shape(spec["shape"], f"{what}.shape")
        dtype = self.dtype(spec["dtype"], f"{what}.dtype")
        self.sized(shape, dtype, what)
        return shape, dtype

    # -- the header ---------------------------------------------------------------------------

    def run(self) -> None:
        header = self.obj(self.header, "the header")
        for key in ("plan", "build"):
            if key not in header:
                self.fail(f"the header has no {key!r}; it was not written by kiln")
        self.check_build(self.obj(header["build"], "build"))
        plan = self.obj(header["plan"], "plan")
        for key in ("inputs", "graph_inputs", "outputs", "output_refs", "structure", "slots", "steps",
                    "last_use", "memory"):
            if key not in plan:
                self.fail(f"the plan has no {key!r}")
        self.plan = plan
        self.check_io()
        self.check_slots()
        self.check_memory()
        self.check_steps()
        self.where = "plan"
        self.check_outputs()
        self.check_last_use()
        self.check_shapes_on_meta()

    def check_build(self, build: dict[str, Any]) -> None:
        self.where = "build"
        device = build.get("device_type")
        if device not in _DEVICE_TYPES:
            self.fail(f"device_type must be one of {', '.join(_DEVICE_TYPES)}, got {_brief(device)}")
        for key in ("device_name", "precision", "kiln_version", "torch_version"):
            self.text(build.get(key), key)
        self.text(build.get("model", "?"), "model", MAX_TEXT_CHARS)
        cc = build.get("compute_capability")
        if cc is not None:
            cc = self.lst(cc, "compute_capability", 2)
            if len(cc) != 2:
                self.fail("compute_capability must be [major, minor]")
            for i, v in enumerate(cc):
                self.integer(v, f"compute_capability[{i}]", 0, 1000)
        self.device_type = device
        checked = {"device_type", "device_name", "precision", "kiln_version", "torch_version", "model",
                   "compute_capability"}
        for key, value in build.items():
            if key not in checked:
                self.text(key, "a build info key")
                self.check_descriptive(value, key, _BUILD_INFO_LIMIT)

    def check_io(self) -> None:
        self.where = "plan"
        plan = self.plan
        inputs = self.lst(plan["inputs"], "inputs", 4096)
        graph_inputs = self.lst(plan["graph_inputs"], "graph_inputs", 4096)
        if len(inputs) != len(graph_inputs):
            self.fail(f"{len(inputs)} inputs but {len(graph_inputs)} graph inputs")
        self.graph_inputs = []
        for i, (a, b) in enumerate(zip(inputs, graph_inputs)):
            shape, dtype = self.tensor_spec(a, f"inputs[{i}]")
            gshape, gdtype = self.tensor_spec(b, f"graph_inputs[{i}]")
            if shape != gshape:
                self.fail(f"inputs[{i}] has shape {list(shape)} but its graph input {list(gshape)}")
            if dtype != gdtype and not (dtype.is_floating_point and gdtype.is_floating_point):
                self.fail(f"inputs[{i}] is {dtype} but its graph input {gdtype} (only float precision may change)")
            self.graph_inputs.append((gshape, gdtype))
        outputs = self.lst(plan["outputs"], "outputs", 1 << 16)
        self.outputs = [None if o is None else self.tensor_spec(o, f"outputs[{i}]") for i, o in enumerate(outputs)]

    def check_slots(self) -> None:
        self.where = "plan"
        slots = self.lst(self.plan["slots"], "slots", MAX_SLOTS)
        self.slots: list[dict[str, Any]] = []
        self.gapped: set[int] = set()  # heap slots whose layout leaves gaps
        n_inputs = len(self.graph_inputs)
        if len(slots) < n_inputs:
            self.fail(f"{len(slots)} slots cannot hold the {n_inputs} graph inputs")
        for i, raw in enumerate(slots):
            self.where = f"slot {i}"
            slot = self.obj(raw, "a slot")
            kind = slot.get("kind")
            if kind not in _SLOT_KINDS:
                self.fail(f"kind must be one of {', '.join(_SLOT_KINDS)}, got {_brief(kind)}")
            extra = set(slot) - _SLOT_FIELDS[kind]
            if extra:
                self.fail(f"a {kind} slot has no field(s) {', '.join(sorted(map(str, extra)))}")
            shape = self.shape(slot.get("shape"), "shape")
            stride = self.shape(slot.get("stride"), "stride")
            if len(stride) != len(shape):
                self.fail(f"shape {list(shape)} and stride {list(stride)} differ in rank")
            dtype = self.dtype(slot.get("dtype"), "dtype")
            nbytes = self.sized(shape, dtype, "the slot")
            if (kind == "input") != (i < n_inputs):
                self.fail("the first slots, and only they, are the graph inputs (kind 'input')"
                          if kind == "input" else f"slot {i} must be graph input {i} (kind 'input')")
            if kind == "input" and (shape, dtype) != self.graph_inputs[i]:
                self.fail(f"slot {i} ({list(shape)}, {dtype}) is not graph input {i} {self.graph_inputs[i]}")
            span = _span(shape, stride) * dtype.itemsize
            if kind in ("input", "buffer") and span != nbytes:
                self.fail(f"a {kind} slot is dense, but shape {list(shape)} with stride {list(stride)} overlaps "
                          "itself or leaves gaps")
            # A kernel that allocates its own result picks its layout, gaps included (slice_scatter
            # keeps its input's strides, which a slice of a wider tensor leaves with gaps): such a
            # layout must be the op's own, checked on the meta device (check_shapes_on_meta).
            if kind == "heap" and span != nbytes:
                if _overlaps(shape, stride) or span > MAX_TENSOR_BYTES:
                    self.fail(f"a heap slot's shape {list(shape)} with stride {list(stride)} overlaps itself "
                              "or spans more than the limit")
                self.gapped.add(i)
            info = {"kind": kind, "shape": shape, "stride": stride, "dtype": dtype, "span": span, "bytes": nbytes}
            if kind in ("buffer", "slice"):
                info["offset"] = self.integer(slot.get("offset"), "offset", 0, MAX_ARENA_BYTES)
                info["nbytes"] = self.integer(slot.get("nbytes"), "nbytes", 0, MAX_ARENA_BYTES)
                if info["offset"] % dtype.itemsize or info["nbytes"] % dtype.itemsize:
                    self.fail(f"offset {info['offset']} / nbytes {info['nbytes']} not aligned for {dtype}")
                if span > info["nbytes"]:
                    self.fail(f"shape {list(shape)} with stride {list(stride)} spans {span} bytes, "
                              f"more than its nbytes {info['nbytes']}")
            if kind == "slice":
                info["base"] = self.integer(slot.get("base"), "base", 0, len(slots) - 1)
                info["base_offset"] = self.integer(slot.get("base_offset"), "base_offset", 0, MAX_ARENA_BYTES)
            self.slots.append(info)
        # A heap slot with gaps never reaches further than the tensor it was sliced from, itself
        # a slot or a weight of the plan.
        largest = max([s["bytes"] for s in self.slots]
                      + [_numel(shape) * dtype.itemsize for dtype, shape in self.weights.values()])
        for i, info in enumerate(self.slots):
            if info["kind"] == "heap" and info["span"] > largest:
                self.where = f"slot {i}"
                self.fail(f"a heap slot spans {info['span']} bytes, more than the largest tensor of the plan "
                          f"({largest} bytes)")
            if info["kind"] == "slice":
                self.where = f"slot {i}"
                base = self.slots[info["base"]]
                if base["kind"] != "buffer" or base["dtype"] != info["dtype"]:
                    self.fail(f"a slice's base (slot {info['base']}) must be a buffer of the same dtype")
                if info["offset"] != base["offset"] + info["base_offset"] * info["dtype"].itemsize:
                    self.fail(f"offset {info['offset']} is not its base's offset plus base_offset")
                if info["offset"] + info["nbytes"] > base["offset"] + base["nbytes"]:
                    self.fail(f"the slice reaches past the end of its base (slot {info['base']})")
                if info["stride"] != base["stride"] or len(info["shape"]) != len(base["shape"]):
                    self.fail(f"a slice has its base's rank and strides (slot {info['base']})")

    def check_memory(self) -> None:
        self.where = "plan.memory"
        memory = self.obj(self.plan["memory"], "memory")
        arena = self.integer(memory.get("arena_bytes"), "arena_bytes", 0, MAX_ARENA_BYTES)
        alignment = memory.get("alignment", 1)
        self.integer(alignment, "alignment", 1, 1 << 16)
        ends = [s["offset"] + s["nbytes"] for s in self.slots if s["kind"] in ("buffer", "slice")]
        needed = max(ends, default=0)
        if needed > arena:
            self.fail(f"slots reach byte {needed} of an arena of {arena} bytes")
        if arena > needed + alignment:
            self.fail(f"the arena of {arena} bytes is larger than its slots need ({needed} bytes)")
        for key, value in memory.items():
            if key != "buffers" and not (value is None or isinstance(value, (int, float))):
                self.fail(f"{key} must be a number")
        buffers = self.lst(memory.get("buffers", []), "buffers", MAX_SLOTS)
        for i, b in enumerate(buffers):
            b = self.obj(b, f"buffers[{i}]")
            for key, value in b.items():
                self.integer(value, f"buffers[{i}].{key}")

    # -- steps --------------------------------------------------------------------------------

    def check_steps(self) -> None:
        self.where = "plan"
        steps = self.lst(self.plan["steps"], "steps", MAX_STEPS)
        n_slots = len(self.slots)
        self.written: dict[int, int] = {}  # slot → step that writes it
        self.reads: dict[int, int] = {}  # slot → last step reading it
        self.step_ops: list[Any] = []
        for index, raw in enumerate(steps):
            self.where = f"step {index}"
            step = self.obj(raw, "a step")
            name = self.text(step.get("name"), "name")
            self.where = f"step {index} ({name})"
            for key, required in _STEP_FIELDS.items():
                if required and key not in step:
                    self.fail(f"has no {key!r}")
            for key, value in step.items():
                if key not in _STEP_FIELDS:
                    self.check_descriptive(value, key)
                    expected = _DESCRIPTIVE_TYPES.get(key)
                    if expected is not None and not expected(value):
                        self.fail(f"{key} is not what kiln writes there ({_brief(value)})")
            op_name = step["op"]
            if not isinstance(op_name, str) or op_name not in ALLOWED_OPS:
                self.fail(f"op {_brief(op_name)} is not in kiln's closed vocabulary of side-effect-free compute "
                          "ops (kiln.runtime.validate.ALLOWED_OPS)")
            try:
                op = resolve_op(op_name)
            except ValueError:
                self.fail(f"op {op_name} is not available in this torch ({torch.__version__})")
            schema = op._schema
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                self.fail(f"op {op_name} writes into one of its arguments")
            kernel = self.check_kernel(step, op_name)
            bound = self.check_arguments(step, schema, op_name, index)
            shapes = {k: self.ref_shape(v) for k, v in bound.items()}
            rule = OP_RULES.get(op_name)
            problem = rule(bound, shapes) if rule is not None else None
            if problem:
                self.fail(problem)
            self.check_dims(schema, bound, shapes, op_name)
            self.check_step_outputs(step, schema, op_name, kernel, index, n_slots)
            self.check_supports(step, kernel, op_name)
            self.step_ops.append((op, bound))
        self.steps = steps

    def ref_shape(self, value: Any) -> tuple[int, ...] | None:
        """The declared shape of a tensor reference (checked already), else None."""
        if isinstance(value, dict) and "slot" in value:
            return self.slots[value["slot"]]["shape"]
        if isinstance(value, dict) and "weight" in value:
            return self.weights[value["weight"]][1]
        return None

    def check_dims(self, schema: Any, bound: dict[str, Any], shapes: Shapes, op_name: str) -> None:
        """Dimension arguments lie within the rank of the op's first tensor (some meta functions
        do not check, the kernels do)."""
        first = next((shapes[a.name] for a in schema.arguments if shapes.get(a.name) is not None), None)
        if first is None:
            return
        rank = max(len(first), 1)
        for name in _DIM_ARGUMENTS:
            value = bound.get(name)
            values = [value] if _is_int(value) else value if isinstance(value, list) else []
            for v in values:
                if _is_int(v) and not -(rank + 1) <= v <= rank:
                    self.fail(f"{op_name} argument {name}={v} is outside the {len(first)} dims of its input")

    def check_supports(self, step: dict[str, Any], kernel: Any, op_name: str) -> None:
        """The kernel accepts this call, as selection asked when it was built: a kernel with
        preconditions (a Triton or cuBLASLt kernel computing addresses from shapes) never runs
        outside them. Skipped where this machine cannot run the engine at all (load then says so)."""
        if step["kernel"] in PLANNER_KERNELS or kernel.name in _ENVIRONMENT_KERNELS:
            return
        if self.device_type == "cuda" and not _cuda_matches(self.header["build"].get("compute_capability")):
            return
        from kiln.kernels import OpCall

        def spec(value: Any) -> specs.TensorSpec | None:
            shape = self.ref_shape(value)
            if shape is None:
                return None
            dtype = self.slots[value["slot"]]["dtype"] if "slot" in value else self.weights[value["weight"]][0]
            return specs.TensorSpec("", shape, dtype)

        device = torch.device(self.device_type)
        constants = tuple(specs.decode_value(a, lambda r: None, device) for a in step["args"])
        outputs = tuple(specs.TensorSpec("", self.slots[o]["shape"], self.slots[o]["dtype"]) for o in step["outputs"])
        call = OpCall(op_name, tuple(spec(a) for a in step["args"]), outputs, self.device_type, constants)
        try:
            ok = kernel.supports(call)
        except Exception:  # a precondition check that cannot even read the call does not hold
            ok = False
        if not ok:
            self.fail(f"kernel {kernel.name} does not accept this call of {op_name} (its device, dtypes, shapes "
                      "or constants are outside what the kernel handles)")

    def check_descriptive(self, value: Any, key: str, limit: int = _DESCRIPTIVE_LIMIT) -> None:
        """A field the runtime never interprets: bounded, and its text free of control characters."""
        budget = [limit]

        def walk(v: Any) -> None:
            budget[0] -= 1
            if isinstance(v, str):
                budget[0] -= len(v)
                if _CONTROL.search(v):
                    self.fail(f"{key} holds control characters")
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for k, x in v.items():
                    walk(k)
                    walk(x)
            elif not (v is None or isinstance(v, (bool, int, float))):
                self.fail(f"{key} holds a {type(v).__name__}")
            if budget[0] < 0:
                self.fail(f"{key} is longer than {limit} characters")

        walk(value)

    def check_kernel(self, step: dict[str, Any], op_name: str) -> Any:
        kname = step["kernel"]
        if not isinstance(kname, str) or kname not in KERNELS:
            self.fail(f"kernel {_brief(kname)} is not in this kiln's kernel catalog")
        kernel = KERNELS[kname]
        if op_name not in PLANNER_KERNELS.get(kname, ()) and not kernel.implements(op_name):
            self.fail(f"kernel {kname} does not implement {op_name}")
        return kernel

    def check_arguments(self, step: dict[str, Any], schema: Any, op_name: str, index: int) -> dict[str, Any]:
        """Arguments against the op's schema; returns them by name (raw JSON)."""
        args = self.lst(step["args"], "args", 256)
        kwargs = self.obj(step["kwargs"], "kwargs")
        params = [a for a in schema.arguments if not a.is_out]
        positional = [a for a in params if not a.kwarg_only]
        if len(args) > len(positional):
            self.fail(f"{op_name} takes {len(positional)} positional arguments, the step gives {len(args)}")
        by_name = {a.name: a for a in params}
        bound: dict[str, Any] = {}
        for a, value in zip(positional, args):
            bound[a.name] = value
        for key, value in kwargs.items():
            if key not in by_name:
                self.fail(f"{op_name} has no argument {_brief(key)}")
            if key in bound:
                self.fail(f"argument {key} is given twice")
            bound[key] = value
        for a in params:
            if a.name in bound:
                self.value(bound[a.name], str(a.real_type), f"argument {a.name}", index)
            elif not a.has_default_value() and not str(a.real_type).startswith("Optional["):
                self.fail(f"{op_name} needs argument {a.name}, which the step lacks")
        return bound

    def value(self, value: Any, type_: str, what: str, index: int) -> None:
        """A JSON-encoded argument (kiln.specs.encode_value) of schema type `type_`."""
        if type_.startswith("Optional["):
            if value is None:
                return
            type_ = type_[len("Optional["):-1]
        if type_.startswith("List["):
            inner = type_[len("List["):-1]
            if inner in ("int", "SymInt") and _is_int(value):
                self.integer(value, what)  # int[N] arguments take one int for all N
                return
            items = value["tuple"] if isinstance(value, dict) and set(value) == {"tuple"} else value
            for i, item in enumerate(self.lst(items, what, 1 << 16)):
                self.value(item, inner, f"{what}[{i}]", index)
            return
        if type_ == "Tensor":
            if isinstance(value, (bool, int, float)) or (isinstance(value, dict) and set(value) == {"float"}):
                self.value(value, "number", what, index)  # a Python number where a tensor goes (x * 3)
            else:
                self.tensor_ref(value, what, index)
            return
        if isinstance(value, dict) and (set(value) & {"slot", "weight"}):
            self.fail(f"{what} is a tensor reference where the op takes {type_}")
        if type_ in ("int", "SymInt"):
            if isinstance(value, bool):
                return
            self.integer(value, what)
        elif type_ == "bool":
            if not isinstance(value, bool):
                self.fail(f"{what} must be a bool, got {_brief(value)}")
        elif type_ in ("float", "number"):
            if isinstance(value, dict):
                self.special_float(value, what)
            elif type_ == "number" and isinstance(value, bool):
                pass
            elif _is_int(value):
                self.integer(value, what)
            elif not isinstance(value, float) or not math.isfinite(value):
                self.fail(f"{what} must be a number, got {_brief(value)}")
        elif type_ == "str":
            if not isinstance(value, str) or len(value) > MAX_STRING_ARG_CHARS:
                self.fail(f"{what} must be a string of at most {MAX_STRING_ARG_CHARS} characters")
        elif type_ == "ScalarType":
            self.tagged(value, "dtype", specs.DTYPES, what)
        elif type_ == "Layout":
            self.tagged(value, "layout", specs.LAYOUTS, what)
        elif type_ == "MemoryFormat":
            self.tagged(value, "memory_format", specs.MEMORY_FORMATS, what)
        elif type_ == "Device":
            self.tagged(value, "device", _DEVICE_TYPES, what)
        else:
            self.fail(f"{what} has type {type_}, which engine files cannot hold")

    def tagged(self, value: Any, key: str, known: Iterable[str], what: str) -> None:
        if not (isinstance(value, dict) and set(value) == {key} and isinstance(value[key], str)
                and value[key] in known):
            self.fail(f"{what} must be {{{key!r}: one of {', '.join(known)}}}, got {_brief(value)}")

    def special_float(self, value: dict[str, Any], what: str) -> None:
        if set(value) != {"float"} or value["float"] not in _SPECIAL_FLOATS:
            self.fail(f"{what} must be a number or {{'float': 'inf' | '-inf' | 'nan'}}, got {_brief(value)}")

    def tensor_ref(self, value: Any, what: str, index: int) -> None:
        if not isinstance(value, dict) or len(value) != 1 or not (set(value) & {"slot", "weight"}):
            self.fail(f"{what} must be a tensor reference {{'slot': i}} or {{'weight': name}}, got {_brief(value)}")
        if "weight" in value:
            name = value["weight"]
            if not isinstance(name, str) or name not in self.weights:
                self.fail(f"{what} names weight {_brief(name)}, which the file does not hold")
            return
        slot = self.integer(value["slot"], what, 0, len(self.slots) - 1)
        if self.slots[slot]["kind"] != "input" and slot not in self.written:
            self.fail(f"{what} reads slot {slot} before any step writes it")
        self.reads[slot] = index

    def check_step_outputs(
        self, step: dict[str, Any], schema: Any, op_name: str, kernel: Any, index: int, n_slots: int
    ) -> None:
        outputs = self.lst(step["outputs"], "outputs", 1 << 12)
        multi = step["multi"]
        if not isinstance(multi, bool) or not outputs or (not multi and len(outputs) != 1):
            self.fail("outputs must be one slot (multi false) or a list of slots (multi true)")
        for o in outputs:
            self.integer(o, "an output slot", 0, n_slots - 1)
            if self.slots[o]["kind"] == "input":
                self.fail(f"writes slot {o}, a graph input")
            if o in self.written:
                self.fail(f"writes slot {o}, which step {self.written[o]} already wrote")
            self.written[o] = index
        if len(set(outputs)) != len(outputs):
            self.fail("names an output slot twice")
        out = step.get("out_variant")
        writes_into = step.get("writes_into", False)
        if not isinstance(writes_into, bool):
            self.fail("writes_into must be a bool")
        kinds = {self.slots[o]["kind"] for o in outputs}
        is_view = any(r.alias_info is not None for r in schema.returns)
        if is_view:
            if out is not None or writes_into or kinds != {"view"}:
                self.fail(f"{op_name} returns a view: its outputs are view slots, not written into the arena")
        elif out is not None:
            out = self.obj(out, "out_variant")
            if set(out) != {"op", "out_args"} or not isinstance(out["op"], str):
                self.fail("out_variant must be {op, out_args}")
            out_args = self.lst(out["out_args"], "out_variant.out_args", 16)
            if not all(isinstance(a, str) for a in out_args) or len(out_args) != len(outputs):
                self.fail("out_variant.out_args must name one out argument per output")
            if not kernel.writes_planned_outputs:
                self.fail(f"kernel {kernel.name} does not write planned outputs, yet the step has an out_variant")
            problem = out_variant_matches(op_name, out["op"], out_args)
            if problem:
                self.fail(problem)
            if not kinds <= {"buffer", "slice"}:
                self.fail("a step written through its out-variant writes buffer or slice slots")
        elif writes_into:
            if len(outputs) != 1 or not kernel.writes_into or not kinds <= {"buffer", "slice"}:
                self.fail(f"writes_into needs one buffer/slice output and a kernel that writes into a view "
                          f"({kernel.name} does not)" if not kernel.writes_into else
                          "writes_into needs one buffer or slice output")
        elif kinds != {"heap"}:
            self.fail("a step that allocates its own results writes heap slots")
        if "slice" in kinds and not (out is not None or writes_into):
            self.fail("a slice slot is written only by a step that writes into it")
        if step["kernel"] == CONCAT_KERNEL:
            self.check_concat(step, outputs)
        for key in ("fork", "join"):
            if not isinstance(step.get(key, False), bool):
                self.fail(f"{key} must be a bool")
        if step.get("stream", 0) not in (0, 1) or isinstance(step.get("stream", 0), bool):
            self.fail("stream must be 0 or 1")

    def check_concat(self, step: dict[str, Any], outputs: list[int]) -> None:
        """The planner's in-place concatenation: its inputs must be slices tiling its buffer."""
        (slot,) = outputs
        buf = self.slots[slot]
        if buf["kind"] != "buffer" or not step.get("writes_into") or step.get("out_variant") is not None:
            self.fail("an in-place concatenation writes into one buffer slot")
        args = step["args"] + [step["kwargs"][k] for k in ("tensors", "dim") if k in step["kwargs"]]
        tensors = args[0] if args else None
        if isinstance(tensors, dict) and set(tensors) == {"tuple"}:
            tensors = tensors["tuple"]
        dim = args[1] if len(args) > 1 else 0
        rank = len(buf["shape"])
        if not isinstance(tensors, list) or not tensors or not _is_int(dim) or not -rank <= dim < max(rank, 1):
            self.fail("an in-place concatenation takes a list of slot references and a dim")
        dim %= max(rank, 1)
        start = 0
        for t in tensors:
            s = t.get("slot") if isinstance(t, dict) else None
            part = self.slots[s] if _is_int(s) and 0 <= s < len(self.slots) else None
            if part is None or part["kind"] != "slice" or part["base"] != slot:
                self.fail(f"an in-place concatenation's inputs must be slices of its buffer (slot {slot})")
            expected = list(buf["shape"])
            expected[dim] = part["shape"][dim]
            if list(part["shape"]) != expected or part["base_offset"] != start * buf["stride"][dim]:
                self.fail(f"slice slot {s} does not tile buffer slot {slot} along dim {dim}")
            start += part["shape"][dim]
        if start != buf["shape"][dim]:
            self.fail(f"the slices cover {start} of the {buf['shape'][dim]} rows of buffer slot {slot}")

    # -- outputs, liveness ----------------------------------------------------------------------

    def check_outputs(self) -> None:
        refs = self.lst(self.plan["output_refs"], "output_refs", 1 << 16)
        if len(refs) != len(self.outputs):
            self.fail(f"{len(refs)} output_refs for {len(self.outputs)} outputs")
        end = len(self.steps)
        for i, (ref, spec) in enumerate(zip(refs, self.outputs)):
            what = f"output_refs[{i}]"
            is_ref = isinstance(ref, dict) and bool(set(ref) & {"slot", "weight"})
            if spec is None:
                if is_ref:
                    self.fail(f"{what} is a tensor, but outputs[{i}] says it is not")
                self.constant(ref, what)
                continue
            if not is_ref:
                self.fail(f"{what} must reference a slot or weight (outputs[{i}] is a tensor)")
            self.tensor_ref(ref, what, end)
            if "slot" in ref:
                slot = self.slots[ref["slot"]]
                shape, dtype = slot["shape"], slot["dtype"]
            else:
                dtype, shape = self.weights[ref["weight"]]
            if tuple(shape) != spec[0]:
                self.fail(f"{what} has shape {list(shape)}, outputs[{i}] says {list(spec[0])}")
            if dtype != spec[1] and not (dtype.is_floating_point and spec[1].is_floating_point):
                self.fail(f"{what} is {dtype}, outputs[{i}] says {spec[1]}")
        validate = getattr(specs, "validate_structure", None)
        structure = self.plan["structure"]
        if validate is not None:
            try:
                validate(structure, len(self.outputs))
            except Exception as exc:  # ValueError by contract; anything else is a malformed structure too
                self.fail(f"output structure: {_first_line(exc)}")
        else:
            self.structure(structure, len(self.outputs))

    def constant(self, value: Any, what: str) -> None:
        if value is None or isinstance(value, (bool, str)):
            return
        if _is_int(value):
            self.integer(value, what)
        elif isinstance(value, float):
            return
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.constant(v, f"{what}[{i}]")
        elif isinstance(value, dict) and len(value) == 1:
            (key, inner), = value.items()
            if key == "tuple":
                self.constant(self.lst(inner, what, 1 << 16), what)
            elif key == "float":
                self.special_float(value, what)
            elif key in ("dtype", "layout", "memory_format", "device"):
                known = {"dtype": specs.DTYPES, "layout": specs.LAYOUTS, "memory_format": specs.MEMORY_FORMATS,
                         "device": _DEVICE_TYPES}[key]
                self.tagged(value, key, known, what)
            else:
                self.fail(f"{what} is not a constant kiln encodes: {_brief(value)}")
        else:
            self.fail(f"{what} is not a constant kiln encodes: {_brief(value)}")

    def structure(self, structure: Any, n_outputs: int) -> None:
        """Fallback check of the output structure (tuple/list/size/dict/leaf) where kiln.specs has none."""
        seen: list[int] = []
        stack = [structure]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or len(node) != 1:
                self.fail("output structure: a node is an object with one key")
            (kind, body), = node.items()
            if kind == "leaf":
                seen.append(self.integer(body, "output structure leaf", 0, max(n_outputs - 1, 0)))
            elif kind in ("list", "tuple", "size"):
                stack.extend(self.lst(body, f"output structure {kind}", 1 << 16))
            elif kind == "dict":
                body = self.obj(body, "output structure dict")
                keys, values = body.get("keys"), body.get("values")
                if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
                    self.fail("output structure: dict keys and values must be lists of one length")
                if not all(type(k) in (str, int) for k in keys):
                    self.fail("output structure: dict keys must be strings or integers")
                stack.extend(values)
            else:
                self.fail(f"output structure: unknown node kind {_brief(kind)}")
        if sorted(seen) != list(range(n_outputs)):
            self.fail("output structure: the leaves must use each output exactly once")

    def check_last_use(self) -> None:
        last_use = self.lst(self.plan["last_use"], "last_use", MAX_SLOTS)
        if len(last_use) != len(self.slots):
            self.fail(f"last_use has {len(last_use)} entries for {len(self.slots)} slots")
        end = len(self.steps)
        outputs = {r["slot"] for r in self.plan["output_refs"] if isinstance(r, dict) and "slot" in r}
        for slot, last in enumerate(last_use):
            self.integer(last, f"last_use[{slot}]", -1, end)
            if last < 0 or last >= end:
                continue  # never freed
            if slot in outputs:
                self.fail(f"last_use frees output slot {slot} after step {last}, before the outputs are read")
            if self.reads.get(slot, -1) > last:
                self.fail(f"last_use frees slot {slot} after step {last}, but step {self.reads[slot]} reads it")

    # -- shapes on the meta device -----------------------------------------------------------------

    def check_shapes_on_meta(self) -> None:
        """Run each step's op on meta tensors of its declared inputs: its used outputs must have
        the declared shapes and dtypes (no data, no memory: meta tensors have neither)."""
        meta = torch.device("meta")
        used = set(self.reads) | {r["slot"] for r in self.plan["output_refs"] if isinstance(r, dict) and "slot" in r}

        def resolve(ref: dict[str, Any]) -> torch.Tensor:
            if "slot" in ref:
                s = self.slots[ref["slot"]]
                return torch.empty_strided(s["shape"], s["stride"], dtype=s["dtype"], device=meta)
            dtype, shape = self.weights[ref["weight"]]
            return torch.empty(shape, dtype=dtype, device=meta)

        for index, (step, (op, _)) in enumerate(zip(self.steps, self.step_ops)):
            op_name = step["op"]
            if op_name in _DATA_DEPENDENT:
                continue
            self.where = f"step {index} ({step['name']})"
            args = specs.decode_value(step["args"], resolve, meta)
            kwargs = {k: specs.decode_value(v, resolve, meta) for k, v in step["kwargs"].items()}
            try:
                with torch.no_grad():
                    if op_name in _RESHAPING_VIEWS:
                        result = args[0].reshape(*args[1:], **kwargs)
                    else:
                        result = op(*args, **kwargs)
            except NotImplementedError:
                if self.gapped & set(step["outputs"]):
                    self.fail(f"{op_name} has no meta kernel to confirm the gaps its heap slot declares")
                continue  # no meta kernel for this op: its shapes are checked when it runs
            except Exception as exc:  # any error here means the arguments do not fit the op
                self.fail(f"{op_name} rejects its arguments with the declared shapes: {_first_line(exc)}")
            results = list(result) if step["multi"] else [result]
            if len(results) != len(step["outputs"]):
                self.fail(f"{op_name} gives {len(results)} results, the step declares {len(step['outputs'])}")
            for slot, r in zip(step["outputs"], results):
                s = self.slots[slot]
                if slot in self.gapped and (not isinstance(r, torch.Tensor) or tuple(r.stride()) != s["stride"]):
                    self.fail(f"heap slot {slot} declares stride {list(s['stride'])} with gaps, but {op_name} "
                              f"gives {list(r.stride()) if isinstance(r, torch.Tensor) else r}")
                if slot not in used or not isinstance(r, torch.Tensor):
                    continue
                if tuple(r.shape) != s["shape"] or r.dtype != s["dtype"]:
                    self.fail(f"{op_name} gives {list(r.shape)} {r.dtype} for slot {slot}, the plan declares "
                              f"{list(s['shape'])} {s['dtype']}")


def _cuda_matches(capability: Any) -> bool:
    """Whether this machine can run a CUDA engine built for `capability` (else load refuses it)."""
    if not torch.cuda.is_available():
        return False
    return capability is None or list(capability) == list(torch.cuda.get_device_capability())


def check_weight_indices(header: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> None:
    """Index tensors that are weights (INDEX_ARGUMENTS) hold only indices in range of what they
    index: ATen would refuse them only when the step runs. Called once the weights are read."""
    plan = header["plan"]
    for index, step in enumerate(plan["steps"]):
        rule = INDEX_ARGUMENTS.get(step["op"])
        if rule is None:
            continue
        index_arg, target_arg, dim_arg, negative = rule
        schema = resolve_op(step["op"])._schema
        names = [a.name for a in schema.arguments if not a.kwarg_only]
        bound = {**dict(zip(names, step["args"])), **step["kwargs"]}
        ref, target = bound.get(index_arg), bound.get(target_arg)
        if not (isinstance(ref, dict) and "weight" in ref):
            continue
        if isinstance(target, dict) and "slot" in target:
            shape = plan["slots"][target["slot"]]["shape"]
        elif isinstance(target, dict) and "weight" in target:
            shape = list(weights[target["weight"]].shape)
        else:
            continue
        dim = bound.get(dim_arg, 0) if isinstance(dim_arg, str) else dim_arg
        if not _is_int(dim) or not shape or not -len(shape) <= dim < len(shape):
            continue
        size = shape[dim]
        if not _is_int(size):
            continue  # a dynamic dim (an expression): its bound is checked when the shapes are bound
        values = weights[ref["weight"]]
        if values.numel() == 0 or values.dtype.is_floating_point or values.dtype == torch.bool:
            continue
        lo, hi = int(values.min()), int(values.max())
        if hi >= size or lo < (-size if negative else 0):
            raise EngineFileError(
                f"{where} is not a valid kiln engine: step {index} ({step['name']}): weight {ref['weight']!r} "
                f"holds indices from {lo} to {hi} into a dimension of size {size}. The file is damaged or was "
                "crafted; rebuild it with `kiln build`."
            )


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of storage a strided tensor reaches (0 when it is empty)."""
    if any(d == 0 for d in shape):
        return 0
    return 1 + sum((d - 1) * s for d, s in zip(shape, stride))


def _overlaps(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of a strided tensor share storage: taken from the smallest stride up,
    each dim must step past everything the smaller ones reach."""
    reach = 1
    for size, step in sorted(((d, s) for d, s in zip(shape, stride) if d > 1), key=lambda ds: ds[1]):
        if step < reach:
            return True
        reach = step * (size - 1) + reach
    return False


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
