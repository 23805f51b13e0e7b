"""Mixed group sizes under a byte budget: each layer's group size chosen so the whole model fits a number of bits
per weight with the least total reconstruction error.

Every selected nn.Linear starts at its cheapest group size (usually 256: 4.125 bits per weight with fp16 scale and
zero; padding can make a coarse size cost more on a narrow layer); then, greedily, the layer whose next finer
group size removes the most squared weight error per extra bit is refined, while the total stays within the
budget. The error of a layer at a group size is that of
the quantizer actually used (method): with calibration tokens, the KL to the float model measured with only
that layer quantized (kl_sensitivity; assumed additive across layers), else the squared weight error relative
to the layer's weights, each input column weighted by its input's mean square when given (input_power).
Measured on the embedded model at 4.5 bits per weight: the KL ranking beats uniform g64; the weight-error
ranking does not reliably (docs/quality.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from quant4 import ops
from quant4.options import DEFAULT_METHOD, GROUP_SIZES
from quant4.scheme import padded_k


def stored_bits(out_features: int, in_features: int, group_size: int) -> int:
    """Bits quant4 stores for one layer's weight: 4-bit codes over the padded K, fp16 scale and zero per group."""
    kp = padded_k(in_features, group_size)
    return out_features * (4 * kp + 32 * (kp // group_size))


def input_power(model: nn.Module, tokens: torch.Tensor,
                filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> dict:
    """{layer name: mean x_k^2 over the calibration tokens [n, length], per input k} for the selected nn.Linear
    layers of a float model: how strongly each input column's error reaches the layer's output."""
    from quant4.swap import is_projection

    select = filter_fn or is_projection
    power, handles = {}, []

    def hook(mod, inp, name):
        x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
        total, count = power.get(name, (0.0, 0))
        power[name] = (total + (x * x).sum(0), count + x.shape[0])

    for name, mod in model.named_modules():
        if name and isinstance(mod, nn.Linear) and select(mod, name):
            handles.append(mod.register_forward_pre_hook(lambda m, inp, name=name: hook(m, inp, name)))
    try:
        with torch.no_grad():
            for row in tokens:
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return {name: total / count for name, (total, count) in power.items()}


def kl_sensitivity(model: nn.Module, tokens: torch.Tensor, layers: dict, group_sizes=GROUP_SIZES,
                   method: str = DEFAULT_METHOD) -> dict:
    """{(layer name, group size): KL(float || model with only that layer quantized at that size)}, mean over the
    next-token distributions of the calibration tokens [n, length]: each layer's measured share of the KL,
    assumed to add up across layers. One forward pass per layer and size."""
    from quant4.nn import Int4Linear

    def logprobs():
        with torch.no_grad():
            return torch.log_softmax(model(tokens).float(), -1)

    ref = logprobs()
    out = {}
    for name, lin in layers.items():
        for g in group_sizes:
            model.set_submodule(name, Int4Linear.from_linear(lin, g, method=method))
            try:
                lp = logprobs()
            finally:
                model.set_submodule(name, lin)
            out[name, g] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    return out


def plan_group_sizes(model: nn.Module, bits_per_weight: float,
                     filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, method: str = DEFAULT_METHOD,
                     group_sizes=GROUP_SIZES, power: Optional[dict] = None,
                     kl_tokens: Optional[torch.Tensor] = None) -> dict:
    """{layer name: group size} for the selected nn.Linear layers (filter_fn, default quant4.swap.is_projection)
    whose stored bits stay within bits_per_weight x their weights. A layer's error at a group size is its squared
    weight error relative to its weights', each input column weighted by power[name] (input_power: calibration)
    when given. ValueError when even the cheapest sizes do not fit."""
    from quant4.swap import is_projection

    select = filter_fn or is_projection
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and select(m, n)}
    if not layers:
        raise ValueError("plan_group_sizes: no layers selected")
    kl = kl_sensitivity(model, kl_tokens, layers, group_sizes, method) if kl_tokens is not None else None
    options = {}       # name -> [(bits, error, group size)] by bits, each finer option with less error
    for name, lin in layers.items():
        w = lin.weight.detach().float()
        cands = []
        for g in group_sizes:
            if kl is not None:
                err = kl[name, g]
            else:
                q = ops.quantize(w, g, method=method)
                h = power[name] if power is not None else torch.ones(lin.in_features)
                err = float((((w - ops.dequantize(*q, g, lin.in_features)) ** 2) * h).sum() / ((w * w) * h).sum())
            cands.append((stored_bits(lin.out_features, lin.in_features, g), err, g))
        kept = []
        for c in sorted(cands):
            if not kept or c[1] < kept[-1][1]:       # padding can make a coarser size cost more: never chosen
                kept.append(c)
        options[name] = kept
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    budget = bits_per_weight * n_weights
    level = {name: 0 for name in layers}
    used = sum(opts[0][0] for opts in options.values())
    if used > budget:
        raise ValueError(f"a budget of {bits_per_weight} bits per weight is below the {used / n_weights:.3f} "
                         f"of the cheapest group sizes")
    while True:
        best, best_gain = None, 0.0
        for name, i in level.items():
            opts = options[name]
            if i + 1 < len(opts):
                extra = opts[i + 1][0] - opts[i][0]
                gain = (opts[i][1] - opts[i + 1][1]) / extra
                if used + extra <= budget and gain > best_gain:
                    best, best_gain = name, gain
        if best is None:
            break
        i = level[best]
        used += options[best][i + 1][0] - options[best][i][0]
        level[best] = i + 1
    return {name: options[name][i][2] for name, i in level.items()}


def plan_bits_per_weight(model: nn.Module, plan: dict) -> float:
    """The bits per weight a plan stores."""
    mods = {n: model.get_submodule(n) for n in plan}
    total = sum(stored_bits(m.out_features, m.in_features, plan[n]) for n, m in mods.items())
    return total / sum(m.out_features * m.in_features for m in mods.values())


def quantize_to_budget_(model: nn.Module, bits_per_weight: float,
                        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, method: str = DEFAULT_METHOD,
                        calibration: Optional[torch.Tensor] = None, **kwargs) -> nn.Module:
    """plan_group_sizes (ranked by measured KL on `calibration` tokens [n, length] when given, else by relative
    weight error), then quantize the model in place with that plan (quant4.quantize_ with per-layer overrides); other keyword arguments as quantize_
    takes them (verbose, progress)."""
    from quant4.config import Int4Config, quantize_

    plan = plan_group_sizes(model, bits_per_weight, filter_fn, method=method, kl_tokens=calibration)
    config = Int4Config(method=method, targets=[], overrides={n: {"group_size": g} for n, g in plan.items()})
    return quantize_(model, config, **kwargs)
