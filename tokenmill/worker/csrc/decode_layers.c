/* All decoder layers of a decode-only step in one native call (bf16, CPU, AVX-512 bf16).
 *
 * A decode step of a small model is a few dozen short kernels per layer, and from Python each
 * costs a module call, a ctypes call and a few tensor views: about 150 us a layer, 3.5 ms of a
 * 36 ms batch-1 step for a 24-layer model (BENCHMARKS.md). Here the whole stack runs in C and
 * calls the same kernels the per-op path calls (linear.c, linear_amx.c, elementwise.c,
 * paged_attention.c), in the same order on the same data, so the result is bit-identical to
 * it: the per-op path stays the reference, and this is only its faster schedule.
 *
 * One layer (x: the previous layer's MLP output, r: the residual stream, M decode rows):
 *   r = x + r;  h = rmsnorm(r)                                   (layer 0: r = x)
 *   qkv = h Wqkv^T (+ b);  q, k = rmsnorm per head (Qwen3 only);  q, k = rope(q, k)
 *   cache[slot] = k, v;   o = paged decode attention(q) Wo^T (+ b)
 *   r = o + r;  h = rmsnorm(r);   x = (silu(h Wg^T) * (h Wu^T)) Wd^T
 * and after the last layer out = rmsnorm(x + r) (the model's final norm).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {                 /* one layer's tensors; biases fp32 or NULL */
    const uint16_t *ln1, *ln2;   /* [hidden] */
    const uint16_t *wqkv, *wo, *wgu, *wd;   /* packed as cpu_kernels.pack_linear */
    const float *bqkv, *bo, *bgu, *bd;
    const uint16_t *q_norm, *k_norm;        /* [head_dim], or NULL */
    uint16_t *cache;             /* [2 * Hkv, num_blocks, block_size, D] */
} tm_layer;

typedef struct {
    int64_t num_layers, hidden, inter, num_heads, num_kv_heads, head_dim;
    int64_t num_blocks, block_size, window;   /* window 0: full attention */
    int64_t amx_min_rows;                     /* linears on AMX from this many rows; 0: never */
    float eps, qk_eps, scale;
} tm_dims;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
int linear_bf16_vnni(const uint16_t *x, int64_t x_stride, const uint16_t *wp,
                     const float *bias, uint16_t *y, int64_t y_stride, int M, int64_t N,
                     int64_t K);
int linear_bf16_amx(const uint16_t *x, int64_t x_stride, const uint16_t *wp, const float *bias,
                    uint16_t *y, int64_t y_stride, int M, int64_t N, int64_t K);
int add_rmsnorm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *delta,
                     int64_t delta_stride, const uint16_t *w, float eps, uint16_t *res,
                     int64_t res_stride, uint16_t *y, int64_t y_stride, int64_t T, int64_t D);
int silu_mul_bf16(const uint16_t *gu, int64_t gu_stride, uint16_t *y, int64_t y_stride,
                  int64_t T, int64_t I);
int rope_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *sin,
              uint16_t *y, int64_t T, int64_t NH, int64_t D);
int paged_decode_attention_bf16(
        const uint16_t *q, int64_t q_stride, const uint16_t *cache, int64_t num_blocks,
        int block_size, int num_kv_heads, int num_heads, int head_dim, const int32_t *table,
        int max_blocks, const int32_t *lens, int num_seqs, float scale, int window,
        uint16_t *out, int64_t out_stride);
int paged_decode_attention_bf16_avx512(
        const uint16_t *q, int64_t q_stride, const uint16_t *cache, int64_t num_blocks,
        int block_size, int num_kv_heads, int num_heads, int head_dim, const int32_t *table,
        int max_blocks, const int32_t *lens, int num_seqs, float scale, int window,
        uint16_t *out, int64_t out_stride);
int has_avx512_bf16(void);

/* y [M, N] = x [M, K] W^T (+ b), on the path layers.Linear would take for M rows. */
static int linear(const tm_dims *d, const uint16_t *x, const uint16_t *w, const float *b,
                  uint16_t *y, int M, int64_t N, int64_t K) {
    if (d->amx_min_rows > 0 && M >= d->amx_min_rows)
        return linear_bf16_amx(x, K, w, b, y, N, M, N, K);
    return linear_bf16_vnni(x, K, w, b, y, N, M, N, K);
}

/* K and V of each row to its slot: the cache's K heads come first, then its V heads. */
static void write_kv(const tm_dims *d, uint16_t *cache, const uint16_t *k, int64_t k_stride,
                     const uint16_t *v, int64_t v_stride, const int64_t *slots, int M) {
    const int64_t D = d->head_dim, Hkv = d->num_kv_heads, head = d->num_blocks * d->block_size;
    for (int m = 0; m < M; m++)
        for (int64_t h = 0; h < Hkv; h++) {
            memcpy(cache + (h * head + slots[m]) * D, k + m * k_stride + h * D, 2 * D);
            memcpy(cache + ((Hkv + h) * head + slots[m]) * D, v + m * v_stride + h * D, 2 * D);
        }
}

