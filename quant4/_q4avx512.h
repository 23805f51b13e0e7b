/* quant4's AVX-512 kernels, written with intrinsics: instructions that GCC/Clang vector extensions cannot
 * express and the auto-vectorizer does not emit from plain loops.
 *
 *   vdpbf16ps (AVX512-BF16)  bf16 pair dot products into fp32: the bf16 prefill tile (q4_tile_bf16) and the
 *                            exact-weight bf16 decode (q4_dot_bf16)
 *   vpternlogd (AVX512-F)    one op that merges two nibbles into the bf16 pair (16 + q_j, 16 + q_j+4)
 *   vpermw (AVX512-BW)       interleaves the bf16 weights of k and k + 1 into dword pairs (q4_pack_slab_bf16)
 *   vpdpbusd (AVX512-VNNI)   u8 x s8 dot products of four pairs into int32: the int8-activation decode
 *                            (q4_dot1_int8); AVX2 builds compile the same kernel with vpmaddubsw + vpmaddwd
 *   vcvtph2ps, reductions    the per-group zero terms (q4_zero_term_off)
 *
 * Only the _kernels_avx512 build has these instructions (setup.py adds -mavx512bf16 / -mavx512vnni when the
 * compiler accepts them); every other build compiles the stubs at the end of each section, which are never
 * called: q4_bf16_available() / q4_int8_available() also check the CPU at run time, and quant4/ops.py only
 * dispatches to a kernel that is available. */
#ifndef QUANT4_Q4AVX512_H
#define QUANT4_Q4AVX512_H
#include "_q4simd.h"

/* ---------------------------------------------------------------------------------------------------
 * bf16 prefill (AVX512-BF16 builds only): for bfloat16 activations in prefill, weights are
 * dequantized to bfloat16 (round to nearest even) and multiplied with vdpbf16ps, which does 32
 * multiply-adds per instruction into fp32 accumulators: twice the fp32 FMA rate. Precision is that of
 * bf16 inputs (PyTorch's int4 op also dequantizes to bf16 for bf16 activations). A vdpbf16ps lane sums the
 * products of an adjacent pair (k, k + 1), the two nibbles of one packed byte, so the activations keep their
 * natural order (q4_pack_slab_bf16 below). Other builds compile stubs that are never called (q4_bf16_available() == 0). */
#if defined(__AVX512F__)
/* sum_g (zero_g - off * scale_g) * xs_g over one row's G groups; zr == NULL: every zero is 0 */
static inline float q4_zero_term_off(const uint16_t *sc, const uint16_t *zr, const float *xs, ptrdiff_t G, float off) {
    __m512 acc = _mm512_setzero_ps();
    ptrdiff_t gi = 0;
    for (; gi + 16 <= G; gi += 16) {
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + gi)));
        const __m512 z = zr ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zr + gi))) : _mm512_setzero_ps();
        acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(off), s, z), _mm512_loadu_ps(xs + gi), acc);
    }
    float t = _mm512_reduce_add_ps(acc);
    for (; gi < G; gi++) {
        const float s = q4_half_to_float(sc[gi]);
        t += ((zr ? q4_half_to_float(zr[gi]) : 0.0f) - off * s) * xs[gi];
    }
    return t;
}
#endif

#if defined(__AVX512BW__)
/* The cases of a prefill tile's dispatch on its row count tm (CALL(TM) runs the instance for TM rows) */
#define Q4_TM_CASES_6_5(CALL) case 6: CALL(6); break; case 5: CALL(5); break;
#define Q4_TM_CASES_4_1(CALL) case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; \
                              default: CALL(1); break;
/* A prefill tile's epilogue: acc[m][v] (tm rows x nv slabs of 16 columns) set into out[m][col + 16 v + i]
 * (first panel, + bias) or added to it, for the ncols valid columns. Inlined into each tile instance with its
 * constant tm and nv, so acc stays in registers. */
static inline __attribute__((always_inline)) void q4_tile_store(__m512 (*acc)[2], int tm, int nv,
                                                                float *const *out, ptrdiff_t col,
                                                                const float *bias, int ncols, int first) {
    for (int v = 0; v < nv; v++) {
        const int cols = ncols - 16 * v < 16 ? ncols - 16 * v : 16;
        if (cols <= 0) break;
        const __mmask16 k = (__mmask16)((1u << cols) - 1u);
        const __m512 bv = (first && bias) ? _mm512_maskz_loadu_ps(k, bias + 16 * v) : _mm512_setzero_ps();
        for (int m = 0; m < tm; m++) {
            float *o = out[m] + col + 16 * v;
            const __m512 prev = first ? bv : _mm512_maskz_loadu_ps(k, o);
            _mm512_mask_storeu_ps(o, k, _mm512_add_ps(prev, acc[m][v]));
        }
    }
}
/* The 16 packed bytes at byte offset off of 16 rows r[0..15] (one 32-k block of a slab), as four vectors:
 * dword lane 4i + q of p[j] is dword j of row 4i + q (loads into 128-bit lanes, then a 4 x 4 dword transpose
 * inside each lane). Shared by the bf16 and int8 slab packers. */
static inline void q4_slab_dwords(const uint8_t *const *r, ptrdiff_t off, __m512i p[4]) {
    __m512i a[4];
    for (int q = 0; q < 4; q++) {   /* 128-bit lane i of a[q]: the block's 16 bytes of row 4i + q */
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(r[q] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(r[q + 4] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(r[q + 8] + off)), 2);
        a[q] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(r[q + 12] + off)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    p[0] = _mm512_unpacklo_epi64(t0, t2);
    p[1] = _mm512_unpackhi_epi64(t0, t2);
    p[2] = _mm512_unpacklo_epi64(t1, t3);
    p[3] = _mm512_unpackhi_epi64(t1, t3);
}
#endif

/* bf16 prefill tile rows (see q4_tile_bf16) */
#ifndef Q4_BF_TM
#define Q4_BF_TM 6
#endif
#if defined(__AVX512BF16__)
static inline int q4_bf16_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}
/* bf16 prefill. Per k panel, 16 weight rows (a slab) are dequantized into per-thread scratch as pair vectors:
 * dword r of pair vector p of 32-k block b holds row r's weights k = 32 b + 2 p (low half) and 32 b + 2 p + 1
 * (high half), the two nibbles of packed byte p, each q * scale + (zero - 8 scale) in fp32 (as q4_group_lut
 * computes it) rounded to bf16 (round to nearest even, as PyTorch's int4 op dequantizes for bf16 inputs). One
 * vdpbf16ps of a pair vector with the activation pair (x[k], x[k + 1]) broadcast to every dword then advances
 * 16 output columns: no horizontal sums, no per-group work in the tile, activations in their natural order.
 * The register tile is Q4_BF_TM activation rows x 2 slabs (32 output columns). */
/* Rows [0, rows) (rows <= 16; missing rows get scale and zero 0) of a weight, blocks [b0, b0 + nb) (whole
 * groups) -> dst [nb][16 pairs][16 dwords] */
static inline void q4_pack_slab_bf16(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                                     ptrdiff_t G, ptrdiff_t rows, ptrdiff_t b0, ptrdiff_t nb, ptrdiff_t cpg,
                                     uint32_t *dst) {
    const uint8_t *r[16];
    for (int i = 0; i < 16; i++) r[i] = w + (i < rows ? i : rows - 1) * ldq;
    const __m512i m4 = _mm512_set1_epi32(15);
    /* word 2i <- word i (low halves: the even k), word 2i + 1 <- word 16 + i (the odd k) */
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    float sv[16], zv[16];
    __m512 s = _mm512_setzero_ps(), zm = _mm512_setzero_ps();
    for (ptrdiff_t b = 0; b < nb; b++) {
        if (b % cpg == 0) {     /* lane i: row i's scale and zero - 8 scale of this group */
            const ptrdiff_t g = (b0 + b) / cpg;
            for (int i = 0; i < 16; i++) {
                sv[i] = i < rows ? q4_half_to_float(sc[i * G + g]) : 0.0f;
                zv[i] = i < rows ? q4_half_to_float(zr[i * G + g]) - 8.0f * sv[i] : 0.0f;
            }
            s = _mm512_loadu_ps(sv);
            zm = _mm512_loadu_ps(zv);
        }
        __m512i p[4];
        q4_slab_dwords(r, 16 * (b0 + b), p);
        uint32_t *d = dst + 256 * b;
        for (int j = 0; j < 4; j++)
            for (int t = 0; t < 4; t++) {   /* byte t of dword j: packed byte 4j + t */
                const __m512i qlo = _mm512_and_si512(_mm512_srli_epi32(p[j], 8 * t), m4);
                const __m512i qhi = _mm512_and_si512(_mm512_srli_epi32(p[j], 8 * t + 4), m4);
                const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qlo), s, zm);
                const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qhi), s, zm);
                const __m512i pr = _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512((void *)(d + 16 * (4 * j + t)), pr);
            }
    }
}
static inline void q4_tile_bf16_impl(const uint16_t *const *x, const uint32_t *w0, const uint32_t *w1,
                                     ptrdiff_t np, float *const *out, ptrdiff_t col, const float *bias, int ncols,
                                     int first, const int tm, const int nv) {
    __m512 acc[Q4_BF_TM][2];
    for (int m = 0; m < tm; m++)
        for (int v = 0; v < nv; v++) acc[m][v] = _mm512_setzero_ps();
    for (ptrdiff_t p = 0; p < np; p++) {
        const __m512bh a0 = (__m512bh)_mm512_loadu_si512((const void *)(w0 + 16 * p));
        const __m512bh a1 = nv > 1 ? (__m512bh)_mm512_loadu_si512((const void *)(w1 + 16 * p)) : a0;
        for (int m = 0; m < tm; m++) {
            int32_t x2;
            memcpy(&x2, x[m] + 2 * p, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(x2);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, a0);
            if (nv > 1) acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, a1);
        }
    }
    q4_tile_store(acc, tm, nv, out, col, bias, ncols, first);
}
/* tm (1..Q4_BF_TM) activation rows (bf16, natural order, from the panel's first k) x nv (1 or 2) packed slabs
 * over np k pairs; out[m][col + 16 v + i] is set (first panel, + bias) or accumulated for ncols columns */
