"""kiln::pointwise: the program IR, its reference, the generated Triton kernel, and the fusion pass.

Triton kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET must be set
before Triton is imported (Triton's own library functions are jitted at import), so the
`test_interpreted_*` tests run in a subprocess started with it; on the GPU machine the
`gpu` tests run the kernels compiled. Tolerances: fp32 programs match the
reference to 1e-5 (tanh is computed from exp, ~1e-7 absolute); fp16 results may differ
by an fp16 rounding of intermediates the kernel keeps in fp32 (2e-3).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import fx, nn

import kiln
from interpreter import interpreted, run_interpreted_tests
from kiln.capture.export import capture
from kiln.kernels import KERNELS, OpCall
from kiln.kernels import triton_pointwise as tp
from kiln.ops.pointwise import OPS, Const, PointwiseProgramError, ProgramBuilder, parse_program, run_program
from kiln.passes import count_ops
from kiln.passes.fuse_pointwise import POINTWISE, find_groups, fuse_pointwise

CPU = torch.device("cpu")
FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=2e-3, atol=2e-3)




def test_triton_kernels_in_the_interpreter():
    """Run this file's test_interpreted_* tests in a process that starts with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__, tp.triton)


def program(n_inputs: int, *body: tuple) -> str:
    """Program text from instructions written with value numbers, e.g. ("add", 0, 1)."""
    b = ProgramBuilder()
    values = [b.input() for _ in range(n_inputs)]
    for op, *args in body:
        values.append(b.emit(op, *(values[a] if isinstance(a, int) and not isinstance(a, bool) else a for a in args)))
    return b.build().to_json()


def c(value):
    return Const(value)


def reference(inputs, text):
    return torch.ops.kiln.pointwise(inputs, text)


# -- the IR ------------------------------------------------------------------------------------------


def test_program_text_is_canonical_and_round_trips():
    text = program(2, ("add", 0, 1), ("relu", 2), ("mul", 3, c(0.5)), ("cast", 4, torch.float16))
    assert json.loads(text)["body"][-1] == ["cast", 4, {"dtype": "float16"}]
    assert parse_program(text).to_json() == text


def test_constants_keep_their_python_type_and_specials():
    assert Const(1) != Const(1.0) != Const(True)
    text = program(1, ("maximum", 0, c(float("-inf"))))
    assert '{"const":"-inf"}' in text
    assert parse_program(text).body[0].args[1] == Const(float("-inf"))


@pytest.mark.parametrize(
    "body, message",
    [
        ([["system", 0]], "unknown op 'system'"),
        ([["relu", 1]], "does not name an earlier value"),
        ([["add", 0]], "takes 2 operand"),
        ([["relu", {"const": 1.0}]], "expected a value operand"),
        ([["add", 0, {"const": 1e400}]], "is not a number"),
        ([["add", 0, {"const": "os.system"}]], "is not a number"),
        ([["cast", 0, {"dtype": "complex64"}]], "dtype 'complex64'"),
        ([["relu", 0], ["relu", 0]], "nothing uses: instruction 0"),
        ([["add", {"const": 1}, {"const": 2}]], "only constant operands"),
        ([["relu", True]], "expected a value operand"),
    ],
)
def test_malformed_programs_are_refused_by_name(body, message):
    text = json.dumps({"kiln_pointwise": 1, "inputs": 1, "body": body})
    with pytest.raises(PointwiseProgramError, match=message):
        parse_program(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not valid JSON"),
        ('{"kiln_pointwise": 2, "inputs": 1, "body": [["relu", 0]]}', "version 2"),
        ('{"kiln_pointwise": 1, "inputs": 2, "body": [["relu", 0]]}', "nothing uses: input 1"),
        ('{"kiln_pointwise": 1, "inputs": 1, "body": [["relu", 0]], "code": "x"}', "exactly the keys"),
    ],
)
def test_malformed_program_documents_are_refused(text, message):
    with pytest.raises(PointwiseProgramError, match=message):
        parse_program(text)


def test_every_ir_op_has_a_triton_form():
    assert set(OPS) == set(tp.TRITON_OPS)


# -- the reference -----------------------------------------------------------------------------------


