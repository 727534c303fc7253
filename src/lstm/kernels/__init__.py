"""Kernels behind one dispatch. Layers build a `Recurrence` and call `run`."""

from . import fused_cpp, fused_cpu, reference
from .dispatch import available, register, run, select, use
from .problem import CellSpec, Recurrence, RecurrenceResult

register(reference, priority=0)
register(fused_cpu, priority=10)
register(fused_cpp, priority=20)

__all__ = ["CellSpec", "Recurrence", "RecurrenceResult", "available", "register", "run", "select", "use"]
