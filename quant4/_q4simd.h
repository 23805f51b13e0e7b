/* quant4's portable micro-kernels, written with GCC/Clang vector extensions (fp32 activations: decode and
 * prefill on every build). The AVX-512 BF16 / VNNI kernels are in _q4avx512.h.
 *
 * The Cython kernels in _kernels.pyx own the loops over rows, tiles, threads and scratch; the innermost
 * loops live here. Vectors of the build's native width (Q4_VL floats: AVX-512, AVX2 or SSE, chosen by the
 * flags each _kernels_<isa> build compiles this header with) keep accumulators in registers, which GCC's
 * auto-vectorizer did not do reliably for these loops (it chose 4-wide SLP code or kept accumulators on
 * the stack and ran latency-bound).
 *
 * Intrinsics here, each where the vector extensions cannot express the instruction: the zero-extending load
 * of 16/8/4 code bytes to int32 lanes (q4_widen: vpmovzxbd; GCC scalarizes __builtin_convertvector), and on
 * AVX-512 the 16-entry dequantization table looked up with vpermps (q4_group_lut / q4_unpack16). Everything
 * else is plain vector arithmetic the compiler schedules.
 *
 * k order inside a 32-k block. A packed byte holds k = 2i (low nibble) and 2i + 1 (high nibble), so 16 bytes
 * unpack naturally into the 16 even k's and the 16 odd k's of a 32-block. Activations are permuted the same
 * way once per call (q4_permute_x): xp[32c + j] = x[32c + 2j], xp[32c + 16 + j] = x[32c + 2j + 1], and
 * dequantized weight rows are produced in that order too. Dot products do not depend on the order of k.
 */
#ifndef QUANT4_Q4SIMD_H
#define QUANT4_Q4SIMD_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "_q4util.h"

/* Native vector width of this build, in floats: 16-float quantities are handled as Q4_NV native vectors
 * (arrays of vectors with constant indices, which the compiler keeps in registers). */
#if defined(__AVX512F__)
#define Q4_VL 16
#elif defined(__AVX__)
#define Q4_VL 8
#else
#define Q4_VL 4
#endif
#define Q4_NV (16 / Q4_VL)
/* Prefill register tile (activation rows x weight rows): 16 zmm accumulators on AVX-512 (32 registers),
 * 8 on AVX2/SSE (16 registers) so that accumulators plus operands fit without spills. */
#if defined(__AVX512F__)
#define Q4_TM 4
#define Q4_TN 4
#else
#define Q4_TM 2
#define Q4_TN 4
#endif

/* Row-level micro-kernels are kept out of line: each call covers a whole weight row or k panel, and inlining
 * them all into one OpenMP region made GCC's register allocation worse (M = 4 decode 1.7 -> 2.6 ms). */
#define Q4_KERNEL static __attribute__((noinline))

typedef float q4_vf __attribute__((vector_size(Q4_VL * 4)));
typedef int32_t q4_vi __attribute__((vector_size(Q4_VL * 4)));

