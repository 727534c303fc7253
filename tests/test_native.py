"""The loader of the compiled kernels (lstm.kernels.native): the modules setup.py builds are
installed, the loader picks the variant this CPU runs, LSTM_CPU=portable loads the portable
build and it computes what the default one computes, a bad LSTM_CPU is a clear error, and a
missing module warns once and falls back to the reference kernel.

Each load runs in a subprocess: a process loads one variant (LSTM_CPU is read once)."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lstm.kernels import native

SRC = str(Path(__file__).resolve().parent.parent / "src")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _python(script: str, *args, timeout=300, **env) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter with the loader's variables as given (unset otherwise)."""
    base = {k: v for k, v in os.environ.items() if k not in ("LSTM_CPU", "LSTM_NO_CPP", "LSTM_KERNEL")}
    base["PYTHONPATH"] = os.pathsep.join([SRC] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    base.update(env)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=base, timeout=timeout)


def _expected_variant() -> str:
    if not X86_64:
        return "portable"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")


def test_every_variant_of_this_platform_is_built():
    names = ["avx512", "avx2", "portable"] if X86_64 else ["portable"]
    missing = [n for n in names if importlib.util.find_spec(f"lstm._kernels_{n}") is None]
    assert not missing, f"not built: {missing} (python setup.py build_ext --inplace, or pip install -e .)"


def test_runnable_variants_follow_torchs_cpu_capability():
    runs = native.runnable_variants()
    assert runs[-1] == "portable" and list(runs) == [v for v in native.VARIANTS if v in runs]
    # the flags check only ever steps down from torch's answer (it does on no CPU sold today)
    assert runs[0] in native.VARIANTS[native.VARIANTS.index(_expected_variant()):]


PLAIN_AND_VARIANTS = r"""
import sys, torch
from lstm import kernels, layers
from lstm.kernels import dispatch, native

chosen = []
select = dispatch.select
dispatch.select = lambda p: chosen.append(select(p).name) or select(p)

out = {"isa": native.isa(), "module": native.module.__name__ if native.module else native.unavailable_reason()}
configs = [{}, {"peephole": True, "layer_norm": True}, {"proj_size": 5, "coupled": True, "cell_clip": 0.7, "forget_bias": 0.5},
           {"activation": "relu", "recurrent_activation": "hard_sigmoid"}]
for dtype in ("float64", "float32"):
    for i, cfg in enumerate(configs):
        torch.manual_seed(i)
        layer = layers.LSTM(12, return_sequences=True, return_state=True, dtype=dtype, **cfg)
        x = torch.randn(5, 9, 7, dtype=getattr(torch, dtype), requires_grad=True)
        mask = torch.rand(5, 9) < 0.8
        layer(x)  # builds the weights; then all of them random (peephole weights start at zero)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
        chosen.clear()
        y, h, c = layer(x, mask=mask)
        grads = torch.autograd.grad(y.square().sum() + h.sum() + c.sum(), [x, *layer.parameters()])
        out[f"{dtype} {i}"] = (chosen[:], [t.detach() for t in (y, h, c, *grads)])
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def default_and_portable(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    runs = {"default": {}, "portable": {"LSTM_CPU": "portable"}}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(lambda kv: _python(PLAIN_AND_VARIANTS, d / f"{kv[0]}.pt", **kv[1]), runs.items())))
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    return {name: torch.load(d / f"{name}.pt") for name in runs}


def test_loader_picks_the_variant_this_cpu_runs(default_and_portable):
    out = default_and_portable["default"]
    assert out["isa"] == native.runnable_variants()[0] == _expected_variant(), out["module"]
    assert out["module"] == f"lstm._kernels_{out['isa']}"


def test_lstm_cpu_portable_loads_the_portable_module(default_and_portable):
    out = default_and_portable["portable"]
    assert out["isa"] == "portable" and out["module"] == "lstm._kernels_portable", out["module"]


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_portable_equals_default_on_lstm_and_variants(default_and_portable, dtype, tol):
    default, portable = default_and_portable["default"], default_and_portable["portable"]
    for key in (k for k in default if k.startswith(dtype)):
        (kernels_d, tensors_d), (kernels_p, tensors_p) = default[key], portable[key]
        expected = ["fused_cpp"] if key.endswith(("0", "3")) else ["fused_variants"]
        assert kernels_d == kernels_p == expected, (key, kernels_d, kernels_p)  # the compiled kernels ran
        for i, (a, b) in enumerate(zip(tensors_d, tensors_p)):
            assert a.dtype == getattr(torch, dtype) and a.shape == b.shape
            assert torch.allclose(a, b, rtol=tol, atol=tol), (key, i, (a - b).abs().max().item())


def test_bad_lstm_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LSTM_CPU", "sse4")
    with pytest.raises(ValueError, match=r"LSTM_CPU='sse4'.*avx512, avx2, portable"):
        native.cpu_variant()
    monkeypatch.setenv("LSTM_CPU", "AVX2")  # any case
    monkeypatch.setattr(native, "runnable_variants", lambda: ("avx2", "portable"))
    assert native.cpu_variant() == "avx2"
    monkeypatch.setenv("LSTM_CPU", "avx512")  # one this CPU cannot run: names the variable and the capability
    with pytest.raises(RuntimeError, match=r"LSTM_CPU=avx512 .*cannot run.*CPU capability as \w+.*runs avx2, portable"):
        native.cpu_variant()


def test_bad_lstm_cpu_fails_the_layer_call():
    proc = _python("import torch; from lstm import layers; layers.LSTM(3)(torch.randn(2, 4, 5))", LSTM_CPU="fast")
    assert proc.returncode != 0 and "ValueError: LSTM_CPU='fast' is not a CPU variant" in proc.stderr, proc.stderr[-2000:]


MISSING = r"""
import warnings, torch
from lstm import kernels, layers
from lstm.kernels import native
for variant in native.VARIANTS:  # as if setup.py had not built it
    native._MODULES[variant] = "lstm._kernels_not_built"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    layer = layers.LSTM(6, return_sequences=True)
    x = torch.randn(3, 5, 4, dtype=torch.float32)
    y1 = layer(x)
    y2 = layer(x)
    layers.LSTM(4, peephole=True)(x).sum().backward()
