"""`--precision`: the dtype a run computes in. fp32; bf16: the forward (and loss) under
torch.autocast in bfloat16, weights, gradients and optimizer state in float32; fp16: the same in
float16, with dynamic loss scaling (torch.amp.GradScaler) so that small gradients do not flush
to zero in float16. The loss scale is saved in each checkpoint (state.json), so a resumed run
continues exactly."""

from __future__ import annotations

import contextlib

import torch

from . import TrainError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)


def check(precision) -> None:
    if precision not in PRECISIONS:
        raise TrainError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(precision: str, device: torch.device):
    """The region a forward of this precision runs in (none for fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Precision:
    """The forward's autocast region and the backward/step with or without loss scaling."""

    def __init__(self, precision: str, device: torch.device):
        check(precision)
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        return autocast(self.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer) -> None:
        """The gradients in their true scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        """optimizer.step(), skipped by the scaler when a gradient is not finite (the scale then drops)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
