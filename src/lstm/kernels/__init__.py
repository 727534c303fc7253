"""Kernels behind one dispatch. Layers build a `Recurrence` and call `run`."""

from . import fused_cpp, fused_cpu, fused_variants, reference
from .dispatch import available, register, run, select, use
from .problem import CellSpec, Recurrence, RecurrenceResult, Zoneout

register(reference, priority=0)
register(fused_cpu, priority=10)
register(fused_cpp, priority=20)
register(fused_variants, priority=15)  # the LSTM variants; plain LSTMs go to fused_cpp first

__all__ = ["CellSpec", "Recurrence", "RecurrenceResult", "Zoneout", "available", "register", "run", "select", "use"]
