"""Every registered kernel against its op's reference: one table of cases, one case at least per kernel.

A case is an op, inputs, and where the kernel can run them here: "cpu" (the kernel's step
function on CPU tensors; CUDA kernels whose code is plain torch run there too), "interpreter"
(Triton kernels in Triton's CPU interpreter, in a child process: tests/interpreter.py) or "gpu"
(marked gpu: skipped without CUDA). The kernel's result must match the op's own reference
implementation (ATen's, or the kiln:: op's torch.library reference) within the case's
tolerance; where the case is one the kernel is selected for, `implements` and `supports` must
say so. A new kernel without a case fails `test_every_kernel_has_a_case`.

Tolerances: fp32 1e-4 (the same sums in another order: GEMMs of depth ≤ 64); fp16 2e-2 (the
reference rounds intermediates to fp16, fused kernels round once); the approximate tanh-GELU
epilogue 5e-3 in fp16 (its stated bound 4.7e-4 plus fp16 rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from interpreter import interpreted, run_interpreted_tests
from kiln import ops  # noqa: F401  (defines the kiln:: ops)
from kiln.kernels import KERNELS, OpCall, resolve_op
from kiln.kernels.triton_lang import triton
from kiln.specs import TensorSpec

CONV = "kiln.conv_bias_act.default"
LINEAR = "kiln.linear_act.default"
QLINEAR = "kiln.qlinear.default"
LAYER_NORM = "kiln.add_layer_norm.default"
POINTWISE = "kiln.pointwise.default"
SDPA = "aten.scaled_dot_product_attention.default"
CL = torch.channels_last


@dataclass(frozen=True)
class Case:
    kernel: str
    op: str
    args: Callable[[str, torch.dtype], tuple[Any, ...]]  # (device, dtype) → the op's arguments
    where: str = "cpu"  # "cpu", "interpreter" or "gpu"
    dtype: torch.dtype = torch.float32
    tol: float = 1e-4
    selected_on: str | None = "cuda"  # the device whose calls the kernel supports (None: never a candidate)
    outs: Callable[[tuple[Any, ...]], list[torch.Tensor]] | None = None  # planned outputs handed to the step
    reference: Callable[..., Any] | None = None  # default: the op itself
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.label or self.where}"


def _conv(kernel: int = 3, stride: int = 1, padding: int = 1, groups: int = 1, act: str = "silu",
          residual: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
          c_in: int = 8, c_out: int = 12, size: int = 8) -> Callable[[str, torch.dtype], tuple]:
    def make(device: str, dtype: torch.dtype) -> tuple:
        x = torch.randn(2, c_in, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        w = torch.randn(c_out, c_in // groups, kernel, kernel, device=device, dtype=dtype) / (c_in * kernel)
        b = torch.randn(c_out, device=device, dtype=dtype)
        out = (size + 2 * padding - kernel) // stride + 1
        r = None
        if residual:
            r = torch.randn(2, c_out, out, out, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        return (x, w, b, [stride] * 2, [padding] * 2, [1, 1], groups, act, r)

    return make


def _linear(act: str = "relu", rows: int = 16, bias: bool = True) -> Callable[[str, torch.dtype], tuple]:
    def make(device: str, dtype: torch.dtype) -> tuple:
        x = torch.randn(rows, 32, device=device, dtype=dtype)
        w = torch.randn(32, 24, device=device, dtype=dtype) / 6
        return (x, w, torch.randn(24, device=device, dtype=dtype) if bias else None, act)

    return make


def _layer_norm(device: str, dtype: torch.dtype) -> tuple:
    x, r = (torch.randn(3, 5, 64, device=device, dtype=dtype) for _ in range(2))
    return (x, r, torch.randn(64, device=device, dtype=dtype), torch.randn(64, device=device, dtype=dtype), 1e-5)


def _pointwise(device: str, dtype: torch.dtype) -> tuple:
    program = '{"body":[["add",0,1],["silu",2],["mul",3,{"const":0.5}]],"inputs":2,"kiln_pointwise":1}'
    x = torch.randn(2, 8, 5, 5, device=device, dtype=dtype).contiguous(memory_format=CL)
    return ([x, torch.randn(1, 8, 1, 1, device=device, dtype=dtype)], program)


def _rowwise(device: str, dtype: torch.dtype) -> tuple:
    """RMSNorm as a row program: mean of squares along the last axis, then the weight."""
    program = ('{"body":[["mul",0,0],["row_mean",2],["add",3,{"const":1e-06}],["rsqrt",4],["mul",0,5],'
               '["mul",1,6]],"inputs":2,"kiln_rowwise":1}')
    return ([torch.randn(3, 5, 96, device=device, dtype=dtype), torch.randn(96, device=device, dtype=dtype)], program)


def _spatial_mean(device: str, dtype: torch.dtype) -> tuple:
    x = torch.randn(2, 24, 7, 9, device=device, dtype=dtype).contiguous(memory_format=CL)
    return (x, [2, 3], True)


def _attention(device: str, dtype: torch.dtype) -> tuple:
    return tuple(torch.randn(2, 4, 64, 32, device=device, dtype=dtype) for _ in range(3))


def _concat_inputs(device: str, dtype: torch.dtype) -> tuple:
    return ([torch.randn(2, 3, device=device, dtype=dtype), torch.randn(2, 5, device=device, dtype=dtype)], 1)


def _concat_placed(args: tuple) -> list[torch.Tensor]:
    """The cat's buffer with every input already written into its slice, as the planner leaves it."""
    return [torch.cat(*args[:1], dim=args[1])]


