"""Activation-aware scaling (after AWQ, Lin et al., 2023) of a Llama block before GPTQ.

Input channels that carry large activations matter more to a layer's output than the others. For the layers
that share an input -- q/k/v after the attention RMSNorm, wo after the attention, w1/w3 after the FFN RMSNorm,
w2 after SiLU(w1 x) * w3 x -- each input channel j gets a scale s_j: the layers' weight columns are multiplied
by s_j and the op that produces the input is divided by it (the RMSNorm weight; wv's output rows, shared by the
query heads of one key/value head; w3's output rows). The float model computes exactly the same function, but
the quantizer now spends its grid on the channels with large activations. The stored format is unchanged: the
norms stay float, the folds are in the weights that get quantized.

s = rms(x_j) ** alpha (normalized to a geometric mean of 1 between its extremes), with alpha chosen per set from
a grid by the layers' output error on the calibration inputs, tr(dW H dW^T) with H = X^T X / n, for round-to-
nearest codes of the scaled weights (alpha = 0, no scaling, is on the grid: a set is never scaled to a larger
error in that metric). The rms comes from H's diagonal. Layers with many rows are scored on an evenly spaced
subset of MAX_SEARCH_ROWS rows.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from quant4 import ops

log = logging.getLogger("quant4")

# (the op whose output feeds the set: its output is divided by s, the layers of the set: columns times s)
FOLDS = (
    ("attention_norm", ("attention.wq", "attention.wk", "attention.wv")),
    ("attention.wv", ("attention.wo",)),
    ("ffn_norm", ("feed_forward.w1", "feed_forward.w3")),
    ("feed_forward.w3", ("feed_forward.w2",)),
)
ALPHAS = tuple(i / 10 for i in range(10))     # 0 (no scaling) .. 0.9
MAX_SEARCH_ROWS = 1024


def check_block(block: nn.Module, prefix: str) -> None:
    """ValueError unless `block` has the layers AWQ folds into (quant4's Llama blocks, models/llama.py)."""
    for src, layers in FOLDS:
        for name in (src,) + layers:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"AWQ scaling needs quant4's Llama blocks; {prefix} has no {name}") from None
            if name in layers and type(mod) is not nn.Linear:
                raise ValueError(f"AWQ scaling needs float nn.Linear layers; {prefix}.{name} is {type(mod).__name__}")


@torch.no_grad()
def block_hessians(block: nn.Module, inputs) -> dict:
    """{first layer of each set: X^T X / n (fp64) of its input} over the calibration batches `inputs`
    [(hidden, args, kwargs)], from one pass through the float block."""
    acc, handles = {}, []
    for _, layers in FOLDS:
        name = layers[0]
        K = block.get_submodule(name).in_features
        acc[name] = [torch.zeros(K, K, dtype=torch.float64), 0]

        def hook(mod, inp, slot=acc[name], K=K):
            x = inp[0].detach().reshape(-1, K).float()
            slot[0].add_((x.T @ x).double())
            slot[1] += x.shape[0]

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for x, rest, kw in inputs:
            block(x, *rest, **kw)
    finally:
        for h in handles:
            h.remove()
    return {name: H / max(n, 1) for name, (H, n) in acc.items()}


def _rows(w: torch.Tensor) -> torch.Tensor:
    if w.shape[0] <= MAX_SEARCH_ROWS:
        return w
    return w[torch.linspace(0, w.shape[0] - 1, MAX_SEARCH_ROWS).long()]


def _error(ws, H: torch.Tensor, s: torch.Tensor, group_size: int, num_threads) -> float:
    """sum over the set of tr(dW H dW^T), dW = W - deq(rtn(W diag(s))) diag(1/s)"""
    total = 0.0
    for w in ws:
        q, sc, z = ops.quantize((w * s).contiguous(), group_size, num_threads=num_threads)
        dw = (w - ops.dequantize(q, sc, z, group_size, w.shape[1], num_threads=num_threads) / s).double()
        total += float(((dw @ H) * dw).sum())
    return total


def search_scales(weights, H: torch.Tensor, group_size: int, *, tie: Optional[tuple] = None,
                  num_threads: Optional[int] = None):
    """-> (s fp32 [K], alpha, error at alpha, error unscaled) for the set's weights [N_i, K] and their input's
    Hessian H [K, K]. tie = (n_kv_heads, group, head_dim): input channels (kv head, query head in group, d)
    share one scale per (kv head, d) (wo's inputs, whose scale folds into wv's rows)."""
    ws = [_rows(w.detach().float()) for w in weights]
    ms = H.diagonal().float().clamp_min(0)
    if tie is not None:
        hkv, grp, d = tie
        ms = ms.view(hkv, grp, d).mean(1, keepdim=True).expand(hkv, grp, d).reshape(-1)
    rms = ms.sqrt().clamp_min(1e-6)
    best = None
    for a in ALPHAS:
        s = rms ** a
        s = s / (s.max() * s.min()).sqrt()
        err = _error(ws, H, s, group_size, num_threads)
        if a == 0:
            base = err
        if best is None or err < best[2]:
            best = (s, a, err)
    return best + (base,)


@torch.no_grad()
def scale_block_(block: nn.Module, hessians: dict, group_size: int, *, n_heads: int, n_kv_heads: int,
                 head_dim: int, num_threads: Optional[int] = None) -> list:
    """Search and fold each set's scales into `block` (float, quant4's Llama block), in place ->
    [(set's first layer, alpha, error / unscaled error)]."""
    out = []
    for src, layers in FOLDS:
        mods = [block.get_submodule(n) for n in layers]
        tie = (n_kv_heads, n_heads // n_kv_heads, head_dim) if src == "attention.wv" else None
        s, alpha, err, base = search_scales([m.weight for m in mods], hessians[layers[0]], group_size, tie=tie,
                                            num_threads=num_threads)
        out.append((layers[0], alpha, err / base if base > 0 else 1.0))
        if alpha == 0:
            continue
        for m in mods:
            m.weight.mul_(s.to(m.weight.dtype))
        prev = block.get_submodule(src)
        if isinstance(prev, nn.Linear):          # the input's channels are prev's output rows
            if tie is not None:                  # one scale per wv row: (kv head, d) of the first query head
                hkv, grp, d = tie
                s = s.view(hkv, grp, d)[:, 0].reshape(-1)
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:                                    # an RMSNorm: its weight multiplies each channel
            prev.weight.div_(s.to(prev.weight.dtype))
    return out


def scale_block_from_inputs_(block: nn.Module, prefix: str, inputs, group_size: int,
                             num_threads: Optional[int] = None) -> list:
    """check_block, block_hessians over `inputs` [(hidden, args, kwargs)] and scale_block_ with the block's head
    layout: what GPTQ and tuning run on each block before quantizing it (logged)."""
    check_block(block, prefix)
    att = block.attention
    found = scale_block_(block, block_hessians(block, inputs), group_size, n_heads=att.n_heads,
                         n_kv_heads=att.n_kv_heads, head_dim=att.head_dim, num_threads=num_threads)
    log.info(f"awq: {prefix}: " + ", ".join(f"{n} alpha {a:.1f} (error x{r:.2f})" for n, a, r in found))
    return found
