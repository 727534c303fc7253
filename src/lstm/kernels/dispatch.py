"""One dispatch: picks the kernel that computes a `Recurrence`.

Kernels register with a priority; the first (highest priority) whose `supports(problem)` is
true runs. `use("reference")` (or the environment variable LSTM_KERNEL) forces one kernel,
which is how the equality tests run the same layer on each path.
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


def _forced_name() -> str | None:
    return _forced.get() or os.environ.get("LSTM_KERNEL")


# Under torch.compile / torch.export the choice is made while tracing: Dynamo cannot trace a
# ContextVar, so it runs this once and takes the answer as a constant of the graph (a kernel
# forced after compiling does not retrace the compiled model).
_forced_name_when_tracing = torch._dynamo.assume_constant_result(_forced_name)


def select(problem: Recurrence) -> Kernel:
    forced = _forced_name_when_tracing() if torch.compiler.is_compiling() else _forced_name()
    if forced:
        kernel = _by_name(forced)
        if not kernel.supports(problem):
            raise ValueError(f"kernel {forced!r} does not support this recurrence ({problem.cell})")
        return kernel
    for _, kernel in _registry:
        if kernel.supports(problem):
            return kernel
    raise RuntimeError("no kernel supports this recurrence")  # the reference supports all


def run(problem: Recurrence) -> RecurrenceResult:
    return select(problem).run(problem)
