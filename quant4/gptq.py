"""GPTQ on the CPU: int4 codes chosen column by column to minimize a layer's output error on calibration inputs.

For a linear layer y = x W^T with calibration inputs X (rows), GPTQ minimizes ||X W^T - X W_hat^T||^2 using
the Hessian H = X^T X / n: it quantizes one input column k at a time and spreads that column's rounding error
over the not yet quantized columns in proportion to the inverse Hessian (Frantar et al., 2022, "GPTQ").
quant4's version keeps the group structure and produces the ordinary stored format (quant4.scheme): when the
sweep reaches the first column of a group, the group's scale and zero are chosen from the current (error-
updated) weights, by min/max ("rtn") or by the clipping search ("search"); then every column of the group is
rounded with them exactly like the plain quantizer.

quantize_model_gptq_ runs a model block by block (one block's Hessians in memory at a time): it records the
inputs of the first block for the calibration tokens, and for each block, for each set of selected layers
that share an input (e.g. wq/wk/wv), accumulates that input's Hessian through the block whose earlier layers
are already quantized, quantizes the set, and finally passes the calibration activations through the
quantized block to the next one.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from quant4 import ops
from quant4.nn import Int4Linear
from quant4.scheme import pack_codes, padded_k, qparams_from_minmax, round_codes

log = logging.getLogger("quant4")


def _group_qparams(w: torch.Tensor, group_size: int, method: str, num_threads):
    """w [N, <=g] fp32 (one group) -> (scale16 [N], zero16 [N], m [N] fp32), as the plain quantizer would."""
    if method == "search":
        _, s16, z16 = ops.quantize(w.contiguous(), group_size, method="search", num_threads=num_threads)
        s16, z16 = s16[:, 0], z16[:, 0]
        return s16, z16, z16.float() - 8 * s16.float()
    return qparams_from_minmax(w.amin(1), w.amax(1))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, *, damp: float = 0.01,
                  block_size: int = 128, method: str = "rtn", act_order: bool = False, refine: int = 0,
                  num_threads: Optional[int] = None):
    """GPTQ for one layer: weight [N, K], hessian [K, K] (X^T X / n of its inputs) ->
    (qweight uint8 [N, Kp/2], scales fp16 [N, G], zeros fp16 [N, G]) in quant4's stored format.

    damp: fraction of the mean Hessian diagonal added to the diagonal (numerical safety). block_size: columns
    updated lazily together (rounded up to a whole number of groups). method: how a group's scale and zero
    are chosen ("rtn" min/max, "search" clipping search). act_order: visit columns by decreasing Hessian
    diagonal, with every group's scale and zero fixed beforehand from the original weights. refine: rounds of
    (refit every group's scale and zero to the codes by least squares in the Hessian's metric, refit_qparams;
    GPTQ again with those fixed), then a last refit; each row keeps whichever qparams give it less output error.
    """
    ops.check_group_size(group_size)
    if method not in ops.METHODS:
        raise ValueError(f"method must be one of {ops.METHODS}, got {method!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float tensor, got {getattr(weight, 'shape', type(weight))}")
    N, K = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K):
        raise ValueError(f"hessian must be [{K}, {K}] for weight {tuple(weight.shape)}, "
                         f"got {tuple(getattr(hessian, 'shape', ()))}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    ops.check_int("refine", refine, 0)
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values; quant4 refuses NaN/Inf weights")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian has non-finite values")
    qw, s, z = _gptq(weight, hessian, group_size, damp, block_size, method, act_order, None, num_threads)
    for r in range(refine + (1 if refine else 0)):
        codes = ops.unpack(qw)
        s2, z2 = refit_qparams(weight, hessian, codes, group_size)
        s, z = _better_qparams(weight, hessian, codes, group_size, (s, z), (s2, z2))
        if r < refine:
            qw, s, z = _gptq(weight, hessian, group_size, damp, block_size, method, act_order, (s, z), num_threads)
    return qw, s, z


def _gptq(weight, hessian, group_size, damp, block_size, method, act_order, qparams, num_threads):
    """One GPTQ sweep; qparams=(scales16, zeros16) fixes every group's scale and zero beforehand."""
    N, K = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    g = group_size
    G = padded_k(K, g) // g
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0                      # inputs that are always zero: the weight is free, make it exact
    scales = torch.empty(N, G, dtype=torch.float16)
    zeros = torch.empty(N, G, dtype=torch.float16)
    ms = torch.empty(N, G)
    static = act_order or qparams is not None
    if qparams is not None:
        scales.copy_(qparams[0])
        zeros.copy_(qparams[1])
        ms.copy_(zeros.float() - 8 * scales.float())
    elif act_order:                          # static groups from the original weights
        for j in range(G):
            scales[:, j], zeros[:, j], ms[:, j] = _group_qparams(W[:, j * g:(j + 1) * g], g, method, num_threads)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
    else:
        perm = torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    torch.diagonal(H).add_(damp * torch.diagonal(H).mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()   # upper factor of H^-1
    del H, L
    Q = torch.empty(N, K)
    bs = max(g, block_size // g * g)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and col % g == 0:
                scales[:, grp], zeros[:, grp], ms[:, grp] = _group_qparams(W1[:, i:i + g], g, method, num_threads)
            w = W1[:, i]
            q = round_codes(w, scales[:, grp], ms[:, grp])
            Q[:, i1 + i] = q
            w_hat = (q - 8) * scales[:, grp].float() + zeros[:, grp].float()
            err = (w - w_hat) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    codes = torch.zeros(N, G * g, dtype=torch.uint8)
    codes[:, perm] = Q.to(torch.uint8)
    return pack_codes(codes), scales, zeros


def refit_qparams(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, group_size: int,
                  rows_per_chunk: int = 64):
    """Holding the codes [N, >=K], each row's group scales and zeros minimizing its output error
    (w - w_hat)^T H (w - w_hat), w_hat = scale * q + (zero - 8 scale) per group: a least-squares problem with 2G
    unknowns per row, solved exactly (float64 normal equations, products in float32).
    Cost O(N K^2), about that of one GPTQ sweep. -> (scales fp16, zeros fp16) [N, G]."""
    N, K = weight.shape
    g = group_size
    G = padded_k(K, g) // g
    Kp = G * g
    W = torch.zeros(N, Kp)
    W[:, :K] = weight.detach().float()
    H = torch.zeros(Kp, Kp)
    H[:K, :K] = hessian.detach().float()
    Hg = H.view(Kp, G, g)
    HP = Hg.sum(2)                                         # [Kp, G]: H summed over each group's columns
    VV = HP.view(G, g, G).sum(1).double()                  # [G, G]
    HW = W @ H                                             # [N, Kp]
    Q = codes[:, :Kp].float()
    ridge = 1e-7 * float(torch.diagonal(H).mean().clamp_min(1e-30))
    s_out = torch.empty(N, G, dtype=torch.float64)
    m_out = torch.empty(N, G, dtype=torch.float64)
    eye = torch.eye(2 * G, dtype=torch.float64)
    for r0 in range(0, N, rows_per_chunk):
        qg = Q[r0:r0 + rows_per_chunk].view(-1, G, g)      # [n, G, g]
        n = qg.shape[0]
        UV = torch.einsum("nag,agb->nab", qg, HP.view(G, g, G))
        C = torch.einsum("kbl,nbl->nkb", Hg, qg)           # [n, Kp, G]: H restricted to group b's columns times q
        UU = torch.einsum("nag,nagb->nab", qg, C.view(n, G, g, G))
        hw = HW[r0:r0 + n].view(n, G, g)
        rhs = torch.cat([(qg * hw).sum(2), hw.sum(2)], 1).double()
        lhs = torch.cat([torch.cat([UU.double(), UV.double()], 2),
                         torch.cat([UV.transpose(1, 2).double(), VV.expand(n, G, G)], 2)], 1)
        lhs += ridge * eye
        theta = torch.linalg.solve(lhs, rhs)
        s_out[r0:r0 + n], m_out[r0:r0 + n] = theta[:, :G], theta[:, G:]
    z = m_out + 8 * s_out
    return s_out.to(torch.float16), z.to(torch.float16)


def _row_errors(weight, hessian, codes, group_size, s16, z16):
    K = weight.shape[1]
    d = weight.detach().float() - ops.dequantize(pack_codes(codes), s16, z16, group_size, K)
    return ((d @ hessian.float()) * d).sum(1)


def _better_qparams(weight, hessian, codes, group_size, old, new):
    """Per row, whichever (scales, zeros) gives the smaller output error (non-finite candidates lose)."""
    ok = torch.isfinite(new[0].float()).all(1) & torch.isfinite(new[1].float()).all(1)
    s_new = torch.where(ok[:, None], new[0], old[0])
    z_new = torch.where(ok[:, None], new[1], old[1])
    e_old = _row_errors(weight, hessian, codes, group_size, *old)
    e_new = _row_errors(weight, hessian, codes, group_size, s_new, z_new)
    take = (e_new < e_old)[:, None]
    return torch.where(take, s_new, old[0]), torch.where(take, z_new, old[1])


class _Stop(Exception):
    pass


def _blocks(model: nn.Module, select) -> tuple[str, nn.ModuleList]:
    """The model's ModuleList of repeated blocks: the one holding the most selected layers."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            n = sum(1 for fqn, m in mod.named_modules() if fqn and select(m, f"{name}.{fqn}"))
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ValueError("GPTQ needs a model whose selected layers sit in an nn.ModuleList of blocks "
                         "(e.g. model.layers); none found")
    return best


def check_calibration(calibration, batch_size: int) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long \
            or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty int64 tensor [n_sequences, seq_len], got "
                         f"{getattr(calibration, 'dtype', type(calibration))} "
                         f"{tuple(getattr(calibration, 'shape', ()))}")
    ops.check_int("batch_size", batch_size)


@torch.no_grad()
def first_block_inputs(model: nn.Module, blocks, calibration: torch.Tensor, batch_size: int) -> list:
    """[(hidden, args, kwargs)] the first block receives for each batch of calibration windows (the model runs
    only up to it)."""
    captured = []

    def grab(mod, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[b:b + batch_size])
            except _Stop:
                pass
    finally:
        h.remove()
    return captured


def _input_sets(block: nn.Module, prefix: str, select, args, kwargs):
    """Group the block's selected nn.Linear layers by the input tensor they receive, in call order. The inputs
    are held until the grouping is done: compared by identity, never by address (a freed input's memory may be
    reused by a later one)."""
    seen, handles = [], []
    for fqn, mod in block.named_modules():
        if fqn and isinstance(mod, nn.Linear) and select(mod, f"{prefix}.{fqn}"):
            handles.append(mod.register_forward_pre_hook(lambda m, inp, fqn=fqn: seen.append((fqn, inp[0]))))
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    sets, inputs = [], []
    for fqn, x in seen:
        if any(fqn in s for s in sets):
            continue
        for s, x0 in zip(sets, inputs):
            if x is x0:
                s.append(fqn)
                break
        else:
            sets.append([fqn])
            inputs.append(x)
    return sets


@torch.no_grad()
def quantize_model_gptq_(model: nn.Module, calibration: torch.Tensor, group_size: int = 32,
                         filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, damp: float = 0.01,
                         block_size: int = 128, method: str = "rtn", act_order: bool = False, refine: int = 0,
                         batch_size: int = 16, num_threads: Optional[int] = None,
                         progress: bool = False, awq: bool = False) -> nn.Module:
    """Quantize the selected nn.Linear layers of `model` with GPTQ, in place; return the model.

    calibration: int64 token ids [n_sequences, seq_len] fed to model(tokens) in batches of batch_size.
    The model must hold its repeated blocks in an nn.ModuleList (model.layers) and call them in order as
    block(hidden, *rest) -> hidden. Selected layers outside the blocks are quantized without calibration
    (method). Other arguments as in gptq_quantize and quantize_model_; the report is model.quant4_report.
    progress=True shows a progress bar over the blocks (tqdm, on stderr). awq=True first scales each block's
    input channels by their activations (quant4.awq: quant4's Llama blocks only), folding the scales into the
    float RMSNorm weights and the wv / w3 rows, so the stored format is unchanged.
    """
    from quant4.swap import SwapRecord, SwapReport, is_projection, weight_sqnr_db

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model_gptq_ expects an nn.Module, got {type(model).__name__}")
    check_calibration(calibration, batch_size)
    ops.check_group_size(group_size)
    select = filter_fn or is_projection
    if not any(isinstance(m, nn.Linear) and select(m, n) for n, m in model.named_modules() if n):
        n4 = sum(isinstance(m, Int4Linear) for m in model.modules())
        raise ValueError(f"no float nn.Linear layer of the model is selected" +
                         (f"; it is already int4 ({n4} Int4Linear layers): GPTQ quantizes a float model" if n4 else ""))
    list_name, blocks = _blocks(model, select)
    captured = first_block_inputs(model, blocks, calibration, batch_size)
    hidden = [c[0] for c in captured]
    report = []
    t0 = time.perf_counter()
    for bi, block in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress, file=sys.stderr)):
        prefix = f"{list_name}.{bi}"
        if awq:
            from quant4.awq import scale_block_from_inputs_

            scale_block_from_inputs_(block, prefix, [(x, r, k) for x, (_, r, k) in zip(hidden, captured)],
                                     group_size, num_threads)
        sets = _input_sets(block, prefix, select, (hidden[0],) + captured[0][1], captured[0][2])
        for names in sets:
            first = block.get_submodule(names[0])
            K = first.in_features
            H = torch.zeros(K, K, dtype=torch.float64)
            count = [0]

            def accumulate(mod, inp):
                x = inp[0].detach().reshape(-1, K).float()
                H.add_((x.T @ x).double())
                count[0] += x.shape[0]
                raise _Stop

            hk = first.register_forward_pre_hook(accumulate)
            try:
                for x, (_, rest, kw) in zip(hidden, captured):
                    try:
                        block(x, *rest, **kw)
                    except _Stop:
                        pass
            finally:
                hk.remove()
            H /= max(count[0], 1)
            for fqn in names:
                lin = block.get_submodule(fqn)
                if lin.weight.shape[1] != K:
                    raise ValueError(f"{prefix}.{fqn}: in_features {lin.weight.shape[1]} != {K} of its input set")
                try:
                    qw, s, z = gptq_quantize(lin.weight, H, group_size, damp=damp, block_size=block_size,
                                             method=method, act_order=act_order, refine=refine,
                                             num_threads=num_threads)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"{prefix}.{fqn}: {exc}") from exc
                bias = None if lin.bias is None else lin.bias.detach().float()
                q = Int4Linear.from_packed(qw, s, z, in_features=K, group_size=group_size, bias=bias,
                                           num_threads=num_threads)
                report.append(SwapRecord(f"{prefix}.{fqn}", True,
                                         f"int4 g{group_size} {'awq+' if awq else ''}gptq "
                                         f"({method}{f', refine {refine}' if refine else ''})",
                                         weight_sqnr_db(lin.weight, q)))
                block.set_submodule(fqn, q)
            del H
        hidden = [block(x, *rest, **kw) for x, (_, rest, kw) in zip(hidden, captured)]
        log.info(f"gptq: block {bi + 1}/{len(blocks)} ({sum(len(s) for s in sets)} layers), "
                 f"{time.perf_counter() - t0:.1f} s")
    done = {r.name for r in report}
    for fqn, mod in list(model.named_modules()):
        if not fqn or fqn in done or isinstance(mod, Int4Linear):
            continue
        if isinstance(mod, nn.Linear) and select(mod, fqn):
            q = Int4Linear.from_linear(mod, group_size, num_threads=num_threads, method=method)
            report.append(SwapRecord(fqn, True, f"int4 g{group_size} {method} (outside the blocks: no GPTQ)",
                                     weight_sqnr_db(mod.weight, q)))
            model.set_submodule(fqn, q)
        elif isinstance(mod, nn.Linear):
            report.append(SwapRecord(fqn, False, "not selected"))
    for rec in report:
        log.info(f"{'swapped' if rec.swapped else 'kept   '} {rec.name}: {rec.reason}")
    model.quant4_report = SwapReport(report)
    return model

