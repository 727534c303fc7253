"""Long sequences: a recurrent layer run over time in chunks, the state carried from chunk to chunk.

    y = lstm.chunked(layer, x, 1000)          # == layer(x); under no_grad the working memory is one chunk's
    for y_k, states in lstm.iter_chunks(layer, x, 1000): ...   # outputs chunk by chunk, never all at once
    y = lstm.recomputed(layer, x, 100)        # == layer(x) with the same gradients; the backward recomputes
                                              # each chunk instead of keeping its activations
    y = lstm.truncated_bptt(layer, x, 50)     # truncated BPTT: the state is detached every 50 steps

Each returns what `layer(x, mask=..., initial_state=..., training=...)` returns (outputs, then the
states with return_state) and updates a stateful layer's states. One call draws its dropout masks
(and a variant's dropconnect mask and zoneout seed) once for all chunks, as one layer call does;
each chunk's zoneout masks are those of its steps in the whole call (Zoneout.offset). Masked steps
repeat the previous output across chunk boundaries, as in one call (Keras). Not supported:
Bidirectional (run its two layers), an activity_regularizer, gate traces.
"""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import replace
from typing import Iterator, Optional

import torch

from . import kernels
from .layers import RNN


def chunked(layer, inputs, chunk_size: int, mask=None, initial_state=None, training=None):
    """`layer(inputs)` computed `chunk_size` steps at a time (see the module docstring)."""
    return _collect(layer, _Plan(layer, inputs, chunk_size, mask, initial_state, training, "chunk_size"))


def recomputed(layer, inputs, chunk_size: int, mask=None, initial_state=None, training=None):
    """`layer(inputs)` whose backward recomputes each chunk of `chunk_size` steps from the states at
    its start (gradient checkpointing): the same outputs and gradients, with the activations of one
    chunk at a time instead of all T steps."""
    plan = _Plan(layer, inputs, chunk_size, mask, initial_state, training, "chunk_size")
    plan.recompute = True
    return _collect(layer, plan)


def truncated_bptt(layer, inputs, bptt: int, mask=None, initial_state=None, training=None,
                   recompute: Optional[int] = None):
    """`layer(inputs)` with the state detached every `bptt` steps, so gradients flow back at most
    `bptt` steps (the forward is unchanged). `recompute=N` (N dividing `bptt`) also recomputes
    chunks of N steps in the backward."""
    if recompute is None:
        plan = _Plan(layer, inputs, bptt, mask, initial_state, training, "bptt")
        plan.detach_every = 1
    else:
        _positive(bptt, "bptt")
        plan = _Plan(layer, inputs, recompute, mask, initial_state, training, "recompute")
        if bptt % plan.chunk_size:
            raise ValueError(f"recompute: expected a divisor of bptt={bptt}, got {plan.chunk_size}")
        plan.detach_every, plan.recompute = bptt // plan.chunk_size, True
    return _collect(layer, plan)


def iter_chunks(layer, inputs, chunk_size: int, mask=None, initial_state=None, training=None) -> Iterator[tuple]:
    """Yields `(outputs [B, t, U], states)` per chunk, in processing order (the last chunk first for
    a go_backwards layer); holding only what the caller keeps. A stateful layer's states are updated
    after the last chunk. The arguments are checked at the call, before the first chunk."""
    return _chunks_then_states(layer, _Plan(layer, inputs, chunk_size, mask, initial_state, training, "chunk_size"))


def _chunks_then_states(layer, plan: "_Plan") -> Iterator[tuple]:
    for out, states in plan.run(sequences=True):
        yield out, plan.returned(states)
    if layer.stateful:
        layer.reset_state(plan.states)


