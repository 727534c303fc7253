"""Keras masks in an ONNX graph: a [batch, time] bool mask, the `sequence_lens` and compacted inputs
the recurrent ops read, and Keras' rules for the outputs and states at masked steps.

The recurrent ops run on the *compacted* steps: each row's valid steps moved to its front, in
order, with `sequence_lens` = their count. A masked step leaves Keras' states as they were, so
the compacted run's states are the layer's whatever the mask's pattern (right padding, left
padding, holes, no valid step at all); each output is then gathered back from the compacted
outputs by the rules of SPEC.md §6: a masked step repeats the previous output (zeros before the
first valid step), or outputs zeros with `zero_output_for_mask`.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from onnx import TensorProto

from .onnx_graph import Graph

INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


def reversed_in_time(graph: Graph, x: str, hint: str = "reversed") -> str:
    """x [B, T, ...] with its time axis reversed."""
    return graph.op("Slice", [x, graph.ints(-1), graph.ints(INT64_MIN), graph.ints(1), graph.ints(-1)], hint)


class Mask:
    """A [batch, time] bool mask in the graph and the values computed from it, each made once for
    every layer the mask reaches."""

    def __init__(self, graph: Graph, valid: str):
        self.graph = graph
        self.valid = valid

    @cached_property
    def valid64(self) -> str:
        return self.graph.op("Cast", [self.valid], "mask/int", to=TensorProto.INT64)

    @cached_property
    def counts(self) -> str:
        """int64 [B, T]: how many valid steps are at or before each step."""
        return self.graph.op("CumSum", [self.valid64, self.graph.ints(1)], "mask/counts")

    @cached_property
    def lengths(self) -> str:
        """int64 [B, 1]: each row's number of valid steps."""
        return self.graph.op("ReduceSum", [self.valid64, self.graph.ints(1)], "mask/lengths", keepdims=1)

    @cached_property
    def sequence_lens(self) -> str:
        """int32 [B]: the ops' sequence_lens."""
        flat = self.graph.op("Squeeze", [self.lengths, self.graph.ints(1)])
        return self.graph.op("Cast", [flat], "mask/sequence_lens", to=TensorProto.INT32)

    @cached_property
    def any_valid(self) -> str:
        """bool [B, 1]: the rows with a valid step."""
        return self.graph.op("Greater", [self.lengths, self.graph.constant(0, dtype=np.int64)], "mask/any")

    @cached_property
    def time(self) -> str:
        """The int64 scalar T."""
        shape = self.graph.op("Shape", [self.valid])
        return self.graph.op("Squeeze", [self.graph.op("Slice", [shape, self.graph.ints(1), self.graph.ints(2)]),
                                         self.graph.ints(0)], "mask/time")

    @cached_property
    def positions(self) -> str:
        """int64 [B, T]: where each step goes in the compacted order (valid steps first, in order,
        then the masked ones, in order): a permutation of each row."""
        graph = self.graph
        steps = graph.op("Range", [graph.constant(0, dtype=np.int64), self.time, graph.constant(1, dtype=np.int64)])
        valid_position = graph.op("Sub", [self.counts, graph.constant(1, dtype=np.int64)])
        masked_position = graph.op("Sub", [graph.op("Add", [self.lengths, steps]), self.counts])
        return graph.op("Where", [self.valid, valid_position, masked_position], "mask/positions")

    def compact(self, x: str) -> str:
        """x [B, T, F] with each row's valid steps first (see the module docstring)."""
        graph = self.graph
        index = graph.op("Expand", [graph.op("Unsqueeze", [self.positions, graph.ints(2)]), graph.op("Shape", [x])])
        zeros = graph.op("ConstantOfShape", [graph.op("Shape", [x])])
        return graph.op("ScatterElements", [zeros, index, x], "compacted", axis=1)

    # ----- Keras' outputs from the compacted run --------------------------------------------------
    @cached_property
    def _at_or_before(self) -> tuple:
        """(index, present) [B, T]: the compacted step of the last valid step at or before each
        step, and whether there is one: what a forward run has output by then."""
        graph = self.graph
        index = graph.op("Sub", [self.counts, graph.constant(1, dtype=np.int64)])
        present = graph.op("Greater", [self.counts, graph.constant(0, dtype=np.int64)])
        return graph.op("Max", [index, graph.constant(0, dtype=np.int64)]), present

    @cached_property
    def _at_or_after(self) -> tuple:
        """The same for a backward run: the first valid step at or after each step."""
        graph = self.graph
        index = graph.op("Sub", [self.counts, self.valid64])  # the valid steps strictly before
        present = graph.op("Less", [index, self.lengths])
        last = graph.op("Sub", [self.time, graph.constant(1, dtype=np.int64)])
        return graph.op("Min", [index, last]), present

    def outputs(self, compacted: str, backward: bool, zero_output_for_mask: bool) -> str:
        """Every step's output [B, T, U], in input order, from the op's outputs over the compacted
        steps [B, T, U] (a backward run's at the steps it processed)."""
        graph = self.graph
        if zero_output_for_mask:
            (index, _), present = self._at_or_before, self.valid
        else:
            index, present = self._at_or_after if backward else self._at_or_before
        spread = graph.op("Expand", [graph.op("Unsqueeze", [index, graph.ints(2)]), graph.op("Shape", [compacted])])
        gathered = graph.op("GatherElements", [compacted, spread], axis=1)
        keep = graph.op("Unsqueeze", [present, graph.ints(2)])
        return graph.op("Where", [keep, gathered, graph.constant(0.0, dtype=np.float32)], "masked_outputs")

    def last_output(self, final_h: str, backward: bool, zero_output_for_mask: bool) -> str:
        """The output of the last step processed [B, U], from the op's final h."""
        graph = self.graph
        if zero_output_for_mask:  # the last step processed: T - 1, or 0 going backwards
            bounds = (graph.ints(0), graph.ints(1)) if backward else (graph.ints(-1), graph.ints(INT64_MAX))
            present = graph.op("Slice", [self.valid, *bounds, graph.ints(1)])
        else:
            present = self.any_valid
        return graph.op("Where", [present, final_h, graph.constant(0.0, dtype=np.float32)], "last_output")

    def final_state(self, final: str, initial: str) -> str:
        """The op's final state [B, U], or the initial one for a row with no valid step (ONNX does
        not say what the ops give for a zero sequence length; ONNX Runtime gives zeros)."""
        return self.graph.op("Where", [self.any_valid, final, initial], "final_state")
