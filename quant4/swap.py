"""quantize_model_: swap a model's nn.Linear projections for Int4Linear in place."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from quant4.options import DEFAULT_METHOD, MODEL_METHODS  # noqa: F401  (re-exported)
from torch import nn
from tqdm import tqdm

from quant4.nn import Int4Linear

log = logging.getLogger("quant4")

PROJECTION_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# How a model's layers can be quantized: quantize_model_(method="refit" (default) | "rtn" | "search"), or with calibration
# text quantize_model_gptq_ (its group scales by "search") or quant4.tune.tune_model_.


def is_projection(module: nn.Module, fqn: str) -> bool:
    """Default filter: an nn.Linear whose attribute name is one of wq wk wv wo w1 w2 w3."""
    return isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] in PROJECTION_NAMES


def projection_filter(include=(), exclude=()) -> Callable[[nn.Module, str], bool]:
    """A filter_fn selecting the projections plus the nn.Linear layers named in `include` (attribute names
    such as "output"), minus those named in `exclude`."""
    include, exclude = set(include), set(exclude)

    def select(module: nn.Module, fqn: str) -> bool:
        attr = fqn.rsplit(".", 1)[-1]
        if attr in exclude or fqn in exclude:
            return False
        return is_projection(module, fqn) or (isinstance(module, nn.Linear) and (attr in include or fqn in include))

    return select


@dataclass(frozen=True)
class SwapRecord:
    name: str
    swapped: bool
    reason: str
    sqnr_db: Optional[float] = None     # weight SQNR of a swapped layer: 20 log10(|w| / |w - w_hat|)


class SwapReport(list):
    """model.quant4_report: a list of SwapRecord that prints as a table (format_report)."""

    def __str__(self) -> str:
        return format_report(self)


def weight_sqnr_db(w, q: Int4Linear) -> float:
    import torch

    w = w.detach().float()
    err = (w - q.dequantize()).norm()
    return float(20 * torch.log10(w.norm() / err)) if err > 0 else float("inf")


@dataclass(frozen=True)
class LayerSettings:
    """How one nn.Linear is quantized (what a filter or an Int4Config resolves to, per layer)."""
    group_size: int = 32
    method: str = DEFAULT_METHOD
    activation: str = "float"
    num_threads: Optional[int] = None


def quantize_model_(model: nn.Module, group_size: int = 32,
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
                    num_threads: Optional[int] = None, activation: str = "float", method: str = DEFAULT_METHOD,
                    verbose: bool = False, progress: bool = False) -> nn.Module:
    """Replace selected nn.Linear modules of `model` by Int4Linear, in place; return the model.

    activation="int8" opts the new layers into int8-activation decode (see Int4Linear); method="search"
    chooses each group's scale and zero by a clipping search (quant4.ops.quantize) instead of min/max.
    filter_fn(module, fully_qualified_name) -> bool selects modules (default: is_projection). Only
    nn.Linear modules can be swapped; a selected module of another type raises TypeError.
    What was swapped, and every nn.Linear left in float with the reason, is logged to the "quant4" logger
    (printed too with verbose=True) and stored as a list of SwapRecord in model.quant4_report
    (format_report() renders it as a table). progress=True shows a progress bar (tqdm, on stderr).
    quant4.quantize_ with an Int4Config is the same with per-layer settings.
    """
    select = filter_fn or is_projection
    settings = LayerSettings(group_size, method, activation, num_threads)
    why = "not a projection (wq wk wv wo w1 w2 w3)" if filter_fn is None else "not selected by filter_fn"
    return swap_layers_(model, lambda mod, fqn: settings if select(mod, fqn) else None, why,
                        verbose=verbose, progress=progress)


def swap_layers_(model: nn.Module, choose: Callable[[nn.Module, str], Optional[LayerSettings]], why_kept: str, *,
                 verbose: bool = False, progress: bool = False) -> nn.Module:
    """The swap behind quantize_model_ and quantize_: choose(module, fqn) gives a selected layer's LayerSettings,
    or None to keep it (reported with `why_kept`), or a str: keep it for that reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model_ expects an nn.Module, got {type(model).__name__}")
    report = []
    targets = {}        # id(linear) -> (linear, settings, [every name it is reachable under])
    # remove_duplicate=False: a module shared under two names is seen (and later swapped) under both
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if not fqn:
            continue
        if isinstance(mod, Int4Linear):
            report.append(SwapRecord(fqn, False, "already Int4Linear"))
            continue
        chosen = choose(mod, fqn)
        if isinstance(chosen, str):
            if isinstance(mod, nn.Linear):
                report.append(SwapRecord(fqn, False, chosen))
            continue
        if chosen is not None and not isinstance(mod, nn.Linear):
            raise TypeError(f"filter_fn selected {fqn!r}, a {type(mod).__name__}; only nn.Linear can be quantized")
        if chosen is not None:
            targets.setdefault(id(mod), (mod, chosen, []))[2].append(fqn)
        elif isinstance(mod, nn.Linear):
            report.append(SwapRecord(fqn, False, why_kept))
    # quantize everything first, swap only when every layer succeeded: a bad weight anywhere leaves the
    # model untouched (no half-quantized model)
    swaps = []
    for linear, st, names in tqdm(targets.values(), desc="quantize", unit="layer", disable=not progress,
                                  file=sys.stderr):
        try:
            q = Int4Linear.from_linear(linear, st.group_size, num_threads=st.num_threads, activation=st.activation,
                                       method=st.method)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{names[0]}: {exc}; the model was left unchanged") from exc
        sqnr = weight_sqnr_db(linear.weight, q)
        shared = f" (shared with {', '.join(names[1:])})" if len(names) > 1 else ""
        for fqn in names:
            swaps.append((fqn, q))
            report.append(SwapRecord(fqn, True, f"int4 g{st.group_size} {st.method}"
                                     f"{shared if fqn == names[0] else ''}", sqnr))
    for fqn, q in swaps:
        model.set_submodule(fqn, q)
    arrange_layouts_(model)        # int8-activation layers in the layout of their kernels
    for rec in report:
        msg = f"{'swapped' if rec.swapped else 'kept   '} {rec.name}: {rec.reason}"
        log.info(msg)
        if verbose:
            print(msg)
    model.quant4_report = SwapReport(report)
    return model


