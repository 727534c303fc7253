"""The ONNX nodes of the layers around the recurrent ones: Embedding (Gather), Masking, Dense and
TimeDistributed(Dense) (MatMul, Add, the activation), and the masks Embedding(mask_zero=True)
and Masking make (see `onnx_masks`)."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ..layers import Dense, Embedding, Masking
from .onnx_graph import Graph
from .onnx_masks import Mask


def weight(tensor) -> np.ndarray:
    """A weight as float32 NumPy (the graphs compute in float32)."""
    return tensor.detach().float().cpu().numpy()


def activation(graph: Graph, x: str, name, where: str) -> str:
    """`x` through the Keras activation `name` (what `lstm.activations.get(name)` computes)."""
    simple = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "softplus": "Softplus", "softsign": "Softsign",
              "exponential": "Exp", "hard_silu": "HardSwish", "hard_swish": "HardSwish", "selu": "Selu"}
    if name == "linear":
        return x
    if name in simple:  # (ONNX's Selu and HardSwish constants are torch's)
        return graph.op(simple[name], [x])
    if name == "softmax":
        return graph.op("Softmax", [x], axis=-1)
    if name == "elu":
        return graph.op("Elu", [x], alpha=1.0)
    if name == "leaky_relu":
        return graph.op("LeakyRelu", [x], alpha=0.2)
    if name == "hard_sigmoid":  # Keras 3: relu6(x + 3) / 6
        return graph.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if name == "hard_sigmoid_tf_keras":
        return graph.op("HardSigmoid", [x], alpha=0.2, beta=0.5)
    if name in ("relu6", "hard_tanh"):
        low, high = (0.0, 6.0) if name == "relu6" else (-1.0, 1.0)
        return graph.op("Clip", [x, graph.constant(low, dtype=np.float32), graph.constant(high, dtype=np.float32)])
    if name in ("silu", "swish"):
        return graph.op("Mul", [x, graph.op("Sigmoid", [x])])
    if name == "mish":
        return graph.op("Mul", [x, graph.op("Tanh", [graph.op("Softplus", [x])])])
    if name == "log_sigmoid":
        return graph.op("Neg", [graph.op("Softplus", [graph.op("Neg", [x])])])
    if name == "gelu":  # torch's exact GELU, x/2 (1 + erf(x/√2)) (ONNX's Gelu op is opset 20)
        erf = graph.op("Erf", [graph.op("Div", [x, graph.constant(math.sqrt(2.0), dtype=np.float32)])])
        half = graph.op("Mul", [x, graph.constant(0.5, dtype=np.float32)])
        return graph.op("Mul", [half, graph.op("Add", [erf, graph.constant(1.0, dtype=np.float32)])])
    raise ValueError(f"export_onnx: {where}: activation {getattr(name, '__name__', name)!r} is a custom callable, "
                     "which has no ONNX form; use one of Keras' activation names")


def dense(graph: Graph, x: str, layer: Dense, where: str) -> str:
    """activation(x @ kernel + bias) over the last axis of `x` (any rank)."""
    y = graph.op("MatMul", [x, graph.constant(weight(layer.kernel), f"{layer.name}/kernel")], f"{layer.name}/MatMul")
    if layer.use_bias:
        y = graph.op("Add", [y, graph.constant(weight(layer.bias), f"{layer.name}/bias")], f"{layer.name}/Add")
    return activation(graph, y, layer.activation, where)


def embedding(graph: Graph, ids: str, layer: Embedding, ids_type: int) -> str:
    """The rows of `embeddings` at the ids [B, T] (float ids cast as the layer casts them)."""
    if ids_type not in (TensorProto.INT32, TensorProto.INT64):
        ids = graph.op("Cast", [ids], to=TensorProto.INT64)
    return graph.op("Gather", [graph.constant(weight(layer.embeddings), f"{layer.name}/embeddings"), ids],
                    f"{layer.name}/Gather", axis=0)


def embedding_mask(graph: Graph, ids: str, ids_type: int) -> Mask:
    """mask_zero: the steps whose id is not 0."""
    zero = graph.constant(np.zeros((), dtype=_NUMPY[ids_type]))
    return Mask(graph, graph.op("Not", [graph.op("Equal", [ids, zero])], "mask"))


def masking(graph: Graph, x: str, layer: Masking) -> tuple:
    """(the masked inputs, the Mask): a step counts when any feature differs from mask_value;
    the others become zeros."""
    differs = graph.op("Not", [graph.op("Equal", [x, graph.constant(layer.mask_value, dtype=np.float32)])])
    counts = graph.op("ReduceMax", [graph.op("Cast", [differs], to=TensorProto.FLOAT)], axes=[-1], keepdims=0)
    valid = graph.op("Cast", [counts], f"{layer.name}/mask", to=TensorProto.BOOL)
    keep = graph.op("Unsqueeze", [valid, graph.ints(-1)])
    return graph.op("Where", [keep, x, graph.constant(0.0, dtype=np.float32)], layer.name), Mask(graph, valid)


_NUMPY = {TensorProto.INT32: np.int32, TensorProto.INT64: np.int64, TensorProto.FLOAT: np.float32,
          TensorProto.DOUBLE: np.float64, TensorProto.INT16: np.int16, TensorProto.INT8: np.int8,
          TensorProto.UINT8: np.uint8, TensorProto.FLOAT16: np.float16}
