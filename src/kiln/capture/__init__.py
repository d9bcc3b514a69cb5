"""Capture: nn.Module + example inputs → a core-ATen FX graph (torch.export), with
registered module rewrites applied while tracing."""

from kiln.capture.export import capture, check_example_inputs

__all__ = ["capture", "check_example_inputs"]
