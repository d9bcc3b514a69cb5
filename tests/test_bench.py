"""kiln bench on the CPU: statistics on a fake timer, peers interleaved in rounds, noisy rows
flagged, the machine's load recorded, reports, skipped and failing peers."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kiln
from kiln.bench import report as writers
from kiln.bench import runner as bench
from kiln.bench.peers import PEERS, Peer, PeerContext, PeerSkipped, Prepared
from kiln.bench.results import Stats, noise_reason, round_spread
from kiln.cli import app
from kiln.errors import KilnError
from kiln.timing import Latency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = """
    import torch
    from torch import nn

    def make():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 10),
        )
"""


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(TINY))
    return f"{path}:make"


def cpu_settings(**changes) -> bench.BenchSettings:
    base = dict(device="cpu", precisions=("fp32",), iters=5, warmup=2, rounds=1, input_shape=(3, 16, 16))
    return bench.BenchSettings(**{**base, **changes})


class FakeTimer:
    """Hands out known samples, one list per timed peer, and records how it was called."""

    def __init__(self, *samples: list[float]):
        self.samples = list(samples)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, fn, device, *, warmup: int, iters: int) -> Latency:
        fn()
        self.calls.append((warmup, iters))
        return Latency(self.samples.pop(0))


def fake_clock(step: float = 0.25):
    t = [0.0]

    def clock() -> float:
        t[0] += step
        return t[0]

    return clock


def constant_peer(name: str, value: list[list[float]], calls: list[str] | None = None) -> Peer:
    out = torch.tensor(value)

    def run() -> torch.Tensor:
        if calls is not None:
            calls.append(name)
        return out

    return Peer(name, lambda ctx: Prepared(run=run, note=f"{name} note"))


def registry_of(*peers: Peer) -> dict[str, Peer]:
    return {p.name: p for p in peers}


# --- statistics ----------------------------------------------------------------------------


def test_statistics_on_a_fake_timer(tiny):
    registry = registry_of(
        constant_peer("eager", [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]),
        constant_peer("fast", [[1.0, 2.0, 3.5], [3.0, 2.0, 1.0]]),
    )
    timer = FakeTimer([4.0, 2.0, 3.0, 1.0, 5.0], [1.0, 1.0, 1.0, 1.0, 2.0])
    settings = cpu_settings(batches=(2,), peers=("fast",))
    report = bench.bench_model(tiny, settings, timer=timer, clock=fake_clock(), registry=registry)

    eager, fast = report.results
    assert (eager.peer, eager.precision, eager.batch, eager.status) == ("eager", "fp32", 2, "ok")
    assert (eager.latency.median_ms, eager.latency.p90_ms, eager.latency.p99_ms, eager.latency.iters) == (
        3.0, pytest.approx(4.6), pytest.approx(4.96), 5)
    assert eager.latency.p10_ms == pytest.approx(1.4)
    assert eager.latency.round_medians_ms == [3.0] and eager.latency.spread is None  # one round
    assert fast.latency.median_ms == 1.0
    assert fast.latency.p90_ms == pytest.approx(1.6)
    assert fast.latency.p99_ms == pytest.approx(1.96)
    assert eager.throughput == pytest.approx(2 * 1000 / 3.0)
    assert fast.throughput == pytest.approx(2000.0)
    assert eager.speedup == pytest.approx(1.0)
    assert fast.speedup == pytest.approx(3.0)
    assert fast.build_seconds == pytest.approx(0.25)  # one clock step: prepare + first call
    assert fast.peak_memory_bytes is None  # CPU
    assert fast.accuracy.max_abs == pytest.approx(0.5)
    assert fast.accuracy.cosine < 1.0
    assert fast.note == "fast note"
    # 250 ms per call fits 80 calls in 20 s: the 5 asked for are kept, warm-up capped by them
    assert timer.calls == [(2, 5), (2, 5)]


def test_timed_iterations_shrink_for_slow_peers():
    settings = bench.BenchSettings(iters=100, max_seconds=20.0, min_iters=5)
    assert bench.timed_iters(1.0, settings) == 100
    assert bench.timed_iters(1000.0, settings) == 20
    assert bench.timed_iters(60_000.0, settings) == 5
    assert bench.timed_iters(0.0, settings) == 100


def test_compare_outputs_reports_difference_cosine_and_top1():
    ref = [torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    got = [torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    acc = bench.compare_outputs(got, ref, classifier=True)
    assert acc.max_abs == 1.0
    assert acc.cosine == pytest.approx(0.5)
    assert acc.top1_agreement == 0.5
    same = bench.compare_outputs(ref, ref, classifier=False)
    assert (same.max_abs, same.cosine, same.top1_agreement) == (0.0, pytest.approx(1.0), None)
    mismatch = bench.compare_outputs([torch.zeros(3)], ref, classifier=False)
    assert math.isnan(mismatch.max_abs) and "shape" in mismatch.note


def test_speedups_use_eager_fp32_of_the_same_batch():
    def row(peer, precision, batch, median):
        return bench.PeerResult(peer, precision, batch, latency=Stats(median, median, median, 1))

    results = [
        row("eager", "fp32", 1, 10.0),
        row("kiln", "fp16", 1, 4.0),
        row("eager", "fp32", 8, 40.0),
        row("kiln", "fp16", 8, 10.0),
    ]
    bench.attach_speedups(results)
    assert [r.speedup for r in results] == [1.0, 2.5, 1.0, 4.0]


def test_precisions_fall_back_to_fp32_on_the_cpu():
    cpu = torch.device("cpu")
    assert bench.effective_precisions(["fp16", "bf16"], cpu)[0] == ("fp32",)
    assert "CUDA" in bench.effective_precisions(["fp16"], cpu)[1][0]
    with pytest.raises(ValueError, match="fp8"):
        bench.effective_precisions(["fp8"], cpu)


def test_peer_selection():
    defaults = [p.name for p in bench.select_peers(None, PEERS)]
    assert "compile-max-autotune" not in defaults
    assert {"eager", "kiln", "onnxruntime", "tensorrt", "compile"} <= set(defaults)
    assert [p.name for p in bench.select_peers(["onnxruntime"], PEERS)] == ["eager", "onnxruntime", "kiln"]
    assert "compile-max-autotune" in [p.name for p in bench.select_peers(["compile-max-autotune"], PEERS)]
    with pytest.raises(ValueError, match="known: eager"):
        bench.select_peers(["onxruntime"], PEERS)


# --- peers that cannot run or fail ---------------------------------------------------------


def test_failing_and_skipped_peers_are_reported_with_their_reason(tiny):
    def boom(ctx: PeerContext) -> Prepared:
        raise RuntimeError("boom: the runtime exploded\nsecond line")

    def absent(ctx: PeerContext) -> Prepared:
        raise PeerSkipped("absent-runtime is not installed")

    registry = {**PEERS, "boom": Peer("boom", boom), "absent": Peer("absent", absent)}
    settings = cpu_settings(peers=("boom", "absent", "tensorrt", "eager-cudagraph", "compile-reduce-overhead"))
    report = bench.bench_model(tiny, settings, timer=FakeTimer(*[[1.0]] * 3), registry=registry)
    by_peer = {r.peer: r for r in report.results}

    assert list(by_peer) == [
        "eager",
        "eager-cudagraph",
        "compile-reduce-overhead",
        "tensorrt",
        "kiln",
        "boom",
        "absent",
    ]  # registry order
    assert (by_peer["boom"].status, by_peer["boom"].reason) == ("failed", "RuntimeError: boom: the runtime exploded")
    assert (by_peer["absent"].status, by_peer["absent"].reason) == ("skipped", "absent-runtime is not installed")
    assert by_peer["tensorrt"].status == "skipped" and "TensorRT" in by_peer["tensorrt"].reason
    for name in ("eager-cudagraph", "compile-reduce-overhead"):
        assert by_peer[name].status == "skipped" and "cpu" in by_peer[name].reason
    assert by_peer["kiln"].status == "ok" and by_peer["kiln"].accuracy.max_abs < 1e-4
    markdown = writers.report_markdown(report)
    assert "failed: RuntimeError: boom: the runtime exploded" in markdown
    assert "skipped: absent-runtime is not installed" in markdown


def test_zoo_table_goes_on_when_a_model_fails(tiny):
    settings = cpu_settings(input_shape=None)
    zoo_report = bench.bench_zoo(["nosuchmodel", "squeezenet1_1"], settings, timer=FakeTimer([8.0], [4.0]))
    assert [e.model for e in zoo_report.entries] == ["nosuchmodel", "squeezenet1_1"]
    assert "unknown zoo model" in zoo_report.entries[0].error
    header, rows = writers.zoo_rows(zoo_report)
    assert header[:5] == ["model", "batch", "eager fp32 ms", "kiln fp32 ms", "speed-up fp32"]
    assert rows[1][:5] == ["squeezenet1_1", "1", "8.000", "4.000", "2.00×"]
    assert rows[1][5] == "100%"  # kiln's top-1 agrees with eager on the classifier
    markdown = writers.zoo_markdown(zoo_report)
    assert "| nosuchmodel |" in markdown and "failed: ZooError" in markdown


def test_zoo_table_gives_kiln_against_the_best_other_peer(tiny):
    def slow(ctx: PeerContext) -> Prepared:
        return Prepared(run=lambda: torch.zeros(1))

    registry = {**PEERS, "slow": Peer("slow", slow), "fast": Peer("fast", slow)}
    settings = cpu_settings(peers=("eager", "slow", "fast", "kiln"))
    # registry order: eager 8 ms, then the others as registered, kiln last at 4 ms
    order = [p.name for p in bench.select_peers(settings.peers, registry)]
    times = {"eager": [8.0], "slow": [9.0], "fast": [2.0], "kiln": [4.0]}
    zoo_report = bench.bench_zoo([tiny], settings, timer=FakeTimer(*[times[n] for n in order]), registry=registry)
    header, rows = writers.zoo_rows(zoo_report)
    cells = dict(zip(header, rows[0]))
    assert cells["speed-up fp32"] == "2.00×", "eager / kiln"
    assert cells["vs best peer fp32"] == "0.50× fast", "the fastest peer other than kiln, named"
    assert float(cells["kiln build s"]) > 0


def test_a_model_benchmarked_in_its_own_process_reports_back(tiny):
    # what the zoo does per model on a GPU: a crash there cannot take the table with it
    report = bench.bench_model_in_child(tiny, cpu_settings(peers=("eager", "kiln")))
    by_peer = {r.peer: r for r in report.results}
    assert by_peer["kiln"].status == "ok" and by_peer["kiln"].latency.median_ms > 0
    with pytest.raises(KilnError, match="unknown zoo model"):
        bench.bench_model_in_child("nosuchmodel", cpu_settings())


def test_a_benchmark_process_that_dies_is_that_models_error(tmp_path):
    # a device-side assert or a segfault kills the process before it can report
    path = tmp_path / "dies.py"
    path.write_text(textwrap.dedent("""
        import os
        from torch import nn

        class Dies(nn.Module):
            def forward(self, x):
                os._exit(3)

        def make():
            return Dies()
    """))
    with pytest.raises(KilnError, match=r"died \(exit code 3\) before reporting"):
        bench.bench_model_in_child(f"{path}:make", cpu_settings(peers=("eager", "kiln")))


# --- engine files --------------------------------------------------------------------------


def test_bench_an_engine_file_rebuilds_eager_from_its_model_name(tiny, tmp_path):
    from kiln import zoo
    from kiln.builder import BuildConfig

    zm = zoo.resolve(tiny, input_shape=(3, 16, 16))
    engine = kiln.build(zm.model, zm.example_inputs, config=BuildConfig(model_name=tiny, device="cpu"))
    engine.save(tmp_path / "tiny.kiln")
    report = bench.bench_model(str(tmp_path / "tiny.kiln"), cpu_settings(peers=("none",)))
    eager, k = report.results
    assert (eager.status, k.status, k.note) == ("ok", "ok", "engine file")
    assert k.build_seconds == engine.build_info["build_seconds"]
    assert k.accuracy.max_abs < 1e-4  # same seed: the rebuilt eager has the engine's weights
    assert any("rebuilt from the zoo" in n for n in report.notes)


def test_bench_an_engine_file_without_a_zoo_model_runs_the_engine_alone(tmp_path):
    model = torch.nn.Linear(4, 2).eval()
    engine = kiln.build(model, (torch.randn(3, 4),), device="cpu")  # model name: "Linear"
    engine.save(tmp_path / "linear.kiln")
    report = bench.bench_model(str(tmp_path / "linear.kiln"), cpu_settings(peers=("onnxruntime",)))
    by_peer = {r.peer: r for r in report.results}
    assert by_peer["kiln"].status == "ok" and by_peer["kiln"].accuracy is None
    for name in ("eager", "onnxruntime"):
        assert by_peer[name].status == "skipped" and "not a zoo name" in by_peer[name].reason
    assert any("no eager model for 'Linear'" in n for n in report.notes)


# --- the command and its files -------------------------------------------------------------


def test_bench_command_writes_json_markdown_and_png(tiny, tmp_path):
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    args = [
        "bench",
        tiny,
        "--input-shape",
        "3,16,16",
        "--device",
        "cpu",
        "--precision",
        "fp16",
        "--against",
        "onnxruntime,tensorrt",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
        str(out["json"]),
        "--markdown",
        str(out["md"]),
        "--plot",
        str(out["png"]),
    ]
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80

    data = json.loads(out["json"].read_text())
    assert data["schema"] == writers.SCHEMA == "kiln.bench/2"
    assert {"model", "task", "pretrained", "environment", "settings", "results", "notes"} <= set(data)
    env = data["environment"]
    assert {"device_name", "torch_version", "kiln_version", "date", "cpu_count", "load_before", "load_after"} <= set(
        env)
    assert env["cpu_count"] >= 1 and len(env["load_before"]) == 3
    assert data["settings"]["rounds"] == 5
    rows = {r["peer"]: r for r in data["results"]}
    assert list(rows) == ["eager", "onnxruntime", "tensorrt", "kiln"]
    for name in ("eager", "onnxruntime", "kiln"):
        r = rows[name]
        assert r["status"] == "ok" and r["precision"] == "fp32"  # fp16 falls back on the CPU
        assert {"median_ms", "p90_ms", "p99_ms", "p10_ms", "iters", "round_medians_ms", "spread", "noise"} == set(
            r["latency"])
        assert r["latency"]["iters"] == 3 and len(r["latency"]["round_medians_ms"]) == 3  # 3 calls: 3 rounds
        assert r["throughput"] > 0 and r["speedup"] > 0 and r["build_seconds"] >= 0
        assert r["accuracy"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["tensorrt"]["status"] == "skipped" and "TensorRT" in rows["tensorrt"]["reason"]
    assert any("fp32 on the CPU" in n for n in data["notes"])

    markdown = out["md"].read_text()
    assert markdown.splitlines()[0].startswith("# kiln bench:")
    assert "| peer | precision | batch | median ms | p90 ms | p99 ms | spread |" in markdown
    assert markdown.count("\n| ") == 2 + 4  # header, rule, four peers
    assert out["png"].read_bytes()[:8] == PNG_MAGIC
    assert "tensorrt" in result.output and "kiln" in result.output


def test_bench_command_names_an_unknown_peer(tiny):
    result = CliRunner().invoke(app, ["bench", tiny, "--against", "onxruntime"])
    assert result.exit_code == 2
    assert "did you mean onnxruntime" in result.output and "Traceback" not in result.output


def test_zoo_plot_and_json(tiny, tmp_path):
    settings = cpu_settings()
    zoo_report = bench.bench_zoo([tiny, "nosuchmodel"], settings, timer=FakeTimer([2.0], [1.0]))
    writers.plot_zoo(zoo_report, tmp_path / "zoo.png")
    assert (tmp_path / "zoo.png").read_bytes()[:8] == PNG_MAGIC
    data = writers.zoo_to_dict(zoo_report)
    json.dumps(data, allow_nan=False)
    assert data["kind"] == "zoo" and data["entries"][1]["report"] is None


# --- rounds, noise, load -----------------------------------------------------------------------


class RoundTimer:
    """Per call: runs fn once (so the peer logs itself), then hands out that peer's next samples."""

    def __init__(self, calls: list[str], samples: dict[str, list[list[float]]]):
        self.calls, self.samples, self.order, self.args = calls, samples, [], []

    def __call__(self, fn, device, *, warmup: int, iters: int) -> Latency:
        fn()
        name = self.calls[-1]
        self.order.append(name)
        self.args.append((name, warmup, iters))
        return Latency(self.samples[name].pop(0)[:iters])


