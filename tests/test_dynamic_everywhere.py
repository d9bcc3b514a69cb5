"""Dynamic shapes everywhere else (issue 13, item 3; docs/dynamic-shapes.md "Where else the
dims go"): Engine.profile at the inputs' binding, `kiln bench ENGINE --batch` on a dynamic
engine beside static engines, ONNX export with dims, TensorRT optimization profiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from dynamic_factories import FACTORY

torch.manual_seed(0)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


BATCH = kiln.Dim("batch", min=1, opt=4, max=16)


@pytest.fixture(scope="module")
def conv():
    model = ConvNet().eval()
    engine = kiln.build(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(check_dims=False))
    return model, engine


# --- Engine.profile ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 16])
def test_profile_of_a_dynamic_engine_times_every_step_at_the_inputs_binding(conv, n):
    _, engine = conv
    rows = engine.profile(torch.randn(n, 3, 16, 16), iters=2)
    assert len(rows) == len(engine.step_specs) > 0
    assert all(r["ms"] >= 0 for r in rows)
    shapes = [tuple(r["shape"]) for r in rows if r["shape"]]
    assert shapes and all(isinstance(d, int) for s in shapes for d in s)  # concrete, not expressions
    assert all(s[0] == n for s in shapes if len(s) == 4)  # the conv activations at this batch
    assert engine(torch.randn(n, 3, 16, 16)).shape == (n, 10)  # the engine still runs after profiling


def test_profile_of_a_dynamic_engine_refuses_an_out_of_range_input(conv):
    _, engine = conv
    with pytest.raises(kiln.InputError, match="batch"):
        engine.profile(torch.randn(17, 3, 16, 16))


# --- kiln bench ENGINE --batch on a dynamic engine --------------------------------------------

TINY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))
"""


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """A dynamic engine (batch 1..16, opt 4) of a file.py:factory model, saved; its model name
    recorded in the build info, as `kiln build` records it."""
    from kiln import zoo

    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "tiny.py").write_text(TINY)
    name = f"{tmp / 'tiny.py'}:make"
    zm = zoo.resolve(name, batch=4, input_shape=(3, 16, 16))
    engine = kiln.build(zm.model, zm.example_inputs, dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(model_name=name, device="cpu", check_dims=False))
    engine.save(tmp / "tiny.kiln")
    return tmp / "tiny.kiln"


def bench_settings(**changes):
    from kiln.bench.results import BenchSettings

    base = dict(device="cpu", precisions=("fp32",), iters=3, warmup=1, rounds=1, peers=("none",))
    return BenchSettings(**{**base, **changes})


def test_bench_a_dynamic_engine_at_each_size_beside_static_engines(tiny_engine):
    from kiln.bench import runner

    report = runner.bench_model(str(tiny_engine), bench_settings(batches=(1, 3, 16)))
    rows = {(r.peer, r.batch): r for r in report.results}
    assert set(rows) == {(p, b) for p in ("eager", "kiln", "kiln-static") for b in (1, 3, 16)}
    for b in (1, 3, 16):
        dyn, static = rows["kiln", b], rows["kiln-static", b]
        assert (dyn.status, static.status) == ("ok", "ok"), (dyn.reason, static.reason)
        assert dyn.accuracy.max_abs < 1e-4 and static.accuracy.max_abs < 1e-4  # both vs eager at this size
        assert dyn.vs_static == pytest.approx(dyn.latency.median_ms / static.latency.median_ms)
        assert "first call at these shapes" in dyn.note and "batch 1..16 (opt 4)" in dyn.note
        assert f"({b}, 3, 16, 16)" in static.note
        assert rows["eager", b].vs_static is None
    assert any("vs static" in n for n in report.notes)


def test_bench_a_dynamic_engine_defaults_to_opt_and_refuses_sizes_outside_its_range(tiny_engine):
    from kiln.bench import runner

    report = runner.bench_model(str(tiny_engine), bench_settings(peers=("kiln-static",)))
    assert {r.batch for r in report.results} == {4}
    with pytest.raises(ValueError, match=r"--batch 17: this engine takes batch 1\.\.16 \(opt 4\)"):
        runner.bench_model(str(tiny_engine), bench_settings(batches=(1, 17)))


