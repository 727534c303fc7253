"""Streaming inference (`layer.stream()`, `cell.stream()`) equals the layer on the whole sequence."""

from __future__ import annotations

import pytest
import torch

from lstm import layers


def _full(layer, x, initial_state=None):
    with torch.no_grad():
        return layer(x, initial_state=initial_state)


@pytest.mark.parametrize("layer_cls, kwargs", [
    (layers.LSTM, {}),
    (layers.LSTM, {"activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    (layers.LSTM, {"use_bias": False}),
    (layers.GRU, {}),
    (layers.GRU, {"reset_after": False}),
    (layers.SimpleRNN, {}),
    (layers.LSTM, {"activation": "softsign"}),  # not fused: steps through the kernels
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 12])
def test_stream_equals_layer(layer_cls, kwargs, dtype, batch):
    torch.manual_seed(0)
    dtype_name = "float64" if dtype == torch.float64 else "float32"
    layer = layer_cls(7, return_sequences=True, dtype=dtype_name, input_shape=(None, 5), **kwargs)
    x = torch.randn(batch, 9, 5, dtype=dtype)
    if layer.cell.bias is not None:
        with torch.no_grad():
            layer.cell.bias.uniform_(-0.5, 0.5)
    expected = _full(layer, x)
    s = layer.stream(batch_size=batch)
    got = torch.stack([s.step(x[:, t]) for t in range(x.shape[1])], dim=1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=tol, rtol=tol)
    # the state is the layer's final state
    full_state = layer_cls(7, return_state=True, dtype=dtype_name, input_shape=(None, 5), **kwargs)
    full_state.set_weights(layer.get_weights())
    with torch.no_grad():
        _, *states = full_state(x)
    for a, b in zip(s.state, states):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    # reset goes back to zeros
    s.reset()
    assert all(float(t.abs().max()) == 0 for t in s.state)
    again = s.step(x[:, 0])
    assert torch.allclose(again, expected[:, 0], atol=tol, rtol=tol)


def test_stream_batch_one_accepts_vectors_and_numpy():
    torch.manual_seed(1)
    layer = layers.LSTM(4, return_sequences=True)
    x = torch.randn(1, 6, 3)
    expected = _full(layer, x)
    s = layer.stream()
    outs = [s.step(x[0, 0]), s.step(x[0, 1].numpy())]
    outs += [s(x[0, t]) for t in range(2, 6)]
    got = torch.stack(outs, dim=1)
    assert got.shape == (1, 6, 4)
    assert torch.allclose(got, expected, atol=1e-5)
    # outputs are fresh tensors, not views of an internal buffer
    assert not torch.equal(outs[0], outs[1])


def test_stream_from_initial_and_stateful_state():
    torch.manual_seed(2)
    layer = layers.LSTM(4, return_sequences=True, stateful=True)
    x1, x2 = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    with torch.no_grad():
        layer(x1)
        expected = layer(x2)
    layer.reset_state()
    with torch.no_grad():
        layer(x1)
    s = layer.stream(batch_size=2)
    got = torch.stack([s.step(x2[:, t]) for t in range(4)], dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    h, c = torch.randn(2, 4), torch.randn(2, 4)
    s.reset([h, c])
    assert torch.allclose(s.state[0], h) and torch.allclose(s.state[1], c)


def test_cell_stream_equals_cell_calls():
    torch.manual_seed(3)
    cell = layers.LSTMCell(5)
    x = torch.randn(2, 6, 3)
    s = cell.stream(batch_size=2)  # lazy cell: built by the first step
    got = [s.step(x[:, t]) for t in range(6)]
    states = None
    with torch.no_grad():
        for t in range(6):
            out, states = cell(x[:, t], states, training=False)
            assert torch.allclose(got[t], out, atol=1e-5)


def test_stream_follows_weight_updates():
    torch.manual_seed(4)
    layer = layers.GRU(4, return_sequences=True)
    x = torch.randn(1, 3, 2)
    _full(layer, x)
    s = layer.stream()
    s.step(x[:, 0])
    with torch.no_grad():
        layer.cell.kernel.mul_(2.0)
    s.reset()
    got = torch.stack([s.step(x[:, t]) for t in range(3)], dim=1)
    assert torch.allclose(got, _full(layer, x), atol=1e-5)


def test_stream_rejects_go_backwards_and_bad_shapes():
    layer = layers.LSTM(4, go_backwards=True, input_shape=(None, 3))
    with pytest.raises(ValueError, match="go_backwards"):
        layer.stream()
    s = layers.LSTM(4, input_shape=(None, 3)).stream(batch_size=2)
    with pytest.raises(ValueError):
        s.step(torch.randn(3, 3))
    with pytest.raises(ValueError):
        layers.LSTM(4).stream(batch_size=0)