def _qlinear(fmt: str, act: str, bias: bool = True, m: int = 40, k: int = 64, n: int = 48
             ) -> Callable[[str, torch.dtype], tuple]:
    """kiln::qlinear's arguments: x, its scale (the top rows saturate), an 8-bit [N, K] weight
    with per-channel scales, bias, activation."""
    from kiln.ops.quant import quant_format

    def make(device: str, dtype: torch.dtype) -> tuple:
        f = quant_format(fmt)
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device) * 0.05
        w_scale = w.abs().amax(1) / f.qmax
        x_scale = float(x.abs().max()) * 0.6 / f.qmax
        b = torch.randn(n, device=device, dtype=dtype) if bias else None
        return (x, x_scale, f.quantize(w, w_scale[:, None]), w_scale, b, act)

    return make


def _qlinear_grouped(fmt: str, groups: int = 3, m: int = 40, k: int = 32, n: int = 16
                     ) -> Callable[[str, torch.dtype], tuple]:
    """kiln::qlinear_grouped's arguments: G projections of one x (q/k/v)."""
    single = _qlinear(fmt, "none", m=m, k=k, n=groups * n)

    def make(device: str, dtype: torch.dtype) -> tuple:
        x, x_scale, w_q, w_scale, b, act = single(device, dtype)
        return (x, x_scale, w_q.view(groups, n, k), w_scale.view(groups, n), b.view(groups, n), act)

    return make


def _triton(kernel: str, op: str, args: Callable[[str, torch.dtype], tuple]) -> list[Case]:
    return [Case(kernel, op, args, where="interpreter"),
            Case(kernel, op, args, where="gpu", dtype=torch.float16, tol=2e-2)]


