# One decode step (one token, batch 1) through a whole stack of Llama layers in a single call: the lean path
# quant4.decode drives for generation. A small model's PyTorch step pays microseconds of Python and dispatch
# per operation (a 135M model: about 1000 operations per token); here a token is one call.
#
# Per layer: RMSNorm; q/k/v in one parallel loop over all their rows; RoPE; k, v written into the cache at
# the position; attention over the cached positions (one loop over the query heads); wo; residual; RMSNorm;
# w1/w3 in one parallel loop; SiLU(gate) * up; w2; residual. The int4 products run the same row kernels on the
# same prepared activations as matmul() (int8-decode, or fp32-decode with the same multi-row choice), so each
# output is computed as matmul() computes it; the float parts are _q4decode.h.
#
# Included by _kernels.pyx. Everything here is checked by quant4/decode.py before it is called.

from cython.parallel cimport threadid
from libc.stdlib cimport calloc
from libc.string cimport memcpy
from libc.math cimport sqrtf

cdef extern from "_q4decode.h" nogil:
    void q4_rms_norm(const float* x, const float* w, Py_ssize_t n, float eps, float* out) noexcept
    void q4_rope(float* x, Py_ssize_t heads, Py_ssize_t d, const float* cs, const float* sn) noexcept
    void q4_attend_head(const float* q, const float* k, const float* v, Py_ssize_t d, Py_ssize_t T,
                        float scale, float* s, float* out) noexcept
    enum:
        Q4_AQ       # queries per prefill attention block
        Q4_AT       # positions per score block of it (K transposed, zero-padded to a multiple)
    void q4_attend_block(const float* q, Py_ssize_t ldq, int nq, const float* kt, Py_ssize_t ldt, const float* v,
                         Py_ssize_t d, Py_ssize_t T0, float scale, float* s, Py_ssize_t lds, float* out,
                         Py_ssize_t ldo) noexcept
    void q4_silu_mul(float* gate, const float* up, Py_ssize_t n) noexcept
    void q4_add_into(float* y, const float* x, Py_ssize_t n) noexcept
    float q8_dot_f32(const uint8_t* u, const float* d, const float* x, Py_ssize_t nb) noexcept


cdef enum:
    Q4_IR = 4       # weight rows per int8-decode unit (_dot_int8_rows4: their horizontal sums together)


ctypedef struct Q4Group:
    # the weights one input feeds (q/k/v; w1/w3; wo; w2), run in one parallel loop over all their rows
    Q4Rows w[3]
    const uint16_t* zfull[3]    # every weight's zeros, for the prefill kernels (w[j].zr may be NULL: int8-decode)
    float* out[3]
    Py_ssize_t start[4]     # first work unit of each weight (int8-decode: a slab16 set, or Q4_IR rows past the
                            # sets; fp32-decode: Q4_DR rows)
    int nw
    int threads
    int chunk               # work units per guided chunk: about 16 rows
    bint int8               # int8-decode; else fp32-decode
    bint multi_row          # fp32-decode: Q4_DR rows sharing each activation load


ctypedef struct DecLayer:
    Q4Group qkv, wo, w13, w2
    const float* attn_norm
    const float* ffn_norm
    float* kc               # [Hkv, Tmax, D] this layer's key cache
    float* vc


