"""kiln.passes.causal_mask: a constant causal attention mask becomes is_causal=True, from the
mask's values alone; any other mask stays. Outputs after the pass equal those before within fp32
rounding (atol 1e-6, rtol 1e-5: only the order of the softmax's sums may change)."""

import math

import pytest
import torch
from torch import nn

import kiln
from kiln.capture.export import capture
from kiln.passes import PIPELINE, run_passes
from kiln.passes.causal_mask import is_causal_mask

SDPA = torch.ops.aten.scaled_dot_product_attention.default
L = 8
NEG = torch.finfo(torch.float32).min
TOL = dict(atol=1e-6, rtol=1e-5)


def causal_bool(rows: int = L, cols: int = L) -> torch.Tensor:
    return torch.ones(rows, cols, dtype=torch.bool).tril()


def additive(keep: torch.Tensor, dropped: float) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, dropped)


class MaskedSDPA(nn.Module):
    """SDPA with a constant mask (a buffer: a weight in the captured graph), optionally expanded
    in the graph to q's batch and heads, optionally plus a mask given at run time."""

    def __init__(self, mask: torch.Tensor, expand: bool = False, extra: bool = False):
        super().__init__()
        self.register_buffer("mask", mask)
        self.expand, self.extra = expand, extra

    def forward(self, q, k, v, padding=None):
        mask = self.mask
        if self.expand:
            mask = mask.expand(q.shape[0], q.shape[1], *mask.shape[-2:])
        if self.extra:
            mask = mask + padding
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


def qkv(batch: int = 2, heads: int = 3, rows: int = L, cols: int = L) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return torch.randn(batch, heads, rows, 4), torch.randn(batch, heads, cols, 4), torch.randn(batch, heads, cols, 4)


def sdpa_nodes(graph) -> list:
    return [n for n in graph.module.graph.nodes if n.target == SDPA]


