"""The lean decode path: one token (batch 1) through a whole stack of Llama layers in one kernel call.

A decode step of a small model through PyTorch modules pays microseconds of Python and dispatch for each of
its operations (a 135M-parameter model: about 1000 per token, more time than its int4 kernels take). A
DecodeStack runs the same step -- RMSNorm, q/k/v, RoPE, the KV cache, attention, wo, RMSNorm, w1/w3, SiLU, w2,
residuals, the final RMSNorm -- in C, on the same int4 row kernels and prepared activations as `ops.matmul`
(int8-decode or fp32-decode as `ops.plan_matmul` chooses), with the float parts in fp32 as quant4's model
computes them (equal to rounding).

This module holds the checks; quant4.models.fast_decode decides when a model can use it. A DecodeStack points
into the tensors it was built from (weights, norms, caches): it keeps them alive, and it must be rebuilt when
they change (build one per generation). Not for concurrent use.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from quant4 import ops


class DecodeLayer(NamedTuple):
    """One layer's weights and cache for DecodeStack: RMSNorm weights fp32 [dim]; projections as ops.Prepared
    (wq [H*D, dim], wk/wv [Hkv*D, dim], wo [dim, H*D], w1/w3 [hidden, dim], w2 [dim, hidden]); the key and
    value caches fp32 [Hkv, max_positions, D], contiguous."""
    attn_norm: torch.Tensor
    wq: ops.Prepared
    wk: ops.Prepared
    wv: ops.Prepared
    wo: ops.Prepared
    ffn_norm: torch.Tensor
    w1: ops.Prepared
    w3: ops.Prepared
    w2: ops.Prepared
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _check_vector(name: str, t, n: int) -> None:
    ops._check_tensor(name, t, ndim=1, dtypes=(torch.float32,))
    if t.shape[0] != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 vector of {n}, got shape {tuple(t.shape)}")


def _check_weight(name: str, w, out_features: int, in_features: int) -> None:
    if not isinstance(w, ops.Prepared):
        raise TypeError(f"{name} must be an ops.Prepared, got {type(w).__name__}")
    if (w.N, w.in_features) != (out_features, in_features):
        raise ValueError(f"{name} is [{w.N}, {w.in_features}], expected [{out_features}, {in_features}]")


class DecodeStack:
    """Decode steps through `layers` (DecodeLayer each), then the final RMSNorm `norm`.

    step(x, pos, cos, sin) takes the token's embedding x (fp32 [dim]) at position pos, writes the layers' keys
    and values for pos into their caches (positions < pos must hold the earlier tokens', as a prefill through
    the model leaves them) and returns the final normed hidden state, fp32 [dim] (a buffer the next step
    overwrites): what the output head multiplies.
    """

    def __init__(self, layers: Sequence[DecodeLayer], norm: torch.Tensor, *, n_heads: int, n_kv_heads: int,
                 head_dim: int, eps: float, activation: str = "float", num_threads: Optional[int] = None):
        layers = list(layers)
        if not layers:
            raise ValueError("DecodeStack needs at least one layer")
        ops.check_activation(activation)
        if activation not in ("float", "int8"):
            raise ValueError(f"DecodeStack runs activation 'float' or 'int8', got {activation!r}")
        self.activation, self.num_threads = activation, num_threads
        H, Hkv, D = (ops.check_int(n, v) for n, v in
                     (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)))
        if H % Hkv or D % 2:
            raise ValueError(f"n_heads={H} must be a multiple of n_kv_heads={Hkv}, head_dim={D} even")
        if not (isinstance(eps, float) and eps > 0):
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        dim = norm.shape[0] if isinstance(norm, torch.Tensor) and norm.dim() == 1 else None
        _check_vector("norm", norm, dim or 0)
        hidden = layers[0].w1.N if isinstance(layers[0].w1, ops.Prepared) else 0
        threads = ops._threads(num_threads)
        kc0 = layers[0].k_cache
        Tmax = kc0.shape[1] if isinstance(kc0, torch.Tensor) and kc0.dim() == 3 else 0
        kmax = 32
        for i, L in enumerate(layers):
            if not isinstance(L, DecodeLayer):
                raise TypeError(f"layer {i} must be a DecodeLayer, got {type(L).__name__}")
            _check_vector(f"layer {i} attn_norm", L.attn_norm, dim)
            _check_vector(f"layer {i} ffn_norm", L.ffn_norm, dim)
            for name, w, n, k in (("wq", L.wq, H * D, dim), ("wk", L.wk, Hkv * D, dim), ("wv", L.wv, Hkv * D, dim),
                                  ("wo", L.wo, dim, H * D), ("w1", L.w1, hidden, dim), ("w3", L.w3, hidden, dim),
                                  ("w2", L.w2, dim, hidden)):
                _check_weight(f"layer {i} {name}", w, n, k)
                kmax = max(kmax, w.Kp)
            if not L.wq.Kp == L.wk.Kp == L.wv.Kp or L.w1.Kp != L.w3.Kp:
                raise ValueError(f"layer {i}: weights sharing an input must have the same padded K "
                                 f"(q/k/v {L.wq.Kp}/{L.wk.Kp}/{L.wv.Kp}, w1/w3 {L.w1.Kp}/{L.w3.Kp}); "
                                 f"their group sizes pad it differently")
            for name, c in (("k_cache", L.k_cache), ("v_cache", L.v_cache)):
                ops._check_tensor(f"layer {i} {name}", c, ndim=3, dtypes=(torch.float32,))
                if tuple(c.shape) != (Hkv, Tmax, D) or not c.is_contiguous() or Tmax == 0:
                    raise ValueError(f"layer {i} {name} must be contiguous [{Hkv}, {Tmax or 'T'}, {D}], "
                                     f"got {tuple(c.shape)}")
        self.dim, self.head_dim, self.max_positions = dim, D, Tmax
        self._slab16 = any(w.slab16 for L in layers for w in (L.wq, L.wk, L.wv, L.wo, L.w1, L.w3, L.w2))
        self._epoch = ops.layout_epoch()    # a weight permuted since (Int4Linear.set_slab16_): rebuild
        self._keep = (layers, norm)          # everything the kernel state points into
        st = ops.decode_stack_state(len(layers), dim, hidden, H, Hkv, D, Tmax, kmax, eps, threads,
                                ops.MIN_ATTENTION_WORK)
        np_ = lambda t: t.detach().numpy()      # noqa: E731  (contiguous: checked above)
        for i, L in enumerate(layers):
            for which, ws in (("qkv", (L.wq, L.wk, L.wv)), ("wo", (L.wo,)), ("w13", (L.w1, L.w3)), ("w2", (L.w2,))):
                plan = ops.plan_matmul(1, ws[0].Kp, False, activation)
                rows = sum(w.N for w in ws)
                st.set_group(i, which, [(w.qweight, w.scales, w.zeros_for(plan.kernel), w.group_size, w.bias,
                                         w.zeros, w.slab16) for w in ws],
                             ops._threads(threads, rows * ws[0].Kp), plan.kernel == "int8-decode", plan.multi_row)
            st.set_layer(i, np_(L.attn_norm), np_(L.ffn_norm), np_(L.k_cache), np_(L.v_cache))
        st.set_norm(np_(norm))
        self._st = st
        self._out = torch.empty(dim)
        self.input = torch.empty(dim)       # step_at's embedding, filled by the caller
        self._np = (self.input.numpy(), self._out.numpy())
        self._rope = None

    def _check_layout(self) -> None:
        if ops._LAYOUT_EPOCH[0] != self._epoch:
            raise RuntimeError("a weight was permuted between layouts since this DecodeStack was built (e.g. by "
                               "reading an Int4Linear's qweight, or set_activation_): build a new one")

    def step(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self._check_layout()
        if not isinstance(pos, int) or not 0 <= pos < self.max_positions:
            raise ValueError(f"pos must be an int in [0, {self.max_positions}) (the caches' length), got {pos!r}")
        _check_vector("x", x, self.dim)
        _check_vector("cos", cos, self.head_dim // 2)
        _check_vector("sin", sin, self.head_dim // 2)
        self._st.step(x.detach().numpy(), pos, cos.detach().numpy(), sin.detach().numpy(), self._out.numpy())
        return self._out

    def bind_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Keep RoPE tables fp32 [T, head_dim / 2] (row p: position p) for step_at."""
        for name, t in (("cos", cos), ("sin", sin)):
            ops._check_tensor(name, t, ndim=2, dtypes=(torch.float32,))
            if t.shape[1] != self.head_dim // 2 or t.shape != cos.shape or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous [T, {self.head_dim // 2}] as the other, got "
                                 f"{tuple(t.shape)}")
        self._rope = (cos, sin)
        self._st.set_rope(cos.detach().numpy(), sin.detach().numpy())

    def step_at(self, pos: int) -> torch.Tensor:
        """step(self.input, pos, ...) with the RoPE rows of pos from the tables of bind_rope: the per-token call
        of a decode loop, without re-checking what was checked once (pos is checked in the kernel module)."""
        if ops._LAYOUT_EPOCH[0] != self._epoch:
            self._check_layout()
        self._st.step_at(self._np[0], pos, self._np[1])
        return self._out

    def prefill(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The M embeddings x (fp32 [M, dim], M > ops.SMALL_M) at positions pos..pos+M-1 through the layers in one
        call, as the model's forward computes them on the prefill kernels ops.plan_matmul chooses (causal
        attention; the caches must hold positions < pos and get pos..pos+M-1): the final normed hidden state of
        the last position, fp32 [dim] (a buffer the next call overwrites). cos/sin: the RoPE rows of those
        positions, fp32 [M, head_dim / 2]."""
        self._check_layout()
        ops._check_tensor("x", x, ndim=2, dtypes=(torch.float32,))
        M = x.shape[0]
        if M <= ops.SMALL_M or x.shape[1] != self.dim or not x.is_contiguous():
            raise ValueError(f"x must be contiguous [M, {self.dim}] with M > {ops.SMALL_M} (fewer rows: step), "
                             f"got shape {tuple(x.shape)}")
        if not isinstance(pos, int) or not 0 <= pos <= self.max_positions - M:
            raise ValueError(f"positions {pos!r}..+{M} must lie in [0, {self.max_positions}) (the caches' length)")
        for name, t in (("cos", cos), ("sin", sin)):
            ops._check_tensor(name, t, ndim=2, dtypes=(torch.float32,))
            if tuple(t.shape) != (M, self.head_dim // 2) or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous [{M}, {self.head_dim // 2}], got {tuple(t.shape)}")
        int8 = self.activation == "int8" and ops.plan_matmul(M, self.dim, False, "int8").kernel == "int8-prefill"
        if self._slab16 and not int8:
            raise ValueError("weights in the slab16 layout prefill on the int8 kernel only")
        self._st.prefill(x.detach().numpy(), pos, cos.detach().numpy(), sin.detach().numpy(), self._out.numpy(),
                         int8)
        return self._out


class Int8Head:
    """An 8-bit copy of a float output head for int8-activation decode (AVX512-VNNI or AVX2;
    ops.int8_head_available): codes round(w / d) + 128 with one fp32 scale d = absmax / 127 per 32 inputs
    (Q8_0's rounding), 1.125 bytes per weight against the float head's 4, multiplied with the hidden state
    rounded to int8 per 32 values, as the int4 layers' inputs are in that mode. A runtime copy beside the float
    weight (which forward keeps using), never saved; matches(weight) says whether it still is a copy of
    `weight` (same storage, shape and in-place version)."""

    def __init__(self, weight: torch.Tensor, num_threads: Optional[int] = None):
        if not ops.int8_head_available():
            raise RuntimeError("the 8-bit head needs a CPU with AVX512-VNNI or AVX2 and that kernel build")
        self.codes, self.scales = ops.head_int8_quantize(weight, num_threads)
        self.num_threads = num_threads
        self._source = self._key(weight)
        self._out = torch.empty(weight.shape[0])

    @staticmethod
    def _key(weight: torch.Tensor):
        return weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight._version

    def matches(self, weight: torch.Tensor) -> bool:
        return self._key(weight) == self._source

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """logits fp32 [vocab] for the hidden state h (fp32 [dim]); a buffer the next call overwrites."""
        return ops.head_int8_matvec(h, self.codes, self.scales, self._out, self.num_threads)
