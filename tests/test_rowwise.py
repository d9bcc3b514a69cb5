"""kiln::rowwise: row programs (pointwise ops + reductions along the last axis), their reference,
the generated Triton kernel (interpreted on the CPU), and the fuse_rowwise pass.

Tolerances: fp32 1e-5 against eager (the same sums, in another order, over rows ≤ 1000);
fp32 in Triton's interpreter 2e-4 relative, 2e-5 absolute (the interpreter computes exp and rsqrt
with NumPy, whose float32 results depend on the CPU: one CI machine's softmax rows were 1.5e-4
off, every element of a row by the same factor, where this machine matches to 1e-7);
fp16 2e-3 against the fp32 reference of the fp16 inputs (the kernel keeps intermediates in
fp32; eager rounds each op to fp16).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import fx, nn

import kiln
from interpreter import interpreted, run_interpreted_tests
from kiln.capture.export import capture
from kiln.kernels import OpCall, candidates
from kiln.kernels import triton_rowwise as tr
from kiln.ops.pointwise import PointwiseProgramError, parse_program, parse_row_program
from kiln.passes import count_ops, default_passes, run_passes
from kiln.passes.fuse_pointwise import fuse_pointwise
from kiln.passes.fuse_rowwise import ROWWISE, find_regions, fuse_rowwise
from kiln.specs import TensorSpec

CPU = torch.device("cpu")
FP32 = dict(rtol=1e-5, atol=1e-5)
INTERPRETER_FP32 = dict(rtol=2e-4, atol=2e-5)
FP16 = dict(rtol=2e-3, atol=2e-3)


def row_program(n_inputs: int, *body: tuple) -> str:
    def operand(a):
        return {"dtype": str(a).removeprefix("torch.")} if isinstance(a, torch.dtype) else a

    ops = [[op, *(operand(a) for a in args)] for op, *args in body]
    return json.dumps({"kiln_rowwise": 1, "inputs": n_inputs, "body": ops})


RMS = row_program(2, ("mul", 0, 0), ("row_mean", 2), ("add", 3, {"const": 1e-6}), ("rsqrt", 4), ("mul", 0, 5),
                  ("mul", 1, 6))
LAYER_NORM = row_program(3, ("row_mean", 0), ("sub", 0, 3), ("mul", 4, 4), ("row_mean", 5),
                         ("add", 6, {"const": 1e-5}), ("rsqrt", 7), ("mul", 4, 8), ("mul", 9, 1), ("add", 10, 2))
SOFTMAX = row_program(3, ("mul", 0, {"const": 0.125}), ("add", 3, 1), ("add", 4, 2), ("row_max", 5), ("sub", 5, 6),
                      ("exp", 7), ("row_sum", 8), ("div", 8, 9))
MIN_MAX = row_program(1, ("row_max", 0), ("row_min", 0), ("sub", 1, 2), ("sub", 0, 2), ("div", 4, 3),
                      ("row_sum", 0), ("add", 5, 6))


def _cases() -> dict[str, tuple[list[torch.Tensor], str, object]]:
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 96), torch.randn(96), torch.randn(96)
    scores, bias = torch.randn(2, 4, 10, 33), torch.randn(1, 4, 10, 33)
    mask = torch.where(torch.rand(2, 1, 1, 33) < 0.2, -1e4, 0.0)
    return {
        "rms_norm": ([x, w], RMS, lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
        "layer_norm": ([x, w, b], LAYER_NORM, lambda x, w, b: nn.functional.layer_norm(x, (96,), w, b, 1e-5)),
        "softmax_bias_mask": ([scores, bias, mask], SOFTMAX,
                              lambda s, b, m: torch.softmax(s * 0.125 + b + m, -1)),
        "min_max_transposed": ([x.transpose(0, 1)], MIN_MAX, lambda x: (x - x.amin(-1, keepdim=True)) /
                               (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) + x.sum(-1, keepdim=True)),
        "row_of_1000": ([torch.randn(5, 1000), torch.randn(1000)], RMS,
                        lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
    }


# -- the program and its reference -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(_cases()))
def test_reference_matches_eager(case):
    inputs, text, eager = _cases()[case]
    torch.testing.assert_close(torch.ops.kiln.rowwise(inputs, text), eager(*inputs), **FP32)


def test_reductions_exist_only_in_row_programs():
    with pytest.raises(PointwiseProgramError, match="kiln_pointwise"):
        parse_program(RMS)
    pointwise_with_reduction = RMS.replace("kiln_rowwise", "kiln_pointwise")
    with pytest.raises(PointwiseProgramError, match="unknown op 'row_mean'"):
        parse_program(pointwise_with_reduction)
    with pytest.raises(PointwiseProgramError, match="unknown op 'row_median'"):
        parse_row_program(RMS.replace("row_mean", "row_median"))
    assert parse_row_program(RMS).reductions[0].op == "row_mean"


def test_kernel_plan_refuses_what_it_cannot_run():
    x = torch.randn(4, 8)
    meta = ((4, 8), (8, 1), torch.float32)
    with pytest.raises(PointwiseProgramError, match="reduces a value broadcast"):
        tr.row_plan(row_program(2, ("row_sum", 1), ("add", 0, 2)), (meta, ((4, 1), (1, 1), torch.float32)))
    with pytest.raises(PointwiseProgramError, match="not the row shape"):
        tr.row_plan(row_program(1, ("row_sum", 0), ("exp", 1)), (meta,))
    with pytest.raises(PointwiseProgramError, match="rows of"):
        tr.row_plan(RMS, (((2, tr.MAX_ROW + 1), (tr.MAX_ROW + 1, 1), torch.float32),
                          ((tr.MAX_ROW + 1,), (1,), torch.float32)))
    assert x is not None


def test_triton_rowwise_is_the_cuda_default_up_to_max_row():
    def call(width: int, device: str = "cuda") -> OpCall:
        out = TensorSpec("y", (64, width), torch.float16)
        return OpCall("kiln.rowwise.default", (None, None), (out,), device, ([None, None], RMS))

    names = [k.name for k in candidates(call(768))]
    if tr.triton is not None:
        assert names[0] == "triton.rowwise"
    assert "kiln.reference" in names
    assert "triton.rowwise" not in [k.name for k in candidates(call(tr.MAX_ROW + 1))]
    assert "triton.rowwise" not in [k.name for k in candidates(call(768, "cpu"))]


# -- the kernel in Triton's interpreter --------------------------------------------------------------


def test_triton_kernels_in_the_interpreter():
    """Run this file's test_interpreted_* tests in a process that starts with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__, tr.triton)


