"""Paths and assertion helpers shared by the tests."""
import os
from pathlib import Path

import torch

from quant4 import reference

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANT4_SHARED", REPO.parent / "shared"))


def assert_matmul_close(y, x, qweight, scales, zeros, group_size, bias=None, rel=1e-5):
    """Kernel output vs the reference, elementwise: |y - y_ref| <= rel * (|x| @ |w_hat|^T + |bias|) + 1e-6.

    The bound scales with the sum of absolute products, which is what fp32 accumulation error scales with.
    """
    K = x.shape[-1]
    w = reference.dequantize(qweight, scales, zeros, group_size, K)
    y_ref = reference.linear(x.float(), qweight, scales, zeros, group_size, bias)
    mag = x.float().abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    err = (y.float() - y_ref).abs()
    bound = rel * mag + 1e-6
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds the bound by {worst:.2f}x"


def sqnr_db(ref, approx):
    ref, approx = ref.float(), approx.float()
    return (20 * torch.log10(ref.norm() / (ref - approx).norm())).item()
