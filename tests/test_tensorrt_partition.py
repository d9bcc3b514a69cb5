"""kiln.build(..., backend="tensorrt"): supported regions become kiln::tensorrt_region steps.

Everything here runs on the CPU: TensorRT-RTX builds engines without a GPU. The engines cannot
run here, so numerics are checked with an emulator that stands in for the TensorRT runtime and
re-runs the original graph's nodes by the region's tensor names: it proves that the splice
(inputs, outputs, their order, the graph's order) is right. The TensorRT runtime itself is
exercised by the GPU tests in test_tensorrt_region.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

from kiln.tensorrt import api

if not api.available():
    pytest.skip("needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')", allow_module_level=True)

import kiln  # noqa: E402
import kiln.kernels  # noqa: E402,F401 - registers the "tensorrt" kernel (and the op)
import kiln.tensorrt.partitioning.partition as trt_partition  # noqa: E402
import kiln.tensorrt.runtime.engine as trt_engine  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.builder import BuildConfig  # noqa: E402
from kiln.cli.commands import app  # noqa: E402
from kiln.kernels import KERNELS, register_kernel  # noqa: E402
from kiln.tensorrt import IncompleteConversionError, RegionRuntimeError  # noqa: E402
from kiln.tensorrt.runtime.region import REGION_OP, parse_spec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:this engine's TensorRT regions cannot run here")


# --- helpers ----------------------------------------------------------------------------


def _emulator(original: fx.GraphModule) -> Callable[..., Callable[[list[torch.Tensor]], list[torch.Tensor]]]:
    """A stand-in for ``kiln.tensorrt.runtime.engine.runner_for`` that runs the region's original nodes."""

    def runner_for(engine: torch.Tensor, spec_text: str, device: torch.device) -> Callable:
        spec = parse_spec(spec_text)

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            env = {s.name: x for s, x in zip(spec.inputs, inputs, strict=True)}
            for node in original.graph.nodes:
                if node.name in env or node.op in ("placeholder", "output"):
                    continue
                if node.op == "get_attr":
                    env[node.name] = getattr(original, node.target)
                elif all(a.name in env for a in node.all_input_nodes):
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
                    env[node.name] = node.target(*args, **kwargs)
            return [env[s.name.removesuffix(".out")].to(s.dtype).contiguous() for s in spec.outputs]

        return run

    return runner_for


@pytest.fixture
def emulate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Build with the real partitioner; run regions with the emulator instead of TensorRT."""
    real = trt_partition.partition_graph

    def spy(graph, **options):  # noqa: ANN001, ANN003, ANN202
        monkeypatch.setattr(trt_engine, "runner_for", _emulator(copy.deepcopy(graph.module)))
        return real(graph, **options)

    monkeypatch.setattr(trt_partition, "partition_graph", spy)
    yield


def _build(model: nn.Module, inputs: tuple[torch.Tensor, ...], **options: object) -> kiln.Engine:
    config = BuildConfig(device="cpu", backend="tensorrt", **options)
    return kiln.build(model, inputs, config=config)


def _kernels(engine: kiln.Engine) -> list[tuple[str, str]]:
    return [(s["op"], s["kernel"]) for s in engine.plan["steps"]]


def _assert_same(got: object, want: object, tol: float = 1e-4) -> None:
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


class WithCumprod(nn.Module):
    """relu → cumprod (no converter) → relu, plus a branch around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x) * 2
        b = torch.cumprod(a, dim=-1)
        return torch.relu(b) + a.sigmoid()


@torch.library.custom_op("kilntest::running_max", mutates_args=())
def running_max(x: torch.Tensor) -> torch.Tensor:
    """A custom op TensorRT knows nothing about (outside kiln's namespace: a test kernel runs it)."""
    return torch.cummax(x, dim=-1).values


running_max.register_fake(lambda x: torch.empty_like(x))


