"""The bfloat16 section of `lstm bench`: this library's LSTM, GRU and SimpleRNN under the
`mixed_bfloat16` policy (float32 weights, bfloat16 compute: what `torch.autocast` gives them)
against `torch.nn.LSTM` / `GRU` / `RNN` in bfloat16 (a bf16 module) and under
`torch.autocast("cpu", bfloat16)`, all holding the same weights, with this library's float32 layer
beside them; inference forward and training step at each bench shape, interleaved as the other
rows are. This library's bf16 call is checked against torch's bf16 module first (outputs and the
input's gradient within bfloat16's tolerance)."""

from __future__ import annotations

import torch

from .. import interop, layers
from .bench_cases import Contender, _zero

CELLS = {"lstm": (layers.LSTM, "torch.nn.LSTM"), "gru": (layers.GRU, "torch.nn.GRU"),
         "simple_rnn": (layers.SimpleRNN, "torch.nn.RNN")}
# outputs within a few bfloat16 roundings of each other (eps 2^-7, values in (-1, 1)); gradients relative
TOLERANCE = 0.05


def ours_name(cell: str, precision: str = "bf16") -> str:
    return f"lstm {CELLS[cell][0].__name__} {precision}"


def torch_name(cell: str, how: str = "bf16") -> str:
    return f"{CELLS[cell][1]} {how}"


def contenders(cell: str, shape: tuple, seed: int = 0) -> tuple[list[Contender], torch.Tensor]:
    """The four rows (ours bf16, torch bf16, torch autocast, ours fp32) and the input x [B, T, D]
    (float32; each contender casts it as its users would)."""
    B, T, D, H = shape
    cls = CELLS[cell][0]
    torch.manual_seed(seed)
    ours = cls(H, return_sequences=True, input_dim=D, dtype="mixed_bfloat16")
    with torch.no_grad():  # a non-trivial bias
        ours.cell.bias.add_(0.1 * torch.randn_like(ours.cell.bias))
    ours_fp32 = cls(H, return_sequences=True, input_dim=D)
    ours_fp32.set_weights(ours.get_weights())
    module_bf16 = interop.to_torch(ours_fp32).bfloat16()
    module_autocast = interop.to_torch(ours_fp32)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1))
    x_bf16 = x.bfloat16()

    def autocast_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module_autocast(x)[0]

    rows = [
        Contender(ours_name(cell), lambda: ours(x), lambda: ours(x).float().sum().backward(), _zero(ours.parameters()),
                  info={"module": ours}),
        Contender(torch_name(cell), lambda: module_bf16(x_bf16)[0],
                  lambda: module_bf16(x_bf16)[0].float().sum().backward(), _zero(module_bf16.parameters()),
                  info={"module": module_bf16}),
        Contender(torch_name(cell, "autocast"), autocast_forward, lambda: autocast_forward().float().sum().backward(),
                  _zero(module_autocast.parameters()), status=_fails(autocast_forward)),
        Contender(ours_name(cell, "fp32"), lambda: ours_fp32(x), lambda: ours_fp32(x).sum().backward(),
                  _zero(ours_fp32.parameters())),
    ]
    return rows, x


def _fails(forward) -> str | None:
    """Why `forward` cannot run here, or None: oneDNN's LSTM under CPU autocast has no primitive
    on some CPUs (an AMD EPYC with AVX512-BF16 raises "could not create a primitive descriptor")."""
    try:
        with torch.no_grad():
            forward()
    except RuntimeError as error:
        return f"n/a (torch raises: {str(error).splitlines()[0][:80]})"
    return None


def check(rows: list[Contender], x: torch.Tensor) -> dict:
    """Max |difference| of this library's bf16 outputs and torch's bf16 module's, and of the input's
    gradient relative to its largest value; raises ValueError past TOLERANCE."""
    ours, theirs = rows[0].info["module"], rows[1].info["module"]
    with torch.no_grad():
        forward = float((ours(x).float() - theirs(x.bfloat16())[0].float()).abs().max())
    grads = []
    for call in (lambda inputs: ours(inputs), lambda inputs: theirs(inputs)[0]):
        inputs = x.bfloat16().requires_grad_()
        grads.append(torch.autograd.grad(call(inputs).float().sum(), inputs)[0].float())
    grad = float((grads[0] - grads[1]).abs().max()) / max(1.0, float(grads[1].abs().max()))
    result = {"max_abs_diff_forward": forward, "max_rel_diff_grad_x": grad}
    if not (forward <= TOLERANCE and grad <= TOLERANCE):
        raise ValueError(f"{rows[0].name} differs from {rows[1].name}: {result} (tolerance {TOLERANCE:g})")
    return result
