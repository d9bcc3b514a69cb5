import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cuda_conv():
    """A small conv net and its dynamic-batch engine on CUDA (untuned), for the GPU tests of
    test_dynamic_engine.py and test_dynamic_padding.py."""
    import kiln
    from test_dynamic_engine import BATCH, ConvNet

    model = ConvNet().eval().cuda()
    engine = kiln.build(model, (torch.randn(4, 3, 16, 16, device="cuda"),), device="cuda",
                        dynamic_shapes=({0: BATCH},), config=kiln.BuildConfig(device="cuda", tune=False))
    return model, engine