static inline q4_vf q4_load(const float *p) { q4_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void q4_store(float *p, q4_vf v) { memcpy(p, &v, sizeof v); }

static inline float q4_hsum(q4_vf v) {
    float t = 0.0f;
    for (int j = 0; j < Q4_VL; j++) t += v[j];
    return t;
}

/* Q4_VL bytes -> Q4_VL int32 lanes. GCC lowers __builtin_convertvector(u8 -> i32) to scalar code, so the
 * one zero-extending load is spelled per ISA; other targets use a plain loop. */
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE4_1__)
#include <immintrin.h>
#endif
static inline q4_vi q4_widen(const uint8_t *b) {
#if defined(__AVX512F__)
    return (q4_vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
#elif defined(__AVX2__)
    return (q4_vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
#elif defined(__SSE4_1__)
    int32_t w;
    memcpy(&w, b, 4);
    return (q4_vi)_mm_cvtepu8_epi32(_mm_cvtsi32_si128(w));
#else
    q4_vi q;
    for (int j = 0; j < Q4_VL; j++) q[j] = b[j];
    return q;
#endif
}

/* A group's dequantization: w = q * s + zm for q in 0..15 (zm = zero - 8 s). On AVX-512 it is a 16-entry
 * table of floats, looked up with vpermps (which reads only the low 4 bits of each index): per 16 codes that is
 * one lookup instead of a convert and an FMA. Elsewhere it is the pair (s, zm). */
#if defined(__AVX512F__)
typedef __m512 q4_lut;
static inline q4_lut q4_group_lut(float s, float zm) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(zm));
}
/* 16 packed bytes -> dequantized even-k and odd-k weights as Q4_NV (= 1) vectors each */
static inline void q4_unpack16(const uint8_t *b, q4_lut lut, q4_vf lo[Q4_NV], q4_vf hi[Q4_NV]) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    lo[0] = (q4_vf)_mm512_permutexvar_ps(v, lut);
    hi[0] = (q4_vf)_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
}
#else
typedef struct { float s, zm; } q4_lut;
static inline q4_lut q4_group_lut(float s, float zm) { q4_lut l = {s, zm}; return l; }
/* 16 packed bytes -> dequantized even-k and odd-k weights, q * s + zm, as Q4_NV vectors each */
static inline void q4_unpack16(const uint8_t *b, q4_lut lut, q4_vf lo[Q4_NV], q4_vf hi[Q4_NV]) {
    for (int h = 0; h < Q4_NV; h++) {
        const q4_vi q = q4_widen(b + h * Q4_VL);   /* widen first: x86 has no byte shifts */
        lo[h] = __builtin_convertvector(q & 15, q4_vf) * lut.s + lut.zm;
        hi[h] = __builtin_convertvector(q >> 4, q4_vf) * lut.s + lut.zm;
    }
}
#endif

/* The table of group gi of a row: scale and zero from their float16 bits. */
static inline q4_lut q4_row_group(const uint16_t *sc, const uint16_t *zr, ptrdiff_t gi) {
    const float s = q4_half_to_float(sc[gi]);
    return q4_group_lut(s, q4_half_to_float(zr[gi]) - 8.0f * s);
}

/* One 16-byte chunk c of a row, dequantized: the group's table, then q4_unpack16. */
static inline __attribute__((always_inline)) void q4_unpack_chunk(const uint8_t *w, const uint16_t *sc,
        const uint16_t *zr, ptrdiff_t c, ptrdiff_t cpg, q4_vf lo[Q4_NV], q4_vf hi[Q4_NV]) {
    q4_unpack16(w + 16 * c, q4_row_group(sc, zr, c / cpg), lo, hi);
}

/* x [Kp] -> xp [Kp] in the block-permuted k order above (Kp % 32 == 0) */
static inline void q4_permute_x(const float *x, ptrdiff_t Kp, float *xp) {
    for (ptrdiff_t c = 0; c < Kp; c += 32)
        for (int j = 0; j < 16; j++) {
            xp[c + j] = x[c + 2 * j];
            xp[c + 16 + j] = x[c + 2 * j + 1];
        }
}

/* Decode, one activation row: dot(w_row, x) over G groups of cpg 16-byte chunks. Two chunks per step into
 * four accumulators: the FMA latency chains, not the loads, limited the one-chunk loop. */
Q4_KERNEL float q4_dot1(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const float *xp,
                            ptrdiff_t G, ptrdiff_t cpg) {
    q4_vf a0[Q4_NV] = {{0}}, a1[Q4_NV] = {{0}}, a2[Q4_NV] = {{0}}, a3[Q4_NV] = {{0}};
    const ptrdiff_t nc = G * cpg;
    ptrdiff_t c = 0;
    for (; c + 2 <= nc; c += 2) {
        /* cpg >= 2: chunks c and c+1 (c even) share a group */
        const q4_lut l0 = q4_row_group(sc, zr, c / cpg);
        const q4_lut l1 = cpg == 1 ? q4_row_group(sc, zr, c + 1) : l0;
        q4_vf lo0[Q4_NV], hi0[Q4_NV], lo1[Q4_NV], hi1[Q4_NV];
        q4_unpack16(w + 16 * c, l0, lo0, hi0);
        q4_unpack16(w + 16 * c + 16, l1, lo1, hi1);
        for (int h = 0; h < Q4_NV; h++) {
            a0[h] += q4_load(xp + 32 * c + h * Q4_VL) * lo0[h];
            a1[h] += q4_load(xp + 32 * c + 16 + h * Q4_VL) * hi0[h];
            a2[h] += q4_load(xp + 32 * c + 32 + h * Q4_VL) * lo1[h];
            a3[h] += q4_load(xp + 32 * c + 48 + h * Q4_VL) * hi1[h];
        }
    }
    if (c < nc) {
        const q4_lut l0 = q4_row_group(sc, zr, c / cpg);
        q4_vf lo0[Q4_NV], hi0[Q4_NV];
        q4_unpack16(w + 16 * c, l0, lo0, hi0);
        for (int h = 0; h < Q4_NV; h++) {
            a0[h] += q4_load(xp + 32 * c + h * Q4_VL) * lo0[h];
            a1[h] += q4_load(xp + 32 * c + 16 + h * Q4_VL) * hi0[h];
        }
    }
    q4_vf t = (a0[0] + a1[0]) + (a2[0] + a3[0]);
    for (int h = 1; h < Q4_NV; h++) t += (a0[h] + a1[h]) + (a2[h] + a3[h]);
    return q4_hsum(t);
}

