"""What a kernel is asked to compute: one recurrence, fully described.

Layers fill a `Recurrence` (weights, options, mask, direction, initial state, dropout masks)
and hand it to `lstm.kernels.run`; kernels return a `RecurrenceResult`. Nothing here says
*how* to compute, so a new kernel never touches a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]

GATE_COUNT = {"lstm": 4, "gru": 3, "simple_rnn": 1}
STATE_COUNT = {"lstm": 2, "gru": 1, "simple_rnn": 1}


@dataclass(frozen=True)
class CellSpec:
    """The maths of one step: which cell, which activations, which variant."""

    kind: str  # "lstm" | "gru" | "simple_rnn"
    activation: Activation = "tanh"
    recurrent_activation: Activation = "sigmoid"
    reset_after: bool = True  # GRU only: reset gate applied after the recurrent matmul

    @property
    def gate_count(self) -> int:
        return GATE_COUNT[self.kind]

    @property
    def state_count(self) -> int:
        return STATE_COUNT[self.kind]


@dataclass
class Recurrence:
    """One recurrent layer call, in Keras' weight layout.

    inputs            [B, T, D], in time order (the kernel applies go_backwards)
    kernel            [D, G*U]  gate blocks in Keras order (LSTM i|f|c|o, GRU z|r|h)
    recurrent_kernel  [U, G*U]
    bias              [G*U], GRU reset_after [2, G*U] (input row, recurrent row), or None
    initial_state     tuple of [B, U]: (h, c) for LSTM, (h,) otherwise
    mask              bool [B, T] or None; False steps keep the state (Keras masking)
    input_dropout     [1 or G, B, D] scaled keep-masks, one per gate or shared, or None
    recurrent_dropout [G, B, U] scaled keep-masks on h_{t-1}, or None
    """

    cell: CellSpec
    inputs: torch.Tensor
    kernel: torch.Tensor
    recurrent_kernel: torch.Tensor
    bias: Optional[torch.Tensor]
    initial_state: tuple
    mask: Optional[torch.Tensor] = None
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    return_sequences: bool = True
    input_dropout: Optional[torch.Tensor] = None
    recurrent_dropout: Optional[torch.Tensor] = None
    trace: bool = False

    @property
    def units(self) -> int:
        return self.recurrent_kernel.shape[0]


@dataclass
class RecurrenceResult:
    """outputs: [B, T, U] in processing order if return_sequences, else the last output [B, U].

    trace (only when asked): per-step internals, each [B, T, U] in processing order
    (LSTM: i, f, c_tilde, c, o, h; GRU: z, r, h_tilde, h; SimpleRNN: h).
    """

    outputs: torch.Tensor
    states: tuple
    trace: Optional[dict] = field(default=None)
