# The avx2 build of quant4's kernels: the same source, compiled with the avx2 flags in setup.py.
include "_kernels.pyx"
