/* The float parts of one decode step (one token, batch 1) of a Llama layer, and of a prefill, for the lean
 * path (_decode_stack.pxi): RMSNorm, RoPE on adjacent pairs, attention of one query head over the cached
 * positions (a prefill: of four queries at a time), SiLU(gate) * up, and an e^x those two vectorize. Plain C: the reductions carry `omp simd` so
 * the compiler vectorizes them (the pragma is ignored, and the loops stay scalar and correct, in a build
 * without OpenMP). fp32 throughout, as quant4's PyTorch model computes them (models/llama.py); results agree
 * with it to rounding. */
#ifndef QUANT4_Q4DECODE_H
#define QUANT4_Q4DECODE_H

#include <math.h>
#include <stdint.h>
#include <stddef.h>

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i < n */
static inline void q4_rms_norm(const float *x, const float *w, ptrdiff_t n, float eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+:ss)
    for (ptrdiff_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Rotate each adjacent pair (x[2i], x[2i+1]) of heads vectors of length d by the angle whose cos/sin are
 * cs[i]/sn[i]: the complex product (x0 + i x1)(c + i s). */
static inline void q4_rope(float *x, ptrdiff_t heads, ptrdiff_t d, const float *cs, const float *sn) {
    for (ptrdiff_t h = 0; h < heads; h++) {
        float *v = x + h * d;
#pragma omp simd
        for (ptrdiff_t i = 0; i < d / 2; i++) {
            const float x0 = v[2 * i], x1 = v[2 * i + 1];
            v[2 * i] = x0 * cs[i] - x1 * sn[i];
            v[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
        }
    }
}

/* e^x in plain arithmetic the compiler vectorizes inside `omp simd` loops (glibc's expf is a call per element,
 * which cost 3-6% of a 135M-shaped decode step in SiLU and softmax). x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in
 * two parts so that n ln2 is exact in fp32), e^r by its Taylor polynomial to r^7 (truncation < 1e-8 relative),
 * times 2^n built in the exponent bits. Within 2 ulp of expf over [-87, 88]; below -87.3 it returns e^-87.3
 * (expf's result is subnormal there), above 88 it returns e^88 (expf goes on to 3.4e38, then inf); a NaN
 * stays NaN. */
static inline float q4_expf(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504089f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_n;                /* n in [-126, 127] (0 for a NaN, whose p is NaN) */
    two_n.i = ((int32_t)(n == n ? n : 0.0f) + 127) * (1 << 23);
    return p * two_n.f;
}

/* One query head q[d] over positions 0..T-1 of its K/V head (rows of d floats):
 * out = softmax(scale * K q) V, with s[T] as scratch. Four positions per pass share the loads of q. */
static inline void q4_attend_head(const float *q, const float *k, const float *v, ptrdiff_t d, ptrdiff_t T,
                                  float scale, float *s, float *out) {
    float mx = -INFINITY, tot = 0.0f;
    ptrdiff_t t = 0;
    for (; t + 4 <= T; t += 4) {
        const float *k0 = k + t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+:d0, d1, d2, d3)
        for (ptrdiff_t i = 0; i < d; i++) {
            d0 += q[i] * k0[i];
            d1 += q[i] * k1[i];
            d2 += q[i] * k2[i];
            d3 += q[i] * k3[i];
        }
        s[t] = d0 * scale, s[t + 1] = d1 * scale, s[t + 2] = d2 * scale, s[t + 3] = d3 * scale;
    }
    for (; t < T; t++) {
        const float *kt = k + t * d;
        float dot = 0.0f;
#pragma omp simd reduction(+:dot)
        for (ptrdiff_t i = 0; i < d; i++) dot += q[i] * kt[i];
        s[t] = dot * scale;
    }
    for (t = 0; t < T; t++) mx = s[t] > mx ? s[t] : mx;
#pragma omp simd reduction(+:tot)
    for (t = 0; t < T; t++) {
        s[t] = q4_expf(s[t] - mx);
        tot += s[t];
    }
    const float inv = 1.0f / tot;
    for (ptrdiff_t i = 0; i < d; i++) out[i] = 0.0f;
    for (t = 0; t < T; t++) {
        const float p = s[t] * inv, *vt = v + t * d;
#pragma omp simd
        for (ptrdiff_t i = 0; i < d; i++) out[i] += p * vt[i];
    }
}

enum { Q4_AQ = 4, Q4_AT = 64 };     /* queries per attention block; positions per score block */
/* q4_attend_block's output columns [0, W) of v's rows (row t at v + t d): out_j = sum_t p_j[t] v_t for the
 * block's queries (p_j = s + j lds), the Q4_AQ x W sums in registers across positions (W a constant: inlined) */
static inline __attribute__((always_inline)) void q4_attend_pv(const float *s, ptrdiff_t lds, const float *v,
                                                               ptrdiff_t d, ptrdiff_t Tn, const int W, int nq,
                                                               float *out, ptrdiff_t ldo) {
    float acc[Q4_AQ][Q4_AT];
    for (int j = 0; j < Q4_AQ; j++)
        for (int c = 0; c < W; c++) acc[j][c] = 0.0f;
    for (ptrdiff_t t = 0; t < Tn; t++) {
        const float *vt = v + t * d;
        const float p0 = s[t], p1 = s[lds + t], p2 = s[2 * lds + t], p3 = s[3 * lds + t];
#pragma omp simd
        for (int c = 0; c < W; c++) {
            acc[0][c] += p0 * vt[c];
            acc[1][c] += p1 * vt[c];
            acc[2][c] += p2 * vt[c];
            acc[3][c] += p3 * vt[c];
        }
    }
    for (int j = 0; j < nq; j++)
        for (int c = 0; c < W; c++) out[j * ldo + c] = acc[j][c];
}

/* Attention of up to Q4_AQ consecutive queries of one head over the first positions of its K/V head, for
 * prefill: query j (j < nq) sees positions t < T0 + j. K is given transposed, kt[i * ldt + t] (i < d, t a
 * multiple of Q4_AT past T0 + nq - 1 readable: zero padded), V as rows v[t * d + i]. Each K and V element
 * loaded serves all Q4_AQ queries (a query at a time reads the whole K/V head from L2 per query: L2-bound).
 * s: scratch [Q4_AQ][lds], lds >= the padded length. d % 16 == 0. out_j = out + j * ldo. */
static inline void q4_attend_block(const float *q, ptrdiff_t ldq, int nq, const float *kt, ptrdiff_t ldt,
                                   const float *v, ptrdiff_t d, ptrdiff_t T0, float scale, float *s,
                                   ptrdiff_t lds, float *out, ptrdiff_t ldo) {
    const ptrdiff_t Tn = T0 + nq - 1;
    const float *qr[Q4_AQ];
    for (int j = 0; j < Q4_AQ; j++) qr[j] = q + (j < nq ? j : 0) * ldq;
    for (ptrdiff_t t0 = 0; t0 < Tn; t0 += Q4_AT) {
        float acc[Q4_AQ][Q4_AT];
        for (int j = 0; j < Q4_AQ; j++)
            for (int c = 0; c < Q4_AT; c++) acc[j][c] = 0.0f;
        for (ptrdiff_t i = 0; i < d; i++) {
            const float *row = kt + i * ldt + t0;
            const float q0 = qr[0][i], q1 = qr[1][i], q2 = qr[2][i], q3 = qr[3][i];
#pragma omp simd
            for (int c = 0; c < Q4_AT; c++) {
                acc[0][c] += q0 * row[c];
                acc[1][c] += q1 * row[c];
                acc[2][c] += q2 * row[c];
                acc[3][c] += q3 * row[c];
            }
        }
        for (int j = 0; j < Q4_AQ; j++)
            for (int c = 0; c < Q4_AT; c++) s[j * lds + t0 + c] = acc[j][c] * scale;
    }
    for (int j = 0; j < Q4_AQ; j++) {
        float *sj = s + j * lds, mx = -INFINITY, tot = 0.0f;
        const ptrdiff_t T = j < nq ? T0 + j : 0;
        for (ptrdiff_t t = 0; t < T; t++) mx = sj[t] > mx ? sj[t] : mx;
#pragma omp simd reduction(+:tot)
        for (ptrdiff_t t = 0; t < T; t++) {
            sj[t] = q4_expf(sj[t] - mx);
            tot += sj[t];
        }
        const float inv = T ? 1.0f / tot : 0.0f;
#pragma omp simd
        for (ptrdiff_t t = 0; t < T; t++) sj[t] *= inv;
        for (ptrdiff_t t = T; t < Tn; t++) sj[t] = 0.0f;
    }
    ptrdiff_t i0 = 0;
    for (; i0 + Q4_AT <= d; i0 += Q4_AT)     /* 16 accumulator vectors: throughput-bound, not latency */
        q4_attend_pv(s, lds, v + i0, d, Tn, Q4_AT, nq, out + i0, ldo);
    for (; i0 < d; i0 += 16) q4_attend_pv(s, lds, v + i0, d, Tn, 16, nq, out + i0, ldo);
}

/* gate[i] = silu(gate[i]) * up[i] */
static inline void q4_silu_mul(float *gate, const float *up, ptrdiff_t n) {
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + q4_expf(-gate[i])) * up[i];
}

/* x . w for one 8-bit row (codes u = w / d + 128, one scale d per 32 inputs) with fp32 x as given: per block
   sum_k x[k] (u[k] - 128), times d, summed over the blocks (Int8Linear's exact-activation product) */
static inline float q8_dot_f32(const uint8_t *u, const float *d, const float *x, ptrdiff_t nb) {
    float acc = 0.0f;
    for (ptrdiff_t b = 0; b < nb; b++) {
        float part = 0.0f;
#pragma omp simd reduction(+:part)
        for (ptrdiff_t k = 0; k < 32; k++) part += x[32 * b + k] * ((float)u[32 * b + k] - 128.0f);
        acc += d[b] * part;
    }
    return acc;
}

/* y[i] += x[i] */
static inline void q4_add_into(float *y, const float *x, ptrdiff_t n) {
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) y[i] += x[i];
}

#endif
