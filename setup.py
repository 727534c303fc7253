"""Builds the C++ kernel core (src/lstm/kernels/csrc) when the package is installed.

Every .cpp under csrc/ (recursively) forms one module; it is built once per CPU variant:

    lstm._kernels_avx512    -march=x86-64-v4 (AVX-512)   x86-64 only
    lstm._kernels_avx2      -march=x86-64-v3 (AVX2, FMA)  x86-64 only
    lstm._kernels_portable  the compiler's default target

lstm.kernels.native loads the one the CPU runs (LSTM_CPU forces one). The modules are built
against the torch installed in the build environment (pyproject.toml pins it to the runtime's).

After editing the C++: `python setup.py build_ext --inplace` (or `pip install -e . --no-build-isolation`).
"""

import copy
import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = os.path.join("src", "lstm", "kernels", "csrc")
# -fopenmp: at::parallel_for is inline, and without _OPENMP it runs its range on the calling
# thread (the extension then links torch's own libgomp.so.1, one OpenMP runtime in the process)
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-g0"]  # -g0: no debug info (python adds -g)
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# -mprfchw: the kernels' write prefetches become PREFETCHW (x86-64-v3/v4 leave it out, and GCC then
# emits read prefetches): training step at (32,80,100,64), 2 threads, 5.62-5.73 ms -> 5.47-5.54 ms
# on an AMD EPYC, as fast as -march=native; native.py loads these modules only where the CPU has it
VARIANTS = ({"avx512": ["-march=x86-64-v4", "-mprfchw"], "avx2": ["-march=x86-64-v3", "-mprfchw"], "portable": []}
            if X86_64 else {"portable": []})


def extensions():
    here = os.path.dirname(os.path.abspath(__file__))
    # relative to setup.py (setuptools wants relative source paths), found when the build runs
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, CSRC, "**", "*.cpp"), recursive=True))
    if not sources:
        raise RuntimeError(f"no C++ sources under {CSRC}")
    depends = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, CSRC, "**", "*.h"), recursive=True))
    return [
        CppExtension(f"lstm._kernels_{variant}", sources, include_dirs=[os.path.join(here, CSRC)], depends=depends,
                     extra_compile_args=FLAGS + march, extra_link_args=["-fopenmp"])
        for variant, march in VARIANTS.items()
    ]


class BuildExt(BuildExtension):
    """torch's BuildExtension (TORCH_EXTENSION_NAME = each module's last name part, ninja), with
    the modules built in parallel: each in a temp folder of its own, since all of them compile
    the same sources (same object paths, same build.ninja)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:  # `build_ext -j N` chooses; by default one thread per module
            self.parallel = len(self.extensions)
        if self.parallel > 1 and "MAX_JOBS" not in os.environ:
            # the compile jobs of all modules together about fill the cores (ninja's default is cores + 2 each)
            os.environ["MAX_JOBS"] = str(max(1, ((os.cpu_count() or 1) + 1) // self.parallel))

    def build_extension(self, ext):
        cmd = copy.copy(self)  # (a shallow copy: the compiler and everything else shared)
        cmd.build_temp = os.path.join(self.build_temp, ext.name.rpartition(".")[2])
        os.makedirs(cmd.build_temp, exist_ok=True)
        BuildExtension.build_extension(cmd, ext)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
