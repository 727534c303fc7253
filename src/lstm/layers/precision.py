"""Keras 3's dtype policies on this library's layers, and torch.autocast.

A layer's policy (`dtype=` 'float32', 'float64', 'bfloat16', 'float16', 'mixed_bfloat16',
'mixed_float16') says the dtype of its variables (`variable_dtype`, also `dtype` as in Keras) and
the one it computes and outputs in (`compute_dtype`); a mixed policy keeps float32 variables and
computes in the low precision. Inside a `torch.autocast` region a float32 layer computes in the
region's dtype with its float32 weights, as torch's own modules do (`call_dtype`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..serialization import DTypePolicy, dtype_name, parse_dtype_policy


def autocast_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What a layer computing in `compute_dtype` computes a call on `device` in: inside a
    torch.autocast region for that device, the region's dtype if the layer computes in float32
    (torch's rule: autocast lowers float32 only, never float64); else `compute_dtype`."""
    if (compute_dtype is torch.float32 and torch.amp.is_autocast_available(device.type)
            and torch.is_autocast_enabled(device.type)):
        return torch.get_autocast_dtype(device.type)
    return compute_dtype


class PolicyLayer:
    """Keras 3's dtype attributes for a layer (mixed into nn.Modules): `dtype_policy`,
    `variable_dtype`, `compute_dtype`, `dtype` (the variables' dtype). A subclass stores its
    policy with `self.dtype_policy = ...` and says where its weights are (`_first_weight`)."""

    def _first_weight(self) -> Optional[torch.Tensor]:
        raise NotImplementedError

    @property
    def dtype_policy(self) -> DTypePolicy:
        """The policy in force: a plain one follows the weights (after `module.double()`, ...)."""
        policy = self._policy
        return policy if policy.is_mixed else DTypePolicy(dtype_name(self.variable_dtype))

    @dtype_policy.setter
    def dtype_policy(self, value) -> None:
        self._policy = parse_dtype_policy(value)

    @property
    def variable_dtype(self) -> torch.dtype:
        weight = self._first_weight()
        return self._policy.variable_dtype if weight is None else weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        policy = self._policy
        return policy.compute_dtype if policy.is_mixed else self.variable_dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.variable_dtype

    def call_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype a call on `device` computes in (its inputs are cast to it): the compute dtype,
        or torch.autocast's (see `autocast_dtype`)."""
        return autocast_dtype(self.compute_dtype, device)

    def dtype_config(self):
        """The config's 'dtype': a plain dtype's name (the tutorial's format), or a mixed policy as
        Keras 3 writes it."""
        return self.dtype_policy.to_config()


def weight_array(weight: torch.Tensor):
    """A weight as a new NumPy array; bfloat16, which NumPy lacks, as float32 (exactly)."""
    weight = weight.detach().cpu()
    return (weight.float() if weight.dtype is torch.bfloat16 else weight).numpy().copy()