@pytest.fixture(autouse=True, scope="module")
def _running_max_kernel() -> Iterator[None]:
    def make(name: str, out: object) -> object:
        return lambda args, kwargs, outs: running_max(*args, **kwargs)

    register_kernel("test.running_max", provider="test", implements="kilntest.running_max.default",
                    writes_planned_outputs=False)(make)
    yield
    KERNELS.pop("test.running_max", None)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = torch.ops.kilntest.running_max(y)
        return self.fc(y.mean(-1).flatten(1)).sigmoid()


# --- zoo models convert whole -----------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "bert-tiny"])
def test_zoo_model_becomes_one_tensorrt_region(name: str, emulate: None, tmp_path) -> None:
    entry = zoo.create(name)
    engine = _build(entry.model, entry.example_inputs, require_full=True)
    assert _kernels(engine) == [(REGION_OP, "kiln.reference")]  # the CPU has no TensorRT runtime
    report = engine.build_info["tensorrt"]
    json.dumps(report)  # JSON-safe
    assert report["flavor"] == api.flavor() and report["version"] == api.version()
    assert report["outside"] == [] and report["ops_converted"] == report["ops_total"] > 10
    (region,) = report["regions"]
    assert region["node"] == engine.plan["steps"][0]["name"]
    assert [i["name"] for i in region["inputs"]] == [s.name for s in engine.graph_inputs]
    step = engine.plan["steps"][0]
    assert step["args"][1] == {"weight": region["weight"]}
    spec = parse_spec(step["args"][2])
    assert [s.to_json() for s in spec.outputs] == region["outputs"]
    data = engine.weights[region["weight"]]
    assert data.dtype == torch.uint8 and data.dim() == 1 and data.numel() == region["engine_bytes"]
    assert set(engine.weights) == {region["weight"]}  # the model's weights live inside the TensorRT engine

    with torch.no_grad():
        expected = entry.model(*entry.example_inputs)
    _assert_same(engine(*entry.example_inputs), expected)

    path = tmp_path / f"{name}.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    assert loaded.plan["steps"] == engine.plan["steps"]
    assert torch.equal(loaded.weights[region["weight"]], data)
    assert loaded.build_info["tensorrt"] == report
    _assert_same(loaded(*entry.example_inputs), expected)


# --- partial conversion -----------------------------------------------------------------


def test_unconverted_op_stays_on_kiln_between_regions(emulate: None) -> None:
    model, x = WithCumprod(), torch.randn(2, 8)
    engine = _build(model, (x,))
    assert _kernels(engine) == [
        (REGION_OP, "kiln.reference"),
        ("aten.cumprod.default", "aten"),
        (REGION_OP, "kiln.reference"),
    ]
    report = engine.build_info["tensorrt"]
    assert len(report["regions"]) == 2
    (cumprod,) = report["outside"]
    assert cumprod["op"] == "aten.cumprod.default" and "no TensorRT converter" in cumprod["reason"]
    assert "test_tensorrt_partition.py" in cumprod["source"] and "torch.cumprod" in cumprod["source"]
    assert report["ops_converted"] == report["ops_total"] - 1
    _assert_same(engine(x), model(x))


def test_custom_op_splits_a_cnn_into_two_engines(emulate: None) -> None:
    model, x = WithCustomOp().eval(), torch.randn(2, 3, 6, 6)
    engine = _build(model, (x,))
    ops = [op for op, _ in _kernels(engine)]
    assert ops == [REGION_OP, "kilntest.running_max.default", REGION_OP]
    outside = engine.build_info["tensorrt"]["outside"]
    assert [o["op"] for o in outside] == ["kilntest.running_max.default"]
    assert "torch.ops.kilntest.running_max(y)" in outside[0]["source"]
    with torch.no_grad():
        _assert_same(engine(x), model(x))


def test_require_full_lists_every_unconverted_op_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.cumprod(x.relu(), dim=-1)
            return torch.ops.kilntest.running_max(y) * 2

    def no_engines(*args: object, **kwargs: object) -> None:
        raise AssertionError("require_full must fail before building any engine")

    monkeypatch.setattr(trt_partition, "build_engine", no_engines)
    with pytest.raises(IncompleteConversionError) as info:
        _build(Two(), (torch.randn(2, 8),), require_full=True)
    message = str(info.value)
    assert "2 op(s)" in message
    assert "aten.cumprod.default (node cumprod)" in message and "y = torch.cumprod(x.relu(), dim=-1)" in message
    assert "kilntest.running_max.default" in message and "test_tensorrt_partition.py" in message
    assert "@kiln.tensorrt.converter(torch.ops.aten.cumprod.default)" in message and "--require-full" in message
    assert [o["op"] for o in info.value.ops] == ["aten.cumprod.default", "kilntest.running_max.default"]


