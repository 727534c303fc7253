"""Fixed, seeded splits. The split seed is a constant of each dataset, not the training seed, so
every run (and every rank) sees the same train / validation / test examples."""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 20260101


def shuffled_split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = SPLIT_SEED, labels=None):
    """Index arrays (train, validation, test), disjoint and covering range(n); stratified by labels."""
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(labels)
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    parts = ([], [], [])
    for group in groups:
        group = rng.permutation(group)
        n_val = int(round(len(group) * fractions[1]))
        n_test = int(round(len(group) * fractions[2])) if len(fractions) > 2 else 0
        n_train = len(group) - n_val - n_test
        parts[0].append(group[:n_train])
        parts[1].append(group[n_train:n_train + n_val])
        parts[2].append(group[n_train + n_val:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)


def chronological_split(n: int, fractions=(0.7, 0.15, 0.15)):
    """Contiguous (train, validation, test) ranges in time order, as (start, stop) pairs."""
    n_train = int(n * fractions[0])
    n_val = int(n * fractions[1])
    return (0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)
