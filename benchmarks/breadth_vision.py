"""Breadth campaign: does kiln build vision models that are not in its zoo, and get them right?

For each model (torchvision and timm architectures beyond kiln.zoo.ZOO_TABLE, at small inputs
so each takes seconds on a CPU) it checks, in fp32 on the CPU:

  static   kiln.build(model, (x,)) at batch 2 against eager
  dynamic  a build with batch = Dim(min=1, opt=2, max=4), run at batch 1, 3 and 4 against eager
  file     engine.save → kiln.load gives the same outputs (static and dynamic engines)

and records one result per model: ``ok``, ``mismatch`` (the check and its error) or
``exception`` (the stage, the exception type and its first line).

Tolerance (as tests/test_zoo_families.py): relative error ≤ 1e-4 against eager fp32, or, for a
model whose own fp32 rounding error is that large, at most FP32_FACTOR times as far from
float64 eager as eager fp32 is. A loaded engine must give its builder's outputs within 1e-6.

  PYTHONPATH=src python benchmarks/breadth_vision.py --list
  PYTHONPATH=src python benchmarks/breadth_vision.py --group torchvision --out logs/tv.jsonl
  PYTHONPATH=src python benchmarks/breadth_vision.py alexnet timm/levit_128s
  PYTHONPATH=src python benchmarks/breadth_vision.py --table logs/*.jsonl   # markdown table

Models are built with random weights (batch norms calibrated on one random batch, as the zoo
does): the check is that the engine computes what the model computes, not that it classifies.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

import kiln
from kiln import zoo

FP32_TOL = 1e-4
FP32_FACTOR = 2.0
FILE_TOL = 1e-6
BATCH = 2
DYNAMIC_SIZES = (1, 3, 4)
SMALL = (3, 64, 64)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]  # one sample's input shape, without the batch dim
    note: str = ""


@dataclass
class Result:
    name: str
    group: str
    result: str = "ok"  # ok | mismatch | exception
    stage: str = ""
    error: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# --- the models ----------------------------------------------------------------------------


def _torchvision(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import inspect

        import torchvision

        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)  # no downloads: random backbone too
        return builder(weights=None, **kwargs)

    return make


def _vit_b_32(**kwargs: Any) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    vit_b = dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
    return VisionTransformer(**{**vit_b, **kwargs})


def _timm(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def _tv(name: str, shape: tuple[int, ...] = SMALL, note: str = "", group: str = "torchvision", **kw: Any) -> Case:
    return Case(name, group, _torchvision(name, **kw), shape, note)


def _tm(name: str, shape: tuple[int, ...] = SMALL, note: str = "", **kw: Any) -> Case:
    return Case(f"timm/{name}", "timm", _timm(name, **kw), shape, note)


# at SMALL, the constructor's defaults
TORCHVISION_SMALL = (
    "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "efficientnet_v2_s", "regnet_x_400mf", "wide_resnet50_2", "resnext50_32x4d", "densenet121", "convnext_tiny",
    "swin_v2_t",
)
TIMM_SMALL = (
    "convnext_atto", "poolformer_s12", "poolformerv2_s12", "ghostnet_050", "ghostnetv2_100", "repvgg_a0",
    "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small", "fastvit_t8", "regnetz_b16", "nf_resnet26",
    "res2net50_26w_4s", "resnest14d", "dla34", "hrnet_w18_small", "cspresnet50", "cspdarknet53", "dpn68", "tresnet_m",
    "pvt_v2_b0", "davit_tiny", "focalnet_tiny_srf", "efficientvit_b0", "repvit_m0_9", "mobileone_s0",
    "mobilenetv4_conv_small", "hgnetv2_b0", "rexnet_100", "lcnet_050", "mixnet_s", "selecsls42b", "ese_vovnet19b_dw",
    "inception_next_tiny", "sequencer2d_s", "swiftformer_xs", "starnet_s1", "mambaout_femto", "eca_nfnet_l0",
    "skresnet18", "seresnext26d_32x4d", "xception41", "fasternet_t0", "shvit_s1", "rdnet_tiny",
    "tiny_vit_5m_224",
)
# at SMALL with img_size=64 (models whose position embeddings or windows follow img_size)
TIMM_IMG64 = (
    "efficientformerv2_s0", "levit_128s", "coatnet_nano_rw_224", "maxvit_nano_rw_256", "mixer_s32_224",
    "resmlp_12_224", "pit_ti_224", "twins_svt_small", "gcvit_xxtiny", "efficientvit_m0",
    "volo_d1_224", "convit_tiny", "botnet26t_256", "lambda_resnet26t", "nest_tiny", "coat_lite_tiny",
)

CASES: tuple[Case, ...] = (
    # torchvision classifiers
    _tv("alexnet"),
    _tv("vgg11_bn", (3, 32, 32)),
    _tv("googlenet", init_weights=True, aux_logits=False),
    *(_tv(name) for name in TORCHVISION_SMALL),
    _tv("maxvit_t", (3, 224, 224), note="7x7 windows at every stage: 224 only"),
    Case("vit_b_32", "torchvision", lambda: _vit_b_32(image_size=64, num_layers=2), SMALL, "2 layers"),
    # segmentation (dict outputs)
    _tv("fcn_resnet50", group="segmentation", aux_loss=False, num_classes=5),
    _tv("deeplabv3_mobilenet_v3_large", group="segmentation", aux_loss=False, num_classes=5),
    _tv("lraspp_mobilenet_v3_large", group="segmentation", num_classes=5),
    # video (N, C, T, H, W)
    _tv("r3d_18", (3, 4, 32, 32), group="video"),
    _tv("r2plus1d_18", (3, 4, 32, 32), group="video"),
    _tv("mvit_v2_s", (3, 16, 224, 224), group="video", note="fixed input size; slow"),
    # timm
    *(_tm(name) for name in TIMM_SMALL),
    *(_tm(name, img_size=64) for name in TIMM_IMG64),
    _tm("efficientformer_l1", (3, 224, 224), note="its attention stage is fixed at 224"),
    _tm("cait_xxs24_224", img_size=64, depth=2),
    _tm("xcit_nano_12_p16_224", img_size=64, depth=2),
    _tm("beit_base_patch16_224", img_size=64, depth=2),
    _tm("eva02_tiny_patch14_224", (3, 56, 56), img_size=56, depth=2),
    _tm("inception_v4", (3, 96, 96)),
    _tm("crossvit_tiny_240", (3, 240, 240)),
    _tm("hiera_tiny_224", (3, 224, 224)),
)


def prepare(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with seeded random weights, batch norms calibrated as the zoo does, and x."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = case.make()
        x = torch.randn((BATCH, *case.shape), generator=generator)
        zoo._randomize_zero_layers(model)
        # statistics of 8 samples, not of x alone: a network normalized on 2 samples at a small
        # image is badly conditioned on every other input (eager fp32 itself ~1e-2 off float64)
        zoo._calibrate_batchnorm(model, (torch.randn((8, *case.shape), generator=generator),))
    return model.eval(), x


# --- comparison ----------------------------------------------------------------------------


def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tuples, lists, dicts, namedtuples), in order."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    if y.shape != ref.shape:
        return float("inf")
    scale = ref.norm()
    return float((y - ref).norm() / scale) if scale > 0 else float((y - ref).norm())


class Mismatch(AssertionError):
    pass


def compare(got: Any, want: Any, model: torch.nn.Module, x: torch.Tensor, what: str) -> float:
    """The worst output's relative error; a Mismatch beyond the tolerance (see the docstring)."""
    got_l, want_l = leaves(got), leaves(want)
    if len(got_l) != len(want_l):
        raise Mismatch(f"{what}: {len(got_l)} outputs, eager has {len(want_l)}")
    errs = [rel_error(y, ref) for y, ref in zip(got_l, want_l)]
    if max(errs, default=0.0) <= FP32_TOL:
        return max(errs, default=0.0)
    with torch.no_grad():
        exact = leaves(copy.deepcopy(model).double()(x.double()))
    for i, (y, ref, y64) in enumerate(zip(got_l, want_l, exact)):
        ours, eagers = rel_error(y, y64), rel_error(ref, y64)
        if ours > max(FP32_TOL, FP32_FACTOR * eagers):
            raise Mismatch(f"{what} output {i}: error {errs[i]:.2e} vs eager; "
                           f"{ours:.2e} vs float64 (eager's {eagers:.2e})")
    return max(errs)


