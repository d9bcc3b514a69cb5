"""kiln.build: capture → passes → select → plan → Engine, with stage timings."""

from __future__ import annotations

import contextlib
import datetime
import platform
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln import __version__
from kiln.capture.export import _forward_parameters, _resized, bind_example_inputs, capture, check_model
from kiln.capture.failures import explain
from kiln.capture.rewrites import check_names
from kiln.dims import DynamicSpec, normalize
from kiln.errors import KilnError, KilnWarning
from kiln.passes import run_passes
from kiln.plan.planner import make_plan
from kiln.quant.build import QUANT_PRECISIONS, calibration_batches, check_settings, guard_target, quantize_for_build
from kiln.runtime.engine import Engine, EngineModule, default_device, device_argument
from kiln.select.selection import select_kernels
from kiln.select.tune import TimingCache, default_cache_path
from kiln.shapes import probe_bindings

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Post-training quantization (kiln.quant.build): int8, fp8 (e4m3) and "mixed" (int8 with the accuracy
# guard keeping sensitive layers in high precision). The rest of the graph computes in fp32 on the
# CPU and fp16 on CUDA. Quantized linear layers are one kiln::qlinear each (kiln.quant.fuse), an 8-bit
# GEMM on CUDA where a kernel applies (kiln.kernels.scaled_mm); other Q/DQ ops run as their references.
ALL_PRECISIONS: tuple[str, ...] = (*PRECISIONS, *QUANT_PRECISIONS)
STAGES = ("capture", "passes", "select", "plan")


class Reporter(Protocol):
    """Receives build progress; the CLI's rich display is one."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...


class _Quiet:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


STREAM_GAIN = 0.98  # side streams are kept only where the build times them at least 2% faster


@dataclass
class BuildConfig:
    precision: str = "fp32"
    device: str | None = None  # None: CUDA when available, else CPU
    passes: list[str] | None = None  # None: every registered pass
    rewrites: list[str] | None = None  # capture-time module rewrites (kiln.capture.rewrites); None: all
    tune: bool = True  # time candidate kernels on CUDA and keep the fastest
    exact: bool = False  # no approximate kernels (e.g. tanh-GELU for exact GELU in fp16)
    backend: str = "kiln"  # "tensorrt": supported regions become TensorRT engines inside the plan
    require_full: bool = False  # with backend="tensorrt": fail unless the whole graph converts
    timing_cache: str | None = None  # None: $KILN_TIMING_CACHE or ~/.cache/kiln/timing-cache.json
    streams: str = "auto"  # side streams for independent branches: "auto" (kept where timed faster), "on", "off"
    model_name: str | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)
    check_dims: bool = True  # dynamic shapes: run the engine at every probe size against the model
    buckets: dict[str, Any] | None = None  # dynamic shapes: {"batch": [1, 8, 64]} or {"batch": "pow2"}: pad up to
    # quantized precisions (int8, fp8, mixed): batches shaped like the example inputs (a tensor, a tuple
    # of tensors or a dict by input name each); with an accuracy target the last `held_back` are held back
    calibration: Iterable[Any] | None = None
    calibration_method: str | None = None  # max, percentile, entropy, mse; None: entropy for int8, max for fp8
    accuracy: str | None = None  # e.g. "cosine>=0.999" (the accuracy guard); None: only "mixed" checks
    held_back: int = 4


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device("cuda" if torch.cuda.is_available() else "cpu")
    from kiln.errors import DeviceMismatchError

    device = device_argument(device)
    if device.type not in ("cpu", "cuda"):
        raise DeviceMismatchError(f"kiln builds engines for cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceMismatchError("--device cuda was asked for, but this machine has no usable CUDA GPU")
        if device.index is None:
            device = default_device("cuda")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ALL_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(ALL_PRECISIONS)}, got {precision!r}")
    if precision in QUANT_PRECISIONS:  # simulated on the CPU: the reference path, no fallback
        return precision
    if device.type == "cpu" and precision != "fp32":
        warnings.warn(
            f"{precision} engines are for CUDA GPUs; building for the CPU in fp32 instead",
            KilnWarning,
            stacklevel=3,
        )
        return "fp32"
    return precision


def compute_precision(precision: str, device: torch.device) -> str:
    """The float precision the graph computes in: a quantized engine's unquantized part (and its
    Q/DQ's dequantized values) is fp16 on CUDA, fp32 on the CPU."""
    if precision in QUANT_PRECISIONS:
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def build(
    model: torch.nn.Module,
    example_inputs: Any = None,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    config: BuildConfig | None = None,
    reporter: Reporter | None = None,
    dynamic_shapes: Any = None,
    calibration: Iterable[Any] | None = None,
    calibration_method: str | None = None,
    accuracy: str | None = None,
    held_back: int = 4,
) -> Engine:
    """Build `model` into an Engine for the shapes of its example inputs.

    `example_inputs` is a tensor, a tuple of tensors, or a dict of tensors by forward
    parameter name (as Hugging Face models are called: input_ids=..., attention_mask=...);
    `kwargs` adds keyword inputs to positional ones. Non-tensor keyword values (None, bool,
    int, float, str) are traced as constants. The engine's inputs are named after forward's
    parameters. `model` itself is left as it was (mode, device, dtype, weights); a model in
    train mode is built with eval semantics (with a KilnWarning).

    `dynamic_shapes` makes axes dynamic, as torch.export's argument of that name but with
    kiln.Dim(name, min=, opt=, max=) ranges: a tuple with one entry per input ({axis: Dim},
    a per-axis list, or None) or a dict by argument name. The engine then takes any size in
    each range; it is tuned at opt and its memory planned for max (docs/dynamic-shapes.md).

    `precision="int8"`, `"fp8"` (float8 e4m3) or `"mixed"` quantize after post-training
    calibration on `calibration` (batches shaped like the example inputs): weights per output
    channel, activations per tensor with `calibration_method`'s ranges (entropy for int8, max
    for fp8 unless given). With an `accuracy` target ("cosine>=0.999"; "mixed" checks that one
    unless given) the last `held_back` batches are not calibrated on: the build compares with
    the unquantized graph on them and keeps the most sensitive layers in high precision until
    the target holds. The unquantized part computes in fp32 on the CPU (where the 8-bit values
    are simulated by Q/DQ reference ops) and fp16 on CUDA; build_info["quantization"] says
    what was quantized and what was kept."""
    check_model(model)
    config = config or BuildConfig(
        precision=precision, device=None if device is None else str(device), calibration=calibration,
        calibration_method=calibration_method, accuracy=accuracy, held_back=held_back,
    )
    reporter = reporter or _Quiet()
    _check_config(config)
    inputs = bind_example_inputs(model, example_inputs, kwargs)
    try:
        spec = normalize(dynamic_shapes, inputs.tensors, inputs.names)
    except (ValueError, TypeError) as exc:
        raise KilnError(f"dynamic_shapes: {exc}") from None
    target = resolve_device(config.device)
    used = resolve_precision(config.precision, target)
    batches = _quant_batches(config, inputs, spec.dynamic)
    times: dict[str, float] = {}
    start = time.perf_counter()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with reporter.stage(name):
            try:
                yield
            except KilnError:
                raise
            except Exception as exc:  # never a raw exception out of a build: name the stage
                raise explain(exc, model, name) from exc
        times[name] = round(time.perf_counter() - t0, 4)

    with stage("capture"):
        graph = capture(model, inputs, device=target, compute_dtype=PRECISIONS[compute_precision(used, target)],
                        rewrites=config.rewrites, dynamic=spec)
    with stage("passes"):
        graph, pass_report = run_passes(graph, config.passes)
    quant_info = None
    if batches is not None:
        # After the passes, not before: constant_fold would fold the weights' dequantize back into
        # fp weights and fold_batchnorm would rescale already-quantized weights. The passes leave
        # the ops that run (kiln::conv_bias_act, kiln::linear_act, mm/bmm), and Q/DQ goes around those.
        with stage("quantize"):
            graph, quant_info = _quantize(graph, config, batches, target)
    tensorrt_report = None
    if config.backend == "tensorrt":
        with stage("tensorrt"):
            from kiln.tensorrt.partitioning.partition import partition_graph

            graph, tensorrt_report = partition_graph(
                graph, require_full=config.require_full, timing_cache=config.timing_cache
            )
    with stage("select"):
        cache = None
        if config.tune and target.type == "cuda":
            cache = TimingCache.open(Path(config.timing_cache) if config.timing_cache else default_cache_path())
        selections = select_kernels(graph, cache, exact=config.exact)
        if cache is not None:
            cache.save()
    if quant_info is not None:
        _describe_execution(quant_info, selections)
    weights = _owned(dict(graph.module.named_buffers()), model)
    with stage("plan"):
        plan = make_plan(graph, selections)
        streams_info = {"mode": config.streams, "side_branches": 0, "used": False}
        if config.streams != "off" and target.type == "cuda":
            multi = make_plan(graph, selections, multi_stream=True)
            streams_info["side_branches"] = multi["side_branches"]
            if multi["side_branches"] and config.streams == "on":
                plan, streams_info["used"] = multi, True
            elif multi["side_branches"]:
                trial = _build_info(model, config, target, used, {}, 0.0)
                tensors = [x.to(target) for x in spec.at(inputs.tensors, spec.opt_binding())]
                one, two = (_replay_ms(Engine({"plan": p, "build": trial}, weights, target), tensors)
                            for p in (plan, multi))
                faster = two < one * STREAM_GAIN
                streams_info.update(single_stream_ms=round(one, 5), side_stream_ms=round(two, 5), used=faster)
                plan = multi if faster else plan
    info = _build_info(model, config, target, used, times, time.perf_counter() - start)
    info["streams"] = streams_info
    info["passes"] = pass_report
    info["capture_rewrites"] = graph.rewrites
    info["exact"] = config.exact
    info["backend"] = config.backend
    info["tensorrt"] = tensorrt_report
    info["quantization"] = quant_info
    info["timing_cache"] = (
        None if cache is None else {"path": str(cache.path), "hits": cache.hits, "misses": cache.misses}
    )
    info["input_ranges"] = _int_ranges(inputs.tensors)
    # non-tensor keyword inputs the engine was traced with (a call may repeat them, not change them)
    info["constant_inputs"] = inputs.constants
    # forward's parameters left out at build, traced with their (constant) defaults: a call may pass them as such
    info["default_inputs"] = _traced_defaults(model, inputs)
    engine = Engine({"plan": plan, "build": info}, weights, target)
    if spec.dynamic:
        info["dims"] = {"dims": spec.to_json(), "checked": None}
        if config.check_dims:
            with stage("check_dims"):
                info["dims"]["checked"] = check_dims(engine, model, inputs, spec, used)
        with stage("paddable"):
            plan["paddable"] = engine.paddable = paddable_dims(engine, inputs, spec)
        if config.buckets:
            engine.set_buckets(**config.buckets)  # refuses a dim that is not paddable, naming why
            plan["buckets"] = {name: list(b.sizes) for name, b in engine.buckets.items()}
        engine.prepare_pad_targets()  # as load does, now that the paddable dims are known
    return engine


def paddable_dims(engine: Engine, inputs: Any, spec: DynamicSpec) -> list[str]:
    """The dims a call may be padded along (bucketing): every output has the dim as exactly one
    whole axis (so it can be sliced back), every input axis that names it is that dim alone, and
    the engine run at a padded size gives the unpadded outputs on every real row, and the same
    non-tensor outputs (checked at the dim's min and its awkward size, each padded to max). A
    sequence dim fails: attention mixes positions, a convolution along it reads its neighbours."""
    from kiln.shapes import awkward_size, dims_of

    used = compute_precision(engine.build_info.get("precision", "fp32"), engine.device)
    bound = PAD_REL_ERROR.get(used, PAD_REL_ERROR["fp32"])
    found = []
    for name, dim in spec.dims.items():
        outs = [o for o in engine.outputs if o is not None]
        if not outs or not all([d for d in o.shape if name in dims_of(d)] == [name] for o in outs):
            continue
        if any(name in dims_of(d) and d != name for s in engine.inputs for d in s.shape):
            continue
        sizes = sorted({s for s in (dim.min, awkward_size(dim)) if s is not None and s < dim.max})
        if sizes and all(_pads_cleanly(engine, inputs, spec, name, size, bound) for size in sizes):
            found.append(name)
    return found


def _pads_cleanly(engine: Engine, inputs: Any, spec: DynamicSpec, name: str, size: int, bound: float) -> bool:
    """Whether the engine at dim `name` = `size`, padded to its max, answers as unpadded."""
    from kiln.shapes import pad_to

    real = spec.at(inputs.tensors, {**spec.opt_binding(), name: size})
    padded = tuple(x for x in real)
    for i, axes in enumerate(spec.axes):
        for axis, d in axes.items():
            if d == name:
                padded = padded[:i] + (pad_to(padded[i], axis, spec.dims[name].max),) + padded[i + 1:]
    want, got = _flat(engine, real), _flat(engine, padded)
    if len(want) != len(got):
        return False
    for w, g, o in zip(want, got, engine.outputs):
        if not isinstance(w, torch.Tensor):
            if w != g:  # e.g. a size returned as an int: padding would answer the padded one
                return False
            continue
        if o is None:
            continue
        axis = list(o.shape).index(name)
        g = g.narrow(axis, 0, size)
        if tuple(g.shape) != tuple(w.shape) or _worst_row_error(g, w, axis) > bound:
            return False
    return True


def _worst_row_error(got: torch.Tensor, want: torch.Tensor, axis: int) -> float:
    """The largest relative error of one row along `axis` (its L2 distance over the rows' mean
    L2 norm): rounding spreads over every row, a padded neighbour's influence sits in a few."""
    if got.numel() == 0:
        return 0.0
    g, w = got.movedim(axis, 0).reshape(got.shape[axis], -1), want.movedim(axis, 0).reshape(want.shape[axis], -1)
    whole = _rel_error(g, w)
    if whole == float("inf"):
        return whole
    g, w = g.double(), w.double()
    scale = float(torch.linalg.vector_norm(w, dim=1).mean())
    worst = float(torch.linalg.vector_norm(g - w, dim=1).max())
    return worst / scale if scale > 0 else worst


# How far the real rows of a padded call may be from the unpadded call's (relative L2 error) for
# the dim to count as paddable. Not zero: at another size the engine may run other kernels (cuDNN
# picks algorithms per shape), which round differently in low precision (resnet50 fp16 on an H100
# failed a 1e-3 elementwise bound, so no dim was ever paddable there). An op that mixes rows moves
# the real rows by far more than rounding does.
PAD_REL_ERROR = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp64 (inf where either has a NaN or an inf the other lacks)."""
    got, want = got.double(), want.double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    finite = torch.isfinite(want)
    if not torch.equal(got[~finite], want[~finite]):
        return float("inf")
    diff = torch.linalg.vector_norm(got[finite] - want[finite])
    scale = torch.linalg.vector_norm(want[finite])
    return float(diff / scale) if scale > 0 else float(diff)


def _flat(engine: Engine, tensors: tuple[torch.Tensor, ...]) -> list[Any]:
    """The engine's flat outputs for positional `tensors` (constants as built)."""
    from torch.utils import _pytree as pytree

    out = engine(*[x.to(engine.device) for x in tensors])
    return [t for t in pytree.tree_leaves(out)]


# Relative error (‖engine − model‖ / ‖model‖) a probe size may show beyond the engine's own
# error at opt (where the graph is traced), per build precision: the check is after shape-dependent
# computation, not rounding, which low precision makes large in deep random-weight models.
CHECK_REL_FLOOR = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
CHECK_REL_FACTOR = 3.0


def check_dims(
    engine: Engine, model: torch.nn.Module, inputs: Any, spec: DynamicSpec, precision: str
) -> list[dict[str, Any]]:
    """Run a dynamic engine at every probe binding (kiln.shapes.probe_bindings: opt, min, max,
    each dim alone at its ends, an awkward prime size) against the model itself; a KilnError
    names the size and the output that differ. This is what catches a model that treats size 1
    differently from the size it was traced at (torch.export assumes dynamic sizes are never 0
    or 1).

    An output passes where it is elementwise close (fp32: rtol 1e-3, atol 1e-4; else 3e-2), or
    where its relative error is at most CHECK_REL_FACTOR times the engine's own at opt (where the
    graph was traced), or CHECK_REL_FLOOR if that is larger: a low-precision
    engine of a deep model is as far from the fp32 model at every size as at the traced one."""
    rtol, atol = (1e-3, 1e-4) if precision == "fp32" else (3e-2, 3e-2)
    floor = CHECK_REL_FLOOR.get(precision, CHECK_REL_FLOOR["bf16"])
    model_device = next((p.device for p in model.parameters()), engine.device)
    traced = _check_outputs(engine, model, inputs, spec.at(inputs.tensors, spec.opt_binding()), model_device)
    allowed = [max(floor, CHECK_REL_FACTOR * _relative(g, w)) if g.is_floating_point() else 0.0
               for g, w in traced]
    results = []
    for binding in probe_bindings(list(spec.dims.values())):
        outputs = _check_outputs(engine, model, inputs, spec.at(inputs.tensors, binding), model_device)
        worst = 0.0
        for i, (g, w) in enumerate(outputs):
            problem = None
            if tuple(g.shape) != tuple(w.shape):
                problem = f"shape {tuple(g.shape)} instead of {tuple(w.shape)}"
            elif not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True) and (
                not g.is_floating_point() or not _relative(g, w) <= allowed[i]  # (NaN fails)
            ):
                problem = (f"max abs error {(g.double() - w.double()).abs().max().item():.3g}, relative error "
                           f"{_relative(g, w):.3g} (allowed: {allowed[i]:.3g})"
                           if g.is_floating_point() else "different values")
            if problem:
                sizes = ", ".join(f"{k} = {v}" for k, v in binding.items())
                one = [k for k, v in binding.items() if v == 1]
                hint = (" The model treats size 1 differently from the size it was traced at (torch.export "
                        f"assumes dynamic sizes are never 1): set min=2 for {', '.join(one)}, or make that path "
                        "shape-generic." if one else
                        " The model's computation depends on these sizes in a way the traced graph does not "
                        "capture: narrow the range, or fix this axis.")
                raise KilnError(
                    f"the dynamic engine differs from the model at {sizes}: output {i} has {problem}.{hint}")
            if g.is_floating_point() and g.numel():
                worst = max(worst, (g.double() - w.double()).abs().max().item())
        results.append({"binding": dict(binding), "max_abs_error": worst})
    return results


