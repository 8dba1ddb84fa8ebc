/* Decode attention straight from the paged KV cache, on CPU.
 *
 * The PyTorch path gathers every decode sequence's K/V blocks into a padded contiguous tensor
 * (index_select) and then runs SDPA over it: the context is copied once and read twice per
 * layer and step. Here each (sequence, KV head) pair reads its blocks in place, once, and the
 * G = H / Hkv query heads that share the KV head use every K/V row it loads.
 *
 * Built at first use by tokenmill/worker/cpu_kernels.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes; OpenMP resolves to the libgomp torch already loaded, so both share
 * one thread pool.
 *
 * Layouts (element strides):
 *   q     [num_seqs, H, D] rows q_stride apart (the decode rows of a step)
 *   cache [2 * Hkv, num_blocks, block_size, D]: K heads then V heads
 *   table [num_seqs, max_blocks] int32 block ids; lens [num_seqs] int32 context lengths
 *   out   [num_seqs, H, D] rows out_stride apart
 * window > 0: a token at position L-1 sees keys [L - window, L).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16   /* one AVX-512 register of floats; head_dim must be a multiple */
#define MAX_GROUP 64
#define MAX_DIM 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Lane-wise partial sums (no reassociation needed to vectorize), then one horizontal sum. */
static inline float dot(const float *q, const float *k, int d) {
    float acc[LANES] = {0};
    for (int i = 0; i < d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += q[i + l] * k[i + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                    \
int NAME(const T *q, int64_t q_stride, const T *cache, int64_t num_blocks, int block_size,   \
         int num_kv_heads, int num_heads, int head_dim, const int32_t *table, int max_blocks,  \
         const int32_t *lens, int num_seqs, float scale, int window, T *out,                  \
         int64_t out_stride) {                                                                 \
    const int G = num_heads / num_kv_heads, D = head_dim;                                      \
    if (G > MAX_GROUP || D > MAX_DIM || D % LANES) return -1;                                  \
    int failed = 0;                                                                            \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
    for (int b = 0; b < num_seqs; b++) {                                                       \
        for (int h = 0; h < num_kv_heads; h++) {                                               \
            const int len = lens[b];                                                           \
            const int start = (window > 0 && len > window) ? len - window : 0;                 \
            const int n = len - start;                                                         \
            float *scores = malloc(sizeof(float) * (size_t)G * (n > 0 ? n : 1));               \
            if (!scores) { failed = 1; continue; }                                             \
            float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], k[MAX_DIM];                 \
            float mx[MAX_GROUP], sum[MAX_GROUP];                                               \
            for (int g = 0; g < G; g++) {                                                      \
                const T *qp = q + b * q_stride + (int64_t)(h * G + g) * D;                     \
                for (int d = 0; d < D; d++) qf[g][d] = LOAD(qp[d]) * scale;                    \
                mx[g] = -INFINITY;                                                             \
            }                                                                                  \
            const int32_t *blocks = table + (int64_t)b * max_blocks;                           \
            const T *kbase = cache + (int64_t)h * num_blocks * block_size * D;                 \
            const T *vbase = cache + (int64_t)(num_kv_heads + h) * num_blocks * block_size * D; \
            for (int t = start; t < len; t++) {                                                \
                const T *kp = kbase + ((int64_t)blocks[t / block_size] * block_size           \
                                       + t % block_size) * D;   /* fallback: kept simple */    \
                for (int d = 0; d < D; d++) k[d] = LOAD(kp[d]);                                \
                for (int g = 0; g < G; g++) {                                                  \
                    float s = dot(qf[g], k, D);                                                \
                    scores[(int64_t)g * n + (t - start)] = s;                                  \
                    if (s > mx[g]) mx[g] = s;                                                  \
                }                                                                              \
            }                                                                                  \
            for (int g = 0; g < G; g++) {                                                      \
                float *sg = scores + (int64_t)g * n, total = 0.f;                              \
                for (int i = 0; i < n; i++) { sg[i] = expf(sg[i] - mx[g]); total += sg[i]; }   \
                sum[g] = total;                                                                \
                memset(acc[g], 0, sizeof(float) * D);                                          \
            }                                                                                  \
            for (int t = start; t < len; t++) {                                                \
                const T *vp = vbase + ((int64_t)blocks[t / block_size] * block_size           \
                                       + t % block_size) * D;                                  \
                for (int d = 0; d < D; d++) k[d] = LOAD(vp[d]);                                \
                for (int g = 0; g < G; g++) {                                                  \
                    const float p = scores[(int64_t)g * n + (t - start)];                      \
                    for (int d = 0; d < D; d++) acc[g][d] += p * k[d];                         \
                }                                                                              \
            }                                                                                  \
            for (int g = 0; g < G; g++) {                                                      \
                T *op = out + b * out_stride + (int64_t)(h * G + g) * D;                       \
                const float inv = n > 0 ? 1.f / sum[g] : 0.f;                                  \
                for (int d = 0; d < D; d++) op[d] = STORE(acc[g][d] * inv);                    \
            }                                                                                  \
            free(scores);                                                                      \
        }                                                                                      \
    }                                                                                          \
    return failed ? -2 : 0;                                                                    \
}


#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "simd.h"
#define HAVE_AVX512_BF16 1

/* The tokens [t, t + *cnt) of a sequence that share its block at t, and the first one's row.
 * NOTE: the kernels walk block by block and move a pointer within one: a division per token
 * (t / block_size) cost as much as its dot products. */
static inline const uint16_t *block_run(const uint16_t *base, const int32_t *blocks,
                                        int block_size, int D, int t, int len, int *cnt) {
    const int off = t % block_size;
    *cnt = block_size - off < len - t ? block_size - off : len - t;
    return base + ((int64_t)blocks[t / block_size] * block_size + off) * D;
}

#define TILE 16   /* keys scored and accumulated together */

/* Lane j of the result = the horizontal sum of v[j]: 45 shuffles and adds for 16 vectors, where
 * 16 separate reductions take about 160 (they were most of this kernel's time). */
static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)   /* per 128-bit lane: [k, k+1, k, k+1] partial sums */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {   /* per 128-bit lane: [k .. k+3] */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)   /* lanes [k..k+3, k..k+3, k+4..k+7, k+4..k+7] */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                         _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* dst[j] = scale * q . k_j for the m <= 16 rows k_j; C = head_dim / 32 (a constant where
 * inlined, so the loops unroll). */
static inline __attribute__((always_inline)) void qk_tile(
        const __m512bh *qv, const uint16_t *const *rows, int m, int C, float scale, float *dst) {
    __m512 acc[TILE];
    for (int j = 0; j < TILE; j++) {
        __m512 s = _mm512_setzero_ps();
        if (j < m)
            for (int c = 0; c < C; c++)
                s = _mm512_dpbf16_ps(s, qv[c],
                                     (__m512bh)_mm512_loadu_si512((const void *)(rows[j] + 32 * c)));
        acc[j] = s;
    }
    _mm512_mask_storeu_ps(dst, tail16(m, 0), _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
}

/* acc += sum_j p[j] * v_j over a tile of m <= 16 keys whose V rows are interleaved in pairs
 * (vp[j/2][c]: 16 dims of rows j and j+1, bf16 side by side; see interleave_pairs), with p
 * rounded to bf16 as SDPA's flash kernel does, so one vdpbf16ps does two keys' FMAs. */
static inline __attribute__((always_inline)) void pv_tile(
        const float *p, const __m512i *vp, int m, int V, __m512 *acc) {
    uint32_t pp[TILE / 2];
    _mm256_storeu_si256((__m256i *)pp, (__m256i)_mm512_cvtneps_pbh(
        _mm512_maskz_loadu_ps(tail16(m, 0), p)));
    __m512 a[MAX_DIM / 16];
    for (int c = 0; c < V; c++) a[c] = acc[c];
    for (int j = 0; j < (m + 1) / 2; j++) {
        const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp[j]);
        for (int c = 0; c < V; c++)
            a[c] = _mm512_dpbf16_ps(a[c], pj, (__m512bh)vp[(int64_t)j * V + c]);
    }
    for (int c = 0; c < V; c++) acc[c] = a[c];
}

/* Rows a and b (D bf16 each; b NULL: zeros) as D/16 vectors of (a[d], b[d]) pairs. Within
 * each 32 dims the pairs come in unpack order: vector 2k holds dims 32k + 8L + {0..3} and
 * 2k+1 dims 32k + 8L + {4..7} in its 128-bit lane L (undone once, at the output). */
static inline void interleave_pairs(const uint16_t *a, const uint16_t *b, int D, __m512i *out) {
    for (int k = 0; k < D / 32; k++) {
        const __m512i x = _mm512_loadu_si512((const void *)(a + 32 * k));
        const __m512i y = b ? _mm512_loadu_si512((const void *)(b + 32 * k)) : _mm512_setzero_si512();
        out[2 * k] = _mm512_unpacklo_epi16(x, y);
        out[2 * k + 1] = _mm512_unpackhi_epi16(x, y);
    }
}

static void qk_rows(const __m512bh (*qv)[MAX_DIM / 32], const uint16_t *const *rows, int m,
                    int G, int C, float scale, float *scores, int64_t stride) {
    switch (C) {   /* the common head sizes unrolled */
    case 2: for (int g = 0; g < G; g++) qk_tile(qv[g], rows, m, 2, scale, scores + g * stride); break;
    case 4: for (int g = 0; g < G; g++) qk_tile(qv[g], rows, m, 4, scale, scores + g * stride); break;
    default: for (int g = 0; g < G; g++) qk_tile(qv[g], rows, m, C, scale, scores + g * stride);
    }
}

static void pv_rows(const float *scores, int64_t stride, const __m512i *vp, int m, int G,
                    int V, __m512 (*acc)[MAX_DIM / 16]) {
    switch (V) {
    case 4: for (int g = 0; g < G; g++) pv_tile(scores + g * stride, vp, m, 4, acc[g]); break;
    case 8: for (int g = 0; g < G; g++) pv_tile(scores + g * stride, vp, m, 8, acc[g]); break;
    default: for (int g = 0; g < G; g++) pv_tile(scores + g * stride, vp, m, V, acc[g]);
    }
}

/* The same computation, hand-vectorized for AVX-512 with bf16 dot products (head_dim a multiple
 * of 32), 16 keys at a time. K rows: vdpbf16ps multiplies bf16 pairs exactly and accumulates in
 * fp32; P.V: vdpbf16ps again, P rounded to bf16, V rows paired (pv_tile). scores: G rows of n
 * rounded up to 16. */
static void decode_one_bf16(const uint16_t *q, const uint16_t *kbase, const uint16_t *vbase,
                            const int32_t *blocks, int block_size, int start, int len, int G,
                            int D, float scale, float *scores, uint16_t *out) {
    const int C = D / 32, V = D / 16, n = len - start;
    const int64_t stride = (n + TILE - 1) / TILE * TILE;
    __m512bh qv[MAX_GROUP][MAX_DIM / 32];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++)
            qv[g][c] = (__m512bh)_mm512_loadu_si512((const void *)(q + (int64_t)g * D + 32 * c));
    const int64_t block_bytes = (int64_t)block_size * D * 2;
    const uint16_t *rows[TILE];
    int m = 0, done = 0;
    for (int t = start, cnt; t < len; t += cnt) {
        const uint16_t *kp = block_run(kbase, blocks, block_size, D, t, len, &cnt);
        /* NOTE: a sequence's blocks lie anywhere in the cache and the hardware prefetcher
         * stops at each: fetch the next block's K rows, and this block's V rows for the P.V
         * pass, while this block's dot products run (decode attention 13% faster). */
        const int bi = t / block_size;
        if ((int64_t)(bi + 1) * block_size < len) {
            const char *nk = (const char *)(kbase + (int64_t)blocks[bi + 1] * block_size * D);
            for (int64_t o = 0; o < block_bytes; o += 64) _mm_prefetch(nk + o, _MM_HINT_T0);
        }
        const char *vb = (const char *)(vbase + (int64_t)blocks[bi] * block_size * D);
        for (int64_t o = 0; o < block_bytes; o += 64) _mm_prefetch(vb + o, _MM_HINT_T1);
        for (int j = 0; j < cnt; j++, kp += D) {
            rows[m++] = kp;
            if (m == TILE) {
                qk_rows(qv, rows, m, G, C, scale, scores + done, stride);
                done += m;
                m = 0;
            }
        }
    }
    if (m) qk_rows(qv, rows, m, G, C, scale, scores + done, stride);

    float sum[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        float *sg = scores + g * stride;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < n; i += 16)
            mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, tail16(n, i), sg + i));
        mv = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 tot = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            const __mmask16 k = tail16(n, i);
            const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(k, sg + i), mv)));
            _mm512_mask_storeu_ps(sg + i, k, e);
            tot = _mm512_add_ps(tot, e);
        }
        sum[g] = _mm512_reduce_add_ps(tot);
    }

    __m512 acc[MAX_GROUP][MAX_DIM / 16];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < V; c++) acc[g][c] = _mm512_setzero_ps();
    __m512i vp[TILE / 2 * MAX_DIM / 16];
    const uint16_t *odd = NULL;   /* a row waiting for its pair */
    m = done = 0;
    for (int t = start, cnt; t < len; t += cnt) {
        const uint16_t *row = block_run(vbase, blocks, block_size, D, t, len, &cnt);
        for (int j = 0; j < cnt; j++, row += D) {
            if (!odd) { odd = row; continue; }
            interleave_pairs(odd, row, D, vp + (int64_t)(m / 2) * V);
            odd = NULL;
            if ((m += 2) == TILE) {
                pv_rows(scores + done, stride, vp, m, G, V, acc);
                done += m;
                m = 0;
            }
        }
    }
    if (odd) { interleave_pairs(odd, NULL, D, vp + (int64_t)(m / 2) * V); m++; }
    if (m) pv_rows(scores + done, stride, vp, m, G, V, acc);
    for (int g = 0; g < G; g++) {
        float tmp[MAX_DIM];
        const __m512 inv = _mm512_set1_ps(n > 0 ? 1.f / sum[g] : 0.f);
        for (int c = 0; c < V; c++) _mm512_storeu_ps(tmp + 16 * c, _mm512_mul_ps(acc[g][c], inv));
        for (int d = 0; d < D; d++)   /* undo interleave_pairs' dim order */
            out[(int64_t)g * D + d] = f32_to_bf16(
                tmp[d / 32 * 32 + (d % 8 >= 4) * 16 + (d % 32) / 8 * 4 + d % 4]);
    }
}