Q4_KERNEL void q4_tile_bf16(const uint16_t *const *x, const uint32_t *w0, const uint32_t *w1, ptrdiff_t np,
                            float *const *out, ptrdiff_t col, const float *bias, int ncols, int first, int tm,
                            int nv) {
#define Q4_TILE_BF16(TM, NV) q4_tile_bf16_impl(x, w0, w1, np, out, col, bias, ncols, first, TM, NV)
#define Q4_TILE_BF16_NV(TM) if (nv == 2) Q4_TILE_BF16(TM, 2); else Q4_TILE_BF16(TM, 1)
    switch (tm) {
#if Q4_BF_TM >= 8
    case 8: Q4_TILE_BF16_NV(8); break;
    case 7: Q4_TILE_BF16_NV(7); break;
#endif
#if Q4_BF_TM >= 6
    Q4_TM_CASES_6_5(Q4_TILE_BF16_NV)
#endif
    Q4_TM_CASES_4_1(Q4_TILE_BF16_NV)
    }
#undef Q4_TILE_BF16_NV
#undef Q4_TILE_BF16
}

/* Decode with bf16 activations, exact weights (M = 1..4; Kp % 128 == 0). A 64-byte run of one weight row holds
 * 128 codes as 16 int32 lanes; lane i holds k = 8i..8i+7, nibble j at bits 4j. One shift and one ternary
 * logic op turn nibbles j and j+4 of every lane into the bf16 pair (16 + q_j, 16 + q_{j+4}) (exponent 2^4,
 * the code in the top mantissa bits: exact), and vdpbf16ps multiplies them with the activation pairs
 * (x[8i+j], x[8i+j+4]) in fp32 -- products of two bf16 are exact. Per 128 weights that is 4 shifts, 4
 * ternlogs and 4 dot products against 16 lookups + 16 FMAs in the fp32 kernel. The per-lane sums
 * sum x (16 + q) are scaled by the lane's group scale; the 16 sum x they carry joins the zero term, which is
 * then sum_g (zero_g - 24 scale_g) * (sum of x over group g). */
/* x bf16 [Kp] -> xb (pairs in the lane order above), xs[G] = group sums */
static inline void q4_prep_x_dec_bf16(const uint16_t *x, ptrdiff_t Kp, ptrdiff_t g, uint16_t *xb, float *xs) {
    for (ptrdiff_t c = 0; c < Kp / 128; c++)
        for (int i = 0; i < 16; i++) {
            const uint16_t *v = x + 128 * c + 8 * i;
            for (int p = 0; p < 4; p++) {
                xb[128 * c + 32 * p + 2 * i] = v[p];
                xb[128 * c + 32 * p + 2 * i + 1] = v[p + 4];
            }
        }
    for (ptrdiff_t gi = 0; gi < Kp / g; gi++) {
        float sum = 0.0f;
        for (ptrdiff_t k = gi * g; k < (gi + 1) * g; k++) {
            uint32_t bits = (uint32_t)x[k] << 16;
            float f;
            memcpy(&f, &bits, 4);
            sum += f;
        }
        xs[gi] = sum;
    }
}
/* the 16 lane scales of 128-k chunk c of a row (lane i belongs to group (128 c + 8 i) >> lg) */
static inline __m512 q4_chunk_scales(const uint16_t *sc, ptrdiff_t c, const int lg) {
    if (lg == 5) {
        const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(sc + 4 * c)));
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                     _mm512_castps128_ps512(s4));
    }
    if (lg == 6) {
        int32_t two;
        memcpy(&two, sc + 2 * c, 4);
        const __m128 s2 = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castps128_ps512(s2));
    }
    return _mm512_set1_ps(q4_half_to_float(sc[lg == 7 ? c : c >> 1]));
}
/* software prefetch of the weight stream (rows are contiguous), into L2: measured 256 B - 16 KB ahead, T0 vs T1
 * (T1 was 10% faster for K = 11008, where the activation scratch fills L1) */
#ifndef Q4_PF_HINT
#define Q4_PF_HINT _MM_HINT_T1
#endif
#ifndef Q4_PF_BYTES
#define Q4_PF_BYTES 4096
#endif
static inline void q4_dot_bf16_impl(const uint8_t *w, const uint16_t *sc, const uint16_t *zr,
                                    const uint16_t *const *xb, const float *const *xs,
                                    ptrdiff_t Kp, ptrdiff_t G, float *out, const int nx, const int lg) {
    const __m512i nib = _mm512_set1_epi32(0x00780078), exp16 = _mm512_set1_epi32(0x41804180);
    __m512 tot[4];
    for (int i = 0; i < nx; i++) tot[i] = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < Kp / 128; c++) {
        _mm_prefetch((const char *)(w + 64 * c + Q4_PF_BYTES), Q4_PF_HINT);
        const __m512i v = _mm512_loadu_si512((const void *)(w + 64 * c));
        const __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi32(v, 3), nib, exp16, 0xEA);
        const __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 1), nib, exp16, 0xEA);
        const __m512bh w2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 5), nib, exp16, 0xEA);
        const __m512bh w3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 9), nib, exp16, 0xEA);
        const __m512 s = q4_chunk_scales(sc, c, lg);
        for (int i = 0; i < nx; i++) {
            const uint16_t *xc = xb[i] + 128 * c;
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void *)xc), w0);
            b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512((const void *)(xc + 32)), w1);
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void *)(xc + 64)), w2);
            b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512((const void *)(xc + 96)), w3);
            tot[i] = _mm512_fmadd_ps(s, _mm512_add_ps(a, b), tot[i]);
        }
    }
    for (int i = 0; i < nx; i++) out[i] = _mm512_reduce_add_ps(tot[i]) + q4_zero_term_off(sc, zr, xs[i], G, 24.0f);
}
/* one weight row against nx (1, 2 or 4) activation rows: out[i] = dot(w, x_i); group size 1 << lg */
Q4_KERNEL void q4_dot_bf16(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const uint16_t *const *xb,
                           const float *const *xs, ptrdiff_t Kp, ptrdiff_t G, int lg, int nx, float *out) {
#define Q4_DOT_BF16_CASE(NX, LG) q4_dot_bf16_impl(w, sc, zr, xb, xs, Kp, G, out, NX, LG)
#define Q4_DOT_BF16_NX(NX) switch (lg) { case 5: Q4_DOT_BF16_CASE(NX, 5); break; case 6: Q4_DOT_BF16_CASE(NX, 6); break; \
                                         case 7: Q4_DOT_BF16_CASE(NX, 7); break; default: Q4_DOT_BF16_CASE(NX, 8); }
    if (nx == 1) { Q4_DOT_BF16_NX(1) }
    else if (nx == 2) { Q4_DOT_BF16_NX(2) }
    else { Q4_DOT_BF16_NX(4) }
#undef Q4_DOT_BF16_NX
#undef Q4_DOT_BF16_CASE
}
#else
static inline void q4_prep_x_dec_bf16(const uint16_t *x, ptrdiff_t Kp, ptrdiff_t g, uint16_t *xb, float *xs) {
    (void)x; (void)Kp; (void)g; (void)xb; (void)xs;
}
Q4_KERNEL void q4_dot_bf16(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const uint16_t *const *xb,
                           const float *const *xs, ptrdiff_t Kp, ptrdiff_t G, int lg, int nx, float *out) {
    (void)w; (void)sc; (void)zr; (void)xb; (void)xs; (void)Kp; (void)G; (void)lg; (void)nx; (void)out;
}
static inline int q4_bf16_available(void) { return 0; }
static inline void q4_pack_slab_bf16(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                                     ptrdiff_t G, ptrdiff_t rows, ptrdiff_t b0, ptrdiff_t nb, ptrdiff_t cpg,
                                     uint32_t *dst) {
    (void)w; (void)ldq; (void)sc; (void)zr; (void)G; (void)rows; (void)b0; (void)nb; (void)cpg; (void)dst;
}
Q4_KERNEL void q4_tile_bf16(const uint16_t *const *x, const uint32_t *w0, const uint32_t *w1, ptrdiff_t np,
                            float *const *out, ptrdiff_t col, const float *bias, int ncols, int first, int tm,
                            int nv) {
    (void)x; (void)w0; (void)w1; (void)np; (void)out; (void)col; (void)bias; (void)ncols; (void)first; (void)tm;
    (void)nv;
}
#endif

