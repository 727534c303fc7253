"""ONNX export with the standard ONNX `LSTM` / `GRU` / `RNN` operators.

`export_onnx(model, path, example_input)` converts each recurrent layer with `to_torch` (so the
graph holds torch.nn.LSTM/GRU/RNN, which torch's exporter writes as ONNX LSTM (gates i, o, f,
c), GRU (z, r, h, linear_before_reset=1, which is Keras' reset_after=True) and RNN), Embedding
as Gather, Dense/TimeDistributed(Dense) as MatMul + Add + activation, Dropout and InputLayer
as nothing (inference), then calls `torch.onnx.export` (the TorchScript exporter, dynamo=False,
which needs no onnxscript) with dynamic batch and sequence-length axes.

Masks are refused: Keras' mask semantics (a plain LSTM repeats its previous output at masked
steps, leading padding and holes skip steps) cannot be expressed with the ONNX LSTM op, whose
`sequence_lens` only covers trailing padding and outputs zeros there. So Embedding(mask_zero=True)
and Masking raise a ValueError; export the model without them (or with mask_zero=False) when
the inputs carry no padding. Stateful layers, go_backwards layers and return_state inside a
Sequential are refused too.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import activations
from ..layers import (RNN, Bidirectional, Dense, Dropout, Embedding, InputLayer, Masking, RecurrentCell,
                      TimeDistributed)
from ..models import Sequential
from .torch_modules import to_torch


class _Recurrent(nn.Module):
    """A converted recurrent layer returning what the Keras layer returns (no masks)."""

    def __init__(self, layer):
        super().__init__()
        inner = layer.forward_layer if isinstance(layer, Bidirectional) else layer
        variants = inner.cell.variants() if inner.cell.kind == "lstm" else {}
        if variants:
            raise ValueError(f"export_onnx: layer {layer.name!r} uses the LSTM variant options {variants}, which the "
                             "ONNX LSTM op does not express")
        if inner.stateful:
            raise ValueError(f"export_onnx: layer {layer.name!r} is stateful; export a stateless copy (the carried "
                             "states would have to be graph inputs)")
        self.module = to_torch(layer)
        self.kind = inner.cell.kind
        self.return_sequences = layer.return_sequences
        self.return_state = layer.return_state
        self.bidirectional = isinstance(layer, Bidirectional)
        if self.return_state and self.bidirectional:
            raise ValueError(f"export_onnx: Bidirectional {layer.name!r} with return_state=True is not supported")
        self.units = inner.cell.units

    def forward(self, x):
        directions = 2 if self.bidirectional else 1
        h0 = torch.zeros(directions, x.shape[0], self.units, dtype=x.dtype, device=x.device)
        if self.kind == "lstm":
            out, (h, c) = self.module(x, (h0, h0))
            states = [h[-1], c[-1]]
        else:
            out, h = self.module(x, h0)
            states = [h[-1]]
        if self.return_sequences:
            y = out
        elif self.bidirectional:
            y = torch.cat([h[-2], h[-1]], dim=-1)
        else:
            y = h[-1]
        return (y, *states) if self.return_state else y


class _Linear(nn.Module):
    def __init__(self, dense: Dense):
        super().__init__()
        if not dense.built:
            raise ValueError(f"export_onnx: Dense {dense.name!r} has no weights yet; call the model once first")
        self.linear = nn.Linear(dense.input_dim, dense.units, bias=dense.use_bias, dtype=dense.kernel.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(dense.kernel.detach().t())
            if dense.use_bias:
                self.linear.bias.copy_(dense.bias.detach())
        self.activation = activations.get(dense.activation)

    def forward(self, x):
        return self.activation(self.linear(x))


class _Lookup(nn.Module):
    def __init__(self, embedding: Embedding):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(embedding.embeddings.detach().clone(), freeze=True)

    def forward(self, x):
        return self.embedding(x.long())


class _Graph(nn.Module):
    def __init__(self, steps: Sequence[nn.Module]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x


def _convert(layer: nn.Module, where: str) -> Optional[nn.Module]:
    if isinstance(layer, (InputLayer, Dropout)):
        return None
    if isinstance(layer, Masking):
        raise ValueError(f"export_onnx: {where} is a Masking layer; Keras' mask semantics have no ONNX LSTM/GRU/RNN "
                         "equivalent (sequence_lens covers trailing padding only, with other outputs), so masked "
                         "models are not exported")
    if isinstance(layer, Embedding):
        if layer.mask_zero:
            raise ValueError(f"export_onnx: {where} is Embedding(mask_zero=True); Keras' mask semantics have no ONNX "
                             "LSTM/GRU/RNN equivalent, so masked models are not exported (use mask_zero=False if "
                             "the inputs have no padding)")
        return _Lookup(layer)
    if isinstance(layer, Dense):
        return _Linear(layer)
    if isinstance(layer, TimeDistributed):
        if not isinstance(layer.layer, Dense):
            raise ValueError(f"export_onnx: {where}: TimeDistributed({type(layer.layer).__name__}) is not supported")
        return _Linear(layer.layer)
    if isinstance(layer, (RNN, Bidirectional)):
        return _Recurrent(layer)
    raise ValueError(f"export_onnx: {where}: {type(layer).__name__} is not supported (supported: InputLayer, "
                     "Embedding, Dense, TimeDistributed(Dense), Dropout, LSTM, GRU, SimpleRNN, Bidirectional)")


def to_exportable(model: nn.Module) -> nn.Module:
    """The plain torch module `export_onnx` exports (inference only; no masks)."""
    if isinstance(model, RecurrentCell):
        return to_torch(model)
    if isinstance(model, Sequential):
        steps = []
        for k, layer in enumerate(model.layers):
            step = _convert(layer, f"layer {k} ({getattr(layer, 'name', type(layer).__name__)!r})")
            if isinstance(step, _Recurrent) and step.return_state:
                raise ValueError(f"export_onnx: layer {layer.name!r} has return_state=True inside a Sequential")
            if step is not None:
                steps.append(step)
        return _Graph(steps).eval()
    step = _convert(model, getattr(model, "name", type(model).__name__))
    return _Graph([] if step is None else [step]).eval()


def export_onnx(model: nn.Module, path, example_input, input_names: Sequence[str] = ("inputs",),
                output_names: Optional[Sequence[str]] = None, opset_version: int = 17,
                dynamic_axes: bool = True) -> str:
    """Writes `model` (a Sequential, a recurrent layer or Bidirectional) as ONNX with the standard
    recurrent operators; inputs [batch, time, ...] get dynamic `batch` and `time` axes. Returns
    the path. `example_input` fixes the input dtype (int ids for an Embedding model)."""
    graph = to_exportable(model)
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.as_tensor(np.asarray(example_input))
    with torch.no_grad():
        outputs = graph(example_input)
    count = len(outputs) if isinstance(outputs, tuple) else 1
    if output_names is None:
        output_names = ["outputs"] if count == 1 else ["outputs"] + [f"state_{k}" for k in range(count - 1)]
    axes = None
    if dynamic_axes:
        axes = {input_names[0]: {0: "batch", 1: "time"} if example_input.dim() >= 2 else {0: "batch"}}
        for k, name in enumerate(output_names):
            shape_rank = (outputs[k] if isinstance(outputs, tuple) else outputs).dim()
            axes[name] = {0: "batch", 1: "time"} if (k == 0 and shape_rank == 3) else {0: "batch"}
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example_input,), path, dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset_version)
    return path


__all__ = ["export_onnx", "to_exportable"]
