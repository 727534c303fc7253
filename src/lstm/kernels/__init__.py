"""Kernels behind one dispatch. Layers build a `Recurrence` and call `run`."""

from . import fused_cpp, fused_cpu, fused_variants, native, reference
from .dispatch import available, register, run, select, use
from .problem import CellSpec, Recurrence, RecurrenceResult, Zoneout

register(reference, priority=0)
register(fused_cpu, priority=10)
register(fused_cpp, priority=20)
register(fused_variants, priority=15)  # the LSTM variants; plain LSTMs go to fused_cpp first


def empty_cache() -> int:
    """Gives the C++ kernels' idle buffers back to the OS; returns their bytes (0 without the
    extension). The kernels keep up to 256 MiB of freed [B, T, *] buffers mapped for their next
    call (csrc/buffer_pool.h), as torch.cuda's caching allocator does for GPU memory."""
    ext = native.module  # (None or False: not loaded, nothing is pooled)
    return int(ext.pool_clear()) if ext else 0


__all__ = ["CellSpec", "Recurrence", "RecurrenceResult", "Zoneout", "available", "empty_cache", "register", "run",
           "select", "use"]
