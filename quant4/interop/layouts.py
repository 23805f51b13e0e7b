"""Other tools' int4 layouts, converted to and from quant4's codes, bit for bit (plain PyTorch).

Every layout stores the same thing as quant4 -- one 4-bit code q in 0..15 per weight and, per group, a
scale and a zero with w_hat = (q - 8) * scale + zero -- but puts the nibbles in different places:

    quant4         uint8 [N, K/2]; byte i of row n: low nibble k = 2i, high nibble k = 2i + 1
    uint8-hi-even  uint8 [N, K/2]; high nibble k = 2i, low nibble k = 2i + 1 (the uint8 input of torch 2.5's
                   _convert_weight_to_int4pack; torchao/torchchat pack this way before the CUDA conversion)
    cpu-avx512     torch's CPU packed weight (_convert_weight_to_int4pack_for_cpu in torch >= 2.6, and the
    cpu-avx2       CPU branch of _convert_weight_to_int4pack in 2.3-2.5): blocks of BN rows (64 on AVX-512,
    cpu-scalar     32 otherwise), each [K][BN/2] bytes. Full AVX-512 block: byte d of a k-row holds rows d
                   (low) and d + 32 (high); full AVX2 block: rows d and d + 16; scalar builds and every
                   partial block (16, 32 or 48 rows): rows 2d and 2d + 1. torch >= 2.6 returns these bytes as
                   uint8 [N, K/2]; 2.3-2.5 returned them in the int32 4-D shape below. Which one a machine
                   writes depends on its ISA (ATEN_CPU_CAPABILITY), and the bytes do not say.
    cuda-tiled     int32 [N/8, K/(ikt*16), 32, ikt/2] (ikt = inner k tiles: 2, 4 or 8), the tensor-core
                   layout of _convert_weight_to_int4pack on CUDA, what gpt-fast saves: int32 [nt][kt][t][i]
                   holds row 8 nt + t/4, and its nibble j (bits 4j..4j+3) holds k = k0 + (0, 8, 16, 24,
                   1, 9, 17, 25)[j] with k0 = 16 (kt ikt + 2 i) + 2 (t % 4).

Scales and zeros: torch's ops and gpt-fast take scales_and_zeros [K/g, N, 2] (scale, zero) in the
activation dtype, with the same (q - 8) * scale + zero formula, so the conversion is a transpose; quant4
keeps them as float16 (see to_quant4_qparams for the rounding).

GGUF blocks of 32 (ggml): Q4_0 {fp16 d; 16 bytes} with w = d (q - 8); Q4_1 {fp16 d, fp16 m; 16 bytes} with
w = d q + m; byte j of a block holds element j (low nibble) and element j + 16 (high nibble).
"""
from __future__ import annotations

import sys
from functools import lru_cache

import torch

from quant4.scheme import GROUP_SIZES, SCALE_DTYPE

LAYOUTS = ("quant4", "uint8-hi-even", "cpu-avx512", "cpu-avx2", "cpu-scalar", "cuda-tiled")
CPU_LAYOUTS = ("cpu-avx512", "cpu-avx2", "cpu-scalar")
INNER_K_TILES = (2, 4, 8)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown int4 layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return layout


def _check_codes(codes) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor [N, K], got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must be 0..15, found {int(codes.max())}")
    return codes


def check_layout_shape(layout: str, N: int, K: int, inner_k_tiles: int = 8) -> None:
    """Raise ValueError if a [N, K] weight cannot be held in `layout`."""
    _check_layout(layout)
    if N <= 0 or K <= 0 or K % 2:
        raise ValueError(f"int4 layouts need N >= 1 and an even K >= 2, got N={N}, K={K}")
    if layout in CPU_LAYOUTS and N % 16:
        raise ValueError(f"{layout}: torch's CPU packing needs N % 16 == 0, got N={N}")
    if layout == "cuda-tiled":
        if inner_k_tiles not in INNER_K_TILES:
            raise ValueError(f"inner_k_tiles must be one of {INNER_K_TILES}, got {inner_k_tiles}")
        if N % 8 or K % (inner_k_tiles * 16):
            raise ValueError(f"cuda-tiled needs N % 8 == 0 and K % {inner_k_tiles * 16} == 0 "
                             f"(inner_k_tiles={inner_k_tiles}), got N={N}, K={K}")


