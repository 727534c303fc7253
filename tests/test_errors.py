"""Bad input (issue "foundation" §5): every mistake raises ValueError or TypeError whose message
names the argument, the expected and the actual value; and the defined edge cases (B=0, T=0).
Each bad input is counted into the reliability summary (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TALLY
from lstm import layers, models
from lstm.layers import GRU, LSTM, Bidirectional, GRUCell, LSTMCell, SimpleRNN, SimpleRNNCell


def raises(error, *fragments):
    """pytest.raises that also checks every fragment is in the message."""

    class Check:
        def __enter__(self):
            TALLY["bad input"] += 1
            self.ctx = pytest.raises(error)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return result

    return Check()


# ----- inputs ----------------------------------------------------------------------------------
def test_layer_needs_3d_inputs():
    layer = LSTM(3)
    with raises(ValueError, "inputs", "3-D", "(4, 5)"):
        layer(torch.randn(4, 5))
    with raises(ValueError, "inputs", "3-D", "(1, 2, 3, 4)"):
        layer(torch.randn(1, 2, 3, 4))


def test_cell_needs_2d_inputs():
    cell = LSTMCell(3)
    with raises(ValueError, "inputs", "2-D", "(4, 5, 2)"):
        cell(torch.randn(4, 5, 2))


@pytest.mark.parametrize("make", [lambda: LSTM(3, input_dim=4), lambda: GRU(3, input_dim=4),
                                  lambda: SimpleRNN(3, input_dim=4)])
def test_feature_size_differs_from_built(make):
    layer = make()
    with raises(ValueError, "inputs", "expected 4 features", "got 6"):
        layer(torch.randn(2, 5, 6))


def test_feature_size_differs_after_lazy_build():
    layer = LSTM(3)
    layer(torch.randn(2, 5, 4))
    with raises(ValueError, "inputs", "expected 4 features", "got 2"):
        layer(torch.randn(2, 5, 2))
    cell = GRUCell(2)
    cell(torch.randn(2, 4))
    with raises(ValueError, "expected 4 features", "got 3"):
        cell(torch.randn(2, 3))


def test_int_inputs():
    with raises(TypeError, "inputs", "floating-point", "int64"):
        LSTM(3)(torch.ones(2, 3, 4, dtype=torch.int64))
    with raises(TypeError, "inputs", "floating-point", "int"):
        LSTMCell(3)(np.ones((2, 4), dtype=np.int32))


def test_complex_and_bool_inputs():
    with raises(TypeError, "inputs", "floating-point", "complex64"):
        LSTM(3)(torch.ones(2, 3, 4, dtype=torch.complex64))
    with raises(TypeError, "inputs", "floating-point", "bool"):
        GRU(3)(torch.ones(2, 3, 4, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_tensors_without_dense_data():
    x = torch.randn(2, 3, 4)
    with raises(TypeError, "inputs", "dense (strided)", "sparse_coo"):
        LSTM(3)(x.to_sparse())
    with raises(TypeError, "inputs", "dense (strided)", "nested"):
        GRU(3)(torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(2, 4)]))
    with raises(ValueError, "inputs", "meta device"):
        LSTM(3)(torch.empty(2, 3, 4, device="meta"))
    with raises(ValueError, "mask", "meta device"):
        LSTM(3)(x, mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with raises(ValueError, "initial_state[0]", "meta device"):
        SimpleRNN(3)(x, initial_state=torch.empty(2, 3, device="meta"))


def test_inputs_on_another_device_than_the_weights():
    layer = LSTM(3, input_dim=4).to("meta")  # the one other device every machine has
    with raises(ValueError, "inputs", "the layer's device meta", "on cpu", "layer.to(device)"):
        layer(torch.randn(2, 3, 4))


@pytest.mark.parametrize("inputs,fragments", [
    ("abc", ("inputs", "str")), (None, ("inputs", "NoneType")), ([[[1.0] * 4] * 3, [[1.0] * 4] * 2], ("inputs", "list")),
    (torch.ones(2, 3, 4, dtype=torch.bool), ("inputs", "bool")), (torch.randn(2, 3, 4, dtype=torch.complex64),
                                                                  ("inputs", "complex64")),
    (torch.tensor(1.0), ("inputs", "3-D", "()")),
])
def test_inputs_that_are_not_float_sequences(inputs, fragments):
    with pytest.raises((ValueError, TypeError)) as info:
        TALLY["bad input"] += 1
        LSTM(3)(inputs)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_mask_that_is_not_an_array():
    with raises(TypeError, "mask", "bool or integer", "str"):
        LSTM(3)(torch.randn(2, 3, 4), mask="abc")


def test_stream_bad_steps():
    stream = LSTM(3, input_dim=4).stream(batch_size=2)
    with raises(ValueError, "x_t", "(2, 4)", "2, 5"):
        stream.step(torch.randn(2, 5))
    with raises(ValueError, "batch_size", "positive", "0"):
        LSTM(3, input_dim=4).stream(batch_size=0)


# ----- initial_state ---------------------------------------------------------------------------
def test_initial_state_wrong_count():
    x = torch.randn(2, 3, 4)
    with raises(ValueError, "initial_state", "expected 2", "[h, c]", "got 1"):
        LSTM(3)(x, initial_state=[torch.zeros(2, 3)])
    with raises(ValueError, "initial_state", "expected 2", "got 3"):
        LSTM(3)(x, initial_state=[torch.zeros(2, 3)] * 3)
    with raises(ValueError, "initial_state", "expected 1", "[h]", "got 2"):
        GRU(3)(x, initial_state=[torch.zeros(2, 3)] * 2)
    with raises(ValueError, "states", "expected 2", "got 1"):
        LSTMCell(3)(torch.randn(2, 4), [torch.zeros(2, 3)])


def test_initial_state_wrong_shape():
    x = torch.randn(2, 3, 4)
    with raises(ValueError, "initial_state[1]", "(2, 3)", "(2, 5)"):
        LSTM(3)(x, initial_state=[torch.zeros(2, 3), torch.zeros(2, 5)])
    with raises(ValueError, "initial_state[0]", "(2, 3)", "(1, 3)"):
        SimpleRNN(3)(x, initial_state=torch.zeros(1, 3))
    with raises(ValueError, "states[0]", "(2, 3)", "(3,)"):
        GRUCell(3)(torch.randn(2, 4), torch.zeros(3))


def test_initial_state_wrong_dtype():
    x = torch.randn(2, 3, 4)
    with raises(TypeError, "initial_state[1]", "floating-point", "int64"):
        LSTM(3)(x, initial_state=[torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)])


def test_bidirectional_initial_state_odd_count():
    model = Bidirectional(LSTM(3))
    with raises(ValueError, "initial_state", "even", "got 3"):
        model(torch.randn(2, 3, 4), initial_state=[torch.zeros(2, 3)] * 3)
    with raises(ValueError, "initial_state", "expected 2", "got 1"):
        model(torch.randn(2, 3, 4), initial_state=[torch.zeros(2, 3)] * 2)


# ----- mask ------------------------------------------------------------------------------------
def test_mask_wrong_shape():
    x = torch.randn(2, 3, 4)
    with raises(ValueError, "mask", "(2, 3)", "(2, 4)"):
        LSTM(3)(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with raises(ValueError, "mask", "(2, 3)", "(2, 3, 4)"):
        LSTM(3)(x, mask=torch.ones(2, 3, 4, dtype=torch.bool))


def test_mask_float_dtype():
    with raises(TypeError, "mask", "bool or integer", "float32"):
        LSTM(3)(torch.randn(2, 3, 4), mask=torch.ones(2, 3))


# ----- constructor arguments -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LSTM, GRU, SimpleRNN, LSTMCell, GRUCell, SimpleRNNCell])
def test_unknown_names(cls):
    with raises(ValueError, "activation", "unknown activation", "'swoosh'"):
        cls(3, activation="swoosh")
    with raises(ValueError, "kernel_initializer", "unknown initializer", "'glorot_unifrom'", "glorot_uniform"):
        cls(3, kernel_initializer="glorot_unifrom")
    with raises(ValueError, "bias_regularizer", "unknown regularizer", "'l3'", "l1_l2"):
        cls(3, bias_regularizer="l3")
    with raises(ValueError, "recurrent_constraint", "unknown constraint", "'positive'", "non_neg"):
        cls(3, recurrent_constraint="positive")
    with raises(TypeError, "kernel_initializer", "got int"):
        cls(3, kernel_initializer=3)


@pytest.mark.parametrize("cls, torch_name, size_arguments", [
    (LSTM, "LSTM", "input_dim= / input_shape="), (GRU, "GRU", "input_dim= / input_shape="),
    (SimpleRNN, "RNN", "input_dim= / input_shape="), (LSTMCell, "LSTMCell", "input_dim="),
    (GRUCell, "GRUCell", "input_dim="), (SimpleRNNCell, "RNNCell", "input_dim="),
    (layers.Dense, "Linear", "input_dim= / input_shape=")])
def test_torch_argument_order_says_how_the_layer_is_sized(cls, torch_name, size_arguments):
    # torch.nn's (input size, output size) puts the output size where these layers take activation
    name = cls.__name__
    with raises(TypeError, "activation: expected an activation name or a callable, got the int 64",
                f"{name} takes one size, units (its output size)", "finds its input size on its first call",
                f"(or from {size_arguments})", f"torch.nn.{torch_name}(100, 64) is layers.{name}(64) here",
                f"layers.{name}(64, input_dim=100)"):
        cls(100, 64)
    with raises(TypeError, "activation", "got the int 3", f"torch.nn.{torch_name}(8, 3)"):
        cls(8, activation=np.int64(3))
    with raises(TypeError, "activation", "got bool"):  # a bool is no size
        cls(8, True)


def test_unknown_recurrent_activation_and_activity_regularizer():
    with raises(ValueError, "recurrent_activation", "'sigmoidal'"):
        LSTM(3, recurrent_activation="sigmoidal")
    with raises(ValueError, "activity_regularizer", "'l5'"):
        GRU(3, activity_regularizer="l5")
    with raises(ValueError, "kernel_initializer", "unknown keys", "stddev"):
        LSTM(3, kernel_initializer={"class_name": "GlorotUniform", "config": {"stddev": 1.0}})


@pytest.mark.parametrize("units", [0, -3])
def test_units_below_one(units):
    with raises(ValueError, "units", "positive integer", repr(units)):
        LSTM(units)


@pytest.mark.parametrize("units", [2.5, "4", None, True])
def test_units_not_an_int(units):
    with pytest.raises((ValueError, TypeError)) as info:
        GRUCell(units)
    assert "units" in str(info.value) and repr(units) in str(info.value)


@pytest.mark.parametrize("argument", ["dropout", "recurrent_dropout"])
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_outside_range(argument, rate):
    with raises(ValueError, argument, "[0, 1)", str(rate)):
        LSTM(3, **{argument: rate})


def test_dropout_not_a_number():
    with raises(TypeError, "dropout", "[0, 1)", "'0.5'"):
        SimpleRNN(3, dropout="0.5")


@pytest.mark.parametrize("implementation", [0, 3, "2", 2.0, True])
def test_implementation_not_1_or_2(implementation):
    with raises(ValueError, "implementation", "1 or 2", repr(implementation)):
        LSTM(3, implementation=implementation)


def test_bad_dtype_and_seed():
    with raises(ValueError, "dtype", "mixed_bfloat16", "'int8'"):
        LSTM(3, dtype="int8")
    with raises(ValueError, "dtype", "torch.int32"):
        GRUCell(3, dtype=torch.int32)
    with raises(ValueError, "dtype", "DTypePolicy", "'QuantizedDTypePolicy'"):
        SimpleRNN(3, dtype={"class_name": "QuantizedDTypePolicy", "config": {"name": "int8_from_float32"}})
    with raises(TypeError, "seed", "1.5"):
        LSTM(3, seed=1.5)


# ----- weights and configs ---------------------------------------------------------------------
def test_set_weights_wrong_count():
    layer = LSTM(3, input_dim=4)
    w = layer.get_weights()
    with raises(ValueError, "set_weights", "expected 3", "got 2"):
        layer.set_weights(w[:2])
    with raises(ValueError, "set_weights", "expected 2", "got 3"):
        LSTM(3, input_dim=4, use_bias=False).set_weights(w)
    with raises(ValueError, "set_weights", "expected forward then backward", "got 3"):
        Bidirectional(LSTM(3), input_shape=(None, None, 4)).set_weights(w)


def test_set_weights_wrong_shapes():
    layer = LSTM(3, input_dim=4)
    k, r, b = layer.get_weights()
    with raises(ValueError, "set_weights", "kernel", "(4, 12)", "(5, 12)"):
        layer.set_weights([np.zeros((5, 12)), r, b])
    with raises(ValueError, "recurrent_kernel", "(3, 12)", "(3, 9)"):
        layer.set_weights([k, np.zeros((3, 9)), b])
    with raises(ValueError, "bias", "(2, 9)", "(9,)"):
        GRU(3, input_dim=4).set_weights([np.zeros((4, 9)), np.zeros((3, 9)), np.zeros(9)])
    before = layer.get_weights()
    with pytest.raises(ValueError):
        layer.set_weights([k + 1, r + 1, np.zeros(5)])
    assert np.array_equal(layer.get_weights()[2], before[2])


def test_from_config_unknown_keys():
    config = LSTM(3).get_config()
    with raises(ValueError, "config", "unknown keys", "['frobnicate']", "LSTM"):
        LSTM.from_config({**config, "frobnicate": 1})
    with raises(ValueError, "config", "unknown keys", "['reset_after']", "LSTMCell"):
        LSTMCell.from_config({**LSTMCell(2).get_config(), "reset_after": True})
    with raises(ValueError, "config", "unknown keys", "['extra']", "Bidirectional"):
        Bidirectional.from_config({**Bidirectional(GRU(2)).get_config(), "extra": 0})
    with raises(ValueError, "time_major"):
        LSTM.from_config({**config, "time_major": True})


def test_nested_config_errors_name_the_key_path():
    wrapped = Bidirectional(LSTM(3)).get_config()
    wrapped["layer"]["config"]["bogus"] = 1
    with raises(ValueError, "config['layer']['config']: unknown keys ['bogus'] for LSTM"):
        Bidirectional.from_config(wrapped)
    model = models.Sequential([LSTM(3, input_dim=2), layers.Dense(1)]).get_config()
    model["layers"][1]["config"]["units"] = -1
    with raises(ValueError, "config['layers'][1]['config']: units", "-1"):
        models.Sequential.from_config(model)
    rnn = layers.RNN(LSTMCell(2)).get_config()
    rnn["cell"]["config"]["zzz"] = 0
    with raises(ValueError, "config['cell']['config']: unknown keys ['zzz'] for LSTMCell"):
        layers.RNN.from_config(rnn)
    with raises(ValueError, "config['layers'][0]: expected {'class_name'"):
        models.Sequential.from_config({"layers": [{"config": {}}]})


def test_bidirectional_bad_arguments():
    with raises(ValueError, "layer", "go_backwards=False"):
        Bidirectional(LSTM(3, go_backwards=True))
    with raises(ValueError, "merge_mode", "'concat'", "'max'"):
        Bidirectional(LSTM(3), merge_mode="max")
    with raises(TypeError, "layer", "LSTMCell"):
        Bidirectional(LSTMCell(3))
    with raises(ValueError, "backward_layer", "go_backwards=True", "False"):
        Bidirectional(LSTM(3), backward_layer=LSTM(3))


# ----- edge cases: empty batch and zero timesteps ----------------------------------------------
@pytest.mark.parametrize("cls,states", [(LSTM, 2), (GRU, 1), (SimpleRNN, 1)])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_empty_batch(cls, states, return_sequences):
    layer = cls(3, input_dim=4, return_sequences=return_sequences, return_state=True,
                activity_regularizer="l2", dropout=0.2)
    x = torch.randn(0, 5, 4, requires_grad=True)
    out, *final = layer(x, mask=torch.ones(0, 5, dtype=torch.bool), training=True)
    assert out.shape == ((0, 5, 3) if return_sequences else (0, 3))
    assert len(final) == states and all(s.shape == (0, 3) for s in final)
    (out.sum() + sum(s.sum() for s in final)).backward()
    assert x.grad.shape == (0, 5, 4)
    assert torch.count_nonzero(layer.cell.kernel.grad) == 0
    assert layer.activity_losses == []
    cell_out, cell_states = LSTMCell(3)(torch.randn(0, 4))
    assert cell_out.shape == (0, 3) and [s.shape for s in cell_states] == [(0, 3), (0, 3)]


@pytest.mark.parametrize("go_backwards", [False, True])
def test_zero_timesteps(go_backwards):
    layer = LSTM(3, input_dim=4, return_sequences=True, return_state=True, go_backwards=go_backwards)
    h0, c0 = torch.randn(2, 3), torch.randn(2, 3)
    seq, h, c = layer(torch.randn(2, 0, 4), initial_state=[h0, c0], mask=torch.ones(2, 0, dtype=torch.bool))
    assert seq.shape == (2, 0, 3)
    assert torch.equal(h, h0) and torch.equal(c, c0)
    last = LSTM(3, input_dim=4, return_state=True, go_backwards=go_backwards)
    out, h, c = last(torch.randn(2, 0, 4), initial_state=[h0, c0])
    assert out.shape == (2, 3) and torch.all(out == 0)
    assert torch.equal(h, h0) and torch.equal(c, c0)
    out, h, c = last(torch.randn(2, 0, 4))
    assert torch.all(out == 0) and torch.all(h == 0) and torch.all(c == 0)
    gru_out = GRU(2, input_dim=4, return_sequences=True)(torch.randn(3, 0, 4))
    assert gru_out.shape == (3, 0, 2)


def test_zero_timesteps_gradient_reaches_initial_state():
    layer = GRU(3, input_dim=4, return_state=True)
    h0 = torch.randn(2, 3, requires_grad=True)
    out, h = layer(torch.randn(2, 0, 4), initial_state=h0)
    h.sum().backward()
    assert torch.equal(h0.grad, torch.ones(2, 3))


def test_stateful_zero_timesteps_keeps_states():
    layer = LSTM(3, input_dim=4, stateful=True, return_state=True)
    _, h1, c1 = layer(torch.randn(2, 3, 4))
    _, h2, c2 = layer(torch.randn(2, 0, 4))
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
