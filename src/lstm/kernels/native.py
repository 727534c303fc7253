"""The compiled kernel core (csrc/): loaded once per process, shared by every fused kernel.

The C++ core is compiled when the package is installed (setup.py), once per CPU variant:
`lstm._kernels_avx512` (x86-64-v4), `lstm._kernels_avx2` (x86-64-v3) and
`lstm._kernels_portable` (the compiler's default target; the only one off x86-64). The loader
imports the best one this CPU runs (torch.backends.cpu.get_cpu_capability(), checked against the
CPU's flags where /proc/cpuinfo has them); nothing is compiled at run time.

    LSTM_CPU=portable|avx2|avx512   load that variant (an error if this CPU cannot run it)
    LSTM_NO_CPP=1                   no C++ kernels: the dispatch runs the reference kernel

`extension()` gives the module, or None where it cannot be had: disabled, or the module is
missing or fails to load (built against another torch, say); then a RuntimeWarning says once
what failed and the command that fixes it, and the dispatch falls back to the reference kernel.
`isa()` names the variant loaded. `activation_code` maps Keras' activation names to the codes
the C++ core takes (csrc/simd.h); a callable or an unknown name has none.
"""

from __future__ import annotations

import importlib
import os
import platform
import threading
import warnings
from typing import Optional

import torch

ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "linear": 3, "hard_sigmoid": 4, "hard_sigmoid_tf_keras": 5}

VARIANTS = ("avx512", "avx2", "portable")  # fastest first
# the installed module of each variant (setup.py builds them); a test may point one elsewhere
_MODULES = {variant: f"lstm._kernels_{variant}" for variant in VARIANTS}
# the CPU flags (as /proc/cpuinfo names them) each build assumes: its -march level (LZCNT shows as
# abm) and -mprfchw (PREFETCHW, shown as 3dnowprefetch)
_FLAGS_NEEDED = {
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "3dnowprefetch"},
    "avx512": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "3dnowprefetch",
               "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}

module = None  # the loaded module, False when it cannot be had
_error: Optional[str] = None
_isa: Optional[str] = None
_lock = threading.Lock()


def activation_code(activation) -> Optional[int]:
    return ACTIVATION_CODES.get(activation) if isinstance(activation, str) else None


def _cpu_flags() -> Optional[set]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def runnable_variants() -> tuple:
    """The variants this CPU runs, fastest first: torch's CPU capability (AVX512, AVX2, ...),
    each checked against every flag its -march level assumes where /proc/cpuinfo lists them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("portable",)
    capability = torch.backends.cpu.get_cpu_capability()
    best = {"AVX512": 0, "AVX2": 1}.get(capability, 2)
    flags = _cpu_flags()
    return tuple(v for v in VARIANTS[best:] if v == "portable" or flags is None or _FLAGS_NEEDED[v] <= flags)


def cpu_variant() -> str:
    """The variant the loader picks: LSTM_CPU's when it is set, else the fastest this CPU runs."""
    runs = runnable_variants()
    forced = os.environ.get("LSTM_CPU", "").strip()
    if not forced:
        return runs[0]
    if forced.lower() not in VARIANTS:
        raise ValueError(f"LSTM_CPU={forced!r} is not a CPU variant of lstm's C++ kernels: use one of "
                         f"{', '.join(VARIANTS)}, or leave LSTM_CPU unset for the fastest this CPU runs ({runs[0]})")
    if forced.lower() not in runs:
        raise RuntimeError(f"LSTM_CPU={forced} asks for a variant this CPU cannot run: torch reports its CPU "
                           f"capability as {torch.backends.cpu.get_cpu_capability()}, it runs {', '.join(runs)}")
    return forced.lower()


def _source_root() -> Optional[str]:
    """The checkout this package is imported from (an editable install or src/ on the path)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return root if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def _fix_command() -> str:
    root = _source_root()
    if root is not None:  # builds against the pinned torch (and installs it)
        return f'python -m pip install -e "{root}"'
    from importlib import metadata

    try:
        dist = metadata.distribution("lstm")
    except metadata.PackageNotFoundError:
        return "python -m pip install --force-reinstall lstm"
    pinned = next((r.split("==", 1)[1].split(";")[0].strip() for r in dist.requires or ()
                   if r.replace(" ", "").startswith("torch==")), None)
    if pinned and torch.__version__.split("+")[0] != pinned:
        return f"python -m pip install torch=={pinned}"
    source = f"lstm=={dist.version}"
    try:
        import json

        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            source = f'"{url[len("file://"):]}"'
    except (ValueError, OSError):
        pass
    return f"python -m pip install --force-reinstall --no-deps {source}"


def _fail(message: str) -> None:
    global module, _error
    module, _error = False, message
    warnings.warn(f"lstm: {message}; every layer now runs on the reference kernel (correct, much slower). "
                  f"To fix: {_fix_command()}", RuntimeWarning, stacklevel=5)


def _load_installed() -> None:
    global module, _isa
    variant = cpu_variant()  # (raises for a bad LSTM_CPU: an error in the caller's settings)
    name = _MODULES[variant]
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # missing (not built), or built against another torch (undefined symbols)
        _fail(f"the C++ kernels' module {name} ({variant}) could not be loaded with torch {torch.__version__}: "
              f"{type(exc).__name__}: {exc}")
    else:
        module, _isa = mod, variant


def _load() -> bool:
    """Loads the extension once per process; True if it is there."""
    global module, _error
    if module is None:
        with _lock:
            if module is None:
                if os.environ.get("LSTM_NO_CPP", "").strip() not in ("", "0"):
                    module, _error = False, "disabled by LSTM_NO_CPP"
                else:
                    _load_installed()
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


def isa() -> Optional[str]:
    """The variant of the C++ kernels loaded: 'avx512', 'avx2' or 'portable'; None when none is
    loaded (unavailable_reason() says why)."""
    extension()
    return _isa
