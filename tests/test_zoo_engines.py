"""The core zoo built into engines and compared with eager.

CPU (CI): fp32 engines against fp32 eager. GPU (-m gpu): fp16 and bf16 engines against
fp32 eager, and CUDA-graph replay against step-by-step execution. Tolerances: numerics.REL_TOL.
"""

import pytest
import torch

import kiln
from kiln import zoo
from numerics import assert_as_accurate_as_eager, assert_close, leaves

CORE_ZOO = [
    "resnet18", "resnet50", "alexnet", "vgg11", "squeezenet1_1", "densenet121",
    "mobilenet_v2", "efficientnet_b0", "vit_b_16", "bert-base",
]


@pytest.mark.parametrize("name", CORE_ZOO)
def test_fp32_engine_matches_eager_on_cpu(name, tmp_path):
    entry = zoo.create(name)
    with torch.no_grad():
        expected = entry.model(*entry.example_inputs)
    engine = kiln.build(entry.model, entry.example_inputs, device="cpu")
    assert_close(engine(*entry.example_inputs), expected, "fp32")
    path = tmp_path / f"{name}.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    for got, want in zip(leaves(loaded(*entry.example_inputs)), leaves(engine(*entry.example_inputs))):
        assert torch.equal(got, want), "a saved and loaded engine must give identical outputs"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", CORE_ZOO)
def test_low_precision_engine_matches_fp32_eager_on_gpu(name, precision):
    import copy

    from kiln.builder import PRECISIONS

    entry = zoo.create(name, batch=2)
    model = entry.model.cuda()
    inputs = [x.cuda() for x in entry.example_inputs]
    dtype = PRECISIONS[precision]
    with torch.no_grad():
        expected = model(*inputs)
        eager_lowp = copy.deepcopy(model).to(dtype)(*[x.to(dtype) if x.is_floating_point() else x for x in inputs])
    engine = kiln.build(model, inputs, precision=precision, device="cuda")
    assert engine.build_info["precision"] == precision
    assert_as_accurate_as_eager(engine(*inputs), expected, eager_lowp, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "bert-base"])
def test_cuda_graph_replay_equals_step_by_step(name):
    entry = zoo.create(name, batch=2)
    inputs = [x.cuda() for x in entry.example_inputs]
    engine = kiln.build(entry.model.cuda(), inputs, precision="fp16", device="cuda")
    assert engine.use_cuda_graph
    replayed = engine(*inputs)
    assert engine.contexts[0].graph is not None, "the first call should have captured a CUDA graph"
    again = engine(*inputs)
    engine.use_cuda_graph = False
    stepped = engine(*inputs)
    # Replays are bitwise reproducible. The step-by-step call runs the same kernels, but cuDNN
    # chooses convolution algorithms per thread (PyTorch keeps its plan cache thread-local, and
    # graphs are captured on kiln's capture thread), so it may differ in the last fp16 bits.
    for a, b, c in zip(leaves(replayed), leaves(again), leaves(stepped)):
        assert torch.equal(a, b)
        scale = float(a.float().abs().max())
        assert float((a.float() - c.float()).abs().max()) <= 1e-2 * scale, "step by step differs from replay"