def _positive(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{argument}: expected a positive number of timesteps, got {value!r}")
    return int(value)


def _collect(layer, plan: "_Plan"):
    if not layer.return_sequences:
        # only the last chunk's output is kept: with truncated BPTT, so is only its window's graph
        result = deque((out for out, _ in plan.run(sequences=False)), maxlen=1)[0]
    elif torch.is_grad_enabled():
        result = torch.cat([out for out, _ in plan.run(sequences=True)], dim=1)
    else:  # each chunk copied into place as it comes: the outputs are held once, not twice
        result, done = None, 0
        for out, _ in plan.run(sequences=True):
            if result is None:
                result = out.new_empty(out.shape[0], plan.inputs.shape[1], *out.shape[2:])
            result[:, done:done + out.shape[1]] = out
            done += out.shape[1]
    if layer.stateful:
        layer.reset_state(plan.states)
    return (result, *plan.returned(plan.states)) if layer.return_state else result


class _Plan:
    """The checked call: one kernel problem for the whole sequence (what one layer call would run,
    with its dropout, dropconnect and zoneout drawn once), cut into chunks, the state carried."""

    def __init__(self, layer, inputs, chunk_size, mask, initial_state, training, argument: str):
        if not isinstance(layer, RNN):
            raise TypeError(f"layer: expected a recurrent layer (LSTM, GRU, SimpleRNN, RNN), got "
                            f"{type(layer).__name__}" + ("; run its forward_layer and backward_layer one by one"
                                                         if type(layer).__name__ == "Bidirectional" else ""))
        self.chunk_size = _positive(chunk_size, argument)
        if layer.activity_regularizer is not None:
            raise ValueError("layer: an activity_regularizer is not supported by chunked runs; call the layer")
        self.layer = layer
        self.problem = layer.recurrence(inputs, mask, initial_state, training)
        self.inputs, self.states = self.problem.inputs, list(self.problem.initial_state)
        self.recompute, self.detach_every = False, 0

    def returned(self, states: list) -> list:
        """The states as a layer call returns them (the chunks carry C unrounded: kernels.state_dtype)."""
        return [s.to(self.inputs.dtype) for s in states]

    def bounds(self) -> list:
        steps = self.inputs.shape[1]
        bounds = [(start, min(start + self.chunk_size, steps)) for start in range(0, steps, self.chunk_size)]
        bounds = bounds or [(0, 0)]
        return bounds[::-1] if self.layer.go_backwards else bounds

    def run(self, sequences: bool) -> Iterator[tuple]:
        # the last output so far, which masked steps repeat (zeros before the first step, as in Keras)
        previous = self.inputs.new_zeros(self.inputs.shape[0], self.problem.output_size)
        bounds = self.bounds()
        done = 0  # steps processed before the chunk: its zoneout offset
        for k, (start, stop) in enumerate(bounds):
            step = _ChunkStep(self.problem, start, stop, sequences, done)
            done += stop - start
            x = self.inputs[:, start:stop]
            if self.recompute:
                params = [p for p in self.layer.parameters() if p.requires_grad]
                out, *states = _Recomputed.apply(step, len(params), *params, x, previous, *self.states)
            else:
                out, *states = step(x, previous, *self.states)
            if not sequences:
                previous = out
            elif out.shape[1]:
                previous = out[:, -1]
            if self.detach_every and (k + 1) % self.detach_every == 0 and k + 1 < len(bounds):
                previous, states = previous.detach(), [s.detach() for s in states]
            self.states = list(states)
            yield out, self.states


class _ChunkStep:
    """One chunk through the kernels: (x, previous output, *states) -> (outputs, *states)."""

    def __init__(self, problem, start: int, stop: int, sequences: bool, processed: int):
        if problem.zoneout is not None:  # the masks of these steps in the whole call
            problem = replace(problem, zoneout=replace(problem.zoneout, offset=problem.zoneout.offset + processed))
        self.problem, self.sequences = problem, sequences
        # the chunk's own (contiguous) mask: a strided one takes the kernels' slower paths
        self.mask = None if problem.mask is None else problem.mask[:, start:stop].contiguous()

    def __call__(self, x, previous, *states):
        # contiguous: a strided chunk takes the kernels' slow path
        problem = replace(self.problem, inputs=x.contiguous(), initial_state=tuple(states), mask=self.mask,
                          return_sequences=self.sequences)
        out = kernels.run(problem)
        result = out.outputs
        if self.mask is not None and not problem.zero_output_for_mask:
            result = self._repeat_previous(result, previous)
        return (result, *out.states)

    def _repeat_previous(self, out, previous):
        """The kernel starts each call with a previous output of zeros; a row whose steps in this
        chunk are masked up to some step repeats the previous chunk's last output there instead."""
        mask = self.mask.flip(1) if self.problem.go_backwards else self.mask
        if not self.sequences:
            return torch.where(mask.any(1)[:, None], out, previous)
        seen = mask.cumsum(1) > 0
        return torch.where(seen[..., None], out, previous[:, None, :])


class _Recomputed(torch.autograd.Function):
    """A chunk whose forward keeps only its inputs; the backward runs the chunk again with autograd."""

    @staticmethod
    def forward(ctx, step, param_count, *tensors):
        ctx.step, ctx.param_count = step, param_count
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return step(*tensors[param_count:])

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        params, inputs = saved[:ctx.param_count], saved[ctx.param_count:]
        needs = ctx.needs_input_grad[2 + ctx.param_count:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        with torch.enable_grad():
            outputs = ctx.step(*inputs)
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
        wanted = list(params) + [t for t in inputs if t.requires_grad]
        # retain_graph: weights drawn once per call (dropconnect) are one node that every chunk reaches
        found = torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                    allow_unused=True, retain_graph=True) if pairs and wanted else [None] * len(wanted)
        found = iter(found)
        param_grads = [next(found) for _ in params]
        input_grads = [next(found) if t.requires_grad else None for t in inputs]
        return (None, None, *param_grads, *input_grads)
