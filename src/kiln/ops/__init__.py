"""kiln's own ops (torch.library, each with a reference implementation), the one vocabulary of
activations and pointwise ops every backend maps (vocabulary), and the pointwise expression
IR that generated kernels are built from."""

from kiln.ops import fused, pointwise, quant  # noqa: F401  (defines the kiln:: ops)