@lru_cache(maxsize=32)
def nibble_map(layout: str, N: int, K: int, inner_k_tiles: int = 8) -> torch.Tensor:
    """int64 [N*K]: for nibble slot p of the packed bytes (byte p // 2, low nibble if p is even), the flat
    index n*K + k of the weight it holds. A permutation of 0..N*K-1."""
    check_layout_shape(layout, N, K, inner_k_tiles)
    ar = torch.arange
    if layout == "quant4":
        return ar(N * K)
    if layout == "uint8-hi-even":
        return ar(N * K).view(-1, 2).flip(1).reshape(-1)
    if layout == "cuda-tiled":
        ikt = inner_k_tiles
        nt = ar(N // 8).view(-1, 1, 1, 1, 1)
        kt = ar(K // (ikt * 16)).view(1, -1, 1, 1, 1)
        t = ar(32).view(1, 1, -1, 1, 1)
        i = ar(ikt // 2).view(1, 1, 1, -1, 1)
        j = ar(8).view(1, 1, 1, 1, -1)
        n = nt * 8 + t // 4
        k = 16 * (kt * ikt + 2 * i) + 2 * (t % 4) + 8 * (j % 2) + 16 * ((j // 2) % 2) + j // 4
        return (n * K + k).reshape(-1)
    BN = 64 if layout == "cpu-avx512" else 32
    parts = []
    for n0 in range(0, N, BN):
        nb = min(BN, N - n0)
        k = ar(K).view(-1, 1, 1)
        d = ar(nb // 2).view(1, -1, 1)
        h = ar(2).view(1, 1, -1)
        if nb == BN and layout == "cpu-avx512":
            n = d + 32 * h
        elif nb == BN and layout == "cpu-avx2":
            n = d + 16 * h
        else:
            n = 2 * d + h
        parts.append(((n0 + n) * K + k).reshape(-1))
    return torch.cat(parts)


def pack_codes(codes: torch.Tensor, layout: str, inner_k_tiles: int = 8) -> torch.Tensor:
    """codes uint8 [N, K] (0..15) -> the packed tensor of `layout` (uint8 [N, K/2], or int32 4-D for
    cuda-tiled)."""
    codes = _check_codes(codes)
    N, K = codes.shape
    slots = codes.reshape(-1)[nibble_map(layout, N, K, inner_k_tiles)]
    packed = (slots[0::2] | (slots[1::2] << 4)).contiguous()
    if layout == "cuda-tiled":
        if sys.byteorder != "little":
            raise RuntimeError("cuda-tiled conversion assumes a little-endian host")
        return packed.view(torch.int32).view(N // 8, K // (inner_k_tiles * 16), 32, inner_k_tiles // 2)
    return packed.view(N, K // 2)


def torch_cpu_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> the packed weight of PyTorch's CPU int4 op, made by that op's own converter
    (_convert_weight_to_int4pack_for_cpu, torch >= 2.6): the bytes this torch uses on this CPU's ISA."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(_check_codes(codes).to(torch.int32).contiguous(), 1)


def unpack_codes(packed: torch.Tensor, layout: str, N: int, K: int) -> torch.Tensor:
    """The inverse of pack_codes: packed tensor of `layout` holding an [N, K] weight -> codes uint8 [N, K].
    Raw bytes are what count: a CPU layout may come as uint8 [N, K/2] or in torch <= 2.5's int32 4-D shape."""
    _check_layout(layout)
    if not isinstance(packed, torch.Tensor) or packed.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"packed int4 weight must be uint8 or int32, got {getattr(packed, 'dtype', type(packed))}")
    if packed.numel() * packed.element_size() != N * K // 2:
        raise ValueError(f"{layout}: packed tensor {packed.dtype} {tuple(packed.shape)} holds "
                         f"{packed.numel() * packed.element_size()} bytes; an [{N}, {K}] int4 weight needs {N * K // 2}")
    ikt = 8
    if layout == "cuda-tiled":
        if packed.dim() != 4 or packed.dtype != torch.int32 or packed.shape[0] * 8 != N or packed.shape[2] != 32:
            raise ValueError(f"cuda-tiled weight must be int32 [N/8, K/(ikt*16), 32, ikt/2] for N={N}, K={K}, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        ikt = packed.shape[3] * 2
        if ikt not in INNER_K_TILES or packed.shape[1] * ikt * 16 != K:
            raise ValueError(f"cuda-tiled weight {tuple(packed.shape)}: inner k tiles {ikt} do not match K={K}")
    raw = packed.reshape(-1).contiguous().view(torch.uint8)    # flat first: a size-1 dim may carry stride 0
    slots = torch.stack([raw & 15, raw >> 4], dim=1).reshape(-1)
    codes = torch.empty(N * K, dtype=torch.uint8)
    codes[nibble_map(layout, N, K, ikt)] = slots
    return codes.view(N, K)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """quant4's scales, zeros [N, G] -> torch's / gpt-fast's scales_and_zeros [G, N, 2] in `dtype`."""
    if scales.shape != zeros.shape or scales.dim() != 2:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [N, G]")
    return torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()


def to_quant4_qparams(sz: torch.Tensor, name: str = "scales_and_zeros"):
    """scales_and_zeros [G, N, 2] (any float dtype) -> (scales fp16 [N, G], zeros fp16 [N, G]).

    bfloat16 and float16 values convert exactly when their magnitude is 0 or in [6.1e-5, 65504]
    (float16's normal range); smaller ones lose low bits (float16 subnormals); larger ones raise."""
    if not isinstance(sz, torch.Tensor) or sz.dim() != 3 or sz.shape[2] != 2 or not sz.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [K/g, N, 2], got "
                         f"{getattr(sz, 'dtype', type(sz).__name__)} {tuple(getattr(sz, 'shape', ()))}")
    if not torch.isfinite(sz).all():
        raise ValueError(f"{name} has non-finite values")
    if sz.abs().max() > 65504:
        raise ValueError(f"{name} has values beyond float16's range (max |v| = {float(sz.abs().max()):.4g})")
    s = sz[..., 0].t().to(SCALE_DTYPE).contiguous()
    z = sz[..., 1].t().to(SCALE_DTYPE).contiguous()
    return s, z


def infer_group_size(K: int, n_groups: int) -> int:
    if n_groups <= 0 or K % n_groups or K // n_groups not in GROUP_SIZES:
        raise ValueError(f"cannot infer a group size from K={K} and {n_groups} groups "
                         f"(K / groups must be one of {GROUP_SIZES})")
    return K // n_groups


def layout_scores(packed: torch.Tensor, N: int, K: int, group_size: int, candidates=None) -> dict:
    """For each candidate layout, the fraction of (row, group) whose codes include both 0 and 15.

    Min/max quantizers (gpt-fast, torchao's tinygemm choice, quant4's rtn) put a 0 and a 15 in every group,
    so the right layout scores near 1 and layouts that scatter codes across groups score far lower. Layouts
    that differ only by a permutation of rows inside a block (cpu-avx2 vs cpu-scalar) or by swapping
    neighbouring k (quant4 vs uint8-hi-even) score the same: the bytes cannot tell them apart."""
    if candidates is None:
        candidates = [l for l in LAYOUTS if l != "quant4"]
    scores = {}
    for layout in candidates:
        try:
            codes = unpack_codes(packed, layout, N, K)
        except ValueError:
            continue
        g = codes[:, : K // group_size * group_size].reshape(N, -1, group_size)
        hit = (g.amin(-1) == 0) & (g.amax(-1) == 15)
        scores[layout] = float(hit.float().mean())
    return scores


def best_layouts(scores: dict) -> list:
    """The layouts the scores cannot tell apart at the top (within 0.02); none if the best is below 0.5, i.e.
    no candidate looks like min/max-quantized codes."""
    best = max(scores.values(), default=0.0)
    return [l for l, s in scores.items() if s >= best - 0.02] if best >= 0.5 else []


# ---- GGUF (ggml) 32-element blocks --------------------------------------------------------------------------

def _ggml_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> qs bytes [N, K/32, 16]: byte j = element j | element j + 16 << 4."""
    b = codes.view(codes.shape[0], -1, 2, 16)
    return b[:, :, 0] | (b[:, :, 1] << 4)


def _ggml_codes(qs: torch.Tensor) -> torch.Tensor:
    """qs [N, B, 16] -> codes [N, B*32]."""
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def to_ggml_q4_1(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 in_features: int) -> tuple[torch.Tensor, float]:
    """quant4 codes [N, >=K], scales/zeros fp16 [N, G] -> (Q4_1 blocks uint8 [N, K/32*20], the largest
    |change| of a dequantized weight caused by rounding m = zero - 8*scale to float16).

    d = scale exactly; m is the only rounding. in_features must be a multiple of 32."""
    K = in_features
    if K % 32:
        raise ValueError(f"GGUF Q4_1 needs in_features % 32 == 0, got {K}")
    N = codes.shape[0]
    s = scales.float().repeat_interleave(group_size // 32, dim=1)[:, : K // 32]
    z = zeros.float().repeat_interleave(group_size // 32, dim=1)[:, : K // 32]
    m32 = z - 8 * s
    m16 = m32.to(torch.float16)
    err = float((m16.float() - m32).abs().max()) if m32.numel() else 0.0
    d16 = s.to(torch.float16)
    out = torch.empty(N, K // 32, 20, dtype=torch.uint8)
    out[:, :, 0:2] = d16.contiguous().view(torch.uint8).view(N, K // 32, 2)
    out[:, :, 2:4] = m16.contiguous().view(torch.uint8).view(N, K // 32, 2)
    out[:, :, 4:] = _ggml_nibbles(codes[:, :K].contiguous())
    return out.view(N, -1), err


def from_ggml_q8_0(raw: torch.Tensor, in_features: int):
    """Q8_0 blocks uint8 [N, K/32 * 34] (w = d q, d float16, q int8) -> (codes uint8 [N, K] = q + 128, scales
    float32 [N, K/32] = d): quant4.int8_linear.Int8Linear's tensors, exact."""
    K = in_features
    if K % 32 or raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[1] != K // 32 * 34:
        raise ValueError(f"Q8_0 rows must be uint8 [N, {K // 32 * 34}] for in_features={K}, got "
                         f"{raw.dtype} {tuple(raw.shape)}")
    N = raw.shape[0]
    blocks = raw.contiguous().view(N, K // 32, 34)
    d = blocks[:, :, 0:2].contiguous().view(torch.float16).view(N, K // 32)
    if not torch.isfinite(d).all():
        raise ValueError("Q8_0 tensor has non-finite scales")
    codes = (blocks[:, :, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8).view(N, K)
    return codes, d.float()


def from_ggml_q4(raw: torch.Tensor, kind: str, in_features: int):
    """Q4_0 or Q4_1 blocks uint8 [N, K/32 * (18 or 20)] -> (codes [N, K], scales fp16 [N, K/32], zeros fp16
    [N, K/32]) for group size 32. Q4_0 (w = d (q - 8)): scale = d, zero = 0, exact. Q4_1 (w = d q + m):
    scale = d, zero = m + 8 d rounded to float16 (the one rounding; at most half a float16 ulp of zero)."""
    if kind not in ("Q4_0", "Q4_1"):
        raise ValueError(f"kind must be Q4_0 or Q4_1, got {kind!r}")
    bsz = 18 if kind == "Q4_0" else 20
    K = in_features
    if K % 32 or raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[1] != K // 32 * bsz:
        raise ValueError(f"{kind} rows must be uint8 [N, {K // 32 * bsz}] for in_features={K}, got "
                         f"{raw.dtype} {tuple(raw.shape)}")
    N = raw.shape[0]
    blocks = raw.contiguous().view(N, K // 32, bsz)
    d = blocks[:, :, 0:2].contiguous().view(torch.float16).view(N, K // 32)
    if kind == "Q4_0":
        zeros = torch.zeros_like(d)
        qs = blocks[:, :, 2:]
    else:
        m = blocks[:, :, 2:4].contiguous().view(torch.float16).view(N, K // 32)
        zeros = (m.float() + 8 * d.float()).to(torch.float16)
        qs = blocks[:, :, 4:]
    if not (torch.isfinite(d).all() and torch.isfinite(zeros).all()):
        raise ValueError(f"{kind} tensor has non-finite scales or offsets")
    return _ggml_codes(qs.contiguous()), d.contiguous(), zeros.contiguous()
