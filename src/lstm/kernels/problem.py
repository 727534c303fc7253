"""What a kernel is asked to compute: one recurrence, fully described.

Layers fill a `Recurrence` (weights, options, mask, direction, initial state, dropout masks)
and hand it to `lstm.kernels.run`; kernels return a `RecurrenceResult`. Nothing here says
*how* to compute, so a new kernel never touches a layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Callable, Optional, Union

import torch

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]

GATE_NAMES = {"lstm": ("i", "f", "c", "o"), "gru": ("z", "r", "h"), "simple_rnn": ("h",)}
STATE_COUNT = {"lstm": 2, "gru": 1, "simple_rnn": 1}
# a trace's per-step internals, in the order every kernel gives them
TRACE_KEYS = {"lstm": ("i", "f", "c_tilde", "c", "o", "h"), "gru": ("z", "r", "h_tilde", "h"), "simple_rnn": ("h",)}
# compute dtypes whose products round their operands and accumulate in float32 (see Recurrence)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a recurrence's states are carried in, inside a kernel and from one call of a
    sequence to the next (stateful layers, chunked runs, streams): float32 for a low-precision
    compute dtype (the cell state C is never rounded), else the compute dtype."""
    return torch.float32 if compute_dtype in LOW_PRECISION else compute_dtype


@dataclass(frozen=True)
class CellSpec:
    """The maths of one step: which cell, which activations, which variant."""

    kind: str  # "lstm" | "gru" | "simple_rnn"
    activation: Activation = "tanh"
    recurrent_activation: Activation = "sigmoid"
    reset_after: bool = True  # GRU only: reset gate applied after the recurrent matmul
    # LSTM variants (issue 6), all off by default so the Keras cell stays exact
    peephole: bool = False  # Gers & Schmidhuber 2000: C_{t-1} -> i, f and C_t -> o, diagonal weights
    layer_norm: bool = False  # Ba et al. 2016 as in haste's LayerNormLSTM
    proj_size: int = 0  # LSTMP (Sak et al. 2014): h_t = (o_t * tanh(C_t)) @ projection
    coupled: bool = False  # CIFG: i_t = 1 - f_t
    forget_bias: float = 0.0  # added to the forget pre-activation at run time (TF1)
    cell_clip: Optional[float] = None  # C_t clipped to [-cell_clip, cell_clip]

    @property
    def gate_names(self) -> tuple:
        """The gate blocks of the weights, in order (a coupled LSTM has no input-gate block)."""
        names = GATE_NAMES[self.kind]
        return names[1:] if self.coupled else names

    @property
    def gate_count(self) -> int:
        return len(self.gate_names)

    @property
    def peephole_gates(self) -> tuple:
        """The gates with a peephole weight row, in the order of the rows."""
        return ("f", "o") if self.coupled else ("i", "f", "o")

    @property
    def plain(self) -> bool:
        """No LSTM variant: the cell the plain fused kernels run."""
        return not (self.peephole or self.layer_norm or self.proj_size or self.coupled or self.forget_bias
                    or self.cell_clip is not None)

    @property
    def state_count(self) -> int:
        return STATE_COUNT[self.kind]


_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as int64 (splitmix64's constants)
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
UNIFORM_BITS = 24


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) shift of int64 values."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


