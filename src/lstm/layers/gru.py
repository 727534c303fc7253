"""GRUCell and GRU, Keras' Cho et al. 2014 GRU (reset_after=True by default)."""

from __future__ import annotations

from ..kernels import CellSpec
from .base import CellLayer, RecurrentCell
from .validation import check_bool


class GRUCell(RecurrentCell):
    """One GRU step:  z = σ(x W_z + h U_z + b_z),  r = σ(x W_r + h U_r + b_r),
    h̃ = tanh(x W_h + r * (h U_h + b'_h))  (reset_after) or  tanh(x W_h + (r * h) U_h + b_h),
    h_t = z * h_{t-1} + (1 - z) * h̃.

    Same arguments as `LSTMCell` (without unit_forget_bias), plus `reset_after`. Weights:
    `kernel` [D, 3U], `recurrent_kernel` [U, 3U], blocks z | r | h; `bias` [2, 3U] (input row,
    recurrent row) with reset_after, else [3U].
    """

    kind = "gru"
    default_name = "gru_cell"
    torch_counterpart = "GRUCell"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, kernel_constraint=None, recurrent_constraint=None,
                 bias_constraint=None, dropout=0.0, recurrent_dropout=0.0, implementation=2,
                 reset_after=True, seed=None, dtype=None, name=None, trainable=True, input_dim=None):
        self.reset_after = check_bool(reset_after, "reset_after")
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, kernel_constraint, recurrent_constraint, bias_constraint, dropout,
                         recurrent_dropout, implementation, seed, dtype, name, trainable, input_dim)

    def bias_shape(self) -> tuple:
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def cell_spec(self) -> CellSpec:
        return CellSpec("gru", self.activation, self.recurrent_activation, reset_after=self.reset_after)

    def _common_config(self) -> dict:
        return {**super()._common_config(), "reset_after": self.reset_after}


class GRU(CellLayer):
    """The GRU layer over [batch, timesteps, features]; `GRUCell`'s arguments plus the layer's
    (see `LSTM`). With return_state it returns (output, h)."""

    cell_class = GRUCell
    default_name = "gru"
    torch_counterpart = "GRU"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0, recurrent_dropout=0.0,
                 implementation=2, reset_after=True, seed=None, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, zero_output_for_mask=False, dtype=None,
                 name=None, trainable=True, input_shape=None, input_dim=None):
        super().__init__(
            units, activation=activation, recurrent_activation=recurrent_activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint, bias_constraint=bias_constraint, dropout=dropout,
            recurrent_dropout=recurrent_dropout, implementation=implementation, reset_after=reset_after,
            seed=seed, return_sequences=return_sequences, return_state=return_state,
            go_backwards=go_backwards, stateful=stateful, unroll=unroll,
            zero_output_for_mask=zero_output_for_mask, dtype=dtype, name=name, trainable=trainable,
            input_shape=input_shape, input_dim=input_dim)
