"""Int8Linear: an output head held in 8 bits (Q8_0's rounding), for heads a file holds in another quantized type."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quant4 import memory, ops
from quant4.nn import _tracing, apply_keeping_dtypes

BLOCK = 32          # inputs per scale
# Up to this many rows the kernels read the 8-bit weight directly (activation "int8": row by row through the
# int8 matrix-vector kernel; otherwise ops.head_int8_matmul_float); more rows (a prefill's every position,
# evaluation) dequantize 32 MB of weight at a time for a BLAS product. 32000 x 4096, 2 threads: 1 row 25.7 ms
# direct against 214 ms dequantized (fp32 F.linear on a float weight: 28 ms), 4 rows 112 against 357, 16 rows
# 406 against 389; int8 row by row at 512 rows 2.94 s against 1.16 s
SMALL_ROWS = 4


def check_codes(codes, scales) -> None:
    """ValueError/TypeError unless codes (uint8 [N, K], K % 32 == 0) and scales (float32 [N, K/32], finite)
    are an Int8Linear's stored tensors."""
    for name, t, dtype in (("codes", codes, torch.uint8), ("scales", scales, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != dtype:
            raise TypeError(f"Int8Linear {name} must be a 2-D {dtype} tensor, got "
                            f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    N, K = codes.shape
    if N < 1 or K < BLOCK or K % BLOCK or tuple(scales.shape) != (N, K // BLOCK):
        raise ValueError(f"Int8Linear codes {tuple(codes.shape)} need in_features divisible by {BLOCK} and scales "
                         f"[{N}, {K // BLOCK}], got scales {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("Int8Linear scales have non-finite values (NaN/Inf)")


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes - 128) * scale per 32 values: uint8 [n, K] and float32 [n, K/32] -> fp32 [n, K] (torch ops only)."""
    n, K = codes.shape
    return ((codes.to(torch.int16) - 128).to(torch.float32).view(n, K // BLOCK, BLOCK)
            * scales.unsqueeze(-1)).view(n, K)


class Int8Linear(nn.Module):
    """y = x . w_hat^T with w_hat = (codes - 128) * scale, one fp32 scale per 32 inputs (scale = absmax / 127,
    codes = round(w / scale) + 128: Q8_0's rounding), no bias. 8.25 bits a weight.

    For an output head that a file holds quantized in a type quant4's int4 layers cannot hold without loss
    (GGUF Q6_K, Q8_0, Q5_K, ...): re-quantized to int4 it would lose accuracy where a model is most sensitive,
    kept in float it costs 32 bits a weight (0.52 GB for 32000 x 4096). The error added on top of the file's
    own is at most half a step of 1/127 of each 32-input block's largest weight.

    Buffers: codes uint8 [out, in], scales float32 [out, in/32] (in_features % 32 == 0).
    activation (a runtime choice, as Int4Linear's): "float" multiplies the inputs as given by w_hat (up to
    SMALL_ROWS rows by a kernel reading the codes, more in row blocks of dequantized weight, never the whole
    float weight at once); "int8" rounds each input row to int8 per 32 values and uses the 8-bit dot-product
    kernel (AVX512-VNNI or AVX2; ops.int8_head_available), what int8-activation decode does, for up to
    SMALL_ROWS rows (more take the float path, faster there); "bf16" is "float" here, and so is every mode
    under torch.compile / torch.export (torch ops only).
    """

    def __init__(self, in_features: int, out_features: int, *, num_threads: Optional[int] = None,
                 activation: str = "float"):
        super().__init__()
        ops.check_int("in_features", in_features, 1, 1 << 31)
        ops.check_int("out_features", out_features, 1, 1 << 31)
        if in_features % BLOCK:
            raise ValueError(f"Int8Linear needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.num_threads = ops.check_num_threads(num_threads, allow_none=True)
        self.activation = ops.check_activation(activation)
        self.register_buffer("codes", torch.full((out_features, in_features), 128, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // BLOCK))

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, num_threads: Optional[int] = None,
                   activation: str = "float") -> "Int8Linear":
        """Quantize a float weight [out, in] (fp32, or anything that converts; in slices of rows)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"Int8Linear.from_float expects a 2-D float tensor, got "
                            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight has non-finite values; quant4 refuses NaN/Inf")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.out_features, mod.in_features = weight.shape
        if mod.in_features % BLOCK:
            raise ValueError(f"Int8Linear needs in_features divisible by {BLOCK}, got weight shape "
                             f"{tuple(weight.shape)}")
        mod.num_threads = ops.check_num_threads(num_threads, allow_none=True)
        mod.activation = ops.check_activation(activation)
        codes, scales = ops.head_int8_quantize(weight.detach().float(), num_threads)
        mod.register_buffer("codes", codes)
        mod.register_buffer("scales", scales)
        return mod

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, *, num_threads: Optional[int] = None,
                   activation: str = "float") -> "Int8Linear":
        """Wrap stored tensors (validated: codes uint8 [N, K], scales float32 [N, K/32], finite); 2 MiB or
        more copied once into 2 MiB-page memory where Linux offers it (quant4.memory)."""
        check_codes(codes, scales)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.out_features, mod.in_features = codes.shape
        mod.num_threads = ops.check_num_threads(num_threads, allow_none=True)
        mod.activation = ops.check_activation(activation)
        mod.register_buffer("codes", memory.adopt(codes.contiguous()))
        mod.register_buffer("scales", memory.adopt(scales.contiguous()))
        return mod

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight (of `rows`) this module multiplies by: fp32 [rows, in_features]."""
        return dequantize_codes(self.codes[rows], self.scales[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"Int8Linear expects a float tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input shape {tuple(x.shape)}: last dim must be in_features={self.in_features}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        few = (x2d.shape[0] <= SMALL_ROWS and not _tracing(x)
               and not (x.requires_grad and torch.is_grad_enabled()))
        if few and self.activation == "int8" and ops.int8_head_available():
            y = torch.empty(x2d.shape[0], self.out_features)
            for i in range(x2d.shape[0]):
                self.matvec(x2d[i].float().contiguous(), y[i])
        elif few:
            y = ops.head_int8_matmul_float(x2d.float(), self.codes, self.scales, self.num_threads)
        else:
            xf = x2d.float()
            step = max(1, (32 << 20) // (4 * self.in_features))       # 32 MB of float weight at a time
            y = torch.cat([xf @ self.dequantize(slice(r, r + step)).t()
                           for r in range(0, self.out_features, step)], dim=1)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def matvec(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [out_features] = this head times h (fp32 [in_features], contiguous) with h rounded to int8 per 32
        values: the 8-bit kernel (ops.int8_head_available), what activation "int8" runs row by row."""
        return ops.head_int8_matvec(h, self.codes, self.scales, out, self.num_threads)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation != "float" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8{act}"
