"""Tests' two-process runs: a rank stuck in a collective fails the test instead of hanging it."""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch.multiprocessing as mp


def spawn_two_ranks(worker, make_args: Callable[[int], tuple], seconds: float, attempts: int = 2) -> None:
    """Runs worker(rank, *make_args(attempt)) in two processes. A rank that raises makes `join`
    raise its error. Two ranks not done within `seconds` are killed and run again with a fresh
    rendezvous (make_args gives a new init file or port per attempt): gloo's rendezvous and teardown
    can stall under CPU load (seen twice in CI-like runs beside other work), then the test fails."""
    for attempt in range(attempts):
        ranks = mp.spawn(worker, args=make_args(attempt), nprocs=2, join=False)
        deadline = time.monotonic() + seconds
        while not ranks.join(timeout=2):
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                break
        else:
            return
    pytest.fail(f"the two ranks did not finish within {seconds:g} s, {attempts} times (one stuck in a collective?)")
