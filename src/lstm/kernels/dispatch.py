"""One dispatch: picks the kernel for each of the three calls a layer makes.

    run(problem)              a `Recurrence` (a layer call, or a cell call that takes no shortcut)
    cell_call(cell)           the single-step call `cell(x_t, [h, c])` as one lean call, or None
    stream_step(cell, batch)  the step object of `lstm.streaming`, or None

Kernels register with a priority; the first (highest priority) whose `supports(problem)` is
true runs a problem, and the first that offers a cell call or a streaming step for the cell
gives it (a kernel offers them by defining `cell_call(cell)` / `stream_step(cell, batch)`).
None means the plain route: the cell builds a one-step `Recurrence` and calls `run`.
`use("reference")` (or the environment variable LSTM_KERNEL) forces one kernel for all three,
which is how the equality tests run the same layer on each path. A kernel sees a problem's
`lengths` only if it says `takes_lengths = True` (the others get them as the equivalent mask), and
a problem with resets only if it says `takes_resets = True`, and one with int8 weights only if it says
`takes_quantized = True`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Protocol

import torch

from .problem import Recurrence, RecurrenceResult


class Kernel(Protocol):
    name: str

    def supports(self, problem: Recurrence) -> bool: ...

    def run(self, problem: Recurrence) -> RecurrenceResult: ...


_registry: list[tuple[int, Kernel]] = []
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("lstm_kernel", default=None)


def register(kernel: Kernel, priority: int) -> None:
    _registry.append((priority, kernel))
    _registry.sort(key=lambda entry: -entry[0])


def available() -> list[str]:
    return [kernel.name for _, kernel in _registry]


def _by_name(name: str) -> Kernel:
    for _, kernel in _registry:
        if kernel.name == name:
            return kernel
    raise ValueError(f"kernel: unknown kernel {name!r}; expected one of {available()}")


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force one kernel inside the block: `with lstm.kernels.use("reference"): ...`."""
    _by_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_name() -> str | None:
    """The kernel forced by `use` or LSTM_KERNEL, or None."""
    return _forced.get() or os.environ.get("LSTM_KERNEL")


# Under torch.compile / torch.export the choice is made while tracing: Dynamo cannot trace a
# ContextVar, so it runs this once and takes the answer as a constant of the graph (a kernel
# forced after compiling does not retrace the compiled model).
_forced_name_when_tracing = torch._dynamo.assume_constant_result(forced_name)


def as_seen_by(kernel: Kernel, problem: Recurrence) -> Recurrence:
    """The problem as `kernel` takes it: with its lengths as a mask unless the kernel takes lengths."""
    return problem if getattr(kernel, "takes_lengths", False) else problem.masked()


def _takes(kernel: Kernel, problem: Recurrence) -> bool:
    if problem.reset is not None and not getattr(kernel, "takes_resets", False):
        return False
    if problem.quantized is not None and not getattr(kernel, "takes_quantized", False):
        return False
    # (asked on the problem's shape alone: zeroing the inputs at masked steps waits for `run`)
    return kernel.supports(problem if getattr(kernel, "takes_lengths", False) else problem.lengths_as_mask())


def select(problem: Recurrence) -> Kernel:
    forced = _forced_name_when_tracing() if torch.compiler.is_compiling() else forced_name()
    if forced:
        kernel = _by_name(forced)
        if not _takes(kernel, problem):
            raise ValueError(f"kernel {forced!r} does not support this recurrence ({problem.cell})")
        return kernel
    for _, kernel in _registry:
        if _takes(kernel, problem):
            return kernel
    raise RuntimeError("no kernel supports this recurrence")  # the reference supports all


def run(problem: Recurrence) -> RecurrenceResult:
    kernel = select(problem)
    return kernel.run(as_seen_by(kernel, problem))


def _offered(capability: str, *args, forced: str | None = None):
    """The first kernel's `capability(*args)` that is not None (only the `forced` kernel's), or None."""
    for kernel in [_by_name(forced)] if forced else [kernel for _, kernel in _registry]:
        offer = getattr(kernel, capability, None)
        found = offer(*args) if offer is not None else None
        if found is not None:
            return found
    return None


def cell_call(cell):
    """A callable `(cell, x_t, states, training) -> (output, states) or None` that computes the
    cell's call in one step (None from it: take the plain route for that call), or None.

    A cell keeps it until its options or weights change, whatever kernel is forced later: so it is
    chosen as if none were, and answers None itself for a call made while another kernel is forced."""
    return _offered("cell_call", cell)


def stream_step(cell, batch_size: int):
    """An object stepping `cell` over `batch_size` rows with the state inside, or None:
    `step(x_t)` -> a new [B, U] tensor (None when x_t needs a dtype or device conversion first),
    `state()` -> the states as copies, `set_state(*states)`. Made for the weights as they are."""
    return _offered("stream_step", cell, batch_size, forced=forced_name())