@dataclass(frozen=True)
class Zoneout:
    """Zoneout's keep-masks of one call, defined by a seed rather than stored: unit j of stream k
    (0: h, 1: C) of row b (of B) at processing step s is kept when the top 24 bits of
    splitmix64(seed + (n + 1) * golden), n = (((offset + s) * B + b) * size + j) * 2 + k, are
    below rate * 2^24. The fused kernel hashes inside its loop (no mask tensors, no RNG calls); the
    reference kernel materialises the same masks with `mask`.

    offset: the global processing step of the call's first step, so that a sequence run in chunks
    (lstm.chunked, ...) draws the masks of one call over it with the same seed: a chunk passes the
    number of steps processed before it (with go_backwards, processing order: the last chunk first).
    seed: an int; under torch.compile a 0-dim int64 tensor (drawn in the graph: layers.rng)."""

    seed: Union[int, torch.Tensor]
    rate_h: float
    rate_c: float
    offset: int = 0

    def threshold(self, rate: float) -> int:
        return int(rate * (1 << UNIFORM_BITS))

    def mask(self, stream: int, batch: int, steps: int, size: int, device=None) -> Optional[torch.Tensor]:
        """bool [batch, steps, size], True = keep the previous value; None when the rate is 0."""
        threshold = self.threshold((self.rate_h, self.rate_c)[stream])
        if not threshold:
            return None
        arange = partial(torch.arange, dtype=torch.int64, device=device)
        row = (self.offset + arange(steps))[None, :, None] * batch + arange(batch)[:, None, None]
        return counter_bits(self.seed, (row * size + arange(size)) * 2 + stream) < threshold


def counter_bits(seed: Union[int, torch.Tensor], n: torch.Tensor) -> torch.Tensor:
    """int64: counter n's uniform draw in [0, 2^24), the top 24 bits of splitmix64(seed + (n + 1) *
    golden) (csrc/counter_hash.h computes the same): zoneout's and dropout's draws."""
    z = seed + (n + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 64 - UNIFORM_BITS)


@dataclass(frozen=True)
class QuantizedMatrix:
    """An int8 weight as `lstm.quantize` makes it: values int8 [K, N] and scales float32 [N], the
    matrix being values * scales (one scale per output column)."""

    values: torch.Tensor
    scales: torch.Tensor

    def chunk(self, blocks: int) -> list:
        """The column blocks (a cell's gates), each a QuantizedMatrix."""
        return [QuantizedMatrix(v, s) for v, s in zip(self.values.chunk(blocks, -1), self.scales.chunk(blocks, -1))]


