"""Keras files written from this library's models, in Keras 3's own layouts
(keras_golden/models/FORMATS.md): `save_keras(model, path)` a whole `.keras` model that
`keras.saving.load_model` loads with no custom objects; `save_keras_weights(model_or_layer, path)`
a `.weights.h5`; `keras_config(model)` the model's Keras 3 config. `load_keras` reads all of them
back. What Keras' layers cannot hold (the LSTM variants, layers of other kinds) is refused with the
layer and option named."""

from __future__ import annotations

import datetime
import io
import json
import os
import zipfile
from typing import Optional

import numpy as np
from torch import nn

from ..layers import RNN, Bidirectional, Embedding, InputLayer, LSTMCell, TimeDistributed, class_name_of, serialize
from ..models import Sequential
from .keras_files import import_h5py, keras_snake_case

# the Keras release whose .keras layout is written here (its metadata.json names it)
KERAS_VERSION = "3.15.1"
_SUPPORTED_WRITE = ("LSTM", "GRU", "SimpleRNN", "RNN", "Bidirectional", "Dense", "Embedding", "Masking", "Dropout",
                    "TimeDistributed", "InputLayer")


def check_keras_layers(model_or_layer: nn.Module, what: str) -> None:
    """ValueError naming the first layer Keras' own layers cannot hold: an LSTM variant option."""
    for module in model_or_layer.modules():
        cell = module.cell if isinstance(module, RNN) else module
        variants = cell.variants() if isinstance(cell, LSTMCell) else {}
        if variants:
            raise ValueError(f"{what}: {module.name!r} uses the LSTM variant options {variants}, which Keras' LSTM "
                             "does not have")


def plan_for(target: nn.Module) -> Optional[list]:
    """(class name, layer, Keras 3 key) of a Sequential's layers (None for a single layer)."""
    if not isinstance(target, Sequential):
        return None
    plan, counts = [], {}
    for module in target.layers:
        class_name = class_name_of(module)
        if class_name not in _SUPPORTED_WRITE:
            raise ValueError(f"layer {getattr(module, 'name', class_name)!r}: {class_name} has no Keras weights layout "
                             f"here; supported: {', '.join(_SUPPORTED_WRITE)}")
        if class_name == "InputLayer":  # Keras 3 Sequential.layers leaves the InputLayer out
            plan.append((class_name, module, None))
            continue
        key = keras_snake_case(class_name)
        n = counts.get(key, 0)
        counts[key] = n + 1
        plan.append((class_name, module, key if n == 0 else f"{key}_{n}"))
    return plan


def _write_vars(group, name: str, arrays: list) -> None:
    variables = group.create_group("vars")
    variables.attrs["name"] = name
    for i, array in enumerate(arrays):
        variables.create_dataset(str(i), data=np.asarray(array))


def _write_layer(module: nn.Module, group) -> None:
    name = getattr(module, "name", type(module).__name__.lower())
    if isinstance(module, Bidirectional):
        _write_vars(group, name, [])
        _write_layer(module.forward_layer, group.create_group("forward_layer"))
        _write_layer(module.backward_layer, group.create_group("backward_layer"))
    elif isinstance(module, RNN):
        if not module.built:
            raise ValueError(f"layer {name!r} is not built (no weights yet); call it once or build() it first")
        _write_vars(group, name, [])
        _write_vars(group.create_group("cell"), module.cell.name, module.cell.get_weights())
    elif isinstance(module, TimeDistributed):
        _write_vars(group, name, [])
        _write_layer(module.layer, group.create_group("layer"))
    else:
        if hasattr(module, "built") and not module.built:
            raise ValueError(f"layer {name!r} is not built (no weights yet); call it once first")
        _write_vars(group, name, module.get_weights() if hasattr(module, "get_weights") else [])


