"""Streaming (online) inference: one time step per call, the state kept inside.

    s = layer.stream(batch_size=1)       # or cell.stream(...)
    for x_t in source:                   # x_t [B, D], or [D] for batch 1
        y_t = s.step(x_t)                # [B, U], the same numbers as the layer on the sequence
    s.state                              # [h, c] (LSTM) or [h]
    s.reset()                            # back to zeros (or s.reset([h, c]))

An LSTM step is one call into the C++ kernel (`lstm.kernels.fused_cpp`): a small C++ object holds
the weights, (x_t, h), c and the gate scratch, updates them in place and returns h_t in a new
tensor (never aliased with the state); it re-reads the weights itself when a parameter's
in-place version changes. It keeps [kernel; recurrent_kernel] packed in panels, the four gate
columns of 32 units each (16 in float64; csrc/small_gemm.h), so a step is one register-tiled pass
over contiguous memory; big steps split the panels over the threads. Other cells (or without the
C++ extension): a step is one Numba call
on preallocated NumPy buffers: the input and the state sit side by
side in one buffer so that the input and recurrent products are one product against the
stacked weight [kernel; recurrent_kernel]; no autograd, no torch op. The weights are read
again when a parameter changes (in-place updates bump its version). Cells the fused kernel
does not cover (custom activations, non-CPU tensors) step through the layer's kernels instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .kernels import fused_cpp, fused_cpu


class Stream:
    """Step-by-step inference over one recurrent cell (see the module docstring)."""

    def __init__(self, cell, batch_size: int = 1, initial_state: Optional[Sequence] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.cell = cell
        self.batch_size = batch_size
        self._initial = None if initial_state is None else [torch.as_tensor(s).detach().clone() for s in initial_state]
        self._fast = None
        self._cpp = None
        self._kernel_param = None
        self._versions = None
        self._params = ()
        self._states_torch: Optional[list] = None
        if cell.built:
            self._setup()

    # ----- setup --------------------------------------------------------------------------------
    def _fast_ok(self) -> bool:
        cell = self.cell
        if cell.kernel.device.type != "cpu" or cell.kernel.dtype not in (torch.float32, torch.float64):
            return False
        if not cell.cell_spec().plain:  # variants step through the layer's call (the variants kernel)
            return False
        if not fused_cpu._HAS_NUMBA or fused_cpu._code(cell.activation) is None:
            return False
        return cell.kind == "simple_rnn" or fused_cpu._code(cell.recurrent_activation) is not None

    def _cpp_ok(self) -> bool:
        cell = self.cell
        return (fused_cpp._code(cell.activation) is not None and fused_cpp._code(cell.recurrent_activation) is not None
                and cell.kernel.dtype == cell.compute_dtype and fused_cpp.extension() is not None)

    def _param_versions(self):
        # cheap: the cached parameter objects' in-place versions, plus a check that they are
        # still the cell's parameters
        params = self._params
        if self.cell._parameters.get("kernel") is not params[0]:
            return None
        return tuple(w._version for w in params)

    def _setup(self, keep_state: bool = False) -> None:
        cell = self.cell
        state = self.state if keep_state else None
        B, U, D = self.batch_size, cell.units, cell.input_dim
        self._D, self._U = D, U
        self._dtype = cell.compute_dtype
        self._fast = self._fast_ok()
        self._params = tuple(cell.weights())
        self._versions = self._param_versions()
        self._cpp = None
        self._kernel_param = None
        if self._fast and cell.kind == "lstm" and self._cpp_ok():
            ext = fused_cpp.extension()
            bias = None if cell.bias is None else cell.bias
            self._cpp = ext.LSTMStep(cell.kernel, cell.recurrent_kernel, bias, B, fused_cpp._code(cell.activation),
                                     fused_cpp._code(cell.recurrent_activation))
            self._npdt = np.float32 if self._dtype == torch.float32 else np.float64
            self._kernel_param = self._params[0]
        elif self._fast:
            nb = fused_cpu._numba()

            self._nb = nb
            npdt = np.float32 if self._dtype == torch.float32 else np.float64
            self._npdt = npdt
            kernel = cell.kernel.detach().numpy()
            rec = cell.recurrent_kernel.detach().numpy()
            G = cell.gate_count
            bias = None if cell.bias is None else cell.bias.detach().numpy()
            self._act = fused_cpu._code(cell.activation)
            self._ract = fused_cpu._code(cell.recurrent_activation) if cell.kind != "simple_rnn" else 0
            self._xh = np.zeros((B, D + U), dtype=npdt)
            self._z = np.zeros((B, G * U), dtype=npdt)
            self._c = np.zeros((B, U), dtype=npdt)
            if cell.kind == "gru":
                self._W = np.ascontiguousarray(kernel, dtype=npdt)
                self._R = np.ascontiguousarray(rec, dtype=npdt)
                self._reset_after = bool(cell.reset_after)
                if bias is None:
                    self._b, self._brec = np.zeros(G * U, npdt), np.zeros(0, npdt)
                elif bias.ndim == 2:
                    self._b, self._brec = np.ascontiguousarray(bias[0]), np.ascontiguousarray(bias[1])
                else:
                    self._b, self._brec = np.ascontiguousarray(bias), np.zeros(0, npdt)
            else:
                self._W = np.ascontiguousarray(np.concatenate([kernel, rec], axis=0), dtype=npdt)
                self._WT = np.ascontiguousarray(self._W.T)
                self._b = np.zeros(G * U, npdt) if bias is None else np.ascontiguousarray(bias, dtype=npdt)
        self.reset(state)

    # ----- state --------------------------------------------------------------------------------
    @property
    def state(self) -> list:
        """The current states ([h, c] for LSTM, [h] otherwise), as copies."""
        if not self.cell.built:
            return []
        if self._cpp is not None:
            return list(self._cpp.state())
        if self._fast:
            h = torch.from_numpy(self._xh[:, self._D:].copy())
            return [h, torch.from_numpy(self._c.copy())] if self.cell.kind == "lstm" else [h]
        return [s.clone() for s in self._states_torch]

    def reset(self, state: Optional[Sequence] = None) -> None:
        """Back to the initial state (zeros, or the one the stream was made with), or to `state`."""
        if not self.cell.built:
            if state is not None:
                self._initial = [torch.as_tensor(s).detach().clone() for s in state]
            return
        if state is None:
            state = self._initial
        B, sizes = self.batch_size, self.cell.state_sizes
        n = self.cell.state_count
        if state is None:
            values = [torch.zeros(B, size, dtype=self._dtype) for size in sizes]
        else:
            if isinstance(state, torch.Tensor):
                state = [state]
            if len(state) != n:
                raise ValueError(f"state: expected {n} tensors, got {len(state)}")
            values = []
            for s, size in zip(state, sizes):
                s = torch.as_tensor(s).detach().to(dtype=self._dtype, device="cpu")
                if tuple(s.shape) != (B, size):
                    raise ValueError(f"state: expected shape {(B, size)}, got {tuple(s.shape)}")
                values.append(s)
        if self._cpp is not None:
            self._cpp.set_state(values[0], values[1])
            self._states_torch = None
        elif self._fast:
            self._xh[:, self._D:] = values[0].numpy()
            if n == 2:
                self._c[:] = values[1].numpy()
            self._states_torch = None
        else:
            device = self.cell.kernel.device
            self._states_torch = [v.to(device) for v in values]

    # ----- step ---------------------------------------------------------------------------------
    def step(self, x_t) -> torch.Tensor:
        """One time step: x_t [B, D] (or [D] when batch_size is 1) -> output [B, U]."""
        cpp = self._cpp
        if cpp is not None and type(x_t) is torch.Tensor and self.cell._parameters["kernel"] is self._kernel_param:
            out = cpp.step(x_t)  # None: x_t needs a dtype/device conversion first
            if out is not None:
                return out
        return self._step(x_t)

    def _step(self, x_t) -> torch.Tensor:
        cell = self.cell
        if self._fast is None:  # lazy cell: build from the first input
            D = np.shape(x_t)[-1]
            cell.build(D)
            self._setup()
        elif self._versions != self._param_versions():
            self._setup(keep_state=True)
        if self._cpp is not None:
            if isinstance(x_t, torch.Tensor):
                x = x_t.detach().to(device="cpu", dtype=self._dtype)
            else:
                x = torch.as_tensor(np.asarray(x_t, dtype=self._npdt))
            if x.shape[-1] != self._D or x.numel() != self.batch_size * self._D or x.dim() > 2:
                raise ValueError(f"x_t: expected shape ({self.batch_size}, {self._D}), got {tuple(x.shape)}")
            return self._cpp.step(x)
        if self._fast:
            if isinstance(x_t, torch.Tensor):
                if x_t.dtype != self._dtype or x_t.requires_grad or x_t.device.type != "cpu":
                    x_t = x_t.detach().to(device="cpu", dtype=self._dtype)
                x = x_t.numpy()
            else:
                x = np.asarray(x_t, dtype=self._npdt)
            if x.ndim == 1:
                x = x.reshape(1, -1)
            if x.shape[0] != self.batch_size or x.shape[1] != self._D:
                raise ValueError(f"x_t: expected shape ({self.batch_size}, {self._D}), got {tuple(x.shape)}")
            kind = cell.kind
            if kind == "lstm":
                out = fused_cpu._call(0, self._nb.lstm_step, x, self._W, self._WT, self._b, self._xh, self._c, self._z, self._act, self._ract)
            elif kind == "gru":
                out = fused_cpu._call(0, self._nb.gru_step, x, self._W, self._b, self._brec, self._R, self._xh, self._z, self._act,
                                        self._ract, self._reset_after)
            else:
                out = fused_cpu._call(0, self._nb.rnn_step, x, self._W, self._b, self._xh, self._z, self._act)
            return torch.from_numpy(out)
        x = torch.as_tensor(x_t, dtype=self._dtype).to(cell.kernel.device)
        if x.dim() == 1:
            x = x[None]
        if tuple(x.shape) != (self.batch_size, self._D):
            raise ValueError(f"x_t: expected shape ({self.batch_size}, {self._D}), got {tuple(x.shape)}")
        with torch.no_grad():
            out, states = cell(x, self._states_torch, training=False)
        self._states_torch = list(states)
        return out

    __call__ = step

    def __repr__(self) -> str:
        return f"Stream({type(self.cell).__name__}, batch_size={self.batch_size}, fused={bool(self._fast)})"
