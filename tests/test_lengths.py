"""Per-row lengths and packed sequences at the layers: `layer(x, lengths=L)` is the right-padded
mask `arange(T) < L[:, None]` (outputs, states, every gradient) on every kernel that runs it,
against the reference kernel's mask route; padding never reaches a gradient or an output (NaN
padding included); Bidirectional's backward direction starts at each row's last valid step;
PackedSequence in, PackedSequence out, equal to torch.nn's modules; `lengths` errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm
import lstm.kernels.packing
from lstm import layers
from lstm.layers.validation import check_lengths

B, T, D, U = 5, 6, 3, 4
LENGTHS = torch.tensor([6, 0, 3, 1, 4])  # a full row, an empty one, the rest in between
# relative to each tensor's largest entry; float32: the fused kernels' rounding against the reference's
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# layer norm over 4 units amplifies float32 rounding (measured here: 3e-5; tests/test_variants.py judges it
# against float64)
LAYER_NORM_FLOAT32_TOLERANCE = 1e-4

CELLS = {
    "lstm": (layers.LSTM, {}),
    "lstm peephole": (layers.LSTM, {"peephole": True}),
    "lstm layer_norm": (layers.LSTM, {"layer_norm": True}),
    "lstm proj_size": (layers.LSTM, {"proj_size": 3}),
    "lstm coupled": (layers.LSTM, {"coupled": True}),
    "lstm cell_clip": (layers.LSTM, {"cell_clip": 0.4, "forget_bias": 1.0}),
    "gru reset_after": (layers.GRU, {"reset_after": True}),
    "gru reset_before": (layers.GRU, {"reset_after": False}),
    "simple_rnn": (layers.SimpleRNN, {}),
}
# (return_sequences, go_backwards, zero_output_for_mask)
CALLS = [(seq, back, zero) for seq in (True, False) for back in (False, True) for zero in (False, True)]


def padding_mask(lengths: torch.Tensor, steps: int = T) -> torch.Tensor:
    return torch.arange(steps) < lengths[:, None]


def randomized(layer, seed: int = 0):
    """Every weight moved off its initial value (zero biases, unit gains would hide a wrong term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype))
    return layer


def make(cls, options: dict, dtype: str, seed: int = 0, **layer_options):
    torch.manual_seed(seed)
    return randomized(cls(U, input_dim=D, dtype=dtype, **options, **layer_options), seed)


def inputs(dtype=torch.float64, seed: int = 1, batch: int = B, steps: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, D, generator=g, dtype=torch.float64).to(dtype)


def initial_states(layer, dtype, seed: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    subs = [layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else [layer]
    return [torch.randn(B, size, generator=g, dtype=torch.float64).to(dtype) for sub in subs
            for size in sub.cell.state_sizes]


def results(layer, x, states=None, **call) -> dict:
    """What the call returns and the gradients of a random projection of it w.r.t. x, the initial
    states and every weight."""
    x = x.clone().requires_grad_()
    states = None if states is None else [s.clone().requires_grad_() for s in states]
    returned = layer(x, initial_state=states, **call)
    returned = list(returned) if isinstance(returned, tuple) else [returned]
    g = torch.Generator().manual_seed(3)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype)).sum() for r in returned)
    leaves = {"x": x, **{f"initial_state[{k}]": s for k, s in enumerate(states or [])},
              **dict(layer.named_parameters())}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    values = {f"returned[{k}]": r.detach() for k, r in enumerate(returned)}
    values.update({f"grad {name}": grad for name, grad in zip(leaves, grads)})
    return values


def assert_close(got: dict, expected: dict, tolerance: float, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected:
        scale = max(float(expected[key].abs().max()) if expected[key].numel() else 0.0, 1.0)
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=tolerance * scale,
                                   msg=lambda m, key=key: f"{what}, {key}: {m}")


def bfloat16_bound(steps: int) -> float:
    """bfloat16's tolerance relative to each tensor's largest entry: 2 eps sqrt(T) (tests/test_mixed_precision.py)."""
    return 2 * torch.finfo(torch.bfloat16).eps * math.sqrt(steps)


