/* y = x W^T (+ bias) on Intel AMX tiles: bf16 in, fp32 accumulation, bf16 out.
 *
 * One tdpbf16ps multiplies a 16x32 bf16 tile of x by a 32x16 tile of W into a 16x16 fp32
 * tile: 8,192 multiply-adds per instruction, an order of magnitude more than AVX-512 per
 * cycle. This is what makes prefill and large decode batches fast on CPUs that have AMX.
 *
 * NOTE: oneDNN (torch's bf16 GEMM) sizes its tiles from CPUID leaf 0x1D. Some hypervisors
 * pass AMX through but report that leaf as zeros; oneDNN then configures empty tiles and dies
 * on SIGILL, which is why tokenmill caps oneDNN at AVX512_CORE_BF16. Palette 1 (8 tiles of
 * 16 rows x 64 bytes) is fixed by the architecture, so this file configures it directly.
 *
 * W is packed as for linear.c, [N/16, K/2, 16, 2] with N padded to a multiple of 32: rows
 * kp..kp+15 of one 16-column block are exactly a B tile (16 rows of 64 bytes). x rows load
 * straight into A tiles. Blocks of 32x32 outputs (2 A tiles, 2 B tiles, 4 accumulators) run
 * over the whole K; a last block of at most 16 rows takes one A tile and 2 accumulators, so
 * no tile product multiplies zero padding (1.2-1.6x at 8-16 rows). The threads split the
 * columns, and rows go in chunks whose x slice stays in L2 while each thread's W block stays
 * there too. K must be a multiple of 32.
 */
#define _GNU_SOURCE   /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tilecfg_t;

static void configure_tiles(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* 1 when the OS enabled the tile state (XCR0 bits 17-18) and granted it to this process. */
int amx_enable(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return 0;   /* AMX-BF16, AMX-TILE */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* One 16x32 by 32x16 product of ones: 32.0 when the tiles really work (run in a child). */
float amx_selftest(void) {
    if (!amx_enable()) return 0.0f;
    static uint16_t A[16 * 32], B[16 * 32];
    static float C[16 * 16];
    for (int i = 0; i < 16 * 32; i++) A[i] = B[i] = 0x3f80;   /* bf16 1.0 */
    configure_tiles();
    _tile_zero(0);
    _tile_loadd(1, A, 64);
    _tile_loadd(2, B, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, C, 64);
    _tile_release();
    return C[0];
}

/* Tile loads of W stream from memory and stall where vector loads would not: prefetch the
 * next k step's two B tiles (1 KB each) while this one computes. 1.2-1.5x on weights that are
 * not in cache (16-64 rows, Qwen2.5-0.5B shapes); further ahead measured no better. */
static inline void prefetch_next(const uint16_t *b0, const uint16_t *b1) {
    for (int l = 0; l < 1024; l += 64) {
        _mm_prefetch((const char *)b0 + 1024 + l, _MM_HINT_T0);
        _mm_prefetch((const char *)b1 + 1024 + l, _MM_HINT_T0);
    }
}

static void store_block(const float *c, const float *bias, uint16_t *y, int64_t y_stride,
                        int rows, int64_t n0, int64_t N) {
    for (int h = 0; h < 2; h++) {
        const int64_t n = n0 + 16 * h;
        if (n >= N) break;
        const int cnt = N - n < 16 ? (int)(N - n) : 16;
        const __mmask16 k = (__mmask16)((1u << cnt) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + r * 32 + 16 * h), b);
            _mm256_mask_storeu_epi16(y + r * y_stride + n, k,
                                     (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

int linear_bf16_amx(const uint16_t *x, int64_t x_stride, const uint16_t *wp, const float *bias,
                    uint16_t *y, int64_t y_stride, int M, int64_t N, int64_t K) {
    if (M < 1 || K % 32) return -1;
    const int64_t KP = K / 2, KT = K / 32, NB2 = (N + 31) / 32;
    /* The last partial block of 32 rows reads from a zero-padded copy, never past x. */
    const int tail = M % 32, full = M - tail;
    uint16_t *xt = NULL;
    if (tail) {
        xt = calloc((size_t)32 * K, sizeof(uint16_t));
        if (!xt) return -2;
        for (int r = 0; r < tail; r++)
            memcpy(xt + (int64_t)r * K, x + (int64_t)(full + r) * x_stride, K * sizeof(uint16_t));
    }
    int64_t mc = (1 << 20) / (K * 2) / 32 * 32;   /* ~1 MB of x per chunk */
    if (mc < 32) mc = 32;
#pragma omp parallel
    {
        configure_tiles();
        float c[32 * 32] __attribute__((aligned(64)));
        for (int64_t m1 = 0; m1 < M; m1 += mc) {
            const int64_t m2 = m1 + mc < M ? m1 + mc : M;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < NB2; nb++) {
                const uint16_t *b0 = wp + 2 * nb * KP * 32, *b1 = b0 + KP * 32;
                for (int64_t m0 = m1; m0 < m2; m0 += 32) {
                    const uint16_t *a = m0 < full ? x + m0 * x_stride : xt;
                    const int64_t as = (m0 < full ? x_stride : K) * 2;
                    const int rows = M - m0 < 32 ? (int)(M - m0) : 32;
                    _tile_zero(0);
                    _tile_zero(1);
                    if (rows <= 16) {
                        /* Half a block: one A tile, so no products of zero padding. */
                        for (int64_t kt = 0; kt < KT; kt++) {
                            prefetch_next(b0 + kt * 512, b1 + kt * 512);
                            _tile_loadd(4, a + kt * 32, as);
                            _tile_loadd(6, b0 + kt * 512, 64);
                            _tile_loadd(7, b1 + kt * 512, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                        }
                        _tile_stored(0, c, 128);
                        _tile_stored(1, c + 16, 128);
                        store_block(c, bias, y + m0 * y_stride, y_stride, rows, nb * 32, N);
                        continue;
                    }
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t kt = 0; kt < KT; kt++) {
                        prefetch_next(b0 + kt * 512, b1 + kt * 512);
                        _tile_loadd(4, a + kt * 32, as);
                        _tile_loadd(5, (const char *)(a + kt * 32) + 16 * as, as);
                        _tile_loadd(6, b0 + kt * 512, 64);
                        _tile_loadd(7, b1 + kt * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, c, 128);
                    _tile_stored(1, c + 16, 128);
                    _tile_stored(2, c + 16 * 32, 128);
                    _tile_stored(3, c + 16 * 32 + 16, 128);
                    store_block(c, bias, y + m0 * y_stride, y_stride, rows, nb * 32, N);
                }
            }
        }
        _tile_release();
    }
    free(xt);
    return 0;
}

int has_linear_bf16_amx(void) { return 1; }

#else

int amx_enable(void) { return 0; }
float amx_selftest(void) { return 0.0f; }
int linear_bf16_amx(const uint16_t *x, int64_t x_stride, const uint16_t *wp, const float *bias,
                    uint16_t *y, int64_t y_stride, int M, int64_t N, int64_t K) {
    (void)x; (void)x_stride; (void)wp; (void)bias; (void)y; (void)y_stride; (void)M; (void)N;
    (void)K;
    return -1;
}
int has_linear_bf16_amx(void) { return 0; }

#endif