def before_after(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    before, _ = run_passes(capture(model.eval(), inputs, device=torch.device("cpu")), ["constant_fold"])
    after, _ = run_passes(before, ["causal_mask"])
    torch.testing.assert_close(after.run(*inputs), before.run(*inputs), **TOL)
    return before, after


def assert_causal(after) -> None:
    (node,) = sdpa_nodes(after)
    assert len(node.args) == 3 and node.kwargs == {"scale": 0.3, "is_causal": True}
    assert not any(n.op == "get_attr" for n in after.module.graph.nodes), "the mask weight is gone"


def assert_unchanged(before, after) -> None:
    assert after.module.code == before.module.code, "the pass changed nothing"
    (node,) = sdpa_nodes(after)
    assert len(node.args) == 4 and not node.kwargs.get("is_causal", False)


@pytest.mark.parametrize(
    "mask",
    [
        causal_bool()[None, None],
        additive(causal_bool(), float("-inf"))[None, None],
        additive(causal_bool(), NEG)[None, None],
        additive(causal_bool(), NEG / 2),  # no leading dims; the largest value still counted as dropped
        causal_bool().expand(2, 3, L, L).clone(),  # one copy per batch and head, all the same
        causal_bool().expand(2, 1, L, L).clone(),  # transformers' (batch, 1, L, L)
    ],
    ids=["bool", "additive-inf", "additive-finfo-min", "additive-half-min-2d", "per-batch-and-head", "per-batch"],
)
def test_constant_causal_mask_becomes_is_causal(mask):
    before, after = before_after(MaskedSDPA(mask), qkv())
    assert_causal(after)
    torch.testing.assert_close(
        after.run(*qkv()), nn.functional.scaled_dot_product_attention(*qkv(), is_causal=True, scale=0.3), **TOL
    )


def test_mask_expanded_in_the_graph_becomes_is_causal():
    """Large once expanded, the mask stays expand(weight) after constant folding: read through the expand."""
    before, after = before_after(MaskedSDPA(causal_bool(300, 300), expand=True), qkv(rows=300, cols=300))
    assert any(n.target == torch.ops.aten.expand.default for n in before.module.graph.nodes)
    assert_causal(after)


def _one_changed() -> torch.Tensor:
    mask = causal_bool().expand(2, 3, L, L).clone()
    mask[1, 2, 5, 1] = False  # one head of one batch differs
    return mask


def _padded() -> torch.Tensor:
    mask = additive(causal_bool(), float("-inf"))
    mask[:, 0] = float("-inf") * torch.ones(L)  # causal + padding of key 0 (row 0 keeps nothing)
    mask[0, 0] = 0.0
    return mask


@pytest.mark.parametrize(
    "mask",
    [
        _one_changed(),
        causal_bool().T.contiguous()[None, None],  # upper triangular
        causal_bool().tril(-1)[None, None],  # without the diagonal
        _padded()[None, None],
        additive(causal_bool(), -1e4)[None, None],  # not very negative enough to be dropped exactly
        additive(causal_bool(), float("-inf"))[None, None] + 0.5 * torch.eye(L),  # causal + a bias
        causal_bool().float()[None, None],  # 1/0 as an additive float mask: a bias, not a mask
    ],
    ids=["one-entry-changed", "upper-triangular", "no-diagonal", "causal-plus-padding", "minus-1e4",
         "causal-plus-bias", "bool-as-float"],
)
def test_other_constant_masks_stay(mask):
    before, after = before_after(MaskedSDPA(mask), qkv())
    assert_unchanged(before, after)


def test_causal_mask_plus_a_run_time_padding_mask_stays():
    q, k, v = qkv()
    padding = torch.zeros(2, 1, 1, L)
    padding[0, ..., -2:] = float("-inf")
    model = MaskedSDPA(additive(causal_bool(), float("-inf")), extra=True)
    before, after = before_after(model, (q, k, v, padding))
    assert_unchanged(before, after)


@pytest.mark.parametrize("rows,cols", [(4, 8), (8, 4)])
def test_non_square_masks_stay_even_when_top_left_causal(rows, cols):
    """torch's is_causal for L != S is the top-left aligned tril; it is left alone on purpose
    (the flash backend aligns non-square causal masks bottom-right and refuses them)."""
    for mask in (causal_bool(rows, cols), torch.ones(rows, cols, dtype=torch.bool).tril(cols - rows)):
        before, after = before_after(MaskedSDPA(mask[None, None]), qkv(rows=rows, cols=cols))
        assert_unchanged(before, after)


class HandWrittenCausal(nn.Module):
    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[-2], device=q.device)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(pos[None, :] > pos[:, None], self.fill)
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("fill", [float("-inf"), NEG])
def test_hand_written_causal_attention_becomes_is_causal_in_the_pipeline(fill):
    inputs = qkv()
    graph = capture(HandWrittenCausal(fill).eval(), inputs, device=torch.device("cpu"))
    upto = list(PIPELINE[: PIPELINE.index("causal_mask")])
    before, _ = run_passes(graph, upto)
    after, _ = run_passes(before, ["causal_mask"])
    (node,) = sdpa_nodes(after)
    assert len(node.args) == 3 and node.kwargs.get("is_causal") is True
    torch.testing.assert_close(after.run(*inputs), before.run(*inputs), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(after.run(*inputs), HandWrittenCausal(fill)(*inputs), **TOL)


def test_engine_runs_and_reloads_the_causal_step(tmp_path):
    """The step validates (is_causal is a keyword of SDPA's schema) and runs after a save and load."""
    inputs = qkv()
    model = MaskedSDPA(causal_bool()[None, None]).eval()
    engine = kiln.build(model, inputs, device="cpu")
    (step,) = [s for s in engine.plan["steps"] if "scaled_dot_product_attention" in s["op"]]
    assert step["kwargs"].get("is_causal") is True and len(step["args"]) == 3
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(engine(*inputs), expected, **TOL)
    engine.save(tmp_path / "causal.kiln")
    torch.testing.assert_close(kiln.load(tmp_path / "causal.kiln")(*inputs), expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_is_causal_mask_reads_the_dropped_value_in_the_masks_own_dtype(dtype):
    shape = (2, 3, L, 4)
    low = torch.finfo(dtype).min
    assert is_causal_mask(additive(causal_bool(), low).to(dtype), shape, shape)
    assert is_causal_mask(additive(causal_bool(), float("-inf")).to(dtype), shape, shape)
    assert not is_causal_mask(additive(causal_bool(), low / 4).to(dtype), shape, shape)
    assert not is_causal_mask(additive(causal_bool(), float("nan")).to(dtype), shape, shape)


def test_is_causal_mask_refuses_dynamic_and_mismatched_shapes():
    q = (2, 3, L, 4)
    assert is_causal_mask(causal_bool()[None], q, q), "a 3-d mask broadcasts over the batch"
    assert not is_causal_mask(causal_bool(), q, (2, 3, L + 1, 4))
    assert not is_causal_mask(causal_bool(), (2, 3, "s0", 4), (2, 3, "s0", 4)), "a dynamic sequence length"
    assert not is_causal_mask(causal_bool()[None, None].expand(2, 5, L, L), q, q), "5 heads against q's 3"
    assert not is_causal_mask(causal_bool()[None, None].expand(2, 1, L, L), (1, 3, L, 4), (1, 3, L, 4)), (
        "a batch of 2 against q's 1 would broadcast the output (torch's SDPA refuses it)")
    assert not is_causal_mask(causal_bool()[None, None, None], q, q), "more dims than q"
    assert not is_causal_mask(causal_bool(1, L), q, q), "a mask broadcast over rows"
    assert not is_causal_mask(torch.ones(L, L, dtype=torch.int64).tril(), q, q), "an integer mask"
