"""quant4 int4 layers -> the state dict of PyTorch's int4 op users (gpt-fast, torchchat, torchao): for each
Int4Linear `fqn`, `fqn.weight` packed in one of quant4.interop.layouts' layouts and `fqn.scales_and_zeros`
[K/g, N, 2]. The reader of such files is quant4.models.torch_int4."""
from __future__ import annotations

from typing import Optional

import torch

from quant4 import ops
from quant4.interop import layouts


def export_torch_int4(model, *, dtype=torch.bfloat16, layout: Optional[str] = None, inner_k_tiles: int = 8,
                      report: Optional[list] = None) -> dict:
    """A gpt-fast / torchchat style state dict of `model`: each Int4Linear becomes `fqn.weight` (packed) and
    `fqn.scales_and_zeros` [K/g, N, 2] in `dtype`. layout None: torch's own
    _convert_weight_to_int4pack_for_cpu (this torch, this CPU; what torchchat and torchao use on CPU);
    otherwise any quant4.interop.layouts layout (cuda-tiled with inner_k_tiles for gpt-fast on CUDA). Layers torch's
    op cannot hold (N % 16, in_features % group_size) are written as float weights, listed in `report`."""
    from quant4.embedding import Int4Embedding, Int8Embedding
    from quant4.int8_linear import Int8Linear
    from quant4.nn import Int4Linear

    note = report.append if report is not None else (lambda s: None)
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    tables = {n: m for n, m in model.named_modules() if isinstance(m, (Int4Embedding, Int8Embedding, Int8Linear))}
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state") or key.rsplit(".", 1)[0] in int4 or key.rsplit(".", 1)[0] in tables:
            continue
        out[key] = t.detach().clone()
    for name, m in tables.items():     # these tools hold embedding tables and heads in float: the exact values
        out[f"{name}.weight"] = m.dequantize()
        what = {Int4Embedding: "int4 embedding table", Int8Embedding: "8-bit embedding table"}.get(type(m), "8-bit head")
        note(f"{name}: {what} written as its float32 values")
    for name, m in int4.items():
        K, g = m.in_features, m.group_size
        codes = ops.unpack(m.qweight)[:, :K].contiguous()
        ok = K % g == 0 and m.out_features % 16 == 0 and (layout != "cuda-tiled" or
                                                          (K % (inner_k_tiles * 16) == 0 and m.out_features % 8 == 0))
        if not ok:
            out[f"{name}.weight"] = m.dequantize().to(dtype)
            note(f"{name}: [{m.out_features}, {K}] g{g} cannot be held by torch's int4 op; written as {dtype} weight")
            continue
        if layout is None:
            out[f"{name}.weight"], out[f"{name}.scales_and_zeros"] = m.to_torch_int4pack(dtype)
        else:
            out[f"{name}.weight"] = layouts.pack_codes(codes, layout, inner_k_tiles)
            out[f"{name}.scales_and_zeros"] = layouts.scales_and_zeros(m.scales, m.zeros, dtype)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().clone()
    return out
