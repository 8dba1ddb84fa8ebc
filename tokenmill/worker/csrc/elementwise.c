/* The bf16 elementwise steps of a decoder block, fused, on CPU with AVX-512.
 *
 * In PyTorch each of these is a chain of ops (casts, pow, mean, rsqrt, muls, silu), every one
 * a pass over memory and a dispatch: an RMSNorm of 2,048 x 512 bf16 values took 1.75 ms, the
 * SiLU-and-multiply of a 2,048 x 1,536 MLP 1.6 ms, about as long as the AMX matmuls around them.
 * Here each is one pass, rows split over the OpenMP threads.
 *
 * Rounding follows transformers' bf16 modules step by step, so results match them up to the
 * order of a row's sum of squares and the last bit of exp:
 *   rmsnorm:   t = bf16(x * rsqrt(mean(x^2) + eps)) in fp32, y = bf16(w * t)
 *   add:       r = bf16(x + delta)                   (the residual stream)
 *   silu_mul:  y = bf16(bf16(g / (1 + e^-g)) * u)
 *   rope:      y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))   (sin carries the sign)
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <math.h>

#include "simd.h"

static inline __m512 round_bf16(__m512 v) {   /* to bf16 and back: the rounding of a bf16 op */
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

static inline void store_bf16(uint16_t *p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
}

static void norm_row(const uint16_t *x, const uint16_t *w, float eps, uint16_t *y, int64_t D) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
        const __m512 v = load_bf16(x + i, tail16(D, i));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 s = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
    for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 k = tail16(D, i);
        const __m512 t = round_bf16(_mm512_mul_ps(load_bf16(x + i, k), s));
        store_bf16(y + i, k, _mm512_mul_ps(load_bf16(w + i, k), t));
    }
}

/* y[t] = rmsnorm(x[t]) for T rows of D; with delta, first x[t] = bf16(x[t] + delta[t]) written
 * to res (the new residual stream), and the norm is of that. Rows are *_stride apart. */
int add_rmsnorm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *delta,
                     int64_t delta_stride, const uint16_t *w, float eps, uint16_t *res,
                     int64_t res_stride, uint16_t *y, int64_t y_stride, int64_t T, int64_t D) {
#pragma omp parallel for schedule(static) if (T * D >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xr = x + t * x_stride;
        if (delta) {
            uint16_t *rr = res + t * res_stride;
            const uint16_t *dr = delta + t * delta_stride;
            for (int64_t i = 0; i < D; i += 16) {
                const __mmask16 k = tail16(D, i);
                store_bf16(rr + i, k, _mm512_add_ps(load_bf16(xr + i, k), load_bf16(dr + i, k)));
            }
            xr = rr;
        }
        norm_row(xr, w, eps, y + t * y_stride, D);
    }
    return 0;
}

/* y[t] = silu(gu[t, :I]) * gu[t, I:2I] for T rows (the fused gate|up matmul's output). */
int silu_mul_bf16(const uint16_t *gu, int64_t gu_stride, uint16_t *y, int64_t y_stride,
                  int64_t T, int64_t I) {
#pragma omp parallel for schedule(static) if (T * I >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gu + t * gu_stride, *u = g + I;
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 k = tail16(I, i);
            const __m512 gv = load_bf16(g + i, k);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            store_bf16(y + t * y_stride + i, k, _mm512_mul_ps(s, load_bf16(u + i, k)));
        }
    }
    return 0;
}

/* Rotary embedding, neox style (the halves of D are the rotated pairs), for T tokens of NH
 * heads: x [T, NH, D] with tokens x_stride apart and heads D apart; cos, sin [T, D] with sin's
 * first half negated (see layers.RotaryEmbedding); y [T, NH, D] contiguous. */
int rope_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *sin,
              uint16_t *y, int64_t T, int64_t NH, int64_t D) {
    const int64_t half = D / 2;
    if (D % 2) return -1;
#pragma omp parallel for schedule(static) if (T * NH * D >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < NH; h++) {
            const uint16_t *xr = x + t * x_stride + h * D;
            uint16_t *yr = y + (t * NH + h) * D;
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 k = tail16(half, i);
                const __m512 x1 = load_bf16(xr + i, k), x2 = load_bf16(xr + half + i, k);
                const __m512 c1 = load_bf16(c + i, k), c2 = load_bf16(c + half + i, k);
                const __m512 s1 = load_bf16(s + i, k), s2 = load_bf16(s + half + i, k);
                store_bf16(yr + i, k, _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)),
                                                    round_bf16(_mm512_mul_ps(x2, s1))));
                store_bf16(yr + half + i, k, _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)),
                                                           round_bf16(_mm512_mul_ps(x1, s2))));
            }
        }
    }
    return 0;
}

int has_elementwise_bf16(void) { return 1; }

#else

int add_rmsnorm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *delta,
                     int64_t delta_stride, const uint16_t *w, float eps, uint16_t *res,
                     int64_t res_stride, uint16_t *y, int64_t y_stride, int64_t T, int64_t D) {
    (void)x; (void)x_stride; (void)delta; (void)delta_stride; (void)w; (void)eps; (void)res;
    (void)res_stride; (void)y; (void)y_stride; (void)T; (void)D;
    return -1;
}
int silu_mul_bf16(const uint16_t *gu, int64_t gu_stride, uint16_t *y, int64_t y_stride,
                  int64_t T, int64_t I) {
    (void)gu; (void)gu_stride; (void)y; (void)y_stride; (void)T; (void)I;
    return -1;
}
int rope_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *sin,
              uint16_t *y, int64_t T, int64_t NH, int64_t D) {
    (void)x; (void)x_stride; (void)cos; (void)sin; (void)y; (void)T; (void)NH; (void)D;
    return -1;
}
int has_elementwise_bf16(void) { return 0; }

#endif
