"""What the Triton kernels' host sides share (triton_lstm.py, triton_gru_simple_rnn.py): where they
run, the GEMMs around their step programs, the buffers' conventions. Imports no triton."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

from . import reference, support
from .dispatch import forced_name
from .problem import Recurrence, RecurrenceResult
from .reference import masked_product

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # (imported on first use)
ROUND_H = {torch.bfloat16: 1, torch.float16: 2}  # triton_steps.rounded's codes
# kernel name -> the Triton error that took it out of the dispatch (its programs failed to build or
# launch on this device)
failed: dict[str, str] = {}


def runs(p: Recurrence, kernel_name: str) -> bool:
    """Whether a Triton kernel can run the problem's tensors: CUDA tensors, or CPU tensors under
    Triton's interpreter (TRITON_INTERPRET=1) when the kernel is forced (the tests); every tensor on
    the input's device in the dtypes of problem.py's "Precision"."""
    if not TRITON_INSTALLED or kernel_name in failed:
        return False
    device = p.inputs.device
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and forced_name() == kernel_name):
        return False
    return support.on_one_device_in_compute_dtypes(p)


def blocks(batch: int, size: int, whole_rows: bool = False) -> tuple:
    """(BLOCK_B, BLOCK_U) and the grid of a step's programs over a [batch, size] state (powers of
    two, as Triton's blocks are); with whole_rows one program spans every column of its rows
    (layer norm's reductions)."""
    def power_of_2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    block_u = power_of_2(size) if whole_rows else min(power_of_2(size), 64)
    block_b = max(1, min(power_of_2(batch), 16, 4096 // block_u))
    return block_b, block_u, (-(-batch // block_b), -(-size // block_u))


def run_or_fall_back(kernel_name: str, run: Callable[[Recurrence], RecurrenceResult],
                     p: Recurrence) -> RecurrenceResult:
    """run(p); where Triton cannot build or launch the kernel's programs on this device (a
    TritonError other than the interpreter's, which reports a bug in a program), a warning naming
    the error, the kernel out of the dispatch from then on, and the reference kernel's result."""
    from triton.errors import TritonError
    from triton.runtime.errors import InterpreterError

    try:
        return run(p)
    except TritonError as error:
        if isinstance(error, InterpreterError):
            raise
        failed[kernel_name] = f"{type(error).__name__}: {error}"
        warnings.warn(f"lstm: the Triton kernel {kernel_name} cannot run on {p.inputs.device} "
                      f"({failed[kernel_name]}); the reference kernel runs these calls instead (correct, slower)",
                      RuntimeWarning, stacklevel=2)
        return reference.run(p)


def or_placeholder(placeholder: torch.Tensor) -> Callable[[Optional[torch.Tensor]], torch.Tensor]:
    """t -> t, or for a buffer that is off (None) a placeholder tensor the programs never read
    (a pointer argument must be a tensor)."""
    return lambda t: placeholder if t is None else t


def on_device(x: torch.Tensor):
    """The launches' current device: the tensors'."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def rounded(t: torch.Tensor, low: Optional[torch.dtype]) -> torch.Tensor:
    """t as a low-precision product's operand (its values rounded, held in float32); t without `low`."""
    return t if low is None else t.to(low).float()


def writable(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of t in dtype (a gradient may be expanded, with stride 0)."""
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)


def project(x: torch.Tensor, kernel: torch.Tensor, in_drop, gates: int, low) -> torch.Tensor:
    """x [T, B, D] @ kernel: [T, B, G*U], contiguous, the input dropout masks ([1 or G, B, D])
    first; in bfloat16/float16 (`low`) the dropped-out x rounded to it, as the reference kernel
    rounds a product's operand."""
    masks = None if in_drop is None else in_drop[:, None]
    return masked_product(x, kernel, masks, gates, functools.partial(rounded, low=low)).contiguous()


def recurrent_product(h: torch.Tensor, weight: torch.Tensor, masks: Optional[torch.Tensor], low) -> torch.Tensor:
    """h [B, N] @ weight [N, G*U]: [B, G*U], contiguous (a program reads it); with recurrent dropout
    masks [G, B, N], each gate block's product of h times its mask, rounded as a product's operand
    (h itself comes rounded)."""
    if masks is None:
        return h @ weight
    gates, (size, columns) = masks.shape[0], weight.shape
    blocks = weight.reshape(size, gates, columns // gates).transpose(0, 1)  # [G, N, U]
    products = torch.bmm(rounded(h[None] * masks, low), blocks)  # [G, B, U]
    return products.transpose(0, 1).reshape(h.shape[0], columns).contiguous()  # (U = 1: reshape makes a view)


def add_recurrent_gradient(dh: torch.Tensor, d_product: torch.Tensor, weight: torch.Tensor,
                           masks: Optional[torch.Tensor]) -> None:
    """dh += the gradient of h through `recurrent_product`, given the product's d_product [B, G*U]."""
    if masks is None:
        dh.addmm_(d_product, weight.T)
        return
    gates, (size, columns) = masks.shape[0], weight.shape
    d_blocks = d_product.reshape(-1, gates, columns // gates).transpose(0, 1)  # [G, B, U]
    blocks = weight.reshape(size, gates, columns // gates).transpose(0, 1)
    dh.add_((torch.bmm(d_blocks, blocks.transpose(1, 2)) * masks).sum(0))


def recurrent_weight_gradient(h: torch.Tensor, d_products: torch.Tensor, masks: Optional[torch.Tensor],
                              low) -> torch.Tensor:
    """The weight's gradient of `recurrent_product` summed over the steps: h [T, B, N] (each step's
    h), d_products [T*B, G*U]."""
    size = h.shape[2]
    if masks is None:
        return h.reshape(-1, size).T @ d_products
    width = d_products.shape[1] // masks.shape[0]
    return torch.cat([rounded(h * masks[g], low).reshape(-1, size).T @ d_products[:, g * width:(g + 1) * width]
                      for g in range(masks.shape[0])], dim=1)


def starts(reset: Optional[torch.Tensor], t: int) -> Optional[torch.Tensor]:
    """bool [B, 1]: the rows where an episode starts before the step of time index t (reset: bool
    [B, T], the steps that count only), or None."""
    return None if reset is None else reset[:, t, None]


def restore(state: torch.Tensor, starting: Optional[torch.Tensor], restored: Optional[torch.Tensor]) -> None:
    """A step's state [B, *] set, where an episode starts, to the restored one (None: zeros), in place."""
    if starting is not None:
        state.copy_(torch.where(starting, 0 if restored is None else restored, state))


def restore_backward(d_state: torch.Tensor, starting: Optional[torch.Tensor],
                     d_restored: Optional[torch.Tensor]) -> None:
    """`restore` backwards, in place: where an episode started, the state's gradient moves to the
    restored state's (d_restored, summed over the steps)."""
    if starting is not None:
        d_restored += torch.where(starting, d_state, 0)
        d_state.masked_fill_(starting, 0)


def output_gradients(dy: Optional[torch.Tensor], return_sequences: bool, placeholder: torch.Tensor) -> tuple:
    """(the outputs' gradient as the backward programs read it, its step stride, its row stride):
    [T, B, N] in processing order with return_sequences, else the last step's [B, N] (step stride 0);
    `placeholder` when there is none."""
    if dy is None:
        return placeholder, 0, 0
    dy = dy.contiguous()  # (an expanded gradient has stride 0)
    if not return_sequences:
        return dy, 0, dy.stride(0)
    steps = dy.transpose(0, 1)
    return steps, steps.stride(0), steps.stride(1)
