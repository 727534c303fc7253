"""What the fused LSTM kernels add to the input projection xk = x @ kernel + bias, which they
compute with torch's GEMMs around their recurrences (forward: reference.masked_product): the
bias with forget_bias folded in, and the projection's gradient."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .problem import Recurrence
from .reference import unrounded


def input_projection_backward(x: torch.Tensor, kernel: torch.Tensor, in_drop: Optional[torch.Tensor],
                              dxk: torch.Tensor, need_x: bool, need_kernel: bool,
                              rounded: Callable[[torch.Tensor], torch.Tensor] = unrounded) -> tuple:
    """(dx, dkernel) of xk = rounded(x * in_drop) @ kernel, None where not needed. x [B, T, D],
    kernel [D, G*U], dxk [B, T, G*U]; in_drop: None, or scaled keep-masks [1, B, D] shared by the
    gates or [G, B, D] one per gate block; `rounded`: a low-precision product's rounding of its
    operand (x itself comes rounded)."""
    D, GU = kernel.shape
    if in_drop is None or in_drop.shape[0] == 1:
        xm = x if in_drop is None else rounded(x * in_drop[0][:, None, :])
        dkernel = xm.reshape(-1, D).T @ dxk.reshape(-1, GU) if need_kernel else None
        dx = None
        if need_x:
            dx = dxk @ kernel.T
            dx = dx if in_drop is None else dx * in_drop[0][:, None, :]
        return dx, dkernel
    U = GU // in_drop.shape[0]
    blocks = [(in_drop[g][:, None, :], slice(g * U, (g + 1) * U)) for g in range(in_drop.shape[0])]
    dkernel = torch.cat([rounded(x * m).reshape(-1, D).T @ dxk[..., cols].reshape(-1, U) for m, cols in blocks],
                        dim=1) if need_kernel else None
    dx = sum((dxk[..., cols] @ kernel[:, cols].T) * m for m, cols in blocks) if need_x else None
    return dx, dkernel


def bias_with_forget_bias(p: Recurrence) -> Optional[torch.Tensor]:
    """The bias a fused step adds, forget_bias included (None when there is neither)."""
    cell = p.cell
    if not cell.forget_bias:
        return p.bias
    shift = torch.zeros(p.kernel.shape[1], dtype=p.inputs.dtype, device=p.inputs.device)
    f = cell.gate_names.index("f") * p.units
    shift[f:f + p.units] = cell.forget_bias
    return shift if p.bias is None else p.bias + shift
