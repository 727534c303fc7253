"""The compiled kernel core (csrc/): loaded once per process, shared by every fused kernel.

`extension()` gives the module, or None where it cannot be had (then the dispatch falls back
to the reference kernel). `activation_code` maps Keras' activation names to the codes the C++
core takes (csrc/simd.h); a callable or an unknown name has none.
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from typing import Optional

import torch

ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "linear": 3, "hard_sigmoid": 4, "hard_sigmoid_tf_keras": 5}

# LSTM_CSRC: build from another copy of csrc/ (a developer's scratch copy)
_CSRC = os.environ.get("LSTM_CSRC") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = sorted(glob.glob(os.path.join(_CSRC, "**", "*.cpp"), recursive=True))
# -fopenmp: at::parallel_for is inline, and without _OPENMP it runs its range on the calling
# thread (the extension then links torch's own libgomp.so.1, one OpenMP runtime in the process)
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

module = None  # the loaded module, False when it cannot be had
_error: Optional[str] = None
_lock = threading.Lock()


def activation_code(activation) -> Optional[int]:
    return ACTIVATION_CODES.get(activation) if isinstance(activation, str) else None


def _ext_name() -> str:
    # sources, flags and CPU features in the name: an edited source never loads a stale build
    import hashlib

    h = hashlib.sha1(" ".join(_FLAGS).encode())
    for path in sorted(glob.glob(os.path.join(_CSRC, "**", "*.*"), recursive=True)):
        with open(path, "rb") as f:
            h.update(f.read())
    try:  # -march=native: a build is only for CPUs with these flags (a shared cache dir is safe)
        with open("/proc/cpuinfo") as f:
            h.update(next((ln for ln in f if ln.startswith("flags")), "").encode())
    except OSError:
        pass
    return f"lstm_cpu_{h.hexdigest()[:10]}"


def _load() -> bool:
    """Loads the extension once per process; True if it is there."""
    global module, _error
    if module is None:
        with _lock:
            if module is None:
                if os.environ.get("LSTM_NO_CPP"):
                    module, _error = False, "disabled by LSTM_NO_CPP"
                else:
                    try:
                        from torch.utils.cpp_extension import load

                        module = load(name=_ext_name(), sources=_SOURCES, extra_cflags=_FLAGS,
                                      extra_include_paths=[_CSRC], extra_ldflags=["-fopenmp"], verbose=False)
                    except Exception as exc:  # no compiler, no ninja, ...
                        module, _error = False, f"{type(exc).__name__}: {exc}"
                        detail = [ln for ln in _error.splitlines() if "error" in ln.lower()][-3:]
                        warnings.warn("lstm: the C++ kernels could not be built; falling back to the reference "
                                      "kernel: " + " | ".join(detail)[:1000], RuntimeWarning, stacklevel=4)
    return bool(module)


# under torch.compile / export (a model compiled before any eager call): loaded outside the trace
loaded_when_tracing = torch._dynamo.assume_constant_result(_load)


def extension():
    """The compiled module; None if it cannot be had."""
    if torch.compiler.is_compiling():
        loaded_when_tracing()  # (before `module` is read: Dynamo guards on the value it reads)
    elif module is None:
        _load()
    return module or None


def unavailable_reason() -> Optional[str]:
    extension()
    return _error
