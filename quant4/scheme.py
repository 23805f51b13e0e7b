"""quant4's quantization scheme and stored format: the one place the math is defined.

Scheme (group-wise asymmetric int4 along the input dimension K; the convention of PyTorch's CPU int4 op):
    for each output row n and group g of `group_size` consecutive inputs:
        scale = (max - min) / 15                stored as float16
        zero  = min + 8 * scale                 stored as float16
        q     = clamp(round((w - m) / scale), 0, 15)   with m = zero16 - 8 * scale16 (fp32 arithmetic,
                                                     round half to even); q = 8 where scale16 == 0
        w_hat = (q - 8) * scale + zero
    An all-constant group gets scale 0 and q = 8, so it dequantizes to its value rounded to float16
    (exactly for all-zero groups). Codes are computed from the stored 16-bit scale and zero, so
    dequantizing the stored tensors reproduces w_hat exactly.

Stored format, version 1 (ISA-neutral; the same bytes on every machine):
    qweight  uint8   [N, Kp/2]  byte i of row n: low nibble q[n, 2i], high nibble q[n, 2i+1]
    scales   float16 [N, G]
    zeros    float16 [N, G]
    with K = in_features, N = out_features, G = ceil(K / group_size), Kp = G * group_size.
    Inputs k >= K are padding: their nibbles are 0 and they meet zero activations.
    Metadata: format_version (1), in_features, out_features, group_size (32, 64, 128 or 256).
Kernels read this layout directly; nothing kernel- or ISA-specific is ever stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from quant4.options import GROUP_SIZES  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
SCALE_DTYPE = torch.float16


def padded_k(in_features: int, group_size: int) -> int:
    """K rounded up to whole groups."""
    return -(-in_features // group_size) * group_size


def qparams_from_minmax(mins: torch.Tensor, maxs: torch.Tensor):
    """Per-group fp32 min/max -> (scales16, zeros16, m) where m = zero - 8*scale in fp32.

    Raises ValueError if a scale or zero does not fit in float16 (|value| > 65504).
    """
    scale = (maxs - mins) / 15
    scales16 = scale.to(SCALE_DTYPE)
    zeros16 = (mins + 8 * scale).to(SCALE_DTYPE)
    if not (torch.isfinite(scales16).all() and torch.isfinite(zeros16).all()):
        bad = (~torch.isfinite(scales16) | ~torch.isfinite(zeros16)).nonzero()[0].tolist()
        raise ValueError(
            f"weight range too large for float16 scales at (row, group) {tuple(bad)}: "
            f"min={float(mins[tuple(bad)]):.6g}, max={float(maxs[tuple(bad)]):.6g} (limit 65504)"
        )
    m = zeros16.float() - 8 * scales16.float()
    return scales16, zeros16, m


def round_codes(w: torch.Tensor, scales16: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The scheme's rounding in plain PyTorch, for weights [..] with matching scales16 and m = zero - 8*scale
    (broadcast): q = clamp(round((w - m) / scale), 0, 15) in fp32, half to even; q = 8 where the scale is 0.
    Returns float codes (the caller picks the dtype). The kernels implement the same rule."""
    s = scales16.float()
    q = ((w.float() - m) / torch.where(s == 0, torch.ones_like(s), s)).clamp(0, 15).round()
    return torch.where(s == 0, torch.full_like(q, 8), q)


def pack_codes(codes: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codes uint8 [N, Kp] (0..15, Kp even) -> qweight uint8 [N, Kp/2] of the stored format (written into
    `out`, a contiguous uint8 [N, Kp/2], when given)."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"codes must be uint8 [N, Kp] with Kp even, got {codes.dtype} {tuple(codes.shape)}")
    if out is None:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    want = (codes.shape[0], codes.shape[1] // 2)
    if out.dtype != torch.uint8 or tuple(out.shape) != want or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 {list(want)}, got {out.dtype} {tuple(out.shape)}")
    return torch.bitwise_or(codes[:, 0::2], codes[:, 1::2] << 4, out=out)