def assert_within(got: dict, expected: dict, bound: float, what: str) -> None:
    """Each tensor within `bound` times its largest entry (at least 1), compared in float32."""
    assert got.keys() == expected.keys(), what
    for key in expected:
        scale = max(float(expected[key].abs().max()), 1.0)
        difference = float((got[key].float() - expected[key].float()).abs().max())
        assert difference <= bound * scale, f"{what}, {key}: {difference} > {bound * scale}"


def kernels_running(layer, x, **call) -> list:
    """The kernels that run this call when forced (the others refuse it)."""
    names = []
    for name in lstm.kernels.available():
        with lstm.kernels.use(name):
            try:
                lstm.kernels.select(layer.recurrence(x, **call))
            except ValueError:
                continue
        names.append(name)
    assert "reference" in names
    return names


def assert_lengths_equal_mask(layer, x, lengths, dtype, what: str, states=None, tolerance=None) -> None:
    """Every kernel's lengths call against the reference kernel's mask call; the reference's own
    lengths call exactly equal to it; no gradient at a padded step."""
    with lstm.kernels.use("reference"):
        expected = results(layer, x, states, mask=padding_mask(lengths, x.shape[1]))
    padded = ~padding_mask(lengths, x.shape[1])
    for name in kernels_running(layer, x, lengths=lengths):
        with lstm.kernels.use(name):
            got = results(layer, x, states, lengths=lengths)
        if name == "reference":
            for key in expected:
                assert torch.equal(got[key], expected[key]), f"{what}, reference: {key}"
        assert_close(got, expected, tolerance or TOLERANCE[dtype], f"{what}, {name}")
        assert torch.count_nonzero(got["grad x"][padded]) == 0, f"{what}, {name}: gradient at a padded step"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_lengths_equal_the_padding_mask(cell, dtype):
    cls, options = CELLS[cell]
    x = inputs(dtype)
    tolerance = LAYER_NORM_FLOAT32_TOLERANCE if options.get("layer_norm") and dtype == torch.float32 else None
    for return_sequences, go_backwards, zero_output_for_mask in CALLS:
        layer = make(cls, options, str(dtype).removeprefix("torch."), return_state=True,
                     return_sequences=return_sequences, go_backwards=go_backwards,
                     zero_output_for_mask=zero_output_for_mask)
        what = (f"{cell}, return_sequences={return_sequences}, go_backwards={go_backwards}, "
                f"zero_output_for_mask={zero_output_for_mask}")
        assert_lengths_equal_mask(layer, x, LENGTHS, dtype, what, initial_states(layer, dtype), tolerance)


@pytest.mark.parametrize("cell", ["lstm", "gru reset_after", "simple_rnn"])
def test_without_return_state_and_with_zero_states(cell):
    cls, options = CELLS[cell]
    layer = make(cls, options, "float64", return_sequences=True)
    assert_lengths_equal_mask(layer, inputs(), LENGTHS, torch.float64, cell)