def test_reference_computes_the_chain_with_broadcast():
    x, bias, scale = torch.randn(2, 8, 4, 4), torch.randn(1, 8, 1, 1), torch.randn(8, 1, 1)
    text = program(3, ("add", 0, 1), ("relu", 3), ("mul", 4, 2))
    torch.testing.assert_close(reference([x, bias, scale], text), (x + bias).relu() * scale, rtol=0, atol=0)


def test_reference_keeps_the_first_full_size_inputs_layout_and_never_aliases():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    out = reference([torch.randn(8, 1, 1), x], program(2, ("mul", 0, 1)))
    assert out.is_contiguous(memory_format=torch.channels_last)
    same = reference([x], program(1, ("cast", 0, torch.float32)))
    assert same.data_ptr() != x.data_ptr() and same.stride() == x.stride()


def test_fake_impl_gives_the_real_layout_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1)  # non-contiguous, dense
    text = program(2, ("gt", 0, 1), ("cast", 2, torch.float16))
    real = reference([x, torch.randn(1, 1, 1)], text)
    with FakeTensorMode() as mode:
        fake = reference([mode.from_tensor(x), mode.from_tensor(torch.randn(1, 1, 1))], text)
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


def test_program_that_does_not_type_check_is_named():
    with pytest.raises(PointwiseProgramError, match="cannot run on inputs of dtype bool"):
        tp.launch_plan(program(1, ("neg", 0), ("relu", 1)), (((4,), (1,), torch.bool),))


# -- the Triton kernel (interpreted) -------------------------------------------------------------------


def _check(inputs, text, tol=FP32):
    got = tp.launch(inputs, text)
    want = run_program(parse_program(text), inputs)
    assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
    torch.testing.assert_close(got, want, **tol, equal_nan=True)


def _cases():
    x = torch.randn(2, 8, 4, 4)
    return {
        "add_relu_mul_broadcast": ([x, torch.randn(1, 8, 1, 1), torch.randn(8, 1, 1)],
                                   program(3, ("add", 0, 1), ("relu", 3), ("mul", 4, 2))),
        "silu_decomposed": ([x], program(1, ("sigmoid", 0), ("mul", 0, 1))),
        "squeeze_excite": ([x, torch.randn(2, 8, 1, 1)], program(2, ("sigmoid", 1), ("mul", 0, 2))),
        "gelu_erf_bias": ([torch.randn(3, 5, 16) * 3, torch.randn(16)], program(2, ("add", 0, 1), ("gelu", 2))),
        "gelu_tanh": ([torch.randn(3, 40) * 3], program(1, ("gelu_tanh", 0), ("tanh", 1))),
        "hardswish_relu6": ([x * 4], program(1, ("hardswish", 0), ("clamp", 1, c(0.0), c(6.0)))),
        "casts_and_masks": ([x, torch.randn(8, 4, 1)],
                            program(2, ("gt", 0, 1), ("cast", 0, torch.float16), ("cast", 3, torch.float32),
                                    ("where", 2, 4, c(float("-inf"))))),
        "bool_to_float": ([x], program(1, ("gt", 0, c(0)), ("cast", 1, torch.float32))),
        "int_inputs_promote": ([torch.randint(-5, 5, (4, 6)), torch.randn(6)],
                               program(2, ("mul", 0, c(2)), ("add", 2, 1), ("abs", 3), ("sqrt", 4))),
        "scalar_and_nan": ([torch.tensor([1.0, float("nan"), -2.0, 3.0]), torch.tensor(0.5)],
                           program(2, ("maximum", 0, 1), ("minimum", 2, c(2.0)), ("rsqrt", 3))),
        "zero_dim_input": ([torch.randn(5, 7), torch.tensor(3.0)], program(2, ("div", 0, 1), ("exp", 2))),
        "transposed_input": ([torch.randn(6, 5).t(), torch.randn(5, 6)], program(2, ("sub", 0, 1), ("abs", 2))),
        "channels_last": ([x.contiguous(memory_format=torch.channels_last), torch.randn(1, 8, 1, 1)],
                          program(2, ("add", 0, 1), ("sigmoid", 2), ("mul", 0, 3))),
        "logic": ([x, x.flip(0)], program(2, ("lt", 0, c(0.0)), ("ge", 1, 0), ("or", 2, 3), ("not", 4),
                                          ("and", 5, 2), ("cast", 6, torch.int32), ("neg", 7))),
        "bool_arithmetic": ([x > 0, x < 0.5], program(2, ("add", 0, 1), ("mul", 2, 0), ("maximum", 3, 1),
                                                      ("cast", 4, torch.float32))),
    }


