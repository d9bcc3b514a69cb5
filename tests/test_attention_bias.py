"""fuse_attention: attention written out in ops (bmm → scale → + bias → softmax → bmm) becomes one
scaled_dot_product_attention with an additive mask, the bias kept in its broadcast shape."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn

import kiln
from kiln.capture.export import capture
from kiln.kernels import OpCall, candidates
from kiln.passes import copy_graph, run_passes
from kiln.passes.fuse_attention import fuse_attention
from kiln.specs import TensorSpec

CPU = torch.device("cpu")
FP32 = dict(rtol=1e-5, atol=1e-5)  # fp32 on the CPU: same math, another summation order
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _ops(graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.module.graph.nodes if n.op == "call_function")


def _sdpa_nodes(graph):
    return [n for n in graph.module.graph.nodes if n.target is SDPA]


def _fused(model, args):
    before = capture(model.eval(), args, device=CPU)
    after = fuse_attention(copy_graph(before))
    with torch.no_grad():
        want = model(*args)
    return before, after, want[0] if isinstance(want, tuple) else want


class Written(nn.Module):
    """Multi-head attention as people write it: q @ kᵀ / √d + bias → softmax → @ v."""

    def __init__(self, width: int = 32, heads: int = 4, bias: str = "none") -> None:
        super().__init__()
        self.heads, self.kind = heads, bias
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        pos = torch.arange(n, device=x.device)
        if self.kind in ("alibi", "alibi_causal"):  # ALiBi: -slope·distance, a [H, 1, N] bias per key
            scores = scores + (self.slopes[:, None, None] * -(pos[None, None, :] - pos[None, :, None]).abs())
        if self.kind in ("causal", "alibi_causal"):
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        if pad is not None:  # BERT-style: [B, 1, 1, N] additive, 0 or a large negative
            scores = scores + (1.0 - pad[:, None, None, :]) * torch.finfo(scores.dtype).min
        attn = scores.softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("kind", ["none", "alibi", "causal", "alibi_causal", "padding"])
def test_written_attention_becomes_sdpa(kind):
    x = torch.randn(2, 12, 32)
    pad = torch.ones(2, 12)
    pad[1, 7:] = 0
    args = (x, pad) if kind == "padding" else (x,)
    before, after, want = _fused(Written(bias="none" if kind == "padding" else kind), args)
    ops_before, ops_after = _ops(before), _ops(after)
    assert ops_before["aten.bmm.default"] == 2 and ops_before["aten._softmax.default"] == 1
    assert ops_after["aten.bmm.default"] == 0 and ops_after["aten._softmax.default"] == 0
    (node,) = _sdpa_nodes(after)
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))
    mask = node.args[3]
    if kind == "none":
        assert mask is None
    else:
        shape = tuple(mask.meta["val"].shape)
        expected = {"alibi": (1, 4, 12, 12), "causal": (1, 1, 12, 12), "alibi_causal": (1, 4, 12, 12),
                    "padding": (2, 1, 1, 12)}[kind]
        assert shape == expected, "the bias keeps its broadcast shape, never the scores' [B, H, N, N]"
    torch.testing.assert_close(after.run(*args), want, **FP32)


def test_fused_graph_runs_whatever_layout_the_backend_returns(monkeypatch):
    """Which SDPA backend runs is chosen after the passes, and CUDA's fused ones return
    [B, H, N, D] laid out as [B, N, H, D]: the dims the pass merges after SDPA must not assume
    the layout the pass saw (here: contiguous)."""
    import kiln.passes.fuse_attention as pass_module

    def contiguous(*args, **kwargs):
        return SDPA(*args, **kwargs).contiguous()

    def heads_inner(*args, **kwargs):  # the same values, the other layout
        return SDPA(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    x = torch.randn(2, 12, 32)
    monkeypatch.setattr(pass_module, "SDPA", contiguous)
    _, after, want = _fused(Written(), (x,))
    (node,) = [n for n in after.module.graph.nodes if n.target is contiguous]
    node.target = heads_inner
    after.module.recompile()
    torch.testing.assert_close(after.run(x), want, **FP32)


def test_scale_applied_after_a_bias_scales_the_bias_too():
    class Late(nn.Module):
        def forward(self, q, k, v, bias):
            return torch.softmax((q @ k.transpose(-1, -2) + bias) * 0.25 - bias, -1) @ v

    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    bias = torch.randn(1, 3, 6, 6)
    _, after, want = _fused(Late(), (q, k, v, bias))
    assert len(_sdpa_nodes(after)) == 1 and _ops(after)["aten._softmax.default"] == 0
    torch.testing.assert_close(after.run(q, k, v, bias), want, **FP32)


def test_scores_used_elsewhere_are_left_alone():
    class Returns(nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-1, -2), -1)
            return p @ v, p  # the probabilities are an output: there is nothing to fuse

    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    _, after, _ = _fused(Returns(), (q, k, v))
    assert not _sdpa_nodes(after) and _ops(after)["aten._softmax.default"] == 1


def _t5_encoder():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, vocab_size=100)
    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel._from_config(config, attn_implementation="eager").eval()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, ids, mask):
            return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # padding in the second sequence
    return Encoder().eval(), (ids, mask)


def test_t5_encoder_with_padding_runs_sdpa_with_its_position_bias(tmp_path):
    model, args = _t5_encoder()
    before = capture(model, args, device=CPU)
    after, report = run_passes(before)
    ops = _ops(after)
    assert ops["aten.scaled_dot_product_attention.default"] == 2
    assert ops["aten._softmax.default"] == 0
    assert all(n.kwargs["scale"] == 1.0 for n in _sdpa_nodes(after)), "T5 does not scale its scores"
    counts = {r["pass"]: r["ops"] for r in report}
    assert counts["fuse_attention"] < counts["dead_code"]
    # the softmax is no longer a row program: the two RMS norms per block and the final one are
    assert ops["kiln.rowwise.default"] == 5
    with torch.no_grad():
        want = model(*args)
    torch.testing.assert_close(after.run(*args), want, **FP32)
    engine = kiln.build(model, args, config=kiln.BuildConfig(device="cpu"))
    assert sum(s["op"] == "aten.scaled_dot_product_attention.default" for s in engine.plan["steps"]) == 2
    torch.testing.assert_close(engine(*args), want, **FP32)


def test_swin_shifted_window_bias_broadcasts_without_the_batch():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformerBlock

    del torchvision
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=32, num_heads=2, window_size=[4, 4], shift_size=[2, 2]).eval()
    x = torch.randn(3, 8, 8, 32)
    before, after, want = _fused(block, (x,))
    (node,) = _sdpa_nodes(after)
    assert _ops(after)["aten._softmax.default"] == 0
    # 3 images × 4 windows × 2 heads regrouped as [3, 8]: the bias (position bias + shift mask) is [1, 8, N, N]
    assert tuple(node.args[0].meta["val"].shape[:2]) == (3, 8)
    assert tuple(node.args[3].meta["val"].shape) == (1, 8, 16, 16)
    torch.testing.assert_close(after.run(x), want, **FP32)
    full, _ = run_passes(before)
    torch.testing.assert_close(full.run(x), want, **FP32)


def test_timm_swin_block():
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformerBlock

    del timm
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=32, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2).eval()
    x = torch.randn(2, 8, 8, 32)
    _, after, want = _fused(block, (x,))
    assert len(_sdpa_nodes(after)) == 1 and _ops(after)["aten._softmax.default"] == 0
    torch.testing.assert_close(after.run(x), want, **FP32)


def test_fp16_bias_is_cast_to_the_query_dtype():
    """The efficient kernel wants the mask in q's dtype: an fp32 bias added to fp16 scores is cast."""

    class Mixed(nn.Module):  # as fp16 models write it: the softmax in fp32, cast back for @ v
        def forward(self, q, k, v, bias):
            return torch.softmax((q @ k.transpose(-1, -2)).float() + bias.float(), -1).to(q.dtype) @ v

    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float16) for _ in range(3))
    bias = torch.randn(6, 6)  # added in fp32
    before = capture(Mixed().eval(), (q, k, v, bias), device=CPU, compute_dtype=torch.float16)
    after = fuse_attention(copy_graph(before))
    (node,) = _sdpa_nodes(after)
    assert node.args[3].meta["val"].dtype == torch.float16
    assert _ops(after)["aten._softmax.default"] == 0
    torch.testing.assert_close(after.run(q, k, v, bias), before.run(q, k, v, bias), rtol=2e-2, atol=2e-2)


