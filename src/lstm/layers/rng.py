"""Random draws of the layers (dropout keep-masks, zoneout seeds) that also work inside torch.compile.

`bernoulli(shape, p, dtype, generator)` draws keep-masks counter-based (`kernels.keep_mask`), seeded by
`counter_seed(generator)`, which is `int(torch.randint(0, 2**62, (), generator=...))` (zoneout's seed too).
Dynamo cannot put a `torch.Generator` in a graph, so a seeded draw under torch.compile goes
through a custom op (`lstm::seeded_bernoulli`, `lstm::seeded_randint`), which draws from the same
generator when the compiled graph runs: a seeded layer gives the same masks compiled and eager.
(A zoneout seed is a 0-dim int64 tensor there: the graph cannot turn a draw into a Python int.)
(The generator is found by a key fixed when the graph is traced: reseed it with `manual_seed`, do
not replace it.)
Unseeded draws use torch's global RNG as usual (under inductor that is inductor's own RNG unless
`torch._inductor.config.fallback_random = True`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import kernels

_generators: dict[int, torch.Generator] = {}  # the generators of compiled graphs, by key


def _key(generator: torch.Generator) -> int:
    _generators[id(generator)] = generator
    return id(generator)


# runs once while tracing; the key is a constant of the graph
_key_when_tracing = torch._dynamo.assume_constant_result(_key)


@torch.library.custom_op("lstm::seeded_bernoulli", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seeded_bernoulli(key: int, shape: list[int], p: float, dtype: torch.dtype) -> Tensor:
    return _draws(shape, p, dtype, _generators[key])


@_seeded_bernoulli.register_fake
def _(key, shape, p, dtype):
    return torch.empty(shape, dtype=dtype)


def bernoulli(shape, p: float, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> Tensor:
    """0/1 draws (1 with probability p) of `shape` on the CPU, from `generator` or torch's RNG."""
    if generator is not None and torch.compiler.is_compiling():
        return _seeded_bernoulli(_key_when_tracing(generator), list(shape), float(p), dtype)
    return _draws(shape, p, dtype, generator)


def _draws(shape, p: float, dtype: torch.dtype, generator: Optional[torch.Generator]) -> Tensor:
    return kernels.keep_mask(counter_seed(generator), math.prod(shape), p).view(tuple(shape)).to(dtype)


@torch.library.custom_op("lstm::seeded_randint", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seeded_randint(key: int, high: int) -> Tensor:
    return torch.randint(0, high, (), generator=_generators[key])


@_seeded_randint.register_fake
def _(key, high):
    return torch.empty((), dtype=torch.int64)


SEED_BOUND = 2 ** 62


def counter_seed(generator: Optional[torch.Generator] = None):
    """A seed of counter-based draws (dropout's keep-masks, zoneout's) in [0, 2**62) from
    `generator` or torch's RNG: an int, or under torch.compile a 0-dim int64 tensor drawn when the
    graph runs (the same draw as eagerly)."""
    if not torch.compiler.is_compiling():
        return int(torch.randint(0, SEED_BOUND, (), generator=generator))
    if generator is not None:
        return _seeded_randint(_key_when_tracing(generator), SEED_BOUND)
    return torch.randint(0, SEED_BOUND, ())
