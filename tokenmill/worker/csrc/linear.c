/* y = x W^T (+ bias) for few rows of x (decode steps), bf16, on CPU with AVX-512 bf16.
 *
 * A decode step reads every weight once for a few multiply-adds per element, so it is bound
 * by memory bandwidth (batch 1) or by the dot-product instruction and the bandwidth together
 * (a few dozen rows). W is packed once in the "VNNI" layout [N/16, K/2, 16, 2]: one 64-byte
 * load holds two consecutive k of 16 consecutive output rows, the operand order of vdpbf16ps.
 * Each x row contributes one broadcast pair per load, the 16 output rows accumulate in the 16
 * fp32 lanes, and no horizontal sum is ever needed.
 *
 * Rows go in tiles of up to 16 (a 16-row decode step is one tile, so every weight byte comes
 * from DRAM once and feeds 16 multiply-adds), and x is first interleaved pair by pair
 * ([tile][K/2][rows]), so a tile's broadcasts are fixed offsets from one pointer. The tile
 * height is a compile-time constant of each micro-kernel: its accumulators stay in registers
 * and the inner loop has no branch. Weights are prefetched 6 KB ahead into L2, which keeps
 * enough DRAM reads in flight for two cores (16 rows: 1.12-1.18x the former 12-row tiles over
 * a Qwen2.5-0.5B decode step's weights, BENCHMARKS.md).
 *
 * x [M, K] rows x_stride elements apart (K even); wp packed by tokenmill/worker/cpu_kernels.py
 * (N padded to a multiple of 32 with zero rows); bias [N] fp32 or NULL; y [M, N] rows
 * y_stride apart. Products of bf16 pairs are exact in fp32 and accumulate in fp32 in k order;
 * the output is rounded to bf16 once (nearest even), as torch's bf16 linear does.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define MAX_MT 16
#define MAX_NJ 4
#define PF 96  /* prefetch distance in 64-byte loads */

/* Blocks of 16 outputs a micro-kernel of MT rows computes: NJ x MT accumulators + NJ
 * weights + one broadcast fit the 32 zmm registers, and NJ >= 2 below 8 rows keeps enough
 * independent vdpbf16ps chains to hide its latency. */
#define NJ_OF(MT) ((MT) <= 6 ? 4 : (MT) <= 8 ? 3 : (MT) <= 12 ? 2 : 1)

/* MT rows x NJ_OF(MT) blocks of 16 outputs over all of K. */
#define MICRO(MT)                                                                             \
    static void micro_##MT(const uint32_t *xt, const uint16_t *const *wb, int64_t KP,         \
                           __m512 *out) {                                                     \
        enum { NJ = NJ_OF(MT) };                                                              \
        __m512 acc[MT][NJ];                                                                   \
        for (int m = 0; m < MT; m++)                                                          \
            for (int j = 0; j < NJ; j++) acc[m][j] = _mm512_setzero_ps();                     \
        const uint16_t *w0 = wb[0];                                                           \
        int64_t d[NJ];                                                                        \
        for (int j = 0; j < NJ; j++) d[j] = wb[j] - w0;                                       \
        for (int64_t kk = 0; kk < KP; kk++, xt += MT, w0 += 32) {                             \
            __m512bh w[NJ];                                                                   \
            for (int j = 0; j < NJ; j++)                                                      \
                _mm_prefetch((const char *)(w0 + d[j] + PF * 32), _MM_HINT_T1);               \
            for (int j = 0; j < NJ; j++)                                                      \
                w[j] = (__m512bh)_mm512_loadu_si512((const void *)(w0 + d[j]));               \
            for (int m = 0; m < MT; m++) {                                                    \
                const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xt[m]);                  \
                for (int j = 0; j < NJ; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]); \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < MT; m++)                                                          \
            for (int j = 0; j < NJ; j++) out[m * MAX_NJ + j] = acc[m][j];                     \
    }
MICRO(1) MICRO(2) MICRO(3) MICRO(4) MICRO(5) MICRO(6) MICRO(7) MICRO(8) MICRO(9) MICRO(10)
MICRO(11) MICRO(12) MICRO(13) MICRO(14) MICRO(15) MICRO(16)

typedef void (*micro_fn)(const uint32_t *, const uint16_t *const *, int64_t, __m512 *);
static const micro_fn MICROS[MAX_MT + 1] = {
    0, micro_1, micro_2, micro_3, micro_4, micro_5, micro_6, micro_7, micro_8, micro_9,
    micro_10, micro_11, micro_12, micro_13, micro_14, micro_15, micro_16};

/* The interleaved x of the calling thread, kept between calls: a decode step makes a few
 * hundred of them, and a fresh allocation of over 128 KB is a fresh mmap each time. */
static _Thread_local uint32_t *xt_buf;
static _Thread_local size_t xt_cap;

static uint32_t *interleave_rows(const uint16_t *x, int64_t x_stride, int M, int tiles, int MT,
                                 int64_t KP) {
    const size_t need = (size_t)tiles * MT * KP;
    if (need > xt_cap) {
        free(xt_buf);
        xt_buf = aligned_alloc(64, (need * 4 + 63) / 64 * 64);
        xt_cap = xt_buf ? need : 0;
        if (!xt_buf) return NULL;
    }
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < MT; m++) {   /* rows past M are zero: a padded tile wastes, not errs */
            const int row = t * MT + m;
            uint32_t *dst = xt_buf + (int64_t)t * MT * KP + m;
            if (row >= M) {
                for (int64_t kk = 0; kk < KP; kk++) dst[kk * MT] = 0;
                continue;
            }
            const uint32_t *src = (const uint32_t *)(x + (int64_t)row * x_stride);
            for (int64_t kk = 0; kk < KP; kk++) dst[kk * MT] = src[kk];
        }
    return xt_buf;
}

int linear_bf16_vnni(const uint16_t *x, int64_t x_stride, const uint16_t *wp,
                     const float *bias, uint16_t *y, int64_t y_stride, int M, int64_t N,
                     int64_t K) {
    if (M < 1 || K % 2) return -1;
    const int64_t KP = K / 2, NB = (N + 15) / 16;
    const int tiles = (M + MAX_MT - 1) / MAX_MT, MT = (M + tiles - 1) / tiles, NJ = NJ_OF(MT);
    const int64_t NP = (NB + NJ - 1) / NJ;
    const uint32_t *xt = interleave_rows(x, x_stride, M, tiles, MT, KP);
    if (!xt) return -2;
    const micro_fn micro = MICROS[MT];
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < NP; p++) {
        const int64_t nb0 = p * NJ;
        const int nj = NB - nb0 < NJ ? (int)(NB - nb0) : NJ;
        const uint16_t *wb[MAX_NJ];
        for (int j = 0; j < NJ; j++) wb[j] = wp + (nb0 + (j < nj ? j : 0)) * KP * 32;
        __m512 out[MAX_MT * MAX_NJ];
        for (int t = 0; t < tiles; t++) {   /* later tiles read this panel from L2 */
            const int m0 = t * MT, mt = M - m0 < MT ? M - m0 : MT;
            micro(xt + (int64_t)t * MT * KP, wb, KP, out);
            for (int j = 0; j < nj; j++) {
                const int64_t n0 = (nb0 + j) * 16;
                const int cnt = N - n0 < 16 ? (int)(N - n0) : 16;
                const __mmask16 k = (__mmask16)((1u << cnt) - 1);
                const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n0) : _mm512_setzero_ps();
                for (int m = 0; m < mt; m++) {
                    const __m256bh o = _mm512_cvtneps_pbh(_mm512_add_ps(out[m * MAX_NJ + j], b));
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
