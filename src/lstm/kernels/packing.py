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

Every tensor op here is differentiable (index_select, index_copy, where), so autograd carries the
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

from .problem import Recurrence, RecurrenceResult


def _packing_off() -> bool:
    """Under torch.compile (the packed sizes depend on the data), and with LSTM_NO_PACKING."""
    return torch.compiler.is_compiling() or os.environ.get("LSTM_NO_PACKING", "").strip() not in ("", "0")


def _lengths(p: Recurrence) -> Optional[Tensor]:
    """Each row's length when the steps that count are its first ones (`lengths`, a right-padded
    mask, or all of them), else None."""
    mask = p.step_mask()
    if mask is None:
        return torch.full((p.inputs.shape[0],), p.inputs.shape[1], dtype=torch.int64, device=p.inputs.device)
    if p.mask is not None and not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # (each row: kept steps, then not)
        return None
    return p.lengths if p.mask is None else mask.sum(1)


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
    if p.reset is None and bool((lengths == p.inputs.shape[1]).all()):
        return dataclasses.replace(p, mask=None, lengths=None), None
    if not bool((lengths > 0).any()):  # no step counts (so no reset does): nothing to pack
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
    outputs: Tensor      # [B * T] int64: the packed row each output step repeats (N: a zero row)
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

    def starting_states(self, initial: Tensor, restored: Tensor) -> Tensor:
        """[V, *] each segment's first state: the restored one after a reset, else the initial one."""
        return torch.where(self.restarts[:, None], restored.index_select(0, self.rows),
                           initial.index_select(0, self.rows).to(restored.dtype))

    def unpack_states(self, initial: Tensor, final: Tensor) -> Tensor:
        """[B, *] states: each running row's last segment's final ones, the initial ones of rows that
        took no step."""
        return initial.to(final.dtype).index_copy(0, self.running, final.index_select(0, self.last))


def ranks(batch_sizes: Tensor, device=None) -> Tensor:
    """[N] int64: each packed row's rank among the rows that take its step (0 .. batch_sizes[s] - 1)."""
    sizes = batch_sizes.to(device)
    first_rows = torch.cumsum(sizes, 0) - sizes
    return torch.arange(int(sizes.sum()), device=device) - first_rows.repeat_interleave(sizes)


def plan(lengths: Tensor, steps: int, go_backwards: bool, zero_output_for_mask: bool,
         reset: Optional[Tensor] = None) -> Packing:
    """The packed layout of rows with these lengths ([B] int64, 0 <= lengths <= steps, some > 0) and
    resets (bool [B, T] by time index, or None). Built on j, a row's valid steps in processing order: time j,
    or going backwards length - 1 - j (Keras' processing step T - length + j)."""
    device = lengths.device
    lengths = lengths.to(torch.int64)
    batch = lengths.shape[0]
    j = torch.arange(steps, device=device).expand(batch, steps)
    length = lengths[:, None]
    valid = j < length
    time = (length - 1 - j).clamp(min=0) if go_backwards else j
    restarts = torch.zeros_like(valid)
    if reset is not None:
        restarts = valid & reset.to(device=device, dtype=torch.bool).gather(1, time)
    starts = restarts | (valid & (j == 0))
    # the segments, numbered in batch-row order: each valid step's segment and the segment's first j
    per_row = starts.sum(1)
    segment_of = torch.cumsum(starts, 1) - 1 + (torch.cumsum(per_row, 0) - per_row)[:, None]
    segment_rows, segment_first = starts.nonzero(as_tuple=True)
    count = segment_rows.shape[0]
    segment_of = segment_of.clamp(0, count - 1)  # (invalid steps: any segment, never read)
    segment_lengths = torch.bincount(segment_of[valid], minlength=count)
    # sorted longest first: segment k has rank[k]; step s is taken by ranks [0, batch_sizes[s])
    sorted_lengths, order = torch.sort(segment_lengths, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=device)
    longest = int(sorted_lengths[0])
    batch_sizes = (torch.arange(longest, device=device)[:, None] < sorted_lengths[None, :]).sum(1).cpu()
    first_row = torch.zeros(longest + 1, dtype=torch.int64, device=device)
    first_row[1:] = batch_sizes.to(device).cumsum(0)
    total = int(first_row[-1])
    # each valid step's packed row: its segment's step j - first j, at the segment's rank
    step = torch.where(valid, j - segment_first[segment_of], 0)
    packed = first_row[step] + rank[segment_of]
    sources = torch.empty(total, dtype=torch.int64, device=device)
    sources[packed[valid]] = (torch.arange(batch, device=device)[:, None] * steps + time)[valid]
    # the outputs in processing order: position q of a row shows j = q (going backwards q - (T - length))
    shown = j - (steps - length) if go_backwards else j
    if not go_backwards and not zero_output_for_mask:  # after its end a row repeats its last output
        shown = torch.minimum(shown, length - 1)
    visible = (shown >= 0) & (shown < length)
    outputs = torch.where(visible, packed.gather(1, shown.clamp(0, steps - 1)), total).reshape(-1)
    running = (lengths > 0).nonzero(as_tuple=True)[0]
    last = rank[segment_of[running, lengths[running] - 1]]
    return Packing(segment_rows[order], restarts[segment_rows, segment_first][order], batch_sizes, sources, outputs,
                   running, last, lengths)


def pack_inputs(x: Tensor, packing: Packing) -> Tensor:
    """x [B, T, D] as the packed rows [N, 1, D]."""
    batch, steps, features = x.shape
    return x.reshape(batch * steps, features).index_select(0, packing.sources).view(-1, 1, features)


def unpack_outputs(y: Tensor, packing: Packing, batch: int, steps: int) -> Tensor:
    """Packed outputs [N, *, P] as [B, T, P] in processing order (padded steps per Keras' rules)."""
    size = y.shape[-1]
    rows = torch.cat([y.reshape(-1, size), y.new_zeros(1, size)])
    return rows.index_select(0, packing.outputs).view(batch, steps, size)


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


# (x [N, 1, D], initial states of the running rows (LSTM h0 [B', P], c0 [B', U]; else h0 [B', U]),
# input_dropout per packed row [G, N, D], recurrent_dropout per running row [G, B', P], batch_sizes)
# -> the packed call's (y [N, 1, P] with return_sequences (else anything), *final states)
PackedCall = Callable[[Tensor, tuple, Optional[Tensor], Optional[Tensor], Tensor], tuple]


def run_packed(p: Recurrence, lengths: Tensor, call: PackedCall) -> RecurrenceResult:
    """A problem (no trace, no zoneout) run by a kernel's packed `call` on the rows' valid steps."""
    batch, steps, _ = p.inputs.shape
    packing = plan(lengths, steps, p.go_backwards, p.zero_output_for_mask, p.reset)
    starting = tuple(packing.starting_states(initial, restored)
                     for initial, restored in zip(p.initial_state, p.restored_states()))
    y, *final = call(pack_inputs(p.inputs, packing), starting,
                     packing.per_packed_row(packing.pack(p.input_dropout, 1)), packing.pack(p.recurrent_dropout, 1),
                     packing.batch_sizes)
    states = tuple(packing.unpack_states(initial, state) for initial, state in zip(p.initial_state, final))
    if p.return_sequences:
        outputs = unpack_outputs(y, packing, batch, steps)
    else:
        outputs = last_outputs(states[0], packing, steps, p.go_backwards, p.zero_output_for_mask)
    return RecurrenceResult(outputs, states)
