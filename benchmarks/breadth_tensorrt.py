"""Breadth campaign for the TensorRT backend: does `backend="tensorrt", require_full=True` take
models beyond the zoo? Random weights, small sizes, fp32 on the CPU (TensorRT-RTX builds there).

    PYTHONPATH=src python benchmarks/breadth_tensorrt.py                    # every model
    PYTHONPATH=src python benchmarks/breadth_tensorrt.py alexnet hf-opt      # some of them
    PYTHONPATH=src python benchmarks/breadth_tensorrt.py --json out.json --list

Per model, two builds, each in its own process (a crash or hang is that model's row):

- static: ``kiln.build(model, inputs, config=BuildConfig(backend="tensorrt", require_full=True))``:
  capture, passes, every region converted and its engine built;
- dynamic: the same graph captured with a dynamic batch (``kiln.Dim("batch", 1, 2, 8)``) and the
  passes, converted whole (``kiln.tensorrt.build_network``) and built with an optimization
  profile from the dims (``shape_ranges``). ``kiln.build`` refuses dynamic shapes with the
  TensorRT backend (its regions run at fixed shapes), so this row checks the converters and
  the profile, not a kiln engine.

A row says ``full`` or lists each op without a conversion (from the require_full error: the op,
and the converter's reason: no converter, a decline, or an exception).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_zoo_families import SMALL, small  # noqa: E402 - the zoo's small configs

Made = tuple[torch.nn.Module, Any]  # model, example inputs (a tuple, or a dict of keyword tensors)
BATCH = 2


def _images(*shape: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(BATCH, *shape),)


def _zoo(name: str) -> Callable[[], Made]:
    def make() -> Made:
        zm = small(name)
        return zm.model, zm.example_inputs

    return make


def _tv(name: str, shape: tuple[int, ...] = (3, 64, 64), module: str = "", **kwargs: Any) -> Callable[[], Made]:
    def make() -> Made:
        import torchvision

        ns = getattr(torchvision.models, module) if module else torchvision.models
        model = getattr(ns, name)(weights=None, **kwargs)
        return model, _images(*shape)

    return make


def _timm(name: str, shape: tuple[int, ...] = (3, 64, 64), **kwargs: Any) -> Callable[[], Made]:
    def make() -> Made:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs), _images(*shape)

    return make


def _hf(
    model_cls: str, config_cls: str, fields: dict[str, Any], inputs: str = "tokens", encoder: bool = False
) -> Callable[[], Made]:
    def make() -> Made:
        import transformers

        from kiln.zoo import _hf_model

        config = getattr(transformers, config_cls)(**fields)
        model = _hf_model(getattr(transformers, model_cls), config)
        if encoder:
            model = model.get_encoder()
        if inputs == "tokens":
            return model, {"input_ids": torch.randint(0, 100, (BATCH, 16))}
        if inputs == "pixels":
            size = fields.get("image_size", 64)
            return model, {"pixel_values": torch.randn(BATCH, 3, size, size)}
        return model, {"input_values": torch.randn(BATCH, 4000)}

    return make


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
DECODER = dict(TINY, num_key_value_heads=2, use_cache=False, max_position_embeddings=64)

MODELS: dict[str, Callable[[], Made]] = {
    # the zoo's small configs (tests/test_zoo_families.py SMALL)
    **{f"zoo-{n}": _zoo(n) for n in SMALL},
    # torchvision outside the zoo
    "alexnet": _tv("alexnet"),
    "vgg11_bn": _tv("vgg11_bn"),
    "googlenet": _tv("googlenet", aux_logits=False, init_weights=True),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "mnasnet0_5": _tv("mnasnet0_5"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "efficientnet_v2_s": _tv("efficientnet_v2_s"),
    "regnet_x_400mf": _tv("regnet_x_400mf"),
    "maxvit_t": _tv("maxvit_t", (3, 224, 224)),
    "swin_v2_t": _tv("swin_v2_t"),
    "fcn_resnet50": _tv("fcn_resnet50", module="segmentation", weights_backbone=None, aux_loss=False),
    "lraspp_mobilenet_v3_large": _tv("lraspp_mobilenet_v3_large", module="segmentation", weights_backbone=None),
    "r3d_18": _tv("r3d_18", (3, 8, 32, 32), module="video"),
    # timm
    "timm-levit_128s": _timm("levit_128s", (3, 224, 224)),
    "timm-poolformer_s12": _timm("poolformer_s12"),
    "timm-ghostnet_100": _timm("ghostnet_100"),
    "timm-mobilevit_xxs": _timm("mobilevit_xxs"),
    "timm-convnext_atto": _timm("convnext_atto"),
    "timm-efficientformer_l1": _timm("efficientformer_l1", (3, 224, 224)),
    # transformers, tiny configs, random weights
    "hf-albert": _hf("AlbertModel", "AlbertConfig", dict(TINY, embedding_size=32)),
    "hf-electra": _hf("ElectraModel", "ElectraConfig", dict(TINY, embedding_size=32)),
    "hf-deberta-v2": _hf("DebertaV2Model", "DebertaV2Config", dict(TINY, max_relative_positions=32)),
    "hf-bart-encoder": _hf(
        "BartModel",
        "BartConfig",
        dict(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=1000,
            max_position_embeddings=64,
        ),
        encoder=True,
    ),
    "hf-opt": _hf(
        "OPTModel",
        "OPTConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=1000,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            use_cache=False,
        ),
    ),
    "hf-gpt-neo": _hf(
        "GPTNeoModel",
        "GPTNeoConfig",
        dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            vocab_size=1000,
            use_cache=False,
            max_position_embeddings=64,
        ),
    ),
    "hf-mistral": _hf("MistralModel", "MistralConfig", dict(DECODER, sliding_window=8)),
    "hf-qwen2": _hf("Qwen2Model", "Qwen2Config", DECODER),
    "hf-phi": _hf("PhiModel", "PhiConfig", DECODER),
    "hf-clip-text": _hf("CLIPTextModel", "CLIPTextConfig", dict(TINY, max_position_embeddings=32)),
    "hf-clip-vision": _hf("CLIPVisionModel", "CLIPVisionConfig", dict(TINY, image_size=64, patch_size=16), "pixels"),
    "hf-vit": _hf("ViTModel", "ViTConfig", dict(TINY, image_size=64, patch_size=16), "pixels"),
    "hf-segformer": _hf(
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        dict(
            hidden_sizes=[16, 32, 64, 128],
            num_attention_heads=[1, 2, 4, 8],
            decoder_hidden_size=64,
            depths=[1, 1, 1, 1],
        ),
        "pixels",
    ),
    "hf-hubert": _hf(
        "HubertModel",
        "HubertConfig",
        dict(TINY, conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
        "waveform",
    ),
}


def _summary(exc: BaseException) -> dict[str, Any]:
    from kiln.tensorrt import IncompleteConversionError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, IncompleteConversionError):
        cause = cause.__cause__
    if isinstance(cause, IncompleteConversionError):
        ops: dict[str, str] = {}
        for row in cause.ops:
            ops.setdefault(row["op"], row["reason"])
        return {"status": "missing", "ops": ops}
    text = f"{type(exc).__name__}: {exc}"
    return {"status": "error", "error": text[:1500], "trace": traceback.format_exc()[-3000:]}


def static_build(model: torch.nn.Module, inputs: Any) -> dict[str, Any]:
    import kiln
    from kiln.builder import BuildConfig

    config = BuildConfig(backend="tensorrt", require_full=True, device="cpu", precision="fp32")
    engine = kiln.build(model, inputs, config=config)
    report = engine.header["build"]["tensorrt"]
    return {"status": "full", "regions": len(report["regions"]), "ops": report["ops_converted"]}


def dynamic_build(model: torch.nn.Module, inputs: Any) -> dict[str, Any]:
    """Capture with a dynamic batch, run the passes, convert the whole graph, build with a profile."""
    import kiln
    from kiln.capture.export import bind_example_inputs, capture
    from kiln.dims import normalize
    from kiln.passes import run_passes
    from kiln.tensorrt import IncompleteConversionError, build_engine, build_network, supported_nodes
    from kiln.tensorrt.convert.build import shape_ranges
    from kiln.tensorrt.convert.context import node_source, op_name

    batch = kiln.Dim("batch", min=1, opt=2, max=8)
    bound = bind_example_inputs(model, inputs, None)
    dynamic = {n: {0: batch} for n in bound.names} if isinstance(inputs, dict) else tuple({0: batch} for _ in inputs)
    spec = normalize(dynamic, bound.tensors, bound.names)
    graph = capture(model, inputs, device=torch.device("cpu"), dynamic=spec)
    graph, _ = run_passes(graph, None)
    gm = graph.module
    supported = supported_nodes(gm)
    outside = [
        {"node": n.name, "op": op_name(n.target), "source": node_source(n), "reason": why}
        for n, why in supported.items()
        if why
    ]
    if outside:
        raise IncompleteConversionError(outside)
    net = build_network(gm)
    built = build_engine(net, shapes=shape_ranges(net, graph.dims, graph.symbols))
    return {"status": "full", "engine_mb": round(len(built.serialized) / 2**20, 2)}


def _run_one(name: str, mode: str, queue: Any) -> None:
    torch.manual_seed(0)
    try:
        model, inputs = MODELS[name]()
        model = model.eval()
        fn = static_build if mode == "static" else dynamic_build
        with torch.no_grad():
            queue.put(fn(model, inputs))
    except BaseException as exc:  # noqa: BLE001 - every failure is this model's row
        queue.put(_summary(exc))


def run(name: str, mode: str, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.perf_counter()
    proc = ctx.Process(target=_run_one, args=(name, mode, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: timed out or died
        result = {"status": "error", "error": f"no result in {timeout:.0f} s (exit code {proc.exitcode})"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def cell(result: dict[str, Any]) -> str:
    if result["status"] == "full":
        return "full"
    if result["status"] == "missing":
        return "missing: " + ", ".join(result["ops"])
    return "error: " + result["error"].splitlines()[0][:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="names (default: all); --list prints them")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--static-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write every row (with reasons) here")
    args = parser.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; --list prints the names")
    modes = ["static"] if args.static_only else ["static", "dynamic"]
    rows: dict[str, dict[str, Any]] = {}
    print("| model | " + " | ".join(modes) + " |")
    print("| --- | " + " | ".join("---" for _ in modes) + " |")
    for name in names:
        rows[name] = {mode: run(name, mode, args.timeout) for mode in modes}
        print(f"| {name} | " + " | ".join(cell(rows[name][m]) for m in modes) + " |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
