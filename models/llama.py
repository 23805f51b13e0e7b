"""A small Llama-family decoder with Meta / llama2.c parameter names.

Names: tok_embeddings, layers[i].attention.{wq,wk,wv,wo}, layers[i].feed_forward.{w1,w2,w3},
layers[i].attention_norm, layers[i].ffn_norm, norm, output.
RoPE rotates adjacent pairs (x[2i], x[2i+1]) within each head, as Meta's and llama2.c's checkpoints expect.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from quant4 import memory
from quant4.nn import Int4Linear
from quant4.ops import check_int

from . import rope


# Sanity limits on a model's shape, checked for every config from any file (a damaged header must not
# make us allocate terabytes): 8x the largest public Llama's dims.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_SEQ = 1 << 20


@dataclass
class ModelArgs:
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 1024
    hidden_dim: Optional[int] = None  # None: llama2.c's rule, 2/3 of 4*dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tie_embeddings: bool = True
    dropout: float = 0.0
    head_dim: Optional[int] = None    # None: dim // n_heads (a config may give another, e.g. Qwen3, Gemma)
    rope_scaling: Optional[dict] = None   # see models/rope.py; None: plain RoPE
    qkv_bias: bool = False            # biases on wq/wk/wv (Qwen2)

    # keys to_dict leaves out while they have their default, so files of models without these features stay
    # readable by versions that predate them
    _OPTIONAL_KEYS = {"head_dim": None, "rope_scaling": None, "qkv_bias": False}

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        explicit_head_dim = self.head_dim is not None
        if not explicit_head_dim:
            check_int("model config n_heads", self.n_heads, 1, MAX_DIM)
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        for name, limit in (("dim", MAX_DIM), ("n_layers", MAX_LAYERS), ("n_heads", MAX_DIM),
                            ("n_kv_heads", MAX_DIM), ("vocab_size", MAX_VOCAB), ("hidden_dim", 8 * MAX_DIM),
                            ("max_seq_len", MAX_SEQ), ("multiple_of", MAX_DIM), ("head_dim", MAX_DIM)):
            check_int(f"model config {name}", getattr(self, name), 1, limit)
        for name in ("norm_eps", "rope_theta", "dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"model config {name}={v!r} must be a finite number >= 0")
        if self.rope_theta <= 0:
            raise ValueError(f"model config rope_theta={self.rope_theta!r} must be > 0")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"model config tie_embeddings={self.tie_embeddings!r} must be true or false")
        if not explicit_head_dim and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for RoPE")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"model config qkv_bias={self.qkv_bias!r} must be true or false")
        self.rope_scaling = rope.check_scaling(self.rope_scaling, self.head_dim)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["head_dim"] == self.dim // self.n_heads:
            d["head_dim"] = None
        return {k: v for k, v in d.items() if k not in self._OPTIONAL_KEYS or v != self._OPTIONAL_KEYS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


_ROPE_LOCK = threading.Lock()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 whatever the model's dtype; F.rms_norm is one call where the spelled-out formula was
        # seven (the same values: x * rsqrt(mean(x^2) + eps) * weight), 10 us less per norm in decode
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_rotation(cos, sin):
    """What apply_rope multiplies by, for the positions of one forward ([S, D/2] tables): eagerly one complex
    tensor; when compiled the (cos, sin) pair, as torch.compile generates code for real arithmetic only."""
    if torch.compiler.is_compiling():
        return cos.float(), sin.float()
    return torch.complex(cos.float(), sin.float())


def apply_rope(x, rot):
    """x: [B, S, H, D]; rot from rope_rotation: each adjacent pair (x[2i], x[2i+1]) is one complex number,
    rotated by one complex multiply (eagerly fewer ops per call than cos/sin products and a stack); compiled, the
    same rotation in real arithmetic, which the compiler fuses into one loop."""
    if isinstance(rot, tuple):
        cos, sin = rot[0][None, :, None, :], rot[1][None, :, None, :]
        x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        # in 2 MiB-page memory where offered, resident only as positions are written (quant4.memory)
        self.register_buffer("k", memory.zeros(shape, dtype), persistent=False)
        self.register_buffer("v", memory.zeros(shape, dtype), persistent=False)

    def update(self, start_pos: int, k, v):
        # k, v: [B, Hkv, S, D]
        end = start_pos + k.shape[2]
        self.k[: k.shape[0], :, start_pos:end] = k
        self.v[: v.shape[0], :, start_pos:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.cache: Optional[KVCache] = None

    def forward(self, x, rot, start_pos: int, cache: Optional["KVCache"] = None):
        B, S, _ = x.shape
        q, k, v = Int4Linear.run_group((self.wq, self.wk, self.wv), x)     # shared input: one call when int4
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        cache = cache if cache is not None else self.cache
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        T = k.shape[2]
        if S == 1:
            mask = None
        else:
            # query i (absolute position start_pos+i) sees keys 0..start_pos+i
            mask = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_heads != self.n_kv_heads)      # grouped heads read the shared K/V, no copies
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        gate, up = Int4Linear.run_group((self.w1, self.w3), x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, rot, start_pos, cache=None):
        h = self.attention(self.attention_norm(x), rot, start_pos, cache)
        h = x + (self.drop(h) if self.drop.p and self.training else h)     # a call less per block at p = 0
        out = self.feed_forward(self.ffn_norm(h))
        return h + (self.drop(out) if self.drop.p and self.training else out)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()

    def reset_rope(self):
        """Empty the RoPE tables (on the CPU, e.g. after building the model on the meta device); forward
        computes them for the positions it needs, never for the whole max_seq_len a config claims."""
        self.rope_cos, self.rope_sin = torch.empty(0, self.args.head_dim // 2), torch.empty(0, self.args.head_dim // 2)

    def rope(self, end: int):
        """cos, sin tables covering positions 0..end-1 (grown on demand: doubling, capped at max_seq_len)."""
        a = self.args
        if rope.depends_on_length(a.rope_scaling) and end > a.rope_scaling["original_max_position_embeddings"]:
            return rope.tables(a.head_dim, end, a.rope_theta, a.rope_scaling)   # frequencies for this length
        if torch.compiler.is_compiling():
            # tables are buffers a compiled graph reads; they are grown eagerly (setup_cache / new_cache)
            torch._check(self.rope_cos.shape[0] >= end, lambda: "RoPE tables too short: call setup_cache() or "
                         "new_cache() with the context length before running compiled")
            return self.rope_cos, self.rope_sin
        with _ROPE_LOCK:      # readers in other threads see both tables of one length
            cos, sin = self.rope_cos, self.rope_sin
            if cos.shape[0] < end:
                n = min(max(end, 2 * cos.shape[0], 256), a.max_seq_len)
                if rope.depends_on_length(a.rope_scaling):
                    n = min(n, a.rope_scaling["original_max_position_embeddings"])
                with torch.inference_mode(False):     # kept across calls: never an inference-mode tensor
                    c, s = rope.tables(a.head_dim, n, a.rope_theta, a.rope_scaling)
                self.rope_cos, self.rope_sin = cos, sin = c.to(cos.dtype), s.to(sin.dtype)
        return cos, sin

    def relayout_head_(self) -> "Transformer":
        """Store a float output head input-major (the [vocab, dim] weight as a transposed view of a [dim, vocab]
        tensor; a tied embedding shares it): decode's matrix-vector product then streams the weight in the
        order the BLAS reads it, 2.4x faster for a 32000 x 576 fp32 head on 2 threads (8.2 -> 3.5 ms). Values
        and the state dict are unchanged; only the layout in memory. A load-time layout, never saved."""
        w = self.output.weight if type(self.output) is nn.Linear else None
        if not isinstance(w, nn.Parameter) or w.is_meta or w.dim() != 2 or not w.is_contiguous():
            return self
        p = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
        tied = getattr(self.tok_embeddings, "weight", None) is w
        self.output.weight = p
        if tied:
            self.tok_embeddings.weight = p
        return self

    def init_weights(self, seed: int = 0):
        """llama2.c's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("wo.weight", "w2.weight")):
                    std = 0.02 / math.sqrt(2 * self.args.n_layers)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the hidden states have between layers: the token embeddings' (a float table's weight, or
        an int4 table's output dtype)."""
        emb = self.tok_embeddings
        return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype

    def new_cache(self, batch: int, max_seq_len: Optional[int] = None, dtype=None) -> list:
        """A KV cache (one KVCache per layer) for forward(..., cache=...): each caller (thread) its own."""
        n = max_seq_len or self.args.max_seq_len
        dtype = dtype or self.compute_dtype
        self.rope(min(n, self.args.max_seq_len))     # the tables for every position the cache holds
        return [KVCache(batch, self.args.n_kv_heads, n, self.args.head_dim, dtype) for _ in self.layers]

    def setup_cache(self, batch: int, max_seq_len: Optional[int] = None, dtype=None):
        """Attach a KV cache to the model for incremental decoding (forward with start_pos and no cache
        argument); dtype: compute_dtype. Not for concurrent use: pass new_cache() to forward instead."""
        for layer, cache in zip(self.layers, self.new_cache(batch, max_seq_len, dtype)):
            layer.attention.cache = cache

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def forward(self, tokens, start_pos: int = 0, cache: Optional[list] = None, last_only: bool = False):
        """tokens: [B, S] int64 -> logits [B, S, vocab] (fp32). cache: from new_cache() (else the attached
        one from setup_cache(), if any). last_only: logits of the last position only ([B, 1, vocab]), what a
        prefill for generation needs (the output head is skipped for the others)."""
        B, S = tokens.shape
        if start_pos + S > self.args.max_seq_len:
            raise ValueError(f"sequence end {start_pos + S} exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope(start_pos + S)
        rot = rope_rotation(cos[start_pos : start_pos + S], sin[start_pos : start_pos + S])
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, start_pos, None if cache is None else cache[i])
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
