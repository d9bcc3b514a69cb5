"""ONNX: export with torch.onnx, check, simplify, and validate with ONNX Runtime."""

from kiln.onnx.export import DEFAULT_ATOL, DEFAULT_RTOL, OnnxError, export_onnx, validate_onnx

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "OnnxError", "export_onnx", "validate_onnx"]
