"""Validated torch-facing wrappers around quant4's Cython kernels.

All argument checks live here; the kernels assume valid input. This is the only module that imports the
compiled extension. At import it picks the widest kernel build this CPU runs (AVX-512, AVX2, baseline);
QUANT4_ISA=generic|avx2|avx512 overrides the choice.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import threading
import weakref
from typing import NamedTuple, Optional

import numpy as np

import torch
from quant4.options import ACTIVATIONS, METHODS  # noqa: F401  (re-exported)
import torch.nn.functional as F

from quant4 import _kernels as _base
from quant4 import memory
from quant4.machine import runnable_elsewhere
from quant4.scheme import GROUP_SIZES, padded_k, qparams_from_minmax

_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}
_MODULES = {"generic": "quant4._kernels", "avx2": "quant4._kernels_avx2", "avx512": "quant4._kernels_avx512"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_num_threads: Optional[int] = None


def choose_isa(level: int, requested: str = "") -> list:
    """The kernel builds to try, best first, for a CPU of `level` (q4_cpu_level: 2 AVX-512, 1 AVX2, 0 other)
    and a QUANT4_ISA request ("" for none)."""
    requested = requested.strip().lower()
    if requested:
        if requested not in _LEVELS:
            raise ValueError(f"QUANT4_ISA={requested!r}: expected one of {sorted(_LEVELS)}")
        if _LEVELS[requested] > level:
            raise ValueError(f"QUANT4_ISA={requested!r}: this CPU does not support it")
        return [requested]
    return [name for name, lv in sorted(_LEVELS.items(), key=lambda kv: -kv[1]) if lv <= level]


def _load_kernels():
    requested = os.environ.get("QUANT4_ISA", "")
    for name in choose_isa(_base.cpu_level(), requested):
        try:
            return importlib.import_module(_MODULES[name])
        except ImportError:
            if requested.strip():
                raise
    return _base


_k = _load_kernels()
# bf16 activations in prefill use the AVX512-BF16 kernel when this build and CPU have it
# (QUANT4_DISABLE_BF16=1 turns it off: bf16 inputs then take the fp32 kernel).
_BF16 = _k.bf16_available() and os.environ.get("QUANT4_DISABLE_BF16") != "1"


_INT8 = _k.int8_available()
_INT8_PREFILL = _k.int8_prefill_available()
_INT8_HEAD = _k.int8_head_available()
# The slab16 layout of int8-activation weights (AVX512-VNNI): QUANT4_DISABLE_SLAB16=1 keeps every weight in rows
_SLAB16 = _k.slab16_available() and os.environ.get("QUANT4_DISABLE_SLAB16") != "1"


def int8_kernel_available() -> bool:
    """True if activation="int8" decode runs on an int8 kernel (AVX512-VNNI or AVX2; else it falls back to "float")."""
    return _INT8


def int8_prefill_kernel_available() -> bool:
    """True if activation="int8" prefill (M > 4) runs on the int8 kernel (AVX512-VNNI; else on the exact one)."""
    return _INT8_PREFILL


def slab16_available() -> bool:
    """True if int8-activation weights can be held in the slab16 layout here (AVX512-VNNI; see permute_slab16_)."""
    return _SLAB16


def _check_slab16_args(qweight, scales, zeros):
    for name, t, dtype in (("qweight", qweight, torch.uint8), ("scales", scales, torch.float16),
                           ("zeros", zeros, torch.float16)):
        _check_tensor(name, t, ndim=2, dtypes=(dtype,))
        if not t.is_contiguous() or t.requires_grad:
            raise ValueError(f"{name} must be contiguous and not require grad")
    N = qweight.shape[0]
    if scales.shape != zeros.shape or scales.shape[0] != N or qweight.shape[1] % 16:
        raise ValueError(f"qweight {tuple(qweight.shape)} (columns a multiple of 16), scales {tuple(scales.shape)} "
                         f"and zeros {tuple(zeros.shape)} do not form one weight")


def permute_slab16_(qweight, scales, zeros, to_slab16: bool, num_threads: Optional[int] = None) -> None:
    """Permute a weight's stored tensors in place between quant4's row layout (the stored format) and slab16,
    the layout of the int8-activation kernels (_q4avx512.h: 16 rows in vector lanes), or back: exact both ways.
    Each tensor's version counter moves, so every Prepared of the old layout stops matching. The caller owns
    the decision (quant4.nn.Int4Linear keeps the layout with the module and saves the row layout)."""
    _check_slab16_args(qweight, scales, zeros)
    _k.permute_slab16(qweight.numpy(), _half_bits(scales), _half_bits(zeros), bool(to_slab16),
                      _threads(num_threads, qweight.numel()))
    _LAYOUT_EPOCH[0] += 1
    with torch.no_grad():
        for t in (qweight, scales, zeros):
            if not t.is_inference():    # (inference tensors have no version counter: never cached by it)
                t.view(-1)[:0].zero_()  # an in-place write of nothing: the version counter moves


# Counts permute_slab16_ calls: what holds raw pointers into weights (quant4.decode.DecodeStack) checks it
_LAYOUT_EPOCH = [0]


def layout_epoch() -> int:
    """How many times a weight was permuted between layouts (permute_slab16_) in this process."""
    return _LAYOUT_EPOCH[0]


def rows_of_slab16(qweight, scales, zeros):
    """Copies of a slab16 weight's tensors in the row layout (the stored format), the tensors unchanged: the
    inverse permutation as tensor reshapes (traceable: a compiled backward uses it)."""
    N, ldq, G = qweight.shape[0], qweight.shape[1], scales.shape[1]
    n = N // 16 * 16

    def back(t, shape, order):
        head = t[:n].reshape(shape).permute(order).reshape(n, t.shape[1])
        return torch.cat([head, t[n:]]) if n < N else head.contiguous()
    return (back(qweight, (N // 16, ldq // 16, 4, 16, 4), (0, 3, 1, 2, 4)),
            back(scales, (N // 16, G, 16), (0, 2, 1)), back(zeros, (N // 16, G, 16), (0, 2, 1)))


def bf16_kernel_enabled() -> bool:
    """True if bf16 activations run on the AVX512-BF16 kernels (see plan_matmul)."""
    return _BF16


def kernel_isa() -> str:
    """The instruction set of the kernel build in use: 'avx512', 'avx2' or 'generic'."""
    return _k.build_isa()


def openmp_enabled() -> bool:
    """True if the kernels were built with OpenMP (parallel loops)."""
    return bool(_k.openmp_enabled())


def check_int(name: str, v, lo: int = 1, hi: Optional[int] = None) -> int:
    """v if it is an int (not a bool) in lo..hi, else ValueError naming `name`: the one integer check of the
    public API, the file readers and the model config."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        what = (f"an int in {lo}..{hi}" if hi is not None else "a positive int" if lo == 1 else f"an int >= {lo}")
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return v


