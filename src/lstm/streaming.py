"""Streaming (online) inference: one time step per call, the state kept inside.

    s = layer.stream(batch_size=1)       # or cell.stream(...)
    for x_t in source:                   # x_t [B, D], or [D] for batch 1
        y_t = s.step(x_t)                # [B, U], the same numbers as the layer on the sequence
    s.state                              # [h, c] (LSTM) or [h]
    s.reset()                            # back to zeros (or s.reset([h, c]))

A step is one call of the step object the kernels offer for the cell (`lstm.kernels.stream_step`:
for a plain LSTM, one C++ call on weights packed once, updating the state in place and returning
h_t in a new tensor, never aliased with the state). The stream makes it again when a parameter
changes (in-place updates bump its version). Cells no kernel steps (custom activations, non-CPU
tensors, low precision, or none offered) step through the cell's call instead, without autograd,
with the states as a layer call carries them (C in float32 for a low-precision compute dtype), so
the steps equal the layer on the whole sequence. A stream computes in the cell's dtype policy,
torch.autocast or not.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch

from . import kernels


def _autocast_off(device_type: str):
    """A stream computes in its cell's policy, like its fused steps, in or out of autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Stream:
    """Step-by-step inference over one recurrent cell (see the module docstring)."""

    def __init__(self, cell, batch_size: int = 1, initial_state: Optional[Sequence] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.cell = cell
        self.batch_size = batch_size
        self._initial = None if initial_state is None else [torch.as_tensor(s).detach().clone() for s in initial_state]
        self._ready = False
        self._fast = None  # the kernels' step object
        self._kernel_param = None
        self._versions = None
        self._params = ()
        self._states_torch: Optional[list] = None
        if cell.built:
            self._setup()

    # ----- setup --------------------------------------------------------------------------------
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
        self._D = cell.input_dim
        self._dtype = cell.compute_dtype
        self._params = tuple(cell.weights())
        self._versions = self._param_versions()
        self._fast = kernels.stream_step(cell, self.batch_size)
        self._kernel_param = self._params[0] if self._fast is not None else None
        self._ready = True
        self.reset(state)

    # ----- state --------------------------------------------------------------------------------
    @property
    def state(self) -> list:
        """The current states ([h, c] for LSTM, [h] otherwise), as copies."""
        if not self.cell.built:
            return []
        if self._fast is not None:
            return list(self._fast.state())
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
        if self._fast is not None:
            self._fast.set_state(*values)
            self._states_torch = None
        else:
            device = self.cell.kernel.device
            self._states_torch = [v.to(device) for v in values]

    # ----- step ---------------------------------------------------------------------------------
    def step(self, x_t) -> torch.Tensor:
        """One time step: x_t [B, D] (or [D] when batch_size is 1) -> output [B, U]."""
        fast = self._fast
        if fast is not None and type(x_t) is torch.Tensor and self.cell._parameters["kernel"] is self._kernel_param:
            out = fast.step(x_t)  # None: x_t needs a dtype/device conversion first
            if out is not None:
                return out
        return self._step(x_t)

    def _step(self, x_t) -> torch.Tensor:
        cell = self.cell
        if not self._ready:  # lazy cell: build from the first input
            cell.build(np.shape(x_t)[-1])
            self._setup()
        elif self._versions != self._param_versions():
            self._setup(keep_state=True)
        if self._fast is not None:
            if isinstance(x_t, torch.Tensor):
                x = x_t.detach().to(device="cpu", dtype=self._dtype)
            else:
                x = torch.as_tensor(np.asarray(x_t), dtype=self._dtype)
            if x.shape[-1] != self._D or x.numel() != self.batch_size * self._D or x.dim() > 2:
                raise ValueError(f"x_t: expected shape ({self.batch_size}, {self._D}), got {tuple(x.shape)}")
            return self._fast.step(x)
        x = torch.as_tensor(x_t, dtype=self._dtype).to(cell.kernel.device)
        if x.dim() == 1:
            x = x[None]
        if tuple(x.shape) != (self.batch_size, self._D):
            raise ValueError(f"x_t: expected shape ({self.batch_size}, {self._D}), got {tuple(x.shape)}")
        with torch.no_grad(), _autocast_off(x.device.type):
            out, states = cell.call_states(x, self._states_torch, training=False, carried=True)
        self._states_torch = list(states)
        return out

    __call__ = step

    def __repr__(self) -> str:
        return f"Stream({type(self.cell).__name__}, batch_size={self.batch_size}, fused={self._fast is not None})"
