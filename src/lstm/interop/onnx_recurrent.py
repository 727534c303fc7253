"""The recurrent layers, cells and Bidirectional as ONNX's standard LSTM, GRU and RNN ops (version 14,
the newest in opset 17).

Weights: W = kernel.T and R = recurrent_kernel.T per gate block, B = [input bias, recurrent bias].
ONNX's LSTM gates are i, o, f, c (Keras': i, f, c, o); its GRU's are z, r, h, as Keras', with
Keras' reset_after=True being linear_before_reset=1 (both bias rows used), reset_after=False
linear_before_reset=0. go_backwards is direction="reverse" (its outputs then flipped: Keras returns
them in processing order); Bidirectional is one direction="bidirectional" op, or two ops when its
backward layer differs from the forward one in what one op shares. Activations map to the ops'
`activations` where ONNX has the same function; others are refused.

LSTM variants: peephole -> P (ONNX's output gate reads the new C, as this library's does);
forget_bias folded into B; coupled (CIFG, i = 1 - f) -> an input gate with the forget gate's
weights negated, as σ(-z) = 1 - σ(z) for the sigmoid and both hard sigmoids (ONNX's
input_forget=1 is not it: ONNX Runtime couples the other way, f = 1 - i); zoneout,
recurrent_dropconnect and the dropouts are identity at inference. Refused: cell_clip (ONNX's `clip`
clips the gates' pre-activations, not C), proj_size (the projected h feeds the recurrence, which
the ops cannot do) and layer_norm.

States: without `feed_state` the initial states are zeros (ONNX's default); with it each
direction takes `<name>/initial_h` (and `<name>/initial_c`) [batch, units] graph inputs, `name`
its layer's (a Bidirectional's `forward_...` and `backward_...` layers). Masks: see `onnx_masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from onnx import TensorProto

from ..layers import RNN, Bidirectional, RecurrentCell
from .onnx_graph import Graph
from .onnx_layers import weight
from .onnx_masks import Mask, reversed_in_time

OP_TYPES = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "RNN"}
STATE_NAMES = ("h", "c")

# Keras activation -> (ONNX's name for it in the recurrent ops, alpha, beta); None: no such parameter
OP_ACTIVATIONS = {
    "sigmoid": ("Sigmoid", None, None), "tanh": ("Tanh", None, None), "relu": ("Relu", None, None),
    "softsign": ("Softsign", None, None), "softplus": ("Softplus", None, None),
    "linear": ("Affine", 1.0, 0.0), "elu": ("Elu", 1.0, None), "leaky_relu": ("LeakyRelu", 0.2, None),
    "hard_sigmoid": ("HardSigmoid", 1 / 6, 0.5), "hard_sigmoid_tf_keras": ("HardSigmoid", 0.2, 0.5),
}
DEFAULT_ACTIVATIONS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh"), "simple_rnn": ("tanh",)}
# the recurrent activations with σ(-z) = 1 - σ(z), which a coupled input gate needs
SYMMETRIC = ("sigmoid", "hard_sigmoid", "hard_sigmoid_tf_keras")
INFERENCE_IDENTITY = ("zoneout", "recurrent_dropconnect")


def refuse(where: str, option: str, why: str) -> ValueError:
    return ValueError(f"export_onnx: {where}: {option} {why}")


@dataclass
class Direction:
    """One recurrence of a layer: its cell, the layer's name (of its state inputs and outputs),
    whether it runs backwards, and what its masked steps output."""

    cell: RecurrentCell
    name: str
    backward: bool = False
    zero_output_for_mask: bool = False
    op: dict = field(init=False)

    def __post_init__(self):
        self.op = op_weights(self.cell, f"layer {self.name!r}")

    @property
    def op_signature(self) -> tuple:
        """What two directions must agree on to run as one bidirectional op."""
        attributes = {k: v for k, v in self.op.items() if k not in ("W", "R", "B", "P", "activations")}
        return attributes, "B" in self.op, "P" in self.op


@dataclass
class LayerValues:
    """What a recurrent layer gives: its outputs (two with merge_mode=None) and, per direction,
    its final states as (graph output name, value, size)."""

    outputs: list
    states: list


# ---------------------------------------------------------------------------------------------- weights

def op_weights(cell: RecurrentCell, where: str) -> dict:
    """The op's type, attributes and weight arrays (one direction's) for `cell`, or a ValueError
    naming `where` and the option ONNX cannot express."""
    if not cell.built:
        raise ValueError(f"export_onnx: {where} has no weights yet; call the model once (or build it) first")
    kind = cell.kind
    spec = cell.cell_spec()
    if kind == "lstm":
        if spec.cell_clip is not None:
            raise refuse(where, f"cell_clip={spec.cell_clip}", "clips C, which ONNX's LSTM cannot do (its `clip` "
                         "attribute clips the gates' pre-activations)")
        if spec.proj_size:
            raise refuse(where, f"proj_size={spec.proj_size}", "feeds the projected h back into the recurrence, "
                         "which ONNX's LSTM cannot do")
        if spec.layer_norm:
            raise refuse(where, "layer_norm=True", "has no ONNX LSTM equivalent")
        if spec.coupled and spec.recurrent_activation not in SYMMETRIC:
            raise refuse(where, "coupled=True", f"needs recurrent_activation with σ(-z) = 1 - σ(z) (one of "
                         f"{', '.join(SYMMETRIC)}), got {spec.recurrent_activation!r}")
    names = {"lstm": ("recurrent_activation", "activation", "activation"),
             "gru": ("recurrent_activation", "activation"), "simple_rnn": ("activation",)}[kind]
    activations = [_op_activation(getattr(spec, option), option, where) for option in names]
    units = cell.units
    kernel, recurrent = weight(cell.kernel).T, weight(cell.recurrent_kernel).T
    bias = None if cell.bias is None else weight(cell.bias)
    op = {"op_type": OP_TYPES[kind], "hidden_size": units}
    if kind == "lstm":
        input_bias = np.zeros(cell.gate_count * units, np.float32) if bias is None else bias.copy()
        forget = spec.gate_names.index("f")
        input_bias[forget * units:(forget + 1) * units] += np.float32(spec.forget_bias)
        op.update(W=_onnx_gates(kernel, spec), R=_onnx_gates(recurrent, spec))
        if bias is not None or spec.forget_bias:
            op["B"] = np.concatenate([_onnx_gates(input_bias, spec), np.zeros(4 * units, np.float32)])
        if spec.peephole:
            peephole = dict(zip(spec.peephole_gates, weight(cell.peephole_weights)))
            input_gate = -peephole["f"] if spec.coupled else peephole["i"]
            op["P"] = np.concatenate([input_gate, peephole["o"], peephole["f"]])
    else:
        op.update(W=kernel, R=recurrent)
        if kind == "gru":
            op["linear_before_reset"] = int(spec.reset_after)
        if bias is not None:
            op["B"] = bias.reshape(-1) if bias.ndim == 2 else np.concatenate([bias, np.zeros_like(bias)])
    op["activations"] = activations
    return op


def _onnx_gates(rows: np.ndarray, spec) -> np.ndarray:
    """Keras' LSTM gate blocks (i f c o, or f c o coupled) along the first axis, in ONNX's order
    i o f c; a coupled cell's input gate is its forget gate negated (σ(-z) = 1 - σ(z))."""
    blocks = dict(zip(spec.gate_names, np.split(rows, len(spec.gate_names))))
    input_gate = -blocks["f"] if spec.coupled else blocks["i"]
    return np.concatenate([input_gate, blocks["o"], blocks["f"], blocks["c"]])


