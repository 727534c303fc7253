"""Bidirectional: a forward and a backward copy of a recurrent layer, outputs merged (Keras 3)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..serialization import parse_dtype_policy, unique_name
from .base import RNN, packed_like, unpacked
from .config import nested
from .validation import as_float_tensor, check_bool, check_mask

MERGE_MODES = ("concat", "sum", "ave", "mul", None)


class Bidirectional(nn.Module):
    """Runs `layer` forwards and a fresh copy of it backwards, then merges.

    The forward and backward layers are re-created from `layer`'s config (named
    `forward_<name>` / `backward_<name>`) with fresh weights, as in Keras. With
    return_sequences the backward outputs are flipped back to input order, and masked steps
    output zeros. Returns the merged output, then `(h_f, c_f, h_b, c_b)` with return_state;
    with merge_mode=None the two outputs come first, unmerged. `initial_state` is a list with
    the forward states first, then the backward ones.

    `lengths` [B] (row b's valid steps are [0, lengths[b])) go to both directions, as the
    equivalent right-padded mask would (Keras): the backward direction starts at each row's last
    valid step, and with return_sequences its padded steps output zeros. A PackedSequence input
    runs as its padded form with its lengths; with return_sequences the merged output (each of the
    two with merge_mode=None) comes back packed as the input was, the states as tensors.

    `reset` [B, T] marks the steps where an episode starts (see RNN): the forward direction starts
    again before them, the backward direction before each episode's last step (the step before a
    reset), so neither direction carries a state across a boundary.
    """

    default_name = "bidirectional"

    def __init__(self, layer: RNN, merge_mode: Optional[str] = "concat", backward_layer: Optional[RNN] = None,
                 name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__()
        if not isinstance(layer, RNN):
            raise TypeError(f"layer: expected a recurrent layer (LSTM, GRU, SimpleRNN, RNN), got "
                            f"{type(layer).__name__}")
        if layer.go_backwards:
            raise ValueError("layer: Bidirectional needs a layer with go_backwards=False (it makes the "
                             "backward copy itself)")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode: expected one of {MERGE_MODES}, got {merge_mode!r}")
        self.merge_mode = merge_mode
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        from . import serialize

        self._layer_config = serialize(layer)
        # Keras 3 strips the prefix, so a Keras 3 config's 'forward_lstm' stays 'forward_lstm'
        self.forward_layer = self._copy(layer, "forward_" + layer.name.removeprefix("forward_"), go_backwards=False)
        self._custom_backward = backward_layer is not None
        if backward_layer is None:
            self.backward_layer = self._copy(layer, "backward_" + layer.name.removeprefix("backward_"),
                                             go_backwards=True)
        else:
            if not isinstance(backward_layer, RNN):
                raise TypeError(f"backward_layer: expected a recurrent layer, got {type(backward_layer).__name__}")
            if not backward_layer.go_backwards:
                raise ValueError("backward_layer: expected go_backwards=True, got False")
            for option in ("return_sequences", "return_state", "stateful"):
                if getattr(backward_layer, option) != getattr(layer, option):
                    raise ValueError(f"backward_layer: {option}={getattr(backward_layer, option)} differs from "
                                     f"the forward layer's {getattr(layer, option)}")
            backward_layer.zero_output_for_mask = backward_layer.return_sequences
            self.backward_layer = backward_layer
        if not self.trainable:  # Keras: freezing the wrapper freezes both directions
            for sub in (self.forward_layer, self.backward_layer):
                sub.trainable = sub.cell.trainable = False
                for param in sub.parameters():
                    param.requires_grad_(False)
        # the wrapper's own dtype policy (Keras: its inputs cast to its compute dtype, the two directions'
        # outputs cast back to it before merging; the wrapped layers keep theirs); none given: the
        # forward layer's
        self._policy = None if dtype is None else parse_dtype_policy(dtype)
        self.return_sequences = layer.return_sequences
        self.return_state = layer.return_state
        if input_shape is not None:
            self.build(input_shape)

    @staticmethod
    def _copy(layer: RNN, name: str, go_backwards: bool) -> RNN:
        config = layer.get_config()
        config.update(name=name, go_backwards=go_backwards, zero_output_for_mask=layer.return_sequences)
        return type(layer).from_config(config)

    def build(self, input_shape) -> None:
        self.forward_layer.build(input_shape)
        self.backward_layer.build(input_shape)

    @property
    def built(self) -> bool:
        return self.forward_layer.built and self.backward_layer.built

    # Keras' dtype attributes: the wrapper's own policy, else the forward layer's (lstm.layers.precision)
    dtype_policy = property(lambda self: self._policy or self.forward_layer.dtype_policy)
    variable_dtype = property(lambda self: self._policy.variable_dtype if self._policy else
                              self.forward_layer.variable_dtype)
    compute_dtype = property(lambda self: self._policy.compute_dtype if self._policy else
                             self.forward_layer.compute_dtype)
    dtype = variable_dtype

    def forward(self, inputs, mask=None, initial_state=None, training=None, lengths=None, reset=None):
        packed = inputs if isinstance(inputs, PackedSequence) else None
        if packed is not None:  # unpacked once for both directions
            inputs, lengths = unpacked(packed, mask, lengths)
        forward_state = backward_state = None
        if initial_state is not None:
            if not isinstance(initial_state, (list, tuple)) or len(initial_state) % 2:
                got = len(initial_state) if isinstance(initial_state, (list, tuple)) else type(initial_state).__name__
                raise ValueError(f"initial_state: expected a list of forward then backward states (an even "
                                 f"number of tensors), got {got}")
            half = len(initial_state) // 2
            forward_state, backward_state = list(initial_state[:half]), list(initial_state[half:])
        if self._policy is not None:
            inputs = as_float_tensor(inputs, "inputs").to(self._policy.compute_dtype)
        backward_reset = None
        if reset is not None:  # an episode ending at t - 1 starts the backward direction there
            reset = check_mask(reset, as_float_tensor(inputs, "inputs"), "reset")
            backward_reset = torch.cat([reset[:, 1:], torch.zeros_like(reset[:, :1])], dim=1)
        y_f = self.forward_layer(inputs, mask=mask, initial_state=forward_state, training=training, lengths=lengths,
                                 reset=reset)
        y_b = self.backward_layer(inputs, mask=mask, initial_state=backward_state, training=training, lengths=lengths,
                                  reset=backward_reset)
        states = []
        if self.return_state:
            (y_f, *states_f), (y_b, *states_b) = y_f, y_b
            states = states_f + states_b
        if self._policy is not None:
            y_f, y_b = y_f.to(self._policy.compute_dtype), y_b.to(self._policy.compute_dtype)
        if self.return_sequences:
            y_b = y_b.flip(1)
        if self.merge_mode is None:
            merged = [y_f, y_b]
        elif self.merge_mode == "concat":
            merged = [torch.cat([y_f, y_b], dim=-1)]
        elif self.merge_mode == "sum":
            merged = [y_f + y_b]
        elif self.merge_mode == "ave":
            merged = [(y_f + y_b) / 2]
        else:
            merged = [y_f * y_b]
        if packed is not None and self.return_sequences:
            merged = [packed_like(packed, y, lengths) for y in merged]
        returned = merged + states
        return returned[0] if len(returned) == 1 else tuple(returned)

    def reset_state(self, states=None) -> None:
        half = None if states is None else len(states) // 2
        self.forward_layer.reset_state(None if states is None else states[:half])
        self.backward_layer.reset_state(None if states is None else states[half:])

    reset_states = reset_state

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def get_weights(self) -> list[np.ndarray]:
        """Forward weights, then backward weights (Keras' order)."""
        return self.forward_layer.get_weights() + self.backward_layer.get_weights()

    def set_weights(self, weights) -> None:
        weights = list(weights)
        if len(weights) % 2:
            raise ValueError(f"set_weights: expected forward then backward weights (an even count), got "
                             f"{len(weights)} arrays")
        half = len(weights) // 2
        self.forward_layer.set_weights(weights[:half])
        self.backward_layer.set_weights(weights[half:])

    @property
    def losses(self) -> list[torch.Tensor]:
        return self.forward_layer.losses + self.backward_layer.losses

    def get_config(self) -> dict:
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self._policy.to_config() if self._policy else self.forward_layer.cell.dtype_config(),
            "layer": self._layer_config,
            "merge_mode": self.merge_mode,
        }
        if self._custom_backward:
            from . import serialize

            config["backward_layer"] = serialize(self.backward_layer)
        return config

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        """From this library's, Keras 3's or tf_keras' Bidirectional config."""
        from . import deserialize

        config = dict(config)
        for key in ("layer",):
            if not isinstance(config.get(key), dict):
                raise ValueError(f"config: a Bidirectional config needs a '{key}' dict, got {config.get(key)!r}")
        layer = nested("['layer']", deserialize, config.pop("layer"), dialect)
        backward = config.pop("backward_layer", None)
        backward = None if backward is None else nested("['backward_layer']", deserialize, backward, dialect)
        for key in ("module", "registered_name", "build_config"):
            config.pop(key, None)
        unknown = set(config) - {"name", "trainable", "merge_mode", "dtype"}
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)} for Bidirectional")
        return cls(layer, backward_layer=backward, **config)
