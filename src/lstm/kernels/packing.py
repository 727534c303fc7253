"""Per-row lengths as the packed layout of the C++ passes (csrc/row_layout.h), and back.

A problem whose steps that count are each row's first ones (`Recurrence.lengths`, or a
right-padded mask) can skip the padding: the rows' valid steps are gathered into torch's
PackedSequence layout (time-major, rows sorted by length, longest first, step s holding the rows
still running), the recurrence runs on that with work in proportion to the sum of the lengths, and
the outputs are put back in [B, T, *] with Keras' rules for masked steps. go_backwards reverses each
row's valid steps on the way in (Keras' backward direction, with a right-padded mask, is masked for
its first T - length steps, then runs the row from its last valid step), so the packed passes always
run forwards. Rows of length 0 take no step at all: their states stay the initial ones, their
outputs are zeros.

Resets (`Recurrence.reset`) cost nothing more: a reset starts a new episode, and each episode is a
row of its own in the packed layout (a segment), starting from the restored states; a batch row's
final states are those of its last segment.

The layout is built in C++ (csrc/bindings/packing.cpp), which also places the packed rows in their
padded tensors; every step on the way in and out is differentiable, so autograd carries the
gradients through the packing; the padded steps of x get exactly zero.

LSTM_NO_PACKING=1 turns the packed route off (every call takes the mask route), to measure it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import native
from .problem import Recurrence, RecurrenceResult


def _packing_off() -> bool:
    """Under torch.compile (the packed sizes depend on the data), and with LSTM_NO_PACKING."""
    return torch.compiler.is_compiling() or os.environ.get("LSTM_NO_PACKING", "").strip() not in ("", "0")


def _lengths(p: Recurrence) -> Optional[Tensor]:
    """Each row's length when the steps that count are its first ones (`lengths`, a right-padded
    mask, or all of them), else None."""
    if p.mask is None:
        if p.lengths is not None:
            return p.lengths
        return torch.full((p.inputs.shape[0],), p.inputs.shape[1], dtype=torch.int64, device=p.inputs.device)
    mask = p.step_mask()
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # (each row: kept steps, then not)
        return None
    return mask.sum(1)


def can_pack(p: Recurrence, packable: bool = True) -> bool:
    """Whether `route` packs the problem (what a problem with resets needs)."""
    return packable and not _packing_off() and _lengths(p) is not None


def route(p: Recurrence, packable: bool = True) -> tuple[Recurrence, Optional[Tensor]]:
    """(the problem, the lengths to pack or None) for a kernel that takes lengths and resets: the
    lengths when the steps that count are each row's first ones and some row is shorter than T or a
    reset splits it; the problem without mask or lengths when every row is full; else the problem
    with its lengths as a mask. Nothing is packed where the caller cannot (`packable` False), nor
    where `_packing_off`; a problem with resets must then not reach the caller (see `can_pack`)."""
    if p.reset is None and p.lengths is None and p.mask is None:
        return p, None
    lengths = None if not packable or _packing_off() else _lengths(p)
    if lengths is None:
        if p.reset is not None:
            raise ValueError("reset: this kernel runs resets packed only (each row's steps that count first)")
        return p.masked(), None
    steps = p.inputs.shape[1]
    shortest, longest = (int(v) for v in torch.aminmax(lengths)) if lengths.numel() else (steps, 0)
    if p.reset is None and shortest == steps:
        return dataclasses.replace(p, mask=None, lengths=None), None
    if longest == 0:  # no step counts (so no reset does): nothing to pack
        return dataclasses.replace(p.masked(), reset=None), None
    return p, lengths


@dataclass
class Packing:
    """The packed layout of one call. Its rows are segments: a batch row's valid steps, split where
    a reset starts an episode (one segment per row without resets), sorted longest first."""

    rows: Tensor         # [V] int64: the batch row of each segment
    restarts: Tensor     # [V] bool: the segment starts from the restored states (else the initial ones)
    batch_sizes: Tensor  # [S] int64 (CPU): step s is taken by segments [0, batch_sizes[s])
    sources: Tensor      # [N] int64: the row of x.reshape(B * T, D) each packed row holds
    positions: Tensor    # [N] int64: the output position, of [B * T] in processing order, it shows
    running: Tensor      # [B'] int64: the batch rows that take a step (length > 0)
    last: Tensor         # [B'] int64: the segment each of them ends in
    lengths: Tensor      # [B] int64

    def pack(self, per_batch_row: Optional[Tensor], dim: int = 0) -> Optional[Tensor]:
        """A per-batch-row tensor (a dropout mask) per segment."""
        return None if per_batch_row is None else per_batch_row.index_select(dim, self.rows)

    def per_packed_row(self, per_segment: Optional[Tensor], dim: int = 1) -> Optional[Tensor]:
        """A tensor per segment (`pack`'s) as one per packed row [N]."""
        return None if per_segment is None else per_segment.index_select(dim, ranks(self.batch_sizes,
                                                                                    per_segment.device))

    def starting_states(self, initial: Tensor, restored: Optional[Tensor]) -> Tensor:
        """[V, *] each segment's first state: the restored one after a reset (None: no reset), else
        the initial one."""
        starting = _gather_rows(initial, self.rows)
        if restored is None:
            return starting
        return torch.where(self.restarts[:, None], _gather_rows(restored, self.rows), starting.to(restored.dtype))

    def unpack_states(self, initial: Tensor, final: Tensor) -> Tensor:
        """[B, *] states: each running row's last segment's final ones, the initial ones of rows that
        took no step."""
        if self.running.shape[0] == initial.shape[0]:  # (every row ran: running is 0 .. B - 1)
            return _gather_rows(final, self.last)
        return initial.to(final.dtype).index_copy(0, self.running, _gather_rows(final, self.last))


def ranks(batch_sizes: Tensor, device=None) -> Tensor:
    """[N] int64: each packed row's rank among the rows that take its step (0 .. batch_sizes[s] - 1)."""
    sizes = batch_sizes.to(device)
    first_rows = torch.cumsum(sizes, 0) - sizes
    return torch.arange(int(sizes.sum()), device=device) - first_rows.repeat_interleave(sizes)


def plan(lengths: Tensor, steps: int, go_backwards: bool, reset: Optional[Tensor] = None) -> Packing:
    """The packed layout of rows with these lengths ([B] int64, 0 <= lengths <= steps, some > 0) and
    resets (bool [B, T] by time index, or None), built by the C++ extension (a kernel that runs
    packed needs it loaded); on the lengths' device."""
    device = lengths.device
    lengths = lengths.to(torch.int64)
    rows, restarts, batch_sizes, sources, positions, running, last = native.extension().packing_plan(
        lengths.cpu(), None if reset is None else reset.to(dtype=torch.bool).cpu(), steps, go_backwards)
    on_device = (tensor.to(device) for tensor in (rows, restarts, sources, positions, running, last))
    rows, restarts, sources, positions, running, last = on_device
    return Packing(rows, restarts, batch_sizes, sources, positions, running, last, lengths)


def _gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor [M, F].index_select(0, index): by the C++ on the CPU where autograd need not see it
    (several times faster on a call's x), by torch elsewhere."""
    if tensor.is_cpu and tensor.dim() == 2 and not (tensor.requires_grad and torch.is_grad_enabled()):
        return native.extension().gather_rows(tensor, index)
    return tensor.index_select(0, index)


def _place_rows(rows: Tensor, index: Tensor, total: int) -> Tensor:
    """rows [N, F] at the distinct indices [N] of a [total, F] tensor of zeros: by the C++ on the
    CPU (its buffer pool: no page faults), by torch elsewhere."""
    if rows.is_cpu:
        return native.extension().scatter_rows(rows, index, total)
    return rows.new_zeros(total, rows.shape[1]).index_copy_(0, index, rows)


class _DistinctRows(torch.autograd.Function):
    """x.index_select(0, index) for distinct indices: its gradient is placed in zeros (`_place_rows`;
    index_select's own adds it in, a serial scatter-add, the costliest step of a short call)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return _place_rows(grad, index, ctx.rows), None


class _PlacedRows(torch.autograd.Function):
    """`_place_rows` under autograd: the gradient is gathered back."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, total: int) -> Tensor:
        ctx.save_for_backward(index)
        return _place_rows(rows, index, total)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        if grad.stride(0) == 0:  # every row the same (a sum's or a mean's gradient, expanded): no copy
            return grad[:1].expand(index.shape[0], -1), None, None
        return _gather_rows(grad, index), None, None


def pack_inputs(x: Tensor, packing: Packing) -> Tensor:
    """x [B, T, D] as the packed rows [N, 1, D]."""
    batch, steps, features = x.shape
    rows = x.reshape(batch * steps, features)
    if torch.is_grad_enabled() and x.requires_grad:
        return _DistinctRows.apply(rows, packing.sources).view(-1, 1, features)
    return _gather_rows(rows, packing.sources).view(-1, 1, features)


def unpack_outputs(y: Tensor, packing: Packing, final_h: Tensor, steps: int, go_backwards: bool,
                   zero_output_for_mask: bool) -> Tensor:
    """Packed outputs [N, *, P] as [B, T, P] in processing order, padded steps per Keras' rules:
    zeros, or going forwards without zero_output_for_mask, after a row's end its last output (its
    final h [B, P])."""
    batch, size = packing.lengths.shape[0], y.shape[-1]
    rows = y.reshape(-1, size)
    if torch.is_grad_enabled() and y.requires_grad:
        outputs = _PlacedRows.apply(rows, packing.positions, batch * steps)
    else:
        outputs = _place_rows(rows, packing.positions, batch * steps)
    outputs = outputs.view(batch, steps, size)
    if go_backwards or zero_output_for_mask:
        return outputs
    lengths = packing.lengths[:, None]
    repeats = (torch.arange(steps, device=lengths.device) >= lengths) & (lengths > 0)
    return torch.where(repeats[..., None], final_h[:, None, :].to(outputs.dtype), outputs)


def last_outputs(final_h: Tensor, packing: Packing, steps: int, go_backwards: bool,
                 zero_output_for_mask: bool) -> Tensor:
    """[B, P] the output of the last processing step, from the final h [B, P]: a row's last output
    is its final h unless that step is padding (zero with zero_output_for_mask; zero for a row that
    took no step)."""
    lengths = packing.lengths
    if go_backwards:  # the last processing step is time 0
        keeps = lengths > 0
    elif zero_output_for_mask:
        keeps = lengths == steps
    else:
        keeps = lengths > 0
    return torch.where(keeps[:, None], final_h, torch.zeros((), dtype=final_h.dtype, device=final_h.device))


# (x [N, 1, D], each segment's starting states (LSTM h0 [V, P], c0 [V, U]; else h0 [V, U]),
# input_dropout per packed row [G, N, D], recurrent_dropout per segment [G, V, P], batch_sizes)
# -> the packed call's (y [N, 1, P] with return_sequences (else anything), *final states [V, *])
PackedCall = Callable[[Tensor, tuple, Optional[Tensor], Optional[Tensor], Tensor], tuple]


def run_packed(p: Recurrence, lengths: Tensor, call: PackedCall) -> RecurrenceResult:
    """A problem (no trace, no zoneout) run by a kernel's packed `call` on the rows' valid steps."""
    steps = p.inputs.shape[1]
    packing = plan(lengths, steps, p.go_backwards, p.reset)
    restored = p.restored_states() if p.reset is not None else (None,) * len(p.initial_state)
    starting = tuple(packing.starting_states(*states) for states in zip(p.initial_state, restored))
    y, *final = call(pack_inputs(p.inputs, packing), starting,
                     packing.per_packed_row(packing.pack(p.input_dropout, 1)), packing.pack(p.recurrent_dropout, 1),
                     packing.batch_sizes)
    states = tuple(packing.unpack_states(initial, state) for initial, state in zip(p.initial_state, final))
    if p.return_sequences:
        outputs = unpack_outputs(y, packing, states[0], steps, p.go_backwards, p.zero_output_for_mask)
    else:
        outputs = last_outputs(states[0], packing, steps, p.go_backwards, p.zero_output_for_mask)
    return RecurrenceResult(outputs, states)