def _int8_multipliers(largest: torch.Tensor) -> torch.Tensor:
    """127 / largest where that is finite and positive, else 0 (a zero or non-finite vector
    quantizes to zeros)."""
    usable = (largest > 0) & torch.isfinite(largest)
    return torch.where(usable, largest.new_tensor(127.0) / torch.where(usable, largest, 1), 0)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows (last dimension) quantized as the int8 kernels quantize a product's left operand
    (x_t, h) at each step: with m = max|row|, q = x * (127 / m) rounded half to even, in
    [-127, 127], and the row's scale m / 127 (csrc/int8_product.h quantize_row computes the same).
    Returns q (integers, in x's dtype) and the scales [..., 1]."""
    largest = x.abs().amax(-1, keepdim=True)
    return torch.round(x * _int8_multipliers(largest)).clamp(-127, 127), largest / largest.new_tensor(127.0)


def quantize_columns(weight: torch.Tensor) -> QuantizedMatrix:
    """weight [K, N] as int8 with a scale per column, the rule of `quantize_rows` per column."""
    largest = weight.abs().amax(0)
    values = torch.round(weight * _int8_multipliers(largest)).clamp(-127, 127).to(torch.int8)
    return QuantizedMatrix(values, (largest / largest.new_tensor(127.0)).to(torch.float32))


def quantized_product(x: torch.Tensor, weight: QuantizedMatrix) -> torch.Tensor:
    """x @ weight as the int8 kernels compute it: x's rows quantized (`quantize_rows`), the
    products' integer sums exact, each converted to x's dtype and then times (its row's scale times
    its column's scale)."""
    q, row_scales = quantize_rows(x)
    sums = (q.double() @ weight.values.double()).to(x.dtype)
    return sums * (row_scales * weight.scales)


@dataclass
class Recurrence:
    """One recurrent layer call, in Keras' weight layout.

    inputs            [B, T, D], in time order (the kernel applies go_backwards)
    kernel            [D, G*U]  gate blocks in Keras order (LSTM i|f|c|o, coupled f|c|o, GRU z|r|h)
    recurrent_kernel  [U, G*U]
    bias              [G*U], GRU reset_after [2, G*U] (input row, recurrent row), or None
    initial_state     tuple of [B, U]: (h, c) for LSTM, (h,) otherwise
    mask              bool [B, T] or None; False steps keep the state (Keras masking). The inputs
                      at steps that do not count (masked, past a row's length) may hold anything
                      (padding, NaN): `masked()` gives them as zeros, as a kernel reading every
                      step needs (NaN * 0 would be NaN gradients); a packed kernel never reads them
    lengths           int64 [B] or None: row b's steps are [0, lengths[b]), the rest padding; the
                      same as the right-padded mask `arange(T) < lengths[:, None]` (with `mask` too:
                      both must keep a step). A kernel without `takes_lengths = True` gets that
                      mask instead (dispatch); one with it may skip the padding
    reset             bool [B, T] or None: before the step of time index t, a row with reset[b, t]
                      starts again from `reset_state` (an episode boundary inside the sequence);
                      ignored at steps that do not count (masked, past a row's length). Only kernels
                      that say `takes_resets = True` get problems with resets (dispatch)
    reset_state       the states a reset restores (as initial_state), or None: zeros
    input_dropout     [1 or G, B, D] scaled keep-masks, one per gate or shared, or None
    recurrent_dropout [G, B, U] scaled keep-masks on h_{t-1}, or None

    LSTM variants (only with the matching CellSpec flag; see reference.py for the maths):
    peephole          [3, U] diagonal weights on C for the i, f, o gates ([2, U]: f, o if coupled)
    layer_norm        (gate_gain [2, G*U] for x@kernel and h@recurrent_kernel, cell_gain [U],
                      cell_shift [U]) as in haste's LayerNormLSTM
    projection        [U, P]; then recurrent_kernel is [P, G*U] and h, outputs are [B, P]
    zoneout           a `Zoneout`: per step and unit, keep the previous h / C (Krueger et al. 2016);
                      None at inference
    quantized         an LSTM's (kernel, recurrent_kernel) as int8 `QuantizedMatrix`es (`lstm.quantize`),
                      or None. With them, every product with a weight is `quantized_product` (x_t and h
                      quantized per row at each step); `kernel` and `recurrent_kernel` hold the same
                      matrices in float. Only kernels that say `takes_quantized = True` get such
                      problems (dispatch)

    Precision: `compute_dtype` is the inputs' dtype (a layer casts its inputs to the dtype it
    computes in, as Keras does); the weights keep their variables' dtype (float32 under a mixed
    policy or torch.autocast), so that a kernel can return their gradients unrounded; dropout
    masks come in the compute dtype or float32. Initial states come in the compute dtype or in
    `state_dtype(compute_dtype)` (carried from a previous call). For float32/float64 every tensor
    is in the compute dtype. For a low-precision compute dtype (bfloat16, float16) a kernel computes:
      products          operands rounded to the compute dtype (x, h, the weights, a projection's
                        input), accumulated in float32;
      gates, C          in float32 (biases, peepholes, layer-norm gains added in float32);
      h                 rounded to the compute dtype at every step (it is the next product's operand);
      outputs           in the compute dtype; states as `final_states` gives them (C in float32);
                        traces in float32;
      gradients         in each input's own dtype (float32 for float32 weights), summed in float32.
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
    peephole: Optional[torch.Tensor] = None
    layer_norm: Optional[tuple] = None
    projection: Optional[torch.Tensor] = None
    zoneout: Optional[Zoneout] = None
    lengths: Optional[torch.Tensor] = None
    reset: Optional[torch.Tensor] = None
    reset_state: Optional[tuple] = None
    quantized: Optional[tuple] = None

    def restored_states(self) -> tuple:
        """The states a reset restores: `reset_state`, or zeros shaped as the initial state."""
        if self.reset_state is not None:
            return tuple(self.reset_state)
        return tuple(torch.zeros_like(s) for s in self.initial_state)

    def step_mask(self) -> Optional[torch.Tensor]:
        """The bool [B, T] mask of the steps that count (`mask` and `lengths` together), or None."""
        if self.lengths is None:
            return self.mask
        steps = torch.arange(self.inputs.shape[1], device=self.lengths.device)
        by_length = steps[None, :] < self.lengths[:, None]
        return by_length if self.mask is None else self.mask & by_length

    def lengths_as_mask(self) -> "Recurrence":
        """This problem with its lengths given as a mask, its inputs as they are (what a kernel's
        `supports` needs to see: the shape of the problem, not its values)."""
        if self.lengths is None:
            return self
        return dataclasses.replace(self, mask=self.step_mask(), lengths=None)

    def masked(self) -> "Recurrence":
        """This problem with its lengths given as a mask and zeros in its inputs at the steps that
        do not count (itself when every step counts)."""
        counted = self.step_mask()
        if counted is None:
            return self
        inputs = self.inputs.masked_fill(~counted[..., None], 0)
        return dataclasses.replace(self, mask=counted, lengths=None, inputs=inputs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype this call computes in (see Precision above)."""
        return self.inputs.dtype

    @property
    def units(self) -> int:
        """Size of the cell state (and of h unless projected)."""
        return self.recurrent_kernel.shape[1] // self.cell.gate_count

    @property
    def output_size(self) -> int:
        """Size of h and of the outputs: the projection's size, or `units`."""
        return self.recurrent_kernel.shape[0]

    @property
    def plain(self) -> bool:
        return self.cell.plain and self.zoneout is None


@dataclass
class RecurrenceResult:
    """outputs: [B, T, U] in processing order if return_sequences, else the last output [B, U].

    states: the final states as the kernel carries them (`final_states`): h in the compute dtype, C
    in `state_dtype` (float32 for a low-precision compute dtype); a layer returns them cast to the
    compute dtype and keeps C unrounded for the next call of a sequence.

    trace (only when asked): per-step internals, each [B, T, U] in processing order
    (LSTM: i, f, c_tilde, c, o, h; GRU: z, r, h_tilde, h; SimpleRNN: h). The reference kernel's
    are part of the autograd graph; the fused kernels' are detached (for gradients through the
    gates, `lstm.kernels.use("reference")`).
    """

    outputs: torch.Tensor
    states: tuple
    trace: Optional[dict] = field(default=None)


def answers_empty_sequences(run: Callable[[Recurrence], RecurrenceResult]):
    """A kernel's `run`, answering T = 0 with the one result every kernel gives (so `run` itself
    sees T >= 1)."""

    @wraps(run)
    def run_or_answer(p: Recurrence) -> RecurrenceResult:
        return _no_steps_result(p) if p.inputs.shape[1] == 0 else run(p)

    return run_or_answer


def _no_steps_result(p: Recurrence) -> RecurrenceResult:
    """No outputs, the initial states, empty traces."""
    x = p.inputs
    batch, size = x.shape[0], p.output_size
    outputs = x.new_zeros(batch, 0, size) if p.return_sequences else x.new_zeros(batch, size)
    trace = None
    if p.trace:
        trace = {k: x.new_zeros(batch, 0, size if k == "h" else p.units) for k in TRACE_KEYS[p.cell.kind]}
    return RecurrenceResult(outputs, final_states(p, p.initial_state), trace)


def final_states(p: Recurrence, states) -> tuple:
    """States as a kernel returns them: h in the compute dtype, C in `state_dtype` (no copies
    for float32/float64)."""
    h, *rest = states
    return (h.to(p.compute_dtype), *(s.to(state_dtype(p.compute_dtype)) for s in rest))
