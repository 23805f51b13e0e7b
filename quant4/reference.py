"""Plain PyTorch implementation of quant4's scheme: the oracle the Cython kernels are tested against.

Slow and simple on purpose. See quant4.scheme for the math and the stored format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant4.scheme import SCALE_DTYPE, padded_k, qparams_from_minmax, round_codes


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


def _refit_grouped(w: torch.Tensor, group_size: int):
    """w [N, K] -> (wg [N, G, group_size] zero-padded, valid mask of the same shape)."""
    N, K = w.shape
    G = -(-K // group_size)
    pad = G * group_size - K
    wg = torch.nn.functional.pad(w, (0, pad)).view(N, G, group_size)
    valid = torch.ones(G * group_size, dtype=torch.bool)
    valid[K:] = False
    return wg, valid.view(1, G, group_size).expand(N, G, group_size)


def _refit_error(wg, valid, s16, z16):
    s = s16.float()[..., None]
    m = z16.float()[..., None] - 8 * s
    q = round_codes(wg, s, m)
    return torch.where(valid, (wg - (s * q + m)) ** 2, 0).sum(-1), q


def refit(w: torch.Tensor, scales16: torch.Tensor, zeros16: torch.Tensor, group_size: int, rounds: int = 6):
    """method="refit"'s least-squares refits (the kernel refit_qparams), over all groups at once: for the codes
    q of the current float16 scale and zero, the line fit s = cov(q, w) / var(q), m = mean(w) - s mean(q),
    rounded to float16 (zero = m + 8 s); `rounds` times, each group keeping the pair with the least squared
    error seen. w fp32 [N, K], (scales16, zeros16) [N, G] -> the new pair."""
    wg, valid = _refit_grouped(w.float(), group_size)
    n = valid.sum(-1).float()
    best_s, best_z = scales16.clone(), zeros16.clone()
    best_err, q = _refit_error(wg, valid, best_s, best_z)
    s16, z16 = best_s, best_z
    for _ in range(rounds):
        qv = torch.where(valid, q, 0)
        wv = torch.where(valid, wg, 0)
        sq, sw = qv.sum(-1), wv.sum(-1)
        sqq, sqw = (qv * qv).sum(-1), (qv * wv).sum(-1)
        den = n * sqq - sq * sq
        ok = den > 0
        s = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, den, 1), 0)
        ok &= s > 0
        m = (sw - s * sq) / n
        cand_s = torch.where(ok, s, s16.float()).to(SCALE_DTYPE)
        cand_z = torch.where(ok, m + 8 * s, z16.float()).to(SCALE_DTYPE)
        finite = torch.isfinite(cand_s) & torch.isfinite(cand_z)
        cand_s, cand_z = torch.where(finite, cand_s, s16), torch.where(finite, cand_z, z16)
        err, q = _refit_error(wg, valid, cand_s, cand_z)
        better = err < best_err
        best_s, best_z = torch.where(better, cand_s, best_s), torch.where(better, cand_z, best_z)
        best_err = torch.where(better, err, best_err)
        s16, z16 = cand_s, cand_z
    return best_s, best_z
