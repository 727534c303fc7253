"""The layers of the tutorial, Keras' API on PyTorch modules:
`from lstm import layers; cell = layers.LSTMCell(64); out, state = cell(xt, [h, c])`."""

from __future__ import annotations

from typing import Optional

from .base import RNN, RecurrentCell
from .bidirectional import Bidirectional
from .config import nested
from .core import Dense, Dropout, Embedding, Input, InputLayer, Masking, TimeDistributed
from .gru import GRU, GRUCell
from .lstm import LSTM, LSTMCell
from .simple_rnn import SimpleRNN, SimpleRNNCell

_CLASSES = {cls.__name__: cls for cls in (LSTMCell, LSTM, GRUCell, GRU, SimpleRNNCell, SimpleRNN, RNN, Bidirectional,
                                          InputLayer, Embedding, Masking, Dense, Dropout, TimeDistributed)}


def deserialize(config: dict, dialect: Optional[str] = None):
    """A layer, cell or Sequential model from `{'class_name': ..., 'config': {...}}` (this library,
    Keras 3 or tf_keras)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"config: expected {{'class_name': ..., 'config': {{...}}}}, got {config!r}")
    name = config["class_name"]
    if name == "Sequential":  # (a model: keras.layers.deserialize reads one too)
        from ..models import Sequential

        return nested("['config']", Sequential.from_config, config.get("config") or {}, dialect)
    if name not in _CLASSES:
        raise ValueError(f"config: unsupported layer class {name!r}; expected one of {sorted(_CLASSES)} or "
                         "Sequential")
    return nested("['config']", _CLASSES[name].from_config, config.get("config") or {}, dialect)


def serialize(layer) -> dict:
    """`layer` as Keras 3's `keras.layers.serialize` gives it: `{'module': 'keras.layers',
    'class_name', 'config', 'registered_name': None}`, which `keras.layers.deserialize` and
    `deserialize` both read (nested cells and layers inside the config written the same way); a
    Sequential model with module 'keras', as Keras 3 writes one. A subclass of one of these layers
    is written as that layer: its config is the layer's."""
    class_name = class_name_of(layer)
    module = "keras" if class_name == "Sequential" else "keras.layers"  # (where Keras 3 keeps each)
    return {"module": module, "class_name": class_name, "config": layer.get_config(), "registered_name": None}


def class_name_of(layer) -> str:
    """The class of this library (and Keras) that `layer` is, or extends: its class name in configs."""
    return next((c.__name__ for c in type(layer).__mro__ if _CLASSES.get(c.__name__) is c), type(layer).__name__)


__all__ = ["LSTMCell", "LSTM", "GRUCell", "GRU", "SimpleRNNCell", "SimpleRNN", "RNN", "RecurrentCell",
           "Bidirectional", "InputLayer", "Input", "Embedding", "Masking", "Dense", "Dropout", "TimeDistributed",
           "deserialize", "serialize"]
