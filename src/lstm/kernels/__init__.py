"""Kernels behind one dispatch. Layers build a `Recurrence` and call `run`; a cell asks
`cell_call(cell)` for its single-step call and a stream `stream_step(cell, batch)` for its step
(see dispatch.py). Nothing outside this package names a kernel module."""

from . import (fused_cpp, fused_gru_simple_rnn, fused_variants, int8_lstm, native, reference, torch_rnn,
               triton_gru_simple_rnn, triton_lstm)
from .dispatch import available, cell_call, register, run, select, stream_step, use
from .keep_masks import keep_mask
from .problem import (STATE_COUNT, CellSpec, QuantizedMatrix, Recurrence, RecurrenceResult, Zoneout, quantize_columns,
                      state_dtype)

register(reference, priority=0)
register(torch_rnn, priority=5)  # torch's fused ops (cuDNN): what CUDA tensors get; the C++ kernels first on the CPU
register(triton_lstm, priority=3)  # CUDA: the LSTMs cuDNN cannot run
register(triton_gru_simple_rnn, priority=3)  # CUDA: the GRUs and SimpleRNNs cuDNN cannot run
register(fused_gru_simple_rnn, priority=10)
register(fused_cpp, priority=20)
register(fused_variants, priority=15)  # the LSTM variants; plain LSTMs go to fused_cpp first
register(int8_lstm, priority=25)  # LSTMs with int8 weights (lstm.quantize), which no other fused kernel takes


def empty_cache() -> int:
    """Gives the C++ kernels' idle buffers back to the OS; returns their bytes (0 without the
    extension). The kernels keep up to 256 MiB of freed [B, T, *] buffers mapped for their next
    call (csrc/buffer_pool.h), as torch.cuda's caching allocator does for GPU memory."""
    ext = native.module  # (None or False: not loaded, nothing is pooled)
    return int(ext.pool_clear()) if ext else 0


def native_build() -> str:
    """Which build of the C++ kernels runs (the CPU variant), or why none does."""
    return native.isa() or f"none ({native.unavailable_reason()})"


__all__ = ["STATE_COUNT", "CellSpec", "QuantizedMatrix", "Recurrence", "RecurrenceResult", "Zoneout", "available",
           "cell_call", "empty_cache", "keep_mask", "native_build", "quantize_columns", "register", "run", "select",
           "state_dtype", "stream_step", "use"]