def test_region_reading_a_later_region_is_ordered_after_it(emulate: None) -> None:
    """relu(cumprod(x)) + sigmoid(x): the region {relu, add} reads the region {sigmoid}, which the
    captured graph places after relu; the spliced graph must run sigmoid's engine first."""

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(x, -1).relu() + x.sigmoid()

    model, x = Model(), torch.randn(3, 5)
    engine = _build(model, (x,), passes=[])  # no fusion: keep the three ops apart
    steps = engine.plan["steps"]
    assert [s["op"] for s in steps] == ["aten.cumprod.default", REGION_OP, REGION_OP]
    report = {r["node"]: r for r in engine.build_info["tensorrt"]["regions"]}
    assert report[steps[1]["name"]]["op_counts"] == {"aten.sigmoid.default": 1}
    assert report[steps[2]["name"]]["op_counts"] == {"aten.relu.default": 1, "aten.add.Tensor": 1}
    _assert_same(engine(x), model(x))


def test_regions_of_views_only_stay_on_kiln(emulate: None) -> None:
    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(x, -1).view(-1)[:7]

    model, x = Model(), torch.randn(3, 5)
    engine = _build(model, (x,), passes=[])
    assert all(op != REGION_OP for op, _ in _kernels(engine))
    reasons = {o["op"]: o["reason"] for o in engine.build_info["tensorrt"]["outside"]}
    assert "view ops only" in reasons["aten.view.default"]
    _assert_same(engine(x), model(x))


# --- running without a usable TensorRT runtime ------------------------------------------


def test_engine_with_regions_explains_why_it_cannot_run_here(tmp_path) -> None:
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4)
    engine = _build(model, (x,))
    path = tmp_path / "linear.kiln"
    engine.save(path)
    for candidate in (engine, kiln.load(path)):
        with pytest.raises(RegionRuntimeError) as info:
            candidate(x)
        message = str(info.value)
        assert "this engine contains TensorRT regions" in message
        assert f"({api.flavor()}, {api.version()}) cannot run on cpu because" in message
        assert "--backend kiln" in message and "install tensorrt" in message


def test_build_warns_when_the_regions_cannot_run_here() -> None:
    with pytest.warns(kiln.errors.KilnWarning, match="TensorRT regions cannot run here"):
        _build(nn.Linear(4, 3), (torch.randn(2, 4),))


# --- the command line -------------------------------------------------------------------

FACTORY = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval(), (
        torch.randn(1, 3, 8, 8),
    )

class Cumprod(nn.Module):
    def forward(self, x):
        return torch.cumprod(x.relu(), -1)

def make_cumprod():
    return Cumprod(), (torch.randn(2, 8),)
"""


def test_cli_build_backend_tensorrt_and_inspect_json(tmp_path) -> None:
    runner = CliRunner()
    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    out = tmp_path / "tiny.kiln"
    args = ["build", f"{factory}:make", "--device", "cpu", "--precision", "fp32", "--backend", "tensorrt"]
    result = runner.invoke(app, [*args, "--require-full", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tensorrt" in result.output and out.is_file()

    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [(s["op"], s["kernel"]) for s in info["steps"]] == [(REGION_OP, "kiln.reference")]
    assert info["build"]["backend"] == "tensorrt"
    assert len(info["build"]["tensorrt"]["regions"]) == 1

    bad = [*args[:1], f"{factory}:make_cumprod", *args[2:], "--require-full", "-o", str(tmp_path / "c.kiln")]
    result = runner.invoke(app, bad)
    assert result.exit_code == 1
    assert "aten.cumprod.default" in result.output and "--require-full" in result.output
