"""lstm.to_torch / lstm.from_torch: same outputs, final states and gradients both ways (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lstm
from lstm import layers

ATOL = 1e-10
LAYERS = {"lstm": layers.LSTM, "gru": layers.GRU, "simple_rnn": layers.SimpleRNN}
TORCH = {"lstm": nn.LSTM, "gru": nn.GRU, "simple_rnn": nn.RNN}


def randomize(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def keras_to_torch_grad(kind: str, units: int, grad: torch.Tensor, transpose: bool) -> torch.Tensor:
    if kind == "gru":
        grad = torch.cat([grad[..., units:2 * units], grad[..., :units], grad[..., 2 * units:]], dim=-1)
    return grad.t() if transpose else grad


def close(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} != {tuple(b.shape)}"
    error = float((a - b).detach().abs().max()) if a.numel() else 0.0
    assert error <= ATOL, f"{what}: max error {error:.3g}"


def cell_grads_match(kind, cell, torch_module, suffix, what):
    units = cell.units
    close(keras_to_torch_grad(kind, units, cell.kernel.grad, True), getattr(torch_module, "weight_ih" + suffix).grad,
          f"{what} kernel grad")
    close(keras_to_torch_grad(kind, units, cell.recurrent_kernel.grad, True),
          getattr(torch_module, "weight_hh" + suffix).grad, f"{what} recurrent_kernel grad")
    if cell.use_bias:
        b_ih, b_hh = getattr(torch_module, "bias_ih" + suffix).grad, getattr(torch_module, "bias_hh" + suffix).grad
        if kind == "gru":
            close(keras_to_torch_grad(kind, units, cell.bias.grad[0], False), b_ih, f"{what} bias[0] grad")
            close(keras_to_torch_grad(kind, units, cell.bias.grad[1], False), b_hh, f"{what} bias[1] grad")
        else:  # one Keras bias = bias_ih + bias_hh: both get its gradient
            close(cell.bias.grad, b_ih, f"{what} bias grad (ih)")
            close(cell.bias.grad, b_hh, f"{what} bias grad (hh)")


def run_both(ours_fn, torch_module, x, batch_first=True):
    x_ours = x.clone().requires_grad_(True)
    x_torch = x.clone().requires_grad_(True)
    ours = ours_fn(x_ours)
    theirs, _ = torch_module(x_torch if batch_first else x_torch.transpose(0, 1))
    if not batch_first:
        theirs = theirs.transpose(0, 1)
    close(ours, theirs, "outputs")
    weights = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(7))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    close(x_ours.grad, x_torch.grad, "input grad")


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_to_torch_layer(kind, use_bias):
    layer = LAYERS[kind](5, return_sequences=True, return_state=True, use_bias=use_bias, input_dim=3, dtype="float64")
    randomize(layer, 1)
    module = lstm.to_torch(layer)
    assert isinstance(module, TORCH[kind]) and module.batch_first and module.num_layers == 1
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    out, *states = layer(x)
    torch_out, torch_states = module(x)
    close(out, torch_out, "outputs")
    torch_states = list(torch_states) if isinstance(torch_states, tuple) else [torch_states]
    for ours, theirs in zip(states, torch_states):
        close(ours, theirs[0], "final state")
    run_both(lambda v: layer(v)[0], module, x)
    cell_grads_match(kind, layer.cell, module, "_l0", kind)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_to_torch_bidirectional_and_stacks(kind):
    cls = LAYERS[kind]
    model = lstm.Sequential([
        layers.Bidirectional(cls(4, return_sequences=True, dtype="float64"), input_shape=(None, 3)),
        layers.Bidirectional(cls(4, return_sequences=True, dtype="float64"), input_shape=(None, 8)),
    ])
    randomize(model, 2)
    module = lstm.to_torch(model)
    assert module.bidirectional and module.num_layers == 2
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    run_both(lambda v: model(v), module, x)
    for k, bi in enumerate(model.layers):
        cell_grads_match(kind, bi.forward_layer.cell, module, f"_l{k}", f"{kind} l{k} forward")
        cell_grads_match(kind, bi.backward_layer.cell, module, f"_l{k}_reverse", f"{kind} l{k} backward")


def test_to_torch_stack_list_with_dropout():
    stack = [layers.LSTM(4, return_sequences=True, input_dim=2, dtype="float64"), layers.Dropout(0.25),
             layers.LSTM(4, return_sequences=True, input_dim=4, dtype="float64")]
    module = lstm.to_torch(stack)
    assert module.num_layers == 2 and module.dropout == 0.25
    module.eval()
    model = lstm.Sequential(stack).eval()
    run_both(lambda v: model(v), module, torch.randn(2, 4, 2, dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_to_torch_cell(kind):
    cell = {"lstm": layers.LSTMCell, "gru": layers.GRUCell, "simple_rnn": layers.SimpleRNNCell}[kind](
        5, input_dim=3, dtype="float64")
    randomize(cell, 3)
    module = lstm.to_torch(cell)
    x = torch.randn(2, 3, dtype=torch.float64)
    states = [torch.randn(2, 5, dtype=torch.float64) for _ in range(cell.state_count)]
    out, new = cell(x, states)
    theirs = module(x, tuple(states) if kind == "lstm" else states[0])
    theirs = list(theirs) if isinstance(theirs, tuple) else [theirs]
    close(out, theirs[0], "cell output")
    for ours, other in zip(new, theirs):
        close(ours, other, "cell state")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", sorted(TORCH))
def test_from_torch(kind, num_layers, bidirectional, batch_first):
    module = TORCH[kind](3, 5, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                         dtype=torch.float64)
    randomize(module, 4)
    converted = lstm.from_torch(module)
    if num_layers > 1:
        assert isinstance(converted, lstm.Sequential) and len(converted) == num_layers
        ours_layers = list(converted.layers)
    else:
        assert isinstance(converted, layers.Bidirectional if bidirectional else LAYERS[kind])
        ours_layers = [converted]
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    run_both(lambda v: converted(v), module, x, batch_first=batch_first)
    for k, layer in enumerate(ours_layers):
        if bidirectional:
            cell_grads_match(kind, layer.forward_layer.cell, module, f"_l{k}", f"l{k} forward")
            cell_grads_match(kind, layer.backward_layer.cell, module, f"_l{k}_reverse", f"l{k} backward")
        else:
            cell_grads_match(kind, layer.cell, module, f"_l{k}", f"l{k}")


def test_from_torch_options():
    rnn = nn.RNN(2, 3, nonlinearity="relu", bias=False, dtype=torch.float64)
    layer = lstm.from_torch(rnn)
    assert layer.cell.activation == "relu" and not layer.cell.use_bias
    run_both(lambda v: layer(v), rnn, torch.randn(2, 4, 2, dtype=torch.float64), batch_first=False)
    dropped = lstm.from_torch(nn.LSTM(2, 3, num_layers=3, dropout=0.5))
    assert [type(m).__name__ for m in dropped.layers] == ["LSTM", "Dropout", "LSTM", "Dropout", "LSTM"]
    assert dropped.layers[0].cell.kernel.dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(TORCH))
def test_from_torch_cell(kind):
    module = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "simple_rnn": nn.RNNCell}[kind](3, 4, dtype=torch.float64)
    randomize(module, 5)
    cell = lstm.from_torch(module)
    x = torch.randn(2, 3, dtype=torch.float64)
    states = [torch.randn(2, 4, dtype=torch.float64) for _ in range(cell.state_count)]
    out, _ = cell(x, states)
    theirs = module(x, tuple(states) if kind == "lstm" else states[0])
    close(out, theirs[0] if isinstance(theirs, tuple) else theirs, "cell output")


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_round_trip_exact(kind):
    layer = LAYERS[kind](4, return_sequences=True, input_dim=3)
    randomize(layer, 6)
    back = lstm.from_torch(lstm.to_torch(layer))
    for a, b in zip(layer.get_weights(), back.get_weights()):
        assert np.array_equal(a, b)


def test_conversion_errors():
    with pytest.raises(ValueError, match="peephole"):
        lstm.to_torch(layers.LSTM(3, peephole=True, input_dim=2))
    with pytest.raises(ValueError, match="proj_size"):
        lstm.to_torch(layers.LSTMCell(3, proj_size=2, input_dim=2))
    with pytest.raises(ValueError, match="hard_sigmoid"):
        lstm.to_torch(layers.LSTM(3, recurrent_activation="hard_sigmoid", input_dim=2))
    with pytest.raises(ValueError, match="reset_after"):
        lstm.to_torch(layers.GRU(3, reset_after=False, input_dim=2))
    with pytest.raises(ValueError, match="merge_mode"):
        lstm.to_torch(layers.Bidirectional(layers.LSTM(3), merge_mode="sum", input_shape=(None, 2)))
    with pytest.raises(ValueError, match="go_backwards"):
        lstm.to_torch(layers.LSTM(3, go_backwards=True, input_dim=2))
    with pytest.raises(ValueError, match="no weights yet"):
        lstm.to_torch(layers.LSTM(3))
    with pytest.raises(ValueError, match="same kind"):
        lstm.to_torch([layers.LSTM(3, return_sequences=True, input_dim=2), layers.GRU(3, input_dim=3)])
    with pytest.raises(ValueError, match="return_sequences"):
        lstm.to_torch([layers.LSTM(3, input_dim=2), layers.LSTM(3, input_dim=3)])
    with pytest.raises(ValueError, match="dropout"):
        lstm.to_torch(layers.LSTM(3, dropout=0.2, input_dim=2))
    with pytest.raises(TypeError):
        lstm.from_torch(nn.Linear(2, 3))