# --- the campaign --------------------------------------------------------------------------


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout("took longer than the per-model timeout")


def check(case: Case, timeout: int) -> Result:
    res = Result(case.name, case.group)
    stage = "prepare"
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        model, x = prepare(case)
        with torch.no_grad():
            want = model(x)
        stage = "static build"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = kiln.build(model, (x,), device="cpu")
        stage = "static run"
        res.errors["static"] = compare(engine(x), want, model, x, "static")
        stage = "static file"
        res.errors["static file"] = round_trip(engine, [x])
        stage = "dynamic build"
        batch = kiln.Dim("batch", min=1, opt=BATCH, max=max(DYNAMIC_SIZES))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = kiln.build(model, (x,), device="cpu", dynamic_shapes=({0: batch},))
        stage = "dynamic run"
        probes = []
        for n in DYNAMIC_SIZES:
            xn = torch.randn((n, *case.shape), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                wn = model(xn)
            res.errors[f"dynamic b{n}"] = compare(dynamic(xn), wn, model, xn, f"dynamic batch {n}")
            probes.append(xn)
        stage = "dynamic file"
        res.errors["dynamic file"] = round_trip(dynamic, probes)
    except Mismatch as e:
        res.result, res.stage, res.error = "mismatch", stage, str(e)
    except Exception as e:  # noqa: BLE001 - the campaign records every failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res.result, res.stage, res.error = "exception", stage, f"{type(e).__name__}: {first}"[:400]
        res.errors["traceback"] = traceback.format_exc()[-3000:]  # type: ignore[assignment]
    finally:
        signal.alarm(0)
    res.seconds = round(time.perf_counter() - start, 1)
    return res


def round_trip(engine: Any, inputs: list[torch.Tensor]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.kiln"
        engine.save(path)
        loaded = kiln.load(path)
        worst = 0.0
        for x in inputs:
            for y, ref in zip(leaves(loaded(x)), leaves(engine(x)), strict=True):
                err = rel_error(y, ref)
                if err > FILE_TOL:
                    raise Mismatch(f"loaded engine differs from the built one: {err:.2e} at batch {x.shape[0]}")
                worst = max(worst, err)
    return worst


def table(paths: list[Path]) -> str:
    rows = ["| model | group | result | stage | error | s |", "| --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            err = r["error"].replace("|", "\\|")
            rows.append(f"| {r['name']} | {r['group']} | {r['result']} | {r['stage']} | {err} | {r['seconds']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to run (default: all, or --group)")
    parser.add_argument("--group", action="append", help="torchvision, segmentation, video, timm")
    parser.add_argument("--skip", action="append", default=[], help="models to leave out")
    parser.add_argument("--out", type=Path, help="append one JSON line per model here")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per model")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th model from the K-th (parallel runs)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--table", nargs="+", type=Path, help="print JSON-lines results as markdown")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    cases = [c for c in CASES if (not args.names or c.name in args.names) and (not args.group or c.group in args.group)]
    cases = [c for c in cases if c.name not in args.skip]
    k, n = (int(v) for v in args.shard.split("/"))
    cases = cases[k::n]
    if args.list:
        print("\n".join(f"{c.group:13} {c.name} {c.shape} {c.note}" for c in cases))
        return 0
    failed = 0
    for case in cases:
        res = check(case, args.timeout)
        failed += res.result != "ok"
        detail = f" [{res.stage}] {res.error}" if res.result != "ok" else ""
        print(f"{res.name:40} {res.result:9} {res.seconds:6.1f}s{detail}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(res.__dict__) + "\n")
    print(f"{len(cases) - failed}/{len(cases)} ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
