"""The kiln::tensorrt_region op, its spec, the runner cache and the "tensorrt" kernel.

CPU tests check the op's contract, the spec's validation and the kernel's registration. Tests
that execute TensorRT engines are marked ``gpu`` and skip unless the installed TensorRT can run
on this machine's GPU (``kiln.tensorrt.runtime_usable``).
"""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import kiln
import kiln.kernels  # noqa: F401 - registers the "tensorrt" kernel
import kiln.tensorrt.runtime.engine as trt_engine
from kiln.builder import BuildConfig
from kiln.kernels import KERNELS, OpCall, candidates
from kiln.specs import TensorSpec
from kiln.tensorrt import api
from kiln.tensorrt.runtime.region import REGION_OP, RegionRuntimeError, RegionSpec, parse_spec

SPEC = RegionSpec(
    (TensorSpec("x", (2, 3), torch.float32), TensorSpec("ids", (2,), torch.int64)),
    (TensorSpec("y", (2, 4), torch.float16), TensorSpec("mask", (2,), torch.bool)),
    "tensorrt-rtx",
    "1.7.1.116",
)


# --- the op and its spec ----------------------------------------------------------------


def test_spec_round_trips_and_rejects_what_it_cannot_run() -> None:
    assert parse_spec(SPEC.to_json()) == SPEC
    broken = [
        ("not json", "malformed"),
        ('{"kiln_tensorrt_region": 2, "inputs": [], "outputs": []}', "malformed"),
        (SPEC.to_json().replace('"shape":[2,3]', '"shape":[-1,3]'), "dynamic shape"),
        (SPEC.to_json().replace('"float16"', '"complex32"'), "unknown dtype"),
        ('{"kiln_tensorrt_region":1,"flavor":"a","version":"1","inputs":[],"outputs":[]}', "no outputs"),
    ]
    for text, why in broken:
        with pytest.raises(RegionRuntimeError, match=why):
            parse_spec(text)


def test_fake_implementation_follows_the_spec() -> None:
    op = torch.ops.kiln.tensorrt_region.default
    with FakeTensorMode():
        outs = op(
            [torch.empty(2, 3), torch.empty(2, dtype=torch.int64)], torch.empty(9, dtype=torch.uint8), SPEC.to_json()
        )
    assert [(tuple(o.shape), o.dtype) for o in outs] == [((2, 4), torch.float16), ((2,), torch.bool)]
    meta = op([torch.empty(2, 3, device="meta")], torch.empty(9, dtype=torch.uint8, device="meta"), SPEC.to_json())
    assert all(o.device.type == "meta" for o in meta)
    schema = str(op._schema)
    assert schema.startswith("kiln::tensorrt_region(Tensor[] inputs, Tensor engine, str spec) -> Tensor[]")


def test_reference_on_cpu_raises_the_clear_error() -> None:
    op = torch.ops.kiln.tensorrt_region.default
    with pytest.raises(RegionRuntimeError, match="this engine contains TensorRT regions .* cannot run on cpu because"):
        op([torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)], torch.zeros(9, dtype=torch.uint8), SPEC.to_json())


def test_an_engine_from_another_tensorrt_flavor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "runtime_usable", lambda device=None: (True, "pretend"))
    other = RegionSpec(SPEC.inputs, SPEC.outputs, "some-other-tensorrt", "0.1")
    with pytest.raises(RegionRuntimeError, match="built with some-other-tensorrt 0.1.*Rebuild the engine here"):
        trt_engine.check_runnable(torch.device("cuda", 0), other)


# --- the runner cache -------------------------------------------------------------------


class _FakeRunner:
    made = 0

    def __init__(self, serialized: bytes, spec: RegionSpec, device: torch.device) -> None:
        type(self).made += 1
        self.serialized, self.spec, self.device = serialized, spec, device

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros(s.shape, dtype=s.dtype) for s in self.spec.outputs]


def test_each_engine_tensor_is_deserialized_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_engine, "RegionRunner", _FakeRunner)
    monkeypatch.setattr(trt_engine, "check_runnable", lambda device, spec: None)
    _FakeRunner.made = 0
    engine, text = torch.arange(9, dtype=torch.uint8), SPEC.to_json()
    inputs = [torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)]
    make = KERNELS["tensorrt"].make(REGION_OP, None)
    first = make((inputs, engine, text), {}, [])
    assert [(tuple(t.shape), t.dtype) for t in first] == [((2, 4), torch.float16), ((2,), torch.bool)]
    make((inputs, engine, text), {}, [])
    torch.ops.kiln.tensorrt_region.default(inputs, engine, text)  # the reference shares the cache
    assert _FakeRunner.made == 1
    assert trt_engine.runner_for(engine, text, torch.device("cpu")).serialized == bytes(range(9))
    copy = engine.clone()
    trt_engine.runner_for(copy, text, torch.device("cpu"))
    assert _FakeRunner.made == 2
    key = id(copy)
    del copy
    gc.collect()
    assert key not in trt_engine._RUNNERS  # a cached engine leaves with its weight


