"""LSTMCell and LSTM: the tutorial's cell, with Keras' arguments and weight layout."""

from __future__ import annotations

import torch

from .base import CellLayer, RecurrentCell


class LSTMCell(RecurrentCell):
    """One LSTM step, as the tutorial writes it (forget, input, output gates; cell state C).

    Args (Keras' names and defaults):
        units: size of h and C.
        activation: for the candidate C̃ and for C before the output gate ("tanh").
        recurrent_activation: for the gates i, f, o ("sigmoid").
        use_bias: whether the gates have a bias (True).
        kernel_initializer / recurrent_initializer / bias_initializer: "glorot_uniform",
            "orthogonal" (over the whole [units, 4*units] matrix), "zeros".
        unit_forget_bias: set the forget-gate slice of the initial bias to 1 (True).
        kernel_regularizer / recurrent_regularizer / bias_regularizer: penalties in `losses`.
        kernel_constraint / recurrent_constraint / bias_constraint: applied by
            `lstm.apply_constraints(model)` after an optimizer step.
        dropout / recurrent_dropout: fraction of x / h_{t-1} dropped in training, one mask per call.
        implementation: 2 (one matmul for all gates) or 1 (per gate; per-gate dropout masks).
        seed: seed of the dropout masks.
        dtype: "float32" (default) or "float64".
        name: defaults to "lstm_cell", "lstm_cell_1", ...
        trainable: False freezes the weights.
        input_dim: build the weights now instead of on the first call.

    Weights: `kernel` [input_dim, 4*units], `recurrent_kernel` [units, 4*units], `bias`
    [4*units], gate blocks in Keras order i | f | c | o.
    """

    kind = "lstm"
    default_name = "lstm_cell"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0, recurrent_dropout=0.0,
                 implementation=2, seed=None, dtype=None, name=None, trainable=True, input_dim=None):
        self.unit_forget_bias = bool(unit_forget_bias)
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, kernel_constraint, recurrent_constraint, bias_constraint, dropout,
                         recurrent_dropout, implementation, seed, dtype, name, trainable, input_dim)

    def initial_bias(self) -> torch.Tensor:
        if not self.unit_forget_bias:
            return super().initial_bias()
        # Keras: the forget slice is *set* to one; the initializer fills i, c and o separately
        units, init = self.units, self.bias_initializer
        return torch.cat([init((units,), self.dtype), torch.ones(units, dtype=self.dtype),
                          init((2 * units,), self.dtype)])

    def _common_config(self) -> dict:
        config = {}
        for key, value in super()._common_config().items():
            config[key] = value
            if key == "bias_initializer":
                config["unit_forget_bias"] = self.unit_forget_bias
        return config


class LSTM(CellLayer):
    """The LSTM layer: `LSTMCell` run over a sequence [batch, timesteps, features].

    Takes every `LSTMCell` argument, plus Keras' layer arguments: return_sequences,
    return_state, go_backwards, stateful, unroll, zero_output_for_mask, activity_regularizer,
    name, trainable, input_shape. Returns the last output, or every output with
    return_sequences, followed by (h, c) with return_state.
    """

    cell_class = LSTMCell
    default_name = "lstm"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, recurrent_constraint=None, bias_constraint=None, dropout=0.0,
                 recurrent_dropout=0.0, implementation=2, seed=None, return_sequences=False,
                 return_state=False, go_backwards=False, stateful=False, unroll=False,
                 zero_output_for_mask=False, dtype=None, name=None, trainable=True, input_shape=None,
                 input_dim=None):
        super().__init__(
            units, activation=activation, recurrent_activation=recurrent_activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, unit_forget_bias=unit_forget_bias,
            kernel_regularizer=kernel_regularizer, recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer, activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint, recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint, dropout=dropout, recurrent_dropout=recurrent_dropout,
            implementation=implementation, seed=seed, return_sequences=return_sequences,
            return_state=return_state, go_backwards=go_backwards, stateful=stateful, unroll=unroll,
            zero_output_for_mask=zero_output_for_mask, dtype=dtype, name=name, trainable=trainable,
            input_shape=input_shape, input_dim=input_dim)
