"""The aten kernel: ATen ops as they are, except views whose strides a chosen kernel changed."""

import pytest
import torch

from kiln.kernels import KERNELS

VIEW = "aten.view.default"


def test_view_that_no_longer_fits_copies_instead_of_failing():
    x = torch.arange(24.0).view(2, 3, 4).transpose(1, 2)  # a kernel handed back other strides
    with pytest.raises(RuntimeError):
        torch.ops.aten.view.default(x, [2, 12])
    got = KERNELS["aten"].make(VIEW, None)((x, [2, 12]), {}, [])
    torch.testing.assert_close(got, x.reshape(2, 12))


def test_view_that_fits_stays_a_view():
    x = torch.arange(24.0).view(2, 3, 4)
    got = KERNELS["aten"].make(VIEW, None)((x, [6, 4]), {}, [])
    assert got.data_ptr() == x.data_ptr() and got.shape == (6, 4)
