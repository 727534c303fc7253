"""ONNX export: a model of this library's layers written as one ONNX graph (opset 17) with
onnx.helper, its recurrent layers as the standard LSTM, GRU and RNN ops.

    export_onnx(model, "model.onnx", example)               # inputs -> outputs
    export_onnx(model, "model.onnx", example, state=True)   # + every recurrent layer's state in and out
    export_onnx(model, "model.onnx", example, mask=True)    # + a mask input: the model's mask= argument

`model`: a Sequential of InputLayer, Embedding (mask_zero too), Masking, Dense,
TimeDistributed(Dense), Dropout, LSTM, GRU, SimpleRNN, RNN(cell) and Bidirectional; or one of
those layers; or a cell (one step). The graph computes in float32 (at inference: dropout,
zoneout and dropconnect are identity). The graph's inputs and outputs, batch and time dynamic:

- `inputs`: [batch, time, features] float32, or token ids [batch, time] (int32 or int64, as the
  example) for a model starting with an Embedding, or [batch, features] for a cell.
- `mask` (with mask=True): [batch, time] bool.
- with state=True, per recurrent layer in order (a Bidirectional's `forward_<name>` and
  `backward_<name>` layers): `<layer>/initial_h` [batch, units] and, for an LSTM,
  `<layer>/initial_c`. Without state=True the initial states are zeros.
- `outputs`: what the model returns (a Bidirectional with merge_mode=None returns two:
  `outputs`, `outputs_backward`).
- with state=True, and for a layer with return_state=True or a cell: `<layer>/h` and, for an LSTM,
  `<layer>/c` per recurrent layer (a cell's: `<cell>/h`, `<cell>/c`), its final states: fed back
  as the next call's `initial_*`, chunks of a sequence run as the whole sequence does (a stateful
  model deploys this way).
- with quantize=True: the same graph with int8 weights (see `export_onnx`).

Masks (Embedding(mask_zero=True), Masking, the mask input) follow Keras exactly, for any mask
pattern (see `onnx_masks`). What ONNX cannot express is refused with a ValueError naming the layer
and the option (see `onnx_recurrent`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..layers import (RNN, Bidirectional, Dense, Dropout, Embedding, InputLayer, Masking, RecurrentCell,
                      TimeDistributed)
from ..models import Sequential
from .onnx_graph import OPSET, Graph
from .onnx_layers import dense, embedding, embedding_mask, masking
from .onnx_masks import Mask
from .onnx_recurrent import STATE_NAMES, LayerValues, recurrent_cell, recurrent_layer

SUPPORTED = ("InputLayer, Embedding, Masking, Dense, TimeDistributed(Dense), Dropout, LSTM, GRU, SimpleRNN, "
             "RNN, Bidirectional")
OUTPUT, BACKWARD_OUTPUT, MASK = "outputs", "outputs_backward", "mask"


@dataclass
class Flow:
    """The value between two layers: its name, element type, features, whether it has a time
    axis, and the mask reaching the next layer."""

    value: str
    elem_type: int
    features: int
    sequence: bool
    mask: Optional[Mask] = None


@dataclass
class Settings:
    feed_state: bool
    batch: object
    time: object


def export_onnx(model: nn.Module, path, example_input, input_names: Sequence[str] = ("inputs",),
                output_names: Optional[Sequence[str]] = None, opset_version: int = OPSET,
                dynamic_axes: bool = True, *, state: bool = False, mask: bool = False, quantize: bool = False) -> str:
    """Writes `model` as ONNX (see the module docstring); returns the path.

    example_input: an example batch (array or tensor): its dtype (float, or int ids) and rank make
        the graph's input; its shape only matters with dynamic_axes=False (then batch and time are
        the example's).
    input_names: the data input's name (one). output_names: the outputs' names, in order (default:
        `outputs`, then the states as `<layer>/h`, `<layer>/c`).
    opset_version: 17 (the only one written).
    state: initial states as graph inputs and final states as outputs, per recurrent layer.
    mask: a `mask` [batch, time] bool graph input, passed as the model's mask= argument.
    quantize: int8 weights, activations quantized at run time, by ONNX Runtime's quantize_dynamic
        (per output channel, signed int8 in 7 bits: reduce_range, exact on CPUs without VNNI too):
        its LSTM runs as DynamicQuantizeLSTM, Dense as MatMulInteger, Embedding as int8 rows; GRU
        and SimpleRNN stay float32 (ONNX Runtime has no quantized form of them). Needs onnxruntime.
    """
    if opset_version != OPSET:
        raise ValueError(f"opset_version: this exporter writes opset {OPSET}, got {opset_version!r}")
    input_names = [input_names] if isinstance(input_names, str) else list(input_names)
    if len(input_names) != 1:
        raise ValueError(f"input_names: expected one name (the data input's; state inputs are named by their "
                         f"layers), got {input_names}")
    example = example_input if isinstance(example_input, torch.Tensor) else torch.as_tensor(np.asarray(example_input))
    for flag, value in (("state", state), ("mask", mask), ("dynamic_axes", dynamic_axes), ("quantize", quantize)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected True or False, got {value!r}")
    graph = Graph(reserved=_reserved_names(model, input_names, output_names))
    elem_type = TensorProto.FLOAT if example.is_floating_point() else helper.np_dtype_to_tensor_dtype(
        example.numpy().dtype)
    if elem_type not in (TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64):
        raise ValueError(f"example_input: expected floats or int32/int64 token ids, got dtype {example.dtype}")
    rank = 2 if isinstance(model, RecurrentCell) or _starts_with_embedding(model) else 3
    if example.dim() != rank:
        expected = "[batch, time] token ids" if _starts_with_embedding(model) else (
            "[batch, features]" if rank == 2 else "[batch, time, features]")
        raise ValueError(f"example_input: expected a {rank}-D array {expected} for this model, got shape "
                         f"{tuple(example.shape)}")
    cell = isinstance(model, RecurrentCell)
    batch, time = ("batch", None if cell else "time") if dynamic_axes else (example.shape[0], example.shape[1])
    settings = Settings(state, batch, time)
    shape = [batch, *example.shape[1:]] if cell else [batch, time, *example.shape[2:]]
    flow = Flow(graph.add_input(input_names[0], elem_type, shape), elem_type, int(example.shape[-1]),
                sequence=not cell)
    if mask:
        if cell:
            raise ValueError("mask: a cell runs one step, which takes no mask; export it with mask=False")
        flow.mask = Mask(graph, graph.add_input(MASK, TensorProto.BOOL, [batch, time]))

    if cell:
        values = recurrent_cell(graph, _as_float(graph, flow).value, model, state, batch)
        outputs = [(values.outputs[0], [batch, model.output_size])]
        states = values.states
    else:
        outputs, states = _model(graph, flow, model, settings)
    named = [(OUTPUT if k == 0 else BACKWARD_OUTPUT, value, value_shape) for k, (value, value_shape) in
             enumerate(outputs)]
    named += [(name, value, [batch, size]) for name, value, size in states]
    if output_names is not None:
        output_names = [output_names] if isinstance(output_names, str) else list(output_names)
        if len(output_names) != len(named):
            raise ValueError(f"output_names: the graph has {len(named)} outputs ({', '.join(n for n, _, _ in named)}), "
                             f"got {len(output_names)} names")
        named = [(name, value, value_shape) for name, (_, value, value_shape) in zip(output_names, named)]
    for name, value, value_shape in named:
        graph.add_output(value, name, value_shape)
    proto = graph.model(getattr(model, "name", type(model).__name__),
                        doc=f"exported by lstm from {type(model).__name__}")
    onnx.checker.check_model(proto)
    path = os.fspath(path)
    if quantize:
        _save_quantized(proto, path)
    else:
        onnx.save(proto, path)
    return path


def _save_quantized(proto, path: str) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ModuleNotFoundError('export_onnx(quantize=True) needs onnxruntime: pip install "lstm[onnx]"',
                                  name="onnxruntime") from None
    with tempfile.TemporaryDirectory() as folder:
        float_path = os.path.join(folder, "float32.onnx")
        onnx.save(proto, float_path)
        # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2; AVX-512 without VNNI) ONNX
        # Runtime's u8 x s8 products add pairs into int16, which full 8-bit weights saturate: the
        # test's LSTM came out 0.15 off (outputs up to 0.37) on an AVX2 AMD EPYC, 0.004 with 7 bits.
        # A file runs on whatever CPU it is given, so every file takes the safe form.
        quantize_dynamic(float_path, path, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)


def _model(graph: Graph, flow: Flow, model: nn.Module, settings: Settings) -> tuple:
    """([(output value, shape)], [(state output name, value)]) of a Sequential or a single layer."""
    in_sequential = isinstance(model, Sequential)
    layers = list(model.layers) if in_sequential else [model]
    states, outputs = [], None
    for k, layer in enumerate(layers):
        where = f"layer {k} ({getattr(layer, 'name', type(layer).__name__)!r})" if in_sequential else \
            f"layer {getattr(layer, 'name', type(layer).__name__)!r}"
        if isinstance(layer, (RNN, Bidirectional)):
            values, flow = _recurrent(graph, flow, layer, where, settings)
            if values.outputs[1:] and in_sequential:
                raise ValueError(f"export_onnx: {where}: Bidirectional with merge_mode=None returns two tensors, "
                                 "which a Sequential cannot pass on")
            if layer.return_state and in_sequential:
                raise ValueError(f"export_onnx: {where} has return_state=True inside a Sequential (which passes "
                                 "one tensor on); export with state=True for the states")
            if settings.feed_state or layer.return_state:
                states += values.states
            outputs = [(value, _shape(flow, settings)) for value in values.outputs]
        else:
            flow = _layer(graph, flow, layer, where)
            outputs = [(flow.value, _shape(flow, settings))]
    return outputs, states


def _layer(graph: Graph, flow: Flow, layer: nn.Module, where: str) -> Flow:
    """The flow after a non-recurrent layer."""
    if isinstance(layer, (InputLayer, Dropout)):
        return flow
    if isinstance(layer, Embedding):
        if not flow.sequence:
            raise ValueError(f"export_onnx: {where}: an Embedding reads token ids [batch, time]")
        value = embedding(graph, flow.value, layer, flow.elem_type)
        mask = embedding_mask(graph, flow.value, flow.elem_type) if layer.mask_zero else None
        return Flow(value, TensorProto.FLOAT, layer.output_dim, True, mask)
    flow = _as_float(graph, flow)
    if isinstance(layer, Masking):
        if not flow.sequence:
            raise ValueError(f"export_onnx: {where}: Masking reads [batch, time, features]")
        value, mask = masking(graph, flow.value, layer)
        return replace(flow, value=value, mask=mask)
    dense_layer = layer.layer if isinstance(layer, TimeDistributed) else layer
    if isinstance(dense_layer, Dense):
        if not dense_layer.built:
            raise ValueError(f"export_onnx: {where} has no weights yet; call the model once (or build it) first")
        _check_features(flow, dense_layer.input_dim, where)
        return replace(flow, value=dense(graph, flow.value, dense_layer, where), features=dense_layer.units)
    if isinstance(layer, TimeDistributed):
        raise ValueError(f"export_onnx: {where}: TimeDistributed({type(layer.layer).__name__}) is not supported "
                         "(TimeDistributed(Dense) is)")
    raise ValueError(f"export_onnx: {where}: {type(layer).__name__} is not supported (supported: {SUPPORTED})")


def _recurrent(graph: Graph, flow: Flow, layer, where: str, settings: Settings) -> tuple:
    flow = _as_float(graph, flow)
    if not flow.sequence:
        raise ValueError(f"export_onnx: {where} reads [batch, time, features]; the layer before it returns no "
                         "time axis (return_sequences=False)")
    cell = (layer.forward_layer if isinstance(layer, Bidirectional) else layer).cell
    if cell.built:
        _check_features(flow, cell.input_dim, where)
    values: LayerValues = recurrent_layer(graph, flow.value, layer, flow.mask, settings.feed_state, settings.batch)
    features = cell.output_size
    if isinstance(layer, Bidirectional):
        other = layer.backward_layer.cell.output_size
        features = features + other if layer.merge_mode == "concat" else features
    sequence = layer.return_sequences
    return values, Flow(values.outputs[0], TensorProto.FLOAT, features, sequence, flow.mask if sequence else None)


def _as_float(graph: Graph, flow: Flow) -> Flow:
    if flow.elem_type == TensorProto.FLOAT:
        return flow
    return replace(flow, value=graph.op("Cast", [flow.value], to=TensorProto.FLOAT), elem_type=TensorProto.FLOAT)


def _check_features(flow: Flow, expected: int, where: str) -> None:
    if flow.features != expected:
        raise ValueError(f"export_onnx: {where} expects {expected} input features, got {flow.features} (from the "
                         "example input and the layers before)")


def _shape(flow: Flow, settings: Settings) -> list:
    return [settings.batch] + ([settings.time] if flow.sequence else []) + [flow.features]


def _starts_with_embedding(model: nn.Module) -> bool:
    layers = list(model.layers) if isinstance(model, Sequential) else [model]
    first = next((layer for layer in layers if not isinstance(layer, InputLayer)), None)
    return isinstance(first, Embedding)


def _reserved_names(model: nn.Module, input_names: list, output_names) -> set:
    """Every name the graph's inputs and outputs may take, kept from its inner values."""
    names = {*input_names, OUTPUT, BACKWARD_OUTPUT, MASK}
    if output_names is not None:
        names |= {output_names} if isinstance(output_names, str) else set(output_names)
    for sub in model.modules():
        if isinstance(sub, (RNN, RecurrentCell)):
            names |= {f"{sub.name}/{prefix}{state}" for state in STATE_NAMES for prefix in ("", "initial_")}
    return names


__all__ = ["export_onnx"]
