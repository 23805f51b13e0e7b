"""Block-wise tuning of int4 rounding and group scales on calibration text (after AutoRound, Cheng et al., 2023).

GPTQ chooses codes one layer at a time for that layer's output. Tuning chooses them for the block's output:
for each block of the model in turn, every selected layer's weights are fake-quantized in quant4's scheme,
    w_hat = (clamp(round((w - zero) / scale + 8 + v), 0, 15) - 8) * scale + zero,
with a rounding offset v in [-0.5, 0.5] per weight and the group's scale and zero trainable, and signed
gradient descent (the sign of the gradient, a fixed step: AutoRound's choice, robust to the gradients' scale;
rounding passes gradients straight through) lowers the mean squared error between the block's output on the
quantized model's hidden states and the float block's output on the float model's. So each block also
corrects what the blocks before it lost. The result is ordinary codes, fp16 scales and zeros: the stored format
is unchanged. A block keeps its tuned weights only where they lower the error on the calibration windows
against the starting point (the clipping search's qparams, v = 0).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from quant4 import ops
from quant4.nn import Int4Linear
from quant4.scheme import pack_codes, padded_k

log = logging.getLogger("quant4")


class _Fake:
    """One layer's trainable quantization: the fixed float weight (padded to whole groups), offsets v [N, Kp],
    log-scale and zero shifts per group."""

    def __init__(self, weight: torch.Tensor, group_size: int, init: str, num_threads):
        self.K, self.g = weight.shape[1], group_size
        Kp = padded_k(self.K, group_size)
        w = weight.detach().float()
        self.w = torch.nn.functional.pad(w, (0, Kp - self.K))
        _, s16, z16 = ops.quantize(w.contiguous(), group_size, method=init, num_threads=num_threads)
        self.s0 = s16.float().clamp_min(1e-8)
        self.z0 = z16.float()
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.ls = torch.zeros_like(self.s0, requires_grad=True)     # scale = s0 * exp(ls)
        self.dz = torch.zeros_like(self.z0, requires_grad=True)     # zero = z0 + dz * s0
        self.params = (self.v, self.ls, self.dz)

    def qparams(self):
        return self.s0 * torch.exp(self.ls), self.z0 + self.dz * self.s0

    def weight(self) -> torch.Tensor:
        s, z = self.qparams()
        N, Kp = self.w.shape
        wg, vg = self.w.view(N, -1, self.g), self.v.view(N, -1, self.g)
        q = (wg - z[..., None]) / s[..., None] + 8 + vg
        q = (q + (q.round() - q).detach()).clamp(0, 15)           # round with a straight-through gradient
        return ((q - 8) * s[..., None] + z[..., None]).view(N, Kp)[:, : self.K]

    @torch.no_grad()
    def stored(self):
        """-> (qweight, scales16, zeros16): the codes for the fp16-rounded scale and zero."""
        s, z = self.qparams()
        s16, z16 = s.half(), z.half()
        N, Kp = self.w.shape
        sf = s16.float()[..., None]
        q = ((self.w.view(N, -1, self.g) - z16.float()[..., None]) / torch.where(sf == 0, torch.ones_like(sf), sf)
             + 8 + self.v.view(N, -1, self.g)).round().clamp(0, 15)
        q = torch.where(sf == 0, torch.full_like(q, 8), q).view(N, Kp)
        q[:, self.K:] = 0                      # padding: zero codes, as the quantizers write them
        return pack_codes(q.to(torch.uint8)), s16, z16


def _int4_layers(block, fakes: dict, group_size: int, num_threads) -> dict:
    out = {}
    for n, f in fakes.items():
        lin = block.get_submodule(n)
        qw, s16, z16 = f.stored()
        bias = None if lin.bias is None else lin.bias.detach().float()
        out[n] = Int4Linear.from_packed(qw, s16, z16, in_features=lin.in_features, group_size=group_size, bias=bias,
                                        num_threads=num_threads)
    return out


@torch.no_grad()
def _mse(block, overrides, xs, ys, extra) -> float:
    tot = 0.0
    for x, y in zip(xs, ys):
        out = functional_call(block, overrides, (x,) + extra[0], extra[1]) if overrides else block(x, *extra[0], **extra[1])
        tot += float(((out - y) ** 2).mean())
    return tot / len(xs)


def tune_model_(model: nn.Module, calibration: torch.Tensor, group_size: int = 32,
                filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, iters: int = 200,
                lr: float = 4e-3, batch_size: int = 4, init: str = "search", seed: int = 0, awq: bool = False,
                num_threads: Optional[int] = None, progress: bool = False) -> nn.Module:
    """Quantize the selected nn.Linear layers of `model` (float; its blocks in an nn.ModuleList called in order
    as block(hidden, *rest)) by block-wise tuning on `calibration` token windows [n, len], in place.

    iters: signed-gradient steps per block, each on batch_size windows; lr: the step (v moves by lr per step, the
    scale by a factor exp(+-lr), the zero by lr scales); init: the starting qparams ("rtn" or "search").
    """
    from quant4.gptq import _blocks, check_calibration, first_block_inputs
    from quant4.swap import SwapRecord, SwapReport, is_projection, weight_sqnr_db

    check_calibration(calibration, batch_size)
    ops.check_group_size(group_size)
    ops.check_int("iters", iters, 1)
    if init not in ("rtn", "search"):
        raise ValueError(f"init must be 'rtn' or 'search', got {init!r}")
    if not (isinstance(lr, float) and 0 < lr < 1):
        raise ValueError(f"lr must be a float in (0, 1), got {lr!r}")
    select = filter_fn or is_projection
    list_name, blocks = _blocks(model, select)
    captured = first_block_inputs(model, blocks, calibration, batch_size)
    extra = (captured[0][1], captured[0][2])
    if any(c[0].shape[1:] != captured[0][0].shape[1:] for c in captured):
        raise ValueError("calibration windows must all have the same length")
    hidden_f = [c[0] for c in captured]        # the float model's stream
    hidden_q = list(hidden_f)                  # the quantized model's stream
    gen = torch.Generator().manual_seed(seed)
    report, t0 = [], time.perf_counter()
    for bi, block in enumerate(tqdm(blocks, desc="tune", unit="block", disable=not progress, file=sys.stderr)):
        prefix = f"{list_name}.{bi}"
        names = [fqn for fqn, m in block.named_modules()
                 if fqn and type(m) is nn.Linear and select(m, f"{prefix}.{fqn}")]
        with torch.no_grad():
            targets = [block(x, *extra[0], **extra[1]) for x in hidden_f]
            if awq:       # activation-aware channel scales first (the same float function, quant4.awq)
                from quant4.awq import scale_block_from_inputs_

                scale_block_from_inputs_(block, prefix, [(x,) + extra for x in hidden_q], group_size, num_threads)
        fakes = {n: _Fake(block.get_submodule(n).weight, group_size, init, num_threads) for n in names}
        params = [p for f in fakes.values() for p in f.params]
        start = _mse(block, {f"{n}.weight": f.weight().detach() for n, f in fakes.items()}, hidden_q, targets, extra)
        for it in range(iters):
            i = int(torch.randint(len(hidden_q), (1,), generator=gen))
            over = {f"{n}.weight": f.weight() for n, f in fakes.items()}
            out = functional_call(block, over, (hidden_q[i],) + extra[0], extra[1])
            loss = ((out - targets[i]) ** 2).mean()
            grads = torch.autograd.grad(loss, params)
            step = lr * (1 - it / iters)          # decayed linearly to 0
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(step * gr.sign())
                for f in fakes.values():
                    f.v.clamp_(-0.5, 0.5)
        tuned = _int4_layers(block, fakes, group_size, num_threads)
        over = {f"{n}.weight": ops.dequantize(q.qweight, q.scales, q.zeros, group_size, q.in_features)
                for n, q in tuned.items()}
        end = _mse(block, over, hidden_q, targets, extra)
        keep = end < start
        if not keep:       # the starting point (v = 0) was better: its codes
            with torch.no_grad():
                for f in fakes.values():
                    f.v.zero_(), f.ls.zero_(), f.dz.zero_()
            tuned = _int4_layers(block, fakes, group_size, num_threads)
        hidden_f = targets                     # the float block's outputs: the next block's float inputs
        for n, q in tuned.items():
            lin = block.get_submodule(n)
            report.append(SwapRecord(f"{prefix}.{n}", True, f"int4 g{group_size} tuned ({init} start, {iters} steps"
                                     f"{'' if keep else ', start kept'})", weight_sqnr_db(lin.weight, q)))
            block.set_submodule(n, q)
        with torch.no_grad():
            hidden_q = [block(x, *extra[0], **extra[1]) for x in hidden_q]
        log.info(f"tune: {prefix}: block output MSE {start:.4g} -> {end:.4g}"
                 f"{'' if keep else ' (start kept)'}, {time.perf_counter() - t0:.1f} s")
    done = {r.name for r in report}
    for fqn, mod in list(model.named_modules()):
        if fqn and fqn not in done and type(mod) is nn.Linear and select(mod, fqn):
            q = Int4Linear.from_linear(mod, group_size, num_threads=num_threads, method=init)
            report.append(SwapRecord(fqn, True, f"int4 g{group_size} {init} (outside the blocks: not tuned)",
                                     weight_sqnr_db(mod.weight, q)))
            model.set_submodule(fqn, q)
    model.quant4_report = SwapReport(report)
    return model