def test_bench_command_on_a_dynamic_engine_writes_vs_static(tiny_engine, tmp_path):
    import json

    from typer.testing import CliRunner

    from kiln.cli import app

    out = tmp_path / "b.json"
    result = CliRunner(env={"COLUMNS": "120"}).invoke(app, [
        "bench", str(tiny_engine), "--batch", "1,3", "--device", "cpu", "--against", "none", "--iters", "2",
        "--warmup", "0", "--rounds", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "÷static" in result.output
    data = json.loads(out.read_text())
    ratios = {r["batch"]: r["vs_static"] for r in data["results"] if r["peer"] == "kiln"}
    assert set(ratios) == {1, 3} and all(v > 0 for v in ratios.values())


def test_random_inputs_of_a_dynamic_engine_take_concrete_shapes(conv):
    from kiln.bench.runner import random_inputs

    _, engine = conv
    assert [tuple(x.shape) for x in random_inputs(engine, 0)] == [(4, 3, 16, 16)]  # opt
    assert [tuple(x.shape) for x in random_inputs(engine, 0, engine.input_shapes_at(batch=7))] == [(7, 3, 16, 16)]


# --- ONNX export with dims --------------------------------------------------------------------


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.proj(h), h.sum(1)


def _onnx_dims(path):
    import onnx

    m = onnx.load(str(path))
    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {v.name: shape(v) for v in [*m.graph.input, *m.graph.output]}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_onnx_with_dims_runs_at_every_size_in_the_range(tmp_path, exporter, monkeypatch):
    pytest.importorskip("onnxruntime")
    from kiln.onnx import export as onnx_export

    if exporter == "torchscript":  # the fallback path: dynamic_axes, outputs' axes found by running
        def refuse(*a, **k):
            raise RuntimeError("dynamo refused (test)")
        monkeypatch.setattr(onnx_export, "_export_dynamo", refuse)
    model = Tokens().eval()
    batch, seq = kiln.Dim("batch", min=1, opt=4, max=8), kiln.Dim("seq", min=2, opt=6, max=12)
    ids, mask = torch.randint(0, 50, (1, 5)), torch.ones(1, 5)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    report = onnx_export.export_onnx(model, (ids, mask), tmp_path / "t.onnx", dynamic_shapes=shapes)
    assert report.exporter == exporter
    assert report.dims == ["batch 1..8 (opt 4)", "seq 2..12 (opt 6)"]
    dims = _onnx_dims(tmp_path / "t.onnx")
    assert dims["input_ids"] == ["batch", "seq"] and dims["attention_mask"] == ["batch", "seq"]
    outs = [v for k, v in dims.items() if k not in ("input_ids", "attention_mask")]
    assert all(isinstance(v[0], str) for v in outs)  # every output's batch axis is symbolic
    results = onnx_export.validate_onnx_dims(tmp_path / "t.onnx", model, (ids, mask), shapes)
    bindings = [b for b, _ in results]
    assert {"batch": 1, "seq": 2} in bindings and {"batch": 8, "seq": 12} in bindings and len(bindings) >= 5
    for b, r in results:
        assert r.passed, (b, r.max_abs_diff)
        assert r.outputs[0].shape == (b["batch"], b["seq"], 4)


def test_export_onnx_dims_errors(tmp_path):
    from kiln.onnx.export import OnnxError, export_onnx

    model = Tokens().eval()
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5)
    with pytest.raises(OnnxError, match="not both"):
        export_onnx(model, (ids, mask), tmp_path / "a.onnx", dynamic_batch=True, dynamic_shapes=({0: BATCH}, None))
    with pytest.raises(OnnxError, match="dynamic_shapes: .*'nope'"):
        export_onnx(model, (ids, mask), tmp_path / "a.onnx", dynamic_shapes={"nope": {0: BATCH}})




def test_export_onnx_command_with_batch_and_seq_ranges(tmp_path):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from kiln.cli import app

    (tmp_path / "dyn.py").write_text(FACTORY)
    out = tmp_path / "t.onnx"
    result = CliRunner(env={"COLUMNS": "120"}).invoke(app, [
        "export-onnx", f"{tmp_path / 'dyn.py'}:tokens", "-o", str(out), "--batch", "1:4:8", "--seq", "2:8:16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "batch 1..8 (opt 4), seq 2..16 (opt 8)" in text
    assert "PASS at batch=1, seq=2" in text and "PASS at batch=8, seq=16" in text and "FAIL" not in text
    dims = _onnx_dims(out)
    assert dims["input_ids"] == ["batch", "seq"]
    bad = CliRunner().invoke(app, ["export-onnx", f"{tmp_path / 'dyn.py'}:tokens", "-o", str(out),
                                   "--batch", "1:4:8", "--dynamic-batch"])
    assert bad.exit_code != 0 and "not both" in bad.output


# --- TensorRT: optimization profiles from kiln dims --------------------------------------------


def test_tensorrt_profile_from_kiln_dims_builds_a_dynamic_network():
    kt = pytest.importorskip("kiln.tensorrt")
    try:
        kt.api.trt()
    except Exception as exc:  # noqa: BLE001 - no TensorRT here
        pytest.skip(f"TensorRT unavailable: {exc}")
    from kiln.dims import normalize
    from kiln.tensorrt.convert.build import shape_ranges

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)).sum(1)

    batch, seq = kiln.Dim("batch", min=1, opt=4, max=16), kiln.Dim("seq", min=2, opt=8, max=32)
    x = torch.randn(4, 8, 8)
    spec = normalize(({0: batch, 1: seq},), (x,))
    gm = torch.export.export(Model().eval(), spec.export_inputs((x,)),
                             dynamic_shapes=spec.to_torch_export()).run_decompositions().module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = spec.symbol_names([placeholders[-1].meta["val"]])
    net = kt.build_network(gm)
    assert tuple(net.network.get_input(0).shape) == (-1, -1, 8)
    ranges = shape_ranges(net, spec.dims, symbols)
    assert list(ranges.values()) == [([1, 2, 8], [4, 8, 8], [16, 32, 8])]
    with pytest.raises(kt.ConversionError):  # two symbolic sizes: batch= alone cannot say
        kt.build_engine(net, batch=(1, 4, 16))
    assert kt.build_engine(net, shapes=ranges).serialized


def test_tensorrt_backend_refuses_dynamic_shapes_with_a_clear_error():
    with pytest.raises(kiln.KilnError, match="--backend tensorrt does not take dynamic shapes yet .*batch 1..16"):
        kiln.build(ConvNet().eval(), (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},),
                   config=kiln.BuildConfig(backend="tensorrt", check_dims=False))
