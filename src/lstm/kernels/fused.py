"""What every fused kernel shares: running its forward and backward under autograd.

A kernel states its two calls (into C++, or Triton's step programs) and the shapes the forward
returns (a `FusedOp`); this module runs them three ways:

    without grad         the forward alone
    eagerly, with grad   one torch.autograd.Function (`Function`): the custom-op dispatch costs
                         ~40 us a call against ~16 us for the Function (batch 1, T = 1)
    under torch.compile  the custom ops lstm::<name>_forward and lstm::<name>_backward (fake
    and torch.export     kernels and autograd registered), so Dynamo traces through without a
                         graph break and torch.export puts them in the exported graph

A call's tensors come in two lists: `inputs`, which get gradients (None allowed: no bias), and
`fixed`, which do not (dropout masks, the step mask; None allowed); `options` are the kernel's
`Options`, the flags and numbers the C++ takes.
"""

from __future__ import annotations

import inspect
import typing
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import native
from .problem import state_dtype
from .reference import autocast_off


class FusedOp:
    """A fused kernel's C++ forward and backward; subclasses define the three methods below and
    `name` (the custom ops are lstm::<name>_forward / lstm::<name>_backward). Instantiate once, at
    import: the custom ops are defined then (Dynamo cannot trace their definition)."""

    name: str
    input_names: tuple  # the tensors that get gradients, in order (the ops' argument names)
    fixed_names: tuple  # the tensors that do not
    Options: type  # a NamedTuple: the C++ calls' options, in their order, annotated bool, int or float
    output_count: int  # the forward's differentiable outputs (outputs, final states); saved buffers follow
    # the backward may write its gradients over the saved buffers (eagerly, when nothing else reads them)
    overwrites_saved = False
    needs_extension = True  # runs on the C++ extension (loaded before a call)

    def forward(self, inputs: Sequence, fixed: Sequence, options: Sequence, save: bool) -> list:
        """The outputs, then (with save) what the backward needs: a list whose length depends only
        on the options and save (None allowed after the outputs)."""
        raise NotImplementedError

    def backward(self, output_grads: Sequence, inputs: Sequence, saved: Sequence, fixed: Sequence,
                 options: Sequence, needs: Sequence[bool], overwrite: bool) -> Sequence:
        """The gradient of each input (anything where `needs` is False)."""
        raise NotImplementedError

    def forward_shapes(self, inputs: Sequence, fixed: Sequence, options: Sequence, save: bool) -> list:
        """The shapes of `forward`'s list (a None there: shape (0,)), for the fake kernel."""
        raise NotImplementedError

    def forward_dtypes(self, inputs: Sequence, fixed: Sequence, options: Sequence, save: bool) -> list:
        """The dtypes of `forward`'s list, for the fake kernel: by default the input's throughout."""
        return [inputs[0].dtype] * len(self.forward_shapes(inputs, fixed, options, save))

    def __init__(self):
        self.forward_op, self.backward_op = _define_ops(self)

    def call(self, inputs: Sequence, fixed: Sequence, options: Sequence, keep_saved: bool = False) -> tuple:
        """(outputs, saved): `saved` is the forward's saved buffers with keep_saved (a trace reads
        them), else not to be read."""
        if self.needs_extension:
            native.extension()  # (loaded by the kernel's supports() already, unless it is called directly)
        count = self.output_count
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        if torch.compiler.is_compiling():
            results = self.forward_op(*inputs, *fixed, *options, grad or keep_saved)
            return results[:count], results[count:]
        if grad:
            call = Call(self, fixed, options, keep_saved)
            outputs = Function.apply(call, *inputs)
            saved, call.saved = call.saved, None  # (the graph keeps the call: let go of the buffers)
            return outputs, saved
        results = self.forward(inputs, fixed, options, keep_saved)
        return results[:count], results[count:]


# bfloat16/float16 (problem.py, Recurrence: "Precision") on the C++ core's float32 recurrences: the
# products' operands come rounded to the low precision, held in float32, and the C++ loop rounds h
# at every step (the codes of csrc/rnn.h's `operand`)
OPERAND_CODES = {torch.bfloat16: 1, torch.float16: 2}
ROUNDED_OPERANDS = frozenset({"x", "kernel", "recurrent_kernel", "projection", "h0", "reset_h"})


def low_precision(inputs: Sequence) -> Optional[torch.dtype]:
    """The compute dtype of an op's call (its first input's) when it is bfloat16/float16, else None."""
    return inputs[0].dtype if inputs[0].dtype in OPERAND_CODES else None


