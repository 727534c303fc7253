"""`Sequential`: layers run in order, with Keras' implicit mask propagation."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .layers.config import nested
from .layers.validation import check_bool
from .serialization import unique_name


def _accepts(layer: nn.Module, argument: str) -> bool:
    try:
        parameters = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _weight_count(layer: nn.Module) -> int:
    """How many arrays `layer.set_weights` takes, built or not (lazy layers build from them)."""
    from .layers import RNN, Bidirectional, TimeDistributed

    if getattr(layer, "built", True):
        return len(layer.get_weights())
    if isinstance(layer, Bidirectional):
        return _weight_count(layer.forward_layer) + _weight_count(layer.backward_layer)
    if isinstance(layer, RNN):
        return 2 + int(layer.cell.use_bias)
    if isinstance(layer, TimeDistributed):
        return _weight_count(layer.layer)
    if hasattr(layer, "use_bias"):  # Dense
        return 1 + int(layer.use_bias)
    return len(layer.get_weights())


class Sequential(nn.Module):
    """Keras' Sequential model on this library's layers: `model(inputs, mask=None, training=None)`.

    Masks flow as in Keras: a layer's `compute_mask(inputs, mask)` gives the mask passed to the
    next layer's `mask=` (Embedding(mask_zero=True) and Masking create one, a recurrent layer
    with return_sequences=False ends it, Dense/Dropout/TimeDistributed pass it through).
    NumPy inputs become tensors; floating NumPy inputs are cast to the model's float dtype (Keras
    casts inputs to the layers' dtype). `training=None` follows `module.training`.
    """

    default_name = "sequential"

    def __init__(self, layers: Optional[Iterable[nn.Module]] = None, name: Optional[str] = None, trainable=True):
        super().__init__()
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        self.layers = nn.ModuleList()
        for layer in layers or []:
            self.add(layer)
        if not self.trainable:
            for param in self.parameters():
                param.requires_grad_(False)

    def add(self, layer: nn.Module) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer: expected an nn.Module layer, got {type(layer).__name__}")
        self.layers.append(layer)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def _float_dtype(self) -> Optional[torch.dtype]:
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return None

    def forward(self, inputs: Any, mask=None, training=None, return_mask: bool = False):
        """Runs every layer; with `return_mask=True` returns `(outputs, mask)`. `inputs` may be a
        `torch.nn.utils.rnn.PackedSequence` for a model that starts with a recurrent layer (it
        passes on a PackedSequence with return_sequences, as torch.nn.LSTM does)."""
        if not isinstance(inputs, (torch.Tensor, PackedSequence)):
            inputs = torch.as_tensor(np.asarray(inputs))
            dtype = self._float_dtype()
            if inputs.is_floating_point() and dtype is not None:
                inputs = inputs.to(dtype)
        x = inputs
        for layer in self.layers:
            kwargs = {}
            if _accepts(layer, "mask"):
                kwargs["mask"] = mask
            if _accepts(layer, "training"):
                kwargs["training"] = training
            y = layer(x, **kwargs)
            if isinstance(y, (tuple, list)) and not isinstance(y, PackedSequence):
                raise ValueError(f"Sequential: layer {getattr(layer, 'name', type(layer).__name__)!r} returned "
                                 f"{len(y)} tensors; a Sequential model needs one output per layer "
                                 "(return_state=True is not supported here)")
            compute_mask = getattr(layer, "compute_mask", None)
            if compute_mask is not None:
                mask = compute_mask(x, mask)
            x = y
        return (x, mask) if return_mask else x

    def predict(self, inputs: Any, mask=None) -> np.ndarray:
        """Inference (training=False, no gradients) returning NumPy, like Keras' `predict`."""
        with torch.no_grad():
            return self(inputs, mask=mask, training=False).cpu().numpy()

    def reset_state(self) -> None:
        """Clear the carried states of every stateful recurrent layer."""
        for sub in self.modules():
            if sub is not self and getattr(sub, "stateful", False) and hasattr(sub, "reset_state"):
                sub.reset_state()

    reset_states = reset_state

    def get_weights(self) -> list[np.ndarray]:
        return [w for layer in self.layers for w in (layer.get_weights() if hasattr(layer, "get_weights") else [])]

    def set_weights(self, weights) -> None:
        weights = list(weights)
        position = 0
        for layer in self.layers:
            if not hasattr(layer, "get_weights"):
                continue
            count = _weight_count(layer)
            layer.set_weights(weights[position:position + count])
            position += count
        if position != len(weights):
            raise ValueError(f"set_weights: the model has {position} weight arrays, got {len(weights)}")

    def get_config(self) -> dict:
        from .layers import serialize

        return {"name": self.name, "trainable": self.trainable,
                "layers": [serialize(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        from .layers import deserialize

        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise ValueError(f"config: a Sequential config needs a 'layers' list, got {config!r}")
        layers = [nested(f"['layers'][{i}]", deserialize, entry, dialect) for i, entry in enumerate(config["layers"])]
        return cls(layers, name=config.get("name"), trainable=config.get("trainable", True))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


__all__ = ["Sequential"]
