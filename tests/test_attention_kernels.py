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


def test_a_permuted_mask_is_made_dense_along_its_last_dim_without_copying_broadcasts():
    from kiln.kernels.attention import dense_last_dim, with_dense_mask

    bias = torch.randn(1, 7, 7, 3).permute(0, 3, 1, 2)  # [1, H, L, L] with stride H along the last dim
    mask = bias.expand(4, 3, 7, 7)  # broadcast over the batch
    dense = dense_last_dim(mask)
    assert dense.stride(-1) == 1 and dense.stride(0) == 0, "the batch stays a broadcast"
    assert torch.equal(dense, mask)
    assert dense_last_dim(dense) is dense and dense_last_dim(None) is None
    q = torch.randn(4, 3, 7, 8)
    args, kwargs = with_dense_mask((q, q, q, mask), {})
    assert args[3].stride(-1) == 1 and args[:3] == (q, q, q)
    args, kwargs = with_dense_mask((q, q, q), {"attn_mask": mask, "scale": 0.5})
    assert kwargs["attn_mask"].stride(-1) == 1 and kwargs["scale"] == 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa.efficient"])
def test_backends_take_a_permuted_bias(name):
    # T5's position bias reaches attention as [1, H, L, L] with stride H along the last dim; the
    # fused backends refuse such a mask, so the kernel makes it dense first
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    bias = torch.randn(1, 128, 128, 4, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), bias.float())
    try:
        got = get_kernel(name).make(SDPA, None)((q, k, v, bias), {}, [])
    except RuntimeError as exc:
        pytest.skip(f"{name} unavailable here: {exc}")
    torch.testing.assert_close(got.float(), want, atol=3e-3, rtol=3e-3)