/* ---------------------------------------------------------------------------------------------------
 * int8-activation decode (AVX512-VNNI and AVX2 builds): activations are quantized per 32-k block to
 * int8 with scale d_b = absmax_b / 127 (round to nearest even), and each 32-weight block's dot product
 * is one vpdpbusd of the raw 0..15 codes (u8) with the int8 activations, then scaled in float:
 *     y = sum_b scale_g(b) * d_b * sum_{k in b} xq_k q_k  +  sum_g (zero_g - 8 scale_g) * sum_{k in g} x_k
 * where the last sums use the exact float activations. About half the instructions of the fp32 kernel per
 * weight; the cost is the activation rounding (error <= d_b / 2 per element), measured in README. */
#if defined(__AVX2__)
/* x [Kp] fp32 (permuted order) -> xq [Kp] int8, d [Kp/32] block scales, xs [G] group sums (group = cpg blocks) */
/* the rounding shared by decode and prefill: x [Kp] fp32 (permuted order) -> xq [Kp] int8 in the same order,
 * d [Kp/32] block scales, xs [G] exact group sums */
static inline void q4_quantize_x_int8_blocks(const float *xp, ptrdiff_t Kp, ptrdiff_t cpg, int8_t *xq, float *d,
                                             float *xs) {
    for (ptrdiff_t b = 0; b < Kp / 32; b++) {
        const float *v = xp + 32 * b;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = v[j] < 0 ? -v[j] : v[j];
            amax = a > amax ? a : amax;
            sum += v[j];
        }
        const float db = amax / 127.0f;
        const float inv = db > 0 ? 1.0f / db : 0.0f;
        for (int j = 0; j < 32; j++) xq[32 * b + j] = (int8_t)__builtin_rintf(v[j] * inv);
        d[b] = db;
        if (b % cpg == 0) xs[b / cpg] = 0.0f;
        xs[b / cpg] += sum;
    }
}
/* Runs of blocks the decode kernel multiplies per load: 4 (64 packed bytes, one zmm) on AVX512-VNNI builds,
 * 2 (32 bytes, one ymm) on AVX2 builds */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q4_I8_RUN 4
#else
#define Q4_I8_RUN 2
#endif
/* blocks b..b+r-1 of xq -> [evens b | ... | evens b+r-1 | odds b | ... | odds b+r-1] */
static inline void q4_interleave_blocks(int8_t *xq, int r) {
    int8_t t[32 * Q4_I8_RUN];
    for (int i = 0; i < r; i++) {
        memcpy(t + 16 * i, xq + 32 * i, 16);
        memcpy(t + 16 * (r + i), xq + 32 * i + 16, 16);
    }
    memcpy(xq, t, (size_t)(32 * r));
}
/* for the decode kernel: the rounding above, then runs of Q4_I8_RUN blocks reordered into the order in which
 * their packed bytes unpack (low nibbles of all, then high nibbles of all); a shorter tail: a pair the same
 * way, then a lone block as it is ([evens | odds]) */
static inline void q4_quantize_x_int8(const float *xp, ptrdiff_t Kp, ptrdiff_t cpg, int8_t *xq, float *d,
                                      float *xs) {
    q4_quantize_x_int8_blocks(xp, Kp, cpg, xq, d, xs);
    ptrdiff_t b = 0;
    for (; b + Q4_I8_RUN <= Kp / 32; b += Q4_I8_RUN) q4_interleave_blocks(xq + 32 * b, Q4_I8_RUN);
    for (; b + 2 <= Kp / 32; b += 2) q4_interleave_blocks(xq + 32 * b, 2);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline int q4_int8_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}
/* The int8 dot products of 64 weights (the two 16-byte chunks from c on) with their activations: low nibbles
 * against xq[32c .. 32c + 31], high nibbles against the next 32; 8 int32 lanes, lanes 0-3 from chunk c. */
static inline __m256i q4_dot64_int8(const uint8_t *w, const int8_t *xq, ptrdiff_t c, __m256i mask) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * c));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo,
                                            _mm256_loadu_si256((const __m256i *)(xq + 32 * c)));
    return _mm256_dpbusd_epi32(dot, hi, _mm256_loadu_si256((const __m256i *)(xq + 32 * c + 32)));
}
#ifndef Q4_I8_PF_BYTES
#define Q4_I8_PF_BYTES 1024
#endif
#ifndef Q4_I8_PF_SHORT
#define Q4_I8_PF_SHORT 4096
#endif
#ifndef Q4_I8_SHORT_ROW
#define Q4_I8_SHORT_ROW 1024
#endif
#ifndef Q4_I8_PREFETCH
#define Q4_I8_PREFETCH(p) __builtin_prefetch((p), 0, 0)
#endif
/* How far ahead of its codes a decode row kernel prefetches, for rows of row_bytes (a layer's rows follow one
 * another in memory): Q4_I8_PF_BYTES, or Q4_I8_PF_SHORT for rows under Q4_I8_SHORT_ROW bytes (576- and
 * 1536-wide int4 rows, a 576-wide 8-bit head). Measured A/B in one process: 4096 ahead made the 135M-shaped
 * decode step 0.84x as long on 1 thread and 0.94-0.97x on 2, and the 7B-shaped one (rows of 2048 and 5504
 * bytes) 1.04-1.05x as long, where 1024 was best (512: 1.08x, 2048: 1.02x). */
static inline ptrdiff_t q4_i8_pf_bytes(ptrdiff_t row_bytes) {
    return row_bytes < Q4_I8_SHORT_ROW ? Q4_I8_PF_SHORT : Q4_I8_PF_BYTES;
}
/* The int8 dot products of 128 weights (the four 16-byte chunks from c on) with their activations: 16 int32
 * lanes, lanes 4i..4i+3 from chunk c + i (low and high nibbles summed in the same lanes) */
static inline __m512i q4_dot128_int8(const uint8_t *w, const int8_t *xq, ptrdiff_t c, __m512i mask) {
    const __m512i v = _mm512_loadu_si512((const void *)(w + 16 * c));
    const __m512i lo = _mm512_and_si512(v, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                            _mm512_loadu_si512((const void *)(xq + 32 * c)));
    return _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(xq + 32 * c + 64)));
}
/* A row's last 1-3 blocks, b0 + j .. b0 + n - 1, added into acc: a pair ([evens b | evens b+1 | odds b |
 * odds b+1]), then a lone block ([evens | odds]); lane i of fv = scale x block scale of x for block b0 + i.
 * The factors are taken from fv's lanes in registers: read back from memory after a 512-bit store they cost
 * a store-forwarding stall (a 576-wide row, 16 + 2 blocks, took 26 ns against 19 ns for a 640-wide one). */
static inline __m256 q4_tail_int8(const uint8_t *w, const int8_t *xq, ptrdiff_t b0, ptrdiff_t j, ptrdiff_t n,
                                  __m512 fv, __m256 acc) {
    const __m512i jv = _mm512_set1_epi32((int)j);
    if (j + 2 <= n) {
        const __m256i dot = q4_dot64_int8(w, xq, b0 + j, _mm256_set1_epi8(15));
        const __m512i pair = _mm512_add_epi32(jv, _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
        const __m256 fac = _mm512_castps512_ps256(_mm512_permutexvar_ps(pair, fv));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), fac, acc);
        j += 2;
    }
    if (j < n) {
        const ptrdiff_t c = b0 + j;
        const __m128i bv = _mm_loadu_si128((const __m128i *)(w + 16 * c));
        const __m128i m = _mm_set1_epi8(15);
        const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(bv, m)),
                                                  _mm_and_si128(_mm_srli_epi16(bv, 4), m), 1);
        const __m256i dd = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q,
                                               _mm256_loadu_si256((const __m256i *)(xq + 32 * c)));
        const __m256 fac = _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_set1_epi32((int)j), fv));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), fac, acc);
    }
    return acc;
}
/* q4_dot1_int8's work on blocks [b0, b0 + n), n <= 16 (cpg divides 16 and b0: whole groups g0 .. g0 + ng):
 * the scales they need (one fp16 vector), their factors scale x block scale of x, the zero term of their
 * groups; then the codes, four blocks per step. Inlined with n = 16 for whole chunks (constant masks and lane
 * indices: the chunk's bookkeeping cost a third of its instructions when computed for every n). */
