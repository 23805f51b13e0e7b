"""Int4 state dicts of the PyTorch tools (gpt-fast, torchchat, torchao's plain-tensor module swap): read them in
any historical packed layout, and write them for the running torch.

Those tools store, per quantized nn.Linear `fqn`, `fqn.weight` (packed int4, see quant4.interop.layouts) and
`fqn.scales_and_zeros` [K/g, N, 2] (bf16 in gpt-fast, the model dtype in torchchat), in Meta names
(`layers.{i}.attention.wq`, gpt-fast fuses `wqkv`), no model config. The readers here return what
models.load.build_quantized needs (ModelArgs, quant4 layer metadata, tensors in quant4's format).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .llama import ModelArgs
from .load import CheckpointError, check_params, strip_prefixes
from quant4.interop import layouts
from quant4.scheme import pack_codes, padded_k

def is_int4_state_dict(sd: dict) -> bool:
    return any(isinstance(k, str) and k.endswith(".scales_and_zeros") for k in sd)


def _candidates(packed: torch.Tensor) -> list[str]:
    if packed.dtype == torch.int32 and packed.dim() == 4:
        return ["cuda-tiled", *layouts.CPU_LAYOUTS]       # CUDA tiles, or torch <= 2.5 CPU bytes in that shape
    if packed.dtype == torch.uint8 and packed.dim() == 2:
        return [*layouts.CPU_LAYOUTS, "uint8-hi-even"]
    return []


@dataclass
class Int4Entry:
    name: str
    packed: torch.Tensor
    sz: torch.Tensor
    N: int
    K_stored: int
    group_size: int


def int4_entries(sd: dict, path="state dict") -> dict[str, Int4Entry]:
    """fqn -> Int4Entry for every `fqn.scales_and_zeros` with its `fqn.weight`, shapes checked."""
    out = {}
    for key, sz in sd.items():
        if not key.endswith(".scales_and_zeros"):
            continue
        name = key[: -len(".scales_and_zeros")]
        packed = sd.get(f"{name}.weight")
        if not isinstance(packed, torch.Tensor) or not isinstance(sz, torch.Tensor):
            raise CheckpointError(f"{path}: {key} has no packed tensor {name}.weight")
        if sz.dim() != 3 or sz.shape[2] != 2 or not sz.is_floating_point():
            raise CheckpointError(f"{path}: {key} must be float [K/g, N, 2], got {sz.dtype} {tuple(sz.shape)}")
        if packed.dtype not in (torch.uint8, torch.int32):
            raise CheckpointError(f"{path}: {name}.weight is {packed.dtype}; packed int4 is uint8 or int32")
        N, G = int(sz.shape[1]), int(sz.shape[0])
        nbytes = packed.numel() * packed.element_size()
        if N == 0 or G == 0 or nbytes % N or (2 * nbytes // N) % G:
            raise CheckpointError(f"{path}: {name}.weight ({packed.dtype} {tuple(packed.shape)}) does not hold "
                                  f"{N} rows of {G} groups (scales_and_zeros {tuple(sz.shape)})")
        K = 2 * nbytes // N
        try:
            g = layouts.infer_group_size(K, G)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {name}: {exc}") from None
        out[name] = Int4Entry(name, packed, sz, N, K, g)
    return out


def detect(entries: dict[str, Int4Entry], layout: Optional[str] = None, sample: int = 4):
    """-> (layouts the bytes are consistent with, per-layout mean score over up to `sample` layers)."""
    ents = sorted(entries.values(), key=lambda e: -e.N * e.K_stored)[:sample]
    cands = [layout] if layout else _candidates(ents[0].packed)
    totals: dict[str, float] = {}
    for e in ents:
        s = layouts.layout_scores(e.packed, e.N, e.K_stored, e.group_size, cands)
        for k, v in s.items():
            totals[k] = totals.get(k, 0.0) + v / len(ents)
    return layouts.best_layouts(totals), totals


def describe_checkpoint(sd: dict, path) -> str:
    """One paragraph: what kind of int4 state dict this is (for error messages and migrate --inspect)."""
    entries = int4_entries(strip_prefixes(sd), path)
    if not entries:
        return f"{path}: no int4 layers (no *.scales_and_zeros)"
    first = next(iter(entries.values()))
    found, scores = detect(entries)
    kind = ("int32 4-D: torch's tinygemm tile shape (gpt-fast / torch <= 2.5)" if first.packed.dim() == 4
            else "uint8 [N, K/2]: torch >= 2.6 CPU packed, or torch 2.5 / torchao uint8 input")
    seen = ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    verdict = (f"looks like {' or '.join(found)}" if found else "no layout matches min/max-quantized codes")
    return (f"{path}: int4 state dict from another tool, {len(entries)} layers, group size {first.group_size}, "
            f"{kind}; {verdict} (layout scores: {seen})")


def read_torch_int4(path, *, layout: Optional[str] = None, params_file=None, report: Optional[list] = None):
    """An int4 .pth of gpt-fast / torchchat / torchao -> (ModelArgs, layers, tensors) in quant4's format."""
    from .load import read_torch_state

    sd, params = read_torch_state(path, params_file)
    return convert_torch_int4(sd, params, path, layout=layout, report=report)


