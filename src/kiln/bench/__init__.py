"""Benchmarks: kiln side by side with its peers (eager, CUDA graphs, torch.compile, ONNX
Runtime, TensorRT), measured in one process, reported as tables and plots."""
