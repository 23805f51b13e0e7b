/* Small C helpers for quant4/_kernels.pyx: OpenMP shims, fp16 decoding, CPU feature probe.
 * Everything here is static inline and branch-free where it sits on a hot path. */
#ifndef QUANT4_Q4UTIL_H
#define QUANT4_Q4UTIL_H
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define Q4_OPENMP 1
#else
#define Q4_OPENMP 0
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

static inline int q4_openmp_enabled(void) { return Q4_OPENMP; }

#if defined(__F16C__)
#include <immintrin.h>
/* IEEE binary16 -> binary32 in one instruction (vcvtph2ps). */
static inline float q4_half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
/* IEEE binary16 -> binary32 for finite inputs (normals and subnormals; the Python layer rejects inf/nan).
 * Shifting the exponent+mantissa bits into float position and multiplying by 2^112 re-biases the exponent
 * (15 -> 127) and turns a half subnormal into the right float normal in one multiply. */
static inline float q4_half_to_float(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t bits = ((uint32_t)h & 0x7fffu) << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 5.192296858534828e+33f;
    memcpy(&bits, &f, 4);
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* Round a float to the nearest float16 value (ties to even) and back: what storing it as float16 does. */
static inline float q4_round_half(float f) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
    return (float)(_Float16)f;
#endif
}

/* Which kernel build this CPU can run: 2 = AVX-512 (F, BW, VL, DQ) + FMA + F16C, 1 = AVX2 + FMA + F16C,
 * 0 = the baseline build. __builtin_cpu_supports also checks that the OS saves the wide registers. */
static inline int q4_cpu_level(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return 1;
#endif
    return 0;
}

/* Which ISA this translation unit was compiled for (reported by each kernel module). */
static inline const char *q4_build_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}
#endif
