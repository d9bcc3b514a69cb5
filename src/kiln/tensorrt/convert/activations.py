"""kiln's activation vocabulary (kiln.ops.vocabulary) as TensorRT layers, for the fused ops'
``act`` argument and the activations of ``kiln::pointwise`` programs.

``LAYERS`` maps a name to one ``IActivationLayer`` (its ``ActivationType`` with alpha, beta);
``GATED`` to ``x * gate(x)`` with the gate such a layer; ``none`` is the input itself.
``act_layer`` adds one activation layer; the ATen activation converters use it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.tensorrt.convert.errors import Decline

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

__all__ = ["GATED", "LAYERS", "act_layer", "named_activation"]

Layer = tuple[str, float | None, float | None]  # ActivationType name, alpha, beta

HARD_SIGMOID: Layer = ("HARD_SIGMOID", 1.0 / 6.0, 0.5)  # relu6(x + 3) / 6
LAYERS: dict[str, Layer] = {
    "relu": ("RELU", None, None),
    "relu6": ("CLIP", 0.0, 6.0),
    "sigmoid": ("SIGMOID", None, None),
    "tanh": ("TANH", None, None),
    "gelu": ("GELU_ERF", None, None),
    "gelu_tanh": ("GELU_TANH", None, None),
    "hardsigmoid": HARD_SIGMOID,
}
GATED: dict[str, Layer] = {"silu": ("SIGMOID", None, None), "hardswish": HARD_SIGMOID}


def act_layer(ctx: ConversionContext, x: Any, kind: str, alpha: float | None = None, beta: float | None = None) -> Any:
    """One TensorRT activation layer of ``ActivationType`` ``kind`` on ITensor ``x``."""
    if x.dtype not in (ctx.trt.float32, ctx.trt.float16, ctx.trt.bfloat16):
        raise Decline(f"{kind.lower()} on {x.dtype} (TensorRT activations are floating point)")
    layer = ctx.network.add_activation(x, getattr(ctx.trt.ActivationType, kind))
    if alpha is not None:
        layer.alpha = alpha
    if beta is not None:
        layer.beta = beta
    return layer.get_output(0)


def named_activation(ctx: ConversionContext, x: Any, act: str) -> Any:
    """Activation ``act`` of the vocabulary on ITensor ``x``."""
    if act == "none":
        return x
    if act in GATED:
        return ctx.elementwise(x, act_layer(ctx, x, *GATED[act]), ctx.trt.ElementWiseOperation.PROD)
    if act not in LAYERS:
        raise Decline(f"unknown kiln activation {act!r}")
    return act_layer(ctx, x, *LAYERS[act])