# --- the kernel -------------------------------------------------------------------------


def test_kernel_is_registered_for_the_region_op_only_where_tensorrt_runs() -> None:
    kernel = KERNELS["tensorrt"]
    assert kernel.provider == "tensorrt" and kernel.priority == 1 and not kernel.writes_planned_outputs
    assert kernel.implements(REGION_OP) and not kernel.implements("kiln.conv_bias_act.default")
    spec = TensorSpec("x", (2, 3), torch.float32)
    cpu = OpCall(REGION_OP, (None, None, None), (spec,), "cpu")
    assert [k.name for k in candidates(cpu)] == ["kiln.reference"]
    cuda = OpCall(REGION_OP, (None, None, None), (spec,), "cuda")
    usable = torch.cuda.is_available() and api.runtime_usable()[0]
    assert [k.name for k in candidates(cuda)] == (["tensorrt", "kiln.reference"] if usable else ["kiln.reference"])


def test_importing_the_kernels_does_not_load_tensorrt() -> None:
    code = (
        "import sys, kiln.kernels, kiln.kernels.tensorrt, kiln.tensorrt.runtime.region\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', "
        "'tensorrt_rtx_bindings') or m.startswith(('kiln.tensorrt.convert', 'kiln.tensorrt.partitioning')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- executing engines (GPU) ------------------------------------------------------------


def _runtime_or_skip() -> None:
    if not api.available():
        pytest.skip("needs TensorRT or TensorRT-RTX")
    ok, reason = api.runtime_usable()
    if not ok:
        pytest.skip(reason)


class WithCumprod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x) * 2
        b = torch.cumprod(a, dim=-1)
        return torch.relu(b) + a.sigmoid()


def _build_cuda(model: nn.Module, inputs: tuple[torch.Tensor, ...], precision: str = "fp32") -> kiln.Engine:
    # tune=False: timing would pick between "tensorrt" and "kiln.reference", which run the same engine
    config = BuildConfig(device="cuda", precision=precision, backend="tensorrt", tune=False)
    return kiln.build(model, inputs, config=config)


def _leaves(value: object) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(value)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "bert-tiny"])
def test_zoo_engine_with_a_tensorrt_region_matches_eager_on_gpu(name: str, tmp_path) -> None:
    _runtime_or_skip()
    from kiln import zoo

    entry = zoo.create(name, batch=2)
    model = entry.model.cuda()
    inputs = tuple(x.cuda() for x in entry.example_inputs)
    engine = _build_cuda(model, inputs)
    assert [s["kernel"] for s in engine.plan["steps"]] == ["tensorrt"]
    with torch.no_grad():
        expected = model(*inputs)
    got = engine(*inputs)  # CUDA-graph replay
    for g, w in zip(_leaves(got), _leaves(expected), strict=True):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
    engine.use_cuda_graph = False
    for g, w in zip(_leaves(engine(*inputs)), _leaves(got), strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)
    path = tmp_path / f"{name}.kiln"
    engine.save(path)
    for g, w in zip(_leaves(kiln.load(path)(*inputs)), _leaves(got), strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_partial_engine_runs_kiln_and_tensorrt_steps_on_gpu() -> None:
    _runtime_or_skip()
    model, x = WithCumprod(), torch.randn(4, 64, device="cuda")
    engine = _build_cuda(model, (x,))
    assert [s["kernel"] for s in engine.plan["steps"]][::2] == ["tensorrt", "tensorrt"]
    before = len(trt_engine._RUNNERS)
    for _ in range(3):
        torch.testing.assert_close(engine(x), model(x), atol=1e-4, rtol=1e-4)
    assert len(trt_engine._RUNNERS) - before <= 2  # one runner per region, made once


@pytest.mark.gpu
def test_fp16_region_on_gpu() -> None:
    _runtime_or_skip()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    engine = _build_cuda(model, (x,), precision="fp16")
    torch.testing.assert_close(engine(x), model(x), atol=2e-2, rtol=2e-2)
