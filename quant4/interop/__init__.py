"""Conversion between quant4's stored format and other tools' int4 formats: PyTorch's int4 op layouts
(layouts.py: CPU packed bytes per ISA, CUDA tiles, uint8; scales_and_zeros), GGML blocks (layouts.py: Q4_0 /
Q4_1) and whole GGML tensors of any type (ggml.py). The file readers in quant4.models call these; nothing here
reads or writes files."""
