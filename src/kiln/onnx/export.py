"""ONNX: export with torch.onnx, check, validate against PyTorch with ONNX Runtime, simplify.

The export goes through ``torch.onnx.export(dynamo=True)`` (torch.export → ONNX Script), the
exporter PyTorch maintains; when it fails the TorchScript exporter is tried and the report
says so and why. Everything here runs on CPU.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from kiln.dims import DynamicSpec, normalize
from kiln.errors import KilnError
from kiln.shapes import probe_bindings

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ExportReport",
    "OnnxError",
    "OnnxSummary",
    "ValidationReport",
    "check_onnx",
    "export_onnx",
    "op_histogram",
    "simplify_onnx",
    "validate_onnx",
]

# fp32 ONNX Runtime (CPU) vs fp32 PyTorch: the same maths in another order. Deep models
# (ViT, BERT-base) accumulate ~1e-5 differences; 1e-4 + 1e-3 * |ref| leaves headroom while
# still catching a wrong op (those differ by O(1)).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
_EXTERNAL_DATA_BYTES = 1536 << 20  # protobuf caps one file at 2 GiB: keep weights beside it


class OnnxError(KilnError):
    """An ONNX export, check, validation or simplification failed."""


@dataclass
class ExportReport:
    path: Path
    exporter: str  # "dynamo" (torch.export-based) or "torchscript" (fallback)
    opset: int
    dynamic_batch: bool
    seconds: float
    size_bytes: int
    inputs: list[str]
    outputs: list[str]
    fallback_reason: str | None = None  # why the dynamo exporter was not used
    ops_before: dict[str, int] | None = None  # op histogram before/after --simplify
    ops_after: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)
    dims: list[str] = field(default_factory=list)  # dynamic_shapes: each dim described ("batch 1..64 (opt 8)")


@dataclass
class OnnxSummary:
    path: Path
    ir_version: int
    opset: int
    nodes: int
    inputs: list[tuple[str, list[int | str], str]]  # name, shape (str: symbolic), dtype
    outputs: list[tuple[str, list[int | str], str]]


@dataclass
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    passed: bool


@dataclass
class ValidationReport:
    passed: bool
    max_abs_diff: float
    atol: float
    rtol: float
    outputs: list[OutputDiff]
    provider: str
    seconds: float

    @property
    def tolerance(self) -> str:
        return f"|onnx - torch| <= {self.atol:g} + {self.rtol:g} * |torch|"


# --- export -----------------------------------------------------------------------------


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    simplify: bool = False,
    dynamic_shapes: Any = None,
) -> ExportReport:
    """Export ``model`` to ``path`` and check it with onnx.checker.

    ``dynamic_shapes`` takes kiln.build's form (``({0: kiln.Dim("batch", min=1, opt=8, max=64)},)``
    or a dict by argument name): those axes are symbolic in the ONNX model, named by their
    dims; the model is traced at each dim's opt (2 where opt is 1). ``dynamic_batch`` is the
    shorthand for dim 0 of every input (and output) symbolic ("batch", 1..65536);
    ``simplify`` runs onnxslim afterwards and records the op histogram before and after.
    ``opset`` None takes the exporter's default.
    """
    model = model.eval()
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = _input_names(model, len(args))
    spec = _dynamic_spec(dynamic_shapes, dynamic_batch, args, input_names)
    if spec is not None:
        args = spec.export_inputs(args)
    with torch.no_grad():
        reference = model(*args)
    output_names = _output_names(reference)
    start = time.perf_counter()
    fallback = None
    try:
        _export_dynamo(model, args, path, opset, dynamic_batch, input_names, output_names, spec)
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any failure: try the older exporter
        fallback = f"{type(exc).__name__}: {_first_line(exc)}"
        try:
            _export_torchscript(model, args, path, opset, dynamic_batch, input_names, output_names, spec)
        except Exception as exc2:
            raise OnnxError(
                f"ONNX export of {type(model).__name__} failed with both exporters.\n"
                f"  dynamo (torch.export): {fallback}\n"
                f"  torchscript: {type(exc2).__name__}: {_first_line(exc2)}\n"
                "Check that torch.export can trace the model with these inputs."
            ) from exc2
        exporter = "torchscript"
    seconds = time.perf_counter() - start
    summary = check_onnx(path)
    report = ExportReport(
        path=path,
        exporter=exporter,
        opset=summary.opset,
        dynamic_batch=dynamic_batch,
        seconds=seconds,
        size_bytes=_size(path),
        inputs=[name for name, _, _ in summary.inputs],
        outputs=[name for name, _, _ in summary.outputs],
        fallback_reason=fallback,
        dims=[d.describe() for d in spec.dims.values()] if spec is not None else [],
    )
    if simplify:
        report.ops_before, report.ops_after = simplify_onnx(path, path)
        report.size_bytes = _size(path)
        report.notes.append("simplified with onnxslim")
    return report


def _export_dynamo(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
    spec: DynamicSpec | None = None,
) -> None:
    dynamic_shapes = None
    if spec is not None:
        dynamic_shapes = tuple(axes or {} for axes in spec.to_torch_export() or ())
    elif dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic_shapes = tuple({0: batch} if a.dim() > 0 else {} for a in args)
    with _quiet("onnxscript"), warnings.catch_warnings():  # its constant folder logs harmless "Evaluation failed"
        # one torch Dim on several axes: the exporter says it names them once (harmless)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:
        raise OnnxError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(path), external_data=_param_bytes(model) > _EXTERNAL_DATA_BYTES)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _export_torchscript(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
    spec: DynamicSpec | None = None,
) -> None:
    dynamic_axes = None
    if spec is not None:
        dynamic_axes = {name: dict(axes) for name, axes in zip(input_names, spec.axes) if axes}
        dynamic_axes.update(_output_axes(model, args, spec, output_names))
    elif dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    torch.onnx.export(
        model,
        args,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )


def _dynamic_spec(
    dynamic_shapes: Any, dynamic_batch: bool, args: tuple[torch.Tensor, ...], names: list[str]
) -> DynamicSpec | None:
    """The checked dims of `dynamic_shapes` (None when nothing is dynamic)."""
    if dynamic_shapes is None:
        return None
    if dynamic_batch:
        raise OnnxError("give dynamic_shapes or dynamic_batch, not both (dynamic_batch is batch 1..65536 on axis 0)")
    try:
        spec = normalize(dynamic_shapes, args, names)
    except ValueError as exc:
        raise OnnxError(f"dynamic_shapes: {exc}") from None
    return spec if spec.dynamic else None


def _output_axes(
    model: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: DynamicSpec, output_names: list[str]
) -> dict[str, dict[int, str]]:
    """The TorchScript exporter needs the outputs' dynamic axes too: the axes whose size changes
    between the traced size and another size in the range, named by the dim they follow
    (else `<output>_<axis>`)."""
    probes = [b for b in probe_bindings(list(spec.dims.values())) if b != spec.opt_binding()]
    traced = {d: spec.export_size(d) for d in spec.dims}
    other = next((b for b in probes if b != traced), None)
    if other is None:
        return {}
    with torch.no_grad():
        shapes = [[tuple(t.shape) for t in pytree.tree_leaves(model(*spec.at(args, b))) if isinstance(t, torch.Tensor)]
                  for b in (traced, other)]
    axes: dict[str, dict[int, str]] = {}
    for name, a, b in zip(output_names, *shapes):
        for axis, (x, y) in enumerate(zip(a, b)):
            if x != y:
                dim = next((d for d in spec.dims if traced[d] == x and other[d] == y), f"{name}_{axis}")
                axes.setdefault(name, {})[axis] = dim
    return axes


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count:
        return positional[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _output_names(reference: Any) -> list[str]:
    leaves = pytree.tree_flatten_with_path(reference)[0]
    tensors = [(p, v) for p, v in leaves if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return ["output"]
    names: list[str] = []
    for i, (key_path, _) in enumerate(tensors):
        name = re.sub(r"\W+", "_", pytree.keystr(key_path)).strip("_")
        if not name or name[0].isdigit() or name in names:
            name = f"output_{i}"
        names.append(name)
    return names


def _param_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- check ------------------------------------------------------------------------------


def check_onnx(path: str | Path) -> OnnxSummary:
    """Run onnx.checker (with shape inference) on ``path``; OnnxError names what is wrong."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"no ONNX file at {path}")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise OnnxError(
            f"onnx.checker rejects {path}: {_first_line(exc)}\n"
            "Re-export with another opset (--opset), or report the exporter bug upstream."
        ) from exc
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxSummary(
        path=path,
        ir_version=model.ir_version,
        opset=opset,
        nodes=len(model.graph.node),
        inputs=[_value_info(v) for v in model.graph.input],
        outputs=[_value_info(v) for v in model.graph.output],
    )


