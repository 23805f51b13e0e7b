# Cython kernels for quant4: group-wise int4 quantize+pack, unpack, dequantize and matmul.
#
# This module knows nothing of torch: it works on typed memoryviews and raw pointers. All checks on
# shapes, dtypes and values live in quant4/ops.py; the wrappers here assume validated input and never
# raise inside a parallel region. Compiler directives are set once, in setup.py.
#
# Stored layout read and written here (see README "Stored format"):
#   qweight uint8 [N, Kp/2]: byte i of row n holds k = 2i in the low nibble, k = 2i+1 in the high nibble
#   scales, zeros [N, G] (G = Kp / group_size), float16 in storage; w = (q - 8) * scale + zero
# Kp is K rounded up to whole groups; padded nibbles are 0 and meet zero activations.
#
# Every output element is computed by one thread in a fixed order, so results do not depend on the thread
# count or the schedule. Decode loops are static: each thread streams one contiguous share of the weights,
# which the hardware prefetchers follow (dynamic chunks of 32 rows measured 20% slower at M = 1). Compute-
# bound loops (prefill blocks, quantization rows) are dynamic, so a preempted thread does not hold the
# others at the barrier.
#
# The same source is compiled once per ISA (setup.py: _kernels, _kernels_avx2, _kernels_avx512);
# quant4/ops.py picks the widest one the CPU supports at import time.

from cython.parallel cimport prange, parallel
from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from libc.math cimport rintf, fminf, fmaxf, fabsf

cdef extern from "_q4util.h" nogil:
    int q4_openmp_enabled() noexcept
    int q4_cpu_level() noexcept
    const char *q4_build_isa() noexcept
    float q4_half_to_float(uint16_t h) noexcept
    float q4_round_half(float f) noexcept


cdef enum:
    NB = 16         # weight rows per prefill task: 16 rows x KCMAX floats = 128 KB of scratch (L2)
    KCMAX = 2048    # prefill k panel; a multiple of every group size, long enough to amortize the
                    # 16 horizontal sums that end each 4 x 4 tile
    NB8 = 64        # weight rows per int8- and bf16-prefill task (4 slabs of 16)
    KC8 = 2048      # int8-prefill k panel (a multiple of every group size): 32 KB of codes per slab, in L2;
                    # measured 512..2048 on 7B shapes: 2048 was 3-10% faster (fewer passes over the output)
    KCB = 2048      # bf16-prefill k panel (a multiple of every group size): 64 KB of bf16 pairs per slab, in L2;
                    # measured 128..2048: longer panels were faster (fewer passes over the output)


cdef void* _scratch(size_t nbytes, str what) except NULL:
    # activation scratch for one call, allocated before the parallel region (the GIL is held: may raise)
    cdef void* p = malloc(nbytes if nbytes else 1)
    if p == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes of {what}")
    return p


cdef int _check_thread_scratch(int failed, size_t nbytes) except -1:
    # per-thread scratch is allocated inside the parallel region, where nothing may raise: report after it
    if failed:
        raise MemoryError(f"cannot allocate {nbytes} bytes of per-thread scratch")
    return 0


def openmp_enabled():
    """True when this build runs its parallel loops with OpenMP."""
    return bool(q4_openmp_enabled())


def cpu_level():
    """2: CPU runs the AVX-512 build, 1: the AVX2 build, 0: only the baseline build."""
    return q4_cpu_level()


def build_isa():
    """The instruction set this module was compiled for: 'avx512', 'avx2' or 'generic'."""
    return q4_build_isa().decode()


# ----------------------------------------------------------------------------------------------------
# quantize + pack

cdef enum:
    LANES = 16      # explicit lanes for the min/max scan (vectorizes without reassociating floats)


cdef int _minmax_row(const float* w, Py_ssize_t K, Py_ssize_t group_size, Py_ssize_t G,
                     float* mins, float* maxs) noexcept nogil:
    # Per group min / max over the real elements; returns 1 if the row holds a NaN or an infinity
    # (w - w is NaN exactly for those), without a separate pass over the weights.
    cdef float lo[LANES]
    cdef float hi[LANES]
    cdef float bad[LANES]
    cdef Py_ssize_t gi, k, k0, k1, j, kv
    cdef float a, b
    for j in range(LANES):
        bad[j] = 0.0
    for gi in range(G):
        k0 = gi * group_size
        k1 = min(k0 + group_size, K)
        kv = k0 + ((k1 - k0) // LANES) * LANES
        a = w[k0]
        b = w[k0]
        if kv > k0:
            for j in range(LANES):
                lo[j] = w[k0 + j]
                hi[j] = w[k0 + j]
            k = k0 + LANES
            while k < kv:
                for j in range(LANES):
                    lo[j] = fminf(lo[j], w[k + j])
                    hi[j] = fmaxf(hi[j], w[k + j])
                    bad[j] = bad[j] + (w[k + j] - w[k + j])
                k += LANES
            for j in range(LANES):
                a = fminf(a, lo[j])
                b = fmaxf(b, hi[j])
                bad[j] = bad[j] + (w[k0 + j] - w[k0 + j])
        for k in range(kv, k1):
            a = fminf(a, w[k])
            b = fmaxf(b, w[k])
            bad[0] = bad[0] + (w[k] - w[k])
        mins[gi] = a
        maxs[gi] = b
    for j in range(LANES):
        if bad[j] != 0.0:   # NaN != 0 is true
            return 1
    return 0


def group_minmax(const float[:, ::1] w,          # IN  [N, K]
                 Py_ssize_t group_size,
                 float[:, ::1] mins,             # OUT [N, G]
                 float[:, ::1] maxs,             # OUT [N, G]
                 uint8_t[::1] nonfinite,         # OUT [N] 1 where the row holds NaN/Inf
                 int num_threads):
    """Per (row, group) min and max over the real (unpadded) elements of w, and a non-finite flag per row."""
    cdef Py_ssize_t N = w.shape[0], K = w.shape[1], G = mins.shape[1], n
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="dynamic", chunksize=64):
            nonfinite[n] = _minmax_row(&w[n, 0], K, group_size, G, &mins[n, 0], &maxs[n, 0])


