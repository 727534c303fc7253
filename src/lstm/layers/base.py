"""What every recurrent cell and layer shares: weights in Keras' layout, configs, dropout
masks, and the call that turns a layer's options into one `Recurrence` for the dispatch."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import activations, constraints, initializers, kernels, regularizers
from ..kernels import STATE_COUNT, CellSpec, QuantizedMatrix, Recurrence, state_dtype
from ..serialization import unique_name
from . import rng
from .config import constructor_kwargs, nested
from .precision import PolicyLayer, weight_array
from .validation import (as_float_tensor, check_activation_is_not_a_size, check_bool, check_fraction,
                         check_initial_state, check_lengths, check_mask, check_seed, check_units, feature_size)

_WEIGHT_NAMES = ("kernel", "recurrent_kernel", "bias")


def build_now(layer, inputs, owner=None) -> None:
    """layer.build for these inputs, or, while torch.compile or torch.export traces, the error saying
    to build `owner` (the layer the user called; default `layer`) before compiling.

    A traced graph cannot create weights. Raised while tracing, this error is what
    torch.compile(fullgraph=True) and torch.export report; the default torch.compile runs the
    raising frames eagerly instead, and there the weights are built.
    """
    features = inputs.shape[-1]
    if torch.compiler.is_compiling():
        owner = owner or layer
        raise RuntimeError(
            f"{type(owner).__name__} {owner.name!r} is not built: its weights are created on its first call "
            f"(here for {features} input features), which torch.compile(fullgraph=True) and torch.export "
            f"cannot trace. Build it before compiling: give input_shape= or input_dim= when constructing it, "
            f"call it (or the model) once eagerly, or call layer.build({features})")
    _build_untraced(layer, features, inputs.device)


# In the default torch.compile's eager fallback Dynamo would still trace the initializers, frame by
# frame, into graphs of their own that are never used again.
@torch.compiler.disable
def _build_untraced(layer, features: int, device) -> None:
    layer.build(features, device=device)


class RecurrentCell(PolicyLayer, nn.Module):
    """Base of LSTMCell, GRUCell and SimpleRNNCell.

    Holds `kernel` [D, G*U], `recurrent_kernel` [U, G*U] and `bias` as `nn.Parameter`s,
    created on the first call (or by `build`, or at once when `input_dim` is given), in the
    variable dtype of the dtype policy (`dtype=`, see `lstm.layers.precision`).
    """

    kind: str = ""
    default_name: str = ""
    torch_counterpart: str = ""  # the torch.nn module taking (input size, output size), named in errors

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, kernel_constraint=None, recurrent_constraint=None,
                 bias_constraint=None, dropout=0.0, recurrent_dropout=0.0, implementation=2, seed=None,
                 dtype=None, name=None, trainable=True, input_dim=None):
        super().__init__()
        self.units = check_units(units)
        check_activation_is_not_a_size(activation, self, self.units, "input_dim=")
        self.activation = activations.canonical(activation, "activation")
        self.recurrent_activation = activations.canonical(recurrent_activation, "recurrent_activation")
        self.use_bias = check_bool(use_bias, "use_bias")
        self.kernel_initializer = initializers.get(kernel_initializer, "kernel_initializer")
        self.recurrent_initializer = initializers.get(recurrent_initializer, "recurrent_initializer")
        self.bias_initializer = initializers.get(bias_initializer, "bias_initializer")
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer, "recurrent_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        self.kernel_constraint = constraints.get(kernel_constraint, "kernel_constraint")
        self.recurrent_constraint = constraints.get(recurrent_constraint, "recurrent_constraint")
        self.bias_constraint = constraints.get(bias_constraint, "bias_constraint")
        self.dropout = check_fraction(dropout, "dropout")
        self.recurrent_dropout = check_fraction(recurrent_dropout, "recurrent_dropout")
        if isinstance(implementation, bool) or not isinstance(implementation, int) or implementation not in (1, 2):
            raise ValueError(f"implementation: expected 1 or 2, got {implementation!r}")
        # Keras: recurrent dropout needs the per-gate path
        self.implementation = 1 if self.recurrent_dropout and self.kind != "simple_rnn" else implementation
        self.seed = check_seed(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.dtype_policy = dtype if dtype is not None else "float32"
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        self._cached_masks: Optional[tuple] = None
        for weight in self.weight_names():
            self.register_parameter(weight, None)
        if input_dim is not None:
            self.build(input_dim)

    # ----- weights -------------------------------------------------------------------------
    def weight_names(self) -> tuple:
        """The weights in Keras' order (`get_weights`), then any of a variant."""
        return _WEIGHT_NAMES

    @property
    def gate_count(self) -> int:
        return self.cell_spec().gate_count

    @property
    def state_count(self) -> int:
        return STATE_COUNT[self.kind]

    @property
    def output_size(self) -> int:
        """Size of h and of the outputs."""
        return self.units

    @property
    def state_sizes(self) -> tuple:
        """Size of each state: (h, c) for LSTM, (h,) otherwise."""
        return (self.output_size,) + (self.units,) * (self.state_count - 1)

    @property
    def built(self) -> bool:
        return self._parameters["kernel"] is not None  # (not through nn.Module.__getattr__: called every step)

    @property
    def input_dim(self) -> Optional[int]:
        return None if self.kernel is None else self.kernel.shape[0]

    def bias_shape(self) -> tuple:
        return (self.gate_count * self.units,)

    def initial_bias(self) -> torch.Tensor:
        return self.bias_initializer(self.bias_shape(), self.dtype)

    def initial_weights(self, input_dim: int) -> dict:
        width = self.gate_count * self.units
        values = {
            "kernel": self.kernel_initializer((input_dim, width), self.dtype),
            "recurrent_kernel": self.recurrent_initializer((self.output_size, width), self.dtype),
        }
        if self.use_bias:
            values["bias"] = self.initial_bias()
        return values

    def build(self, input_shape, device=None) -> None:
        """Create the weights for inputs whose last dimension is `input_shape` (an int or a shape)."""
        input_dim = feature_size(input_shape)
        try:
            values = self.initial_weights(input_dim)
        except RuntimeError as error:  # torch's allocator: say which sizes asked for it
            if "alloc" not in str(error):
                raise
            raise ValueError(f"units: weights for units={self.units} and input size {input_dim} cannot be "
                             f"allocated ({str(error).splitlines()[0][:200]})") from error
        for weight, value in values.items():
            setattr(self, weight, nn.Parameter(value.to(device), requires_grad=self.trainable))

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, w) for w in self.weight_names() if getattr(self, w) is not None]

    def get_weights(self) -> list[np.ndarray]:
        """[kernel, recurrent_kernel, bias] as NumPy arrays in Keras' layout (bfloat16 ones
        as float32)."""
        return [weight_array(w) for w in self.weights()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        names = [w for w in self.weight_names() if w != "bias" or self.use_bias]
        if not self.built:
            if len(weights) == 0:
                raise ValueError("set_weights: got no weights")
            self.build(np.shape(weights[0])[0])
        if len(weights) != len(names):
            raise ValueError(f"set_weights: expected {len(names)} arrays ({', '.join(names)}), got {len(weights)}")
        for weight_name, value in zip(names, weights):
            param = getattr(self, weight_name)
            value = torch.as_tensor(np.asarray(value), dtype=param.dtype)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"set_weights: {weight_name} expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Lazy cells build from the checkpoint's shapes, so loading needs no dummy call first.
        kernel = state_dict.get(prefix + "kernel")
        if not self.built and kernel is not None:
            self.build(kernel.shape[0], device=kernel.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_constraints(self) -> dict:
        pairs = zip(_WEIGHT_NAMES, (self.kernel_constraint, self.recurrent_constraint, self.bias_constraint))
        return {w: c for w, c in pairs if c is not None and getattr(self, w) is not None}

    @property
    def losses(self) -> list[torch.Tensor]:
        """Weight penalties of the regularizers, recomputed from the current weights; none while the
        cell is frozen (Keras 3 counts the regularizers of trainable weights only)."""
        if not self.trainable:
            return []
        pairs = zip(self.weights(), (self.kernel_regularizer, self.recurrent_regularizer, self.bias_regularizer))
        return [reg(w) for w, reg in pairs if reg is not None]

    # ----- maths ---------------------------------------------------------------------------
    def cell_spec(self) -> CellSpec:
        return CellSpec(self.kind, self.activation, self.recurrent_activation)

    def get_initial_state(self, batch_size: int, device=None, dtype=None) -> list[torch.Tensor]:
        """Zeros [batch_size, size] for each state, in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        return [torch.zeros(batch_size, size, dtype=dtype, device=device) for size in self.state_sizes]

    def _first_weight(self) -> Optional[torch.Tensor]:
        return self._parameters["kernel"]

    def _keep_mask(self, shape, rate: float, device) -> torch.Tensor:
        # at least float32: a low precision would round the keep probability (other masks) and the scale
        dtype = torch.promote_types(self.compute_dtype, torch.float32)
        keep = rng.bernoulli(shape, 1.0 - rate, dtype, self._generator)  # (torch.compile-safe)
        return (keep / (1.0 - rate)).to(device)

    def dropout_masks(self, batch: int, device, training: bool) -> tuple:
        """Keras 3 variational dropout: keep-masks for one layer call, reused at every step.

        Input masks: one shared by all gates (implementation 2) or one per gate (1).
        Recurrent masks: one per gate (recurrent dropout forces implementation 1).
        """
        if not training:
            return None, None
        input_masks = recurrent_masks = None
        per_gate = self.gate_count if self.implementation == 1 else 1
        if self.dropout:
            input_masks = self._keep_mask((per_gate, batch, self.input_dim), self.dropout, device)
        if self.recurrent_dropout:
            recurrent_masks = self._keep_mask((self.gate_count, batch, self.output_size), self.recurrent_dropout,
                                              device)
        return input_masks, recurrent_masks

    def reset_dropout_mask(self) -> None:
        """Forget the masks a direct cell call reuses (Keras' `reset_dropout_mask`)."""
        self._cached_masks = None

    def quantized_weights(self) -> Optional[tuple]:
        """(kernel, recurrent_kernel) as the int8 `QuantizedMatrix`es `lstm.quantize` gave this
        cell (buffers `<weight>_int8` and `<weight>_scales`), or None."""
        buffers = self._buffers
        if buffers.get("kernel_int8") is None:
            return None
        return tuple(QuantizedMatrix(buffers[f"{w}_int8"], buffers[f"{w}_scales"]) for w in _WEIGHT_NAMES[:2])

    def recurrence(self, inputs, initial_state, training=False, lengths=None, **options) -> Recurrence:
        """The kernel's problem for one call (`training` draws what a variant draws per call);
        `lengths`: int64 [B], each row's number of valid steps (see `Recurrence`)."""
        return Recurrence(self.cell_spec(), inputs, self.kernel, self.recurrent_kernel, self.bias,
                          tuple(initial_state), lengths=lengths, quantized=self.quantized_weights(), **options)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self.__dict__["_lean_call"] = None  # options or weights changed: the cell call's route is re-derived

    def forward(self, inputs, states=None, training=None):
        """One step: `out, new_states = cell(x_t, [h, c])`, x_t [B, D]; states=None means zeros.
        Floating inputs and states are cast to the dtype the cell computes in (as Keras does)."""
        bare = isinstance(states, torch.Tensor)  # (Keras returns the new state as it came: `[h] if nested else h`)
        result = None
        if not torch.compiler.is_compiling():
            lean = self._lean_call
            if lean is None:
                lean = self.__dict__["_lean_call"] = kernels.cell_call(self) or False
            if lean and type(inputs) is torch.Tensor:
                result = lean(self, inputs, states, training)
        if result is None:
            outputs, states = self.call_states(inputs, states, training)
            result = outputs, [s.to(outputs.dtype) for s in states]
        outputs, states = result
        return outputs, states[0] if bare and len(states) == 1 else states

    def call_states(self, inputs, states=None, training=None, carried: bool = False):
        """The cell call, returning the states as the kernels carry them (C in float32 for a
        low-precision compute dtype: see `lstm.kernels.state_dtype`); `carried=True` takes states
        in that form (a stream's) instead of casting them to the compute dtype."""
        inputs = as_float_tensor(inputs, "inputs")
        if inputs.dim() != 2:
            raise ValueError(f"inputs: expected a 2-D tensor [batch, features] for one step, got shape "
                             f"{tuple(inputs.shape)}")
        self._ensure_built(inputs)
        compute = self.call_dtype(inputs.device)
        inputs = inputs.to(compute)
        if isinstance(states, torch.Tensor) and self.state_count == 1:
            states = [states]
        states = check_initial_state(states, self, inputs.shape[0], inputs, "states",
                                     state_dtype(compute) if carried else compute)
        training = self.training if training is None else bool(training)
        masks = (None, None)
        if training and (self.dropout or self.recurrent_dropout):
            if self._cached_masks is None or self._cached_masks[0] != inputs.shape[0]:
                self._cached_masks = (inputs.shape[0], self.dropout_masks(inputs.shape[0], inputs.device, True))
            masks = self._cached_masks[1]
        problem = self.recurrence(inputs[:, None, :], states, training, return_sequences=False,
                                  input_dropout=masks[0], recurrent_dropout=masks[1])
        result = kernels.run(problem)
        return result.outputs, list(result.states)

    def _ensure_built(self, inputs: torch.Tensor, owner=None) -> None:
        """Builds on the first call; `owner` is the layer named in errors (default: this cell)."""
        if not self.built:
            build_now(self, inputs, owner)
        elif inputs.shape[-1] != self.input_dim:
            raise ValueError(f"inputs: expected {self.input_dim} features (the size this layer was built for), "
                             f"got {inputs.shape[-1]} (input shape {tuple(inputs.shape)})")

    # ----- config --------------------------------------------------------------------------
    def _common_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_config(),
            "units": self.units,
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(self.recurrent_activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "recurrent_constraint": constraints.serialize(self.recurrent_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "implementation": self.implementation,
        }

    def layer_config_items(self):
        """The cell's options as they appear in its layer's flat config."""
        return [(k, v) for k, v in self.get_config().items() if k not in ("name", "trainable", "dtype", "seed")]

    def get_config(self) -> dict:
        """This library's config (the tutorial's format); `seed` appears only when set."""
        config = self._common_config()
        if self.seed is not None:
            config["seed"] = self.seed
        return config

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        """A cell from a config of this library, Keras 3 or tf_keras (detected, or `dialect`)."""
        return cls(**constructor_kwargs(cls, config, dialect))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, units={self.units}, input_dim={self.input_dim}"

    def stream(self, batch_size: int = 1):
        """Online inference, one step per call: `s = cell.stream(); y_t = s.step(x_t)` (see
        `lstm.streaming`); the stream starts from zeros and keeps (h, c) inside."""
        from ..streaming import Stream

        return Stream(self, batch_size)


def unpacked(inputs: PackedSequence, mask, lengths) -> tuple:
    """A PackedSequence as a right-padded [B, T, D] tensor (T: its longest row) and its rows'
    lengths [B] (int64, on the CPU), both in the original batch order."""
    for argument, value in (("mask", mask), ("lengths", lengths)):
        if value is not None:
            raise ValueError(f"inputs, {argument}: a PackedSequence carries its rows' lengths, so {argument}= must be "
                             f"None with it, got a {type(value).__name__}; pass a padded tensor with {argument}=, or "
                             "the PackedSequence alone")
    return pad_packed_sequence(inputs, batch_first=True)


def packed_like(packed: PackedSequence, outputs: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
    """Right-padded outputs [B, T, U] in the original batch order, packed as `packed` is: the same
    batch_sizes, sorted_indices and unsorted_indices (as torch.nn.LSTM returns them)."""
    order = packed.sorted_indices
    if order is not None:  # the input's own order (a fresh sort could order rows of equal length otherwise)
        outputs, lengths = outputs.index_select(0, order.to(outputs.device)), lengths[order.cpu()]
    data = pack_padded_sequence(outputs, lengths, batch_first=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


class RNN(nn.Module):
    """A recurrent layer over a cell, with Keras' call: `layer(inputs [B, T, D], mask=None,
    initial_state=None, training=None, lengths=None, reset=None)`.

    Returns the last output [B, U] or, with return_sequences, every output [B, T, U] in
    processing order (go_backwards does not re-reverse, as in Keras); with return_state, the
    final states follow: `(output, h, c)` for LSTM. `training=None` follows `module.training`.

    `lengths` [B] integers: row b's valid steps are [0, lengths[b]), the rest padding: exactly
    the right-padded mask `arange(T) < lengths[:, None]` (and'ed with `mask` when both are given).
    `inputs` may be a `torch.nn.utils.rnn.PackedSequence`: it runs as its padded form with its
    lengths, and with return_sequences the outputs come back packed as the input was (a
    go_backwards layer's in input order, as torch's reverse direction gives them); the last
    output and the states are tensors in the original batch order (as torch.nn.LSTM's h_n).

    `reset` [B, T] bools: episode boundaries inside the sequences. Before the step at time t of a
    row with reset[b, t] (a step that counts: masked and padded steps ignore it), the state starts
    again from `initial_state`, or zeros when none is given (a stateful layer's carried state is not
    restored: a reset starts a new episode). Gradients do not cross a reset (but reach
    `initial_state` from every episode it starts). Indexed by time, going backwards too.
    """

    default_name = "rnn"

    def __init__(self, cell: RecurrentCell, return_sequences=False, return_state=False, go_backwards=False,
                 stateful=False, unroll=False, zero_output_for_mask=False, activity_regularizer=None,
                 name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__()
        if not isinstance(cell, RecurrentCell):
            raise TypeError(f"cell: expected a RecurrentCell (LSTMCell, GRUCell, SimpleRNNCell), got "
                            f"{type(cell).__name__}")
        self.cell = cell
        if dtype is not None and not cell.built:
            cell.dtype_policy = dtype
        self.return_sequences = check_bool(return_sequences, "return_sequences")
        self.return_state = check_bool(return_state, "return_state")
        self.go_backwards = check_bool(go_backwards, "go_backwards")
        self.stateful = check_bool(stateful, "stateful")
        self.unroll = check_bool(unroll, "unroll")  # same numbers either way; kept for config round-trips
        self.zero_output_for_mask = check_bool(zero_output_for_mask, "zero_output_for_mask")
        self.activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        if not self.trainable:  # Keras: a frozen layer freezes its cell's weights
            cell.trainable = False
            for param in cell.parameters():
                param.requires_grad_(False)
        self._states: Optional[list[torch.Tensor]] = None
        self._activity_losses: list[torch.Tensor] = []
        # gate traces: `record_gates = True` keeps every call's per-step internals in `last_gates`
        self.record_gates = False
        self.last_gates: Optional[dict] = None
        if input_shape is not None:
            self.build(input_shape)

    def build(self, input_shape) -> None:
        self.cell.build(input_shape)

    @property
    def built(self) -> bool:
        return self.cell.built

    # Keras' dtype attributes: the cell's (see lstm.layers.precision)
    dtype_policy = property(lambda self: self.cell.dtype_policy)
    variable_dtype = property(lambda self: self.cell.variable_dtype)
    compute_dtype = property(lambda self: self.cell.compute_dtype)
    dtype = property(lambda self: self.cell.dtype)

    def get_weights(self) -> list[np.ndarray]:
        return self.cell.get_weights()

    def set_weights(self, weights) -> None:
        self.cell.set_weights(weights)

    @property
    def states(self) -> Optional[list[torch.Tensor]]:
        """The carried states of a stateful layer (None before its first call). For a bfloat16 or
        float16 compute dtype they are float32, C unrounded: two calls then give exactly the
        numbers of one call over both (Keras keeps them in the variable dtype, float32 when mixed)."""
        return self._states

    def reset_state(self, states=None) -> None:
        """Forget the carried states of a stateful layer (the next call starts from zeros, with
        any batch size), or set them to `states`."""
        if not self.stateful:
            raise ValueError("reset_state: the layer is not stateful (stateful=False)")
        if states is None:
            self._states = None
            return
        batch = states[0].shape[0] if len(states) else 0
        carried = state_dtype(self.cell.compute_dtype)
        self._states = [s.detach() for s in check_initial_state(states, self.cell, batch, None, "states", carried)]

    reset_states = reset_state

    @property
    def activity_losses(self) -> list[torch.Tensor]:
        """The activity regularizer's penalties from the last call (one per returned tensor)."""
        return list(self._activity_losses)

    @property
    def losses(self) -> list[torch.Tensor]:
        """Weight penalties (recomputed now; none while the layer is frozen) and the activity
        penalties of the last call."""
        return (self.cell.losses if self.trainable else []) + self.activity_losses

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def recurrence(self, inputs, mask=None, initial_state=None, training=None, trace=False,
                   lengths=None, reset=None) -> Recurrence:
        """The kernels' problem for a call `layer(inputs, mask, initial_state, training, lengths=...)`:
        the arguments checked, the weights built, the inputs cast to the dtype the call computes in,
        a stateful layer's states taken, dropout drawn."""
        inputs = as_float_tensor(inputs, "inputs")
        if inputs.dim() != 3:
            raise ValueError(f"inputs: expected a 3-D tensor [batch, timesteps, features], got shape "
                             f"{tuple(inputs.shape)}")
        cell = self.cell
        cell._ensure_built(inputs, owner=self)
        compute = cell.call_dtype(inputs.device)
        inputs = inputs.to(compute)
        batch = inputs.shape[0]
        mask, lengths = check_mask(mask, inputs), check_lengths(lengths, inputs)
        reset = check_mask(reset, inputs, "reset")
        if initial_state is None and self.stateful and self._states is not None:
            if self._states[0].shape[0] != batch:
                raise ValueError(f"inputs: this stateful layer carries states for batch size "
                                 f"{self._states[0].shape[0]}, got batch size {batch}; keep the batch size "
                                 "fixed or call reset_state() first")
            states = check_initial_state(self._states, cell, batch, inputs, "initial_state", state_dtype(compute))
        else:
            states = check_initial_state(initial_state, cell, batch, inputs, "initial_state", compute)
        training = self.training if training is None else bool(training)
        input_masks, recurrent_masks = cell.dropout_masks(batch, inputs.device, training)
        return cell.recurrence(
            inputs, states, training, lengths=lengths, mask=mask, reset=reset,
            reset_state=None if reset is None or initial_state is None else tuple(states),  # (None: zeros)
            go_backwards=self.go_backwards,
            zero_output_for_mask=self.zero_output_for_mask, return_sequences=self.return_sequences,
            input_dropout=input_masks, recurrent_dropout=recurrent_masks, trace=trace)

    def forward(self, inputs, mask=None, initial_state=None, training=None, return_gates=False, lengths=None,
                reset=None):
        """`return_gates=True` appends a dict of per-step internals, each [B, T, U] in processing
        order (LSTM: i, f, c_tilde, c, o, h; GRU: z, r, h_tilde, h; SimpleRNN: h). `lengths`,
        `reset` and PackedSequence inputs: see the class docstring."""
        if isinstance(inputs, PackedSequence):
            return self._forward_packed(inputs, mask, lengths, initial_state=initial_state, training=training,
                                        return_gates=return_gates, reset=reset)
        problem = self.recurrence(inputs, mask, initial_state, training, trace=bool(return_gates) or self.record_gates,
                                  lengths=lengths, reset=reset)
        batch = problem.inputs.shape[0]
        result = kernels.run(problem)
        if self.record_gates:
            self.last_gates = result.trace
        if self.stateful:  # C unrounded between calls: a sequence in two calls is the same as in one
            carried = state_dtype(problem.compute_dtype)
            self._states = [s.detach().to(carried) for s in result.states]
        states = [s.to(problem.compute_dtype) for s in result.states]
        returned = [result.outputs, *states] if self.return_state else [result.outputs]
        self._activity_losses = []
        if self.activity_regularizer is not None and batch > 0:
            self._activity_losses = [self.activity_regularizer(t) / batch for t in returned]
        if return_gates:
            returned.append(result.trace)
        return tuple(returned) if len(returned) > 1 else result.outputs

    def _forward_packed(self, packed: PackedSequence, mask, lengths, **call):
        padded, lengths = unpacked(packed, mask, lengths)
        returned = self.forward(padded, lengths=lengths, **call)
        if not self.return_sequences:
            return returned
        outputs, *rest = returned if isinstance(returned, tuple) else (returned,)
        if self.go_backwards:  # a packing has no processing order: each row's outputs in input order
            outputs = outputs.flip(1)
        outputs = packed_like(packed, outputs, lengths)
        return (outputs, *rest) if rest else outputs

    # ----- config --------------------------------------------------------------------------
    def _layer_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.cell.dtype_config(),
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "stateful": self.stateful,
            "unroll": self.unroll,
            "zero_output_for_mask": self.zero_output_for_mask,
        }

    def get_config(self) -> dict:
        config = self._layer_config()
        from . import serialize

        config["cell"] = serialize(self.cell)
        config["activity_regularizer"] = regularizers.serialize(self.activity_regularizer)
        return config

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        from . import deserialize

        config = dict(config)
        cell = config.pop("cell", None)
        if not isinstance(cell, dict):
            raise ValueError(f"config: an RNN config needs a 'cell' dict, got {cell!r}")
        return cls(nested("['cell']", deserialize, cell, dialect), **constructor_kwargs(cls, config, dialect))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def stream(self, batch_size: int = 1):
        """Online inference over this layer's cell, one step per call (see `lstm.streaming`):
        `s.step(x_t)` gives the layer's output for that step. A stateful layer's stream starts
        from its carried states (when their batch size matches). Not for go_backwards layers."""
        from ..streaming import Stream

        if self.go_backwards:
            raise ValueError("stream: a go_backwards layer needs the whole sequence; streaming runs forwards only")
        initial = None
        if self.stateful and self._states is not None and self._states[0].shape[0] == batch_size:
            initial = self._states
        return Stream(self.cell, batch_size, initial)


class CellLayer(RNN):
    """A layer that owns its cell (LSTM, GRU, SimpleRNN): cell arguments are layer arguments and
    the config is flat, as in Keras."""

    cell_class: type = RecurrentCell
    torch_counterpart: str = ""  # the torch.nn module taking (input size, output size), named in errors
    layer_keys = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll",
                  "zero_output_for_mask", "activity_regularizer", "name", "trainable", "input_shape")

    def __init__(self, units, **kwargs):
        # (checked here too, so that the error names this layer rather than its cell)
        check_activation_is_not_a_size(kwargs.get("activation"), self, check_units(units),
                                       "input_dim= / input_shape=")
        layer_kwargs = {k: kwargs.pop(k) for k in self.layer_keys if k in kwargs}
        input_shape = layer_kwargs.pop("input_shape", None)
        if input_shape is not None and kwargs.get("input_dim") is None:  # the subclasses pass input_dim=None
            kwargs["input_dim"] = feature_size(input_shape)
        cell = self.cell_class(units, name=self.cell_class.default_name, **kwargs)
        super().__init__(cell, dtype=kwargs.get("dtype"), **layer_kwargs)

    def __getattr__(self, name):
        # Keras exposes the cell's options on the layer (layer.units, layer.dropout, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            cell = self._modules.get("cell")
            if cell is not None and name in vars(cell):
                return vars(cell)[name]
            raise

    def get_config(self) -> dict:
        """The layer's options followed by its cell's (Keras' layout, tutorial format)."""
        config = self._layer_config()
        for key, value in self.cell.layer_config_items():
            config[key] = value
            if key == "bias_regularizer":
                config["activity_regularizer"] = regularizers.serialize(self.activity_regularizer)
        config["seed"] = self.cell.seed
        return config

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        kwargs = constructor_kwargs(cls, config, dialect)
        return cls(kwargs.pop("units"), **kwargs)