/* weight rows per multi-row decode pass (accumulators + operands must fit the register file) */
#if defined(__AVX512F__)
#define Q4_DR 4
#else
#define Q4_DR 2
#endif

/* The tables of group gi for Q4_DR weight rows, and their chunk c dequantized (multi-row decode). */
typedef struct { q4_lut t[Q4_DR]; } q4_rows_lut;
static inline __attribute__((always_inline)) q4_rows_lut q4_rows_group(const uint16_t *const *sc,
        const uint16_t *const *zr, ptrdiff_t gi) {
    q4_rows_lut lut;
    for (int r = 0; r < Q4_DR; r++) lut.t[r] = q4_row_group(sc[r], zr[r], gi);
    return lut;
}
static inline __attribute__((always_inline)) void q4_rows_unpack(const uint8_t *const *w, ptrdiff_t c,
        const q4_rows_lut *lut, q4_vf lo[Q4_DR][Q4_NV], q4_vf hi[Q4_DR][Q4_NV]) {
    for (int r = 0; r < Q4_DR; r++) q4_unpack16(w[r] + 16 * c, lut->t[r], lo[r], hi[r]);
}

/* Decode, one activation row against Q4_DR weight rows: out[r] = dot(w_r, x). Each activation chunk is loaded
 * once for Q4_DR rows; with one row per pass a long row (K = 11008: 44 KB of activations, more than L1) was
 * re-streamed from L2 for every weight row. Pointers may repeat (rows past the end). */
Q4_KERNEL void q4_dot1xr(const uint8_t *const *w, const uint16_t *const *sc, const uint16_t *const *zr,
                             const float *xp, ptrdiff_t G, ptrdiff_t cpg, float *out) {
    q4_vf ae[Q4_DR][Q4_NV], ao[Q4_DR][Q4_NV];
    for (int r = 0; r < Q4_DR; r++)
        for (int h = 0; h < Q4_NV; h++) ae[r][h] = ao[r][h] = (q4_vf){0};
    for (ptrdiff_t gi = 0; gi < G; gi++) {
        const q4_rows_lut lut = q4_rows_group(sc, zr, gi);
        for (ptrdiff_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
            q4_vf lo[Q4_DR][Q4_NV], hi[Q4_DR][Q4_NV];
            q4_rows_unpack(w, c, &lut, lo, hi);
            for (int h = 0; h < Q4_NV; h++) {
                const q4_vf xe = q4_load(xp + 32 * c + h * Q4_VL);
                const q4_vf xo = q4_load(xp + 32 * c + 16 + h * Q4_VL);
                for (int r = 0; r < Q4_DR; r++) {
                    ae[r][h] += xe * lo[r][h];
                    ao[r][h] += xo * hi[r][h];
                }
            }
        }
    }
    for (int r = 0; r < Q4_DR; r++) {
        q4_vf t = ae[r][0] + ao[r][0];
        for (int h = 1; h < Q4_NV; h++) t += ae[r][h] + ao[r][h];
        out[r] = q4_hsum(t);
    }
}

