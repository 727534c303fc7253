"""Independent check of the maths: the layers equal torch.nn.LSTM / GRU / RNN with converted
weights (PyTorch keeps gate order i,f,g,o for LSTM and r,z,n for GRU, and two biases)."""

import pytest
import torch

from lstm import layers

B, T, D, U = 3, 7, 5, 4


def _one_bias_to_torch(torch_class):
    """LSTM (same gate order i,f,c/g,o) and plain RNN: Keras' single bias becomes bias_ih."""

    def convert(cell):
        m = torch_class(D, U, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            m.weight_ih_l0.copy_(cell.kernel.T)
            m.weight_hh_l0.copy_(cell.recurrent_kernel.T)
            m.bias_ih_l0.copy_(cell.bias)
            m.bias_hh_l0.zero_()
        return m

    return convert


def _gru_to_torch(cell):
    def reorder(w):  # Keras z|r|h -> PyTorch r|z|n
        z, r, h = w.chunk(3, dim=-1)
        return torch.cat([r, z, h], dim=-1)

    m = torch.nn.GRU(D, U, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        m.weight_ih_l0.copy_(reorder(cell.kernel).T)
        m.weight_hh_l0.copy_(reorder(cell.recurrent_kernel).T)
        m.bias_ih_l0.copy_(reorder(cell.bias[0]))
        m.bias_hh_l0.copy_(reorder(cell.bias[1]))
    return m


@pytest.mark.parametrize("layer_class, convert", [(layers.LSTM, _one_bias_to_torch(torch.nn.LSTM)), (layers.GRU, _gru_to_torch),
                                                  (layers.SimpleRNN, _one_bias_to_torch(torch.nn.RNN))])
def test_equals_torch_nn(layer_class, convert):
    torch.manual_seed(1)
    layer = layer_class(U, return_sequences=True, return_state=True, dtype="float64", input_dim=D)
    with torch.no_grad():
        layer.cell.bias.normal_()
    theirs = convert(layer.cell)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    y, *states = layer(x)
    y_ref, state_ref = theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    h_ref = state_ref[0] if isinstance(state_ref, tuple) else state_ref
    torch.testing.assert_close(states[0], h_ref[0], rtol=1e-12, atol=1e-12)
    if isinstance(state_ref, tuple):
        torch.testing.assert_close(states[1], state_ref[1][0], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (grad_ours,) = torch.autograd.grad((y * g).sum(), x)
    (grad_theirs,) = torch.autograd.grad((y_ref * g).sum(), x)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)