cdef void _quantize_row(const float* w, Py_ssize_t K, Py_ssize_t Kp, Py_ssize_t group_size,
                        const float* mins, const float* scales, uint8_t* q, uint8_t* packed) noexcept nogil:
    # q: scratch of Kp bytes. First the codes, then pairs packed (low nibble = even k).
    cdef Py_ssize_t gi, k, k0, k1, i
    cdef float mn, s, t
    for gi in range(Kp // group_size):
        k0 = gi * group_size
        k1 = min(k0 + group_size, K)
        mn = mins[gi]
        s = scales[gi]
        if s == 0.0:
            # constant group: every code is 8, so w = (8 - 8) * 0 + zero = zero
            for k in range(k0, k1):
                q[k] = 8
        else:
            for k in range(k0, k1):
                # same operations, in the same order, as quant4.reference.quantize (bit-exact codes)
                t = (w[k] - mn) / s
                t = <float>0.0 if t < <float>0.0 else t   # clamp by ternaries: they vectorize, fminf does not
                t = <float>15.0 if t > <float>15.0 else t
                q[k] = <uint8_t>rintf(t)
    for k in range(K, Kp):
        q[k] = 0
    for i in range(Kp // 2):
        packed[i] = q[2 * i] | (q[2 * i + 1] << 4)


def quantize_pack(const float[:, ::1] w,        # IN  [N, K]
                  const float[:, ::1] mins,     # IN  [N, G]  zero - 8*scale, from the stored 16-bit values
                  const float[:, ::1] scales,   # IN  [N, G]  the stored 16-bit scales as fp32
                  Py_ssize_t group_size,
                  uint8_t[:, ::1] qweight,      # OUT [N, Kp/2]
                  int num_threads):
    """q = clamp(round((w - min) / scale), 0, 15), packed two per byte (even k in the low nibble)."""
    cdef Py_ssize_t N = w.shape[0], K = w.shape[1], Kp = qweight.shape[1] * 2, n
    cdef uint8_t* scratch
    cdef int failed = 0
    cdef int* failed_p = &failed   # shared flag, written through a pointer (never a reduction)
    if N == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        scratch = <uint8_t*>malloc(Kp)
        try:
            if scratch == NULL:
                failed_p[0] = 1
            else:
                for n in prange(N, schedule="dynamic", chunksize=64):
                    _quantize_row(&w[n, 0], K, Kp, group_size, &mins[n, 0], &scales[n, 0],
                                  scratch, &qweight[n, 0])
        finally:
            free(scratch)
    _check_thread_scratch(failed, Kp)


# ----------------------------------------------------------------------------------------------------
# error-minimizing scale and zero (calibration-free)

cdef enum:
    MAXC = 40       # candidates per group in the scale/zero search (round to nearest and a grid of up to 6 x 6,
                    # padded with copies of candidate 0 to whole vectors of 8: q4_search_errors)


cdef extern from "_q4fit.h" nogil:
    void q4_search_errors(const float* w, Py_ssize_t n, const float* cm, const float* ci, const float* cs,
                          const float* cz, int nc, float* err) noexcept
    void q4_fit_pass(const float* w, Py_ssize_t n, float s, float z, double* out) noexcept


cdef void _search_row(const float* w, Py_ssize_t K, Py_ssize_t group_size, Py_ssize_t G, const float* grid,
                      Py_ssize_t ngrid, float* scales, float* zeros) noexcept nogil:
    # scales/zeros come in holding round-to-nearest's values and leave holding the best candidate's.
    # All candidates of a group are evaluated side by side (the loop over c vectorizes), so comparing them
    # needs no horizontal sums. Candidate 0 is round-to-nearest; a later one wins only if strictly better.
    cdef float cs[MAXC]
    cdef float cz[MAXC]
    cdef float cm[MAXC]
    cdef float ci[MAXC]
    cdef float err[MAXC]
    cdef Py_ssize_t gi, k0, n, a, b, k, c, nc, best_c
    cdef float mn, mx, rng, lo, hi, sc, wk, q, e
    for gi in range(G):
        k0 = gi * group_size
        n = min(group_size, K - k0)
        mn = w[k0]
        mx = w[k0]
        for k in range(k0 + 1, k0 + n):
            mn = fminf(mn, w[k])
            mx = fmaxf(mx, w[k])
        rng = mx - mn
        if rng == 0.0:
            continue
        cs[0] = scales[gi]
        cz[0] = zeros[gi]
        nc = 1
        for a in range(ngrid):
            for b in range(ngrid):
                if (a == 0 and b == 0) or nc >= MAXC:
                    continue
                lo = mn + grid[a] * rng
                hi = mx - grid[b] * rng
                sc = (hi - lo) / <float>15.0
                cs[nc] = q4_round_half(sc)
                cz[nc] = q4_round_half(lo + <float>8.0 * sc)
                nc = nc + 1
        for c in range(nc, MAXC):       # padding: copies of candidate 0, which never win (strictly better only)
            cs[c] = cs[0]
            cz[c] = cz[0]
        for c in range(MAXC):
            cm[c] = cz[c] - <float>8.0 * cs[c]
            ci[c] = <float>1.0 / cs[c] if cs[c] != 0.0 else 0.0
        q4_search_errors(w + k0, n, cm, ci, cs, cz, MAXC, err)
        best_c = 0
        for c in range(1, nc):
            if err[c] < err[best_c]:
                best_c = c
        scales[gi] = cs[best_c]
        zeros[gi] = cz[best_c]


def search_qparams(const float[:, ::1] w,       # IN  [N, K]
                   Py_ssize_t group_size,
                   const float[::1] grid,       # IN  shrink fractions of the range, grid[0] == 0
                   float[:, ::1] scales,        # IN/OUT [N, G] float16-valued: RTN in, best out
                   float[:, ::1] zeros,         # IN/OUT [N, G]
                   int num_threads):
    """Per group, try clipping the range [min + a*range, max - b*range] for a, b in grid and keep the
    float16 scale/zero with the smallest squared reconstruction error (never worse than the RTN input)."""
    cdef Py_ssize_t N = w.shape[0], K = w.shape[1], G = scales.shape[1], n
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="dynamic", chunksize=16):
            _search_row(&w[n, 0], K, group_size, G, &grid[0], grid.shape[0], &scales[n, 0], &zeros[n, 0])


cdef void _refit_row(const float* w, Py_ssize_t K, Py_ssize_t group_size, Py_ssize_t G, int rounds,
                     float* scales, float* zeros) noexcept nogil:
    # Per group: fit s and m to the current codes by least squares (s = cov(q, w) / var(q), m = mean(w) - s
    # mean(q)), round them to float16 (zero = m + 8s), recompute the codes, repeat; keep the float16 pair with
    # the smallest error seen, starting from the one given (never worse than it). One pass over the group per
    # round gives the pair's error and the sums of the next fit (q4_fit_pass). A zero scale (a constant group
    # or float16 underflow) is left as it is: every code is 8, nothing to fit.
    cdef Py_ssize_t gi, k0, n, r
    cdef float s, z, bs, bz, be, cs, cz
    cdef double den, fs, fm
    cdef double t[5]
    for gi in range(G):
        k0 = gi * group_size
        n = min(group_size, K - k0)
        s = scales[gi]
        z = zeros[gi]
        if s == 0.0:
            continue
        bs, bz = s, z
        q4_fit_pass(w + k0, n, s, z, t)
        be = <float>t[0]
        for r in range(rounds):
            den = n * t[3] - t[1] * t[1]
            if den <= 0:
                break
            fs = (n * t[4] - t[1] * t[2]) / den
            if fs <= 0:
                break
            fm = (t[2] - fs * t[1]) / n
            cs = q4_round_half(<float>fs)
            cz = q4_round_half(<float>(fm + 8.0 * fs))
            if not (cs == cs and cz == cz) or cs - cs != 0.0 or cz - cz != 0.0 or cs == 0.0:
                break               # NaN, inf or zero in float16
            s, z = cs, cz
            q4_fit_pass(w + k0, n, s, z, t)
            if <float>t[0] < be:
                bs, bz, be = s, z, <float>t[0]
        scales[gi] = bs
        zeros[gi] = bz


def refit_qparams(const float[:, ::1] w,        # IN  [N, K]
                  Py_ssize_t group_size,
                  int rounds,
                  float[:, ::1] scales,         # IN/OUT [N, G] float16-valued
                  float[:, ::1] zeros,          # IN/OUT [N, G]
                  int num_threads):
    """Least-squares refits of each group's float16 scale and zero to its codes, `rounds` times; each group
    keeps the best pair seen (never worse than the input's)."""
    cdef Py_ssize_t N = w.shape[0], K = w.shape[1], G = scales.shape[1], n
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="dynamic", chunksize=16):
            _refit_row(&w[n, 0], K, group_size, G, rounds, &scales[n, 0], &zeros[n, 0])


# ----------------------------------------------------------------------------------------------------
# unpack / dequantize