# More threads than this only oversubscribe the CPU; tens of thousands make OpenMP abort the process.
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def check_num_threads(n, *, allow_none: bool = False) -> Optional[int]:
    """n, if it is a thread count quant4 accepts: a positive int up to MAX_THREADS (or None if allow_none)."""
    if n is None and allow_none:
        return None
    return check_int("num_threads", n, 1, MAX_THREADS)


def set_num_threads(n: Optional[int]) -> None:
    """Default thread count for quant4's kernels; None follows torch.get_num_threads()."""
    global _num_threads
    _num_threads = check_num_threads(n, allow_none=True)


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else min(torch.get_num_threads(), MAX_THREADS)


def spinning_wait_policy() -> bool:
    """True if OpenMP's idle threads spin (libgomp's default; OMP_WAIT_POLICY=PASSIVE or GOMP_SPINCOUNT=0 make
    them sleep): with another busy process, spinning threads take its CPU time and decode slows 10-30x."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    return policy != "PASSIVE" and os.environ.get("GOMP_SPINCOUNT", "").strip() not in ("0", "0.0")


_warned_oversubscribed = False


def warn_if_oversubscribed(read=None) -> bool:
    """Warn once per process when quant4's threads plus other runnable tasks exceed the CPUs (models.generate
    checks before each generation); returns True if it warned now."""
    global _warned_oversubscribed
    if _warned_oversubscribed:
        return False
    threads, cpus = get_num_threads(), os.cpu_count() or 1
    others = runnable_elsewhere(threads, read)
    if others is None or others == 0 or others + threads <= cpus:
        return False
    _warned_oversubscribed = True
    fix = ("set OMP_WAIT_POLICY=PASSIVE before importing torch (quant4's command-line tools do), or use fewer "
           "threads" if spinning_wait_policy() else "use fewer threads (quant4.set_num_threads / --threads)")
    import warnings

    warnings.warn(f"quant4: {threads} threads and about {others} other runnable task(s) share {cpus} CPUs; "
                  f"OpenMP kernels slow down sharply when the CPUs are oversubscribed: {fix}", RuntimeWarning,
                  stacklevel=3)
    return True


# Below this much work per thread (multiply-adds or weights), waking another thread costs more than it saves.
# Was 1 << 18 until session 14: a 135M-shaped model's 576 x 576 wo then ran on one thread; 1 << 16 made its lean
# decode step 0.86-0.87x as long (with MIN_ATTENTION_WORK below; in turns, one process, docs/speed.md).
MIN_WORK_PER_THREAD = 1 << 16
# Below this much attention work in all (heads x positions x head_dim), the lean decode step attends on one thread
MIN_ATTENTION_WORK = 1 << 13


def _threads(num_threads: Optional[int], work: Optional[int] = None) -> int:
    """Thread count for one kernel call: the explicit or default count, capped so each thread gets
    at least MIN_WORK_PER_THREAD of work (results do not depend on the thread count)."""
    num_threads = get_num_threads() if num_threads is None else check_num_threads(num_threads)
    if work is not None:
        num_threads = max(1, min(num_threads, work // MIN_WORK_PER_THREAD))
    return num_threads


# ------------------------------------------------------------------------------------------------
# checks

def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return group_size


def _check_tensor(name: str, t, *, ndim: int, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TypeError(f"{name} must be on the CPU, got device {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_packed(qweight, scales, zeros, group_size: int, in_features: int):
    """Check stored tensors against each other and the metadata; return (N, Kp, G)."""
    check_group_size(group_size)
    check_int("in_features", in_features)
    _check_tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,))
    _check_tensor("scales", scales, ndim=2, dtypes=(torch.float16,))
    _check_tensor("zeros", zeros, ndim=2, dtypes=(torch.float16,))
    Kp = padded_k(in_features, group_size)
    N, G = qweight.shape[0], Kp // group_size
    if tuple(qweight.shape) != (N, Kp // 2):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match in_features={in_features}, "
                         f"group_size={group_size}: expected ({N}, {Kp // 2})")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match qweight {tuple(qweight.shape)} "
                             f"and group_size={group_size}: expected ({N}, {G})")
    return N, Kp, G


def _as_np(t: torch.Tensor):
    return t.contiguous().numpy()


def _half_bits(t: torch.Tensor):
    """float16 / bfloat16 tensor -> numpy uint16 view of its bits."""
    return t.contiguous().view(torch.int16).numpy().view("uint16")


# ------------------------------------------------------------------------------------------------
# public ops

# shrink fractions of a group's range tried by method="search" (both ends, 6 x 6 candidates; the kernel takes up
# to 39 besides round to nearest). The 7 x 7 grid (0, .03, .06, .09, .12, .16, .2) gave the same KL with refit
# on both test models (measured on training text) at 1.3x the time.
SEARCH_GRID = (0.0, 0.03, 0.06, 0.1, 0.14, 0.2)
# least-squares refits of scale and zero to the codes by method="refit" (each keeps the best pair seen)
REFIT_ROUNDS = 6


def quantize(weight: torch.Tensor, group_size: int, *, num_threads: Optional[int] = None, method: str = "rtn"):
    """weight [N, K] (fp32/bf16/fp16) -> (qweight uint8 [N, Kp/2], scales fp16 [N, G], zeros fp16 [N, G]).

    method="rtn": scale and zero from the group's min and max (quant4.scheme). method="search": per group,
    the clipped range [min + a*range, max - b*range] (a, b in SEARCH_GRID) whose float16 scale and zero give
    the smallest squared reconstruction error; never worse than "rtn" on any group. method="refit": the search,
    then least-squares refits of scale and zero for the codes they give (REFIT_ROUNDS rounds: per group, fit
    s = cov(q, w) / var(q) and m = mean(w) - s mean(q), round to float16, recompute the codes, keep the best
    pair seen); never worse than the search on any group. Codes are then computed from the chosen scale and zero exactly as for "rtn".
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_group_size(group_size)
    _check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    nt = _threads(num_threads, N * K)
    w = weight.detach().float().contiguous()
    Kp = padded_k(K, group_size)
    G = Kp // group_size
    mins = torch.empty(N, G)
    maxs = torch.empty(N, G)
    nonfinite = torch.empty(N, dtype=torch.uint8)
    _k.group_minmax(_as_np(w), group_size, mins.numpy(), maxs.numpy(), nonfinite.numpy(), nt)
    if nonfinite.any():
        row = int(nonfinite.nonzero()[0])
        col = int((~torch.isfinite(w[row])).nonzero()[0])
        raise ValueError(f"weight has a non-finite value ({float(w[row, col])}) at {(row, col)}; "
                         f"quant4 refuses NaN/Inf weights")
    scales16, zeros16, m = qparams_from_minmax(mins, maxs)
    if method in ("search", "refit"):
        s32, z32 = scales16.float(), zeros16.float()
        _k.search_qparams(_as_np(w), group_size, torch.tensor(SEARCH_GRID, dtype=torch.float32).numpy(),
                          s32.numpy(), z32.numpy(), nt)
        scales16, zeros16 = s32.to(torch.float16), z32.to(torch.float16)
        if method == "refit":
            s32, z32 = scales16.float(), zeros16.float()
            _k.refit_qparams(_as_np(w), group_size, REFIT_ROUNDS, s32.numpy(), z32.numpy(), nt)
            scales16, zeros16 = s32.to(torch.float16), z32.to(torch.float16)
        m = zeros16.float() - 8 * scales16.float()
    qweight = torch.empty(N, Kp // 2, dtype=torch.uint8)
    _k.quantize_pack(_as_np(w), _as_np(m), _as_np(scales16.float()), group_size, qweight.numpy(), nt)
    return qweight, scales16, zeros16


def unpack(qweight: torch.Tensor, *, num_threads: Optional[int] = None) -> torch.Tensor:
    """uint8 [N, Kp/2] -> codes uint8 [N, Kp] (values 0..15)."""
    _check_tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,))
    q = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.uint8)
    _k.unpack(_as_np(qweight), q.numpy(), _threads(num_threads))
    return q


