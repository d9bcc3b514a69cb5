"""Data-dependent ops at build: folded where the data is constant, otherwise a CaptureError that
names the op and the model's source line with advice; never a raw torch exception."""

import re

import pytest
import torch
from torch import nn
from torch._dynamo import exc as dynamo_exc
from torch._subclasses import fake_tensor

import kiln
from kiln.capture.failures import explain


class ConstantMasks(nn.Module):
    """Every data-dependent op here reads only weights (a mask buffer, a parameter)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.register_buffer("keep", torch.tensor([True, False, True, True, False, True]))
        self.register_buffer("grid", torch.rand(2, 6) > 0.5)
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = self.lin(x)  # [B, 2, 6]
        from_weights = self.w > 0
        return (
            h[:, :, self.keep],  # a boolean buffer as an index
            h[..., from_weights] * 2,  # a mask computed from weights only
            h[:, self.grid],  # a 2-D mask over two dims
            torch.masked_select(h, self.grid),  # broadcast to h's shape
            torch.nonzero(self.keep),  # nonzero of a constant: a constant
            h * self.w.abs().max().item(),  # .item() of a weight: a number
        )


def test_constant_masks_fold_into_indices_and_match_eager():
    model = ConstantMasks().eval()
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, 3.0]))
    x = torch.randn(3, 2, 6)
    engine = kiln.build(model, (x,), device="cpu")
    ops = {s["op"] for s in engine.plan["steps"]}
    assert not ops & {"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default"}
    for inputs in (x, torch.randn(3, 2, 6)):
        with torch.no_grad():
            expected = model(inputs)
        got = engine(inputs)
        assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class MaskFromInput(nn.Module):
    def forward(self, x):
        return x[x > 0]  # data-dependent mask


class NonzeroOfInput(nn.Module):
    def forward(self, x):
        return torch.nonzero(x)  # data-dependent nonzero


class MaskedSelectOfInput(nn.Module):
    def forward(self, x):
        return torch.masked_select(x, x > 0.5)  # data-dependent masked_select


class ItemOfInput(nn.Module):
    def forward(self, x):
        return x * x.sum().item()  # data-dependent item


class MixedMasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("keep", torch.tensor([True, False, True, True]))

    def forward(self, x):
        return x[:, self.keep], x[x > 0]  # data-dependent second


@pytest.mark.parametrize(
    "model, op, what, advice",
    [
        (MaskFromInput(), "aten.index.Tensor", r"boolean-mask indexing \(x\[mask\]\)", r"torch.where\(mask, x, 0\)"),
        (NonzeroOfInput(), "aten.nonzero.default", "nonzero", "torch.where"),
        (MaskedSelectOfInput(), "aten.masked_select.default", "masked_select", "torch.where"),
        (ItemOfInput(), "aten._local_scalar_dense.default", r"\.item\(\)", r"keep the value a tensor"),
        (MixedMasks(), "aten.index.Tensor", r"boolean-mask indexing", "torch.where"),
    ],
    ids=["mask", "nonzero", "masked_select", "item", "mixed"],
)
def test_data_dependent_ops_name_the_op_and_the_source_line(model, op, what, advice):
    with pytest.raises(kiln.CaptureError) as info:
        kiln.build(model.eval(), (torch.randn(2, 4),), device="cpu")
    message = str(info.value)
    assert "1 op(s) whose output shape or value depends on the values of its inputs" in message
    assert op in message
    assert re.search(what, message) and re.search(advice, message)
    assert "test_build_errors.py" in message and "# data-dependent" in message, "the model's source line"
    assert info.value.problems[0][0] == op


class BranchOnValue(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branch on a value
            return x * 2
        return x


class SizeFromValue(nn.Module):
    def forward(self, x):
        n = int(x.abs().sum().item()) + 1
        return torch.zeros(n)  # size from a value


@pytest.mark.parametrize("model, line", [(BranchOnValue(), "# branch on a value"),
                                         (SizeFromValue(), "int(x.abs().sum().item())")])
def test_guards_on_data_are_capture_errors_with_the_line_and_advice(model, line):
    with pytest.raises(kiln.CaptureError) as info:
        kiln.build(model.eval(), (torch.randn(3),), device="cpu")
    message = str(info.value)
    assert message.startswith(f"torch.export could not capture {type(model).__name__}")
    assert "branches on, or sizes a tensor by, a value read from tensor data" in message
    assert "test_build_errors.py" in message and line in message
    assert "torch.where" in message and "torch._check" in message
    assert "Traceback" not in message and len(message) < 1500, "a summary, not torch's whole message"


def test_a_model_that_raises_while_traced_is_named_with_its_line():
    class Broken(nn.Module):
        def forward(self, x):
            return x @ torch.ones(5, 2)  # wrong shapes

    with pytest.raises(kiln.CaptureError, match=r"could not capture Broken.*\n  at .*test_build_errors.py:\d+"):
        kiln.build(Broken().eval(), (torch.randn(3, 4),), device="cpu")


def test_an_unexpected_failure_in_a_later_stage_is_a_kiln_error_naming_the_stage(monkeypatch):
    import kiln.builder

    def broken_passes(graph, names=None):
        raise RuntimeError("something internal went wrong")

    monkeypatch.setattr(kiln.builder, "run_passes", broken_passes)
    with pytest.raises(kiln.KilnError, match="passes stage.*RuntimeError: something internal") as info:
        kiln.build(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), device="cpu")
    assert type(info.value) is kiln.KilnError and isinstance(info.value.__cause__, RuntimeError)


def test_a_data_dependent_failure_in_a_later_stage_is_a_capture_error(monkeypatch):
    import kiln.builder

    def failing_select(graph, cache, exact=False):
        raise fake_tensor.DynamicOutputShapeException(torch.ops.aten.nonzero.default)

    monkeypatch.setattr(kiln.builder, "select_kernels", failing_select)
    with pytest.raises(kiln.CaptureError, match=r"nonzero \(aten.nonzero.default\).*static shapes"):
        kiln.build(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), device="cpu")


@pytest.mark.parametrize(
    "exc, kind, pattern",
    [
        (lambda: fake_tensor.DataDependentOutputException(torch.ops.aten._local_scalar_dense.default),
         kiln.CaptureError, r"\.item\(\)"),
        (lambda: fake_tensor.UnsupportedOperatorException(torch.ops.aten.nonzero.default),
         kiln.CaptureError, "no shape function"),
        (lambda: dynamo_exc.UserError(dynamo_exc.UserErrorType.DYNAMIC_CONTROL_FLOW, "bad flow"),
         kiln.CaptureError, "dynamic control flow: bad flow"),
        (lambda: ValueError("odd"), kiln.KilnError, "plan stage.*ValueError: odd"),
    ],
)
def test_explain_classifies_known_torch_exceptions(exc, kind, pattern):
    error = explain(exc(), nn.Linear(1, 1), "plan")
    assert isinstance(error, kind)
    assert re.search(pattern, str(error)), str(error)
