/* quant4 micro-kernels written with GCC/Clang vector extensions.
 *
 * The Cython kernels in _kernels.pyx own the loops over rows, tiles, threads and scratch; the three
 * innermost loops live here. A 16-float vector type lets the compiler emit one AVX-512 register, two AVX2
 * registers or four SSE registers per value from the same source (each _kernels_<isa> build compiles this
 * header with its own flags), and it keeps accumulators in registers, which GCC's auto-vectorizer did not
 * do reliably for these loops (it chose 4-wide SLP code or kept accumulators on the stack).
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

typedef float q4_f32x16 __attribute__((vector_size(64)));
typedef int32_t q4_i32x16 __attribute__((vector_size(64)));
typedef uint8_t q4_u8x16 __attribute__((vector_size(16)));

static inline q4_f32x16 q4_load(const float *p) { q4_f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void q4_store(float *p, q4_f32x16 v) { memcpy(p, &v, sizeof v); }
static inline q4_f32x16 q4_splat(float s) { return (q4_f32x16){0} + s; }

static inline float q4_hsum(q4_f32x16 v) {
    float t = 0.0f;
    for (int j = 0; j < 16; j++) t += v[j];
    return t;
}

/* 16 packed bytes -> 16 low-nibble codes and 16 high-nibble codes as floats */
static inline void q4_unpack16(const uint8_t *b, q4_f32x16 *lo, q4_f32x16 *hi) {
    q4_u8x16 v;
    memcpy(&v, b, 16);
    *lo = __builtin_convertvector(__builtin_convertvector(v & 15, q4_i32x16), q4_f32x16);
    *hi = __builtin_convertvector(__builtin_convertvector(v >> 4, q4_i32x16), q4_f32x16);
}

/* x [Kp] -> xp [Kp] in the block-permuted k order above (Kp % 32 == 0) */
static inline void q4_permute_x(const float *x, ptrdiff_t Kp, float *xp) {
    for (ptrdiff_t c = 0; c < Kp; c += 32)
        for (int j = 0; j < 16; j++) {
            xp[c + j] = x[c + 2 * j];
            xp[c + 16 + j] = x[c + 2 * j + 1];
        }
}

/* Decode, one activation row: dot(w_row, x) over G groups of cpg 16-byte chunks.
 * w = q * s + (zero - 8 s) per group, two accumulators (even / odd k) for shorter FMA chains. */
static inline float q4_dot1(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const float *xp,
                            ptrdiff_t G, ptrdiff_t cpg) {
    q4_f32x16 ae = {0}, ao = {0};
    for (ptrdiff_t gi = 0; gi < G; gi++) {
        const float s = q4_half_to_float(sc[gi]);
        const float zm = q4_half_to_float(zr[gi]) - 8.0f * s;
        for (ptrdiff_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
            q4_f32x16 lo, hi;
            q4_unpack16(w + 16 * c, &lo, &hi);
            ae += q4_load(xp + 32 * c) * (lo * s + zm);
            ao += q4_load(xp + 32 * c + 16) * (hi * s + zm);
        }
    }
    return q4_hsum(ae + ao);
}

/* Decode, four activation rows x0..x3 (permuted, may repeat) against one weight row; out[0..3]. */
static inline void q4_dot4(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, const float *x0,
                           const float *x1, const float *x2, const float *x3, ptrdiff_t G, ptrdiff_t cpg,
                           float *out) {
    q4_f32x16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (ptrdiff_t gi = 0; gi < G; gi++) {
        const float s = q4_half_to_float(sc[gi]);
        const float zm = q4_half_to_float(zr[gi]) - 8.0f * s;
        for (ptrdiff_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
            q4_f32x16 lo, hi;
            q4_unpack16(w + 16 * c, &lo, &hi);
            lo = lo * s + zm;
            hi = hi * s + zm;
            const ptrdiff_t k = 32 * c;
            a0 += q4_load(x0 + k) * lo + q4_load(x0 + k + 16) * hi;
            a1 += q4_load(x1 + k) * lo + q4_load(x1 + k + 16) * hi;
            a2 += q4_load(x2 + k) * lo + q4_load(x2 + k + 16) * hi;
            a3 += q4_load(x3 + k) * lo + q4_load(x3 + k + 16) * hi;
        }
    }
    out[0] = q4_hsum(a0);
    out[1] = q4_hsum(a1);
    out[2] = q4_hsum(a2);
    out[3] = q4_hsum(a3);
}

/* Prefill: dequantize chunks [c0, c1) of one weight row into dst (permuted k order, 32 floats a chunk). */
static inline void q4_dequant_perm(const uint8_t *w, const uint16_t *sc, const uint16_t *zr, ptrdiff_t c0,
                                   ptrdiff_t c1, ptrdiff_t cpg, float *dst) {
    for (ptrdiff_t c = c0; c < c1; c++) {
        const ptrdiff_t gi = c / cpg;
        const float s = q4_half_to_float(sc[gi]);
        const float zm = q4_half_to_float(zr[gi]) - 8.0f * s;
        q4_f32x16 lo, hi;
        q4_unpack16(w + 16 * c, &lo, &hi);
        q4_store(dst + 32 * (c - c0), lo * s + zm);
        q4_store(dst + 32 * (c - c0) + 16, hi * s + zm);
    }
}

/* Prefill register tile: out[i][j] = dot(x_i, w_j) over kc (multiple of 16) for 4 activation rows x_i and
 * 4 dequantized weight rows w_j; 16 vector accumulators, each k step is 8 loads and 16 FMAs. */
static inline void q4_tile4x4(const float *x0, const float *x1, const float *x2, const float *x3,
                              const float *w0, const float *w1, const float *w2, const float *w3,
                              ptrdiff_t kc, float out[4][4]) {
    q4_f32x16 c00 = {0}, c01 = {0}, c02 = {0}, c03 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0};
    q4_f32x16 c20 = {0}, c21 = {0}, c22 = {0}, c23 = {0}, c30 = {0}, c31 = {0}, c32 = {0}, c33 = {0};
    for (ptrdiff_t k = 0; k < kc; k += 16) {
        const q4_f32x16 b0 = q4_load(w0 + k), b1 = q4_load(w1 + k), b2 = q4_load(w2 + k), b3 = q4_load(w3 + k);
        q4_f32x16 a = q4_load(x0 + k);
        c00 += a * b0; c01 += a * b1; c02 += a * b2; c03 += a * b3;
        a = q4_load(x1 + k);
        c10 += a * b0; c11 += a * b1; c12 += a * b2; c13 += a * b3;
        a = q4_load(x2 + k);
        c20 += a * b0; c21 += a * b1; c22 += a * b2; c23 += a * b3;
        a = q4_load(x3 + k);
        c30 += a * b0; c31 += a * b1; c32 += a * b2; c33 += a * b3;
    }
    out[0][0] = q4_hsum(c00); out[0][1] = q4_hsum(c01); out[0][2] = q4_hsum(c02); out[0][3] = q4_hsum(c03);
    out[1][0] = q4_hsum(c10); out[1][1] = q4_hsum(c11); out[1][2] = q4_hsum(c12); out[1][3] = q4_hsum(c13);
    out[2][0] = q4_hsum(c20); out[2][1] = q4_hsum(c21); out[2][2] = q4_hsum(c22); out[2][3] = q4_hsum(c23);
    out[3][0] = q4_hsum(c30); out[3][1] = q4_hsum(c31); out[3][2] = q4_hsum(c32); out[3][3] = q4_hsum(c33);
}
#endif