cdef void _run_group(const Q4Group* g, const float* x, float* xp, int8_t* xq, float* d, float* xs) noexcept nogil:
    # out_j = x . w_j^T (+ bias_j) for the group's weights; x is zero-padded to their common Kp
    cdef Py_ssize_t Kp = g.w[0].Kp, nb = Kp // 32, u, n
    cdef int j
    cdef const float* xsw[3]
    q4_permute_x(x, Kp, xp)
    if g.int8:
        for j in range(g.nw):
            if j == 0 or g.w[j].cpg != g.w[j - 1].cpg:
                q4_quantize_x_int8(xp, Kp, g.w[j].cpg, xq, d, xs + j * nb)
                xsw[j] = xs + j * nb
            else:
                xsw[j] = xsw[j - 1]
    # guided: each thread first takes a long contiguous run of rows (half, then a quarter, ...), the last runs
    # are short, so a thread slowed by this shared VM is not waited for at the end (7B Q4_0 decode, 18 rounds
    # in turns with the static split: median ratio 1.02, medians 8.38 / 8.53 against 8.22 / 8.17 tok/s)
    for u in prange(g.start[g.nw], num_threads=g.threads, schedule="guided", chunksize=g.chunk):
        j = 0
        while u >= g.start[j + 1]:
            j = j + 1
        n = u - g.start[j]
        if g.int8:
            if n < g.w[j].nset:     # a set of 16 rows in the slab16 layout
                _dot_int8_set16(&g.w[j], n, xq, d, xsw[j], 1, g.out[j], g.w[j].N)
            else:
                _dot_int8_rows4(&g.w[j], 16 * g.w[j].nset + (n - g.w[j].nset) * Q4_IR, xq, d, xsw[j], g.out[j])
        else:
            _decode_rows(&g.w[j], xp, 1, n * Q4_DR, g.out[j], g.w[j].N, g.multi_row)