def unpack(const uint8_t[:, ::1] qweight,       # IN  [N, Kp/2]
           uint8_t[:, ::1] q,                   # OUT [N, Kp] codes 0..15
           int num_threads):
    """Codes of the stored layout, one byte each: q[n, 2i] = low nibble, q[n, 2i + 1] = high nibble of byte i."""
    cdef Py_ssize_t N = qweight.shape[0], H = qweight.shape[1], n, i
    cdef const uint8_t* src
    cdef uint8_t* dst
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="static"):
            src = &qweight[n, 0]
            dst = &q[n, 0]
            for i in range(H):
                dst[2 * i] = src[i] & 15
                dst[2 * i + 1] = src[i] >> 4


cdef void _dequantize_row(const uint8_t* src, const float* scales, const float* zeros, Py_ssize_t K,
                          Py_ssize_t group_size, float* dst) noexcept nogil:
    cdef Py_ssize_t gi, i, i0, i1, half = group_size // 2, G = (K + group_size - 1) // group_size
    cdef float s, z
    cdef uint8_t b
    for gi in range(G):
        s = scales[gi]
        z = zeros[gi]
        i0 = gi * half
        i1 = min(i0 + half, K // 2)
        for i in range(i0, i1):
            b = src[i]
            dst[2 * i] = <float>(<int>(b & 15) - 8) * s + z
            dst[2 * i + 1] = <float>(<int>(b >> 4) - 8) * s + z
    if K % 2:
        b = src[K // 2]
        dst[K - 1] = <float>(<int>(b & 15) - 8) * scales[G - 1] + zeros[G - 1]


def dequantize(const uint8_t[:, ::1] qweight,   # IN  [N, Kp/2]
               const float[:, ::1] scales,      # IN  [N, G]
               const float[:, ::1] zeros,       # IN  [N, G]
               Py_ssize_t group_size,
               float[:, ::1] out,               # OUT [N, K] (K <= Kp: padding dropped)
               int num_threads):
    """w[n, k] = (q - 8) * scale + zero for the K = out.shape[1] real inputs (fp32 scales and zeros)."""
    cdef Py_ssize_t N = out.shape[0], K = out.shape[1], n
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="static"):
            _dequantize_row(&qweight[n, 0], &scales[n, 0], &zeros[n, 0], K, group_size, &out[n, 0])


# ----------------------------------------------------------------------------------------------------
# matmul: y[M, N] = x[M, K] . w^T (+ bias)
#
# Activations are first permuted into the k order of _q4simd.h (evens then odds inside every 32-k block),
# which is the order 16 packed bytes unpack into.
# Which path runs is decided by the caller, quant4.ops.plan_matmul (the one place kernels are chosen).
# Decode path: parallel over weight rows. Each row is streamed from memory once; every
# 16-byte chunk is unpacked and dequantized once (w = q * scale + (zero - 8 * scale)) and multiplied into
# up to four activation rows (q4_dot1 / q4_dot4).
# Prefill path: parallel over blocks of NB weight rows. For each k panel of up to KCMAX, the
# block's rows are dequantized into per-thread scratch (L2-resident) and multiplied by all activation rows
# in register tiles (q4_tile), accumulating into the output across panels.

cdef extern from "_q4simd.h" nogil:
    void q4_permute_x(const float* x, Py_ssize_t Kp, float* xp) noexcept
    float q4_dot1(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const float* xp,
                  Py_ssize_t G, Py_ssize_t cpg) noexcept
    void q4_dot2(const uint8_t* const* w, const uint16_t* const* sc, const uint16_t* const* zr,
                 const float* const* x, Py_ssize_t G, Py_ssize_t cpg, float* out) noexcept
    void q4_dot4(const uint8_t* const* w, const uint16_t* const* sc, const uint16_t* const* zr,
                 const float* const* x, Py_ssize_t G, Py_ssize_t cpg, float* out) noexcept
    void q4_dot1xr(const uint8_t* const* w, const uint16_t* const* sc, const uint16_t* const* zr,
                   const float* xp, Py_ssize_t G, Py_ssize_t cpg, float* out) noexcept
    enum:
        Q4_DR   # weight rows per multi-row decode pass (4 on AVX-512, else 2)
    void q4_dequant_perm(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, Py_ssize_t c0,
                         Py_ssize_t c1, Py_ssize_t cpg, float* dst) noexcept
    void q4_tile(const float* const* x, const float* const* w, Py_ssize_t kc, float* out) noexcept
    enum:
        Q4_TM   # activation rows per prefill register tile (4 on AVX-512, else 2)
        Q4_TN   # weight rows per prefill register tile (4)

cdef extern from "_q4avx512.h" nogil:
    int q4_bf16_available() noexcept
    enum:
        Q4_BF_TM    # activation rows per bf16 prefill register tile
    void q4_pack_slab_bf16(const uint8_t* w, Py_ssize_t ldq, const uint16_t* sc, const uint16_t* zr, Py_ssize_t G,
                           Py_ssize_t rows, Py_ssize_t b0, Py_ssize_t nb, Py_ssize_t cpg, uint32_t* dst) noexcept
    void q4_tile_bf16(const uint16_t* const* x, const uint32_t* w0, const uint32_t* w1, Py_ssize_t np,
                      float* const* out, Py_ssize_t col, const float* bias, int ncols, int first, int tm,
                      int nv) noexcept
    void q4_prep_x_dec_bf16(const uint16_t* x, Py_ssize_t Kp, Py_ssize_t g, uint16_t* xb, float* xs) noexcept
    void q4_dot_bf16(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const uint16_t* const* xb,
                     const float* const* xs, Py_ssize_t Kp, Py_ssize_t G, int lg, int nx, float* out) noexcept
    int q4_int8_available() noexcept
    void q4_quantize_x_int8(const float* xp, Py_ssize_t Kp, Py_ssize_t cpg, int8_t* xq, float* d,
                            float* xs) noexcept
    float q4_dot1_int8(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const int8_t* xq,
                       const float* d, const float* xs, Py_ssize_t G, Py_ssize_t cpg) noexcept
    void q4_dot1x4_int8(const uint8_t* w, Py_ssize_t ldq, const uint16_t* sc, const uint16_t* zr, const int8_t* xq,
                        const float* d, const float* xs, Py_ssize_t G, Py_ssize_t cpg, int nr, float* out) noexcept
    void q4_dotn_int8(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const int8_t* const* xq,
                      const float* const* d, const float* const* xs, Py_ssize_t G, Py_ssize_t cpg, int nx,
                      float* out) noexcept nogil
    void q4_quantize_x_int8_blocks(const float* xp, Py_ssize_t Kp, Py_ssize_t cpg, int8_t* xq, float* d,
                                   float* xs) noexcept
    int q4_int8_prefill_available() noexcept
    int q8_head_available() noexcept
    void q8_prep_x(const int8_t* xq, const float* dx, Py_ssize_t nb, float* cx) noexcept
    float q8_dot1(const uint8_t* wu, const float* dw, const int8_t* xq, const float* dx, const float* cx,
                  Py_ssize_t nb) noexcept
    enum:
        Q4_I8_TM    # activation rows per int8 prefill register tile
    void q4_pack_slab_int8(const uint8_t* w, Py_ssize_t ldq, const uint16_t* sc, const uint16_t* zr, Py_ssize_t G,
                           Py_ssize_t rows, Py_ssize_t b0, Py_ssize_t nb, Py_ssize_t cpg, uint8_t* codes, float* fs,
                           float* zt) noexcept
    void q4_dot16s_int8(const uint8_t* cs, const uint16_t* st, const uint16_t* zt, const int8_t* const* xq,
                        const float* const* d, const float* const* xs, Py_ssize_t G, Py_ssize_t cpg, int nx,
                        float* const* out) noexcept nogil
    void q4_pack_slab16_int8(const uint8_t* cs, const uint16_t* st, const uint16_t* zt, Py_ssize_t b0,
                             Py_ssize_t nb, Py_ssize_t cpg, uint8_t* codes, float* fs, float* zo) noexcept
    void q4_tile_int8(const int8_t* const* xq, const float* const* dx, const float* const* xs, const uint8_t* c0,
                      const uint8_t* c1, const float* f0, const float* f1, const float* z0, const float* z1,
                      Py_ssize_t nb, Py_ssize_t cpg, float* const* out, Py_ssize_t col, const float* bias,
                      int ncols, int first, int tm, int nv) noexcept


ctypedef struct Q4Rows:
    # One weight in the stored layout, as the kernel helpers read it (the way llama2.c passes one weights
    # struct): rows n0.. of it are at qw + n0 * ldq, sc + n0 * G, zr + n0 * G, bias + n0.
    const uint8_t* qw       # [N, Kp/2] packed codes
    const uint16_t* sc      # [N, G] float16 bits of the scales
    const uint16_t* zr      # [N, G] float16 bits of the zeros, or NULL: every zero is 0 (decode kernels only)
    const float* bias       # [N], or NULL
    Py_ssize_t N, Kp, G
    Py_ssize_t ldq          # bytes per packed row: Kp / 2
    Py_ssize_t cpg          # 16-byte chunks (32 codes) per group: group_size / 32
    Py_ssize_t nset         # rows [0, 16 nset) are in the slab16 layout (to_slab16), the rest rows; 0: all rows


cdef inline Q4Rows _rows(const uint8_t[:, ::1] qweight, const uint16_t[:, ::1] scales,
                         const uint16_t[:, ::1] zeros, Py_ssize_t group_size, const float[::1] bias,
                         bint slab=False) noexcept:
    cdef Q4Rows w
    w.nset = qweight.shape[0] // 16 if slab else 0
    w.qw = &qweight[0, 0]
    w.sc = &scales[0, 0]
    w.zr = &zeros[0, 0] if zeros is not None else NULL
    w.bias = &bias[0] if bias is not None else NULL
    w.N = qweight.shape[0]
    w.ldq = qweight.shape[1]
    w.Kp = qweight.shape[1] * 2
    w.G = scales.shape[1]
    w.cpg = group_size // 32
    return w


cdef inline const uint16_t* _zeros_row(const Q4Rows* w, Py_ssize_t n) noexcept nogil:
    return w.zr + n * w.G if w.zr != NULL else NULL


cdef inline Q4Rows _block(const Q4Rows* w, Py_ssize_t n0) noexcept nogil:
    # the same weight from row n0 on (N counts the rows left)
    cdef Q4Rows b = w[0]
    b.qw = w.qw + n0 * w.ldq
    b.sc = w.sc + n0 * w.G
    b.zr = _zeros_row(w, n0)
    b.bias = (w.bias + n0) if w.bias != NULL else NULL
    b.N = w.N - n0
    b.nset = max(<Py_ssize_t>0, w.nset - n0 // 16)     # n0 % 16 == 0 whenever w.nset > 0
    return b


cdef void _decode_rows(const Q4Rows* w, const float* xp, Py_ssize_t M, Py_ssize_t n0, float* out,
                       Py_ssize_t ldo, bint multi_row) noexcept nogil:
    # This is where decode spends its time: every weight byte is read from memory once per call, here.
    # Weight rows n0 .. n0 + Q4_DR - 1 (those < N) against all M activation rows:
    # out[m * ldo + n] = dot(w_n, x_m) (+ bias[n]). M = 1: q4_dot1 per row, or, with multi_row (chosen by
    # quant4.ops.plan_matmul), q4_dot1xr over Q4_DR rows sharing each activation load; otherwise four activation
    # rows at a time (the last group repeats its last row) against the Q4_DR weight rows.
    cdef float r[Q4_DR * 4]
    cdef const uint8_t* wr[Q4_DR]
    cdef const uint16_t* sr[Q4_DR]
    cdef const uint16_t* zp[Q4_DR]
    cdef const float* xr[4]
    cdef Py_ssize_t m0, i, j, n, rows = min(<Py_ssize_t>Q4_DR, w.N - n0), Kp = w.Kp, G = w.G, cpg = w.cpg
    cdef const float* bias = w.bias
    for j in range(Q4_DR):
        n = n0 + min(j, rows - 1)
        wr[j] = w.qw + n * w.ldq
        sr[j] = w.sc + n * G
        zp[j] = w.zr + n * G
    if M == 1:
        if not multi_row or rows == 1:
            for j in range(rows):
                out[n0 + j] = q4_dot1(wr[j], sr[j], zp[j], xp, G, cpg) + (bias[n0 + j] if bias != NULL else 0.0)
        else:
            q4_dot1xr(wr, sr, zp, xp, G, cpg, r)
            for j in range(rows):
                out[n0 + j] = r[j] + (bias[n0 + j] if bias != NULL else 0.0)
        return
    m0 = 0
    while m0 < M:
        for i in range(4):
            xr[i] = xp + min(m0 + i, M - 1) * Kp
        if M - m0 <= 2:
            q4_dot2(wr, sr, zp, xr, G, cpg, r)
        else:
            q4_dot4(wr, sr, zp, xr, G, cpg, r)
        for j in range(rows):
            for i in range(min(<Py_ssize_t>4, M - m0)):
                out[(m0 + i) * ldo + n0 + j] = r[j * 4 + i] + (bias[n0 + j] if bias != NULL else 0.0)
        m0 += 4


cdef void _prefill_block(const Q4Rows* w, const float* xp, Py_ssize_t M, Py_ssize_t kc_max, float* out,
                         Py_ssize_t ldo, float* wbuf) noexcept nogil:
    # One block of w.N <= NB weight rows (w from _block); out points at column 0 of the block; wbuf: NB * kc_max
    # floats.
    # Tiles that run past M or the block's rows repeat the last row's pointer; their extra results are dropped.
    cdef float t[Q4_TM * Q4_TN]
    cdef const float* xr[Q4_TM]
    cdef const float* wr[Q4_TN]
    cdef Py_ssize_t k0, kc, r, m0, j0, i, j
    cdef Py_ssize_t rows = w.N, Kp = w.Kp, G = w.G, cpg = w.cpg
    cdef const float* bias = w.bias
    k0 = 0
    while k0 < Kp:
        kc = min(kc_max, Kp - k0)
        for r in range(rows):
            q4_dequant_perm(w.qw + r * w.ldq, w.sc + r * G, w.zr + r * G, k0 // 32, (k0 + kc) // 32, cpg,
                            wbuf + r * kc_max)
        m0 = 0
        while m0 < M:
            for i in range(Q4_TM):
                xr[i] = xp + min(m0 + i, M - 1) * Kp + k0
            j0 = 0
            while j0 < rows:
                for j in range(Q4_TN):
                    wr[j] = wbuf + min(j0 + j, rows - 1) * kc_max
                q4_tile(xr, wr, kc, t)
                for i in range(min(<Py_ssize_t>Q4_TM, M - m0)):
                    for j in range(min(<Py_ssize_t>Q4_TN, rows - j0)):
                        if k0 == 0:
                            out[(m0 + i) * ldo + j0 + j] = t[i * Q4_TN + j] + (bias[j0 + j] if bias != NULL else 0.0)
                        else:
                            out[(m0 + i) * ldo + j0 + j] += t[i * Q4_TN + j]
                j0 += Q4_TN
            m0 += Q4_TM
        k0 += kc


cdef int _prefill(const Q4Rows* w, const float* xp, Py_ssize_t M, float* out, Py_ssize_t ldo,
                  int num_threads) noexcept nogil:
    # Parallel over blocks of NB weight rows, per-thread weight scratch. Returns -1 if scratch allocation failed.
    cdef Py_ssize_t kc_max = min(w.Kp, <Py_ssize_t>KCMAX), nblk = (w.N + NB - 1) // NB, blk
    cdef float* wbuf
    cdef Q4Rows b
    cdef int failed = 0
    cdef int* failed_p = &failed   # shared flag, written through a pointer (never a reduction)
    with parallel(num_threads=num_threads):
        wbuf = <float*>malloc(NB * kc_max * sizeof(float))
        try:
            if wbuf == NULL:
                failed_p[0] = 1
            else:
                for blk in prange(nblk, schedule="dynamic", chunksize=1):
                    b = _block(w, blk * NB)
                    b.N = min(<Py_ssize_t>NB, b.N)
                    _prefill_block(&b, xp, M, kc_max, out + blk * NB, ldo, wbuf)
        finally:
            free(wbuf)
    return -1 if failed else 0


# Kernel codes: quant4.ops.plan_matmul picks one per call by name (KERNELS) and passes it to matmul.
cdef enum:
    K_FP32_DECODE = 0
    K_FP32_PREFILL = 1
    K_BF16_DECODE = 2
    K_BF16_PREFILL = 3
    K_INT8_DECODE = 4
    K_INT8_PREFILL = 5

KERNELS = {"fp32-decode": K_FP32_DECODE, "fp32-prefill": K_FP32_PREFILL, "bf16-decode": K_BF16_DECODE,
           "bf16-prefill": K_BF16_PREFILL, "int8-decode": K_INT8_DECODE, "int8-prefill": K_INT8_PREFILL}

ctypedef fused act_t:
    float           # fp32 activations: fp32 and int8 kernels
    uint16_t        # bfloat16 bits: bf16 kernels


def matmul(const act_t[:, ::1] x,               # IN  [M, Kp] fp32, or bf16 bits (zero beyond K)
           const uint8_t[:, ::1] qweight,       # IN  [N, Kp/2]
           const uint16_t[:, ::1] scales,       # IN  [N, G] float16 bits
           const uint16_t[:, ::1] zeros,        # IN  [N, G] float16 bits, or None: every zero is 0 (decode kernels)
           Py_ssize_t group_size,
           const float[::1] bias,               # IN  [N] or None
           float[:, ::1] out,                   # OUT [M, N]
           int kernel,                          # one of KERNELS, chosen by quant4.ops.plan_matmul
           bint multi_row,                      # fp32-decode at M = 1: Q4_DR weight rows per pass
           int num_threads,
           bint slab=False):                    # the weight is in the slab16 layout (int8 kernels only)
    """out = x . dequantize(w)^T (+ bias), fp32 accumulation, on the kernel the caller chose:
    fp32-decode / fp32-prefill (fp32 x), int8-decode / int8-prefill (fp32 x rounded to int8 per 32 inputs;
    need int8_available() / int8_prefill_available()), bf16-decode (exact weights, M <= 4, Kp % 128 == 0) / bf16-prefill (bf16 x, needs
    bf16_available()). Decode streams each weight row once for a few activation rows; prefill dequantizes panels
    of weight rows into per-thread scratch and multiplies them in register tiles. zeros=None (the caller knows
    every zero is 0: symmetric weights) is for the decode kernels int8-decode and bf16-decode, which then do not
    read a zero stream. slab: the weight was permuted by to_slab16 (int8-decode and int8-prefill, on
    slab16_available() builds)."""
    cdef Py_ssize_t M = x.shape[0], Kp = x.shape[1]
    cdef Q4Rows w
    if zeros is None and kernel != K_INT8_DECODE and kernel != K_BF16_DECODE:
        raise ValueError("zeros=None (symmetric weights) is only for the int8-decode and bf16-decode kernels")
    if slab and not (slab16_available() and (kernel == K_INT8_DECODE or kernel == K_INT8_PREFILL)):
        raise ValueError("a slab16 weight runs on the int8-decode and int8-prefill kernels of an AVX512-VNNI build")
    if M == 0 or qweight.shape[0] == 0:
        return
    w = _rows(qweight, scales, zeros, group_size, bias, slab)
    if act_t is float:
        if kernel == K_FP32_DECODE or kernel == K_FP32_PREFILL:
            _matmul_permuted(&w, &x[0, 0], M, &out[0, 0], out.shape[1], kernel == K_FP32_DECODE, multi_row,
                             num_threads)
        elif kernel == K_INT8_DECODE:
            if not q4_int8_available():
                raise RuntimeError("the int8-activation kernel is not available in this build / on this CPU")
            _matmul_int8(&w, &x[0, 0], M, &out[0, 0], out.shape[1], num_threads)
        elif kernel == K_INT8_PREFILL:
            if not q4_int8_prefill_available():
                raise RuntimeError("the int8-activation prefill kernel is not available in this build / on this CPU")
            _matmul_int8_prefill(&w, &x[0, 0], M, &out[0, 0], out.shape[1], num_threads)
        else:
            raise ValueError(f"kernel {kernel} needs bf16 activations")
    else:
        if not q4_bf16_available():
            raise RuntimeError("the bf16 kernels are not available in this build / on this CPU")
        if kernel == K_BF16_PREFILL:
            _matmul_bf16_prefill(&w, &x[0, 0], M, &out[0, 0], out.shape[1], num_threads)
        elif kernel == K_BF16_DECODE:
            if M > 4 or Kp % 128:
                raise ValueError(f"bf16 decode needs M <= 4 and Kp % 128 == 0, got M={M}, Kp={Kp}")
            _matmul_bf16_decode(&w, &x[0, 0], M, group_size, &out[0, 0], out.shape[1], num_threads)
        else:
            raise ValueError(f"kernel {kernel} needs fp32 activations")


cdef int _matmul_permuted(const Q4Rows* w, const float* x, Py_ssize_t M, float* out, Py_ssize_t ldo,
                          bint decode, bint multi_row, int num_threads) except -1:
    # fp32 decode or prefill: the activations permuted into the k order of the micro-kernels (_q4simd.h), then
    # the weight rows streamed (decode) or dequantized panel by panel (prefill).
    cdef Py_ssize_t Kp = w.Kp, m, n
    cdef float* xp = <float*>_scratch(M * Kp * sizeof(float), "activation scratch")
    cdef int failed = 0
    try:
        with nogil:
            for m in prange(M, num_threads=num_threads, schedule="static"):
                q4_permute_x(x + m * Kp, Kp, xp + m * Kp)
            if decode:
                for n in prange((w.N + Q4_DR - 1) // Q4_DR, num_threads=num_threads, schedule="static"):
                    _decode_rows(w, xp, M, n * Q4_DR, out, ldo, multi_row)
            else:
                failed = _prefill(w, xp, M, out, ldo, num_threads)
    finally:
        free(xp)
    return _check_thread_scratch(failed, NB * KCMAX * sizeof(float))


cdef void _prefill_block_bf16(const Q4Rows* w, const uint16_t* x, Py_ssize_t M, float* out, Py_ssize_t ldo,
                              uint32_t* pairs) noexcept nogil:
    # One block of w.N <= NB8 weight rows (w from _block), out at its column 0: per k panel of KCB, its slabs are
    # dequantized into bf16 pair vectors (q4_pack_slab_bf16), then each pair of slabs meets every activation row
    # in tiles of Q4_BF_TM.
    cdef const uint16_t* xr[Q4_BF_TM]
    cdef float* orow[Q4_BF_TM]
    cdef Py_ssize_t rows = w.N, Kp = w.Kp, G = w.G, cpg = w.cpg
    cdef Py_ssize_t k0 = 0, kc, nbk, nslab = (rows + 15) // 16, s, m0, i
    cdef int tm, nv
    while k0 < Kp:
        kc = min(<Py_ssize_t>KCB, Kp - k0)
        nbk = kc // 32
        for s in range(nslab):
            q4_pack_slab_bf16(w.qw + 16 * s * w.ldq, w.ldq, w.sc + 16 * s * G, w.zr + 16 * s * G, G,
                              min(<Py_ssize_t>16, rows - 16 * s), k0 // 32, nbk, cpg, pairs + s * nbk * 256)
        s = 0
        while s < nslab:
            nv = 2 if s + 1 < nslab else 1
            m0 = 0
            while m0 < M:
                tm = <int>min(<Py_ssize_t>Q4_BF_TM, M - m0)
                for i in range(tm):
                    xr[i] = x + (m0 + i) * Kp + k0
                    orow[i] = out + (m0 + i) * ldo
                q4_tile_bf16(xr, pairs + s * nbk * 256, pairs + (s + nv - 1) * nbk * 256, kc // 2, orow, 16 * s,
                             (w.bias + 16 * s) if w.bias != NULL else NULL, <int>min(<Py_ssize_t>32, rows - 16 * s),
                             k0 == 0, tm, nv)
                m0 += tm
            s += 2
        k0 += kc


cdef int _matmul_bf16_prefill(const Q4Rows* w, const uint16_t* x, Py_ssize_t M, float* out, Py_ssize_t ldo,
                              int num_threads) except -1:
    # Prefill with bf16 activations (AVX512-BF16): parallel over blocks of NB8 weight rows, each thread
    # dequantizing panels into its own scratch; the activations are read in place.
    cdef Py_ssize_t nblk = (w.N + NB8 - 1) // NB8, blk
    cdef size_t per = (NB8 // 16) * (KCB // 32) * 256 * sizeof(uint32_t)
    cdef uint32_t* pairs
    cdef Q4Rows b
    cdef int failed = 0
    cdef int* failed_p = &failed   # shared flag, written through a pointer (never a reduction)
    with nogil, parallel(num_threads=num_threads):
        pairs = <uint32_t*>malloc(per)
        try:
            if pairs == NULL:
                failed_p[0] = 1
            else:
                for blk in prange(nblk, schedule="dynamic", chunksize=1):
                    b = _block(w, blk * NB8)
                    b.N = min(<Py_ssize_t>NB8, b.N)
                    _prefill_block_bf16(&b, x, M, out + blk * NB8, ldo, pairs)
        finally:
            free(pairs)
    return _check_thread_scratch(failed, per)


def bf16_available():
    """True if this build has the AVX512-BF16 kernels and the CPU runs them."""
    return bool(q4_bf16_available())


cdef int _matmul_bf16_decode(const Q4Rows* w, const uint16_t* x, Py_ssize_t M, Py_ssize_t group_size,
                             float* out, Py_ssize_t ldo, int num_threads) except -1:
    # Decode (M <= 4, Kp % 128 == 0) with bf16 activations and exact weights. One weight row per pass (Q4_DR
    # rows sharing each activation load measured 5-25% slower here).
    cdef Py_ssize_t Kp = w.Kp, G = w.G, m, n, i
    cdef Py_ssize_t per = Kp + G * 2    # uint16 slots per activation row: the bf16 pairs, then the fp32 group sums
    cdef int lg = 5, nx = 1 if M == 1 else (2 if M == 2 else 4)
    cdef const uint16_t* xb[4]
    cdef const float* xs[4]
    cdef uint16_t* buf
    while (1 << lg) != group_size:
        lg += 1
    buf = <uint16_t*>_scratch(M * per * sizeof(uint16_t), "activation scratch")
    try:
        with nogil:
            for i in range(4):
                m = min(i, M - 1)
                xb[i] = buf + m * per
                xs[i] = <const float*>(buf + m * per + Kp)
            for m in range(M):
                q4_prep_x_dec_bf16(x + m * Kp, Kp, group_size, buf + m * per, <float*>(buf + m * per + Kp))
            for n in prange(w.N, num_threads=num_threads, schedule="static"):
                _dot_bf16_row(w, n, xb, xs, lg, nx, M, out, ldo)
    finally:
        free(buf)
    return 0


cdef inline void _dot_bf16_row(const Q4Rows* w, Py_ssize_t n, const uint16_t** xb, const float** xs, int lg,
                               int nx, Py_ssize_t M, float* out, Py_ssize_t ldo) noexcept nogil:
    # bf16 decode: weight row n against nx prepared activation rows (M of them real)
    cdef float r[4]
    cdef Py_ssize_t m
    q4_dot_bf16(w.qw + n * w.ldq, w.sc + n * w.G, _zeros_row(w, n), xb, xs, w.Kp, w.G, lg, nx, r)
    for m in range(M):
        out[m * ldo + n] = r[m] + (w.bias[n] if w.bias != NULL else 0.0)


def int8_available():
    """True if this build has an int8-activation decode kernel (AVX512-VNNI or AVX2) and the CPU runs it."""
    return bool(q4_int8_available())


cdef int _matmul_int8(const Q4Rows* w, const float* x, Py_ssize_t M, float* out, Py_ssize_t ldo,
                      int num_threads) except -1:
    # Decode with activations dynamically quantized to int8 per 32-k block
    cdef Py_ssize_t Kp = w.Kp, G = w.G, cpg = w.cpg, nb = Kp // 32, n, m
    cdef float* xp
    cdef int8_t* xq
    _quantize_x_rows(x, M, Kp, cpg, True, &xp, &xq, num_threads)
    cdef float* d = xp + M * Kp
    cdef float* xs = d + M * nb
    try:
        with nogil:
            if M == 1:      # the common case: a slab16 set, or four weight rows, per call
                for n in prange(w.nset + (w.N - 16 * w.nset + 3) // 4, num_threads=num_threads, schedule="static"):
                    if n < w.nset:
                        _dot_int8_set16(w, n, xq, d, xs, 1, out, ldo)
                    else:
                        _dot_int8_rows4(w, 16 * w.nset + 4 * (n - w.nset), xq, d, xs, out)
            else:
                for n in prange(w.N - 15 * w.nset, num_threads=num_threads, schedule="static"):
                    if n < w.nset:
                        _dot_int8_set16(w, n, xq, d, xs, M, out, ldo)
                    else:
                        _dot_int8_row(w, 15 * w.nset + n, xq, d, xs, M, out, ldo)
    finally:
        free(xp)
        free(xq)
    return 0


cdef inline void _dot_int8_rows4(const Q4Rows* w, Py_ssize_t n0, const int8_t* xq, const float* d, const float* xs,
                                 float* out) noexcept nogil:
    # int8 decode at M = 1: weight rows n0 .. n0 + 3 (those < N), out[n] for each, each as q4_dot1_int8 computes it
    cdef int nr = <int>min(<Py_ssize_t>4, w.N - n0), r
    q4_dot1x4_int8(w.qw + n0 * w.ldq, w.ldq, w.sc + n0 * w.G, _zeros_row(w, n0), xq, d, xs, w.G, w.cpg, nr, out + n0)
    if w.bias != NULL:
        for r in range(nr):
            out[n0 + r] = out[n0 + r] + w.bias[n0 + r]


cdef inline void _dot_int8_set16(const Q4Rows* w, Py_ssize_t s, const int8_t* xq, const float* d, const float* xs,
                                 Py_ssize_t M, float* out, Py_ssize_t ldo) noexcept nogil:
    # int8 decode on the slab16 layout: rows 16 s .. 16 s + 15 (set s < w.nset) against the M activation rows,
    # up to 4 per pass over the set's codes
    cdef const int8_t* xr[4]
    cdef const float* dr[4]
    cdef const float* sr[4]
    cdef float* orow[4]
    cdef Py_ssize_t nb = w.Kp // 32, m0 = 0, i, n, nx
    while m0 < M:
        nx = min(<Py_ssize_t>4, M - m0)
        for i in range(nx):
            xr[i] = xq + (m0 + i) * w.Kp
            dr[i] = d + (m0 + i) * nb
            sr[i] = xs + (m0 + i) * w.G
            orow[i] = out + (m0 + i) * ldo + 16 * s
        q4_dot16s_int8(w.qw + 16 * s * w.ldq, w.sc + 16 * s * w.G, _zeros_row(w, 16 * s), xr, dr, sr, w.G, w.cpg,
                       <int>nx, orow)
        if w.bias != NULL:
            for i in range(nx):
                for n in range(16):
                    orow[i][n] = orow[i][n] + w.bias[16 * s + n]
        m0 += nx


cdef inline void _dot_int8_row(const Q4Rows* w, Py_ssize_t n, const int8_t* xq, const float* d, const float* xs,
                               Py_ssize_t M, float* out, Py_ssize_t ldo) noexcept nogil:
    # int8 decode: weight row n against the M prepared activation rows, up to 4 per pass over the row's codes
    cdef const int8_t* xr[4]
    cdef const float* dr[4]
    cdef const float* sr[4]
    cdef float r[4]
    cdef Py_ssize_t Kp = w.Kp, G = w.G, nb = w.Kp // 32, m0, i, nx
    m0 = 0
    while m0 < M:
        nx = M - m0 if M - m0 < 4 else 4
        for i in range(nx):
            xr[i] = xq + (m0 + i) * Kp
            dr[i] = d + (m0 + i) * nb
            sr[i] = xs + (m0 + i) * G
        q4_dotn_int8(w.qw + n * w.ldq, w.sc + n * G, _zeros_row(w, n), xr, dr, sr, G, w.cpg, <int>nx, r)
        for i in range(nx):
            out[(m0 + i) * ldo + n] = r[i] + (w.bias[n] if w.bias != NULL else 0.0)
        m0 += nx


def slab16_available():
    """True if this build has the slab16-layout int8 kernels (AVX512-VNNI) and the CPU runs them."""
    return bool(q4_int8_prefill_available())


cdef void _permute_set16(uint8_t* qw, Py_ssize_t ldq, uint16_t* sc, uint16_t* zr, Py_ssize_t G, bint forward,
                         uint8_t* buf) noexcept nogil:
    # one set of 16 rows between the row layout and slab16 (forward: rows -> slab16), through buf
    # (16 ldq + 32 G bytes)
    cdef Py_ssize_t b, j, i, g, k
    cdef uint16_t* h = <uint16_t*>(buf + 16 * ldq)
    cdef uint16_t* t
    memcpy(buf, qw, 16 * ldq)
    for b in range(ldq // 16):
        for j in range(4):
            for i in range(16):
                if forward:
                    memcpy(qw + 256 * b + 64 * j + 4 * i, buf + i * ldq + 16 * b + 4 * j, 4)
                else:
                    memcpy(qw + i * ldq + 16 * b + 4 * j, buf + 256 * b + 64 * j + 4 * i, 4)
    for k in range(2):
        t = sc if k == 0 else zr
        if t == NULL:
            continue
        memcpy(h, t, 32 * G)
        for g in range(G):
            for i in range(16):
                if forward:
                    t[16 * g + i] = h[i * G + g]
                else:
                    t[i * G + g] = h[16 * g + i]


def permute_slab16(uint8_t[:, ::1] qweight,      # IN/OUT [N, Kp/2]
                   uint16_t[:, ::1] scales,      # IN/OUT [N, G]
                   uint16_t[:, ::1] zeros,       # IN/OUT [N, G], or None
                   bint forward,                 # True: rows -> slab16; False: back
                   int num_threads):
    """Permute a weight in place between the stored row layout and the slab16 layout of the int8 kernels
    (_q4avx512.h): each whole set of 16 rows keeps its bytes in its own place, rearranged; rows past the last
    whole set are not touched. Exact both ways (a permutation of bytes)."""
    cdef Py_ssize_t N = qweight.shape[0], ldq = qweight.shape[1], G = scales.shape[1], s
    cdef uint8_t* qw = &qweight[0, 0] if N else NULL
    cdef uint16_t* sc = &scales[0, 0] if N else NULL
    cdef uint16_t* zr = &zeros[0, 0] if (N and zeros is not None) else NULL
    cdef uint8_t* buf
    cdef size_t per = 16 * ldq + 32 * G
    cdef int failed = 0
    cdef int* failed_p = &failed
    if scales.shape[0] != N or ldq % 16 or (zeros is not None and (zeros.shape[0] != N or zeros.shape[1] != G)):
        raise ValueError(f"permute_slab16: qweight [{N}, {ldq}] (ldq % 16 == 0), scales / zeros [{N}, G] expected")
    if N < 16:
        return
    with nogil, parallel(num_threads=num_threads):
        buf = <uint8_t*>malloc(per)
        try:
            if buf == NULL:
                failed_p[0] = 1
            else:
                for s in prange(N // 16, schedule="static"):
                    _permute_set16(qw + 16 * s * ldq, ldq, sc + 16 * s * G, (zr + 16 * s * G) if zr != NULL else NULL,
                                   G, forward, buf)
        finally:
            free(buf)
    _check_thread_scratch(failed, per)


def int8_prefill_available():
    """True if this build has the int8-activation prefill kernel (AVX512-VNNI) and the CPU runs it."""
    return bool(q4_int8_prefill_available())


cdef int _quantize_x_rows(const float* x, Py_ssize_t M, Py_ssize_t Kp, Py_ssize_t cpg, bint paired,
                          float** xp_out, int8_t** xq_out, int num_threads) except -1:
    # activation rows -> permuted order, rounded to int8 per 32-k block (paired: pairs of blocks reordered for
    # the decode kernel); *xp_out holds the fp32 copy, then the block scales d [M, Kp/32] and group sums
    # xs [M, G] (both freed with it); the caller frees both buffers
    cdef Py_ssize_t nb = Kp // 32, G = Kp // (32 * cpg), m
    cdef float* xp = <float*>_scratch(M * (Kp + nb + G) * sizeof(float), "activation scratch")
    cdef int8_t* xq
    try:
        xq = <int8_t*>_scratch(M * Kp, "activation scratch")
    except MemoryError:
        free(xp)
        raise
    with nogil:
        for m in prange(M, num_threads=num_threads, schedule="static"):
            q4_permute_x(x + m * Kp, Kp, xp + m * Kp)
            if paired:
                q4_quantize_x_int8(xp + m * Kp, Kp, cpg, xq + m * Kp, xp + M * Kp + m * nb,
                                   xp + M * (Kp + nb) + m * G)
            else:
                q4_quantize_x_int8_blocks(xp + m * Kp, Kp, cpg, xq + m * Kp, xp + M * Kp + m * nb,
                                          xp + M * (Kp + nb) + m * G)
    xp_out[0] = xp
    xq_out[0] = xq
    return 0


cdef void _prefill_block_int8(const Q4Rows* w, const int8_t* xq, const float* d, const float* xs, Py_ssize_t M,
                              float* out, Py_ssize_t ldo, uint8_t* codes, float* fs, float* zt) noexcept nogil:
    # One block of w.N <= NB8 weight rows (w from _block), out at its column 0: per k panel of KC8, its slabs are
    # repacked (q4_pack_slab_int8), then each pair of slabs meets every activation row in tiles of Q4_I8_TM.
    cdef const int8_t* xr[Q4_I8_TM]
    cdef const float* dr[Q4_I8_TM]
    cdef const float* sr[Q4_I8_TM]
    cdef float* orow[Q4_I8_TM]
    cdef Py_ssize_t rows = w.N, Kp = w.Kp, G = w.G, cpg = w.cpg, nb_all = w.Kp // 32
    cdef Py_ssize_t k0 = 0, kc, b0, nbk, ngk, nslab = (rows + 15) // 16, s, m0, i
    cdef int tm, nv
    while k0 < Kp:
        kc = min(<Py_ssize_t>KC8, Kp - k0)
        b0 = k0 // 32
        nbk = kc // 32
        ngk = nbk // cpg
        for s in range(nslab):
            if s < w.nset:      # stored as a slab16 set: its nibbles split
                q4_pack_slab16_int8(w.qw + 16 * s * w.ldq, w.sc + 16 * s * G, w.zr + 16 * s * G, b0, nbk, cpg,
                                    codes + s * nbk * 512, fs + s * nbk * 16, zt + s * ngk * 16)
            else:
                q4_pack_slab_int8(w.qw + 16 * s * w.ldq, w.ldq, w.sc + 16 * s * G, w.zr + 16 * s * G, G,
                                  min(<Py_ssize_t>16, rows - 16 * s), b0, nbk, cpg, codes + s * nbk * 512,
                                  fs + s * nbk * 16, zt + s * ngk * 16)
        s = 0
        while s < nslab:
            nv = 2 if s + 1 < nslab else 1
            m0 = 0
            while m0 < M:
                tm = <int>min(<Py_ssize_t>Q4_I8_TM, M - m0)
                for i in range(tm):
                    xr[i] = xq + (m0 + i) * Kp + k0
                    dr[i] = d + (m0 + i) * nb_all + b0
                    sr[i] = xs + (m0 + i) * G + b0 // cpg
                    orow[i] = out + (m0 + i) * ldo
                q4_tile_int8(xr, dr, sr, codes + s * nbk * 512, codes + (s + nv - 1) * nbk * 512,
                             fs + s * nbk * 16, fs + (s + nv - 1) * nbk * 16, zt + s * ngk * 16,
                             zt + (s + nv - 1) * ngk * 16, nbk, cpg, orow, 16 * s,
                             (w.bias + 16 * s) if w.bias != NULL else NULL, <int>min(<Py_ssize_t>32, rows - 16 * s),
                             k0 == 0, tm, nv)
                m0 += tm
            s += 2
        k0 += kc


cdef int _matmul_int8_prefill(const Q4Rows* w, const float* x, Py_ssize_t M, float* out, Py_ssize_t ldo,
                              int num_threads) except -1:
    # Prefill with activations rounded to int8 per 32-k block (the decode kernel's rounding), on AVX512-VNNI:
    # parallel over blocks of NB8 weight rows, each thread repacking panels into its own scratch.
    cdef Py_ssize_t Kp = w.Kp, G = w.G, nb = Kp // 32, nblk = (w.N + NB8 - 1) // NB8, blk
    cdef size_t per = NB8 * KC8
    cdef float* xp
    cdef int8_t* xq
    cdef uint8_t* codes
    cdef float* fs
    cdef Q4Rows b
    cdef int failed = 0
    cdef int* failed_p = &failed   # shared flag, written through a pointer (never a reduction)
    _quantize_x_rows(x, M, Kp, w.cpg, False, &xp, &xq, num_threads)
    try:
        with nogil, parallel(num_threads=num_threads):
            codes = <uint8_t*>malloc(per + 2 * (per // 32) * sizeof(float))
            try:
                if codes == NULL:
                    failed_p[0] = 1
                else:
                    fs = <float*>(codes + per)
                    for blk in prange(nblk, schedule="dynamic", chunksize=1):
                        b = _block(w, blk * NB8)
                        b.N = min(<Py_ssize_t>NB8, b.N)
                        _prefill_block_int8(&b, xq, xp + M * Kp, xp + M * (Kp + nb), M, out + blk * NB8, ldo,
                                            codes, fs, fs + per // 32)
            finally:
                free(codes)
    finally:
        free(xp)
        free(xq)
    return _check_thread_scratch(failed, per + 2 * (per // 32) * sizeof(float))


# ----------------------------------------------------------------------------------------------------
# 8-bit output head (AVX512-VNNI or AVX2, _q4avx512.h): a runtime copy of a float head for int8-activation decode


def int8_head_available():
    """True if this build has the 8-bit output head kernel (AVX512-VNNI or AVX2) and the CPU runs it."""
    return bool(q8_head_available())


cdef void _q8_row(const float* w, Py_ssize_t nb, uint8_t* u, float* d) noexcept nogil:
    cdef Py_ssize_t b, k
    cdef float amax, db, inv
    for b in range(nb):
        amax = 0.0
        for k in range(32):
            amax = fmaxf(amax, fabsf(w[32 * b + k]))
        db = amax / 127.0
        inv = 1.0 / db if db > 0 else 0.0
        for k in range(32):
            u[32 * b + k] = <uint8_t>(<int>rintf(w[32 * b + k] * inv) + 128)
        d[b] = db


def q8_quantize_rows(const float[:, ::1] w,     # IN  [N, D] fp32, D % 32 == 0
                     uint8_t[:, ::1] wu,        # OUT [N, D] codes + 128
                     float[:, ::1] dw,          # OUT [N, D/32] block scales
                     int num_threads):
    """Rows of a float matrix -> the 8-bit head's codes and block scales (absmax / 127 per 32 inputs)."""
    cdef Py_ssize_t N = w.shape[0], nb = w.shape[1] // 32, n
    if N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="static"):
            _q8_row(&w[n, 0], nb, &wu[n, 0], &dw[n, 0])


def q8_matvec(const float[::1] x,               # IN  [D] fp32
              const uint8_t[:, ::1] wu,         # IN  [N, D] from q8_quantize_rows
              const float[:, ::1] dw,           # IN  [N, D/32]
              float[::1] out,                   # OUT [N]
              int num_threads):
    """out = the 8-bit head times x rounded to int8 per 32 inputs (needs int8_head_available())."""
    cdef Py_ssize_t N = wu.shape[0], D = wu.shape[1], nb = D // 32, n
    cdef float* buf
    cdef int8_t* xq
    if not q8_head_available():
        raise RuntimeError("the 8-bit head kernel is not available in this build / on this CPU")
    if N == 0:
        return
    buf = <float*>_scratch((3 * nb) * sizeof(float) + D, "activation scratch")
    xq = <int8_t*>(buf + 3 * nb)
    try:
        with nogil:
            q4_quantize_x_int8_blocks(&x[0], D, 1, xq, buf, buf + nb)
            q8_prep_x(xq, buf, nb, buf + 2 * nb)
            for n in prange(N, num_threads=num_threads, schedule="static"):
                out[n] = q8_dot1(&wu[n, 0], &dw[n, 0], xq, buf, buf + 2 * nb, nb)
    finally:
        free(buf)


include "_decode_stack.pxi"


def q8_matvec_f32(const float[:, ::1] x,        # IN  [M, D] fp32, as given
                  const uint8_t[:, ::1] wu,     # IN  [N, D] codes + 128 (q8_quantize_rows)
                  const float[:, ::1] dw,       # IN  [N, D/32]
                  float[:, ::1] out,            # OUT [M, N]
                  int num_threads):
    """out = x times the 8-bit weight, fp32 activations unrounded (_q4decode.h q8_dot_f32, every build)."""
    cdef Py_ssize_t M = x.shape[0], N = wu.shape[0], nb = wu.shape[1] // 32, n, m
    if M == 0 or N == 0:
        return
    with nogil:
        for n in prange(N, num_threads=num_threads, schedule="static"):
            for m in range(M):
                out[m, n] = q8_dot_f32(&wu[n, 0], &dw[n, 0], &x[m, 0], nb)