def _op_activation(name, option: str, where: str) -> tuple:
    if not isinstance(name, str):
        raise refuse(where, option, f"is a custom callable ({getattr(name, '__name__', name)!r}), which has no "
                     "ONNX form")
    if name not in OP_ACTIVATIONS:
        raise refuse(where, f"{option}={name!r}", f"has no ONNX recurrent-op equivalent (those: "
                     f"{', '.join(sorted(OP_ACTIVATIONS))})")
    return (name, *OP_ACTIVATIONS[name])


def _activation_attributes(directions: list) -> dict:
    """activations (and the alphas and betas of those that take them, in order: ONNX Runtime's
    reading); none when every one is ONNX's default."""
    chosen = [a for d in directions for a in d.op["activations"]]
    if all(a[0] == default for d in directions for a, default in zip(d.op["activations"],
                                                                      DEFAULT_ACTIVATIONS[d.cell.kind])):
        return {}
    attributes = {"activations": [a[1] for a in chosen]}
    alphas = [a[2] for a in chosen if a[2] is not None]
    betas = [a[3] for a in chosen if a[3] is not None]
    if alphas:
        attributes["activation_alpha"] = alphas
    if betas:
        attributes["activation_beta"] = betas
    return attributes


# ---------------------------------------------------------------------------------------------- the ops

def directions_of(layer: Union[RNN, Bidirectional]) -> list:
    if isinstance(layer, Bidirectional):
        return [Direction(sub.cell, sub.name, sub.go_backwards, sub.zero_output_for_mask)
                for sub in (layer.forward_layer, layer.backward_layer)]
    return [Direction(layer.cell, layer.name, layer.go_backwards, layer.zero_output_for_mask)]


def _initial_states(graph: Graph, direction: Direction, feed_state: bool, batch) -> list:
    """The graph inputs holding the direction's initial states, or [] (zeros)."""
    if not feed_state:
        return []
    return [graph.add_input(f"{direction.name}/initial_{state}", TensorProto.FLOAT, [batch, size])
            for state, size in zip(STATE_NAMES, direction.cell.state_sizes)]


