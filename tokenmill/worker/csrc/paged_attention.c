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

/* The same computation, hand-vectorized for AVX-512 with bf16 dot products (head_dim a multiple
 * of 32). K rows: vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32; V rows are
 * widened to fp32 and accumulated with FMAs. */
static void decode_one_bf16(const uint16_t *q, const uint16_t *kbase, const uint16_t *vbase,
                            const int32_t *blocks, int block_size, int start, int len, int G,
                            int D, float scale, float *scores, uint16_t *out) {
    const int C = D / 32, V = D / 16, n = len - start;
    __m512bh qv[MAX_GROUP][MAX_DIM / 32];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++)
            qv[g][c] = (__m512bh)_mm512_loadu_si512((const void *)(q + (int64_t)g * D + 32 * c));
    const int64_t block_bytes = (int64_t)block_size * D * 2;
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
            __m512bh kv[MAX_DIM / 32];
            for (int c = 0; c < C; c++)
                kv[c] = (__m512bh)_mm512_loadu_si512((const void *)(kp + 32 * c));
            for (int g = 0; g < G; g++) {
                __m512 acc = _mm512_setzero_ps();
                for (int c = 0; c < C; c++) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
                scores[(int64_t)g * n + (t - start) + j] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }
    __m512 acc[MAX_GROUP][MAX_DIM / 16];
    float sum[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        float *sg = scores + (int64_t)g * n;
        float m = -INFINITY;
        for (int i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
        const __m512 mv = _mm512_set1_ps(m);
        __m512 tot = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + i), mv));
            _mm512_storeu_ps(sg + i, e);
            tot = _mm512_add_ps(tot, e);
        }
        if (i < n) {   /* the tail, masked */
            const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + i), mv));
            _mm512_mask_storeu_ps(sg + i, k, e);
            tot = _mm512_add_ps(tot, _mm512_maskz_mov_ps(k, e));
        }
        sum[g] = _mm512_reduce_add_ps(tot);
        for (int c = 0; c < V; c++) acc[g][c] = _mm512_setzero_ps();
    }
    for (int t = start, cnt; t < len; t += cnt) {
        const uint16_t *vp = block_run(vbase, blocks, block_size, D, t, len, &cnt);
        for (int j = 0; j < cnt; j++, vp += D) {
            __m512 vv[MAX_DIM / 16];
            for (int c = 0; c < V; c++)
                vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(vp + 16 * c))), 16));
            for (int g = 0; g < G; g++) {
                const __m512 p = _mm512_set1_ps(scores[(int64_t)g * n + (t - start) + j]);
                for (int c = 0; c < V; c++) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float tmp[MAX_DIM];
        const __m512 inv = _mm512_set1_ps(n > 0 ? 1.f / sum[g] : 0.f);
        for (int c = 0; c < V; c++) _mm512_storeu_ps(tmp + 16 * c, _mm512_mul_ps(acc[g][c], inv));
        for (int d = 0; d < D; d++) out[(int64_t)g * D + d] = f32_to_bf16(tmp[d]);
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
            float *scores = malloc(sizeof(float) * (size_t)G * (len - start > 0 ? len - start : 1));
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
