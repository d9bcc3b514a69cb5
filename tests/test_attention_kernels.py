"""The pinned-backend attention kernels: each agrees with PyTorch's own dispatch, and the
build times them and keeps one that works."""

import pytest
import torch

import kiln
from kiln.kernels import get_kernel
from kiln.kernels.attention import BACKENDS

SDPA = "aten.scaled_dot_product_attention.default"


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_attention_kernels_are_cuda_only_candidates():
    from kiln.kernels import OpCall, candidates
    from kiln.specs import TensorSpec

    q = TensorSpec("q", (2, 4, 16, 8), torch.float16)
    on_cpu = [k.name for k in candidates(OpCall(SDPA, (q, q, q), (q,), "cpu"))]
    on_cuda = [k.name for k in candidates(OpCall(SDPA, (q, q, q), (q,), "cuda"))]
    assert on_cpu == ["aten"]
    assert on_cuda[0] == "aten" and set(on_cuda[1:]) == set(BACKENDS), "untimed, PyTorch's own dispatch wins"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_each_backend_matches_dispatch(name):
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    try:
        got = get_kernel(name).make(SDPA, None)((q, k, v), {}, [])
    except RuntimeError as exc:  # a backend this GPU/build lacks: the tuner skips it the same way
        pytest.skip(f"{name} unavailable here: {exc}")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_build_times_the_backends(tmp_path):
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda") for _ in range(3))
    config = kiln.BuildConfig(precision="fp16", device="cuda", timing_cache=str(tmp_path / "cache.json"))
    engine = kiln.build(Attention(), (q, k, v), config=config)
    step = next(s for s in engine.plan["steps"] if s["op"] == SDPA)
    assert step["kernel"] in step["timings_ms"] and len(step["timings_ms"]) >= 2
    torch.testing.assert_close(engine(q, k, v), Attention()(q, k, v), atol=2e-2, rtol=2e-2)
