"""A small builder of one ONNX graph: nodes, constant initializers, inputs and outputs, with fresh
value names. The exporter's modules (onnx_layers, onnx_recurrent, onnx_export) write through it."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

# ONNX opset 17: it has every op the graphs need, the recurrent ones at their newest version (LSTM,
# GRU and RNN are at version 14 until opset 22, which only adds bfloat16), and runtimes read it
# widely (ONNX Runtime since 1.12).
OPSET = 17
# The IR version of the ONNX release that introduced opset 17 (1.12): a newer one would be
# refused by runtimes that read opset 17.
IR_VERSION = 8

Shape = Sequence[Union[int, str, None]]


class Graph:
    """Nodes and values of one graph. `op` adds a node and returns its output name(s); values
    are named `<hint>` or `<hint>_<k>`, unique in the graph and never one of the `reserved` names
    (the graph's input and output names, known before the nodes that use them)."""

    def __init__(self, reserved: Iterable[str] = ()):
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: set = set(reserved)
        self._io: set = set()
        self._constants: dict = {}

    def fresh(self, hint: str) -> str:
        """An unused value name starting with `hint`."""
        name, k = hint, 0
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def constant(self, value, hint: str = "const", dtype=None) -> str:
        """An initializer holding `value` (an array, or a scalar of `dtype`); equal small constants
        are shared."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        name = self.fresh(hint)
        # (a copy: np.ascontiguousarray would make a scalar 1-D)
        self.initializers.append(numpy_helper.from_array(array.copy(order="C"), name))
        if key is not None:
            self._constants[key] = name
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, slice bounds)."""
        return self.constant(np.array(values, dtype=np.int64), "ints")

    def op(self, op_type: str, inputs: Sequence[str], hint: Optional[str] = None,
           outputs: Union[int, Sequence[Optional[str]]] = 1, **attributes):
        """Adds an `op_type` node; returns its output name, or a list of names for `outputs` > 1 or
        a list of hints (None: an omitted optional output, named ""). An empty input name is an
        omitted optional input."""
        hints = [hint or op_type] * outputs if isinstance(outputs, int) else list(outputs)
        names = ["" if h is None else self.fresh(h) for h in hints]
        self.nodes.append(helper.make_node(op_type, list(inputs), names,
                                           name=self.fresh(f"node/{next(n for n in names if n)}"), **attributes))
        return names[0] if outputs == 1 else names

    def _claim(self, name: str) -> None:
        if name in self._io:
            raise ValueError(f"export_onnx: two graph inputs or outputs would be named {name!r}; give the layers "
                             "unique names")
        self._io.add(name)
        self._names.add(name)

    def add_input(self, name: str, elem_type: int, shape: Shape) -> str:
        """A graph input called `name`."""
        self._claim(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, value: str, name: str, shape: Optional[Shape], elem_type: int = TensorProto.FLOAT) -> None:
        """Exposes `value` as the graph output `name` (`shape` None: not declared)."""
        self._claim(name)
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh(f"node/{name}")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape)))

    def model(self, name: str, doc: str = "") -> ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers, doc_string=doc)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                 producer_name="lstm")