def dequantize(qweight, scales, zeros, group_size: int, in_features: int, *,
               num_threads: Optional[int] = None) -> torch.Tensor:
    """Stored tensors -> fp32 weight [N, in_features]."""
    N, _, _ = check_packed(qweight, scales, zeros, group_size, in_features)
    out = torch.empty(N, in_features)
    _k.dequantize(_as_np(qweight), _as_np(scales.float()), _as_np(zeros.float()), group_size, out.numpy(),
                  _threads(num_threads, N * in_features))
    return out


def check_activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _tensor_key(t):
    """What a kernel view of `t` depends on: its memory address, shape and strides, and its version counter
    (bumped by every in-place write; tensors made under inference_mode have none: -1)."""
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return t.data_ptr(), t.shape, t.stride(), version


class Prepared:
    """Validated stored tensors with the kernel's views of them, made once per weight (Int4Linear caches
    one): a forward call then only checks its input.

    The views alias the tensors' memory, so a Prepared is valid exactly while `matches` holds: the same memory,
    shape and strides, and no in-place write since (version counter). Anything else -- load_state_dict,
    .data = ..., set_(), share_memory_(), a copied or unpickled module -- fails the check and forces a rebuild.
    """

    __slots__ = ("keys", "qweight", "scales", "zeros", "bias", "N", "Kp", "group_size", "in_features", "plans",
                 "_symmetric", "slab16")

    def __init__(self, qweight, scales, zeros, group_size: int, in_features: int, bias=None, *, slab16: bool = False):
        self.N, self.Kp, _ = check_packed(qweight, scales, zeros, group_size, in_features)
        if slab16 and not slab16_available():
            raise ValueError("the slab16 layout needs the AVX512-VNNI kernels (ops.slab16_available())")
        self.slab16 = bool(slab16)   # the tensors are permuted into the slab16 layout (permute_slab16_)
        if bias is not None:
            _check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
            if bias.shape[0] != self.N:
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={self.N}")
        self.keys = tuple(_tensor_key(t) for t in (qweight, scales, zeros, bias))
        self.qweight = _as_np(qweight)
        self.scales, self.zeros = _half_bits(scales), _half_bits(zeros)
        self.bias = None if bias is None else _as_np(bias.detach().float())
        self.group_size, self.in_features = group_size, in_features
        self.plans = {}       # (M <= SMALL_M, activation, threads) -> (kernel code, multi_row, threads, zeros)
        self._symmetric = None

    def matches(self, qweight, scales, zeros, bias) -> bool:
        # on every forward call: about 4 us for the four tensors
        return self.keys == (_tensor_key(qweight), _tensor_key(scales), _tensor_key(zeros), _tensor_key(bias))

    def zeros_for(self, kernel: str):
        """The zeros argument of the kernel `kernel`: None when every stored zero is 0 (+-0: symmetric weights,
        e.g. a GGUF Q4_0 import) and the kernel is a decode kernel that then skips the zero stream (10% of a g32
        weight's bytes), else the zeros. Checked once per Prepared, on first use."""
        if kernel not in _ZERO_FREE_KERNELS:
            return self.zeros
        if self._symmetric is None:
            self._symmetric = not (self.zeros & 0x7FFF).any()
        return None if self._symmetric else self.zeros


