"""GGML tensors (as the `gguf` package reads them) <-> quant4 tensors.

to_quant4: Q4_0 / Q4_1 projections become quant4 int4 layers with group size 32 without re-quantization
(layouts.from_ggml_q4: Q4_0 exact, Q4_1's offset rounded once to float16); F32 / F16 / BF16 become float32; any
other type is dequantized with gguf.quants.dequantize and, for a projection, re-quantized to int4 g32 (round to
nearest). to_int8: a quantized head as an 8-bit layer (Q8_0 exact). from_int4: an Int4Linear's tensors as Q4_1
blocks (in_features a multiple of 32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from quant4 import memory, ops
from quant4.interop import layouts
from quant4.scheme import pack_codes


@dataclass
class Converted:
    """One GGML tensor in quant4's terms: an int4 layer (qweight, scales, zeros; group size 32) or a float
    weight. requantized: an int4 layer made by re-quantizing another GGML type (not exact)."""
    weight: Optional[torch.Tensor] = None
    qweight: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None
    requantized: bool = False


def to_quant4(data, type_name: str, shape: tuple, int4: bool) -> Converted:
    """A GGML tensor -> Converted. data: its raw numpy array, type_name: gguf.GGMLQuantizationType name,
    shape: [rows, cols] (numpy order), int4: keep or make it an int4 layer (a projection). ValueError for a type
    gguf cannot dequantize."""
    import gguf

    data = np.asarray(data)
    if type_name in ("Q4_0", "Q4_1") and int4 and len(shape) == 2:
        N, K = shape
        codes, s, z = layouts.from_ggml_q4(torch.from_numpy(data.copy()).view(torch.uint8).reshape(N, -1),
                                           type_name, K)
        # straight into the memory the model keeps (quant4.memory): no second copy at load
        qweight = pack_codes(codes, out=memory.empty((N, K // 2), torch.uint8))
        # (Q4_0's zeros, all 0, become a mapping that is never resident: the decode kernels skip the zero stream
        # of symmetric weights, the others read the kernel's shared zero page)
        return Converted(qweight=qweight, scales=memory.adopt(s), zeros=memory.adopt(z))
    if type_name == "BF16":
        w = torch.from_numpy(data.copy()).view(torch.bfloat16).float()
    elif type_name in ("F32", "F16"):
        w = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32))
    else:
        try:
            qtype = gguf.GGMLQuantizationType[type_name]
            w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)).astype(np.float32))
        except (NotImplementedError, KeyError) as exc:
            raise ValueError(f"type {type_name}, which gguf cannot dequantize ({exc})") from None
        if int4:
            qw, s, z = ops.quantize(w.reshape(shape), 32)
            return Converted(qweight=qw, scales=s, zeros=z, requantized=True)
    return Converted(weight=w.reshape(shape))


def to_int8(data, type_name: str, shape: tuple) -> tuple:
    """A GGML tensor [rows, cols] of a quantized type -> (codes, scales) of quant4.int8_linear.Int8Linear: Q8_0
    exactly (layouts.from_ggml_q8_0), any other type dequantized by gguf then rounded as Q8_0 rounds
    (ops.head_int8_quantize). ValueError for a type gguf cannot dequantize."""
    import gguf

    data = np.asarray(data)
    N, K = shape
    if type_name == "Q8_0":
        codes, scales = layouts.from_ggml_q8_0(torch.from_numpy(data.copy()).view(torch.uint8).reshape(N, -1), K)
        return memory.adopt(codes), memory.adopt(scales)
    try:
        qtype = gguf.GGMLQuantizationType[type_name]
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)).astype(np.float32))
    except (NotImplementedError, KeyError) as exc:
        raise ValueError(f"type {type_name}, which gguf cannot dequantize ({exc})") from None
    return ops.head_int8_quantize(w.reshape(shape))


def from_int4(module) -> tuple[np.ndarray, float]:
    """An Int4Linear (in_features % 32 == 0) -> (Q4_1 blocks uint8 [N, K/32 * 20], the largest change of a
    weight caused by rounding the Q4_1 offset to float16)."""
    blocks, err = layouts.to_ggml_q4_1(ops.unpack(module.qweight), module.scales, module.zeros, module.group_size,
                                       module.in_features)
    return blocks.numpy(), err