cdef enum:
    PREFILL_SCRATCH = NB8 * KC8 + 2 * (NB8 * KC8 // 32) * 4    # bytes per thread: int8-prefill's codes and scales


cdef int _prefill_group(const Q4Group* g, const float* x, Py_ssize_t ldx, Py_ssize_t M, float** outs,
                        const Py_ssize_t* ldo, bint int8, float* xp, int8_t* xq, float* d, float* xs,
                        uint8_t* scratch, int threads) noexcept nogil:
    # outs[j] [M, ldo[j]] = the M rows x [M, ldx] times each of the group's weights, on the prefill kernel
    # ops.plan_matmul chooses for M > SMALL_M: int8-prefill (the activations rounded to int8 per 32-k block,
    # each thread repacking panels into its slice of scratch, PREFILL_SCRATCH bytes) or fp32-prefill. x is zero
    # beyond each row's K up to the weights' padded Kp. Returns -1 if fp32-prefill's scratch failed.
    cdef Py_ssize_t Kp = g.w[0].Kp, nb = Kp // 32, m, u, blk, n_units = 0
    cdef Py_ssize_t ustart[4]
    cdef const float* xsw[3]
    cdef Q4Rows w[3]
    cdef Q4Rows b
    cdef uint8_t* codes
    cdef float* fs
    cdef int j
    for j in range(g.nw):
        w[j] = g.w[j]
        w[j].zr = g.zfull[j]
        # the int8 codes and block scales do not depend on the group size; the group sums xs do
        xsw[j] = xsw[j - 1] if j > 0 and w[j].cpg == w[j - 1].cpg else xs + j * M * nb
        ustart[j] = n_units
        n_units += (w[j].N + NB8 - 1) // NB8
    ustart[g.nw] = n_units
    for m in prange(M, num_threads=threads, schedule="static"):
        q4_permute_x(x + m * ldx, Kp, xp + m * Kp)
        if int8:
            for j in range(g.nw):
                if j == 0 or xsw[j] != xsw[j - 1]:
                    q4_quantize_x_int8_blocks(xp + m * Kp, Kp, w[j].cpg, xq + m * Kp, d + m * nb,
                                              <float*>xsw[j] + m * w[j].G)
    if not int8:
        for j in range(g.nw):
            if _prefill(&w[j], xp, M, outs[j], ldo[j], threads) < 0:
                return -1
        return 0
    for u in prange(n_units, num_threads=threads, schedule="dynamic", chunksize=1):
        j = 0
        while u >= ustart[j + 1]:
            j = j + 1
        blk = u - ustart[j]
        b = _block(&w[j], blk * NB8)
        b.N = min(<Py_ssize_t>NB8, b.N)
        codes = scratch + threadid() * PREFILL_SCRATCH
        fs = <float*>(codes + NB8 * KC8)
        _prefill_block_int8(&b, xq, d, xsw[j], M, outs[j] + blk * NB8, ldo[j], codes, fs, fs + NB8 * KC8 // 32)
    return 0


cdef class DecodeStack:
    """Raw state of the lean decode path: the layers' weight views and caches as pointers, and the activation
    buffers of one step. Built and kept alive (with every array it points into) by quant4.decode.DecodeStack;
    not for concurrent use (one per generation)."""
    cdef DecLayer* layers
    cdef Py_ssize_t n_layers, dim, hidden, H, Hkv, D, Tmax, kmax, min_work
    cdef float eps, scale
    cdef int threads
    cdef const float* norm
    cdef const float* rope_cos      # RoPE tables bound by set_rope (rope_T rows), for step_at
    cdef const float* rope_sin
    cdef Py_ssize_t rope_T
    cdef float* buf
    cdef float* h
    cdef float* xn
    cdef float* q
    cdef float* k
    cdef float* v
    cdef float* att
    cdef float* o
    cdef float* gate
    cdef float* up
    cdef float* scores
    cdef float* xp
    cdef float* d
    cdef float* xs
    cdef int8_t* xq

    def __cinit__(self, Py_ssize_t n_layers, Py_ssize_t dim, Py_ssize_t hidden, Py_ssize_t H, Py_ssize_t Hkv,
                  Py_ssize_t D, Py_ssize_t Tmax, Py_ssize_t kmax, float eps, int threads, Py_ssize_t min_work):
        # kmax: the largest padded K of any weight (>= dim, hidden, H * D); every input buffer has kmax floats,
        # zero beyond what is written, so each weight reads its zero padding
        self.n_layers, self.dim, self.hidden, self.H, self.Hkv, self.D = n_layers, dim, hidden, H, Hkv, D
        self.Tmax, self.kmax, self.eps, self.threads, self.min_work = Tmax, kmax, eps, threads, min_work
        self.scale = 1.0 / sqrtf(<float>D)
        self.layers = <DecLayer*>calloc(n_layers if n_layers else 1, sizeof(DecLayer))
        # h, xn, q, k, v, att, o, gate, up, xp, d, xs (3 weights) and scores [H, Tmax]
        self.buf = <float*>calloc(9 * kmax + kmax + kmax // 32 + 3 * (kmax // 32) + H * Tmax + 16, sizeof(float))
        self.xq = <int8_t*>calloc(kmax + 64, 1)
        if self.layers == NULL or self.buf == NULL or self.xq == NULL:
            raise MemoryError("cannot allocate the decode step's buffers")
        self.h, self.xn, self.q = self.buf, self.buf + kmax, self.buf + 2 * kmax
        self.k, self.v, self.att = self.buf + 3 * kmax, self.buf + 4 * kmax, self.buf + 5 * kmax
        self.o, self.gate, self.up = self.buf + 6 * kmax, self.buf + 7 * kmax, self.buf + 8 * kmax
        self.xp = self.buf + 9 * kmax
        self.d = self.xp + kmax
        self.xs = self.d + kmax // 32
        self.scores = self.xs + 3 * (kmax // 32)

    def __dealloc__(self):
        free(self.layers)
        free(self.buf)
        free(self.xq)

    def set_group(self, Py_ssize_t layer, str which, list weights, int threads, bint int8, bint multi_row):
        """weights: [(qweight uint8 [N, Kp/2], scales / zeros uint16 [N, G], group_size, bias float32 [N] or
        None, zeros uint16 [N, G] for prefill, slab16)], the group's weights in output order: qkv (q, k, v), wo,
        w13 (w1, w3), w2. The first zeros may be None (every zero is 0) for int8-decode only; the prefill kernels
        read the second. slab16: the weight is in that layout (int8 only; permute_slab16)."""
        cdef DecLayer* L = &self.layers[layer]
        cdef Q4Group* g
        cdef float* outs[3]
        cdef Py_ssize_t j
        if which == "qkv":
            g, outs[0], outs[1], outs[2] = &L.qkv, self.q, self.k, self.v
        elif which == "wo":
            g, outs[0] = &L.wo, self.o
        elif which == "w13":
            g, outs[0], outs[1] = &L.w13, self.gate, self.up
        else:
            g, outs[0] = &L.w2, self.o
        g.nw, g.threads, g.int8, g.multi_row = len(weights), threads, int8, multi_row
        g.chunk = 1 if any(w[6] for w in weights) else 4      # a slab16 set is 16 rows already
        g.start[0] = 0
        for j in range(len(weights)):
            qw, sc, zr, gs, bias, zfull, slab = weights[j]
            if zr is None and not int8:
                raise ValueError("zeros=None (symmetric weights) is only for the int8-decode kernel")
            if slab and not (int8 and slab16_available()):
                raise ValueError("a slab16 weight runs on the int8 kernels of an AVX512-VNNI build only")
            g.w[j] = _rows(qw, sc, zr, gs, bias, slab)
            g.zfull[j] = _rows(qw, sc, zfull, gs, bias).zr
            g.out[j] = outs[j]
            if int8:
                g.start[j + 1] = g.start[j] + g.w[j].nset + (g.w[j].N - 16 * g.w[j].nset + Q4_IR - 1) // Q4_IR
            else:
                g.start[j + 1] = g.start[j] + (g.w[j].N + Q4_DR - 1) // Q4_DR

    def set_layer(self, Py_ssize_t layer, const float[::1] attn_norm, const float[::1] ffn_norm,
                  float[:, :, ::1] kc, float[:, :, ::1] vc):
        cdef DecLayer* L = &self.layers[layer]
        L.attn_norm, L.ffn_norm, L.kc, L.vc = &attn_norm[0], &ffn_norm[0], &kc[0, 0, 0], &vc[0, 0, 0]

    def set_norm(self, const float[::1] norm):
        self.norm = &norm[0]

    def set_rope(self, const float[:, ::1] cos, const float[:, ::1] sin):
        """Bind RoPE tables [T, D/2] (rows = positions) for step_at; the caller keeps them alive."""
        self.rope_cos, self.rope_sin, self.rope_T = &cos[0, 0], &sin[0, 0], cos.shape[0]

    def step(self, const float[::1] x, Py_ssize_t pos, const float[::1] cos, const float[::1] sin,
             float[::1] out):
        """out = the final RMSNorm of the last layer's output for embedding x at position pos (the layers'
        caches hold positions 0..pos-1; this writes pos). cos/sin: the RoPE table rows of pos."""
        self._step(&x[0], pos, &cos[0], &sin[0], &out[0])

    def step_at(self, const float[::1] x, Py_ssize_t pos, float[::1] out):
        """step() with the RoPE rows of pos from the tables bound by set_rope."""
        if pos < 0 or pos >= self.Tmax or pos >= self.rope_T:
            raise ValueError(f"pos {pos} outside the caches ({self.Tmax}) or the bound RoPE tables ({self.rope_T})")
        self._step(&x[0], pos, self.rope_cos + pos * (self.D // 2), self.rope_sin + pos * (self.D // 2), &out[0])

    cdef void _step(self, const float* x, Py_ssize_t pos, const float* cs, const float* sn, float* out) noexcept:
        cdef Py_ssize_t l, hh, dim = self.dim, D = self.D, T = pos + 1, grp = self.H // self.Hkv, hk
        cdef DecLayer* L
        cdef int athreads = self.threads if self.H * T * D >= self.min_work else 1
        with nogil:
            memcpy(self.h, x, dim * sizeof(float))
            for l in range(self.n_layers):
                L = &self.layers[l]
                q4_rms_norm(self.h, L.attn_norm, dim, self.eps, self.xn)
                _run_group(&L.qkv, self.xn, self.xp, self.xq, self.d, self.xs)
                q4_rope(self.q, self.H, D, cs, sn)
                q4_rope(self.k, self.Hkv, D, cs, sn)
                for hk in range(self.Hkv):
                    memcpy(L.kc + (hk * self.Tmax + pos) * D, self.k + hk * D, D * sizeof(float))
                    memcpy(L.vc + (hk * self.Tmax + pos) * D, self.v + hk * D, D * sizeof(float))
                for hh in prange(self.H, num_threads=athreads, schedule="static"):
                    q4_attend_head(self.q + hh * D, L.kc + (hh // grp) * self.Tmax * D,
                                   L.vc + (hh // grp) * self.Tmax * D, D, T, self.scale,
                                   self.scores + hh * self.Tmax, self.att + hh * D)
                _run_group(&L.wo, self.att, self.xp, self.xq, self.d, self.xs)
                q4_add_into(self.h, self.o, dim)
                q4_rms_norm(self.h, L.ffn_norm, dim, self.eps, self.xn)
                _run_group(&L.w13, self.xn, self.xp, self.xq, self.d, self.xs)
                q4_silu_mul(self.gate, self.up, self.hidden)
                _run_group(&L.w2, self.gate, self.xp, self.xq, self.d, self.xs)
                q4_add_into(self.h, self.o, dim)
            q4_rms_norm(self.h, self.norm, dim, self.eps, out)

    def prefill(self, const float[:, ::1] x, Py_ssize_t pos0, const float[:, ::1] cos, const float[:, ::1] sin,
                float[::1] out, bint int8_prefill):
        """out = the final RMSNorm of the last layer's output for the last of the M embeddings x [M, dim] at
        positions pos0..pos0+M-1 (the caches hold positions < pos0; this writes pos0..pos0+M-1), each
        projection on the prefill kernel (int8_prefill: int8-prefill, else fp32-prefill). cos/sin [M, D/2]:
        the RoPE table rows of those positions. Causal attention: position p sees positions <= p."""
        cdef Py_ssize_t M = x.shape[0], dim = self.dim, D = self.D, H = self.H, Hkv = self.Hkv
        cdef Py_ssize_t kmax = self.kmax, kd = Hkv * D, nb = kmax // 32, Tmax = self.Tmax, grp = H // Hkv
        cdef Py_ssize_t l, m, u, hh, hk, nf, t, i, m0, T = pos0 + M
        cdef Py_ssize_t ldt = (T + Q4_AT - 1) // Q4_AT * Q4_AT, nqb = (M + Q4_AQ - 1) // Q4_AQ
        cdef bint blocked = D % 16 == 0     # q4_attend_block's vectors; else a query at a time
        cdef int threads = self.threads, failed = 0
        cdef int athreads = threads if H * M * (pos0 + M) * D >= self.min_work else 1
        cdef DecLayer* L
        cdef float* outs[3]
        cdef Py_ssize_t ldo[3]
        cdef float* h
        cdef float* o
        cdef float* xn
        cdef float* q
        cdef float* att
        cdef float* gate
        cdef float* up
        cdef float* xp
        cdef float* k
        cdef float* v
        cdef float* d
        cdef float* xs
        cdef float* scores
        cdef float* kt
        # h, o [M, dim]; xn, q, att, gate, up, xp [M, kmax] (zero beyond what is written: the padding a weight
        # reads); k, v [M, kd]; d [M, nb]; xs [3, M, nb]; scores [threads, Q4_AQ, ldt]; kt [Hkv, D, ldt] (the
        # keys transposed for q4_attend_block, zero beyond T)
        nf = 2 * M * dim + 6 * M * kmax + 2 * M * kd + 4 * M * nb + threads * Q4_AQ * ldt + Hkv * D * ldt
        cdef float* fb = <float*>calloc(nf, sizeof(float))
        cdef int8_t* xq = <int8_t*>malloc(M * kmax + 64)
        cdef uint8_t* scratch = <uint8_t*>malloc(threads * PREFILL_SCRATCH + 64)
        try:
            if fb == NULL or xq == NULL or scratch == NULL:
                raise MemoryError(f"cannot allocate the buffers of a {M}-token prefill")
            h, o = fb, fb + M * dim
            xn, q, att = o + M * dim, o + M * dim + M * kmax, o + M * dim + 2 * M * kmax
            gate, up, xp = att + M * kmax, att + 2 * M * kmax, att + 3 * M * kmax
            k, v = xp + M * kmax, xp + M * kmax + M * kd
            d = v + M * kd
            xs = d + M * nb
            scores = xs + 3 * M * nb
            kt = scores + threads * Q4_AQ * ldt
            with nogil:
                memcpy(h, &x[0, 0], M * dim * sizeof(float))
                for l in range(self.n_layers):
                    L = &self.layers[l]
                    for m in prange(M, num_threads=threads, schedule="static"):
                        q4_rms_norm(h + m * dim, L.attn_norm, dim, self.eps, xn + m * kmax)
                    outs[0], outs[1], outs[2] = q, k, v
                    ldo[0], ldo[1], ldo[2] = kmax, kd, kd
                    failed |= _prefill_group(&L.qkv, xn, kmax, M, outs, ldo, int8_prefill, xp, xq, d, xs,
                                             scratch, threads)
                    for m in prange(M, num_threads=threads, schedule="static"):
                        q4_rope(q + m * kmax, H, D, &cos[m, 0], &sin[m, 0])
                        q4_rope(k + m * kd, Hkv, D, &cos[m, 0], &sin[m, 0])
                        for hk in range(Hkv):
                            memcpy(L.kc + (hk * Tmax + pos0 + m) * D, k + m * kd + hk * D, D * sizeof(float))
                            memcpy(L.vc + (hk * Tmax + pos0 + m) * D, v + m * kd + hk * D, D * sizeof(float))
                    if blocked:
                        for hk in prange(Hkv, num_threads=athreads, schedule="static"):
                            for t in range(T):
                                for i in range(D):
                                    kt[(hk * D + i) * ldt + t] = L.kc[(hk * Tmax + t) * D + i]
                        for u in prange(H * nqb, num_threads=athreads, schedule="dynamic", chunksize=1):
                            m0, hh = u // H * Q4_AQ, u % H
                            q4_attend_block(q + m0 * kmax + hh * D, kmax, <int>min(<Py_ssize_t>Q4_AQ, M - m0),
                                            kt + (hh // grp) * D * ldt, ldt, L.vc + (hh // grp) * Tmax * D, D,
                                            pos0 + m0 + 1, self.scale, scores + threadid() * Q4_AQ * ldt, ldt,
                                            att + m0 * kmax + hh * D, kmax)
                    else:
                        for u in prange(H * M, num_threads=athreads, schedule="dynamic", chunksize=1):
                            m, hh = u // H, u % H
                            q4_attend_head(q + m * kmax + hh * D, L.kc + (hh // grp) * Tmax * D,
                                           L.vc + (hh // grp) * Tmax * D, D, pos0 + m + 1, self.scale,
                                           scores + threadid() * Q4_AQ * ldt, att + m * kmax + hh * D)
                    outs[0], ldo[0] = o, dim
                    failed |= _prefill_group(&L.wo, att, kmax, M, outs, ldo, int8_prefill, xp, xq, d, xs,
                                             scratch, threads)
                    q4_add_into(h, o, M * dim)
                    for m in prange(M, num_threads=threads, schedule="static"):
                        q4_rms_norm(h + m * dim, L.ffn_norm, dim, self.eps, xn + m * kmax)
                    outs[0], outs[1] = gate, up
                    ldo[0], ldo[1] = kmax, kmax
                    failed |= _prefill_group(&L.w13, xn, kmax, M, outs, ldo, int8_prefill, xp, xq, d, xs,
                                             scratch, threads)
                    for m in prange(M, num_threads=threads, schedule="static"):
                        q4_silu_mul(gate + m * kmax, up + m * kmax, self.hidden)
                    outs[0], ldo[0] = o, dim
                    failed |= _prefill_group(&L.w2, gate, kmax, M, outs, ldo, int8_prefill, xp, xq, d, xs,
                                             scratch, threads)
                    q4_add_into(h, o, M * dim)
                q4_rms_norm(h + (M - 1) * dim, self.norm, dim, self.eps, &out[0])
            if failed:
                raise MemoryError("cannot allocate the prefill kernels' per-thread scratch")
        finally:
            free(fb)
            free(xq)
            free(scratch)