def test_efficient_and_cudnn_take_a_mask_flash_does_not():
    q = TensorSpec("q", (2, 4, 16, 8), torch.float16)
    mask16, mask32 = TensorSpec("m", (1, 4, 16, 16), torch.float16), TensorSpec("m", (1, 4, 16, 16), torch.float32)

    def names(*inputs):
        return {k.name for k in candidates(OpCall(SDPA_NAME, inputs, (q,), "cuda"))}

    assert names(q, q, q, mask16) == {"aten", "sdpa.efficient", "sdpa.cudnn"}
    assert names(q, q, q, mask32) == {"aten"}
    assert names(q, q, q) == {"aten", "sdpa.flash", "sdpa.efficient", "sdpa.cudnn"}


SDPA_NAME = "aten.scaled_dot_product_attention.default"


@pytest.mark.gpu
def test_fp16_t5_on_cuda_runs_a_fused_attention_backend(tmp_path):
    model, args = _t5_encoder()
    config = kiln.BuildConfig(device="cuda", precision="fp16", timing_cache=str(tmp_path / "cache.json"))
    engine = kiln.build(model, args, config=config)
    steps = [s for s in engine.plan["steps"] if s["op"] == SDPA_NAME]
    assert len(steps) == 2
    for step in steps:
        timed = set(step.get("timings_ms", {}))
        assert {"sdpa.efficient"} <= timed, timed  # the masked call is a candidate of a fused backend
        assert step["kernel"] != "kiln.reference" and step["kernel"] in {"aten", "sdpa.efficient", "sdpa.cudnn"}
    cuda_args = tuple(a.cuda() for a in args)
    with torch.no_grad():
        want = model.cuda().half()(*cuda_args)
    torch.testing.assert_close(engine(*cuda_args).float(), want.float(), rtol=2e-2, atol=2e-2)


def test_written_attention_with_a_dynamic_batch_keeps_the_batch_dynamic():
    """fuse_attention computes its views' sizes as integers; on a graph with dynamic dims that
    would fix the batch at the traced size, so it leaves such attention written out."""
    model = Written(bias="alibi").eval()
    x = torch.randn(4, 12, 32)
    batch = kiln.Dim("batch", min=1, opt=4, max=8)
    engine = kiln.build(model, (x,), device="cpu", dynamic_shapes=({0: batch},))
    for n in (1, 3, 8):
        y = torch.randn(n, 12, 32)
        with torch.no_grad():
            torch.testing.assert_close(engine(y), model(y), **FP32)
