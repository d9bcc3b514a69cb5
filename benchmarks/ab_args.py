"""Arguments and heading shared by the A/B scripts (concat_in_place.py, horizontal_convs.py):
models, batch sizes, precision, timed iterations, on the CUDA GPU."""

from __future__ import annotations

import argparse

import torch

import kiln


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, kiln {kiln.__version__}, {args.precision}\n")
    return args