static inline __attribute__((always_inline)) void q4_i8_chunk(
        const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *xq, const float *d,
        const float *xs, ptrdiff_t b0, const ptrdiff_t n, const int sh, const ptrdiff_t pf, __m512 *acc0,
        __m512 *acc1, __m256 *acc2, __m512 *zacc) {
    const __m512i mask = _mm512_set1_epi8(15);
    const __m512i quad_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i quad_idx4 = _mm512_add_epi32(quad_idx, _mm512_set1_epi32(4));
    const __m512i quad_idx8 = _mm512_add_epi32(quad_idx, _mm512_set1_epi32(8));
    const __m512i quad_idx12 = _mm512_add_epi32(quad_idx, _mm512_set1_epi32(12));
    const __m512i group_idx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                  14, 15), sh);
    const __m512 minus8 = _mm512_set1_ps(-8.0f);
    /* blocks [b0, b0 + n) = groups [g0, g0 + ng) (cpg divides 16 and b0) */
    const ptrdiff_t g0 = b0 >> sh, ng = n >> sh;
    const __mmask16 gm = (__mmask16)((1u << ng) - 1u);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, sc + g0));
    const __m512 zs = zr ? _mm512_fmadd_ps(minus8, s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, zr + g0)))
                         : _mm512_mul_ps(minus8, s);
    *zacc = _mm512_fmadd_ps(zs, _mm512_maskz_loadu_ps(gm, xs + g0), *zacc);
    const __m512 fv = _mm512_mul_ps(sh ? _mm512_permutexvar_ps(group_idx, s) : s,
                                    _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), d + b0));
    ptrdiff_t j = 0;
    if (n == 16) {     /* a whole chunk: four steps with constant lane indices */
        Q4_I8_PREFETCH(w + 16 * b0 + pf);
        Q4_I8_PREFETCH(w + 16 * b0 + pf + 64);
        Q4_I8_PREFETCH(w + 16 * b0 + pf + 128);
        Q4_I8_PREFETCH(w + 16 * b0 + pf + 192);
        const __m512i d0 = q4_dot128_int8(w, xq, b0, mask), d1 = q4_dot128_int8(w, xq, b0 + 4, mask);
        const __m512i d2 = q4_dot128_int8(w, xq, b0 + 8, mask), d3 = q4_dot128_int8(w, xq, b0 + 12, mask);
        *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_permutexvar_ps(quad_idx, fv), *acc0);
        *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_permutexvar_ps(quad_idx4, fv), *acc1);
        *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), _mm512_permutexvar_ps(quad_idx8, fv), *acc0);
        *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d3), _mm512_permutexvar_ps(quad_idx12, fv), *acc1);
        return;
    }
    /* four blocks (64 bytes, 128 weights) per step, two accumulators */
    for (; j + 8 <= n; j += 8) {
        Q4_I8_PREFETCH(w + 16 * (b0 + j) + pf);
        Q4_I8_PREFETCH(w + 16 * (b0 + j) + pf + 64);
        const __m512i d0 = q4_dot128_int8(w, xq, b0 + j, mask);
        const __m512i d1 = q4_dot128_int8(w, xq, b0 + j + 4, mask);
        *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0),
                               _mm512_permutexvar_ps(_mm512_add_epi32(quad_idx, _mm512_set1_epi32((int)j)), fv), *acc0);
        *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                               _mm512_permutexvar_ps(_mm512_add_epi32(quad_idx, _mm512_set1_epi32((int)j + 4)), fv), *acc1);
    }
    for (; j + 4 <= n; j += 4) {
        Q4_I8_PREFETCH(w + 16 * (b0 + j) + pf);
        *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q4_dot128_int8(w, xq, b0 + j, mask)),
                               _mm512_permutexvar_ps(_mm512_add_epi32(quad_idx, _mm512_set1_epi32((int)j)), fv), *acc0);
    }
    *acc2 = q4_tail_int8(w, xq, b0, j, n, fv, *acc2);
}
/* One weight row against one activation row, 16 blocks per chunk: the scale and zero streams are read beside
 * the codes and the zero term, sum (zero - 8 scale) x (sum of x over the group), accumulated in the same pass.
 * zr == NULL means every zero is 0 (symmetric weights, e.g. GGUF Q4_0): the zero stream is not read at all. */
/* q4_dot1_int8 up to its horizontal sums: *t8 the eight partial sums of the products, *z4 the four of the
 * zero term (upper and lower halves of its accumulator added, then the upper and lower 128 bits) */
static inline __attribute__((always_inline)) void q4_dot1_int8_parts(
        const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *xq, const float *d, const float *xs,
        ptrdiff_t G, ptrdiff_t cpg, __m256 *t8, __m128 *z4) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), zacc = _mm512_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps();
    const int sh = __builtin_ctzll((unsigned long long)cpg);
    const ptrdiff_t nblocks = G * cpg, pf = q4_i8_pf_bytes(16 * nblocks);
    ptrdiff_t b0 = 0;
    for (; b0 + 16 <= nblocks; b0 += 16)
        q4_i8_chunk(w, sc, zr, xq, d, xs, b0, 16, sh, pf, &acc0, &acc1, &acc2, &zacc);
    if (b0 < nblocks)
        q4_i8_chunk(w, sc, zr, xq, d, xs, b0, nblocks - b0, sh, pf, &acc0, &acc1, &acc2, &zacc);
    const __m512 a = _mm512_add_ps(acc0, acc1);
    *t8 = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)), acc2);
    const __m256 z8 = _mm256_add_ps(_mm512_castps512_ps256(zacc), _mm512_extractf32x8_ps(zacc, 1));
    *z4 = _mm_add_ps(_mm256_castps256_ps128(z8), _mm256_extractf128_ps(z8, 1));
}
Q4_KERNEL float q4_dot1_int8(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *xq,
                                 const float *d, const float *xs, ptrdiff_t G, ptrdiff_t cpg) {
    __m256 t8;
    __m128 z4;
    q4_dot1_int8_parts(w, sc, zr, xq, d, xs, G, cpg, &t8, &z4);
    float t[8], z[4];
    _mm256_storeu_ps(t, t8);
    _mm_storeu_ps(z, z4);
    /* the zero term's order is _mm512_reduce_add_ps's (which it was) */
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])) + ((z[0] + z[2]) + (z[1] + z[3]));
}
/* nr <= 4 consecutive weight rows (row r at w + r ldq, sc + r G, zr + r G) against one activation row: out[r]
 * = q4_dot1_int8 of row r, bit for bit (the same sums in the same order), the rows' horizontal sums done
 * together in vector lanes; on a 576-wide row they were a quarter of q4_dot1_int8's time. */
Q4_KERNEL void q4_dot1x4_int8(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                              const int8_t *xq, const float *d, const float *xs, ptrdiff_t G, ptrdiff_t cpg, int nr,
                              float *out) {
    __m256 t[4];
    __m128 z[4];
    for (int r = 0; r < 4; r++) {
        if (r < nr) {
            q4_dot1_int8_parts(w + r * ldq, sc + r * G, zr ? zr + r * G : NULL, xq, d, xs, G, cpg, &t[r], &z[r]);
        } else {
            t[r] = _mm256_setzero_ps();
            z[r] = _mm_setzero_ps();
        }
    }
    /* per row ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)): pairs, then pairs of pairs, then the halves */
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    const __m128 ts = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    /* per row (z0 + z2) + (z1 + z3), the rows transposed into lanes */
    __m128 c0 = z[0], c1 = z[1], c2 = z[2], c3 = z[3];
    _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
    float o[4];
    _mm_storeu_ps(o, _mm_add_ps(ts, _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3))));
    for (int r = 0; r < nr; r++) out[r] = o[r];
}

/* q4_dotn_int8_impl's work on blocks [b0, b0 + n), n <= 16, as q4_i8_chunk for one row (inlined with n = 16
 * for whole chunks) */
static inline __attribute__((always_inline)) void q4_dotn_chunk(
        const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *const *xq, const float *const *d,
        const float *const *xs, ptrdiff_t b0, const ptrdiff_t n, const int sh, __m512 *acc, __m512 *zacc,
        __m256 *acc2, const int NX) {
    __m512 fv[4];
    const __m512i mask = _mm512_set1_epi8(15);
    const __m512i quad_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i group_idx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                  14, 15), sh);
    const __m512 minus8 = _mm512_set1_ps(-8.0f);
    const ptrdiff_t g0 = b0 >> sh, ng = n >> sh;
    const __mmask16 gm = (__mmask16)((1u << ng) - 1u), bm = (__mmask16)((1u << n) - 1u);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, sc + g0));
    const __m512 zs = zr ? _mm512_fmadd_ps(minus8, s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, zr + g0)))
                         : _mm512_mul_ps(minus8, s);
    const __m512 sb = sh ? _mm512_permutexvar_ps(group_idx, s) : s;
    for (int r = 0; r < NX; r++) {
        zacc[r] = _mm512_fmadd_ps(zs, _mm512_maskz_loadu_ps(gm, xs[r] + g0), zacc[r]);
        fv[r] = _mm512_mul_ps(sb, _mm512_maskz_loadu_ps(bm, d[r] + b0));
    }
    ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const ptrdiff_t c = b0 + j;
        Q4_I8_PREFETCH(w + 16 * c + Q4_I8_PF_BYTES);
        const __m512i v = _mm512_loadu_si512((const void *)(w + 16 * c));
        const __m512i lo = _mm512_and_si512(v, mask);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        const __m512i idx = _mm512_add_epi32(quad_idx, _mm512_set1_epi32((int)j));
        for (int r = 0; r < NX; r++) {
            const __m512i dot = _mm512_dpbusd_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(xq[r] + 32 * c))),
                hi, _mm512_loadu_si512((const void *)(xq[r] + 32 * c + 64)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, fv[r]), acc[r]);
        }
    }
    /* the row's last 1-3 blocks */
    for (int r = 0; r < NX; r++) acc2[r] = q4_tail_int8(w, xq[r], b0, j, n, fv[r], acc2[r]);
}
/* One weight row against nx <= 4 activation rows (decode at M = 2..4): the row's codes are loaded and split
 * into nibbles once per 128 weights and meet every activation row (two vpdpbusd each), the scales once per
 * 16 blocks; per activation row the factors, the zero term and the tail are q4_dot1_int8's. out[r] for r < nx. */