def test_peers_take_turns_in_rotating_rounds(tiny):
    calls: list[str] = []
    registry = registry_of(
        constant_peer("eager", [[1.0, 2.0]], calls), constant_peer("a", [[1.0, 2.0]], calls),
        constant_peer("b", [[1.0, 2.0]], calls),
    )
    samples = {name: [[2.0, 2.0]] * 3 for name in ("eager", "a", "b")}
    timer = RoundTimer(calls, samples)
    settings = cpu_settings(peers=("a", "b"), iters=6, rounds=3)
    report = bench.bench_model(tiny, settings, timer=timer, clock=fake_clock(), registry=registry)
    # round 1 starts at eager, round 2 at a, round 3 at b: no peer always follows the same one
    assert timer.order == ["eager", "a", "b", "a", "b", "eager", "b", "eager", "a"]
    # 6 calls in 3 rounds of 2; the first round gets --warmup, later ones one re-warming call
    assert [(w, n) for name, w, n in timer.args if name == "a"] == [(2, 2), (1, 2), (1, 2)]
    for r in report.results:
        assert r.latency.iters == 6 and r.latency.round_medians_ms == [2.0, 2.0, 2.0]
        assert r.latency.spread == 0.0 and not r.noisy


def test_round_plan_splits_calls_evenly():
    assert bench.round_plan(10, 3) == [4, 3, 3]
    assert bench.round_plan(2, 5) == [1, 1]  # never an empty round
    assert bench.round_plan(5, 1) == [5]


