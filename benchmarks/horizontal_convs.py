"""What horizontal fusion of sibling convolutions does to latency: the same model built with
the default passes and with the opt-in `horizontal_fuse_conv` added (one timing cache), timed side by side.

    python benchmarks/horizontal_convs.py googlenet --batch 1,32 --precision fp16
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ab_args
import torch

import kiln
from kiln import zoo
from kiln.passes import default_passes
from kiln.timing import measure


def main() -> None:
    args = ab_args.parse(__doc__.splitlines()[0])
    device = torch.device("cuda")
    without = default_passes()
    with_convs = [*without[: without.index("horizontal_fuse") + 1], "horizontal_fuse_conv",
                  *without[without.index("horizontal_fuse") + 1 :]]
    print("| model | batch | convs without | convs with | without ms | with ms | ratio | max abs diff to eager fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "timing-cache.json")
        for name in args.models:
            for batch in (int(b) for b in args.batch.split(",")):
                entry = zoo.create(name, batch=batch)
                inputs = [x.to(device) for x in entry.example_inputs]
                with torch.inference_mode():
                    want = entry.model.to(device)(*inputs).float()
                ms, convs, diff = {}, {}, {}
                for label, passes in (("without", without), ("with", with_convs)):
                    config = kiln.BuildConfig(precision=args.precision, device="cuda", passes=passes,
                                              timing_cache=cache, model_name=name)
                    engine = kiln.build(entry.model, entry.example_inputs, config=config)
                    convs[label] = sum(s["op"] == "kiln.conv_bias_act.default" for s in engine.plan["steps"])
                    with torch.inference_mode():
                        diff[label] = float((engine(*inputs).float() - want).abs().max())
                        run = lambda e=engine, xs=inputs: e(*xs)  # noqa: E731
                        ms[label] = measure(run, device, warmup=20, iters=args.iters).median
                print(f"| {name} | {batch} | {convs['without']} | {convs['with']} | {ms['without']:.3f} | "
                      f"{ms['with']:.3f} | {ms['without'] / ms['with']:.3f}× | {diff['with']:.2e} |")


if __name__ == "__main__":
    main()
