"""The tutorial's example, ported to PyTorch, runs as written and prints the tutorial's config."""

import torch

import lstm
from lstm import layers

# cell.get_config() exactly as the tutorial prints it (../shared/seed/LSTM-tutorial.md)
TUTORIAL_CONFIG = {
    "name": "lstm_cell",
    "trainable": True,
    "dtype": "float32",
    "units": 64,
    "activation": "tanh",
    "recurrent_activation": "sigmoid",
    "use_bias": True,
    "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
    "recurrent_initializer": {"class_name": "Orthogonal", "config": {"gain": 1.0, "seed": None}},
    "bias_initializer": {"class_name": "Zeros", "config": {}},
    "unit_forget_bias": True,
    "kernel_regularizer": None,
    "recurrent_regularizer": None,
    "bias_regularizer": None,
    "kernel_constraint": None,
    "recurrent_constraint": None,
    "bias_constraint": None,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
    "implementation": 2,
}


def test_tutorial_example_runs_as_written():
    lstm.clear_session()
    x = torch.randn(2, 80, 100)
    xt = x[:, 0, :]
    cell = layers.LSTMCell(64)
    state = [torch.zeros(2, 64), torch.zeros(2, 64)]
    out, state = cell(xt, state)
    assert out.shape == (2, 64)
    assert [s.shape for s in state] == [(2, 64), (2, 64)]
    assert torch.equal(out, state[0])
    config = cell.get_config()
    assert config == TUTORIAL_CONFIG
    assert list(config) == list(TUTORIAL_CONFIG)
    assert list(config["recurrent_initializer"]["config"]) == ["gain", "seed"]
    assert layers.LSTMCell(64).name == "lstm_cell_1"


def test_weights_are_parameters_in_keras_layout():
    cell = layers.LSTMCell(64)
    cell(torch.randn(2, 100))
    assert isinstance(cell.kernel, torch.nn.Parameter) and cell.kernel.shape == (100, 256)
    assert isinstance(cell.recurrent_kernel, torch.nn.Parameter) and cell.recurrent_kernel.shape == (64, 256)
    assert isinstance(cell.bias, torch.nn.Parameter) and cell.bias.shape == (256,)
    # unit_forget_bias: the f block (second of i | f | c | o) starts at one, the others at zero
    assert torch.equal(cell.bias[64:128], torch.ones(64))
    assert torch.equal(cell.bias[:64], torch.zeros(64)) and torch.equal(cell.bias[128:], torch.zeros(128))


def test_state_none_means_zeros():
    cell = layers.LSTMCell(8)
    x = torch.randn(3, 5)
    out_none, state_none = cell(x)
    out_zero, state_zero = cell(x, [torch.zeros(3, 8), torch.zeros(3, 8)])
    assert torch.equal(out_none, out_zero) and torch.equal(state_none[1], state_zero[1])


def test_one_step_is_the_tutorials_equations():
    """f, i, C̃, C, o, h computed by hand from the tutorial's formulas, with Keras' gate blocks."""
    torch.manual_seed(0)
    cell = layers.LSTMCell(4, dtype="float64")
    x, h0, c0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    cell.build(5)
    with torch.no_grad():
        cell.bias.normal_()
    out, (h1, c1) = cell(x, [h0, c0])
    W, U, b = cell.kernel, cell.recurrent_kernel, cell.bias
    block = lambda m, k: m[..., 4 * 0 + k * 4: (k + 1) * 4]  # noqa: E731
    gate = lambda k: x @ block(W, k) + h0 @ block(U, k) + block(b, k)  # noqa: E731
    i_t, f_t, c_tilde, o_t = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.tanh(gate(2)), torch.sigmoid(gate(3))
    C_t = f_t * c0 + i_t * c_tilde
    h_t = o_t * torch.tanh(C_t)
    torch.testing.assert_close(c1, C_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1, h_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, h_t, rtol=1e-12, atol=1e-12)


def test_demo_command_runs(capsys):
    from lstm.cli import main

    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert "'implementation': 2}" in printed and "out is h_1: True" in printed