/* x [M, hidden]: the embeddings of the step's tokens (one per decode); cos, sin [M, head_dim]
 * (layers.RotaryEmbedding's tables); slots [M] int64; table [M, max_blocks] and lens [M] int32
 * as paged_decode_attention reads them; out [M, hidden]: the final-normed hidden states.
 * Returns 0, or the first failing kernel's nonzero code. */
int decode_layers_bf16(const tm_dims *d, const tm_layer *layers, const uint16_t *final_norm,
                       const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                       const int64_t *slots, const int32_t *table, int max_blocks,
                       const int32_t *lens, int M, uint16_t *out) {
    const int64_t Hd = d->hidden, I = d->inter, H = d->num_heads, Hkv = d->num_kv_heads;
    const int64_t D = d->head_dim, NQKV = (H + 2 * Hkv) * D, NQK = (H + Hkv) * D;
    const int64_t per_row = 3 * Hd + NQKV + NQK + H * D + 3 * I;
    uint16_t *buf = malloc(sizeof(uint16_t) * (size_t)(per_row * M));
    if (!buf) return -100;
    uint16_t *res = buf, *h = res + M * Hd, *mlp = h + M * Hd, *qkv = mlp + M * Hd;
    uint16_t *qk = qkv + M * NQKV, *attn = qk + M * NQK, *gu = attn + M * H * D;
    uint16_t *act = gu + M * 2 * I, *o = mlp;   /* o and the MLP's output never overlap */
    const int avx512 = D % 32 == 0 && has_avx512_bf16();
    int rc = 0;
    memcpy(res, x, sizeof(uint16_t) * (size_t)(M * Hd));
    for (int64_t l = 0; l < d->num_layers && rc == 0; l++) {
        const tm_layer *L = layers + l;
        /* r = x + r in place (the kernel reads both operands of a lane before writing it) */
        rc = l == 0 ? add_rmsnorm_bf16(res, Hd, NULL, 0, L->ln1, d->eps, NULL, 0, h, Hd, M, Hd)
                    : add_rmsnorm_bf16(mlp, Hd, res, Hd, L->ln1, d->eps, res, Hd, h, Hd, M, Hd);
        if (!rc) rc = linear(d, h, L->wqkv, L->bqkv, qkv, M, NQKV, Hd);
        if (!rc && L->q_norm)
            for (int m = 0; m < M && !rc; m++) {   /* in place: rows of D, heads D apart */
                uint16_t *row = qkv + m * NQKV;
                rc = add_rmsnorm_bf16(row, D, NULL, 0, L->q_norm, d->qk_eps, NULL, 0, row, D,
                                      H, D)
                     | add_rmsnorm_bf16(row + H * D, D, NULL, 0, L->k_norm, d->qk_eps, NULL, 0,
                                        row + H * D, D, Hkv, D);
            }
        if (!rc) rc = rope_bf16(qkv, NQKV, cos, sin, qk, M, H + Hkv, D);
        if (rc) break;
        write_kv(d, L->cache, qk + H * D, NQK, qkv + NQK, NQKV, slots, M);
        rc = (avx512 ? paged_decode_attention_bf16_avx512 : paged_decode_attention_bf16)(
            qk, NQK, L->cache, d->num_blocks, (int)d->block_size, (int)Hkv, (int)H, (int)D,
            table, max_blocks, lens, M, d->scale, (int)d->window, attn, H * D);
        if (!rc) rc = linear(d, attn, L->wo, L->bo, o, M, Hd, H * D);
        if (!rc) rc = add_rmsnorm_bf16(o, Hd, res, Hd, L->ln2, d->eps, res, Hd, h, Hd, M, Hd);
        if (!rc) rc = linear(d, h, L->wgu, L->bgu, gu, M, 2 * I, Hd);
        if (!rc) rc = silu_mul_bf16(gu, 2 * I, act, I, M, I);
        if (!rc) rc = linear(d, act, L->wd, L->bd, mlp, M, Hd, I);
    }
    if (!rc) rc = add_rmsnorm_bf16(mlp, Hd, res, Hd, final_norm, d->eps, res, Hd, out, Hd, M, Hd);
    free(buf);
    return rc;
}

int has_decode_layers_bf16(void) { return 1; }
#else
int decode_layers_bf16(const tm_dims *d, const tm_layer *layers, const uint16_t *final_norm,
                       const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                       const int64_t *slots, const int32_t *table, int max_blocks,
                       const int32_t *lens, int M, uint16_t *out) {
    (void)d; (void)layers; (void)final_norm; (void)x; (void)cos; (void)sin; (void)slots;
    (void)table; (void)max_blocks; (void)lens; (void)M; (void)out;
    return -1;
}
int has_decode_layers_bf16(void) { return 0; }
#endif