def _run(graph: Graph, steps: str, group: list, initial: list, mask: Optional[Mask], sequences: bool) -> list:
    """One op over `steps` [T, B, F] for one or two directions; per direction (outputs [B, T, U]
    at the op's steps or None, final states [B, U] as the op gives them)."""
    first = group[0].op
    attributes = {k: v for k, v in first.items() if k not in ("op_type", "W", "R", "B", "P", "activations")}
    attributes.update(_activation_attributes(group))
    attributes["direction"] = ("bidirectional" if len(group) == 2 else
                               "reverse" if group[0].backward else "forward")
    name = group[0].name

    def stacked(key: str, hint: str) -> str:
        if key not in first:
            return ""
        return graph.constant(np.stack([d.op[key] for d in group]), f"{name}/{hint}")

    def stacked_state(k: int) -> str:
        if not initial[0]:
            return ""
        parts = [graph.op("Unsqueeze", [states[k], graph.ints(0)]) for states in initial]
        return parts[0] if len(parts) == 1 else graph.op("Concat", parts, axis=0)

    lstm = first["op_type"] == "LSTM"
    inputs = [steps, stacked("W", "W"), stacked("R", "R"), stacked("B", "B"),
              "" if mask is None else mask.sequence_lens, stacked_state(0)]
    if lstm:
        inputs += [stacked_state(1), stacked("P", "P")]
    while not inputs[-1]:
        inputs.pop()
    outputs = [f"{name}/Y" if sequences else None, f"{name}/Y_h"] + ([f"{name}/Y_c"] if lstm else [])
    y, *finals = graph.op(first["op_type"], inputs, outputs=outputs, **attributes)
    results = []
    for k in range(len(group)):
        def pick(value: str, axis: int) -> str:
            return graph.op("Gather", [value, graph.constant(k, dtype=np.int64)], axis=axis)

        sequence = graph.op("Transpose", [pick(y, 1)], perm=[1, 0, 2]) if sequences else None
        results.append((sequence, [pick(final, 0) for final in finals]))
    return results


def recurrent_layer(graph: Graph, x: str, layer: Union[RNN, Bidirectional], mask: Optional[Mask],
                    feed_state: bool, batch) -> LayerValues:
    """x [B, T, F] through `layer` (see the module docstring)."""
    directions = directions_of(layer)
    where = f"layer {layer.name!r}"
    if not feed_state and any(getattr(sub, "stateful", False) for sub in _sublayers(layer)):
        states = ", ".join(f"{d.name}/initial_{s}" for d in directions for s in STATE_NAMES[:d.cell.state_count])
        raise ValueError(f"export_onnx: {where} is stateful (its state carries over between calls); export with "
                         f"state=True, so that the graph takes the state ({states}) and returns it")
    initial = [_initial_states(graph, d, feed_state, batch) for d in directions]
    steps = graph.op("Transpose", [x if mask is None else mask.compact(x)], perm=[1, 0, 2])
    sequences = layer.return_sequences
    if len(directions) == 2 and directions[0].op_signature == directions[1].op_signature:
        runs = _run(graph, steps, directions, initial, mask, sequences)
    else:
        runs = [run for d, states in zip(directions, initial)
                for run in _run(graph, steps, [d], [states], mask, sequences)]
    outputs, states = [], []
    for d, d_initial, (sequence, finals) in zip(directions, initial, runs):
        if mask is not None:
            zero = graph.constant(0.0, dtype=np.float32)
            if sequence is not None:
                sequence = mask.outputs(sequence, d.backward, d.zero_output_for_mask)
            last = mask.last_output(finals[0], d.backward, d.zero_output_for_mask)
            finals = [mask.final_state(final, d_initial[k] if d_initial else zero) for k, final in enumerate(finals)]
        else:
            last = finals[0]
        outputs.append(last if sequence is None else sequence)
        states += [(f"{d.name}/{s}", final, size) for s, final, size in zip(STATE_NAMES, finals, d.cell.state_sizes)]
    if isinstance(layer, Bidirectional):
        return LayerValues(_merged(graph, outputs, layer), states)
    output = outputs[0]
    if sequences and layer.go_backwards:  # Keras: in processing order
        output = reversed_in_time(graph, output, layer.name)
    return LayerValues([output], states)


def recurrent_cell(graph: Graph, x: str, cell: RecurrentCell, feed_state: bool, batch) -> LayerValues:
    """One step of `cell` on x [B, D]: the layer's recurrence over one step."""
    direction = Direction(cell, cell.name)
    initial = _initial_states(graph, direction, feed_state, batch)
    steps = graph.op("Unsqueeze", [x, graph.ints(0)])
    ((_, finals),) = _run(graph, steps, [direction], [initial], None, sequences=False)
    states = [(f"{cell.name}/{s}", final, size) for s, final, size in zip(STATE_NAMES, finals, cell.state_sizes)]
    return LayerValues([finals[0]], states)


def _sublayers(layer) -> tuple:
    return (layer.forward_layer, layer.backward_layer) if isinstance(layer, Bidirectional) else (layer,)


def _merged(graph: Graph, outputs: list, layer: Bidirectional) -> list:
    mode = layer.merge_mode
    if mode is None:
        return outputs
    if mode == "concat":
        return [graph.op("Concat", outputs, layer.name, axis=-1)]
    if mode == "ave":
        total = graph.op("Add", outputs)
        return [graph.op("Div", [total, graph.constant(2.0, dtype=np.float32)], layer.name)]
    return [graph.op({"sum": "Add", "mul": "Mul"}[mode], outputs, layer.name)]
