"""kiln serve: engines behind the Open Inference Protocol (KServe v2) on Ray Serve.

    import kiln.serve
    application = kiln.serve.app("resnet50.kiln")           # a bound Serve application
    served = kiln.serve.run(["resnet50.kiln"], port=8000)   # HTTP on 127.0.0.1:8000/v2/...
    kiln.serve.shutdown(served)

`kiln.serve.protocol` (wire format) and `kiln.serve.batching` (padding and slicing) are
plain functions that need no Ray; the rest imports Ray (`pip install "kiln[serve]"`).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "app": "kiln.serve.deploy",
    "server_app": "kiln.serve.deploy",
    "run": "kiln.serve.deploy",
    "shutdown": "kiln.serve.deploy",
    "connect": "kiln.serve.deploy",
    "Served": "kiln.serve.deploy",
    "model_name": "kiln.serve.deploy",
    "KilnModel": "kiln.serve.model",
    "KilnServer": "kiln.serve.model",
}


def __getattr__(name: str) -> Any:
    # Ray loads on first use, so `kiln.serve.protocol` works where Ray is not installed.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")


__all__ = ["KilnModel", "KilnServer", "Served", "app", "connect", "model_name", "run", "server_app", "shutdown"]
