"""What TensorRT's ONNX parser rejects in a model, node by node, with the parser's reasons.

The parser's ``supports_model_v2`` runs every node's importer checks and records one error per
rejected node (not just the first), so one call lists them all; where it is missing (older
TensorRT) ``parse`` is used, which may stop at the first failure. A model that passes the
checks is then parsed for real, which catches failures the checks cannot see (shapes, types).
Needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.tensorrt import api

__all__ = ["Rejection", "trt_check"]


@dataclass(frozen=True)
class Rejection:
    """One ONNX node (or graph input) that TensorRT's parser will not take."""

    node_name: str
    op_type: str
    reason: str
    node_index: int = -1  # position in graph.node; -1 for graph inputs / whole-model errors


# ONNX TensorProto element types TensorRT has tensors for (others fail at import).
_TRT_ONNX_TYPES = {1, 2, 3, 6, 7, 9, 10, 11, 16, 17}  # f32 u8 i8 i32 i64 bool f16 f64 bf16 f8


def trt_check(onnx_path: str | Path) -> list[Rejection]:
    """Every node of the ONNX file that TensorRT (or TensorRT-RTX) rejects, with the reason.

    An empty list means the whole model parses. Raises TensorRTUnavailable when neither
    TensorRT is installed, and KilnError when the file cannot be read.
    """
    trt = api.trt()
    path = Path(onnx_path)
    if not path.is_file():
        raise KilnError(f"no ONNX file at {path}: export one with `kiln export-onnx MODEL -o {path}`")
    data = path.read_bytes()
    graph = _load_graph(path)
    rejections = _run(trt, data, path, graph, full_parse=False)
    if not rejections:
        rejections = _run(trt, data, path, graph, full_parse=True)
    return rejections


def _run(trt: Any, data: bytes, path: Path, graph: Any, full_parse: bool) -> list[Rejection]:
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    builder = trt.Builder(api.logger())
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, api.logger())
    with api.capture_log() as log:
        if not full_parse and hasattr(parser, "supports_model_v2"):
            ok = parser.supports_model_v2(data, str(path))
        else:
            ok = parser.parse(data, str(path))
    rejections = _errors(parser, graph)
    if not ok and not rejections:
        errors = [m for level, m in log if level in ("error", "internal_error")]
        reason = errors[-1] if errors else "the parser failed without saying why"
        rejections.append(Rejection("(model)", "", reason.strip()))
    return rejections


def _errors(parser: Any, graph: Any) -> list[Rejection]:
    seen: set[tuple[int, str]] = set()
    out: list[Rejection] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index, desc = int(err.node()), str(err.desc()).strip()
        if (index, desc) in seen:
            continue
        seen.add((index, desc))
        if index < 0:
            out.extend(_input_rejections(graph, desc))
            continue
        op = str(err.node_operator()) or _node_attr(graph, index, "op_type")
        name = str(err.node_name()) or _node_attr(graph, index, "name") or f"#{index}"
        stack = list(err.local_function_stack()) if hasattr(err, "local_function_stack") else []
        if stack:
            name = "/".join([*stack, name])
        out.append(Rejection(name, op, _reason(parser, err, op, desc), index))
    return out


def _reason(parser: Any, err: Any, op: str, desc: str) -> str:
    parts = []
    if desc and desc.lower() not in ("false", "true"):
        parts.append(desc)
    if op and not parser.supports_operator(op):
        parts.append(f"{api.flavor()} {api.version()} has no importer for ONNX op {op}")
    elif not parts:
        parts.append(f"the parser's {err.func()} check rejected this node")
    code = str(err.code()).rsplit(".", 1)[-1]
    return f"{'; '.join(parts)} [{code}]"


def _input_rejections(graph: Any, desc: str) -> list[Rejection]:
    if graph is not None:
        import onnx

        bad = [
            Rejection(
                value.name,
                "(graph input)",
                f"TensorRT has no {onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)} tensors",
            )
            for value in graph.input
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in _TRT_ONNX_TYPES
        ]
        if bad:
            return bad
    return [Rejection("(graph input)", "", desc)]


def _load_graph(path: Path) -> Any:
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - names are a nicety; the parser reports real problems
        return None


def _node_attr(graph: Any, index: int, attr: str) -> str:
    if graph is None or not 0 <= index < len(graph.node):
        return ""
    return str(getattr(graph.node[index], attr))
