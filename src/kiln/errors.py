"""kiln's exceptions: each names what went wrong, where, and what to do."""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class CaptureError(KilnError):
    """The model could not be captured with torch.export."""


class UnsupportedOpError(KilnError):
    """The graph holds ops that no kernel in the catalog implements."""

    def __init__(self, problems: list[tuple[str, str, str]], modules: list[str] | None = None):
        self.problems = problems  # (op name, node name, source line)
        lines = [f"kiln has no kernel for {len(problems)} op(s) in this model:"]
        for (op, node, where), module in zip(problems, modules or [""] * len(problems)):
            inside = f" in module {module}" if module else ""
            lines.append(f"  - {op} (node {node}){inside} at {where}")
        custom = sorted({op.split(".")[0] for op, _, _ in problems} - {"aten", "prims", "kiln"})
        if custom:
            lines.append(
                f"Ops of the {', '.join(custom)} namespace(s) are custom ops (torch.library) that kiln cannot "
                "see into: choose the model's plain-PyTorch code path instead of the custom op where it has "
                "one (a library setting or another implementation of that module), or register a kiln "
                "kernel for the op."
            )
        lines.append(
            "Rewrite these calls with supported operations, or register a kernel for the op "
            "(see kiln.kernels.register_kernel)."
        )
        super().__init__("\n".join(lines))


class InputError(KilnError, ValueError):
    """The inputs given to an engine do not match what it was built for."""


class RunError(KilnError, RuntimeError):
    """A step of an engine failed while running (say, an index past an embedding table): names
    the step, its op, the model's module and source line, and the kernel's own error."""


class EngineFileError(KilnError):
    """An engine file is damaged, truncated, tampered with, or of an unknown format."""


class DeviceMismatchError(KilnError):
    """The engine was built for a device this machine does not have."""


class KilnWarning(UserWarning):
    """Something kiln changed on the user's behalf (e.g. fp16 on a CPU build)."""