_ZERO_FREE_KERNELS = ("int8-decode", "bf16-decode")      # read zr == NULL as "every zero is 0"


# Kernel views for callers that hold no module to cache them on (the custom op quant4::linear, which sees only
# tensors): one Prepared per qweight tensor, found by identity, checked with Prepared.matches on every call. The
# entry must not keep qweight alive (or no model would ever be freed): its qweight view is a raw pointer view,
# used only while `matches` confirms the tensor's memory is unchanged, and the entry is dropped when qweight dies.
_PREPARED: dict = {}
_PREPARED_LOCK = threading.Lock()


def _drop_prepared(key: int, ref) -> None:
    with _PREPARED_LOCK:
        entry = _PREPARED.get(key)
        if entry is not None and entry[0] is ref:
            del _PREPARED[key]


def prepared_for(qweight, scales, zeros, group_size: int, in_features: int, bias=None, *,
                 slab16: bool = False) -> Prepared:
    """The Prepared of these stored tensors, cached per qweight tensor (see above). Inference tensors (made under
    torch.inference_mode) have no version counter, so an in-place write to them leaves nothing to check a cached
    Prepared against: they get a fresh one on every call. slab16: the tensors are in that layout."""
    if any(t is not None and (not isinstance(t, torch.Tensor) or t.is_inference())
           for t in (qweight, scales, zeros, bias)):
        return Prepared(qweight, scales, zeros, group_size, in_features, bias, slab16=slab16)  # (rejects non-tensors)
    entry = _PREPARED.get(id(qweight))
    if entry is not None:
        ref, p = entry
        if (ref() is qweight and p.group_size == group_size and p.in_features == in_features
                and p.slab16 == bool(slab16) and p.matches(qweight, scales, zeros, bias)):
            return p
    p = Prepared(qweight, scales, zeros, group_size, in_features, bias, slab16=slab16)
    if qweight.is_contiguous() and qweight.numel():     # else p holds a copy, which does not reference qweight
        raw = (ctypes.c_uint8 * qweight.numel()).from_address(qweight.data_ptr())
        p.qweight = np.frombuffer(raw, dtype=np.uint8).reshape(qweight.shape)
    key = id(qweight)
    ref = weakref.ref(qweight, lambda r, key=key: _drop_prepared(key, r))
    with _PREPARED_LOCK:
        _PREPARED[key] = (ref, p)
    return p