/* nx (2 or 4, a constant after inlining) activation rows against Q4_DR weight rows */
static inline void q4_dotm(const uint8_t *const *w, const uint16_t *const *sc, const uint16_t *const *zr,
                           const float *const *x, ptrdiff_t G, ptrdiff_t cpg, float *out, const int nx) {
    q4_vf a[Q4_DR][4][Q4_NV];
    for (int r = 0; r < Q4_DR; r++)
        for (int i = 0; i < nx; i++)
            for (int h = 0; h < Q4_NV; h++) a[r][i][h] = (q4_vf){0};
    for (ptrdiff_t gi = 0; gi < G; gi++) {
        const q4_rows_lut lut = q4_rows_group(sc, zr, gi);
        for (ptrdiff_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
            q4_vf lo[Q4_DR][Q4_NV], hi[Q4_DR][Q4_NV];
            q4_rows_unpack(w, c, &lut, lo, hi);
            for (int i = 0; i < nx; i++)
                for (int h = 0; h < Q4_NV; h++) {
                    const q4_vf xe = q4_load(x[i] + 32 * c + h * Q4_VL);
                    const q4_vf xo = q4_load(x[i] + 32 * c + 16 + h * Q4_VL);
                    for (int r = 0; r < Q4_DR; r++) {   /* two statements: two FMAs, not mul+fma+add */
                        a[r][i][h] += xe * lo[r][h];
                        a[r][i][h] += xo * hi[r][h];
                    }
                }
        }
    }
    for (int r = 0; r < Q4_DR; r++)
        for (int i = 0; i < nx; i++) {
            q4_vf t = a[r][i][0];
            for (int h = 1; h < Q4_NV; h++) t += a[r][i][h];
            out[r * 4 + i] = q4_hsum(t);
        }
}
/* Decode, two or four activation rows against Q4_DR weight rows at once: out[r * 4 + i] = dot(w_r, x_i).
 * Each activation chunk loaded is used by Q4_DR weight rows: with one row per pass the activations were
 * re-streamed from L2 for every weight row (64 KB per row at M = 4, K = 4096) and bounded the speed.
 * Pointers may repeat (rows past the end); their results are ignored by the caller. */
Q4_KERNEL void q4_dot2(const uint8_t *const *w, const uint16_t *const *sc, const uint16_t *const *zr,
                       const float *const *x, ptrdiff_t G, ptrdiff_t cpg, float *out) {
    q4_dotm(w, sc, zr, x, G, cpg, out, 2);
}
Q4_KERNEL void q4_dot4(const uint8_t *const *w, const uint16_t *const *sc, const uint16_t *const *zr,
                       const float *const *x, ptrdiff_t G, ptrdiff_t cpg, float *out) {
    q4_dotm(w, sc, zr, x, G, cpg, out, 4);
}

/* Prefill: dequantize chunks [c0, c1) of one weight row into dst (permuted k order, 32 floats a chunk). */
static inline void q4_dequant_perm(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, ptrdiff_t c0,
                                   ptrdiff_t c1, ptrdiff_t cpg, float *dst) {
    for (ptrdiff_t c = c0; c < c1; c++) {
        q4_vf lo[Q4_NV], hi[Q4_NV];
        q4_unpack_chunk(w, sc, zr, c, cpg, lo, hi);
        for (int h = 0; h < Q4_NV; h++) {
            q4_store(dst + 32 * (c - c0) + h * Q4_VL, lo[h]);
            q4_store(dst + 32 * (c - c0) + 16 + h * Q4_VL, hi[h]);
        }
    }
}

/* Prefill register tile: out[i * Q4_TN + j] = dot(x[i], w[j]) over kc floats (kc % 32 == 0) for Q4_TM
 * activation rows and Q4_TN dequantized weight rows; each k step is TM + TN loads and TM * TN FMAs. */
Q4_KERNEL void q4_tile(const float *const *x, const float *const *w, ptrdiff_t kc, float *out) {
    q4_vf c[Q4_TM][Q4_TN];
    for (int i = 0; i < Q4_TM; i++)
        for (int j = 0; j < Q4_TN; j++) c[i][j] = (q4_vf){0};
    for (ptrdiff_t k = 0; k < kc; k += Q4_VL) {
        q4_vf b[Q4_TN];
        for (int j = 0; j < Q4_TN; j++) b[j] = q4_load(w[j] + k);
        for (int i = 0; i < Q4_TM; i++) {
            const q4_vf a = q4_load(x[i] + k);
            for (int j = 0; j < Q4_TN; j++) c[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < Q4_TM; i++)
        for (int j = 0; j < Q4_TN; j++) out[i * Q4_TN + j] = q4_hsum(c[i][j]);
}

#endif /* QUANT4_Q4SIMD_H */
