"""A conv net small enough that serving, not the engine, sets the pace: it takes resnet50's input
(3×224×224 images, 602 KB each as FP32), for profiling `kiln serve` on a CPU (docs/serving.md).

    kiln build benchmarks/serve_smallconv.py:make --device cpu --precision fp32 --batch 32 \\
        --input-shape 3,224,224 -o smallconv.kiln
"""

from __future__ import annotations

import torch


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1000),
    ).eval()