def save_keras_weights(model_or_layer: nn.Module, path) -> None:
    """Writes weights as a Keras 3 `.weights.h5` with Keras 3's groups and datasets.

    A `Sequential` is written as Keras 3's `model.save_weights` writes that model
    (`layers/<class>[_k]/...`, its InputLayer left out, root `vars` named after the model), so
    `load_keras(model_json, weights=path)` and Keras' `model.load_weights(path)` read it. A
    single layer (LSTM, GRU, SimpleRNN, Bidirectional, Dense, ...) is written as Keras 3 saves
    that layer on its own (`cell/vars/0..2` at the root); wrap it in a Sequential for a model file.
    """
    h5py = import_h5py()
    check_keras_layers(model_or_layer, "save_keras_weights")
    plan = plan_for(model_or_layer)
    if plan is None and class_name_of(model_or_layer) not in _SUPPORTED_WRITE:
        raise ValueError(f"save_keras_weights: {type(model_or_layer).__name__} has no Keras weights layout; "
                         f"supported: Sequential, {', '.join(_SUPPORTED_WRITE)}")
    with h5py.File(path if isinstance(path, io.IOBase) else os.fspath(path), "w") as f:
        if plan is None:
            _write_layer(model_or_layer, f)
            return
        layers = f.create_group("layers")
        for _, module, key in plan:
            if key is not None:
                _write_layer(module, layers.create_group(key))
        _write_vars(f, model_or_layer.name, [])


def _input_layer(model: Sequential) -> dict:
    """The InputLayer entry a Keras 3 Sequential config starts with: the model's own, or one made
    from its first layers (token ids [batch, steps] for an Embedding, else [batch, steps, features]
    with the features a built layer's kernel takes, [batch, features] for a model without a
    recurrent layer; the batch fixed only by an InputLayer)."""
    if model.layers and isinstance(model.layers[0], InputLayer):
        return serialize(model.layers[0])
    sequences = any(isinstance(layer, (RNN, Bidirectional, TimeDistributed)) for layer in model.layers)
    batch_shape, dtype = None, "float32"
    for layer in model.layers:
        if isinstance(layer, Embedding):
            batch_shape, dtype = [None, None], "int32"
        elif isinstance(layer, (RNN, Bidirectional, TimeDistributed)) or hasattr(layer, "kernel"):
            weights = layer.get_weights() if getattr(layer, "built", True) else []
            if weights:
                features = int(np.shape(weights[0])[0])
                batch_shape = [None, None, features] if sequences else [None, features]
        if batch_shape is not None or getattr(layer, "built", True) is False:
            break
    if batch_shape is None:
        raise ValueError(f"model {model.name!r}: its input shape is unknown (no built layer reads it); give it an "
                         "lstm.layers.Input(shape=...) first, or call it once")
    for layer in model.modules():
        if isinstance(layer, RNN) and layer.stateful:
            raise ValueError(f"layer {layer.name!r}: a stateful layer needs a fixed batch size in a Keras file; give "
                             "the model an lstm.layers.Input(batch_shape=(batch, steps, features)) first")
    return {"module": "keras.layers", "class_name": "InputLayer",
            "config": {"batch_shape": batch_shape, "dtype": dtype, "sparse": False, "ragged": False,
                       "name": "input_layer", "optional": False}, "registered_name": None}


def keras_config(model: Sequential) -> dict:
    """The model's config as Keras 3 writes a Sequential's (`model.to_json()`), an InputLayer
    first: `keras.models.model_from_json` and `load_keras(json, weights=...)` read it."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected an lstm.Sequential, got {type(model).__name__}")
    check_keras_layers(model, "keras_config")
    plan_for(model)  # (every layer one that Keras has)
    entries = [serialize(layer) for layer in model.layers if not isinstance(layer, InputLayer)]
    input_layer = _input_layer(model)
    return {"module": "keras", "class_name": "Sequential",
            "config": {"name": model.name, "trainable": model.trainable, "dtype": "float32",
                       "layers": [input_layer, *entries]},
            "registered_name": None, "build_config": {"input_shape": input_layer["config"]["batch_shape"]}}


def save_keras(model: Sequential, path) -> None:
    """Writes `model` (an `lstm.Sequential`) as a Keras 3 `.keras` file: `config.json`
    (keras_config), `model.weights.h5` (save_keras_weights' layout) and `metadata.json`.
    `keras.saving.load_model(path)` loads it with no custom objects and predicts what `model`
    predicts; `load_keras(path)` reads it back. Raises ValueError naming the layer for what Keras
    cannot hold (an LSTM variant option, a layer Keras does not have, a layer not built yet)."""
    if isinstance(model, Sequential):
        check_keras_layers(model, "save_keras")
    config = keras_config(model)
    weights = io.BytesIO()
    save_keras_weights(model, weights)
    metadata = {"keras_version": KERAS_VERSION, "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
    with zipfile.ZipFile(os.fspath(path), "w") as archive:
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights.getvalue())


__all__ = ["save_keras", "save_keras_weights", "keras_config"]
