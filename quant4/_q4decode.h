/* The float parts of one decode step (one token, batch 1) of a Llama layer, for the lean decode path
 * (_decode_stack.pxi): RMSNorm, RoPE on adjacent pairs, attention of one query head over the cached
 * positions, SiLU(gate) * up. Plain C: the reductions carry `omp simd` so the compiler vectorizes them (the
 * pragma is ignored, and the loops stay scalar and correct, in a build without OpenMP). fp32 throughout,
 * as quant4's PyTorch model computes them (models/llama.py); results agree with it to rounding. */
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

/* One query head q[d] over positions 0..T-1 of its K/V head (rows of d floats):
 * out = softmax(scale * K q) V, with s[T] as scratch. */
static inline void q4_attend_head(const float *q, const float *k, const float *v, ptrdiff_t d, ptrdiff_t T,
                                  float scale, float *s, float *out) {
    float mx = -INFINITY, tot = 0.0f;
    for (ptrdiff_t t = 0; t < T; t++) {
        const float *kt = k + t * d;
        float dot = 0.0f;
#pragma omp simd reduction(+:dot)
        for (ptrdiff_t i = 0; i < d; i++) dot += q[i] * kt[i];
        s[t] = dot * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    for (ptrdiff_t t = 0; t < T; t++) {
        s[t] = expf(s[t] - mx);
        tot += s[t];
    }
    for (ptrdiff_t i = 0; i < d; i++) out[i] = 0.0f;
    for (ptrdiff_t t = 0; t < T; t++) {
        const float p = s[t] / tot, *vt = v + t * d;
#pragma omp simd
        for (ptrdiff_t i = 0; i < d; i++) out[i] += p * vt[i];
    }
}

/* gate[i] = silu(gate[i]) * up[i] */
static inline void q4_silu_mul(float *gate, const float *up, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
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
