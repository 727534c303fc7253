"""LSTMCell and LSTM: the tutorial's cell, with Keras' arguments and weight layout."""

from __future__ import annotations

import numbers

import torch

from ..kernels import CellSpec, Zoneout
from . import rng
from .base import CellLayer, RecurrentCell
from .validation import check_bool, check_fraction, check_units

# the variants' constructor arguments and their off values (kept out of configs while off)
VARIANT_DEFAULTS = {"peephole": False, "layer_norm": False, "proj_size": 0, "coupled": False, "zoneout": 0.0,
                    "recurrent_dropconnect": 0.0, "forget_bias": 0.0, "cell_clip": None}
_VARIANT_WEIGHTS = ("peephole_weights", "gate_norm_gain", "cell_norm_gain", "cell_norm_bias", "projection_kernel")


def _check_flag(value, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument}: expected True or False, got {value!r}")
    return value


def _check_zoneout(value) -> tuple:
    rates = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(rates) != 2:
        raise ValueError(f"zoneout: expected a rate or a pair (rate_h, rate_c), got {value!r}")
    return tuple(check_fraction(rate, "zoneout") for rate in rates)


def _check_real(value, argument: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value or abs(value) == float("inf"):
        raise TypeError(f"{argument}: expected a finite float, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{argument}: expected a positive float, got {value!r}")
    return float(value)


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
        dtype: "float32" (default), "float64", "bfloat16", "float16", or a mixed policy
            "mixed_bfloat16" / "mixed_float16" (float32 weights, computations in the low precision;
            see `lstm.layers.precision`).
        name: defaults to "lstm_cell", "lstm_cell_1", ...
        trainable: False freezes the weights.
        input_dim: build the weights now instead of on the first call.

    Variants (keyword-only, all off by default; see `lstm.kernels.reference` for the maths):
        peephole: C_{t-1} feeds the i and f gates and C_t the o gate through diagonal weights
            `peephole_weights` [3, units] (rows i, f, o; zeros at first, so training starts from
            the plain cell) (Gers & Schmidhuber 2000).
        layer_norm: layer normalisation of x·kernel and h·recurrent_kernel (gains
            `gate_norm_gain` [2, 4*units]; the bias is their shift) and of C_t before the output
            activation (`cell_norm_gain`, `cell_norm_bias` [units]), as haste's LayerNormLSTM.
        proj_size: P > 0 projects h to P values, `projection_kernel` [units, P] (LSTMP, as
            torch.nn.LSTM(proj_size=P)); h and the outputs are [B, P], `recurrent_kernel`
            [P, 4*units], C stays [B, units].
        coupled: CIFG, the input gate is 1 - f; the weights have no input-gate block (f | c | o,
            3*units wide) and peephole_weights has rows f, o.
        zoneout: a rate, or (rate_h, rate_c): in training each unit of h and of C keeps its
            previous value with that probability, drawn per step (Krueger et al. 2016); at
            inference zoneout is off, like dropout (the paper uses the expectation instead).
        recurrent_dropconnect: in training, drop this fraction of `recurrent_kernel`'s entries,
            one mask per call, scaled by 1/(1-rate) (AWD-LSTM's weight drop).
        forget_bias: added to the forget gate's pre-activation at run time (TF1's LSTMCell).
        cell_clip: C_t is clipped to [-cell_clip, cell_clip].

    Weights: `kernel` [input_dim, 4*units], `recurrent_kernel` [units, 4*units], `bias`
    [4*units], gate blocks in Keras order i | f | c | o, then the variants' weights.
    """

    kind = "lstm"
    default_name = "lstm_cell"
    torch_counterpart = "LSTMCell"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0, recurrent_dropout=0.0,
                 implementation=2, seed=None, dtype=None, name=None, trainable=True, input_dim=None, *,
                 peephole=False, layer_norm=False, proj_size=0, coupled=False, zoneout=0.0,
                 recurrent_dropconnect=0.0, forget_bias=0.0, cell_clip=None):
        self.unit_forget_bias = check_bool(unit_forget_bias, "unit_forget_bias")
        self.peephole = _check_flag(peephole, "peephole")
        self.layer_norm = _check_flag(layer_norm, "layer_norm")
        self.coupled = _check_flag(coupled, "coupled")
        proj_size = 0 if proj_size is None else proj_size
        units = check_units(units)
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) or not 0 <= proj_size < units:
            raise ValueError(f"proj_size: expected an int in [0, units={units}) (0: no projection), got {proj_size!r}")
        self.proj_size = int(proj_size)
        self.zoneout = _check_zoneout(zoneout)
        self.recurrent_dropconnect = check_fraction(recurrent_dropconnect, "recurrent_dropconnect")
        self.forget_bias = _check_real(forget_bias, "forget_bias")
        self.cell_clip = None if cell_clip is None else _check_real(cell_clip, "cell_clip", positive=True)
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, kernel_constraint, recurrent_constraint, bias_constraint, dropout,
                         recurrent_dropout, implementation, seed, dtype, name, trainable, input_dim)

    def cell_spec(self) -> CellSpec:
        return CellSpec(self.kind, self.activation, self.recurrent_activation, peephole=self.peephole,
                        layer_norm=self.layer_norm, proj_size=self.proj_size, coupled=self.coupled,
                        forget_bias=self.forget_bias, cell_clip=self.cell_clip)

    @property
    def output_size(self) -> int:
        return self.proj_size or self.units

    def weight_names(self) -> tuple:
        variants = (self.peephole, self.layer_norm, self.layer_norm, self.layer_norm, self.proj_size)
        return super().weight_names() + tuple(n for n, on in zip(_VARIANT_WEIGHTS, variants) if on)

    def initial_bias(self) -> torch.Tensor:
        if not self.unit_forget_bias:
            return super().initial_bias()
        # Keras: the forget slice is *set* to one; the initializer fills the other gates separately
        units, init = self.units, self.bias_initializer
        before = 0 if self.coupled else units  # the input gate's block comes first, if there is one
        after = self.gate_count * units - before - units
        return torch.cat([init((before,), self.dtype), torch.ones(units, dtype=self.dtype),
                          init((after,), self.dtype)])

    def initial_weights(self, input_dim: int) -> dict:
        values = super().initial_weights(input_dim)
        units, dtype = self.units, self.dtype
        if self.peephole:
            values["peephole_weights"] = torch.zeros(len(self.cell_spec().peephole_gates), units, dtype=dtype)
        if self.layer_norm:
            values["gate_norm_gain"] = torch.ones(2, self.gate_count * units, dtype=dtype)
            values["cell_norm_gain"] = torch.ones(units, dtype=dtype)
            values["cell_norm_bias"] = torch.zeros(units, dtype=dtype)
        if self.proj_size:
            values["projection_kernel"] = self.kernel_initializer((units, self.proj_size), dtype)
        return values

    def recurrence(self, inputs, initial_state, training=False, **options):
        problem = super().recurrence(inputs, initial_state, training, **options)
        if self.peephole:
            problem.peephole = self.peephole_weights
        if self.layer_norm:
            problem.layer_norm = (self.gate_norm_gain, self.cell_norm_gain, self.cell_norm_bias)
        if self.proj_size:
            problem.projection = self.projection_kernel
        if training and self.recurrent_dropconnect:
            keep = self._keep_mask(tuple(self.recurrent_kernel.shape), self.recurrent_dropconnect, inputs.device)
            problem.recurrent_kernel = self.recurrent_kernel * keep
        if training and any(self.zoneout):  # the masks are a function of one seed per call
            problem.zoneout = Zoneout(rng.counter_seed(self._generator), *self.zoneout)
        return problem

    def _common_config(self) -> dict:
        config = {}
        for key, value in super()._common_config().items():
            config[key] = value
            if key == "bias_initializer":
                config["unit_forget_bias"] = self.unit_forget_bias
        config.update(self.variants())
        return config

    def variants(self) -> dict:
        """The variant options that are on, as they appear in the config."""
        on = {}
        for key, default in VARIANT_DEFAULTS.items():
            value = getattr(self, key)
            if key == "zoneout":
                value = value[0] if value[0] == value[1] else list(value)
            if value != default:
                on[key] = value
        return on


class LSTM(CellLayer):
    """The LSTM layer: `LSTMCell` run over a sequence [batch, timesteps, features].

    Takes every `LSTMCell` argument, plus Keras' layer arguments: return_sequences,
    return_state, go_backwards, stateful, unroll, zero_output_for_mask, activity_regularizer,
    name, trainable, input_shape, and the variants (peephole, layer_norm, proj_size, coupled,
    zoneout, recurrent_dropconnect, forget_bias, cell_clip). Returns the last output, or every
    output with return_sequences, followed by (h, c) with return_state.
    """

    cell_class = LSTMCell
    default_name = "lstm"
    torch_counterpart = "LSTM"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, recurrent_constraint=None, bias_constraint=None, dropout=0.0,
                 recurrent_dropout=0.0, implementation=2, seed=None, return_sequences=False,
                 return_state=False, go_backwards=False, stateful=False, unroll=False,
                 zero_output_for_mask=False, dtype=None, name=None, trainable=True, input_shape=None,
                 input_dim=None, *, peephole=False, layer_norm=False, proj_size=0, coupled=False, zoneout=0.0,
                 recurrent_dropconnect=0.0, forget_bias=0.0, cell_clip=None):
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
            input_shape=input_shape, input_dim=input_dim, peephole=peephole, layer_norm=layer_norm,
            proj_size=proj_size, coupled=coupled, zoneout=zoneout, recurrent_dropconnect=recurrent_dropconnect,
            forget_bias=forget_bias, cell_clip=cell_clip)
