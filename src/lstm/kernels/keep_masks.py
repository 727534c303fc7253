"""Dropout's keep-masks from counter-based draws, as zoneout's: element n of a draw seeded `seed`
is kept when `problem.counter_bits(seed, n)` < p * 2^24. One seed from torch's RNG per draw, then
the C++ core draws every element in parallel (the sentiment task's embedding dropout, 512,000
elements: ~0.1 ms, against 1.8 ms for torch.rand's Mersenne twister); torch computes the same
numbers where the core is not loaded, and under torch.compile."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from . import native
from .problem import UNIFORM_BITS, counter_bits


def keep_mask(seed: Union[int, Tensor], count: int, p: float) -> Tensor:
    """float32 [count] on the CPU: 1 where kept (probability p, in steps of 2^-24). seed: an int, or
    a 0-dim int64 tensor under torch.compile."""
    threshold = int(p * (1 << UNIFORM_BITS))
    extension = None if torch.compiler.is_compiling() or not isinstance(seed, int) else native.extension()
    if extension is not None:
        return extension.keep_mask(seed, count, threshold)
    return (counter_bits(seed, torch.arange(count)) < threshold).float()