def in_float32(tensors: Sequence, low: Optional[torch.dtype]) -> list:
    """The floating tensors in float32 when `low` (others as they are)."""
    if low is None:
        return list(tensors)
    return [t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


def operands_in_float32(op: FusedOp, inputs: Sequence, fixed: Sequence, low: Optional[torch.dtype]) -> tuple:
    """(inputs, fixed) as a float32 recurrence takes them in `low`: the ROUNDED_OPERANDS rounded to
    it, everything floating in float32 (biases, gains, peepholes, C, dropout masks unrounded). On
    the CPU in one C++ call (at batch 2 ATen's dtype copies were most of bfloat16's extra time)."""
    if low is None:
        return inputs, fixed
    names, tensors = op.input_names + op.fixed_names, (*inputs, *fixed)
    present = [i for i, t in enumerate(tensors) if isinstance(t, Tensor)]
    extension = native.extension()
    if extension and all(tensors[i].is_cpu for i in present):
        converted = list(tensors)
        rounded = extension.operands_in_float32([tensors[i] for i in present],
                                                [names[i] in ROUNDED_OPERANDS for i in present], OPERAND_CODES[low])
        for i, tensor in zip(present, rounded):
            converted[i] = tensor
    else:
        converted = in_float32([t.to(low) if name in ROUNDED_OPERANDS and isinstance(t, Tensor) else t
                                for name, t in zip(names, tensors)], low)
    return converted[:len(inputs)], converted[len(inputs):]


def in_input_dtypes(grads: Sequence, inputs: Sequence) -> list:
    """Each gradient in its input's dtype (float32 computations for bfloat16/float16 inputs)."""
    return [g if g is None or t is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, inputs)]


class RoundedOperandsOp(FusedOp):
    """A FusedOp whose recurrence runs in float32, in bfloat16/float16 too: it gets the tensors
    `operands_in_float32` makes and the `operand` code (the loop then rounds h at every step);
    the outputs and h go back to the low precision (they hold rounded values: exactly), every
    gradient to its input's dtype. Subclasses write `float32_forward` and `float32_backward`,
    which run with autocast off (their torch products are float32 products of rounded operands);
    the outputs after the first two (C, the saved buffers) stay float32."""

    def float32_forward(self, inputs, fixed, options, save, low: Optional[torch.dtype]) -> list:
        raise NotImplementedError

    def float32_backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite,
                         low: Optional[torch.dtype]) -> Sequence:
        raise NotImplementedError

    def forward(self, inputs, fixed, options, save):
        low = low_precision(inputs)
        inputs, fixed = operands_in_float32(self, inputs, fixed, low)
        with autocast_off(inputs[0].device.type):
            results = self.float32_forward(inputs, fixed, options, save, low)
        if low is not None:
            results[0], results[1] = results[0].to(low), results[1].to(low)
        return results

    def backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite):
        low = low_precision(inputs)
        converted, fixed = operands_in_float32(self, inputs, fixed, low)
        with autocast_off(converted[0].device.type):
            grads = self.float32_backward(in_float32(output_grads, low), converted, saved, fixed, options, needs,
                                          overwrite, low)
        return in_input_dtypes(grads, inputs)

    def forward_dtypes(self, inputs, fixed, options, save):
        return outputs_in_compute_dtype(self, inputs, fixed, options, save)


def outputs_in_compute_dtype(op: FusedOp, inputs, fixed, options, save) -> list:
    """The forward's dtypes when its outputs and h are in the compute dtype and everything after
    them (C, the saved buffers) in the state dtype (float32 in bfloat16/float16)."""
    compute = inputs[0].dtype
    count = len(op.forward_shapes(inputs, fixed, options, save))
    return [compute, compute] + [state_dtype(compute)] * (count - 2)


class Call:
    """What the eager Function needs besides the inputs. A cell call makes one and reuses it."""

    __slots__ = ("op", "fixed", "options", "keep_saved", "saved")

    def __init__(self, op: FusedOp, fixed: Sequence, options: Sequence, keep_saved: bool = False):
        self.op, self.fixed, self.options, self.keep_saved = op, fixed, options, keep_saved
        self.saved = ()  # the forward's saved buffers, handed back with keep_saved