@interpreted
@pytest.mark.parametrize("case", list(_cases()))
def test_interpreted_matches_reference_fp32(case):
    _check(*_cases()[case])


@interpreted
@pytest.mark.parametrize("case", ["add_relu_mul_broadcast", "silu_decomposed", "gelu_erf_bias", "channels_last"])
def test_interpreted_matches_reference_fp16(case):
    inputs, text = _cases()[case]
    _check([x.half() if x.is_floating_point() else x for x in inputs], text, FP16)


def test_same_layout_inputs_need_no_index_arithmetic():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    plan = tp.launch_plan(program(2, ("add", 0, 1), ("relu", 2)), tuple(_meta(t) for t in (x, x)))
    assert plan.scalars == (x.numel(),)  # one merged dim: no sizes or strides passed


def test_broadcast_dims_merge_where_every_operand_allows():
    out = [128, 16, 4, 1]
    sizes, strides = tp.coalesce([2, 8, 4, 4], [[128, 16, 4, 1], [0, 1, 0, 0], out])
    assert sizes == [2, 8, 16] and strides == [[128, 16, 1], [0, 1, 0], [128, 16, 1]]


def test_kernel_is_registered_for_cuda_only():
    kernel = KERNELS["triton.pointwise"]
    assert kernel.implements("kiln.pointwise.default") and not kernel.implements("aten.add.Tensor")
    call = OpCall("kiln.pointwise.default", (None, None), (), "cpu")
    assert not kernel.supports(call)
    assert kernel.supports(OpCall(call.op, call.inputs, call.outputs, "cuda")) == (tp.triton is not None)


def _meta(t):
    return tuple(t.shape), tuple(t.stride()), t.dtype


# -- the fusion pass -----------------------------------------------------------------------------------


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.scale = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        return torch.relu(x + self.bias) * self.scale