static inline __attribute__((always_inline)) void q4_dotn_int8_impl(
        const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *const *xq, const float *const *d,
        const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, float *out, const int NX) {
    __m512 acc[4], zacc[4];
    __m256 acc2[4];
    for (int r = 0; r < NX; r++) {
        acc[r] = _mm512_setzero_ps();
        zacc[r] = _mm512_setzero_ps();
        acc2[r] = _mm256_setzero_ps();
    }
    const int sh = __builtin_ctzll((unsigned long long)cpg);
    const ptrdiff_t nblocks = G * cpg;
    ptrdiff_t b0 = 0;
    for (; b0 + 16 <= nblocks; b0 += 16) q4_dotn_chunk(w, sc, zr, xq, d, xs, b0, 16, sh, acc, zacc, acc2, NX);
    if (b0 < nblocks) q4_dotn_chunk(w, sc, zr, xq, d, xs, b0, nblocks - b0, sh, acc, zacc, acc2, NX);
    for (int r = 0; r < NX; r++) {
        const __m256 t8 = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(acc[r]),
                                                      _mm512_extractf32x8_ps(acc[r], 1)), acc2[r]);
        float t[8];
        _mm256_storeu_ps(t, t8);
        out[r] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])) + _mm512_reduce_add_ps(zacc[r]);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * int8-activation prefill (AVX512-VNNI builds only). The decode kernel's arithmetic with the vector lanes
 * turned around: 16 weight rows (a slab) of one k panel are repacked into per-thread scratch so that int32 lane
 * r of a vector holds four codes of row r; one vpdpbusd against four activations broadcast to every lane then
 * advances 16 output columns, and no horizontal sums are needed. Per 32-k block a slab is 8 vectors of codes:
 * vector j < 4 holds the low nibbles of packed bytes 4j..4j+3 (k = 8j, 8j+2, 8j+4, 8j+6), vector 4 + j their
 * high nibbles (the next odd k): exactly activation dword j, resp. 4 + j, of the permuted order [evens | odds].
 * Beside the codes: each block's 16 row scales and each group's 16 (zero - 8 scale) as fp32 vectors. The
 * register tile is Q4_I8_TM activation rows x 2 slabs (32 output columns): per block and activation row, 16
 * vpdpbusd, then the int32 sums converted and scaled by (row scale x block scale of x) into fp32 accumulators;
 * the zero term is one FMA per group. */
#ifndef Q4_I8_TM
#define Q4_I8_TM 4
#endif
static inline int q4_int8_prefill_available(void) { return q4_int8_available(); }
/* Rows [0, rows) (rows <= 16; missing rows repeat the last one with scale and zero 0) of a weight, blocks
 * [b0, b0 + nb) (whole groups) -> codes [nb][8][16 x 4 bytes], fs [nb][16], zt [nb / cpg][16]. */
static inline void q4_pack_slab_int8(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                                     ptrdiff_t G, ptrdiff_t rows, ptrdiff_t b0, ptrdiff_t nb, ptrdiff_t cpg,
                                     uint8_t *codes, float *fs, float *zt) {
    const uint8_t *r[16];
    for (int i = 0; i < 16; i++) r[i] = w + (i < rows ? i : rows - 1) * ldq;
    const __m512i m4 = _mm512_set1_epi8(15);
    for (ptrdiff_t b = 0; b < nb; b++) {
        __m512i p[4];
        q4_slab_dwords(r, 16 * (b0 + b), p);
        uint8_t *dst = codes + 512 * b;
        for (int j = 0; j < 4; j++) {
            _mm512_storeu_si512((void *)(dst + 64 * j), _mm512_and_si512(p[j], m4));
            _mm512_storeu_si512((void *)(dst + 64 * (4 + j)), _mm512_and_si512(_mm512_srli_epi16(p[j], 4), m4));
        }
    }
    const ptrdiff_t g0 = b0 / cpg;
    for (ptrdiff_t g = 0; g < nb / cpg; g++)
        for (int i = 0; i < 16; i++) {
            const float s = i < rows ? q4_half_to_float(sc[i * G + g0 + g]) : 0.0f;
            const float z = i < rows ? q4_half_to_float(zr[i * G + g0 + g]) : 0.0f;
            for (ptrdiff_t b = g * cpg; b < (g + 1) * cpg; b++) fs[16 * b + i] = s;
            zt[16 * g + i] = z - 8.0f * s;
        }
}
static inline void q4_tile_int8_impl(const int8_t *const *xq, const float *const *dx, const float *const *xs,
                                     const uint8_t *c0, const uint8_t *c1, const float *f0, const float *f1,
                                     const float *z0, const float *z1, ptrdiff_t nb, ptrdiff_t cpg,
                                     float *const *out, ptrdiff_t col, const float *bias, int ncols, int first,
                                     const int tm, const int nv) {
    __m512 acc[Q4_I8_TM][2];
    for (int m = 0; m < tm; m++)
        for (int v = 0; v < nv; v++) acc[m][v] = _mm512_setzero_ps();
    for (ptrdiff_t b = 0; b < nb; b++) {
        __m512i s[Q4_I8_TM][2];
        for (int m = 0; m < tm; m++)
            for (int v = 0; v < nv; v++) s[m][v] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            const __m512i w0 = _mm512_loadu_si512((const void *)(c0 + 512 * b + 64 * j));
            const __m512i w1 = nv > 1 ? _mm512_loadu_si512((const void *)(c1 + 512 * b + 64 * j)) : w0;
            for (int m = 0; m < tm; m++) {
                int32_t x4;
                memcpy(&x4, xq[m] + 32 * b + 4 * j, 4);
                const __m512i xb = _mm512_set1_epi32(x4);
                s[m][0] = _mm512_dpbusd_epi32(s[m][0], w0, xb);
                if (nv > 1) s[m][1] = _mm512_dpbusd_epi32(s[m][1], w1, xb);
            }
        }
        const __m512 fa = _mm512_loadu_ps(f0 + 16 * b), fb = nv > 1 ? _mm512_loadu_ps(f1 + 16 * b) : fa;
        for (int m = 0; m < tm; m++) {
            const __m512 dm = _mm512_set1_ps(dx[m][b]);
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][0]), _mm512_mul_ps(fa, dm), acc[m][0]);
            if (nv > 1) acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][1]), _mm512_mul_ps(fb, dm), acc[m][1]);
        }
        if (((b + 1) & (cpg - 1)) == 0) {   /* the group's zero term */
            const ptrdiff_t g = b / cpg;
            const __m512 za = _mm512_loadu_ps(z0 + 16 * g), zb = nv > 1 ? _mm512_loadu_ps(z1 + 16 * g) : za;
            for (int m = 0; m < tm; m++) {
                const __m512 xg = _mm512_set1_ps(xs[m][g]);
                acc[m][0] = _mm512_fmadd_ps(za, xg, acc[m][0]);
                if (nv > 1) acc[m][1] = _mm512_fmadd_ps(zb, xg, acc[m][1]);
            }
        }
    }
    q4_tile_store(acc, tm, nv, out, col, bias, ncols, first);
}
/* tm (1..Q4_I8_TM) activation rows x nv (1 or 2) packed slabs over nb blocks; out[m][col + 16 v + i] is set
 * (first panel, + bias) or accumulated for the ncols valid columns */
Q4_KERNEL void q4_tile_int8(const int8_t *const *xq, const float *const *dx, const float *const *xs,
                            const uint8_t *c0, const uint8_t *c1, const float *f0, const float *f1,
                            const float *z0, const float *z1, ptrdiff_t nb, ptrdiff_t cpg, float *const *out,
                            ptrdiff_t col, const float *bias, int ncols, int first, int tm, int nv) {
#define Q4_TILE_INT8(TM, NV) q4_tile_int8_impl(xq, dx, xs, c0, c1, f0, f1, z0, z1, nb, cpg, out, col, bias, ncols, \
                                              first, TM, NV)
#define Q4_TILE_INT8_NV(TM) if (nv == 2) Q4_TILE_INT8(TM, 2); else Q4_TILE_INT8(TM, 1)
    switch (tm) {
#if Q4_I8_TM >= 6
    Q4_TM_CASES_6_5(Q4_TILE_INT8_NV)
#endif
    Q4_TM_CASES_4_1(Q4_TILE_INT8_NV)
    }
