"""Build quant4's Cython kernels.

One source, quant4/_kernels.pyx, is compiled into up to three extension modules:
  quant4._kernels          baseline flags (any CPU of the target architecture)
  quant4._kernels_avx2     x86-64 with AVX2 + FMA + F16C
  quant4._kernels_avx512   x86-64 with AVX-512 F/BW/VL/DQ + FMA + F16C
quant4.ops picks the widest one this CPU runs at import time (override: QUANT4_ISA=generic|avx2|avx512).

Environment switches:
  QUANT4_DEBUG_CYTHON=1    bounds checks on, -O1 -g (for sanitizers / debugging)
  QUANT4_SANITIZE=address  build with AddressSanitizer
  QUANT4_NATIVE=1          also add -march=native to every variant (never for wheels you ship)
  QUANT4_FAIL_NO_OPENMP=1  fail the build instead of falling back to serial kernels
"""
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("QUANT4_DEBUG_CYTHON", "0") == "1"
SANITIZE = os.environ.get("QUANT4_SANITIZE", "")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    "cdivision": True,
}

ISA_FLAGS = {
    "_kernels": [],
    "_kernels_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "_kernels_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                        "-mf16c", "-mprefer-vector-width=512"],
}
# Added when the compiler accepts them; the code using them checks the CPU at run time.
OPTIONAL_FLAGS = {"_kernels_avx512": ["-mavx512bf16", "-mavx512vnni"]}


def compiler_accepts(compiler, flag):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "flag.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            return True
        except Exception:
            return False


def openmp_flag(compiler):
    """Compile and run a tiny OpenMP program; return the flag list that worked, or [] to build serial."""
    if sys.platform == "win32":
        return ["/openmp"]
    code = textwrap.dedent("""\
        #include <omp.h>
        #include <stdio.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("nthreads=%d\\n", n); return n < 1; }
        """)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, exe, extra_postargs=["-fopenmp"])
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and "nthreads=" in out.stdout:
                return ["-fopenmp"]
        except Exception as exc:  # any compiler/linker failure means: no OpenMP
            print(f"OpenMP probe failed: {exc}")
    if os.environ.get("QUANT4_FAIL_NO_OPENMP") == "1":
        raise RuntimeError("OpenMP is not available and QUANT4_FAIL_NO_OPENMP=1")
    warnings.warn("OpenMP not available: quant4's kernels will run on one thread")
    return []


class BuildExt(build_ext):
    def build_extensions(self):
        omp = openmp_flag(self.compiler)
        for ext in self.extensions:
            if sys.platform == "win32":
                ext.extra_compile_args = ["/O2"] + omp
            else:
                opt = ["-O1", "-g", "-fno-omit-frame-pointer"] if (DEBUG or SANITIZE) else ["-O3"]
                san = [f"-fsanitize={SANITIZE}"] if SANITIZE else []
                native = ["-march=native"] if os.environ.get("QUANT4_NATIVE") == "1" else []
                extra = [f for f in OPTIONAL_FLAGS.get(ext.name.split(".")[-1], [])
                         if compiler_accepts(self.compiler, f)]
                ext.extra_compile_args = opt + san + native + ext.extra_compile_args + extra + omp
                ext.extra_link_args = san + omp
        super().build_extensions()


def extensions():
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    names = list(ISA_FLAGS) if x86 and sys.platform != "win32" else ["_kernels"]
    return [
        Extension(f"quant4.{name}", [f"quant4/{name}.pyx"], include_dirs=["quant4", numpy.get_include()],
                  extra_compile_args=list(ISA_FLAGS[name]))
        for name in names
    ]


setup(
    ext_modules=cythonize(extensions(), compiler_directives=DIRECTIVES, language_level=3),
    cmdclass={"build_ext": BuildExt},
)