class Function(torch.autograd.Function):
    """`Function.apply(call, *inputs)` -> the op's outputs (a tuple), differentiable in the inputs."""

    @staticmethod
    def forward(ctx, call: Call, *inputs):
        op = call.op
        results = op.forward(inputs, call.fixed, call.options, True)  # (grad mode is off here)
        count = op.output_count
        saved = results[count:]
        if call.keep_saved:
            call.saved = saved
        ctx.call, ctx.overwritten = call, False
        ctx.save_for_backward(*inputs, *saved)
        return tuple(results[:count])

    @staticmethod
    def backward(ctx, *output_grads):
        if torch.is_grad_enabled():  # (create_graph: the C++ products must not join the graph)
            with torch.no_grad():
                return Function.backward(ctx, *output_grads)
        call = ctx.call
        op = call.op
        needs = ctx.needs_input_grad
        tensors = ctx.saved_tensors
        count = len(needs) - 1
        inputs, saved = tensors[:count], tensors[count:]
        if ctx.overwritten:  # a second backward (retain_graph): the first wrote over the saved buffers
            saved = op.forward(inputs, call.fixed, call.options, True)[op.output_count:]
        overwrite = op.overwrites_saved and not call.keep_saved
        ctx.overwritten = overwrite
        needs = [needs[i + 1] and inputs[i] is not None for i in range(count)]
        grads = op.backward(output_grads, inputs, saved, call.fixed, call.options, needs, overwrite)
        return (None, *[g if need else None for g, need in zip(grads, needs)])


def _signature(*arguments: tuple) -> inspect.Signature:
    """The signature of a function taking (name, type) arguments, returning a list of tensors."""
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
                              for name, kind in arguments], return_annotation=list[Tensor])


def _define_ops(op: FusedOp):
    # each tensor and option its own argument: torch.library drops the gradients of a tensor list
    # holding a None, and torch.export serialises no list of mixed numbers
    tensor_names = op.input_names + op.fixed_names
    inputs_count, tensors_count, outputs_count = len(op.input_names), len(tensor_names), op.output_count
    option_types = list(typing.get_type_hints(op.Options).items())
    options_count = len(option_types)
    tensors = [(name, Optional[Tensor]) for name in tensor_names]

    def split(args):
        """(inputs, fixed, options) of the tensors and options in an op's arguments."""
        return (args[:inputs_count], args[inputs_count:tensors_count],
                op.Options(*args[tensors_count:tensors_count + options_count]))

    def forward(*args):
        inputs, fixed, options = split(args)
        given = [t for t in args[:tensors_count] if t is not None]
        results = op.forward(inputs, fixed, options, args[-1])
        dtypes = op.forward_dtypes(inputs, fixed, options, args[-1])
        # an op's outputs never alias its inputs, and inductor expects the fake kernel's strides and dtypes
        return [inputs[0].new_empty(0, dtype=dtype) if t is None else t.clone() if any(t is g for g in given)
                else t.contiguous() for t, dtype in zip(results, dtypes)]

    forward.__signature__ = _signature(*tensors, *option_types, ("save", bool))
    forward.__doc__ = "The outputs, then with save the saved buffers (empty where the kernel has none)."
    forward = torch.library.custom_op(f"lstm::{op.name}_forward", forward, mutates_args=())

    @forward.register_fake
    def _(*args):
        inputs, fixed, options = split(args)
        shapes, dtypes = (f(inputs, fixed, options, args[-1]) for f in (op.forward_shapes, op.forward_dtypes))
        return [inputs[0].new_empty(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]

    def backward(*args):
        output_grads, (saved, needs) = args[:outputs_count], (args[outputs_count + tensors_count], args[-1])
        inputs, fixed, options = split(args[outputs_count:outputs_count + tensors_count] + args[-1 - options_count:-1])
        grads = op.backward(output_grads, inputs, saved, fixed, options, needs, False)
        return [g.contiguous() if need else inputs[0].new_empty(0) for g, need in zip(grads, needs)]

    backward.__signature__ = _signature(*[(f"grad_{i}", Optional[Tensor]) for i in range(outputs_count)], *tensors,
                                        ("saved", list[Tensor]), *option_types, ("needs", list[bool]))
    backward.__doc__ = "The gradient of each input, empty where `needs` is False."
    backward = torch.library.custom_op(f"lstm::{op.name}_backward", backward, mutates_args=())

    @backward.register_fake
    def _(*args):
        inputs = args[outputs_count:outputs_count + inputs_count]
        return [t.new_empty(t.shape) if need else inputs[0].new_empty(0) for t, need in zip(inputs, args[-1])]

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[tensors_count:tensors_count + options_count]
        ctx.present = [t is not None for t in inputs[:inputs_count]]
        ctx.save_for_backward(*inputs[:tensors_count], *output[outputs_count:])

    def backward_formula(ctx, output_grads, *_):
        saved_tensors = ctx.saved_tensors
        needs = [bool(need) and present for need, present in zip(ctx.needs_input_grad, ctx.present)]
        grads = backward(*output_grads[:outputs_count], *saved_tensors[:tensors_count],
                         list(saved_tensors[tensors_count:]), *ctx.options, needs)
        return (*(g if need else None for g, need in zip(grads, needs)),
                *[None] * (tensors_count - inputs_count + options_count + 1))

    forward.register_autograd(backward_formula, setup_context=setup_context)
    return forward, backward