class SqueezeExcite(nn.Module):
    """SiLU (exported as sigmoid, mul), a squeeze-excitation gate, a residual and a cast."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = nn.functional.silu(self.conv(x))
        gate = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        z = nn.functional.gelu(y * gate + x)
        return z.half().float(), (x > 0).float()


class SharedIntermediate(nn.Module):
    def forward(self, x):
        y = torch.relu(x + 1.0)
        return y, y * 2.0


def _fused_nodes(graph):
    return [n for n in graph.module.graph.nodes if n.target is POINTWISE]


def test_chain_becomes_one_node_with_the_same_outputs():
    x = torch.randn(2, 8, 4, 4)
    before = capture(Chain().eval(), (x,), device=CPU)
    after = fuse_pointwise(before)
    assert count_ops(before) == 3 and count_ops(after) == 1
    torch.testing.assert_close(after.run(x), before.run(x), **FP32)
    torch.testing.assert_close(after.module(x), before.module(x), **FP32)


def test_silu_and_squeeze_excitation_fuse_around_the_convolutions():
    x = torch.randn(2, 8, 6, 6)
    before = capture(SqueezeExcite().eval(), (x,), device=CPU)
    after = fuse_pointwise(before)
    ops = [str(n.target) for n in after.module.graph.nodes if n.op == "call_function"]
    assert ops.count("kiln.pointwise.default") == 3 and "aten.sigmoid.default" not in ops
    assert (count_ops(before), count_ops(after)) == (13, 6)
    for got, want in zip(after.run(x), before.run(x)):
        torch.testing.assert_close(got, want, **FP32)


def test_intermediates_used_outside_the_group_stay():
    x = torch.randn(4, 5)
    before = capture(SharedIntermediate().eval(), (x,), device=CPU)
    after = fuse_pointwise(before)
    ops = [str(n.target) for n in after.module.graph.nodes if n.op == "call_function"]
    assert ops == ["kiln.pointwise.default", "aten.mul.Tensor"]
    for got, want in zip(after.run(x), before.run(x)):
        torch.testing.assert_close(got, want, **FP32)


def test_a_lone_op_fuses_only_when_it_broadcasts():
    class Gate(nn.Module):
        def forward(self, x, gate, y):
            return x * gate, x + y

    x, y = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    gate = torch.randn(2, 8, 1, 1)
    before = capture(Gate().eval(), (x, gate, y), device=CPU)
    after = fuse_pointwise(before)
    ops = [str(n.target) for n in after.module.graph.nodes if n.op == "call_function"]
    assert ops == ["kiln.pointwise.default", "aten.add.Tensor"], "the gate product fuses, the plain add stays"
    for got, want in zip(after.run(x, gate, y), before.run(x, gate, y)):
        torch.testing.assert_close(got, want, **FP32)


def test_fused_node_keeps_the_roots_layout_and_source_line():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    before = capture(Chain().eval(), (x,), device=CPU)
    root = next(n for n in before.module.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    (fused,) = _fused_nodes(fuse_pointwise(before))
    assert fused.meta["val"].stride() == root.meta["val"].stride() == x.stride()
    assert fused.meta["stack_trace"] == root.meta["stack_trace"] and "forward" in fused.meta["stack_trace"]
    assert fused.meta["fused_from"] == ["add", "relu", "mul"]
    assert fused.args[0][0].op == "placeholder"  # the input laid out like the result comes first


def test_groups_do_not_cross_unfusable_ops():
    x = torch.randn(2, 8, 6, 6)
    graph = capture(SqueezeExcite().eval(), (x,), device=CPU)
    for group in find_groups(graph.module.graph):
        assert all(n.target not in (torch.ops.aten.convolution.default, torch.ops.aten.mean.dim) for n in group)


@interpreted
def test_interpreted_kernels_run_the_fused_graph():
    x = torch.randn(2, 8, 6, 6)
    before = capture(SqueezeExcite().eval(), (x,), device=CPU)
    after = fuse_pointwise(before)

    class OnTriton(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is POINTWISE:
                return tp.launch(*args)
            return super().call_function(target, args, kwargs)

    for got, want in zip(OnTriton(after.module).run(x), before.module(x)):
        torch.testing.assert_close(got, want, **FP32)


def test_engine_with_fused_ops_matches_eager(tmp_path):
    model, x = SqueezeExcite().eval(), torch.randn(2, 8, 6, 6)
    config = kiln.BuildConfig(device="cpu", passes=["dead_code", "fuse_pointwise"])
    engine = kiln.build(model, (x,), config=config)
    assert any(s["op"] == "kiln.pointwise.default" for s in engine.plan["steps"])
    with torch.no_grad():
        want = model(x)
    for got, ref in zip(engine(x), want):
        torch.testing.assert_close(got, ref, **FP32)
    engine.save(tmp_path / "m.kiln")
    for got, ref in zip(kiln.load(tmp_path / "m.kiln")(x), want):
        torch.testing.assert_close(got, ref, **FP32)


# -- on the GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(_cases()))
def test_triton_matches_reference_on_cuda(case, dtype):
    inputs, text = _cases()[case]
    inputs = [(x.to(dtype) if x.is_floating_point() and x.dim() else x).cuda() for x in inputs]
    tol = FP32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else FP16
    _check(inputs, text, tol)


@pytest.mark.gpu
def test_triton_pointwise_replays_in_a_cuda_graph():
    x, bias = torch.randn(8, 64, 28, 28, device="cuda"), torch.randn(1, 64, 1, 1, device="cuda")
    text = program(2, ("add", 0, 1), ("sigmoid", 2), ("mul", 0, 3))
    tp.launch([x, bias], text)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tp.launch([x, bias], text)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, reference([x, bias], text), **FP32)


@pytest.mark.gpu
def test_cuda_engine_selects_the_triton_kernel():
    model, x = SqueezeExcite().eval(), torch.randn(2, 8, 6, 6)
    config = kiln.BuildConfig(device="cuda", precision="fp16", passes=["dead_code", "fuse_pointwise"])
    engine = kiln.build(model, (x,), config=config)
    kernels = {s["kernel"] for s in engine.plan["steps"] if s["op"] == "kiln.pointwise.default"}
    assert kernels == {"triton.pointwise"}
    with torch.no_grad():
        want = model.cuda().half()(x.cuda().half())
    for got, ref in zip(engine(x.cuda()), want):
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