int paged_decode_attention_bf16_avx512(
        const uint16_t *q, int64_t q_stride, const uint16_t *cache, int64_t num_blocks,
        int block_size, int num_kv_heads, int num_heads, int head_dim, const int32_t *table,
        int max_blocks, const int32_t *lens, int num_seqs, float scale, int window,
        uint16_t *out, int64_t out_stride) {
    const int G = num_heads / num_kv_heads, D = head_dim;
    if (G > MAX_GROUP || D > MAX_DIM || D % 32) return -1;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < num_seqs; b++) {
        for (int h = 0; h < num_kv_heads; h++) {
            const int len = lens[b];
            const int start = (window > 0 && len > window) ? len - window : 0;
            const size_t n16 = (size_t)(len - start + TILE - 1) / TILE * TILE;
            float *scores = malloc(sizeof(float) * (size_t)G * (n16 ? n16 : 1));
            if (!scores) { failed = 1; continue; }
            const int64_t head = (int64_t)num_blocks * block_size * D;
            decode_one_bf16(q + b * q_stride + (int64_t)h * G * D, cache + h * head,
                            cache + (num_kv_heads + h) * head, table + (int64_t)b * max_blocks,
                            block_size, start, len, G, D, scale, scores,
                            out + b * out_stride + (int64_t)h * G * D);
            free(scores);
        }
    }
    return failed ? -2 : 0;
}
#endif

int has_avx512_bf16(void) {
#ifdef HAVE_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_KERNEL(paged_decode_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