@interpreted
@pytest.mark.parametrize("case", list(_cases()))
def test_interpreted_matches_reference_fp32(case):
    inputs, text, eager = _cases()[case]
    got = tr.launch(inputs, text)
    want = torch.ops.kiln.rowwise(inputs, text)
    assert got.shape == want.shape and got.stride() == want.stride()
    torch.testing.assert_close(got, want, **INTERPRETER_FP32)


@interpreted
@pytest.mark.parametrize("case", ["rms_norm", "layer_norm", "softmax_bias_mask"])
def test_interpreted_matches_reference_fp16(case):
    inputs, text, _ = _cases()[case]
    half = [x.half() for x in inputs]
    want = torch.ops.kiln.rowwise([x.float() for x in half], text).half()
    torch.testing.assert_close(tr.launch(half, text), want, **FP16)


@interpreted
def test_interpreted_kernel_runs_the_fused_t5_block():
    model, x = _t5_block()
    before = capture(model, (x,), device=CPU)
    after, _ = run_passes(before)

    class OnTriton(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is ROWWISE:
                return tr.launch(*args)
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(OnTriton(after.module).run(x)[0], want, **INTERPRETER_FP32)


# -- the pass -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """As T5 writes it: variance in fp32, then the weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class WrittenOutNorms(nn.Module):
    """Residual add → RMSNorm, a LayerNorm written out (var as written), softmax with scale + mask."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.rms = RMSNorm(width)
        self.w, self.b = nn.Parameter(torch.randn(width)), nn.Parameter(torch.randn(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.rms(x + 1.0)
        u = h.mean(-1, keepdim=True)
        s = h.var(-1, keepdim=True, unbiased=False)
        h = (h - u) / torch.sqrt(s + 1e-5) * self.w + self.b
        p = torch.softmax(self.proj(h) * 0.5 + mask, dim=-1)
        return p * h


def test_fuse_rowwise_takes_each_norm_and_the_softmax():
    x, mask = torch.randn(2, 5, 48), torch.where(torch.rand(2, 1, 48) < 0.3, -1e4, 0.0)
    model = WrittenOutNorms().eval()
    before = capture(model, (x, mask), device=CPU)
    after = fuse_rowwise(before)
    fused = [n for n in after.module.graph.nodes if n.target is ROWWISE]
    # the RMSNorm's output feeds only the LayerNorm: one region; the softmax and the product after it another
    assert len(fused) == 2, [n.name for n in fused]
    assert [json.loads(n.args[1])["body"][-1][0] for n in fused] == ["add", "mul"]
    targets = {str(n.target) for n in after.module.graph.nodes if n.op == "call_function"}
    assert not targets & {"aten.mean.dim", "aten.var.correction", "aten._softmax.default", "aten.pow.Tensor_Scalar"}
    assert count_ops(after) < count_ops(before) - 10
    with torch.no_grad():
        want = model(x, mask)
    torch.testing.assert_close(after.run(x, mask), want, **FP32)
    torch.testing.assert_close(fuse_pointwise(after).run(x, mask), want, **FP32)


def test_fuse_rowwise_leaves_other_reductions_and_shared_intermediates():
    class Other(nn.Module):
        def forward(self, x):
            mid = x * 2.0
            a = mid - mid.mean(1, keepdim=True)  # a reduction over another dim
            b = mid.sum(-1)  # no keepdim
            return a, b, mid  # mid is used outside: a region may not swallow it

    x = torch.randn(3, 4, 8)
    graph = capture(Other().eval(), (x,), device=CPU)
    assert find_regions(graph.module.graph) == []
    assert fuse_rowwise(graph) is graph


def _t5_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Block

    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1, vocab_size=100)
    torch.manual_seed(0)
    block = T5Block(config, has_relative_attention_bias=True).eval()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x)[0]

    return Encoder().eval(), torch.randn(2, 16, 32)


def test_t5_block_norms_and_softmax_become_row_programs(tmp_path):
    model, x = _t5_block()
    captured = capture(model, (x,), device=CPU)
    # without fuse_attention, which otherwise turns the softmax and both bmms into SDPA (test_attention_bias.py)
    passes = [p for p in default_passes() if p != "fuse_attention"]
    after, report = run_passes(captured, passes)
    programs = [n.args[1] for n in after.module.graph.nodes if n.target is ROWWISE]
    assert len(programs) == 3  # two RMSNorms, the softmax with the position bias added before it
    assert sum('"row_max"' in p for p in programs) == 1
    counts = {r["pass"]: r["ops"] for r in report}
    assert counts["fuse_rowwise"] <= counts["channels_last"] - 10
    engine = kiln.build(model, (x,), config=kiln.BuildConfig(device="cpu", passes=passes))
    assert sum(s["op"] == "kiln.rowwise.default" for s in engine.plan["steps"]) == 3
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(engine(x), want, **FP32)
    engine.save(tmp_path / "t5.kiln")
    torch.testing.assert_close(kiln.load(tmp_path / "t5.kiln")(x), want, **FP32)


# -- on the GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(_cases()))
def test_triton_rowwise_matches_reference_on_cuda(case, dtype):
    inputs, text, _ = _cases()[case]
    inputs = [x.to(dtype).cuda() for x in inputs]
    want = torch.ops.kiln.rowwise([x.float() for x in inputs], text).to(dtype)
    torch.testing.assert_close(tr.launch(inputs, text), want, **(FP32 if dtype == torch.float32 else FP16))


@pytest.mark.gpu
def test_cuda_t5_block_runs_the_row_kernels():
    model, x = _t5_block()
    engine = kiln.build(model, (x,), config=kiln.BuildConfig(device="cuda", precision="fp16"))
    kernels = {s["kernel"] for s in engine.plan["steps"] if s["op"] == "kiln.rowwise.default"}
    assert kernels == {"triton.rowwise"}
    linears = {s["kernel"] for s in engine.plan["steps"] if s["op"] == "kiln.linear_act.default"}
    assert "kiln.reference" not in linears
    with torch.no_grad():
        want = model.cuda().half()(x.cuda().half())
    torch.testing.assert_close(engine(x.cuda()).float(), want.float(), rtol=2e-2, atol=2e-2)


# -- value guards: T5's fp16 overflow clamp ----------------------------------------------------------


class OverflowGuard(nn.Module):
    """T5's guard after each residual add in fp16: clamp to ±(max - 1000) where any value is inf."""

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        h = x + r
        if h.dtype == torch.float16:
            finfo = torch.finfo(h.dtype)
            clamp_value = torch.where(torch.isinf(h).any(), finfo.max - 1000, finfo.max)
            h = torch.clamp(h, min=-clamp_value, max=clamp_value)
        return h * 2.0


def test_fp16_overflow_guard_becomes_one_pointwise_program():
    """where → neg → clamp(tensor bounds) → the op after it: one program; the residual add (read
    twice) and isinf → any (the whole-tensor test) stay: 4 ops where there were 8. Exact: the same
    comparisons in fp16."""
    x, r = torch.randn(4, 64).half(), torch.randn(4, 64).half()
    r[1, 3] = float("inf")
    before = capture(OverflowGuard().eval(), (x, r), device=CPU, compute_dtype=torch.float16)
    after, report = run_passes(before)
    targets = [str(n.target) for n in after.module.graph.nodes if n.op == "call_function"]
    assert sorted(targets) == ["aten.add.Tensor", "aten.any.default", "aten.isinf.default",
                               "kiln.pointwise.default"], targets
    assert report[0]["ops"] >= 8
    for a, b in ((x, r), (x, torch.randn(4, 64).half())):
        with torch.no_grad():
            want = OverflowGuard()(a, b)
        assert torch.equal(after.run(a, b), want)
        assert after.run(a, b).abs().max() <= 64504 * 2 or not torch.isinf(a + b).any()
