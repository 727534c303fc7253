"""Keras model files without TensorFlow: read them into this library's layers, write weights back.

`load_keras(path, weights=None)` reads
- a Keras 3 `.keras` zip (`config.json` + `model.weights.h5`),
- a legacy HDF5 model `.h5` written by tf_keras (Keras 2) or by Keras 3 (`model_config` root
  attribute + `model_weights` group),
- a model JSON (`model.to_json()`) with `weights=` a Keras 3 `.weights.h5` (or a legacy
  weights `.h5`),
with h5py, and returns an `lstm.Sequential` of this library's layers (Sequential models and
single-input functional chains). Where each format keeps the weights is described in
`keras_golden/models/FORMATS.md`: Keras 3 addresses a layer's weights by class and position
(`layers/lstm_1/cell/vars/0`), the legacy format by layer name and the `weight_names` attribute.

`load_keras_weights(model_or_layer, path)` reads a Keras 3 `.weights.h5` (or a legacy `.h5`) into an
existing model or layer; keras_writing.py writes them, and whole `.keras` files. Nothing here
unpickles anything.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import Any, Optional

import numpy as np
from torch import nn

from ..layers import RNN, Bidirectional, InputLayer, TimeDistributed, deserialize
from ..models import Sequential

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def import_h5py():
    try:
        import h5py
    except ImportError as error:  # pragma: no cover - h5py is a dependency of this module
        raise ImportError("reading and writing Keras files needs h5py: pip install h5py") from error
    return h5py


def keras_snake_case(name: str) -> str:
    """Keras' `utils.naming.to_snake_case`: LSTM -> lstm, SimpleRNN -> simple_rnn, InputLayer -> input_layer."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    return value


# ----- architecture -----------------------------------------------------------------------------
def _dialect(top: dict, keras_version: Optional[str]) -> Optional[str]:
    version = keras_version or top.get("keras_version")
    if isinstance(version, str) and version:
        return "tf_keras" if version.split(".")[0] in ("1", "2") else "keras3"
    if "module" in top:
        return "keras3"
    return None  # per layer (lstm.serialization.detect_dialect)


def _layer_name(entry: dict) -> str:
    return entry.get("name") or (entry.get("config") or {}).get("name") or "?"


def _tensor_refs(value: Any) -> list:
    """input_layers/output_layers: Keras 3 flat ["x", 0, 0] or nested [["x", 0, 0], ...]."""
    if not isinstance(value, list):
        raise ValueError(f"model config: expected a list of tensor references, got {value!r}")
    if value and isinstance(value[0], str):
        return [value]
    return [v for v in value if isinstance(v, list)]


def _node_sources(node: Any) -> list:
    """The input tensors of one inbound node, as (layer name, node index, tensor index)."""
    sources = []
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        def walk(value):
            if isinstance(value, dict):
                if value.get("class_name") == "__keras_tensor__":
                    history = (value.get("config") or {}).get("keras_history")
                    sources.append(tuple(history[:3]))
                    return
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
        walk(node.get("args", []))
        walk(node.get("kwargs", {}))
    elif isinstance(node, list):  # tf_keras: [["x", 0, 0, {kwargs}], ...]
        for entry in node:
            if isinstance(entry, list) and entry and isinstance(entry[0], str):
                sources.append(tuple(entry[:3]))
    else:
        raise ValueError(f"model config: unreadable inbound node {node!r}")
    return sources


def _functional_chain(config: dict) -> list:
    layers = config.get("layers")
    if not isinstance(layers, list):
        raise ValueError("model config: a functional model config needs a 'layers' list")
    inputs = _tensor_refs(config.get("input_layers", []))
    outputs = _tensor_refs(config.get("output_layers", []))
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"model config: only single-input, single-output models are supported, got "
                         f"{len(inputs)} inputs and {len(outputs)} outputs")
    by_name = {_layer_name(entry): entry for entry in layers}
    parent = {}
    for entry in layers:
        name = _layer_name(entry)
        nodes = entry.get("inbound_nodes") or []
        if entry.get("class_name") == "InputLayer":
            continue
        if len(nodes) != 1:
            raise ValueError(f"model config: layer {name!r} is called {len(nodes)} times; only a chain of layers "
                             "each called once is supported")
        sources = _node_sources(nodes[0])
        if len(sources) != 1:
            raise ValueError(f"model config: layer {name!r} takes {len(sources)} input tensors; only "
                             "single-input chains are supported")
        source, _, tensor_index = sources[0]
        if tensor_index != 0:
            raise ValueError(f"model config: layer {name!r} reads output {tensor_index} of {source!r}; only "
                             "single-output layers are supported")
        parent[name] = source
    chain, name = [], outputs[0][0]
    while name != inputs[0][0]:
        if name not in parent or name in chain:
            raise ValueError(f"model config: cannot follow the chain from output {outputs[0][0]!r} back to input "
                             f"{inputs[0][0]!r} (at {name!r})")
        chain.append(name)
        name = parent[name]
    chain.append(name)
    if len(chain) != len(layers):
        extra = sorted(set(by_name) - set(chain))
        raise ValueError(f"model config: layers {extra} are not on the single chain from input to output; "
                         "branching models are not supported")
    if name not in by_name:
        raise ValueError(f"model config: input layer {name!r} is missing")
    return [by_name[n] for n in reversed(chain)]


