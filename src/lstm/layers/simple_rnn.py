"""SimpleRNNCell and SimpleRNN: the plain RNN the tutorial starts from, h_t = tanh(x W + h U + b)."""

from __future__ import annotations

from .base import CellLayer, RecurrentCell


class SimpleRNNCell(RecurrentCell):
    """One plain RNN step. Keras' SimpleRNNCell arguments (no recurrent_activation, no
    implementation). Weights: `kernel` [D, U], `recurrent_kernel` [U, U], `bias` [U]."""

    kind = "simple_rnn"
    default_name = "simple_rnn_cell"
    torch_counterpart = "RNNCell"

    def __init__(self, units, activation="tanh", use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0, recurrent_dropout=0.0, seed=None,
                 dtype=None, name=None, trainable=True, input_dim=None):
        super().__init__(units, activation, "sigmoid", use_bias, kernel_initializer, recurrent_initializer,
                         bias_initializer, kernel_regularizer, recurrent_regularizer, bias_regularizer,
                         kernel_constraint, recurrent_constraint, bias_constraint, dropout, recurrent_dropout,
                         2, seed, dtype, name, trainable, input_dim)

    def _common_config(self) -> dict:
        config = super()._common_config()
        del config["recurrent_activation"], config["implementation"]
        return config


class SimpleRNN(CellLayer):
    """The plain RNN layer; `SimpleRNNCell`'s arguments plus the layer's (see `LSTM`)."""

    cell_class = SimpleRNNCell
    default_name = "simple_rnn"
    torch_counterpart = "RNN"

    def __init__(self, units, activation="tanh", use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, recurrent_constraint=None, bias_constraint=None, dropout=0.0,
                 recurrent_dropout=0.0, seed=None, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, zero_output_for_mask=False, dtype=None,
                 name=None, trainable=True, input_shape=None, input_dim=None):
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer, activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint, recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint, dropout=dropout, recurrent_dropout=recurrent_dropout, seed=seed,
            return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards,
            stateful=stateful, unroll=unroll, zero_output_for_mask=zero_output_for_mask, dtype=dtype,
            name=name, trainable=trainable, input_shape=input_shape, input_dim=input_dim)
