# The avx512 build of quant4's kernels: the same source, compiled with the avx512 flags in setup.py.
include "_kernels.pyx"