def model_from_config(top: dict, keras_version: Optional[str] = None) -> tuple:
    """(Sequential, [(Keras class name, module, Keras 3 weights key or None)]) from a model config."""
    if not isinstance(top, dict) or "class_name" not in top:
        raise ValueError("model config: expected {'class_name': ..., 'config': {...}} (is this a Keras model?)")
    kind = top["class_name"]
    config = top.get("config") or {}
    dialect = _dialect(top, keras_version)
    if kind == "Sequential":
        entries = config.get("layers") if isinstance(config, dict) else None
        if not isinstance(entries, list):
            raise ValueError("model config: a Sequential config needs a 'layers' list")
        functional = False
    elif kind in ("Functional", "Model"):
        entries, functional = _functional_chain(config), True
    else:
        raise ValueError(f"model config: unsupported model class {kind!r}; expected Sequential or a "
                         "functional Model")
    modules, plan, counts = [], [], {}
    for entry in entries:
        if not isinstance(entry, dict) or "class_name" not in entry:
            raise ValueError(f"model config: unreadable layer entry {entry!r}")
        class_name = entry["class_name"]
        try:
            module = deserialize({"class_name": class_name, "config": entry.get("config") or {}}, dialect)
        except (ValueError, TypeError) as error:
            raise ValueError(f"layer {_layer_name(entry)!r} ({class_name}): {error}") from error
        key = None
        if functional or class_name != "InputLayer":  # a Sequential's InputLayer has no weights group
            key = keras_snake_case(class_name)
            n = counts.get(key, 0)
            counts[key] = n + 1
            key = key if n == 0 else f"{key}_{n}"
        modules.append(module)
        plan.append((class_name, module, key))
    name = config.get("name") if isinstance(config, dict) else None
    return Sequential(modules, name=name), plan


# ----- reading weights --------------------------------------------------------------------------
def _has_weights(module: nn.Module) -> bool:
    if isinstance(module, InputLayer):
        return False
    return any(True for _ in module.parameters()) or isinstance(module, (RNN, Bidirectional, TimeDistributed)) \
        or bool(getattr(module, "_weight_names", ()))


def _vars(group, path: str) -> list:
    if "vars" not in group:
        raise ValueError(f"weights file: no group {path}/vars")
    variables = group["vars"]
    return [np.asarray(variables[str(i)]) for i in range(len(variables))]


def _keras3_arrays(module: nn.Module, group, path: str) -> list:
    def child(name):
        if name not in group:
            raise ValueError(f"weights file: no group {path}/{name}")
        return group[name], f"{path}/{name}"

    if isinstance(module, Bidirectional):
        return (_keras3_arrays(module.forward_layer, *child("forward_layer"))
                + _keras3_arrays(module.backward_layer, *child("backward_layer")))
    if isinstance(module, RNN):
        return _vars(*child("cell"))
    if isinstance(module, TimeDistributed):
        return _keras3_arrays(module.layer, *child("layer"))
    return _vars(group, path)


def _set(module, arrays: list, where: str) -> None:
    try:
        module.set_weights(arrays)
    except (ValueError, TypeError) as error:
        raise ValueError(f"layer {getattr(module, 'name', '?')!r}: weights at {where} do not fit: {error}") from error


def _load_keras3_weights(plan: list, f) -> None:
    if "layers" not in f:
        raise ValueError("weights file: no 'layers' group (not a Keras 3 .weights.h5)")
    root = f["layers"]
    for class_name, module, key in plan:
        if key is None or not _has_weights(module):
            continue
        if key not in root:
            raise ValueError(f"weights file: no group layers/{key} for layer {module.name!r} ({class_name})")
        _set(module, _keras3_arrays(module, root[key], f"layers/{key}"), f"layers/{key}")


def _legacy_root(f):
    if "model_weights" in f:
        return f["model_weights"]
    if "layer_names" in f.attrs:
        return f
    return None


def _load_legacy_weights(plan: list, root) -> None:
    names = _decode(root.attrs.get("layer_names", []))
    for class_name, module, _ in plan:
        if not _has_weights(module):
            continue
        name = module.name
        if name not in root:
            raise ValueError(f"weights file: no weights for layer {module.name!r} ({class_name}); the file has "
                             f"{names}")
        group = root[name]
        weight_names = _decode(group.attrs.get("weight_names", []))
        _set(module, [np.asarray(group[w]) for w in weight_names], f"model_weights/{name}")


def _load_weights_file(plan: list, f) -> None:
    if "layers" in f:
        _load_keras3_weights(plan, f)
        return
    root = _legacy_root(f)
    if root is None:
        raise ValueError("weights file: neither a Keras 3 weights file ('layers' group) nor a legacy HDF5 "
                         "weights file ('model_weights' / 'layer_names')")
    _load_legacy_weights(plan, root)


