"""Every Triton step program compiles for the GPU (sm_90 and sm_80, to cubin) on this machine,
without one: what Triton's interpreter, which the other tests here run, does not check
(compile_for_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_step_program_compiles_for_the_gpu():
    script = Path(__file__).with_name("compile_for_gpu.py")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"  # (Triton 3.9 warns while it is unset)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env=environment)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(lines) >= 30 and all(": ok (" in line for line in lines), result.stdout
