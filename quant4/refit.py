"""method="refit": least-squares refits of each group's scale and zero for the codes they produce.

For fixed codes q (0..15) the reconstruction s*q + m closest to a group's weights w in squared error is a
line fit: s = cov(q, w) / var(q), m = mean(w) - s mean(q). Starting from the clipping search's scale and zero,
each round computes the codes (quant4.scheme.round_codes), fits s and m, rounds them to the stored float16
(zero = m + 8 s), and keeps them for a group only where its error went down: never worse than the search, so
never worse than round to nearest. Calibration-free, in plain PyTorch over all groups at once.
"""
from __future__ import annotations

import torch

from quant4.scheme import SCALE_DTYPE, round_codes

ROUNDS = 6


def _grouped(w: torch.Tensor, group_size: int):
    """w [N, K] -> (wg [N, G, group_size] zero-padded, valid mask of the same shape)."""
    N, K = w.shape
    G = -(-K // group_size)
    pad = G * group_size - K
    wg = torch.nn.functional.pad(w, (0, pad)).view(N, G, group_size)
    valid = torch.ones(G * group_size, dtype=torch.bool)
    valid[K:] = False
    return wg, valid.view(1, G, group_size).expand(N, G, group_size)


def _error(wg, valid, s16, z16):
    s = s16.float()[..., None]
    m = z16.float()[..., None] - 8 * s
    q = round_codes(wg, s, m)
    return torch.where(valid, (wg - (s * q + m)) ** 2, 0).sum(-1), q


def refit(w: torch.Tensor, scales16: torch.Tensor, zeros16: torch.Tensor, group_size: int,
          rounds: int = ROUNDS):
    """Improve float16 (scales16, zeros16) [N, G] for fp32 weights w [N, K]; returns the new pair."""
    wg, valid = _grouped(w.float(), group_size)
    n = valid.sum(-1).float()
    best_s, best_z = scales16.clone(), zeros16.clone()
    best_err, q = _error(wg, valid, best_s, best_z)
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
        err, q = _error(wg, valid, cand_s, cand_z)
        better = err < best_err
        best_s, best_z = torch.where(better, cand_s, best_s), torch.where(better, cand_z, best_z)
        best_err = torch.where(better, err, best_err)
        s16, z16 = cand_s, cand_z
    return best_s, best_z
