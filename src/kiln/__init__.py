"""kiln: build a PyTorch model into an inference engine file, run it fast.

    engine = kiln.build(model, (x,), precision="fp16")
    y = engine(x)
    engine.save("model.kiln"); engine = kiln.load("model.kiln")
"""

__version__ = "0.1.0"

from kiln.errors import (  # noqa: E402
    CaptureError,
    DeviceMismatchError,
    EngineFileError,
    InputError,
    KilnError,
    KilnWarning,
    RunError,
    UnsupportedOpError,
)
from kiln.runtime import Engine, EngineModule, load  # noqa: E402
from kiln.shapes import Dim  # noqa: E402, F401  (dynamic shapes: kiln.Dim("batch", min=1, opt=8, max=64))


def __getattr__(name: str):
    # The build side loads on first use, so `import kiln; kiln.load(...)` stays runtime-only.
    if name in ("build", "compile", "BuildConfig"):
        from kiln import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = [
    "BuildConfig", "CaptureError", "DeviceMismatchError", "Engine", "EngineFileError", "EngineModule",
    "InputError", "KilnError", "KilnWarning", "RunError", "UnsupportedOpError", "build", "compile", "load",
]