def test_noise_is_named():
    assert noise_reason(10.0, 11.0, 0.05, 1.5, 0.10) == ""
    assert noise_reason(10.0, 20.0, None, 1.5, 0.10) == "p90 is 2.0× the median"
    assert noise_reason(10.0, 11.0, 0.5, 1.5, 0.10) == "round medians differ by 50%"
    assert round_spread([9.0, 11.0], 10.0) == pytest.approx(0.2)
    assert round_spread([9.0], 10.0) is None


def test_a_busy_spell_flags_the_row_everywhere(tiny, tmp_path, monkeypatch):
    """One round of eager ran while the machine was busy (the 1426 ms vs 25.6 ms of issue 11)."""
    calls: list[str] = []
    registry = registry_of(constant_peer("eager", [[1.0, 2.0]], calls), constant_peer("kiln", [[1.0, 2.0]], calls))
    samples = {
        "eager": [[25.0, 25.5], [1426.0, 1400.0], [25.6, 25.2]],
        "kiln": [[10.0, 10.1], [10.2, 10.0], [10.1, 10.0]],
    }
    monkeypatch.setattr(bench, "load_average", lambda: [64.0, 32.0, 16.0])
    settings = cpu_settings(peers=("none",), iters=6, rounds=3)
    report = bench.bench_model(tiny, settings, timer=RoundTimer(calls, samples), clock=fake_clock(), registry=registry)
    eager, kiln_row = report.results
    assert eager.noisy and "round medians differ" in eager.latency.noise
    assert not kiln_row.noisy
    assert kiln_row.speedup_noisy, "a speed-up against a noisy baseline is flagged too"
    assert any("busy" in n and "load 64.00" in n for n in report.notes)
    assert any("noisy timings (eager fp32 batch 1)" in n for n in report.notes)

    cells = writers.result_cells(kiln_row)
    assert cells[writers.COLUMNS.index("speed-up")].endswith("×?")
    assert writers.result_cells(eager)[-1].startswith("noisy: ")
    markdown = writers.report_markdown(report)
    assert "noisy: p90 is 55.3× the median; round medians differ" in markdown
    assert "| 2.54×? |" in markdown and "load 64.00 on" in markdown
    data = writers.report_to_dict(report)
    assert data["results"][0]["latency"]["noise"] and data["environment"]["load_before"] == [64.0, 32.0, 16.0]

    from rich.console import Console

    from kiln.cli.bench import footer, result_table

    console = Console(width=80, record=True)
    console.print(result_table(report))
    text = console.export_text()
    assert "eager fp32 noisy" in text and max(len(line) for line in text.splitlines()) <= 80
    assert any("noisy" in line for line in footer(report))

    writers.plot_report(report, tmp_path / "noisy.png")
    assert (tmp_path / "noisy.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_draws_whiskers_and_hatches_noisy_bars(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    quiet = Stats(2.0, 2.2, 2.3, 10, p10_ms=1.9, round_medians_ms=[2.0, 2.0], spread=0.0)
    noisy = Stats(5.0, 20.0, 30.0, 10, p10_ms=4.0, round_medians_ms=[5.0, 15.0], spread=2.0, noise="x")
    fig = Figure()
    ax = fig.add_subplot()
    assert writers._bars(ax, ["quiet", "noisy"], {"batch 1": [quiet, noisy]}, horizontal=False) is True
    bars = ax.patches
    assert [b.get_hatch() for b in bars] == [None, "///"]
    whiskers = [c for c in ax.containers if hasattr(c, "lines") and c.lines[2]]
    assert whiskers, "p10–p90 error bars are drawn"
    segments = whiskers[0].lines[2][0].get_segments()
    assert [tuple(round(y, 3) for _, y in seg) for seg in segments] == [(1.9, 2.2), (4.0, 20.0)]


@pytest.mark.gpu
def test_bench_on_the_gpu_interleaves_every_default_peer(tiny):
    """Every default peer prepared at once and timed in rounds on CUDA (CUDA graphs, compile, kiln)."""
    settings = bench.BenchSettings(device="cuda", precisions=("fp16",), iters=10, warmup=2, rounds=3,
                                   input_shape=(3, 16, 16))
    report = bench.bench_model(tiny, settings)
    by_peer = {(r.peer, r.precision): r for r in report.results}
    for key in (("eager", "fp32"), ("eager", "fp16"), ("eager-cudagraph", "fp16"), ("kiln", "fp16")):
        r = by_peer[key]
        assert r.status == "ok", (key, r.reason)
        assert r.latency.iters == 10 and len(r.latency.round_medians_ms) == 3
    assert by_peer[("kiln", "fp16")].accuracy.cosine > 0.999