#undef Q4_TILE_INT8_NV
#undef Q4_TILE_INT8
}

/* ---------------------------------------------------------------------------------------------------
 * int8-activation kernels on the slab16 layout (AVX512-VNNI builds only). slab16 is a load-time arrangement
 * of a weight's bytes, never stored (quant4/_kernels.pyx to_slab16 / from_slab16 permute a weight in place):
 * every whole set of 16 consecutive rows s keeps its place in the buffers, and inside it
 *   codes  (16 ldq bytes at qw + 16 s ldq): block b's 256 bytes at 256 b; dword lane i of vector j (64 bytes
 *          at 256 b + 64 j) holds bytes 4j..4j+3 of row 16 s + i's block b (q4_slab_dwords' order);
 *   scales (16 G halves at sc + 16 s G), zeros likewise: [G][16], group g's 16 rows together.
 * Rows past the last whole set stay as rows. Decode then multiplies 16 rows at once with the rows in vector
 * lanes: per block, four 64-byte loads, their nibbles split, and eight vpdpbusd against activation dwords
 * broadcast to every lane; no horizontal sums, no per-row overhead, and one scale conversion per group for 16
 * rows. Measured on a DRAM-sized 4096 x 32768 weight, 2 threads: 1.23x the row kernel's bandwidth (11008-wide:
 * 1.57x); 576-wide rows from cache 2.9x. Prefill repacks a stored slab with one nibble split instead of a
 * transpose. */
#ifndef Q4_S16_PF_BYTES
#define Q4_S16_PF_BYTES 4096
#endif
/* 16 rows of a slab16 set (codes cs, scales st, zeros zt or NULL: every zero is 0) against NX <= 4 activation
 * rows in the decode order of q4_quantize_x_int8 (runs of Q4_I8_RUN blocks): out[r][i] for row i < 16. */
static inline __attribute__((always_inline)) void q4_dot16s_impl(
        const uint8_t *cs, const uint16_t *st, const uint16_t *zt, const int8_t *const *xq, const float *const *d,
        const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, float *const *out, const int NX) {
    const ptrdiff_t nb = G * cpg;
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512 minus8 = _mm512_set1_ps(-8.0f);
    __m512 acc[4], zacc[4], sv = _mm512_setzero_ps();
    for (int r = 0; r < NX; r++) acc[r] = zacc[r] = _mm512_setzero_ps();
    ptrdiff_t b0 = 0;
    while (b0 < nb) {
        const ptrdiff_t run = nb - b0 >= Q4_I8_RUN ? Q4_I8_RUN : (nb - b0 >= 2 ? 2 : 1);
        for (ptrdiff_t i = 0; i < run; i++) {
            const ptrdiff_t b = b0 + i;
            const uint8_t *p = cs + 256 * b;
            if (b % cpg == 0) {
                const ptrdiff_t g = b / cpg;
                sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + 16 * g)));
                const __m512 zs = zt ? _mm512_fmadd_ps(minus8, sv, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                           (const __m256i *)(zt + 16 * g))))
                                     : _mm512_mul_ps(minus8, sv);
                for (int r = 0; r < NX; r++) zacc[r] = _mm512_fmadd_ps(zs, _mm512_set1_ps(xs[r][g]), zacc[r]);
            }
            Q4_I8_PREFETCH(p + Q4_S16_PF_BYTES);
            Q4_I8_PREFETCH(p + Q4_S16_PF_BYTES + 64);
            Q4_I8_PREFETCH(p + Q4_S16_PF_BYTES + 128);
            Q4_I8_PREFETCH(p + Q4_S16_PF_BYTES + 192);
            __m512i lo[4], hi[4];
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * j));
                lo[j] = _mm512_and_si512(v, m4);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            for (int r = 0; r < NX; r++) {
                /* block b's even k (low nibbles) and odd k (high) of activation row r */
                const int8_t *xe = xq[r] + 32 * b0 + 16 * i, *xo = xe + 16 * run;
                __m512i s = _mm512_setzero_si512();
                for (int j = 0; j < 4; j++) {
                    int32_t e, o;
                    memcpy(&e, xe + 4 * j, 4);
                    memcpy(&o, xo + 4 * j, 4);
                    s = _mm512_dpbusd_epi32(s, lo[j], _mm512_set1_epi32(e));
                    s = _mm512_dpbusd_epi32(s, hi[j], _mm512_set1_epi32(o));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sv, _mm512_set1_ps(d[r][b])), acc[r]);
            }
        }
        b0 += run;
    }
    for (int r = 0; r < NX; r++) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], zacc[r]));
}
Q4_KERNEL void q4_dot16s_int8(const uint8_t *cs, const uint16_t *st, const uint16_t *zt, const int8_t *const *xq,
                              const float *const *d, const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, int nx,
                              float *const *out) {
    switch (nx) {
    case 4: q4_dot16s_impl(cs, st, zt, xq, d, xs, G, cpg, out, 4); break;
    case 3: q4_dot16s_impl(cs, st, zt, xq, d, xs, G, cpg, out, 3); break;
    case 2: q4_dot16s_impl(cs, st, zt, xq, d, xs, G, cpg, out, 2); break;
    default: q4_dot16s_impl(cs, st, zt, xq, d, xs, G, cpg, out, 1); break;
    }
}
/* q4_pack_slab_int8's output from a slab16 set (blocks [b0, b0 + nb), whole groups): the stored dword vectors
 * split into nibbles, the scales and zeros read 16 at a time */
static inline void q4_pack_slab16_int8(const uint8_t *cs, const uint16_t *st, const uint16_t *zt, ptrdiff_t b0,
                                       ptrdiff_t nb, ptrdiff_t cpg, uint8_t *codes, float *fs, float *zo) {
    const __m512i m4 = _mm512_set1_epi8(15);
    for (ptrdiff_t b = 0; b < nb; b++) {
        uint8_t *dst = codes + 512 * b;
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(cs + 256 * (b0 + b) + 64 * j));
            _mm512_storeu_si512((void *)(dst + 64 * j), _mm512_and_si512(v, m4));
            _mm512_storeu_si512((void *)(dst + 64 * (4 + j)), _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        }
    }
    const ptrdiff_t g0 = b0 / cpg;
    for (ptrdiff_t g = 0; g < nb / cpg; g++) {
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + 16 * (g0 + g))));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zt + 16 * (g0 + g))));
        for (ptrdiff_t b = g * cpg; b < (g + 1) * cpg; b++) _mm512_storeu_ps(fs + 16 * b, s);
        _mm512_storeu_ps(zo + 16 * g, _mm512_fmadd_ps(_mm512_set1_ps(-8.0f), s, z));
    }
}

/* ---------------------------------------------------------------------------------------------------
 * 8-bit output head (AVX512-VNNI builds only). A float head [V, D] is held, at load time and never saved, as
 * unsigned codes u = round(w / d) + 128 per 32-input block (d = absmax / 127: Q8_0's rounding of the weights)
 * with fp32 block scales, and multiplied with int8 activations in natural k order:
 *     y = sum_b d_b d^x_b (sum_k u_k xq_k - 128 sum_k xq_k)
 * one vpdpbusd per 64 weights (two blocks: lanes 0-7 the first); cx_b = 128 d^x_b sum_k xq_k is computed once
 * per token, so a row's correction is one dot product of its scales with cx. */
static inline int q8_head_available(void) { return q4_int8_available(); }
static inline void q8_prep_x(const int8_t *xq, const float *dx, ptrdiff_t nb, float *cx) {
    for (ptrdiff_t b = 0; b < nb; b++) {
        int sum = 0;
        for (int k = 0; k < 32; k++) sum += xq[32 * b + k];
        cx[b] = 128.0f * dx[b] * (float)sum;
    }
}
Q4_KERNEL float q8_dot1(const uint8_t *wu, const float *dw, const int8_t *xq, const float *dx, const float *cx,
                        ptrdiff_t nb) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), corr = _mm512_setzero_ps();
    const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const ptrdiff_t pf = q4_i8_pf_bytes(32 * nb);
    for (ptrdiff_t b0 = 0; b0 < nb; b0 += 16) {
        const ptrdiff_t n = nb - b0 < 16 ? nb - b0 : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
        const __m512 w16 = _mm512_maskz_loadu_ps(m, dw + b0);
        const __m512 fv = _mm512_mul_ps(w16, _mm512_maskz_loadu_ps(m, dx + b0));
        corr = _mm512_fmadd_ps(w16, _mm512_maskz_loadu_ps(m, cx + b0), corr);
        ptrdiff_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const uint8_t *p = wu + 32 * (b0 + j);
            Q4_I8_PREFETCH(p + pf);
            Q4_I8_PREFETCH(p + pf + 64);
            const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512((const void *)p),
                                                   _mm512_loadu_si512((const void *)(xq + 32 * (b0 + j))));
            const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512((const void *)(p + 64)),
                                                   _mm512_loadu_si512((const void *)(xq + 32 * (b0 + j) + 64)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0),
                                   _mm512_permutexvar_ps(_mm512_add_epi32(pair_idx, _mm512_set1_epi32((int)j)), fv), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                                   _mm512_permutexvar_ps(_mm512_add_epi32(pair_idx, _mm512_set1_epi32((int)j + 2)), fv), acc1);
        }
        for (; j < n; j += 2) {     /* the row's last 1-3 blocks; a lone block is a half-masked load */
            const __mmask64 km = j + 1 < n ? ~0ULL : 0xFFFFFFFFULL;
            const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                                   _mm512_maskz_loadu_epi8(km, wu + 32 * (b0 + j)),
                                                   _mm512_maskz_loadu_epi8(km, xq + 32 * (b0 + j)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0),
                                   _mm512_permutexvar_ps(_mm512_add_epi32(pair_idx, _mm512_set1_epi32((int)j)), fv), acc0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - _mm512_reduce_add_ps(corr);
}
#elif defined(__AVX2__)
/* AVX2 builds: the same scheme with vpmaddubsw + vpmaddwd in place of vpdpbusd. vpmaddubsw multiplies u8 codes
 * by s8 activations and adds adjacent pairs into int16 (at most 2 * 15 * 127 = 3810: no saturation; the low- and
 * high-nibble sums added, 7620), vpmaddwd by ones adds those pairs into int32: the same integer sums of four
 * products per lane as vpdpbusd. Scale factors per block are computed in scalar code (one fp16 conversion and
 * one multiply per 32 weights). */
