"""Smoke test of an installed lstm wheel (.ci/run runs it in a fresh venv, outside the checkout):
the C++ kernels load without a compiler (the variant for this CPU), a plain LSTM layer call
dispatches to the fused C++ kernel, and its output and gradients equal the reference kernel's."""

import os
import sys
import time

t0 = time.time()
import torch  # noqa: E402

import lstm  # noqa: E402
from lstm import kernels, layers  # noqa: E402
from lstm.kernels import native  # noqa: E402

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert not os.path.abspath(lstm.__file__).startswith(here + os.sep), f"lstm imported from the checkout: {lstm.__file__}"

layer = layers.LSTM(64, return_sequences=True)
x = torch.randn(2, 80, 100)
layer(x)
first_call = time.time() - t0

isa = native.isa()
assert isa is not None, f"the C++ kernels did not load: {native.unavailable_reason()}"
assert isa == native.runnable_variants()[0], (isa, native.runnable_variants())
assert native.module.__name__ == f"lstm._kernels_{isa}", native.module.__name__
assert os.path.dirname(native.module.__file__) == os.path.dirname(lstm.__file__), native.module.__file__

state = [torch.zeros(2, 64), torch.zeros(2, 64)]
chosen = kernels.select(layer.cell.recurrence(x, state)).name
assert chosen == "fused_cpp", chosen

for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
    torch.manual_seed(0)
    net = layers.LSTM(32, return_sequences=True, dtype="float64" if dtype == torch.float64 else "float32")
    xs = torch.randn(3, 17, 8, dtype=dtype, requires_grad=True)
    results = []
    for kernel in ("fused_cpp", "reference"):
        with kernels.use(kernel):
            y = net(xs)
            grads = torch.autograd.grad(y.square().sum(), [xs, *net.parameters()])
        results.append((y, *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (dtype, (a - b).abs().max().item())

print(f"smoke_wheel: ok: lstm {lstm.__file__}, C++ kernels {isa} ({native.module.__file__}), "
      f"torch {torch.__version__}, first layer call {first_call:.2f} s after start")
sys.exit(0)
