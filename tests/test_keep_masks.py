"""Dropout's keep-masks (kernels/keep_masks.py): counter-based draws, the C++ core's equal to torch's,
kept at the rate asked, a function of the seed alone."""

from __future__ import annotations

import pytest
import torch

import lstm.kernels
from lstm import layers
from lstm.kernels import keep_masks, native


def _torch_drawn(seed: int, count: int, p: float) -> torch.Tensor:
    threshold = int(p * (1 << lstm.kernels.problem.UNIFORM_BITS))
    return (lstm.kernels.problem.counter_bits(seed, torch.arange(count)) < threshold).float()


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.7, 1.0])
def test_the_cpp_draws_equal_torchs_and_keep_the_rate(p):
    seed, count = 2 ** 61 + 12345, 400_000
    got = keep_masks.keep_mask(seed, count, p)
    assert got.dtype == torch.float32 and got.shape == (count,)
    if native.extension() is not None:
        assert torch.equal(got, _torch_drawn(seed, count, p))
    assert abs(float(got.mean()) - p) <= 0.003
    assert set(got.unique().tolist()) <= {0.0, 1.0}


def test_a_draw_is_a_function_of_its_seed():
    a, b, c = (keep_masks.keep_mask(seed, 1000, 0.5) for seed in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_layers_draw_from_the_seed_they_are_given():
    x = torch.ones(4, 6, 10)
    drop = layers.Dropout(0.3, seed=5)
    drop.train()
    first = drop(x)
    again = layers.Dropout(0.3, seed=5)
    again.train()
    assert torch.equal(first, again(x))
    kept = first != 0
    assert torch.allclose(first[kept], torch.full_like(first[kept], 1 / 0.7))
    assert abs(float(kept.float().mean()) - 0.7) <= 0.1
    torch.manual_seed(3)
    unseeded = layers.Dropout(0.3)
    unseeded.train()
    y1 = unseeded(x)
    torch.manual_seed(3)
    assert torch.equal(y1, unseeded(x))
