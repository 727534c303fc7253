"""Random draws of the layers (dropout keep-masks) that also work inside torch.compile.

`bernoulli(shape, p, dtype, generator)` is `torch.bernoulli(torch.full(shape, p), generator=...)`.
Dynamo cannot put a `torch.Generator` in a graph, so a seeded draw under torch.compile goes
through the custom op `lstm::seeded_bernoulli`, which draws from the same generator when the
compiled graph runs: a seeded layer gives the same masks compiled and eager. (The generator is
found by a key fixed when the graph is traced: reseed it with `manual_seed`, do not replace it.)
Unseeded draws use torch's global RNG as usual (under inductor that is inductor's own RNG unless
`torch._inductor.config.fallback_random = True`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_generators: dict[int, torch.Generator] = {}  # the generators of compiled graphs, by key


def _key(generator: torch.Generator) -> int:
    _generators[id(generator)] = generator
    return id(generator)


# runs once while tracing; the key is a constant of the graph
_key_when_tracing = torch._dynamo.assume_constant_result(_key)


@torch.library.custom_op("lstm::seeded_bernoulli", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seeded_bernoulli(key: int, shape: list[int], p: float, dtype: torch.dtype) -> Tensor:
    return torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=_generators[key])


@_seeded_bernoulli.register_fake
def _(key, shape, p, dtype):
    return torch.empty(shape, dtype=dtype)


def bernoulli(shape, p: float, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> Tensor:
    """0/1 draws (1 with probability p) of `shape` on the CPU, from `generator` or torch's RNG."""
    if generator is not None and torch.compiler.is_compiling():
        return _seeded_bernoulli(_key_when_tracing(generator), list(shape), float(p), dtype)
    return torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=generator)