static inline int q4_int8_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
/* as q4_dot64_int8 above: 8 int32 lanes, lanes 0-3 from the block at chunk c, 4-7 from the next */
static inline __m256i q4_dot64_int8_avx2(const uint8_t *w, const int8_t *xq, ptrdiff_t c, __m256i mask,
                                         __m256i ones) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * c));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 32 * c)));
    const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32 * c + 32)));
    return _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
}
/* scale_g(b) (q4_scales8), and scale_g(b) d_b (q4_factor8), for the eight blocks b0 .. b0 + 7 of a row (sh =
 * log2(blocks per group); b0 a multiple of 8): g32 loads eight scales; larger groups load the 8 >> sh (at least
 * one) they need, never past them, and spread them over the blocks */
static inline __m256 q4_scales8(const uint16_t *sc, ptrdiff_t b0, int sh) {
    if (sh == 0) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + b0)));
    uint16_t t[8] = {0};
    memcpy(t, sc + (b0 >> sh), sizeof(uint16_t) * (size_t)(sh >= 3 ? 1 : 8 >> sh));
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t)),
                                    _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), sh));
}
static inline __m256 q4_factor8(const uint16_t *sc, const float *d, ptrdiff_t b0, int sh) {
    return _mm256_mul_ps(q4_scales8(sc, b0, sh), _mm256_loadu_ps(d + b0));
}
/* lanes of a q4_factor8 vector for pair p (blocks 2p, 2p + 1): [2p x 4 | 2p + 1 x 4] */
static inline __m256i q4_pair_idx(int p) {
    return _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
}
/* the integer dot product of a row's lone last block ([evens | odds], 16 bytes at chunk b) with its activations */
static inline float q4_lone_dot_avx2(const uint8_t *w, const int8_t *xq, ptrdiff_t b, __m256i ones) {
    const __m128i bv = _mm_loadu_si128((const __m128i *)(w + 16 * b));
    const __m128i m = _mm_set1_epi8(15);
    const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(bv, m)),
                                              _mm_and_si128(_mm_srli_epi16(bv, 4), m), 1);
    const __m256i dd = _mm256_madd_epi16(
        _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(xq + 32 * b))), ones);
    float t[8];
    _mm256_storeu_ps(t, _mm256_cvtepi32_ps(dd));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
/* [scale_g(b) d_b x 4 | scale_g(b+1) d_(b+1) x 4]; sh = log2(blocks per group) (a shift, not a division) */
static inline __m256 q4_pair_factor(const uint16_t *sc, const float *d, ptrdiff_t b, int sh) {
    const float f0 = q4_half_to_float(sc[b >> sh]) * d[b];
    const float f1 = q4_half_to_float(sc[(b + 1) >> sh]) * d[b + 1];
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(f0)), _mm_set1_ps(f1), 1);
}
Q4_KERNEL float q4_dot1_int8(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *xq,
                                 const float *d, const float *xs, ptrdiff_t G, ptrdiff_t cpg) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const ptrdiff_t nblocks = G * cpg;
    const int sh = __builtin_ctzll((unsigned long long)cpg);
    ptrdiff_t b = 0;
    /* eight blocks (256 weights) per step: their eight factors in one vector, two lanes' worth per pair */
    for (; b + 8 <= nblocks; b += 8) {
        __builtin_prefetch(w + 16 * b + 1024, 0, 0);
        __builtin_prefetch(w + 16 * b + 1088, 0, 0);
        const __m256 f8 = q4_factor8(sc, d, b, sh);
        const __m256i d0 = q4_dot64_int8_avx2(w, xq, b, mask, ones);
        const __m256i d1 = q4_dot64_int8_avx2(w, xq, b + 2, mask, ones);
        const __m256i d2 = q4_dot64_int8_avx2(w, xq, b + 4, mask, ones);
        const __m256i d3 = q4_dot64_int8_avx2(w, xq, b + 6, mask, ones);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_permutevar8x32_ps(f8, q4_pair_idx(0)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_permutevar8x32_ps(f8, q4_pair_idx(1)), acc1);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d2), _mm256_permutevar8x32_ps(f8, q4_pair_idx(2)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d3), _mm256_permutevar8x32_ps(f8, q4_pair_idx(3)), acc1);
    }
    for (; b + 4 <= nblocks; b += 4) {     /* four blocks (128 weights) per step, two accumulators */
        /* 16 cache lines ahead in the codes (past a row's end: the next row's, or nothing: a prefetch never
         * faults). Without it a thread streamed 6.8 GB/s from DRAM (11008 x 4096 layer), with it 12.7; two
         * threads 12.4 -> 25.5 GB/s, the machine's read bandwidth. */
        __builtin_prefetch(w + 16 * b + 1024, 0, 0);
        const __m256i d0 = q4_dot64_int8_avx2(w, xq, b, mask, ones);
        const __m256i d1 = q4_dot64_int8_avx2(w, xq, b + 2, mask, ones);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), q4_pair_factor(sc, d, b, sh), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), q4_pair_factor(sc, d, b + 2, sh), acc1);
    }
    for (; b + 2 <= nblocks; b += 2)
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_dot64_int8_avx2(w, xq, b, mask, ones)),
                               q4_pair_factor(sc, d, b, sh), acc0);
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(acc0, acc1));
    float y = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    if (b < nblocks) y += q4_lone_dot_avx2(w, xq, b, ones) * (q4_half_to_float(sc[b >> sh]) * d[b]);
    /* sum_g (zero_g - 8 scale_g) * xs_g; zr == NULL: every zero is 0 */
    __m256 zacc = _mm256_setzero_ps();
    ptrdiff_t gi = 0;
    for (; gi + 8 <= G; gi += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + gi)));
        const __m256 z = zr ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zr + gi))) : _mm256_setzero_ps();
        zacc = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z), _mm256_loadu_ps(xs + gi), zacc);
    }
    _mm256_storeu_ps(t, zacc);
    float z = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (; gi < G; gi++) {
        const float s = q4_half_to_float(sc[gi]);
        z += ((zr ? q4_half_to_float(zr[gi]) : 0.0f) - 8.0f * s) * xs[gi];
    }
    return y + z;
}
/* AVX2 builds: one weight row against nx <= 4 activation rows, the codes loaded and split into nibbles once
 * per 64 weights for all of them; per row as q4_dot1_int8 above, one accumulator per activation row. */
