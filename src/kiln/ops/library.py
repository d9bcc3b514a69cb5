"""How kiln defines its own ops: a reference implementation registered as `kiln::name`."""

from __future__ import annotations

from collections.abc import Callable

import torch


def define_op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Register `reference` as op kiln::name, and as its own fake implementation (so shapes
    and strides always agree with what the reference produces)."""

    def deco(reference: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"kiln::{name}", mutates_args=())(reference)
        op.register_fake(reference)
        return op

    return deco