def _check_outputs(engine: Engine, model: torch.nn.Module, inputs: Any, tensors: tuple[torch.Tensor, ...],
                   model_device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(engine output, model output) pairs for the example resized to `tensors`, the model's
    output in the engine output's dtype and device."""
    from torch.utils import _pytree as pytree

    resized = _resized(inputs, tensors)
    args, kwargs = resized.map(lambda x: x.to(model_device))
    with torch.no_grad(), _quiet_eval(model):
        want = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    e_args, e_kwargs = resized.map(lambda x: x.to(engine.device))
    e_kwargs = {k: v for k, v in e_kwargs.items() if k not in inputs.constants}
    got = [t for t in pytree.tree_leaves(engine(*e_args, **e_kwargs)) if isinstance(t, torch.Tensor)]
    return [(g, w.to(device=g.device, dtype=g.dtype) if g.is_floating_point() else w.to(g.device))
            for g, w in zip(got, want)]


def _relative(g: torch.Tensor, w: torch.Tensor) -> float:
    """‖g − w‖ / ‖w‖ in float64 (non-finite where w is all zeros and g is not)."""
    g, w = g.double(), w.double()
    diff = float((g - w).norm())
    scale = float(w.norm())
    return diff / scale if scale else (0.0 if diff == 0 else float("inf"))


@contextlib.contextmanager
def _quiet_eval(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block (capture already warned about train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_config(config: BuildConfig) -> None:
    """Refuse unknown settings before any work (ValueError naming the choices)."""
    if config.precision not in ALL_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(ALL_PRECISIONS)}, got {config.precision!r}")
    if config.backend not in ("kiln", "tensorrt"):
        raise ValueError(f"backend must be 'kiln' or 'tensorrt', got {config.backend!r}")
    if config.precision in QUANT_PRECISIONS:
        check_settings(config.precision, config.calibration, config.calibration_method, config.accuracy,
                       config.held_back)
    elif config.calibration is not None or config.accuracy is not None:
        raise KilnError(
            f"calibration= and accuracy= are for the quantized precisions ({', '.join(QUANT_PRECISIONS)}); "
            f"precision {config.precision!r} does not use them"
        )
    if config.streams not in ("auto", "on", "off"):
        raise ValueError(f"streams must be 'auto', 'on' or 'off', got {config.streams!r}")
    check_names(config.rewrites)
    if config.passes is not None:
        from kiln.passes import PASSES

        unknown = [n for n in config.passes if n not in PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; known: {', '.join(PASSES)}")


def _quant_batches(config: BuildConfig, inputs: Any, dynamic: bool) -> list[tuple[torch.Tensor, ...]] | None:
    """The calibration batches of a quantized build, checked against the example inputs (before
    capture); None for a float precision."""
    if config.precision not in QUANT_PRECISIONS:
        return None
    if dynamic:
        raise KilnError(
            f"precision {config.precision!r} is for static shapes for now (calibration runs at the example's "
            "sizes): drop dynamic_shapes (--batch/--seq ranges) or build in fp32/fp16"
        )
    held = config.held_back if guard_target(config.precision, config.accuracy) else 0
    return calibration_batches(config.calibration, inputs.names, inputs.tensors, precision=config.precision,
                               held_back=held)


def _quantize(
    graph: Any, config: BuildConfig, batches: list[tuple[torch.Tensor, ...]], device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """Calibrate and insert Q/DQ (kiln.quant.build); warns where an accuracy target is not met."""
    fmt, default_method, _ = QUANT_PRECISIONS[config.precision]
    method = config.calibration_method or default_method
    target = guard_target(config.precision, config.accuracy)
    # TensorRT takes the Q/DQ graph itself (explicit quantization): no kiln::qlinear there
    graph, info = quantize_for_build(graph, batches, fmt=fmt, method=method, accuracy=target,
                                     held_back=config.held_back, fuse=config.backend != "tensorrt")
    info["compute_precision"] = compute_precision(config.precision, device)
    if info["accuracy"] is not None and not info["accuracy"]["met"]:
        warnings.warn(
            f"{info['accuracy']['summary']}; the engine is built with those layers in high precision "
            "(loosen the target, or give more representative calibration data)",
            KilnWarning,
            stacklevel=4,
        )
    return graph, info


def _describe_execution(info: dict[str, Any], selections: dict[Any, Any]) -> None:
    """build_info["quantization"]'s account of what runs in 8 bits: the kiln::qlinear(_grouped) steps whose
    kernel is an 8-bit GEMM (not the reference, which dequantizes and multiplies in float)."""
    ops = (torch.ops.kiln.qlinear.default, torch.ops.kiln.qlinear_grouped.default)
    qlinear = [s.kernel for n, s in selections.items() if getattr(n, "target", None) in ops]
    eight_bit = sum(k != "kiln.reference" for k in qlinear)
    info["eight_bit_gemms"] = eight_bit
    info["simulated"] = eight_bit == 0
    if eight_bit == 0:
        info["execution"] = (
            f"simulated {info['format']}: values rounded to the 8-bit format by Q/DQ reference ops, GEMMs in "
            f"{info['compute_precision']}"
        )
    else:
        info["execution"] = (
            f"{info['format']}: {eight_bit} of {info['quantized_layers']} quantized layers run as 8-bit GEMMs "
            f"(kiln::qlinear), the rest as Q/DQ reference ops around {info['compute_precision']} kernels"
        )


def _replay_ms(engine: Engine, inputs: list[torch.Tensor], iters: int = 50) -> float:
    """Median ms per call of an engine's CUDA-graph replay, timed by CUDA events."""
    from kiln.timing import measure

    with torch.inference_mode():
        return measure(lambda: engine(*inputs), inputs[0].device, warmup=5, iters=iters).median


def _owned(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The engine's weights in memory of their own: the capture lifts the model's parameters and
    buffers as they are, and an engine sharing their storage would change its answers when the
    model's weights change after the build (training on, load_state_dict)."""
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    return {k: w.detach().clone() if w.untyped_storage().data_ptr() in shared else w for k, w in weights.items()}


def _traced_defaults(model: torch.nn.Module, inputs: Any) -> dict[str, Any]:
    """forward's keyword parameters the example inputs left out whose defaults are constants
    (None, bool, int, printable str, finite float): the engine was traced with those values."""
    import math

    params = _forward_parameters(model) or []
    given = set(inputs.names) | set(inputs.constants)
    out: dict[str, Any] = {}
    for p in params:
        value = p.default
        if p.name in given or value is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if (value is None or type(value) in (bool, int) or (type(value) is str and value.isprintable())
                or (type(value) is float and math.isfinite(value))):  # (build info holds no control characters)
            out[p.name] = value
    return out


def compile(model: torch.nn.Module, example_inputs: Any = None, **options: Any) -> EngineModule:  # noqa: A001
    """Build and wrap in an nn.Module: a drop-in replacement for `model` (same options as
    `build`, including kwargs= and example inputs given as a dict by parameter name)."""
    return EngineModule(build(model, example_inputs, **options))


def _int_ranges(inputs: tuple[torch.Tensor, ...]) -> list[list[int] | None]:
    """The value range of each integer example input, so random test inputs stay valid."""
    return [
        None if x.is_floating_point() or x.dtype == torch.bool or not x.numel() else [int(x.min()), int(x.max())]
        for x in inputs
    ]


def _build_info(
    model: torch.nn.Module, config: BuildConfig, device: torch.device, precision: str, times: dict, total: float
) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "model": config.model_name or type(model).__name__,
        "kiln_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "compute_capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "precision": precision,
        "precision_requested": config.precision,
        "build_seconds": round(total, 3),
        "stage_seconds": times,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **config.extra_info,
    }