def test_rows_past_their_length_keep_their_state_and_output():
    """What the padding mask means, checked directly: a row's final state is the state at its last
    valid step; its outputs after that repeat it (zeros with zero_output_for_mask)."""
    for zero in (False, True):
        layer = make(layers.LSTM, {}, "float64", return_sequences=True, return_state=True,
                     zero_output_for_mask=zero)
        x = inputs()
        y, h, c = layer(x, lengths=LENGTHS)
        for b, length in enumerate(LENGTHS.tolist()):
            if length == 0:
                assert not y[b].any() and not h[b].any() and not c[b].any()
                continue
            alone, h_alone, c_alone = layer(x[b:b + 1, :length])
            torch.testing.assert_close(y[b, :length], alone[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close((h[b], c[b]), (h_alone[0], c_alone[0]), rtol=1e-12, atol=1e-12)
            after = torch.zeros_like(y[b, length:]) if zero else y[b, length - 1].expand_as(y[b, length:])
            assert torch.equal(y[b, length:], after)


def test_lengths_and_a_mask_together_keep_the_steps_both_keep():
    layer = make(layers.LSTM, {}, "float64", return_sequences=True, return_state=True)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.7
    with lstm.kernels.use("reference"):
        expected = results(layer, inputs(), mask=mask & padding_mask(LENGTHS))
    for name in kernels_running(layer, inputs(), mask=mask, lengths=LENGTHS):
        with lstm.kernels.use(name):
            assert_close(results(layer, inputs(), mask=mask, lengths=LENGTHS), expected, 1e-10, name)


def test_generic_rnn_layer_over_a_cell_takes_lengths():
    torch.manual_seed(0)
    layer = randomized(layers.RNN(layers.LSTMCell(U, input_dim=D, dtype="float64"), return_sequences=True,
                                  return_state=True))
    assert_lengths_equal_mask(layer, inputs(), LENGTHS, torch.float64, "RNN(LSTMCell)")


def test_gate_traces_with_lengths_equal_the_mask_route():
    layer = make(layers.LSTM, {}, "float64", return_sequences=True)
    with lstm.kernels.use("reference"):
        _, by_mask = layer(inputs(), mask=padding_mask(LENGTHS), return_gates=True)
        _, by_lengths = layer(inputs(), lengths=LENGTHS, return_gates=True)
    assert by_mask.keys() == by_lengths.keys()
    for key in by_mask:
        assert torch.equal(by_mask[key], by_lengths[key]), key


@pytest.mark.parametrize("cell", ["lstm", "lstm peephole", "gru reset_after", "simple_rnn"])
def test_mixed_bfloat16_lengths_equal_the_padding_mask(cell):
    """Within bfloat16's tolerance (2 eps sqrt(T): tests/test_mixed_precision.py) of the reference
    kernel's mask route in the same precision."""
    cls, options = CELLS[cell]
    bound = bfloat16_bound(T)
    x = inputs(torch.float32)
    for go_backwards in (False, True):
        layer = make(cls, options, "mixed_bfloat16", return_sequences=True, return_state=True,
                     go_backwards=go_backwards)
        with lstm.kernels.use("reference"):
            expected = results(layer, x, mask=padding_mask(LENGTHS))
        for name in kernels_running(layer, x, lengths=LENGTHS):
            with lstm.kernels.use(name):
                got = results(layer, x, lengths=LENGTHS)
            assert_within(got, expected, bound, f"{cell}, {name}")
            assert torch.count_nonzero(got["grad x"][~padding_mask(LENGTHS)]) == 0


@pytest.mark.parametrize("cell", ["lstm", "gru reset_after"])
def test_stateful_layer_carries_the_state_at_each_rows_last_valid_step(cell):
    cls, options = CELLS[cell]
    by_lengths = make(cls, options, "float64", stateful=True, return_sequences=True)
    by_mask = make(cls, options, "float64", stateful=True, return_sequences=True)
    second_lengths = torch.tensor([2, 6, 0, 5, 1])
    for k, lengths in enumerate((LENGTHS, second_lengths)):
        x = inputs(seed=10 + k)
        y_lengths, y_mask = by_lengths(x, lengths=lengths), by_mask(x, mask=padding_mask(lengths))
        torch.testing.assert_close(y_lengths, y_mask, rtol=1e-12, atol=1e-12)
        for carried_lengths, carried_mask in zip(by_lengths.states, by_mask.states):
            torch.testing.assert_close(carried_lengths, carried_mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "lstm layer_norm", "gru reset_before", "simple_rnn"])
def test_nan_padding_reaches_no_output_and_no_gradient(cell):
    cls, options = CELLS[cell]
    clean = inputs()
    poisoned = clean.masked_fill(~padding_mask(LENGTHS)[..., None], float("nan"))
    for go_backwards in (False, True):
        layer = make(cls, options, "float64", return_sequences=True, return_state=True, go_backwards=go_backwards)
        for name in kernels_running(layer, clean, lengths=LENGTHS):
            with lstm.kernels.use(name):
                got, expected = results(layer, poisoned, lengths=LENGTHS), results(layer, clean, lengths=LENGTHS)
            for key in expected:
                assert torch.isfinite(got[key]).all(), f"{cell}, {name}: {key} not finite"
                assert torch.equal(got[key], expected[key]), f"{cell}, {name}: {key}"


# ----- the C++ GRU and SimpleRNN: the packed route ---------------------------------------------
SEQUENCE_CELLS = ["gru reset_after", "gru reset_before", "simple_rnn"]
# dropout in training: per-gate input masks where the layer has them (recurrent dropout forces
# implementation 1 on the GRU; implementation 1 alone too), a shared one otherwise
DROPOUT_CELLS = {
    "gru reset_after, input and recurrent dropout": (layers.GRU, {"dropout": 0.3, "recurrent_dropout": 0.4}),
    "gru reset_before, input and recurrent dropout": (layers.GRU, {"reset_after": False, "dropout": 0.3,
                                                                   "recurrent_dropout": 0.4}),
    "gru implementation 1, input dropout": (layers.GRU, {"dropout": 0.3, "implementation": 1}),
    "gru shared input dropout": (layers.GRU, {"reset_after": False, "dropout": 0.3}),
    "simple_rnn, input and recurrent dropout": (layers.SimpleRNN, {"dropout": 0.3, "recurrent_dropout": 0.4}),
}
FUSED_SEQUENCE = "fused_gru_simple_rnn"


@pytest.fixture
def packed_calls(monkeypatch) -> dict:
    """{"calls": how many kernel calls ran packed (packing.run_packed)} while the test runs."""
    if not lstm.kernels.native.extension():
        pytest.skip(f"the C++ kernels are not loaded: {lstm.kernels.native.unavailable_reason()}")
    count = {"calls": 0}
    run_packed = lstm.kernels.packing.run_packed

    def counting(*args, **kwargs):
        count["calls"] += 1
        return run_packed(*args, **kwargs)

    monkeypatch.setattr(lstm.kernels.packing, "run_packed", counting)
    return count


def lengths_against_the_mask(layer, x, lengths, states=None, seed=None) -> tuple[dict, dict]:
    """(the C++ GRU/SimpleRNN kernel's lengths call, the reference kernel's mask call); with `seed`
    the global generator is seeded before each, so dropout draws the same masks."""
    calls = {}
    routes = {FUSED_SEQUENCE: {"lengths": lengths}, "reference": {"mask": padding_mask(lengths, x.shape[1])}}
    for name, call in routes.items():
        if seed is not None:
            torch.manual_seed(seed)
        with lstm.kernels.use(name):
            calls[name] = results(layer, x, states, **call)
    return calls[FUSED_SEQUENCE], calls["reference"]


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_fused_gru_simple_rnn_runs_lengths_packed(cell, packed_calls):
    """The lengths tests above reach the packed route of the C++ GRU/SimpleRNN; a trace takes the
    mask route, and rows all of full length the plain one."""
    cls, options = CELLS[cell]
    layer = make(cls, options, "float64", return_sequences=True)
    assert FUSED_SEQUENCE in kernels_running(layer, inputs(), lengths=LENGTHS)
    with lstm.kernels.use(FUSED_SEQUENCE):
        layer(inputs(), lengths=LENGTHS)
        assert packed_calls["calls"] == 1
        layer(inputs(), lengths=LENGTHS, return_gates=True)
        layer(inputs(), lengths=torch.full((B,), T))
    assert packed_calls["calls"] == 1


def problems_calling(monkeypatch, method: str) -> list:
    """The problems on which `Recurrence.<method>` is called while the test runs (it still runs)."""
    calls = []
    original = getattr(lstm.kernels.problem.Recurrence, method)

    def counting(problem):
        calls.append(problem)
        return original(problem)

    monkeypatch.setattr(lstm.kernels.problem.Recurrence, method, counting)
    return calls


@pytest.mark.parametrize("cell", ["lstm", *SEQUENCE_CELLS])
def test_a_packed_call_zeroes_no_input(cell, packed_calls, monkeypatch):
    """Choosing the kernel asks the ones that do not take lengths on the problem's shape alone:
    zeroing x at the masked steps (a copy of x) is left to the kernel that runs them, which the
    packed route is not."""
    zeroed = problems_calling(monkeypatch, "masked")
    cls, options = CELLS[cell]
    layer = make(cls, options, "float32", return_sequences=True)
    x = inputs(torch.float32)
    layer(x, lengths=LENGTHS)
    layer(x, mask=padding_mask(LENGTHS, T))
    assert packed_calls["calls"] == 2 and zeroed == []
    with lstm.kernels.use("reference"):
        layer(x, lengths=LENGTHS)
    assert len(zeroed) == 1


@pytest.mark.parametrize("cell", ["lstm", *SEQUENCE_CELLS])
def test_choosing_the_kernel_of_a_lengths_call_builds_no_mask(cell, packed_calls, monkeypatch):
    """Every kernel ahead of the packed ones takes lengths itself (the int8 kernel turns them into
    their mask when it runs), so a lengths call builds no [B, T] mask at all."""
    built = problems_calling(monkeypatch, "step_mask")
    cls, options = CELLS[cell]
    make(cls, options, "float32", return_sequences=True)(inputs(torch.float32), lengths=LENGTHS)
    assert packed_calls["calls"] == 1 and built == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gathered_rows_equal_index_select(dtype, packed_calls):
    """The packed route's gathers of rows (x, the states, the outputs' gradient) by the C++, against
    index_select; an index out of range is an error naming it."""
    rows = torch.randn(7, 5).to(dtype)
    index = torch.tensor([6, 0, 3, 3, 1])
    assert torch.equal(lstm.kernels.native.extension().gather_rows(rows, index), rows.index_select(0, index))
    assert torch.equal(lstm.kernels.native.extension().gather_rows(rows.t().contiguous().t()[:, :3], index),
                       rows[:, :3].index_select(0, index))
    with pytest.raises(RuntimeError, match=r"expected indices in \[0, 7\), got 7"):
        lstm.kernels.native.extension().gather_rows(rows, torch.tensor([1, 7]))


@pytest.mark.parametrize("cell", DROPOUT_CELLS)
def test_dropout_with_lengths_equals_the_padding_mask(cell, packed_calls):
    """Input and recurrent dropout in training (the same masks: the same seed before each call) on
    the packed route, against the reference kernel's mask route."""
    cls, options = DROPOUT_CELLS[cell]
    x = inputs()
    for return_sequences, go_backwards, zero_output_for_mask in CALLS:
        layer = make(cls, options, "float64", return_state=True, return_sequences=return_sequences,
                     go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask).train()
        what = (f"{cell}, return_sequences={return_sequences}, go_backwards={go_backwards}, "
                f"zero_output_for_mask={zero_output_for_mask}")
        got, expected = lengths_against_the_mask(layer, x, LENGTHS, initial_states(layer, torch.float64), seed=7)
        assert_close(got, expected, TOLERANCE[torch.float64], what)
        assert torch.count_nonzero(got["grad x"][~padding_mask(LENGTHS)]) == 0, f"{what}: gradient at a padded step"
    assert packed_calls["calls"] == len(CALLS)


@pytest.mark.parametrize("dtype", ["float64", "mixed_bfloat16"])
@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_rows_split_over_two_threads_equal_the_padding_mask(cell, dtype, packed_calls):
    """A batch the C++ loops run in two chunks (one thread each taking every second row of the
    packed order, csrc/row_layout.h; in bfloat16 enough rows for the low-precision per-step
    products), with empty rows, full rows and rows of equal length, dropout on."""
    cls, options = CELLS[cell]
    batch, steps, units = 37, 9, 20
    lengths = torch.randint(0, steps + 1, (batch,), generator=torch.Generator().manual_seed(5))
    lengths[:6], lengths[6:8], lengths[8:10] = 4, 0, steps
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = randomized(cls(units, input_dim=D, dtype=dtype, return_sequences=True, return_state=True, dropout=0.3,
                               recurrent_dropout=0.4, **options)).train()
        x = inputs(torch.float64 if dtype == "float64" else torch.float32, batch=batch, steps=steps)
        g = torch.Generator().manual_seed(2)
        states = [torch.randn(batch, units, generator=g, dtype=torch.float64).to(x.dtype)]
        got, expected = lengths_against_the_mask(layer, x, lengths, states, seed=7)
    finally:
        torch.set_num_threads(threads)
    if dtype == "float64":
        assert_close(got, expected, TOLERANCE[torch.float64], f"{cell}, {dtype}")
    else:
        assert_within(got, expected, bfloat16_bound(steps), f"{cell}, {dtype}")
    assert torch.count_nonzero(got["grad x"][~padding_mask(lengths, steps)]) == 0
    assert packed_calls["calls"] == 1


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_rows_of_equal_length_equal_the_padding_mask(cell):
    """Every row the same length: each step taken by the whole batch (shorter than T: packed; T: no padding)."""
    cls, options = CELLS[cell]
    x = inputs()
    for lengths in (torch.full((B,), 4), torch.full((B,), T)):
        for return_sequences, go_backwards, zero_output_for_mask in CALLS:
            layer = make(cls, options, "float64", return_state=True, return_sequences=return_sequences,
                         go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask)
            what = (f"{cell}, lengths {lengths.tolist()}, return_sequences={return_sequences}, "
                    f"go_backwards={go_backwards}, zero_output_for_mask={zero_output_for_mask}")
            assert_lengths_equal_mask(layer, x, lengths, torch.float64, what, initial_states(layer, torch.float64))


# ----- Bidirectional ---------------------------------------------------------------------------
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul", None])
@pytest.mark.parametrize("cell", ["lstm", "gru reset_after", "simple_rnn"])
def test_bidirectional_lengths_equal_the_padding_mask(cell, merge_mode):
    cls, options = CELLS[cell]
    for return_sequences in (True, False):
        torch.manual_seed(0)
        wrapped = cls(U, dtype="float64", return_sequences=return_sequences, return_state=True, **options)
        layer = randomized(layers.Bidirectional(wrapped, merge_mode=merge_mode, input_shape=D))
        what = f"Bidirectional({cell}), merge_mode={merge_mode}, return_sequences={return_sequences}"
        states = initial_states(layer, torch.float64)
        with lstm.kernels.use("reference"):
            expected = results(layer, inputs(), states, mask=padding_mask(LENGTHS))
        for name in kernels_running(layer.forward_layer, inputs(), lengths=LENGTHS):
            with lstm.kernels.use(name):
                got = results(layer, inputs(), states, lengths=LENGTHS)
            assert_close(got, expected, 1e-10, f"{what}, {name}")
            assert torch.count_nonzero(got["grad x"][~padding_mask(LENGTHS)]) == 0


@pytest.mark.parametrize("cell", ["lstm", "gru reset_after"])
def test_bidirectional_backward_direction_starts_at_each_rows_last_valid_step(cell):
    """Keras' semantics: each direction over a row with padding is the direction over the row
    alone; the backward outputs come back in input order; padded steps output zeros."""
    cls, options = CELLS[cell]
    torch.manual_seed(0)
    layer = randomized(layers.Bidirectional(cls(U, dtype="float64", return_sequences=True, return_state=True,
                                                **options), merge_mode=None, input_shape=D))
    x = inputs()
    y_f, y_b, *states = layer(x, lengths=LENGTHS)
    half = len(states) // 2
    for b, length in enumerate(LENGTHS.tolist()):
        assert not y_f[b, length:].any() and not y_b[b, length:].any(), "padded steps output zeros"
        if length == 0:
            assert not any(s[b].any() for s in states)
            continue
        forward_alone, *forward_states = layer.forward_layer(x[b:b + 1, :length])
        backward_alone, *backward_states = layer.backward_layer(x[b:b + 1, :length])  # go_backwards: reversed
        torch.testing.assert_close(y_f[b, :length], forward_alone[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y_b[b, :length], backward_alone[0].flip(0), rtol=1e-12, atol=1e-12)
        for got, alone in zip(states, forward_states + backward_states):
            torch.testing.assert_close(got[b], alone[0], rtol=1e-12, atol=1e-12)
        assert half == len(forward_states)


# ----- PackedSequence --------------------------------------------------------------------------
PACKED_LENGTHS = torch.tensor([3, 6, 3, 1, 4])  # equal lengths: the rows' order among ties must be the input's


def packings(x: torch.Tensor) -> dict:
    order = PACKED_LENGTHS.argsort(descending=True, stable=True)
    return {
        "unsorted": pack_padded_sequence(x, PACKED_LENGTHS, batch_first=True, enforce_sorted=False),
        "sorted": pack_padded_sequence(x[order], PACKED_LENGTHS[order], batch_first=True),
    }


def assert_same_packing(got, expected, what: str) -> None:
    assert type(got).__name__ == "PackedSequence", f"{what}: got a {type(got).__name__}"
    assert torch.equal(got.batch_sizes, expected.batch_sizes), what
    for indices in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(got, indices), getattr(expected, indices)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{what}: {indices} {a} != {b}"
    torch.testing.assert_close(got.data, expected.data, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


TORCH_LAYERS = {
    "lstm": lambda: layers.LSTM(U, input_dim=D, dtype="float64"),
    "lstm proj_size": lambda: layers.LSTM(U, input_dim=D, dtype="float64", proj_size=3),
    "gru": lambda: layers.GRU(U, input_dim=D, dtype="float64"),
    "simple_rnn": lambda: layers.SimpleRNN(U, input_dim=D, dtype="float64"),
    "bidirectional lstm": lambda: layers.Bidirectional(layers.LSTM(U, dtype="float64"), input_shape=D),
}


@pytest.mark.parametrize("kind", TORCH_LAYERS)
def test_packed_in_packed_out_equals_torch(kind):
    """Outputs, final states and the gradient w.r.t. the packed data, as torch.nn's module on the
    same PackedSequence (after `lstm.to_torch(layer)`)."""
    torch.manual_seed(0)
    layer = TORCH_LAYERS[kind]()
    subs = [layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else [layer]
    for sub in subs:
        sub.return_sequences = sub.return_state = True
    layer.return_sequences = layer.return_state = True
    randomized(layer)
    module = lstm.to_torch(layer)
    for packing, packed in packings(inputs()).items():
        what = f"{kind}, {packing}"
        data = packed.data.clone().requires_grad_()
        ours_in, torch_in = packed._replace(data=data), packed._replace(data=data)
        y, *states = layer(ours_in)
        y_torch, torch_states = module(torch_in)
        torch_states = torch_states if isinstance(torch_states, tuple) else (torch_states,)
        assert_same_packing(y, y_torch, what)
        # torch gives [directions, B, size] per state; this library h (then c) per direction
        by_direction = [s[k] for k in range(len(subs)) for s in torch_states]
        for got, expected in zip(states, by_direction, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
        g = torch.Generator().manual_seed(5)
        cotangent = torch.randn(y.data.shape, generator=g, dtype=torch.float64)
        ours, = torch.autograd.grad((y.data * cotangent).sum(), data)
        theirs, = torch.autograd.grad((y_torch.data * cotangent).sum(), data)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}, gradient: {m}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_from_torch_on_a_packed_sequence_equals_the_torch_module(bidirectional):
    torch.manual_seed(0)
    module = torch.nn.LSTM(D, U, batch_first=True, bidirectional=bidirectional, dtype=torch.float64)
    layer = lstm.from_torch(module)
    subs = [layer.forward_layer, layer.backward_layer] if bidirectional else [layer]
    for sub in (layer, *subs):
        sub.return_state = True
    for packing, packed in packings(inputs()).items():
        y, *states = layer(packed)
        y_torch, (h_n, c_n) = module(packed)
        assert_same_packing(y, y_torch, packing)
        expected = [s[k] for k in range(len(subs)) for s in (h_n, c_n)]
        for got, want in zip(states, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_packed_input_without_return_sequences_gives_tensors_in_batch_order():
    layer = make(layers.LSTM, {}, "float64", return_state=True)
    x = inputs()
    for packing, packed in packings(x).items():
        padded, lengths = pad_packed_sequence(packed, batch_first=True)
        for got, expected in zip(layer(packed), layer(padded, lengths=lengths), strict=True):
            assert torch.equal(got, expected), packing


def test_packed_input_of_a_go_backwards_layer_comes_back_in_input_order():
    """A packing has no processing order: each row's outputs at its own steps, as torch's reverse
    direction gives them (the padded call's outputs, in processing order, flipped back)."""
    layer = make(layers.GRU, {}, "float64", return_sequences=True, go_backwards=True)
    packed = packings(inputs())["unsorted"]
    y, lengths = pad_packed_sequence(layer(packed), batch_first=True)
    padded, _ = pad_packed_sequence(packed, batch_first=True)
    expected = layer(padded, lengths=lengths).flip(1)
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(y[b, :length], expected[b, :length])
        torch.testing.assert_close(y[b, :length], layer(padded[b:b + 1, :length])[0].flip(0), rtol=1e-12,
                                   atol=1e-12)


def test_packed_layers_stack():
    """A packed output is the next layer's packed input, as with torch.nn modules."""
    first = make(layers.LSTM, {}, "float64", return_sequences=True)
    second = make(layers.GRU, {}, "float64", seed=1, return_sequences=True)
    second.build(U)
    x = inputs()
    y = second(first(packings(x)["unsorted"]))
    padded, lengths = pad_packed_sequence(y, batch_first=True)
    direct = second(first(x, lengths=PACKED_LENGTHS), lengths=PACKED_LENGTHS)
    assert torch.equal(lengths, PACKED_LENGTHS)
    assert torch.equal(padded, direct.masked_fill(~padding_mask(PACKED_LENGTHS)[..., None], 0))


@pytest.mark.parametrize("argument", ["mask", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_input_refuses_mask_or_lengths(argument, bidirectional, tally):
    layer = layers.LSTM(U, return_sequences=True)
    layer = layers.Bidirectional(layer) if bidirectional else layer
    packed = packings(inputs(torch.float32))["unsorted"]
    value = padding_mask(PACKED_LENGTHS) if argument == "mask" else PACKED_LENGTHS
    tally["bad input"] += 1
    with pytest.raises(ValueError, match=f"inputs, {argument}: a PackedSequence carries its rows' lengths"):
        layer(packed, **{argument: value})


def test_sequential_takes_a_packed_sequence():
    """A Sequential model that starts with recurrent layers runs a PackedSequence as the padded
    batch with its mask, and passes one on where a layer returns sequences."""
    from lstm.models import Sequential

    torch.manual_seed(0)
    model = Sequential([layers.LSTM(5, return_sequences=True, input_dim=3), layers.GRU(4), layers.Dense(2)])
    x, lengths = torch.randn(3, 6, 3), torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    assert torch.allclose(model(packed), model(x, mask=padding_mask(lengths, steps=6)), atol=1e-6)
    assert type(Sequential([model.layers[0]])(packed)).__name__ == "PackedSequence"


# ----- check_lengths ---------------------------------------------------------------------------
def test_check_lengths_accepts_tensors_lists_and_arrays():
    x = torch.zeros(3, 5, 2)
    for lengths in ([5, 0, 2], np.array([5, 0, 2], dtype=np.int32), torch.tensor([5, 0, 2], dtype=torch.int16)):
        checked = check_lengths(lengths, x)
        assert checked.dtype == torch.int64 and checked.device == x.device
        assert checked.tolist() == [5, 0, 2]
    assert check_lengths(None, x) is None


@pytest.mark.parametrize("lengths, error, message", [
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "lengths: expected integers (each row's number of valid steps), "
                                               "got dtype torch.float32"),
    (np.array([1.5, 2.0, 3.0]), TypeError, "got dtype torch.float64"),
    ([True, False, True], TypeError, "lengths: expected integers (each row's number of valid steps), "
                                     "got dtype torch.bool"),
    ("abc", TypeError, "lengths: expected an integer tensor, list or array, got str"),
    ({"a": 1}, TypeError, "lengths: expected an integer tensor, list or array, got dict"),
    ([1, 2], ValueError, "lengths: expected shape (3,) [batch], got (2,)"),
    ([[1, 2, 3]], ValueError, "lengths: expected shape (3,) [batch], got (1, 3)"),
    (4, ValueError, "lengths: expected shape (3,) [batch], got ()"),
    ([1, 6, 2], ValueError, "lengths: expected each value in [0, 5] (the inputs have 5 timesteps), "
                            "got lengths[1] = 6"),
    ([1, 2, -1], ValueError, "lengths: expected each value in [0, 5] (the inputs have 5 timesteps), "
                             "got lengths[2] = -1"),
], ids=["float tensor", "float array", "bools", "string", "dict", "short", "2-D", "scalar", "too long", "negative"])
def test_check_lengths_errors_name_the_argument_the_expected_and_the_actual(lengths, error, message, tally):
    tally["bad input"] += 1
    with pytest.raises(error) as caught:
        check_lengths(lengths, torch.zeros(3, 5, 2))
    assert message in str(caught.value)


def test_layers_check_lengths_at_the_call(tally):
    x = torch.zeros(3, 5, 2)
    for layer in (layers.LSTM(U), layers.GRU(U), layers.SimpleRNN(U), layers.Bidirectional(layers.LSTM(U))):
        tally["bad input"] += 1
        with pytest.raises(ValueError, match=r"lengths: expected each value in \[0, 5\]"):
            layer(x, lengths=[1, 2, 9])