def convert_torch_int4(sd: dict, params: dict, path, *, layout: Optional[str] = None,
                       report: Optional[list] = None):
    """Another tool's int4 state dict (names already stripped, see load.read_torch_state) -> (ModelArgs,
    layers, tensors) in quant4's format.

    layout: one of quant4.interop.layouts.LAYOUTS, or None to detect it (CheckpointError if the bytes are ambiguous,
    naming the candidates). params: the model's hyperparameters (n_heads is required; the rest is read from the
    tensors)."""
    path = Path(path)
    sd = dict(sd)
    entries = int4_entries(sd, path)
    if not entries:
        raise CheckpointError(f"{path}: no int4 layers (no *.scales_and_zeros entries)")
    if layout is not None:
        layouts._check_layout(layout)
    found, scores = detect(entries, layout)
    if layout is None:
        if len(found) != 1:
            why = (f"the bytes fit {' and '.join(found)} equally" if found
                   else "no candidate looks like min/max-quantized codes")
            raise CheckpointError(f"{describe_checkpoint(sd, path)}. Cannot pick the layout: {why}; "
                                  f"name it (one of {', '.join(layouts.LAYOUTS)})", option="layout")
        layout = found[0]
    note = report.append if report is not None else (lambda s: None)
    note(f"layout {layout} (score {scores.get(layout, float('nan')):.2f}: share of groups whose codes reach 0 and 15)")

    n_heads = int(params.get("n_heads") or 0)
    if n_heads <= 0:
        raise CheckpointError(f"{path}: the model's n_heads is unknown; put a params.json beside the file or "
                              f"give a params file", option="params")
    emb = sd.get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"{path}: no tok_embeddings.weight")
    vocab, dim = emb.shape
    head_dim = dim // n_heads
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))

    def rows(name):
        e = entries.get(name)
        return e.N if e else sd[f"{name}.weight"].shape[0]

    fused = "layers.0.attention.wqkv" in entries or "layers.0.attention.wqkv.weight" in sd
    n_kv = int(params.get("n_kv_heads") or 0)
    if not n_kv:
        n_kv = ((rows("layers.0.attention.wqkv") - dim) // 2 // head_dim if fused
                else rows("layers.0.attention.wk") // head_dim)
    hidden = rows("layers.0.feed_forward.w1")
    check_params(params, path, dim=dim, n_layers=n_layers, vocab_size=vocab, n_kv_heads=n_kv,
                 hidden_dim=hidden)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                     hidden_dim=hidden, norm_eps=float(params.get("norm_eps", 1e-5)),
                     rope_theta=float(params.get("rope_theta", 10000.0)),
                     max_seq_len=int(params.get("max_seq_len", 2048)),
                     tie_embeddings="output" not in entries and (
                         "output.weight" not in sd or torch.equal(sd["output.weight"], emb)))
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    kv_dim = n_kv * head_dim

    layers, tensors = {}, {}
    for name, e in entries.items():
        in_features = hidden if name.endswith("w2") else dim
        if e.K_stored < in_features:
            raise CheckpointError(f"{path}: {name} packs {e.K_stored} inputs, the model needs {in_features}")
        codes = layouts.unpack_codes(e.packed, layout, e.N, e.K_stored)
        s16, z16 = layouts.to_quant4_qparams(e.sz, f"{name}.scales_and_zeros")
        parts = [(name, 0, e.N)]
        if name.endswith("attention.wqkv"):
            base = name[: -len("wqkv")]
            if e.N != dim + 2 * kv_dim:
                raise CheckpointError(f"{path}: {name} has {e.N} rows, expected {dim} + 2 x {kv_dim}")
            parts = [(base + "wq", 0, dim), (base + "wk", dim, dim + kv_dim), (base + "wv", dim + kv_dim, e.N)]
        g = e.group_size
        Kp = padded_k(in_features, g)
        for out_name, r0, r1 in parts:
            c = torch.zeros(r1 - r0, Kp, dtype=torch.uint8)
            c[:, :in_features] = codes[r0:r1, :in_features]
            tensors[f"{out_name}.qweight"] = pack_codes(c)
            tensors[f"{out_name}.scales"] = s16[r0:r1, : Kp // g].contiguous()
            tensors[f"{out_name}.zeros"] = z16[r0:r1, : Kp // g].contiguous()
            layers[out_name] = {"in_features": in_features, "out_features": r1 - r0, "group_size": g}
        if e.K_stored > in_features:
            note(f"{name}: dropped {e.K_stored - in_features} padding inputs (stored K {e.K_stored})")
    for k, v in sd.items():
        base = k.rsplit(".", 1)[0]
        if base in entries or k.endswith(".scales_and_zeros"):
            continue
        if base.endswith("attention.wqkv"):          # a float fused projection
            stem = base[: -len("wqkv")]
            tensors[stem + "wq.weight"], tensors[stem + "wk.weight"], tensors[stem + "wv.weight"] = \
                v[:dim], v[dim:dim + kv_dim], v[dim + kv_dim:]
            continue
        tensors[k] = v.float() if v.is_floating_point() else v
    note(f"{len(layers)} int4 layers, group size {next(iter(entries.values())).group_size}; "
         f"{len(tensors) - 3 * len(layers)} float tensors")
    return args, layers, tensors
