"""Capture: nn.Module + example inputs → a core-ATen FX graph (torch.export), with
registered module rewrites applied while tracing."""

from kiln.capture.export import ExampleInputs, bind_example_inputs, capture, check_example_inputs

__all__ = ["ExampleInputs", "bind_example_inputs", "capture", "check_example_inputs"]
