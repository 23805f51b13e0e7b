/* Per-group sums of method="refit" (quant4/_kernels.pyx: _refit_row): the stored rule's codes for a float16
 * scale s and zero z, q = rint(clamp((w - m) / s, 0, 15)) with m = z - 8 s (true division, as
 * quant4.scheme.round_codes and the packing kernel), and the sums a line fit or an error needs. The reductions
 * carry `omp simd` so the compiler vectorizes them (the pragma is ignored, the loops stay scalar and correct,
 * without OpenMP); the order of the additions is then the vector width's, fixed per build. s != 0. */
#ifndef QUANT4_Q4FIT_H
#define QUANT4_Q4FIT_H

#include <math.h>
#include <stddef.h>

static inline float q4_code(float w, float m, float s) {
    float q = (w - m) / s;
    q = q < 0.0f ? 0.0f : q;
    return rintf(q > 15.0f ? 15.0f : q);
}

/* One pass over a group for the float16 pair (s, z): out[0] = the squared error of its reconstruction
 * sum (w - (s q + m))^2, out[1..4] = the sums of q, w, q^2 and q w that the least-squares line w ~ s' q + m'
 * of the next refit needs (the same codes). */
static inline void q4_fit_pass(const float *w, ptrdiff_t n, float s, float z, double *out) {
    const float m = z - 8.0f * s;
    float err = 0.0f, sq = 0.0f, sw = 0.0f, sqq = 0.0f, sqw = 0.0f;
#pragma omp simd reduction(+:err, sq, sw, sqq, sqw)
    for (ptrdiff_t k = 0; k < n; k++) {
        const float q = q4_code(w[k], m, s), e = w[k] - (s * q + m);
        err += e * e;
        sq += q;
        sw += w[k];
        sqq += q * q;
        sqw += q * w[k];
    }
    out[0] = err;
    out[1] = sq;
    out[2] = sw;
    out[3] = sqq;
    out[4] = sqw;
}

/* The clipping search's errors: for nc candidates (nc a multiple of 8; per candidate m = zero - 8 scale, the
 * reciprocal of the scale or 0, the scale and the zero), err[c] = sum over the group of (w - w_hat_c)^2 with
 * codes by reciprocal (a search heuristic; the stored codes use a true division). Eight candidates at a time,
 * their sums held in one vector across the group (the loop over the group outside: the sums stay in a register).
 * A zero scale's candidate gets q = 0 here where the stored rule says 8: the same error, z - w, either way. */
static inline void q4_search_errors(const float *w, ptrdiff_t n, const float *cm, const float *ci,
                                    const float *cs, const float *cz, int nc, float *err) {
    for (int c0 = 0; c0 < nc; c0 += 8) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (ptrdiff_t k = 0; k < n; k++) {
            const float wk = w[k];
#pragma omp simd
            for (int j = 0; j < 8; j++) {
                float q = (wk - cm[c0 + j]) * ci[c0 + j];
                q = q < 0.0f ? 0.0f : q;
                q = rintf(q > 15.0f ? 15.0f : q);
                const float e = (q - 8.0f) * cs[c0 + j] + cz[c0 + j] - wk;
                acc[j] += e * e;
            }
        }
        for (int j = 0; j < 8; j++) err[c0 + j] = acc[j];
    }
}

#endif
