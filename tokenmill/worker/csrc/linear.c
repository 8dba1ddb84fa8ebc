/* y = x W^T (+ bias) for few rows of x (decode steps), bf16, on CPU with AVX-512 bf16.
 *
 * A decode step reads every weight once for a few multiply-adds per element, so it is bound
 * by memory bandwidth (batch 1) or by the dot-product instruction (a few dozen rows).
 * W is packed once in the "VNNI" layout [N/16, K/2, 16, 2]: one 64-byte load holds two
 * consecutive k of 16 consecutive output rows, the operand order of vdpbf16ps. Each x row
 * contributes one broadcast pair per load, the 16 output rows accumulate in the 16 fp32 lanes,
 * and no horizontal sum is ever needed: W streams through once, x stays in L1.
 *
 * x [M, K] rows x_stride elements apart (K even); wp packed by tokenmill/worker/cpu_kernels.py
 * (N padded to a multiple of 16 with zero rows); bias [N] fp32 or NULL; y [M, N] rows
 * y_stride apart. Products of bf16 pairs are exact in fp32 and accumulate in fp32; the output
 * is rounded to bf16 once (nearest even), as torch's bf16 linear does.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define MT 12  /* x rows per pass: MT x NJ accumulators (24) + operands fit the 32 zmm registers */
#define NJ 2   /* output blocks of 16 per pass: independent chains hide vdpbf16ps latency */
#define PF 16  /* prefetch distance in 64-byte loads */

int linear_bf16_vnni(const uint16_t *x, int64_t x_stride, const uint16_t *wp,
                     const float *bias, uint16_t *y, int64_t y_stride, int M, int64_t N,
                     int64_t K) {
    if (M < 1 || K % 2) return -1;
    const int64_t KP = K / 2, NB = (N + 15) / 16, NP = (NB + NJ - 1) / NJ;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < NP; p++) {
        const int64_t nb0 = p * NJ;
        const int nj = NB - nb0 < NJ ? (int)(NB - nb0) : NJ;
        for (int m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? M - m0 : MT;
            __m512 acc[MT][NJ];
            for (int m = 0; m < MT; m++)
                for (int j = 0; j < NJ; j++) acc[m][j] = _mm512_setzero_ps();
            const uint32_t *xr[MT];
            for (int m = 0; m < mt; m++)
                xr[m] = (const uint32_t *)(x + (int64_t)(m0 + m) * x_stride);
            const uint16_t *wb[NJ];
            for (int j = 0; j < NJ; j++) wb[j] = wp + (nb0 + (j < nj ? j : 0)) * KP * 32;
            for (int64_t kk = 0; kk < KP; kk++) {
                __m512bh w[NJ];
                for (int j = 0; j < NJ; j++)   /* ~1 KB ahead: 20 GB/s instead of 16 */
                    _mm_prefetch((const char *)(wb[j] + (kk + PF) * 32), _MM_HINT_T0);
                for (int j = 0; j < NJ; j++)
                    w[j] = (__m512bh)_mm512_loadu_si512((const void *)(wb[j] + kk * 32));
                for (int m = 0; m < mt; m++) {
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xr[m][kk]);
                    for (int j = 0; j < NJ; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
                }
            }
            for (int j = 0; j < nj; j++) {
                const int64_t n0 = (nb0 + j) * 16;
                const int cnt = N - n0 < 16 ? (int)(N - n0) : 16;
                const __mmask16 k = (__mmask16)((1u << cnt) - 1);
                const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n0) : _mm512_setzero_ps();
                for (int m = 0; m < mt; m++) {
                    const __m256bh o = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b));
                    _mm256_mask_storeu_epi16(y + (int64_t)(m0 + m) * y_stride + n0, k,
                                             (__m256i)o);
                }
            }
        }
    }
    return 0;
}

int has_linear_bf16_vnni(void) { return 1; }
#else
int linear_bf16_vnni(const uint16_t *x, int64_t x_stride, const uint16_t *wp,
                     const float *bias, uint16_t *y, int64_t y_stride, int M, int64_t N,
                     int64_t K) {
    (void)x; (void)x_stride; (void)wp; (void)bias; (void)y; (void)y_stride; (void)M; (void)N;
    (void)K;
    return -1;
}

int has_linear_bf16_vnni(void) { return 0; }
#endif