CASES: list[Case] = [
    # ATen and the kiln:: references
    Case("aten", "aten.add.Tensor", lambda d, t: (torch.randn(3, 4, device=d, dtype=t), torch.randn(4, device=d)),
         selected_on="cpu"),
    Case("aten", "aten.view.default", lambda d, t: (torch.randn(3, 4, device=d, dtype=t).t(), [12]),
         selected_on="cpu", reference=lambda x, shape: x.reshape(shape), label="view-copies"),
    Case("kiln.reference", CONV, _conv(residual=True), selected_on="cpu"),
    Case("planner.concat_in_place", "aten.cat.default", _concat_inputs, selected_on=None, outs=_concat_placed),
    # PyTorch's attention backends, one at a time
    *(Case(name, SDPA, _attention, where="gpu", dtype=torch.float16, tol=2e-3)
      for name in ("sdpa.flash", "sdpa.efficient", "sdpa.cudnn")),
    # cuDNN
    Case("cudnn.conv_then_act", CONV, _conv(residual=True)),
    Case("cudnn.conv_bias_relu", CONV, _conv(act="gelu")),
    Case("cudnn.conv_bias_relu", CONV, _conv(act="relu", residual=True), where="gpu", dtype=torch.float16, tol=2e-2),
    # cuBLASLt
    Case("cublaslt.conv1x1_gemm", CONV, _conv(kernel=1, padding=0, memory_format=CL, residual=True)),
    Case("cublaslt.patch_conv_gemm", CONV, _conv(kernel=4, stride=4, padding=0, act="gelu", size=16)),
    Case("cublaslt.patch_conv_gemm", CONV, _conv(kernel=4, stride=4, padding=0, size=16, memory_format=CL),
         label="channels-last"),
    Case("cublaslt.linear_epilogue", LINEAR, _linear("relu")),
    Case("cublaslt.linear_epilogue", LINEAR, _linear("silu", bias=False), label="no-bias"),
    Case("cublaslt.linear_gelu_tanh", LINEAR, _linear("gelu"), where="gpu", dtype=torch.float16, tol=5e-3),
    # Triton: fp32 in the interpreter, fp16 compiled on the GPU
    *_triton("triton.conv_epilogue", CONV, _conv(residual=True, memory_format=CL)),
    *_triton("triton.conv_act", CONV, _conv(act="hardswish", memory_format=CL)),
    *_triton("triton.conv1x1_act.wide", CONV, _conv(kernel=1, padding=0, memory_format=CL, residual=True)),
    *_triton("triton.conv1x1_act.narrow", CONV, _conv(kernel=1, padding=0, memory_format=CL, act="gelu_tanh")),
    *_triton("triton.linear_act.wide", LINEAR, _linear("gelu", rows=40)),
    *_triton("triton.linear_act.narrow", LINEAR, _linear("silu", rows=40)),
    *_triton("triton.add_layer_norm", LAYER_NORM, _layer_norm),
    *_triton("triton.spatial_mean", "aten.mean.dim", _spatial_mean),
    *_triton("triton.pointwise", POINTWISE, _pointwise),
    *_triton("triton.rowwise", "kiln.rowwise.default", _rowwise),
    # 8-bit GEMMs for kiln::qlinear: cuBLASLt's GEMM between Triton passes (fp32 on the CPU in the interpreter:
    # the same 8-bit products, so only the sums' order differs; fp16 on the GPU: the reference rounds its
    # dequantized operands to fp16, 2e-2 covers it elementwise)
    *_triton("int8.int_mm", QLINEAR, _qlinear("int8", "gelu")),
    Case("int8.int_mm", QLINEAR, _qlinear("int8", "relu", bias=False), where="interpreter", label="no-bias"),
    *_triton("fp8.scaled_mm_tensorwise", QLINEAR, _qlinear("fp8", "silu")),
    *_triton("fp8.scaled_mm_rowwise", QLINEAR, _qlinear("fp8", "none")),
    *(case for fmt, act in (("int8", "gelu"), ("fp8", "relu")) for config in ("wide", "narrow")
      for case in _triton(f"triton.qlinear_{fmt}.{config}", QLINEAR, _qlinear(fmt, act, m=72, k=96, n=80))),
    *(Case(f"triton.qlinear_{fmt}.wide", "kiln.qlinear_grouped.default", _qlinear_grouped(fmt), where="interpreter",
           label="grouped") for fmt in ("int8", "fp8")),
    *(Case(kernel, "kiln.qlinear_grouped.default", _qlinear_grouped(fmt), where=where, label=f"grouped-{where}",
           **({"dtype": torch.float16, "tol": 2e-2} if where == "gpu" else {}))
      for kernel, fmt in (("int8.int_mm", "int8"), ("fp8.scaled_mm_tensorwise", "fp8"))
      for where in ("interpreter", "gpu")),
    # TensorRT: a region built here, run by the TensorRT runtime
    Case("tensorrt", "kiln.tensorrt_region.default", lambda d, t: _tensorrt_region(d, t), where="gpu",
         reference=lambda inputs, engine, spec: [torch.relu(inputs[0]) * 2]),
]