def _value_info(value: Any) -> tuple[str, list[int | str], str]:
    import onnx

    tensor = value.type.tensor_type
    shape: list[int | str] = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
    return value.name, shape, onnx.TensorProto.DataType.Name(tensor.elem_type).lower()


def op_histogram(model_or_path: Any) -> dict[str, int]:
    """Count of each op type in the main graph (and its local functions), most common first."""
    import onnx

    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model_or_path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    for function in model.functions:
        counts.update(n.op_type for n in function.node)
    return dict(counts.most_common())


# --- validate ---------------------------------------------------------------------------


def validate_onnx(
    path: str | Path,
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ValidationReport:
    """Run the ONNX file on ONNX Runtime (CPU) and compare every output with PyTorch.

    An output passes when ``|onnx - torch| <= atol + rtol * |torch|`` everywhere (the
    ``numpy.allclose`` rule) and shapes match; the report carries the max abs difference.
    """
    import onnxruntime as ort

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(session, model, args)
    start = time.perf_counter()
    got = session.run(None, feeds)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = [t for t in pytree.tree_leaves(model.eval()(*args)) if isinstance(t, torch.Tensor)]
    names = [o.name for o in session.get_outputs()]
    if len(ref) != len(got):
        raise OnnxError(
            f"{path} has {len(got)} outputs but the model returns {len(ref)} tensors: "
            "was it exported from another model?"
        )
    diffs = [_diff(n, r, g, atol, rtol) for n, r, g in zip(names, ref, got, strict=True)]
    return ValidationReport(
        passed=all(d.passed for d in diffs),
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        atol=atol,
        rtol=rtol,
        outputs=diffs,
        provider=session.get_providers()[0],
        seconds=seconds,
    )


def validate_onnx_dims(
    path: str | Path,
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    dynamic_shapes: Any,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> list[tuple[dict[str, int], ValidationReport]]:
    """validate_onnx at every probe binding of the dims (kiln.shapes.probe_bindings: opt, all
    min, all max, each dim alone at min, max and an awkward size): one ONNX model, many sizes."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    spec = _dynamic_spec(dynamic_shapes, False, args, _input_names(model, len(args)))
    if spec is None:
        return [({}, validate_onnx(path, model, args, atol, rtol))]
    return [(b, validate_onnx(path, model, spec.at(args, b), atol, rtol))
            for b in probe_bindings(list(spec.dims.values()))]


def _feeds(session: Any, model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> dict:
    wanted = [i.name for i in session.get_inputs()]
    ours = _input_names(model, len(args))
    arrays = {name: a.detach().cpu().numpy() for name, a in zip(ours, args, strict=True)}
    if all(name in arrays for name in wanted):  # exporters drop unused inputs
        return {name: arrays[name] for name in wanted}
    if len(wanted) != len(args):
        raise OnnxError(f"the ONNX file takes inputs {wanted}, but {len(args)} example inputs were given")
    return {name: a.detach().cpu().numpy() for name, a in zip(wanted, args, strict=True)}


def _diff(name: str, ref: torch.Tensor, got: Any, atol: float, rtol: float) -> OutputDiff:
    out = torch.from_numpy(got)
    ref = ref.detach().cpu()
    if tuple(out.shape) != tuple(ref.shape):
        return OutputDiff(name, tuple(out.shape), float("inf"), False)
    if not ref.is_floating_point():
        same = bool(torch.equal(out.to(ref.dtype), ref))
        return OutputDiff(name, tuple(ref.shape), 0.0 if same else float("inf"), same)
    ref64, out64 = ref.double(), out.double()
    err = (out64 - ref64).abs()
    max_abs = float(err.max()) if err.numel() else 0.0
    finite_match = torch.equal(torch.isfinite(ref64), torch.isfinite(out64))
    ok = bool((err <= atol + rtol * ref64.abs()).all()) and finite_match
    return OutputDiff(name, tuple(ref.shape), max_abs, ok)


# --- simplify ---------------------------------------------------------------------------


def simplify_onnx(path_in: str | Path, path_out: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """Simplify with onnxslim; returns the op histograms (before, after).

    onnxslim rather than onnx-simplifier (onnxsim): onnxslim is actively maintained, is a
    pure-Python wheel (onnxsim needs a C++ build on Python versions it has no wheel for), and
    folds constants and fuses patterns with onnx's own shape inference.
    """
    import onnx

    try:
        import onnxslim
    except ImportError as exc:
        raise OnnxError("simplification needs onnxslim: pip install 'kiln[onnx]'") from exc
    model = onnx.load(str(path_in))
    before = op_histogram(model)
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:
        raise OnnxError(f"onnxslim failed on {path_in}: {_first_line(exc)}") from exc
    if slim is None:
        raise OnnxError(f"onnxslim returned no model for {path_in}")
    large = slim.ByteSize() > _EXTERNAL_DATA_BYTES if _fits_protobuf(slim) else True
    path_out = Path(path_out)
    onnx.save(slim, str(path_out), save_as_external_data=large, location=path_out.name + ".data")
    return before, op_histogram(slim)


def _fits_protobuf(model: Any) -> bool:
    try:
        model.ByteSize()
    except ValueError:
        return False
    return True
