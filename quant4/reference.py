"""Plain PyTorch implementation of quant4's scheme: the oracle the Cython kernels are tested against.

Slow and simple on purpose. See quant4.scheme for the math and the stored format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant4.scheme import padded_k, qparams_from_minmax, round_codes


def _grouped(w: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    N, K = w.shape
    Kp = padded_k(K, group_size)
    wp = F.pad(w.float(), (0, Kp - K), value=fill)
    return wp.view(N, Kp // group_size, group_size)


def quantize(w: torch.Tensor, group_size: int):
    """w [N, K] float -> (codes uint8 [N, Kp] in 0..15, scales16 [N, G], zeros16 [N, G])."""
    N, K = w.shape
    mins = _grouped(w, group_size, float("inf")).amin(-1)
    maxs = _grouped(w, group_size, float("-inf")).amax(-1)
    scales16, zeros16, m = qparams_from_minmax(mins, maxs)
    q = round_codes(_grouped(w, group_size, 0.0), scales16[..., None], m[..., None])
    q = q.view(N, -1).to(torch.uint8)
    q[:, K:] = 0
    return q, scales16, zeros16


def pack(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, Kp] -> uint8 [N, Kp/2], even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp/2] -> codes uint8 [N, Kp]."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).flatten(-2)


def dequantize(qweight, scales, zeros, group_size: int, in_features: int) -> torch.Tensor:
    """Stored tensors -> fp32 weight [N, in_features]: (q - 8) * scale + zero."""
    q = unpack(qweight).float()
    N = q.shape[0]
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((q - 8) * s + z)[:, :in_features].reshape(N, in_features)


def linear(x, qweight, scales, zeros, group_size: int, bias=None):
    """y = x . dequantize(w)^T + bias in fp32, returned in x's dtype."""
    w = dequantize(qweight, scales, zeros, group_size, x.shape[-1])
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