class Plan(NamedTuple):
    kernel: str          # "int8-decode", "bf16-decode", "fp32-decode", "int8-prefill", "bf16-prefill" or "fp32-prefill"
    multi_row: bool      # fp32-decode at M = 1: Q4_DR weight rows share each activation load


# Kernel thresholds, measured on 7B-shaped layers (README "Speed"); each is used in exactly one row below.
SMALL_M = 4                  # decode kernels up to this many activation rows (see below)
FP32_ROW_IN_L1 = 6144        # an fp32 activation row of up to 6144 inputs (24 KB) leaves L1 (32 KB) room
BF16_DECODE_4ROWS_K = 6144   # four bf16 activation rows past this K crowd L1 in the bf16 decode kernel


def plan_matmul(M: int, Kp: int, bf16_inputs: bool, activation: str, small_m: int = SMALL_M) -> Plan:
    """The kernel one matmul call runs: the one place quant4 chooses. The first row that applies wins.
    bf16_inputs: the activations reach the kernel in bf16 (bf16 x, or activation="bf16"), on a CPU whose build
    has the AVX512-BF16 kernels."""
    decode = M <= small_m
    # int8 activations (opt-in): one vpdpbusd per 32 weights (AVX2: vpmaddubsw + vpmaddwd), each weight row's
    # codes unpacked once for up to 4 activation rows; 0.9-1.5x torch's bf16 op at M = 1..4 and 2-3x the fp32
    # decode kernel at M = 2..4 (prefill below).
    if activation == "int8" and _INT8 and M <= min(small_m, 4):
        return Plan("int8-decode", False)
    # bf16 decode, exact weights via vdpbf16ps: 1.4-1.9x the fp32 kernel at M = 1..2 and 1.35-1.66x at M = 3..4,
    # but 0.9x at M = 3..4 past BF16_DECODE_4ROWS_K; needs whole 128-input runs.
    if bf16_inputs and M <= min(small_m, 4) and Kp % 128 == 0 and (M <= 2 or Kp <= BF16_DECODE_4ROWS_K):
        return Plan("bf16-decode", False)
    # fp32 decode: stream each weight row once (re-reading the activations per row); equal to the prefill kernel
    # at M = 5..8, 1.8x slower at M = 16. At M = 1 a long activation row is shared by Q4_DR weight rows.
    if decode:
        return Plan("fp32-decode", M == 1 and Kp > FP32_ROW_IN_L1)
    # prefill with int8 activations (AVX512-VNNI): panels repacked for vpdpbusd, 16 output columns per
    # instruction; 1.5-4.5x the fp32 prefill kernel and 1.2-1.7x the bf16 one at M = 8..512 (7B shapes)
    if activation == "int8" and _INT8_PREFILL:
        return Plan("int8-prefill", False)
    # prefill: panels dequantized to bf16 and vdpbf16ps (torch's int4 op precision for bf16 inputs) ...
    if bf16_inputs:
        return Plan("bf16-prefill", False)
    # ... or to fp32 and register-tiled FMAs.
    return Plan("fp32-prefill", False)