# ----- entry points -----------------------------------------------------------------------------
def _read_head(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(8)


def _open_h5(source, what: str):
    h5py = import_h5py()
    try:
        return h5py.File(source, "r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{what}: cannot read the HDF5 data (truncated or corrupt?): {error}") from error


def _weights_into(plan: list, weights, what: str) -> None:
    if not os.path.exists(weights):
        raise FileNotFoundError(f"weights: no such file {weights!r}")
    if _read_head(weights) != _HDF5_MAGIC:
        raise ValueError(f"{weights}: not an HDF5 weights file")
    with _open_h5(weights, str(weights)) as f:
        _load_weights_file(plan, f)


def _load(path, weights) -> Sequential:
    head = _read_head(path)
    if head.startswith(_ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(path)
            members = set(archive.namelist())
            if "config.json" not in members:
                raise ValueError(f"{path}: a zip without config.json is not a Keras .keras file")
            top = json.loads(archive.read("config.json"))
            version = None
            if "metadata.json" in members:
                version = json.loads(archive.read("metadata.json")).get("keras_version")
            model, plan = model_from_config(top, version)
            if weights is not None:
                _weights_into(plan, weights, str(weights))
            elif "model.weights.h5" in members:
                with _open_h5(io.BytesIO(archive.read("model.weights.h5")), f"{path}: model.weights.h5") as f:
                    _load_keras3_weights(plan, f)
            else:
                raise ValueError(f"{path}: no model.weights.h5 inside (members: {sorted(members)})")
        except (zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{path}: not a readable .keras zip (truncated or corrupt?): {error}") from error
        return model
    if head == _HDF5_MAGIC:
        with _open_h5(path, str(path)) as f:
            if "model_config" not in f.attrs:
                if "layers" in f or _legacy_root(f) is not None:
                    raise ValueError(f"{path}: a weights-only file (no model_config); pass the model's JSON "
                                     "(model.to_json()) as path and this file as weights=")
                raise ValueError(f"{path}: an HDF5 file that is not a Keras model (no model_config attribute)")
            top = json.loads(_decode(f.attrs["model_config"]))
            version = _decode(f.attrs.get("keras_version"))
            model, plan = model_from_config(top, version)
            if weights is not None:
                _weights_into(plan, weights, str(weights))
            else:
                root = _legacy_root(f)
                if root is None:
                    raise ValueError(f"{path}: no model_weights group (a model saved without weights?)")
                _load_legacy_weights(plan, root)
        return model
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        top = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a Keras model file (expected a .keras zip, an HDF5 .h5 model or a model "
                         "JSON)") from error
    model, plan = model_from_config(top)
    if weights is None:
        raise ValueError(f"{path}: a model JSON holds no weights; pass weights= a Keras .weights.h5 file")
    _weights_into(plan, weights, str(weights))
    return model


def load_keras(path, weights=None) -> Sequential:
    """A Keras model file as an `lstm.Sequential` of this library's layers, in eval mode.

    `path`: a `.keras` zip, a legacy `.h5` model (tf_keras or Keras 3), or a model JSON
    (`model.to_json()`), then `weights=` is required (a Keras 3 `.weights.h5` or a legacy
    weights `.h5`). `model(inputs)` reproduces Keras' `model(inputs, training=False)`; masks
    from Embedding(mask_zero) / Masking flow to the recurrent layers; stateful layers keep
    their states across calls (from zeros, as Keras' saved files do not hold them). Raises
    ValueError for a file that is not a Keras model, a truncated file, or an unsupported layer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        model = _load(path, None if weights is None else os.fspath(weights))
    except (FileNotFoundError, ImportError):
        raise
    except ValueError as error:  # a config error ("layer 'lstm' (LSTM): ...") gets the file's name in front
        files = [path] + ([os.fspath(weights)] if weights is not None else [])
        if any(f in str(error) for f in files):
            raise
        raise ValueError(f"{' with weights '.join(files)}: {error}") from error
    except (OSError, KeyError, RuntimeError, TypeError, AttributeError, IndexError, EOFError) as error:
        raise ValueError(f"{path}: cannot read this Keras file ({type(error).__name__}: {error})") from error
    return model.eval()


def load_keras_weights(target: nn.Module, path) -> nn.Module:
    """Reads a Keras 3 `.weights.h5` (or a legacy weights `.h5`) into an existing model or layer
    (the layout `save_keras_weights` writes for it). Returns `target`."""
    from .keras_writing import plan_for

    path = os.fspath(path)
    plan = plan_for(target)
    with _open_h5(path, path) as f:
        try:
            if plan is None:
                _set(target, _keras3_arrays(target, f, ""), path)
            else:
                _load_weights_file(plan, f)
        except (KeyError, OSError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot read these weights ({type(error).__name__}: {error})") from error
    return target


__all__ = ["load_keras", "load_keras_weights", "model_from_config", "keras_snake_case"]
