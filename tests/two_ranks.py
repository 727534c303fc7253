"""Tests' two-process runs: a rank stuck in a collective fails the test instead of hanging it."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp


def spawn_two_ranks(worker, args: tuple, seconds: float) -> None:
    """Runs worker(rank, *args) in two processes; fails the test (killing both) after `seconds`.
    A rank that raises makes `join` raise its error."""
    ranks = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {seconds:g} s (one stuck in a collective?)")
