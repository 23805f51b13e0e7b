"""Token-embedding tables held quantized: Int4Embedding (group-wise int4, quant4's stored format) and
Int8Embedding (8 bits, the tensors of quant4.int8_linear.Int8Linear)."""
from __future__ import annotations

import torch
from torch import nn

from quant4 import memory, ops
from quant4.int8_linear import BLOCK, Int8Linear, check_codes, dequantize_codes
from quant4.nn import _torch_ops, _tracing, apply_keeping_dtypes
from quant4.scheme import FORMAT_VERSION, SCALE_DTYPE, padded_k


class _Table(nn.Module):
    """What both tables share: forward(tokens) checks the ids and returns the rows asked for, in `dtype` (fp32;
    module.to(dtype) changes it, the buffers keep their stored dtypes); subclasses give _rows(flat ids) -> fp32
    [n, embedding_dim]."""
    num_embeddings: int
    embedding_dim: int

    # the names a layer's metadata uses (quant4.serialization, the GGUF writer)
    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{type(self).__name__} expects int64/int32 token ids, got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        flat = tokens.reshape(-1)
        if not _tracing(tokens) and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise ValueError(f"token ids must be in [0, {self.num_embeddings}), got "
                             f"{int(flat.min())}..{int(flat.max())}")
        return self._rows(flat, _tracing(tokens)).to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def row_into(self, token: int, out: torch.Tensor) -> torch.Tensor:
        """out (fp32 [embedding_dim]) = row `token` as forward gives it in fp32, for a decode step: one id as an
        int, read through a slice (a 49152 x 576 table: forward's id checks and gathers about 50 us a call, this
        about 23)."""
        if not 0 <= token < self.num_embeddings:
            raise ValueError(f"token id must be in [0, {self.num_embeddings}), got {token}")
        return out.copy_(self._rows(slice(token, token + 1), False)[0])

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.dtype))      # what module.to(...) makes of a float tensor
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.dtype = probe.dtype
        return apply_keeping_dtypes(self, super()._apply, fn, recurse)


class Int4Embedding(_Table):
    """An embedding table [num_embeddings, embedding_dim] in int4: the buffers an Int4Linear of that weight
    holds (qweight uint8 [V, Kp/2], scales and zeros float16 [V, Kp/group_size]; quant4.scheme), looked up row
    by row. forward(tokens) dequantizes only the rows asked for: out[..., :] == dequantize()[tokens], bit for
    bit, in `dtype` (fp32; module.to(dtype) changes it, the buffers keep their stored dtypes).

    A model loaded from a file that holds its token embeddings in Q4_0/Q4_1 (GGUF) keeps them so, without
    loss: 4.5-5 bits a weight against fp32's 32 (0.47 GB less for a 32000 x 4096 table). A tied output head is
    then an Int4Linear over the same buffers (quant4.models.load)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group_size: int = 32):
        super().__init__()
        ops.check_int("num_embeddings", num_embeddings, 1, 1 << 31)
        ops.check_int("embedding_dim", embedding_dim, 1, 1 << 31)
        ops.check_group_size(group_size)
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.dtype = torch.float32
        G = padded_k(embedding_dim, group_size) // group_size
        self.register_buffer("qweight", memory.zeros((num_embeddings, G * group_size // 2), torch.uint8))
        self.register_buffer("scales", memory.zeros((num_embeddings, G), SCALE_DTYPE))
        self.register_buffer("zeros", memory.zeros((num_embeddings, G), SCALE_DTYPE))

    @classmethod
    def from_packed(cls, qweight, scales, zeros, *, embedding_dim: int, group_size: int) -> "Int4Embedding":
        """Wrap tensors already in quant4's stored format (validated; 2 MiB or more copied once into 2 MiB-page
        memory where Linux offers it, as Int4Linear.from_packed does)."""
        V, _, _ = ops.check_packed(qweight, scales, zeros, group_size, embedding_dim)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.num_embeddings, mod.embedding_dim, mod.group_size = V, embedding_dim, group_size
        mod.dtype = torch.float32
        mod.register_buffer("qweight", memory.adopt(qweight.contiguous()))
        mod.register_buffer("scales", memory.adopt(scales.contiguous()))
        mod.register_buffer("zeros", memory.adopt(zeros.contiguous()))
        return mod

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> "Int4Embedding":
        """Quantize a float table [num_embeddings, embedding_dim] (e.g. an nn.Embedding's weight) round to
        nearest, as Int4Linear.from_linear does a weight."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"from_float expects a 2-D float tensor, got "
                            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        qweight, scales, zeros = ops.quantize(weight.detach(), group_size)
        return cls.from_packed(qweight, scales, zeros, embedding_dim=weight.shape[1], group_size=group_size)

    def dequantize(self) -> torch.Tensor:
        """The whole table as fp32 [num_embeddings, embedding_dim]."""
        return ops.dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.embedding_dim)

    def _rows(self, flat: torch.Tensor, tracing: bool) -> torch.Tensor:
        parts = (self.qweight[flat], self.scales[flat], self.zeros[flat], self.group_size, self.embedding_dim)
        if tracing:      # torch.compile / torch.export: the kernel as the custom op quant4::dequantize
            return _torch_ops().dequantize(*parts)
        return ops.dequantize(*parts, num_threads=1)

    # -- state ---------------------------------------------------------------------------------
    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "group_size": self.group_size}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported Int4Embedding extra state {state!r} (this quant4 reads format "
                             f"version {FORMAT_VERSION})")
        mine = self.get_extra_state()
        for key in ("num_embeddings", "embedding_dim", "group_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"checkpoint {key}={state.get(key)!r} but this Int4Embedding has {key}={mine[key]!r}")

    def extra_repr(self) -> str:
        dtype = f", dtype={self.dtype}" if self.dtype != torch.float32 else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}{dtype}, "
                f"format=v{FORMAT_VERSION}")


