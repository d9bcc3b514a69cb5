"""Capture-time rewrites: applied where their preconditions hold, same outputs, modules restored."""

import pytest
import torch
from torch import nn

import kiln
from kiln.capture.export import capture
from kiln.errors import CaptureError

COPIES = {"aten.clone.default", "aten.copy.default", "aten._unsafe_view.default", "aten.expand.default"}


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True, **call):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.call = {"need_weights": False, **call}

    def forward(self, x):
        y = self.ln(x)
        return x + self.att(y, y, y, **self.call)[0]


def _ops(graph):
    return [str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"]


def _capture(model, x, rewrites=None):
    return capture(model.eval(), (x,), device=torch.device("cpu"), rewrites=rewrites)


def test_batch_first_attention_traces_without_copies():
    model, x = SelfAttention().eval(), torch.randn(2, 7, 32)
    before = _capture(model, x, rewrites=[])
    after = _capture(model, x)
    assert after.rewrites == {"batch_first_attention": 1} and before.rewrites == {}
    assert COPIES & set(_ops(before)), "the traced F.multi_head_attention_forward copies Q/K/V"
    assert not COPIES & set(_ops(after))
    assert _ops(after).count("aten.scaled_dot_product_attention.default") == 1
    with torch.no_grad():
        torch.testing.assert_close(after.run(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)
    assert "forward" not in model.att.__dict__, "the module's own forward is back after capture"


@pytest.mark.parametrize(
    "model",
    [
        SelfAttention(need_weights=True),
        SelfAttention(batch_first=False),
        SelfAttention(attn_mask=torch.zeros(7, 7).bool()),
    ],
    ids=["weights returned", "sequence first", "masked"],
)
def test_batch_first_attention_declines_what_it_does_not_cover(model):
    x = torch.randn(2, 7, 32)
    graph = _capture(model, x)
    assert graph.rewrites == {}
    with torch.no_grad():
        torch.testing.assert_close(graph.run(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_is_causal_is_left_to_the_module():
    # the module refuses is_causal without a mask; the rewrite must not quietly compute
    # non-causal attention instead
    with pytest.raises(CaptureError, match="is_causal|attn_mask"):
        _capture(SelfAttention(is_causal=True), torch.randn(2, 7, 32))


def test_cross_attention_is_left_alone():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, memory):
            return self.att(x, memory, memory, need_weights=False)[0]

    model, x, memory = Cross().eval(), torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    graph = capture(model, (x, memory), device=torch.device("cpu"))
    assert graph.rewrites == {}
    with torch.no_grad():
        torch.testing.assert_close(graph.run(x, memory), model(x, memory), atol=1e-5, rtol=1e-5)


def test_modules_are_restored_when_export_fails():
    class Fails(SelfAttention):
        def forward(self, x):
            y = super().forward(x)
            if y.sum() > 0:  # data-dependent control flow: torch.export refuses
                return y
            return -y

    model = Fails().eval()
    with pytest.raises(CaptureError):
        _capture(model, torch.randn(2, 7, 32))
    assert "forward" not in model.att.__dict__


def test_build_reports_rewrites_and_engine_matches_eager():
    model, x = SelfAttention().eval(), torch.randn(2, 7, 32)
    engine = kiln.build(model, (x,), device="cpu")
    assert engine.header["build"]["capture_rewrites"] == {"batch_first_attention": 1}
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), atol=1e-5, rtol=1e-5)
    off = kiln.build(model, (x,), config=kiln.BuildConfig(device="cpu", rewrites=[]))
    assert off.header["build"]["capture_rewrites"] == {}


def test_unknown_rewrite_is_named():
    with pytest.raises(ValueError, match="unknown capture rewrite.*nope.*batch_first_attention"):
        _capture(SelfAttention(), torch.randn(2, 7, 32), rewrites=["nope"])


def test_two_rewrites_of_one_module_are_both_undone():
    from kiln.capture import rewrites as capture_rewrites

    @capture_rewrites.register_rewrite(torch.nn.MultiheadAttention, name="test_second")
    def second(module, original, note):
        return original

    try:
        model = SelfAttention().eval()
        graph = _capture(model, torch.randn(2, 7, 32))
        assert graph.rewrites == {"batch_first_attention": 1}
        assert "forward" not in model.att.__dict__
    finally:
        del capture_rewrites.REWRITES["test_second"]