def matmul(x: torch.Tensor, qweight, scales, zeros, group_size: int, in_features: int, bias=None, *,
           num_threads: Optional[int] = None, small_m: int = SMALL_M, activation: str = "float") -> torch.Tensor:
    """y [M, N] = x [M, in_features] . dequantize(w)^T (+ bias), fp32 accumulation, in x's dtype.

    activation="int8" (opt-in) quantizes the activations to int8 per 32-input block for decode (M <= 4) on
    CPUs with AVX512-VNNI or AVX2, and for prefill (M > 4) on AVX512-VNNI: faster, slightly less exact (see
    README); otherwise ignored. activation="bf16" (opt-in) rounds fp32/fp16 activations to
    bfloat16 and computes as for bf16 inputs (on CPUs with AVX512-BF16; else ignored), the result returned in
    x's dtype: the bf16 kernels' speed for fp32 models, at the cost of that one rounding.
    """
    # the Prepared cached per qweight tensor: its checks (and the one-time scan for symmetric zeros, 0.2-0.3 ms
    # on an 11008 x 4096 weight) are not repeated on every call
    return matmul_prepared(x, prepared_for(qweight, scales, zeros, group_size, in_features, bias),
                           num_threads=num_threads, small_m=small_m, activation=activation)


def matmul_prepared(x: torch.Tensor, w: Prepared, *, num_threads: Optional[int] = None, small_m: int = SMALL_M,
                    activation: str = "float") -> torch.Tensor:
    """matmul() for a Prepared weight."""
    return matmul_prepared_many(x, (w,), num_threads=num_threads, small_m=small_m, activation=activation)[0]


