"""The GRU and SimpleRNN section of `lstm bench`: this library's `GRU` (reset_after=True, Keras'
default and cuDNN's form) and `SimpleRNN` against `torch.nn.GRU` / `torch.nn.RNN` holding the same
weights (`lstm.to_torch`), inference forward and training step at each bench shape, interleaved
as the LSTM rows are. Each pair is checked first (outputs and gradients within the bench's
tolerance); a mismatch aborts the run."""

from __future__ import annotations

import torch

from .. import interop, layers
from .bench_cases import Contender, _zero

CELLS = {"gru": (layers.GRU, "torch.nn.GRU"), "simple_rnn": (layers.SimpleRNN, "torch.nn.RNN")}


def ours_name(cell: str) -> str:
    return f"lstm {CELLS[cell][0].__name__}"


def torch_name(cell: str) -> str:
    return CELLS[cell][1]


def cell_contenders(cell: str, shape: tuple, seed: int = 0) -> tuple[list[Contender], torch.Tensor]:
    """This library's layer and torch's module with the same weights, and the input x [B, T, D]."""
    B, T, D, H = shape
    torch.manual_seed(seed)
    layer = CELLS[cell][0](H, return_sequences=True, input_dim=D)
    with torch.no_grad():  # a non-trivial bias (the default is zeros)
        layer.cell.bias.add_(0.1 * torch.randn_like(layer.cell.bias))
    module = interop.to_torch(layer)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1))
    ours = Contender(ours_name(cell), lambda: layer(x), lambda: layer(x).sum().backward(), _zero(layer.parameters()),
                     info={"module": layer})
    theirs = Contender(torch_name(cell), lambda: module(x)[0], lambda: module(x)[0].sum().backward(),
                       _zero(module.parameters()), info={"module": module})
    return [ours, theirs], x


def check(contenders: list[Contender], x: torch.Tensor, tolerance: float) -> dict:
    """Max |difference| of the outputs and of the input's gradient (d sum(outputs) / dx, which
    carries the whole backward through the steps and does not depend on the weights' layout)."""
    ours, theirs = (contender.info["module"] for contender in contenders)
    with torch.no_grad():
        forward = float((ours(x) - theirs(x)[0]).abs().max())
    grads = []
    for module, output in ((ours, lambda y: y), (theirs, lambda y: y[0])):
        inputs = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(output(module(inputs)).sum(), inputs)[0])
    grad = float((grads[0] - grads[1]).abs().max()) / max(1.0, float(grads[1].abs().max()))
    result = {"max_abs_diff_forward": forward, "max_rel_diff_grad_x": grad}
    if not (forward <= tolerance and grad <= tolerance):
        raise ValueError(f"{contenders[0].name} differs from {contenders[1].name}: {result} (tolerance {tolerance:g})")
    return result
