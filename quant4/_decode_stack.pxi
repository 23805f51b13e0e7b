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

from libc.stdlib cimport calloc
from libc.string cimport memcpy
from libc.math cimport sqrtf

cdef extern from "_q4decode.h" nogil:
    void q4_rms_norm(const float* x, const float* w, Py_ssize_t n, float eps, float* out) noexcept
    void q4_rope(float* x, Py_ssize_t heads, Py_ssize_t d, const float* cs, const float* sn) noexcept
    void q4_attend_head(const float* q, const float* k, const float* v, Py_ssize_t d, Py_ssize_t T,
                        float scale, float* s, float* out) noexcept
    void q4_silu_mul(float* gate, const float* up, Py_ssize_t n) noexcept
    void q4_add_into(float* y, const float* x, Py_ssize_t n) noexcept
    float q8_dot_f32(const uint8_t* u, const float* d, const float* x, Py_ssize_t nb) noexcept


ctypedef struct Q4Group:
    # the weights one input feeds (q/k/v; w1/w3; wo; w2), run in one parallel loop over all their rows
    Q4Rows w[3]
    float* out[3]
    Py_ssize_t start[4]     # first work unit of each weight (a row, or Q4_DR rows for fp32-decode); start[nw]: all
    int nw
    int threads
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
    for u in prange(g.start[g.nw], num_threads=g.threads, schedule="guided", chunksize=16):
        j = 0
        while u >= g.start[j + 1]:
            j = j + 1
        n = u - g.start[j]
        if g.int8:
            g.out[j][n] = q4_dot1_int8(g.w[j].qw + n * g.w[j].ldq, g.w[j].sc + n * g.w[j].G,
                                       _zeros_row(&g.w[j], n), xq, d, xsw[j], g.w[j].G, g.w[j].cpg) + \
                          (g.w[j].bias[n] if g.w[j].bias != NULL else 0.0)
        else:
            _decode_rows(&g.w[j], xp, 1, n * Q4_DR, g.out[j], g.w[j].N, g.multi_row)


cdef class DecodeStack:
    """Raw state of the lean decode path: the layers' weight views and caches as pointers, and the activation
    buffers of one step. Built and kept alive (with every array it points into) by quant4.decode.DecodeStack;
    not for concurrent use (one per generation)."""
    cdef DecLayer* layers
    cdef Py_ssize_t n_layers, dim, hidden, H, Hkv, D, Tmax, kmax, min_work
    cdef float eps, scale
    cdef int threads
    cdef const float* norm
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
        None)], the group's weights in output order: qkv (q, k, v), wo, w13 (w1, w3), w2. zeros may be None
        (every zero is 0) for int8-decode only."""
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
        g.start[0] = 0
        for j in range(len(weights)):
            qw, sc, zr, gs, bias = weights[j]
            if zr is None and not int8:
                raise ValueError("zeros=None (symmetric weights) is only for the int8-decode kernel")
            g.w[j] = _rows(qw, sc, zr, gs, bias)
            g.out[j] = outs[j]
            g.start[j + 1] = g.start[j] + (g.w[j].N if int8 else (g.w[j].N + Q4_DR - 1) // Q4_DR)

    def set_layer(self, Py_ssize_t layer, const float[::1] attn_norm, const float[::1] ffn_norm,
                  float[:, :, ::1] kc, float[:, :, ::1] vc):
        cdef DecLayer* L = &self.layers[layer]
        L.attn_norm, L.ffn_norm, L.kc, L.vc = &attn_norm[0], &ffn_norm[0], &kc[0, 0, 0], &vc[0, 0, 0]

    def set_norm(self, const float[::1] norm):
        self.norm = &norm[0]

    def step(self, const float[::1] x, Py_ssize_t pos, const float[::1] cos, const float[::1] sin,
             float[::1] out):
        """out = the final RMSNorm of the last layer's output for embedding x at position pos (the layers'
        caches hold positions 0..pos-1; this writes pos). cos/sin: the RoPE table rows of pos."""
        cdef Py_ssize_t l, hh, dim = self.dim, D = self.D, T = pos + 1, grp = self.H // self.Hkv, hk
        cdef DecLayer* L
        cdef int athreads = self.threads if self.H * T * D >= self.min_work else 1
        with nogil:
            memcpy(self.h, &x[0], dim * sizeof(float))
            for l in range(self.n_layers):
                L = &self.layers[l]
                q4_rms_norm(self.h, L.attn_norm, dim, self.eps, self.xn)
                _run_group(&L.qkv, self.xn, self.xp, self.xq, self.d, self.xs)
                q4_rope(self.q, self.H, D, &cos[0], &sin[0])
                q4_rope(self.k, self.Hkv, D, &cos[0], &sin[0])
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
            q4_rms_norm(self.h, self.norm, dim, self.eps, &out[0])
