"""An op without a kernel: every such op listed once, with the model source line it came from."""

import pytest
import torch
from torch import nn

import kiln


@torch.library.custom_op("kilntest::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOps(nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        y = torch.ops.kilntest.wobble(y)  # first unsupported call
        return torch.ops.kilntest.wobble(y + 1)  # second unsupported call


def test_every_unsupported_op_is_listed_with_its_source_line():
    with pytest.raises(kiln.UnsupportedOpError) as info:
        kiln.build(UsesCustomOps(), (torch.randn(4),))
    err = info.value
    assert [p[0] for p in err.problems] == ["kilntest.wobble.default"] * 2
    message = str(err)
    assert "kiln has no kernel for 2 op(s)" in message
    assert "test_unsupported.py" in message
    assert "# first unsupported call" in message and "# second unsupported call" in message
    assert "register a kernel" in message
    assert "kilntest namespace(s) are custom ops" in message, "what to do about a custom op"


class Block(nn.Module):
    def forward(self, x):
        return torch.ops.kilntest.wobble(x) * 2


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), Block()])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def test_an_unsupported_op_names_its_module_path():
    with pytest.raises(kiln.UnsupportedOpError) as info:
        kiln.build(Nested(), (torch.randn(4),))
    assert "(node wobble) in module layers.1 at" in str(info.value)


def test_a_registered_kernel_makes_the_op_buildable():
    from kiln.kernels import KERNELS, register_kernel, resolve_op

    @register_kernel("test.wobble", provider="test", implements=lambda op: op == "kilntest.wobble.default",
                     writes_planned_outputs=False)
    def make(name, out):
        op = resolve_op(name)
        return lambda args, kwargs, outs: op(*args, **kwargs)

    try:
        x = torch.randn(4)
        engine = kiln.build(UsesCustomOps(), (x,))
        torch.testing.assert_close(engine(x), UsesCustomOps()(x))
        assert {s["kernel"] for s in engine.plan["steps"]} >= {"test.wobble"}
    finally:
        del KERNELS["test.wobble"]
