"""lstm.quantize: int8 weights per output column, x_t and h quantized per row at each step. The
C++ int8 kernel (AMX-INT8, AVX512-VNNI or its integer loop, whichever this CPU runs) against the
reference kernel's maths (problem.quantized_product), and the quantized model's API."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lstm
from lstm import kernels, layers
from lstm.kernels import quantize_columns
from marks import needs_cpp


def _quantized_lstm(units, features, **options):
    layer = layers.LSTM(units, **options)
    layer.build(features)
    if layer.cell.bias is not None:
        with torch.no_grad():  # biases that matter
            layer.cell.bias.normal_(0, 0.3)
    return layer, lstm.quantize(layer)


def _run(layer, x, kernel=None, **call):
    with torch.no_grad():
        if kernel is None:
            return layer(x, **call)
        with kernels.use(kernel):
            return layer(x, **call)


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_column_rule():
    weight = torch.tensor([[1.0, 0.0, -0.5], [-2.0, 0.0, 0.25], [0.5, 0.0, 0.125]])
    matrix = quantize_columns(weight)
    assert matrix.values.dtype is torch.int8 and matrix.scales.dtype is torch.float32
    assert matrix.scales.tolist() == pytest.approx([2 / 127, 0.0, 0.5 / 127])
    # 1 * 127 / 2 = 63.5 and 0.5 * 63.5 = 31.75: halves round to even; a zero column is zeros
    assert matrix.values.tolist() == [[64, 0, -127], [-127, 0, 64], [32, 0, 32]]


def test_row_rule_matches_the_kernels_one_step():
    # T = 1 from zero states: the output is the gates of the x product alone, so the reference's
    # quantized_product (and its exact integer sums) decide it
    torch.manual_seed(0)
    layer, quantized = _quantized_lstm(8, 5, return_state=True)
    x = torch.randn(3, 1, 5)
    expected = _run(quantized, x, "reference")
    for got, want in zip(_run(quantized, x), expected):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


@needs_cpp
@pytest.mark.parametrize("batch, features, units", [
    (1, 1, 1), (3, 5, 8), (4, 63, 16), (5, 64, 20), (17, 65, 33), (37, 100, 20), (64, 130, 64), (33, 8, 130)])
def test_one_step_products_equal_the_reference(batch, features, units):
    # one step from a random state: both products (x's and h's) with every tile and register
    # block shape (partial rows, depths and column blocks), with no feedback through rounding
    torch.manual_seed(batch * 1000 + features + units)
    layer, quantized = _quantized_lstm(units, features, return_state=True)
    x = torch.randn(batch, 1, features)
    state = [torch.randn(batch, units) * 0.5, torch.randn(batch, units)]
    assert kernels.select(quantized.cell.recurrence(x, state)).name == "int8_lstm"
    expected = _run(quantized, x, "reference", initial_state=state)
    for got, want in zip(_run(quantized, x, initial_state=state), expected):
        torch.testing.assert_close(got, want, atol=3e-6, rtol=0)


def _assert_sequence_close(got, want):
    """Equal to the reference but for a rare h element rounded the other way at a half (the
    kernels' gate maths differ by a few ulps): one quantum of h (1/127 of its row's maximum) times
    a weight, carried on."""
    difference = (got - want).abs()
    assert difference.max() <= 5e-3
    assert (difference <= 3e-6).float().mean() >= 0.99


@needs_cpp
@pytest.mark.parametrize("options", [
    {},
    {"go_backwards": True},
    {"zero_output_for_mask": True, "mask": "holes"},
    {"mask": "holes", "go_backwards": True},
    {"return_sequences": False, "mask": "right"},
    {"use_bias": False, "activation": "relu", "recurrent_activation": "hard_sigmoid"},
    {"lengths": True},
])
def test_sequences_equal_the_reference(options):
    torch.manual_seed(7)
    options = dict(options)
    mask_kind, with_lengths = options.pop("mask", None), options.pop("lengths", False)
    sequences = options.pop("return_sequences", True)
    layer, quantized = _quantized_lstm(24, 13, return_state=True, return_sequences=sequences, **options)
    x = torch.randn(9, 11, 13)
    call = {"initial_state": [torch.randn(9, 24) * 0.5, torch.randn(9, 24)]}
    if mask_kind == "holes":
        call["mask"] = torch.rand(9, 11) > 0.3
    elif mask_kind == "right":
        call["mask"] = torch.arange(11)[None] < torch.randint(0, 12, (9, 1))
    if with_lengths:
        call["lengths"] = torch.randint(0, 12, (9,))
    for got, want in zip(_run(quantized, x, **call), _run(quantized, x, "reference", **call)):
        _assert_sequence_close(got, want)


@needs_cpp
def test_long_sequence_with_threads():
    torch.manual_seed(3)
    layer, quantized = _quantized_lstm(64, 40, return_sequences=True)
    x = torch.randn(20, 60, 40)
    _assert_sequence_close(_run(quantized, x), _run(quantized, x, "reference"))


def test_quantized_model_stays_close_to_float():
    torch.manual_seed(4)
    model = lstm.Sequential([layers.LSTM(32, return_sequences=True), layers.Bidirectional(layers.LSTM(16)),
                             layers.Dense(3)])
    x = torch.randn(6, 12, 10)
    with torch.no_grad():
        expected = model(x)
    quantized = lstm.quantize(model)
    assert quantized is not model and model.layers[0].cell.quantized_weights() is None
    with torch.no_grad():
        got = quantized(x)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    cell = quantized.layers[0].cell
    assert not cell.kernel.requires_grad
    kernel, recurrent_kernel = cell.quantized_weights()
    # the float parameters hold the matrices the model runs with
    torch.testing.assert_close(cell.kernel, kernel.values.float() * kernel.scales, atol=0, rtol=0)
    torch.testing.assert_close(cell.recurrent_kernel, recurrent_kernel.values.float() * recurrent_kernel.scales,
                               atol=0, rtol=0)


def test_cell_call_and_stream_run_the_quantized_maths():
    torch.manual_seed(5)
    layer, quantized = _quantized_lstm(12, 6, return_sequences=True)
    x = torch.randn(2, 8, 6)
    full = _run(quantized, x)
    cell = quantized.cell
    h, c = torch.zeros(2, 12), torch.zeros(2, 12)
    with torch.no_grad():
        outputs = []
        for t in range(8):
            out, (h, c) = cell(x[:, t], [h, c])
            outputs.append(out)
    _assert_sequence_close(torch.stack(outputs, 1), full)
    stream = quantized.stream(batch_size=2)
    _assert_sequence_close(torch.stack([stream.step(x[:, t]) for t in range(8)], 1), full)


@needs_cpp
def test_cell_call_and_stream_take_the_int8_one_step_routes():
    torch.manual_seed(9)
    layer, quantized = _quantized_lstm(12, 6)
    cell = quantized.cell
    x, h, c = torch.randn(3, 6), torch.randn(3, 12), torch.randn(3, 12)
    with torch.no_grad():
        out, (h1, c1) = cell(x, [h, c])
        assert cell._lean_call  # the one C++ call, not the full route
        with kernels.use("reference"):
            expected, (h2, c2) = cell(x, [h, c])
    for got, want in ((out, expected), (h1, h2), (c1, c2)):
        torch.testing.assert_close(got, want, atol=3e-6, rtol=0)
    stream = quantized.stream(batch_size=3)
    assert type(stream._fast).__name__ == "Int8LSTMStep"
    stream.reset([h, c])
    torch.testing.assert_close(stream.step(x), expected, atol=3e-6, rtol=0)
    torch.testing.assert_close(stream.state[1], c2, atol=3e-6, rtol=0)
    with pytest.raises(ValueError, match=r"x_t: expected shape \(3, 6\)"):
        stream.step(torch.randn(3, 5))
    # float64 input: converted by the stream, as for the float32 step
    again = quantized.stream(batch_size=3)
    again.reset([h1, c1])
    torch.testing.assert_close(stream.step(x.double()), again.step(x))


def test_state_dict_and_pickle_round_trip():
    torch.manual_seed(6)
    model = lstm.Sequential([layers.LSTM(16), layers.Dense(2)])
    x = torch.randn(3, 5, 4)
    model(x)
    quantized = lstm.quantize(model)
    state = quantized.state_dict()
    assert state["layers.0.cell.kernel_int8"].dtype is torch.int8 and "layers.0.cell.recurrent_kernel_scales" in state
    other = lstm.quantize(copy.deepcopy(model))
    with torch.no_grad():
        other.layers[0].cell.kernel_int8.zero_()  # in place: the kernel's packed copy follows it
        changed = other(x)
    other.load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(quantized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = quantized(x)
        assert not torch.equal(changed, expected)
        torch.testing.assert_close(other(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


def test_training_mode_and_gradients_take_the_reference():
    torch.manual_seed(8)
    layer, quantized = _quantized_lstm(8, 4, dropout=0.5)
    x = torch.randn(2, 3, 4, requires_grad=True)
    problem = quantized.cell.recurrence(x, [torch.zeros(2, 8)] * 2)
    assert kernels.select(problem).name == "reference"
    quantized.train()
    quantized(x).sum().backward()  # dropout drawn, the reference's int8 products
    assert x.grad is not None


def test_what_it_quantizes_and_refuses():
    model = lstm.Sequential([layers.GRU(4, return_sequences=True), layers.LSTM(4, peephole=True,
                                                                             return_sequences=True), layers.LSTM(3)])
    model(torch.randn(2, 3, 5))
    with pytest.warns(UserWarning, match="GRUCell 'gru.*LSTMCell 'lstm"):
        quantized = lstm.quantize(model)
    cells = [layer.cell for layer in quantized.layers]
    assert [c.quantized_weights() is not None for c in cells] == [False, False, True]
    with pytest.warns(UserWarning, match="GRUCell"):  # the quantized cell is left as it is, no error
        again = lstm.quantize(quantized)
    assert again.layers[2].cell.quantized_weights() is not None
    with pytest.raises(ValueError, match="no LSTM layer to quantize.*GRUCell"):
        lstm.quantize(layers.GRU(3, input_dim=2), inplace=True)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got list"):
        lstm.quantize([])
    broken = layers.LSTM(3, input_dim=2)
    with torch.no_grad():
        broken.cell.kernel[0, 0] = float("nan")
    with pytest.raises(ValueError, match="kernel: expected finite values to quantize, got 1 infinite or NaN"):
        lstm.quantize(broken)