def _tensorrt_region(device: str, dtype: torch.dtype) -> tuple:
    """relu(x) * 2 as a one-region TensorRT engine (skips where TensorRT cannot run it)."""
    import kiln.tensorrt as kt
    from kiln.capture.export import capture
    from kiln.tensorrt.partitioning.splice import region_spec

    usable, reason = kt.runtime_usable(torch.device(device)) if kt.available() else (False, "no TensorRT")
    if not usable:
        pytest.skip(reason)

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2

    x = torch.randn(4, 8, device=device, dtype=dtype)
    gm = capture(Double().eval(), (x.cpu(),), device=torch.device("cpu")).module
    net = kt.build_network(gm)
    engine = torch.frombuffer(bytearray(kt.build_engine(net).serialized), dtype=torch.uint8).to(device)
    return ([x], engine, region_spec(net).to_json())


def _spec(name: str, value: Any) -> TensorSpec | None:
    return TensorSpec(name, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def _flat(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _run(case: Case, device: str) -> None:
    torch.manual_seed(0)
    kernel = KERNELS[case.kernel]
    args = case.args(device, case.dtype)
    reference = case.reference or resolve_op(case.op)
    want = _flat(reference(*args))
    if case.selected_on is not None:
        call = OpCall(case.op, tuple(_spec(f"arg{i}", a) for i, a in enumerate(args)),
                      tuple(_spec("out", w) for w in want), case.selected_on,
                      tuple(None if isinstance(a, torch.Tensor) else a for a in args))
        assert kernel.implements(case.op), f"{case.kernel} does not implement {case.op}"
        if case.where != "interpreter":  # Triton kernels are candidates on CUDA only
            assert kernel.supports(call), f"{case.kernel} does not support its own case {case.id}"
    outs = case.outs(args) if case.outs is not None else []
    got = _flat(kernel.make(case.op, None)(args, {}, outs))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        torch.testing.assert_close(g, w, atol=case.tol, rtol=case.tol)


def _by(where: str) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in CASES if c.where == where]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_has_a_case(name):
    assert any(c.kernel == name for c in CASES), f"kernel {name} has no case in tests/test_kernel_catalog.py"


def test_every_case_names_a_kernel():
    assert {c.kernel for c in CASES} <= set(KERNELS)


@pytest.mark.parametrize("case", _by("cpu"))
def test_kernel_matches_its_op_on_cpu(case):
    _run(case, "cpu")


def test_triton_cases_in_the_interpreter():
    run_interpreted_tests(__file__, triton)


@interpreted
@pytest.mark.parametrize("case", _by("interpreter"))
def test_interpreted_kernel_matches_its_op(case):
    _run(case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", _by("gpu"))
def test_gpu_kernel_matches_its_op(case):
    try:
        _run(case, "cuda")
    except RuntimeError as exc:
        if case.kernel.startswith("sdpa.") and "No available kernel" in str(exc):
            pytest.skip(f"{case.kernel} is unavailable on this GPU: {exc}")  # the tuner drops it the same way
        raise



# -- the registry's rules ---------------------------------------------------------------------------


def test_equal_priorities_are_ordered_by_name_not_registration():
    from kiln.kernels import Priority, candidates, register_kernel

    names = ["test.tie_b", "test.tie_a", "test.tie_c"]
    try:
        for name in names:  # registered out of order
            register_kernel(name, provider="test", implements="kilntest.tie.default",
                            priority=Priority.CANDIDATE)(lambda op, out: None)
        register_kernel("test.tie_default", provider="test", implements=("kilntest.other.default",
                                                                          "kilntest.tie.default"))(lambda op, out: None)
        call = OpCall("kilntest.tie.default", (), (), "cpu")
        assert [k.name for k in candidates(call)] == ["test.tie_default", "test.tie_a", "test.tie_b", "test.tie_c"]
    finally:
        for name in [*names, "test.tie_default"]:
            KERNELS.pop(name, None)


def test_a_linear_without_bias_runs_a_gemm_kernel_on_cuda():
    """T5's linears have no bias: on CUDA a GEMM kernel comes before the reference, in every dtype."""
    from kiln.kernels import candidates

    for dtype in (torch.float16, torch.float32):
        a, wt = TensorSpec("x", (256, 64), dtype), TensorSpec("w", (64, 96), dtype)
        out = TensorSpec("y", (256, 96), dtype)
        linear = OpCall(LINEAR, (a, wt, None, None), (out,), "cuda", (None, None, None, "none"))
        names = [k.name for k in candidates(linear)]
        assert names[0] == "cublaslt.linear_epilogue", names
        assert "cublaslt.linear_gelu_tanh" not in names


def test_implements_takes_op_names_and_namespaces():
    from kiln.kernels import register_kernel

    with pytest.raises(TypeError, match="implements= takes op names"):
        register_kernel("test.bad", provider="test", implements=("aten.relu.default", 3))
    assert "test.bad" not in KERNELS
    assert KERNELS["aten"].implements("aten.relu.default") and not KERNELS["aten"].implements("kiln.pointwise.default")
    assert KERNELS["kiln.reference"].implements("kiln.linear_act.default")
    assert not KERNELS["kiln.reference"].implements("kilnx.linear_act.default")
    assert not KERNELS["planner.concat_in_place"].implements("aten.cat.default"), "placed by the planner only"


def test_untimed_choices_and_candidates_of_the_fused_ops():
    """The default comes first and the reference before the timed candidates (by name)."""
    from kiln.kernels import candidates

    x, w, b = (TensorSpec(n, s, torch.float16) for n, s in (("x", (2, 8, 8, 8)), ("w", (8, 8, 1, 1)), ("b", (8,))))
    conv = OpCall(CONV, (x, w, b) + (None,) * 6, (x,), "cuda", (None, None, None, [1, 1], [0, 0], [1, 1], 1, "silu",
                                                                 None))
    names = [k.name for k in candidates(conv)]
    assert names[:2] == ["cudnn.conv_then_act", "kiln.reference"]
    timed = ["cublaslt.conv1x1_gemm", "cudnn.conv_bias_relu"]
    if triton is not None:
        timed += ["triton.conv1x1_act.narrow", "triton.conv1x1_act.wide", "triton.conv_act", "triton.conv_epilogue"]
    assert names[2:] == timed
    a, wt, bias = (TensorSpec(n, s, torch.float16) for n, s in (("x", (4, 8)), ("w", (8, 16)), ("b", (16,))))
    linear = OpCall(LINEAR, (a, wt, bias, None), (a,), "cuda", (None, None, None, "gelu"))
    names = [k.name for k in candidates(linear)]
    triton_linear = ["triton.linear_act.narrow", "triton.linear_act.wide"] if triton is not None else []
    assert names == ["cublaslt.linear_epilogue", "kiln.reference", "cublaslt.linear_gelu_tanh", *triton_linear]
    assert [k.name for k in candidates(linear, exact=True)] == ["cublaslt.linear_epilogue", "kiln.reference",
                                                               *triton_linear]