def int8_head_available() -> bool:
    """True if an 8-bit output head (quant4.decode.Int8Head) runs here (AVX512-VNNI or AVX2)."""
    return _INT8_HEAD


def head_int8_quantize(w: torch.Tensor, num_threads: Optional[int] = None):
    """A float head [V, D] (fp32, D % 32 == 0) -> (codes uint8 [V, D] = round(w / d) + 128, d fp32 [V, D/32]
    with d = absmax / 127 per 32 inputs), converted in slices of rows (no fp32 copy of the whole head)."""
    _check_tensor("w", w, ndim=2, dtypes=(torch.float32,))
    V, D = w.shape
    if D % 32:
        raise ValueError(f"an 8-bit head needs in_features divisible by 32, got weight shape {tuple(w.shape)}")
    wu, dw = memory.empty((V, D), torch.uint8), memory.empty((V, D // 32), torch.float32)
    step = max(1, (16 << 20) // max(1, 4 * D))
    for r0 in range(0, V, step):
        _k.q8_quantize_rows(w[r0:r0 + step].detach().contiguous().numpy(), wu[r0:r0 + step].numpy(),
                            dw[r0:r0 + step].numpy(), _threads(num_threads, min(step, V - r0) * D))
    return wu, dw


def head_int8_matvec(x: torch.Tensor, wu: torch.Tensor, dw: torch.Tensor, out: torch.Tensor,
                     num_threads: Optional[int] = None) -> torch.Tensor:
    """out [V] = the 8-bit head (head_int8_quantize) times x (fp32 [D], rounded to int8 per 32 inputs)."""
    V, D = wu.shape
    _check_tensor("x", x, ndim=1, dtypes=(torch.float32,))
    if x.shape[0] != D or not x.is_contiguous() or out.shape != (V,) or dw.shape != (V, D // 32):
        raise ValueError(f"head_int8_matvec: x {tuple(x.shape)}, codes {tuple(wu.shape)}, scales "
                         f"{tuple(dw.shape)}, out {tuple(out.shape)} do not fit")
    _k.q8_matvec(x.detach().numpy(), wu.numpy(), dw.numpy(), out.numpy(), _threads(num_threads, V * D))
    return out


def head_int8_matmul_float(x: torch.Tensor, wu: torch.Tensor, dw: torch.Tensor,
                           num_threads: Optional[int] = None) -> torch.Tensor:
    """x (fp32 [M, D], as given) times an 8-bit weight (head_int8_quantize's codes and scales) -> fp32 [M, V]:
    per 32-input block sum x (code - 128), times the block's scale, summed; reads each weight row once for
    all M rows (for a few rows: 5.6x the dequantize-then-multiply path on 32000 x 4096)."""
    V, D = wu.shape
    _check_tensor("x", x, ndim=2, dtypes=(torch.float32,))
    if x.shape[1] != D or dw.shape != (V, D // 32):
        raise ValueError(f"head_int8_matmul_float: x {tuple(x.shape)}, codes {tuple(wu.shape)}, scales "
                         f"{tuple(dw.shape)} do not fit")
    out = torch.empty(x.shape[0], V)
    _k.q8_matvec_f32(x.detach().contiguous().numpy(), wu.numpy(), dw.numpy(), out.numpy(),
                     _threads(num_threads, x.shape[0] * V * D))
    return out


def decode_stack_state(*args):
    """The kernels' raw state of a one-token decode through a stack of layers, for quant4.decode.DecodeStack
    (which checks everything it is given)."""
    return _k.DecodeStack(*args)


def _check_layout(w: Prepared, kernel: str) -> None:
    if w.slab16 and not kernel.startswith("int8"):
        raise ValueError(f"a weight in the slab16 layout runs on the int8 kernels only (activation='int8'), not "
                         f"{kernel}; permute it back to rows first (quant4.nn.Int4Linear does this itself)")


def _matmul_fp32_direct(x, ws, num_threads, activation) -> list:
    """matmul_prepared_many's common case -- contiguous fp32 activations, K a whole number of groups, "float" or
    "int8" -- with the kernel choice cached per weight: the same kernels and results, less Python per call."""
    M = x.shape[0]
    threads = get_num_threads() if num_threads is None else num_threads
    xk = x.detach().numpy()
    outs = []
    for w in ws:
        plan = w.plans.get((M, activation, threads))
        if plan is None:
            p = plan_matmul(M, w.Kp, False, activation)
            _check_layout(w, p.kernel)
            plan = (_k.KERNELS[p.kernel], p.multi_row, _threads(threads, M * w.N * w.Kp), w.zeros_for(p.kernel))
            if M <= SMALL_M:        # decode shapes only: one entry per prompt length would grow without bound
                w.plans[M, activation, threads] = plan
        out = torch.empty(M, w.N)
        if w.N:
            _k.matmul(xk, w.qweight, w.scales, plan[3], w.group_size, w.bias, out.numpy(), plan[0], plan[1], plan[2],
                      w.slab16)
        outs.append(out)
    return outs


def matmul_prepared_many(x: torch.Tensor, ws, *, num_threads: Optional[int] = None, small_m: int = SMALL_M,
                         activation: str = "float") -> list:
    """[matmul_prepared(x, w) for w in ws] for weights with the same in_features and padded K (e.g. the q, k, v
    projections): x is checked and converted for the kernels once, and the kernels run back to back."""
    w0 = ws[0]
    if (type(x) is torch.Tensor and x.dtype is torch.float32 and small_m == SMALL_M and x.is_cpu
            and (activation == "float" or activation == "int8") and x.dim() == 2 and x.shape[0]
            and x.shape[1] == w0.Kp == w0.in_features and x.is_contiguous()
            and all(w.Kp == w0.Kp and w.in_features == w0.in_features for w in ws)):
        return _matmul_fp32_direct(x, ws, num_threads, activation)
    check_activation(activation)
    _check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    for w in ws:
        if x.shape[1] != w.in_features:
            raise ValueError(f"x has {x.shape[1]} features (shape {tuple(x.shape)}), expected in_features={w.in_features}")
        if w.Kp != w0.Kp:
            raise ValueError(f"matmul_prepared_many: padded K {w.Kp} differs from {w0.Kp}")
    M, Kp = x.shape[0], w0.Kp
    out_dtype = x.dtype
    if M == 0:
        return [torch.empty(0, w.N, dtype=out_dtype) for w in ws]
    if activation == "bf16" and _BF16 and x.dtype != torch.bfloat16:
        x = x.detach().to(torch.bfloat16)       # the option: round the inputs, then compute as for bf16 ones
    plan = plan_matmul(M, Kp, _BF16 and x.dtype == torch.bfloat16, activation, small_m)
    # .bfloat16() / .float(): no copy when x already has that dtype (cheaper than .to(dtype) per call)
    xk = x.detach().bfloat16() if plan.kernel.startswith("bf16") else x.detach().float()
    if Kp != w0.in_features:
        xk = F.pad(xk, (0, Kp - w0.in_features))
    xk = xk.contiguous()
    xk = _half_bits(xk) if xk.dtype == torch.bfloat16 else xk.numpy()
    kernel = _k.KERNELS[plan.kernel]
    outs = []
    for w in ws:
        _check_layout(w, plan.kernel)
        out = torch.empty(M, w.N)
        if w.N:
            _k.matmul(xk, w.qweight, w.scales, w.zeros_for(plan.kernel), w.group_size, w.bias, out.numpy(), kernel,
                      plan.multi_row, _threads(num_threads, M * w.N * Kp), w.slab16)
        outs.append(out if out_dtype == torch.float32 else out.to(out_dtype))
    return outs
