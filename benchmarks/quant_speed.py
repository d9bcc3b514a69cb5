"""int8 / fp8 engines against fp16, in one process on one GPU: median ms and the ratio to fp16.

    PYTHONPATH=src python benchmarks/quant_speed.py bert-base resnet50 --batch 32
    PYTHONPATH=src python benchmarks/quant_speed.py --gemms          # the 8-bit GEMM kernels alone

Each model comes from kiln's zoo (random weights); it is built in fp16, then in int8 and fp8
with post-training calibration on `--calib` batches (token ids drawn like the zoo's example for
text models; crops of scikit-image's photos for vision models when scikit-image is installed,
else random images), timed by CUDA events (median of `--iters` calls after warm-up), and its
output compared with the fp16 engine's (cosine). Per quantized engine it says how many layers
were quantized, how many are one kiln::qlinear, how many of those run an 8-bit GEMM and which
kernels were chosen. `--gemms` times kiln::qlinear's kernels against the fp16 linear
(cublaslt.linear_epilogue) at BERT-base's GEMM shapes (batch x 128 tokens). `--json` prints
one JSON line per result.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

import kiln
from kiln import zoo
from kiln.timing import measure

PRECISIONS = ("int8", "fp8")
# BERT-base's linear layers: (K, N, activation) of q/k/v (fused), attention output, FFN up, FFN down
BERT_GEMMS = ((768, 2304, "none"), (768, 768, "none"), (768, 3072, "gelu"), (3072, 768, "none"))


def calibration(entry: zoo.ZooModel, n: int, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """`n` batches shaped like the zoo model's example inputs."""
    example = entry.example_inputs
    gen = torch.Generator().manual_seed(seed)
    if example[0].dtype in (torch.int64, torch.int32):  # token ids
        vocab = int(getattr(getattr(entry.model, "config", None), "vocab_size", 0) or example[0].max() + 1)
        return [tuple(torch.randint(0, vocab, x.shape, generator=gen) for x in example) for _ in range(n)]
    batch = example[0].shape[0]
    try:
        from kiln.quant.data import CALIBRATION_PHOTOS, image_batches, imagenet_transform, photo_crops

        size = example[0].shape[-1]
        crops = photo_crops(CALIBRATION_PHOTOS, max(1, -(-n * batch // len(CALIBRATION_PHOTOS))), seed=seed)
        return image_batches(crops, imagenet_transform(size), batch)[:n]
    except Exception:  # no scikit-image: random images (the timing does not depend on the data)
        return [tuple(torch.randn(x.shape, generator=gen) for x in example) for _ in range(n)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _first(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return _first(out[0])


def bench_model(name: str, batch: int, seq: int, n_calib: int, iters: int, emit, device: torch.device,
                overrides: dict | None = None) -> None:
    shape = (seq,) if name.startswith(("bert", "roberta", "distilbert")) else None
    entry = zoo.create(name, batch=batch, input_shape=shape, overrides=overrides)
    inputs = [x.to(device) for x in entry.example_inputs]
    calib = calibration(entry, n_calib)
    engines = {"fp16": kiln.build(entry.model, entry.example_inputs, precision="fp16", device=device)}
    for precision in PRECISIONS:
        engines[precision] = kiln.build(entry.model, entry.example_inputs, precision=precision, device=device,
                                        calibration=calib)
    with torch.inference_mode():
        outs = {p: _first(e(*inputs)).float() for p, e in engines.items()}
        times = {p: measure(lambda e=e: e(*inputs), device, warmup=20, iters=iters).median
                 for p, e in engines.items()}
        # the fp16 engine again, last: the baseline measured on either side of the quantized ones
        times["fp16"] = min(times["fp16"], measure(lambda: engines["fp16"](*inputs), device, warmup=20,
                                                   iters=iters).median)
    for precision, engine in engines.items():
        row = {"model": name, "batch": batch, "precision": precision, "median_ms": round(times[precision], 4),
               "vs_fp16": round(times["fp16"] / times[precision], 3),
               "build_s": engine.build_info.get("build_seconds")}
        q = engine.build_info.get("quantization")
        if q:
            kernels = collections.Counter(s["kernel"] for s in engine.plan["steps"]
                                          if s["op"] == "kiln.qlinear.default")
            row.update(cosine_vs_fp16=round(_cosine(outs[precision], outs["fp16"]), 5),
                       layers=q["layers"], quantized=q["quantized_layers"], fused_linears=q["fused_linears"],
                       eight_bit_gemms=q["eight_bit_gemms"], qlinear_kernels=dict(kernels))
        emit(row)


def bench_gemms(batch: int, seq: int, iters: int, emit, device: torch.device) -> None:
    """kiln::qlinear's kernels against the fp16 linear at BERT-base's shapes."""
    from kiln.kernels import KERNELS, OpCall, candidates
    from kiln.ops.quant import FP8_E4M3, INT8
    from kiln.specs import TensorSpec

    m = batch * seq
    fp16 = KERNELS["cublaslt.linear_epilogue"].make("kiln.linear_act.default", None)
    for k, n, act in BERT_GEMMS:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        w = torch.randn(n, k, device=device) * 0.03
        bias = torch.randn(n, device=device, dtype=torch.float16)
        w_t = w.half().t().contiguous()
        with torch.inference_mode():
            base = measure(lambda w_t=w_t, x=x, bias=bias, act=act: fp16((x, w_t, bias, act), {}, []), device,
                           warmup=20, iters=iters).median
        emit({"gemm": f"{m}x{k}x{n}", "act": act, "kernel": "fp16 cublaslt.linear_epilogue",
              "median_ms": round(base, 4), "vs_fp16": 1.0})
        for fmt in (INT8, FP8_E4M3):
            w_scale = (w.abs().amax(1) / fmt.qmax).float()
            w_q = fmt.quantize(w, w_scale[:, None])
            x_scale = float(x.abs().max()) / fmt.qmax
            args = (x, x_scale, w_q, w_scale, bias, act)
            call = OpCall("kiln.qlinear.default",
                          (TensorSpec("x", (m, k), x.dtype), None, TensorSpec("w", (n, k), w_q.dtype),
                           TensorSpec("s", (n,), torch.float32), TensorSpec("b", (n,), bias.dtype), None),
                          (TensorSpec("y", (m, n), x.dtype),), "cuda", (None, x_scale, None, None, None, act))
            for kernel in candidates(call):
                fn = kernel.make("kiln.qlinear.default", None)
                try:
                    with torch.inference_mode():
                        t = measure(lambda fn=fn, args=args: fn(args, {}, []), device, warmup=20, iters=iters).median
                except Exception as exc:  # a kernel this torch / GPU cannot run
                    emit({"gemm": f"{m}x{k}x{n}", "act": act, "kernel": f"{fmt.name} {kernel.name}",
                          "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
                    continue
                emit({"gemm": f"{m}x{k}x{n}", "act": act, "kernel": f"{fmt.name} {kernel.name}",
                      "median_ms": round(t, 4), "vs_fp16": round(base / t, 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["bert-base", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence for text models")
    parser.add_argument("--calib", type=int, default=8, help="calibration batches")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--gemms", action="store_true", help="time the 8-bit GEMM kernels alone, not models")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cuda",
                        help="cpu only checks that the script runs (models in fp32, simulated; --gemms needs "
                             "TRITON_INTERPRET=1 there)")
    parser.add_argument("--override", default=None, help='zoo overrides as JSON, e.g. \'{"num_hidden_layers": 2}\'')
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("quant_speed.py times CUDA engines: run it on a GPU machine (or --device cpu)")
        torch.backends.cudnn.benchmark = True
        print(f"# {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
              f"torch {torch.__version__}, kiln {kiln.__version__}")

    def emit(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    if args.gemms:
        bench_gemms(args.batch, args.seq, args.iters, emit, device)
        return
    for name in args.models:
        bench_model(name, args.batch, args.seq, args.calib, args.iters, emit, device,
                    json.loads(args.override) if args.override else None)


if __name__ == "__main__":
    main()