state = [torch.zeros(3, 6), torch.zeros(3, 6)]
chosen = kernels.select(layer.cell.recurrence(x, state)).name
with kernels.use("reference"):
    assert torch.allclose(layer(x), y1, rtol=1e-5, atol=1e-6)
assert native.extension() is None and native.isa() is None
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print("WARNINGS", len(messages))
print("CHOSEN", chosen)
print("REASON", native.unavailable_reason())
print("MESSAGE", messages[0] if messages else "")
"""


def test_missing_module_warns_once_and_falls_back_to_the_reference_kernel():
    proc = _python(MISSING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if " " in ln)
    assert lines["WARNINGS"] == "1", proc.stdout
    assert lines["CHOSEN"] not in ("fused_cpp", "fused_variants"), proc.stdout
    assert "lstm._kernels_not_built" in lines["REASON"] and "ModuleNotFoundError" in lines["REASON"]
    message = lines["MESSAGE"]
    assert "lstm._kernels_not_built" in message and "reference kernel" in message and "numba" not in message.lower()
    assert "To fix: python -m pip install" in message, message


def test_lstm_no_cpp_disables_without_a_warning():
    script = ("import warnings, torch; warnings.simplefilter('error'); from lstm import layers; from lstm.kernels import native; "
              "layers.LSTM(3)(torch.randn(2, 4, 5)); print(native.extension(), native.isa(), native.unavailable_reason())")
    proc = _python(script, LSTM_NO_CPP="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None None disabled by LSTM_NO_CPP"


def test_isa_names_the_loaded_module():
    if native.extension() is None:
        assert native.isa() is None and native.unavailable_reason()
    else:
        assert native.module.__name__ == f"lstm._kernels_{native.isa()}"
