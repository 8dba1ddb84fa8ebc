/* Greedy sampling straight from bf16 logits: out[b] = argmax(x[b, :V]).
 *
 * The sampler's general path widens logits to float32 first. For 64 rows of a 151,936-token
 * vocabulary that is a fresh 39 MB buffer (page faults on every step, as it is above glibc's
 * mmap threshold) and then a float32 argmax: 41 + 17 ms measured, a fifth of a decode step.
 * A bf16 -> fp32 widening is exact, so the argmax of the bf16 row is the same token.
 *
 * Ties and NaN as torch.argmax: the first index of the maximum; a NaN counts as the maximum,
 * so the first NaN wins (rare: the row is then rescanned in scalar code).
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static int64_t argmax_scalar(const uint16_t *x, int64_t V) {
    int64_t best = 0;
    float m = bf16_to_float(x[0]);
    if (m != m) return 0;
    for (int64_t i = 1; i < V; i++) {
        const float v = bf16_to_float(x[i]);
        if (v != v) return i;
        if (v > m) { m = v; best = i; }
    }
    return best;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "simd.h"

static int64_t argmax_row(const uint16_t *x, int64_t V) {
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    __m512i vidx = _mm512_setzero_si512();
    __m512i cur = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 k = tail16(V, i);
        const __m512 v = load_bf16(x + i, k);
        /* Strictly greater keeps each lane's first index of its maximum. */
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(k, v, vmax, _CMP_GT_OQ);
        nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        cur = _mm512_add_epi32(cur, step);
    }
    if (nan) return argmax_scalar(x, V);
    const float m = _mm512_reduce_max_ps(vmax);
    const __mmask16 at = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m), _CMP_EQ_OQ);
    /* A row of -inf only never updates: index 0, as torch. */
    const __m512i cand = _mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at, vidx);
    return _mm512_reduce_min_epi32(cand);
}
#else
static int64_t argmax_row(const uint16_t *x, int64_t V) { return argmax_scalar(x, V); }
#endif

int argmax_bf16(const uint16_t *x, int64_t x_stride, int64_t B, int64_t V, int64_t *out) {
    if (V < 1 || V > INT32_MAX) return -1;
#pragma omp parallel for schedule(static) if (B > 1)
    for (int64_t b = 0; b < B; b++) out[b] = argmax_row(x + b * x_stride, V);
    return 0;
}