class Int8Embedding(_Table):
    """An embedding table [num_embeddings, embedding_dim] in 8 bits: the tensors of an Int8Linear of that
    weight (codes uint8 [V, D] = w / scale + 128, scales float32 [V, D/32]), looked up row by row:
    out[..., :] == Int8Linear.dequantize()[tokens], in `dtype`. For a table a file holds in a quantized type
    other than Q4_0/Q4_1 (GGUF Q8_0 exactly, Q6_K and others rounded as Q8_0 rounds), e.g. the tied table of
    a small model quantized by llama.cpp: 8.25 bits a weight against fp32's 32, and a tied head is then an
    Int8Linear over the same tensors."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        ops.check_int("num_embeddings", num_embeddings, 1, 1 << 31)
        ops.check_int("embedding_dim", embedding_dim, 1, 1 << 31)
        if embedding_dim % BLOCK:
            raise ValueError(f"Int8Embedding needs embedding_dim divisible by {BLOCK}, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, torch.float32
        self.register_buffer("codes", torch.full((num_embeddings, embedding_dim), 128, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(num_embeddings, embedding_dim // BLOCK))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor) -> "Int8Embedding":
        """Wrap stored tensors (validated as Int8Linear.from_codes does; 2 MiB or more copied once into 2 MiB-page
        memory where Linux offers it)."""
        check_codes(codes, scales)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.num_embeddings, mod.embedding_dim = codes.shape
        mod.dtype = torch.float32
        mod.register_buffer("codes", memory.adopt(codes.contiguous()))
        mod.register_buffer("scales", memory.adopt(scales.contiguous()))
        return mod

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Embedding":
        """Round a float table [num_embeddings, embedding_dim] as Q8_0 rounds (Int8Linear.from_float)."""
        head = Int8Linear.from_float(weight)
        return cls.from_codes(head.codes, head.scales)

    def dequantize(self) -> torch.Tensor:
        """The whole table as fp32 [num_embeddings, embedding_dim]."""
        return self._rows(slice(None), False)

    def _rows(self, flat, tracing: bool) -> torch.Tensor:
        return dequantize_codes(self.codes[flat], self.scales[flat])

    def extra_repr(self) -> str:
        dtype = f", dtype={self.dtype}" if self.dtype != torch.float32 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8{dtype}"
