"""Kernels behind one dispatch. Layers build a `Recurrence` and call `run`."""

from . import reference
from .dispatch import available, register, run, select, use
from .problem import CellSpec, Recurrence, RecurrenceResult

register(reference, priority=0)

__all__ = ["CellSpec", "Recurrence", "RecurrenceResult", "available", "register", "run", "select", "use"]