static inline __attribute__((always_inline)) void q4_dotn_int8_impl(
        const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *const *xq, const float *const *d,
        const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, float *out, const int NX) {
    __m256 acc[4];
    for (int r = 0; r < NX; r++) acc[r] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const ptrdiff_t nblocks = G * cpg;
    const int sh = __builtin_ctzll((unsigned long long)cpg);
    ptrdiff_t b = 0;
    for (; b + 8 <= nblocks; b += 8) {     /* eight blocks per step, as in q4_dot1_int8 */
        __builtin_prefetch(w + 16 * b + 1024, 0, 0);
        __builtin_prefetch(w + 16 * b + 1088, 0, 0);
        const __m256 s8 = q4_scales8(sc, b, sh);
        __m256 f8[4];
        for (int r = 0; r < NX; r++) f8[r] = _mm256_mul_ps(s8, _mm256_loadu_ps(d[r] + b));
        for (int p = 0; p < 4; p++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * (b + 2 * p)));
            const __m256i lo = _mm256_and_si256(v, mask);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            for (int r = 0; r < NX; r++) {
                const int8_t *x = xq[r] + 32 * (b + 2 * p);
                const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x));
                const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones)),
                                         _mm256_permutevar8x32_ps(f8[r], q4_pair_idx(p)), acc[r]);
            }
        }
    }
    for (; b + 2 <= nblocks; b += 2) {
        __builtin_prefetch(w + 16 * b + 1024, 0, 0);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * b));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        const float s0 = q4_half_to_float(sc[b >> sh]), s1 = q4_half_to_float(sc[(b + 1) >> sh]);
        for (int r = 0; r < NX; r++) {
            const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq[r] + 32 * b)));
            const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq[r] + 32 * b + 32)));
            const __m256 fac = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0 * d[r][b])),
                                                    _mm_set1_ps(s1 * d[r][b + 1]), 1);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones)), fac,
                                     acc[r]);
        }
    }
    for (int r = 0; r < NX; r++) {
        float t[8];
        _mm256_storeu_ps(t, acc[r]);
        float y = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
        if (b < nblocks) y += q4_lone_dot_avx2(w, xq[r], b, ones) * (q4_half_to_float(sc[b >> sh]) * d[r][b]);
        out[r] = y;
    }
    /* sum_g (zero_g - 8 scale_g) * xs_g per activation row, 8 groups per step */
    __m256 zacc[4];
    for (int r = 0; r < NX; r++) zacc[r] = _mm256_setzero_ps();
    ptrdiff_t gi = 0;
    for (; gi + 8 <= G; gi += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + gi)));
        const __m256 z = zr ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zr + gi))) : _mm256_setzero_ps();
        const __m256 zs = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);
        for (int r = 0; r < NX; r++) zacc[r] = _mm256_fmadd_ps(zs, _mm256_loadu_ps(xs[r] + gi), zacc[r]);
    }
    for (int r = 0; r < NX; r++) {
        float t[8];
        _mm256_storeu_ps(t, zacc[r]);
        float z = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
        for (ptrdiff_t i = gi; i < G; i++) {
            const float s = q4_half_to_float(sc[i]);
            z += ((zr ? q4_half_to_float(zr[i]) : 0.0f) - 8.0f * s) * xs[r][i];
        }
        out[r] += z;
    }
}
/* The 8-bit head on AVX2. vpmaddubsw multiplies unsigned by signed bytes and would saturate for the stored
 * codes (u8 up to 255 times s8), so the codes go back to signed (code - 128 = round(w / d), within +-127) and
 * the sign of each activation moves onto its weight (vpsignb): |x| (unsigned) times sign(x) w (signed), at most
 * 2 x 127 x 127 per int16 pair, no saturation and no correction term (cx is unused here). */
static inline int q8_head_available(void) { return q4_int8_available(); }
static inline void q8_prep_x(const int8_t *xq, const float *dx, ptrdiff_t nb, float *cx) {
    (void)xq; (void)dx; (void)nb; (void)cx;
}
static inline __m256i q8_dot32_avx2(const uint8_t *wu, const int8_t *xq, __m256i flip, __m256i ones) {
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wu), flip);
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x)), ones);
}
Q4_KERNEL float q8_dot1(const uint8_t *wu, const float *dw, const int8_t *xq, const float *dx, const float *cx,
                        ptrdiff_t nb) {
    (void)cx;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    ptrdiff_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __builtin_prefetch(wu + 32 * b + 1024, 0, 0);
        const __m256i d0 = q8_dot32_avx2(wu + 32 * b, xq + 32 * b, flip, ones);
        const __m256i d1 = q8_dot32_avx2(wu + 32 * b + 32, xq + 32 * b + 32, flip, ones);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(dw[b] * dx[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(dw[b + 1] * dx[b + 1]), acc1);
    }
    if (b < nb)
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_dot32_avx2(wu + 32 * b, xq + 32 * b, flip, ones)),
                               _mm256_set1_ps(dw[b] * dx[b]), acc0);
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(acc0, acc1));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
#else
static inline int q4_int8_available(void) { return 0; }
static inline void q4_quantize_x_int8_blocks(const float *xp, ptrdiff_t Kp, ptrdiff_t cpg, int8_t *xq, float *d,
                                             float *xs) {
    (void)xp; (void)Kp; (void)cpg; (void)xq; (void)d; (void)xs;
}
static inline void q4_quantize_x_int8(const float *xp, ptrdiff_t Kp, ptrdiff_t cpg, int8_t *xq, float *d,
                                      float *xs) {
    (void)xp; (void)Kp; (void)cpg; (void)xq; (void)d; (void)xs;
}
Q4_KERNEL float q4_dot1_int8(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *xq,
                                 const float *d, const float *xs, ptrdiff_t G, ptrdiff_t cpg) {
    (void)w; (void)sc; (void)zr; (void)xq; (void)d; (void)xs; (void)G; (void)cpg;
    return 0.0f;
}
Q4_KERNEL void q4_dotn_int8(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *const *xq,
                            const float *const *d, const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, int nx,
                            float *out) {
    (void)w; (void)sc; (void)zr; (void)xq; (void)d; (void)xs; (void)G; (void)cpg;
    for (int r = 0; r < nx; r++) out[r] = 0.0f;
}
#endif
#if defined(__AVX2__)
/* one weight row against nx <= 4 activation rows (the builds' q4_dotn_int8_impl above), out[r] for r < nx */
Q4_KERNEL void q4_dotn_int8(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const int8_t *const *xq,
                            const float *const *d, const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, int nx,
                            float *out) {
    switch (nx) {
    case 4: q4_dotn_int8_impl(w, sc, zr, xq, d, xs, G, cpg, out, 4); break;
    case 3: q4_dotn_int8_impl(w, sc, zr, xq, d, xs, G, cpg, out, 3); break;
    case 2: q4_dotn_int8_impl(w, sc, zr, xq, d, xs, G, cpg, out, 2); break;
    default: out[0] = q4_dot1_int8(w, sc, zr, xq[0], d[0], xs[0], G, cpg); break;
    }
}
#endif
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVX2__)
static inline int q8_head_available(void) { return 0; }
static inline void q8_prep_x(const int8_t *xq, const float *dx, ptrdiff_t nb, float *cx) {
    (void)xq; (void)dx; (void)nb; (void)cx;
}
Q4_KERNEL float q8_dot1(const uint8_t *wu, const float *dw, const int8_t *xq, const float *dx, const float *cx,
                        ptrdiff_t nb) {
    (void)wu; (void)dw; (void)xq; (void)dx; (void)cx; (void)nb;
    return 0.0f;
}
#endif
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
/* q4_dot1_int8 row by row (the AVX512-VNNI build sums four rows' lanes together) */
Q4_KERNEL void q4_dot1x4_int8(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                              const int8_t *xq, const float *d, const float *xs, ptrdiff_t G, ptrdiff_t cpg, int nr,
                              float *out) {
    for (int r = 0; r < nr; r++)
        out[r] = q4_dot1_int8(w + r * ldq, sc + r * G, zr ? zr + r * G : NULL, xq, d, xs, G, cpg);
}
#define Q4_I8_TM 4
static inline int q4_int8_prefill_available(void) { return 0; }
static inline void q4_pack_slab_int8(const uint8_t *w, ptrdiff_t ldq, const uint16_t *sc, const uint16_t *zr,
                                     ptrdiff_t G, ptrdiff_t rows, ptrdiff_t b0, ptrdiff_t nb, ptrdiff_t cpg,
                                     uint8_t *codes, float *fs, float *zt) {
    (void)w; (void)ldq; (void)sc; (void)zr; (void)G; (void)rows; (void)b0; (void)nb; (void)cpg; (void)codes;
    (void)fs; (void)zt;
}
Q4_KERNEL void q4_dot16s_int8(const uint8_t *cs, const uint16_t *st, const uint16_t *zt, const int8_t *const *xq,
                              const float *const *d, const float *const *xs, ptrdiff_t G, ptrdiff_t cpg, int nx,
                              float *const *out) {
    (void)cs; (void)st; (void)zt; (void)xq; (void)d; (void)xs; (void)G; (void)cpg; (void)nx; (void)out;
}
static inline void q4_pack_slab16_int8(const uint8_t *cs, const uint16_t *st, const uint16_t *zt, ptrdiff_t b0,
                                       ptrdiff_t nb, ptrdiff_t cpg, uint8_t *codes, float *fs, float *zo) {
    (void)cs; (void)st; (void)zt; (void)b0; (void)nb; (void)cpg; (void)codes; (void)fs; (void)zo;
}
Q4_KERNEL void q4_tile_int8(const int8_t *const *xq, const float *const *dx, const float *const *xs,
                            const uint8_t *c0, const uint8_t *c1, const float *f0, const float *f1,
                            const float *z0, const float *z1, ptrdiff_t nb, ptrdiff_t cpg, float *const *out,
                            ptrdiff_t col, const float *bias, int ncols, int first, int tm, int nv) {
    (void)xq; (void)dx; (void)xs; (void)c0; (void)c1; (void)f0; (void)f1; (void)z0; (void)z1; (void)nb; (void)cpg;
    (void)out; (void)col; (void)bias; (void)ncols; (void)first; (void)tm; (void)nv;
}
#endif
#endif /* QUANT4_Q4AVX512_H */
