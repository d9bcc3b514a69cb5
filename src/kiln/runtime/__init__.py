"""The run side: engine files, the Engine, its execution contexts and its drop-in module.
Imports nothing from the build side (capture, passes, select, plan): a deployment needs this
package and the file."""

from kiln.runtime.context import ExecutionContext
from kiln.runtime.engine import Engine, EngineModule, cudnn_benchmark, default_device, load

__all__ = ["Engine", "EngineModule", "ExecutionContext", "cudnn_benchmark", "default_device", "load"]