def set_activation_(model: nn.Module, activation: str) -> int:
    """Set every Int4Linear (and 8-bit head, Int8Linear) of `model` to activation mode "float", "int8" or "bf16"
    (see Int4Linear); returns how many layers were set."""
    from quant4.ops import check_activation

    check_activation(activation)
    from quant4.int8_linear import Int8Linear

    n = 0
    for mod in model.modules():
        if isinstance(mod, (Int4Linear, Int8Linear)):
            mod.activation = activation
            n += 1
    arrange_layouts_(model)
    return n


def arrange_layouts_(model: nn.Module) -> int:
    """Hold each Int4Linear's buffers in the layout its activation mode's kernels read: the slab16 layout for
    activation "int8" where ops.slab16_available() (16 rows in vector lanes: 1.2-1.6x the decode bandwidth of
    rows), else rows. A module whose buffers another module shares (a tied Int4Embedding) keeps rows. Exact,
    in place; saving still writes rows. Returns how many modules hold slab16. set_activation_ calls this."""
    owners: dict = {}
    for mod in model.modules():
        for t in list(mod._buffers.values()) + list(mod._parameters.values()):
            if t is not None and t.numel():
                key = t.untyped_storage().data_ptr()
                owners[key] = owners.get(key, 0) + 1
    n = 0
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            b = mod._buffers
            alone = all(owners.get(b[k].untyped_storage().data_ptr(), 0) <= 1 for k in ("qweight", "scales", "zeros"))
            on = alone and mod._slab16_fits() and mod.out_features >= 16     # (fewer rows: no whole set)
            mod.set_slab16_(on)
            n += on
    return n


def format_report(report, model: Optional[nn.Module] = None) -> str:
    """model.quant4_report as a text table: layer, shape (when `model` is given), what was done, weight SQNR;
    then the mean and worst SQNR of the quantized layers."""
    rows = []
    for r in report:
        shape = ""
        if model is not None:
            mod = model.get_submodule(r.name)
            shape = f"[{getattr(mod, 'out_features', '?')}, {getattr(mod, 'in_features', '?')}]"
        sqnr = f"{r.sqnr_db:6.2f} dB" if r.sqnr_db is not None else ""
        rows.append((r.name, shape, r.reason if r.swapped else f"kept: {r.reason}", sqnr))
    if not rows:
        return "no nn.Linear layers"
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {a:{w[0]}}  {b:{w[1]}}  {c:{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    done = [r for r in report if r.swapped and r.sqnr_db is not None]
    if done:
        worst = min(done, key=lambda r: r.sqnr_db)
        lines.append(f"  {len(done)} layers int4; weight SQNR mean {sum(r.sqnr_db for r in done) / len(done):.2f} dB, "
                     f"worst {worst.sqnr_db:.2f} dB ({worst.name})")
        if any("gptq" in r.reason or "tuned" in r.reason for r in done):
            lines.append("  (GPTQ and tuning minimise output error on the calibration inputs, not the weight error: "
                         "their weight SQNR can be lower than round-to-nearest's while the model is closer to float)")
    return "\n".join(lines)


def model_size(model: nn.Module) -> dict:
    """What a model holds: int4 weights (and their layers), float parameters and buffers outside the quantized
    modules (Int4Linear, Int4Embedding, Int8Linear), and the bytes of both (tensors shared under two names
    counted once)."""
    seen, info = set(), {"int4_layers": 0, "int4_weights": 0, "float_params": 0, "bytes": 0}
    for mod in model.modules():
        if isinstance(mod, Int4Linear) and id(mod) not in seen:
            seen.add(id(mod))
            info["int4_layers"] += 1
            info["int4_weights"] += mod.in_features * mod.out_features
    from quant4.embedding import Int4Embedding, Int8Embedding
    from quant4.int8_linear import Int8Linear

    quantized = {id(b) for m in model.modules() if isinstance(m, (Int4Linear, Int4Embedding, Int8Embedding, Int8Linear))
                 for b in m.buffers(recurse=False) if b is not None and b is not getattr(m, "bias", None)}
    storages = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in storages:
            continue
        storages.add(key)
        info["bytes"] += t.numel() * t.element_size()
        if t.is_floating_point() and id(t) not in quantized:
            info["float_params"] += t.numel()
    return info
