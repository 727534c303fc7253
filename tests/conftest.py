"""The reliability tally: tests that try to break the library count what they tried (bad inputs,
fuzz iterations, kill points), and the run prints the counts at the end (README, Reliability).

Without a GPU the Triton kernels run under Triton's interpreter (on CPU tensors, when a test forces
them), so the tests that run every kernel check them too: set before triton is imported."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TALLY: Counter = Counter()

KINDS = {
    "bad input": "bad inputs tried (each a clear ValueError/TypeError or a defined result)",
    "fuzz: config": "hypothesis configs (deserialize / from_config)",
    "fuzz: inputs": "hypothesis inputs (shapes, dtypes, strides, masks, states, NaN/Inf)",
    "fuzz: inputs compared": "of which ran, and equal the reference kernel's numbers",
    "fuzz: keras file": "truncated or bit-flipped Keras files read",
    "fuzz: checkpoint": "truncated or bit-flipped checkpoint files read",
    "kill point": "training runs stopped (SIGINT, SIGTERM, SIGKILL, crash) and resumed",
}


@pytest.fixture(scope="session")
def tally() -> Counter:
    """`tally["bad input"] += 1`: counted into the summary printed after the run."""
    return TALLY


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("reliability: what was tried")
    for kind, meaning in KINDS.items():
        if TALLY[kind]:
            terminalreporter.write_line(f"{TALLY[kind]:>7}  {meaning}")
    for kind in sorted(set(TALLY) - set(KINDS)):
        terminalreporter.write_line(f"{TALLY[kind]:>7}  {kind}")


@pytest.fixture(params=["mkl", "panels"])
def step_products(request):
    """The float32 per-step products on MKL or on panel_right.h's kernel (AVX-512 or AVX2: what CPUs
    that are not Intel's run by default), whatever this CPU is; skipped where the build has no panels."""
    from lstm.kernels import native  # (here: TRITON_INTERPRET is set above, before triton is imported)

    ext = native.extension()
    if ext is None:
        pytest.skip("the C++ kernels are not loaded")
    previous = ext.set_panels(1 if request.param == "panels" else 0)
    try:
        if request.param == "panels" and not ext.panels_preferred():
            pytest.skip("this build of the C++ kernels has no panels kernel (the x86-64-v3 and v4 builds have it)")
        yield request.param
    finally:
        ext.set_panels(previous)
