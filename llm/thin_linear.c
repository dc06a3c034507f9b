/* Thin matmuls for CPU decoding: y[M, N] = x[M, K] . w[N, K]^T (+ b[N]) for a few rows M (a decode step).
 *
 * A decode step reads every weight once for a handful of rows, so its speed is the memory bandwidth the
 * matmul reaches. This kernel streams each weight row once per call, in order, on every OpenMP thread
 * (PyTorch's own runtime: it is loaded first), with 3 x 4 register tiles of AVX2 FMAs and software
 * prefetching of the rows ahead.
 *
 * Every output element is the same sequence of operations whatever M is and wherever it falls in a tile
 * (one 8-lane accumulator over k in steps of 8, the tail masked, then a fixed-order sum of the lanes), so a
 * row's result never depends on the other rows: batch-invariant from one row up.
 *
 * Types: f32 (x, w, b, y float32) and bf16 (x, w, b, y bfloat16 as uint16; products and sums in float32,
 * the result rounded to nearest even once).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 3
#define NR 4
/* bytes ahead of each weight row's reads to prefetch: the hardware prefetcher alone left bandwidth unused
 * (measured on this project's 2-core Zen 3 VM, a batch-1 step's matmuls over SmolLM2-135M: bfloat16 from 22
 * to 15 ms with 8 KB ahead; float32 27-33 ms either way, within the host's noise) */
#define PREFETCH 8192

int thin_linear_isa(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 2;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);                 /* lanes i + (i + 4) */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));        /* + (i + 2) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));         /* + (i + 1) */
    return _mm_cvtss_f32(s);
}

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_bf16_tail(const uint16_t *p, int n) {
    uint16_t buf[8] = {0};
    memcpy(buf, p, (size_t)n * sizeof(uint16_t));
    return load_bf16(buf);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static __m256i tail_mask(int n) {
    int32_t m[8];
    for (int i = 0; i < 8; i++) m[i] = i < n ? -1 : 0;
    return _mm256_loadu_si256((const __m256i *)m);
}

/* One tile: rows [m0, m0 + MRC) of x (float32) against weight rows [n0, n0 + NRC); constant sizes, so the
 * accumulators stay in registers. Edge tiles use the same arithmetic per element (see the top). */
#define DEFINE_TILE(NAME, MRC, NRC, WT, LOADW, LOADW_TAIL)                                               \
    static inline void NAME(const float *xf, const WT *w, int K, int m0, int n0, __m256 out[MR][NR]) {   \
        __m256 acc[MRC][NRC];                                                                         \
        for (int i = 0; i < MRC; i++)                                                                 \
            for (int j = 0; j < NRC; j++) acc[i][j] = _mm256_setzero_ps();                            \
        int k = 0;                                                                                    \
        for (; k + 8 <= K; k += 8) {                                                                  \
            __m256 wv[NRC];                                                                           \
            for (int j = 0; j < NRC; j++) {                                                           \
                _mm_prefetch((const char *)(w + (size_t)(n0 + j) * K + k) + PREFETCH, _MM_HINT_T0);    \
                wv[j] = LOADW(w + (size_t)(n0 + j) * K + k);                                          \
            }                                                                                         \
            for (int i = 0; i < MRC; i++) {                                                           \
                __m256 xv = _mm256_loadu_ps(xf + (size_t)(m0 + i) * K + k);                           \
                for (int j = 0; j < NRC; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);      \
            }                                                                                         \
        }                                                                                             \
        if (k < K) {                                                                                  \
            __m256i mask = tail_mask(K - k);                                                          \
            __m256 wv[NRC];                                                                           \
            for (int j = 0; j < NRC; j++) wv[j] = LOADW_TAIL(w + (size_t)(n0 + j) * K + k, K - k, mask); \
            for (int i = 0; i < MRC; i++) {                                                           \
                __m256 xv = _mm256_maskload_ps(xf + (size_t)(m0 + i) * K + k, mask);                  \
                for (int j = 0; j < NRC; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);      \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MRC; i++)                                                                 \
            for (int j = 0; j < NRC; j++) out[i][j] = acc[i][j];                                      \
    }

#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_F32_TAIL(p, n, mask) _mm256_maskload_ps(p, mask)
#define LOAD_BF16(p) load_bf16(p)
#define LOAD_BF16_TAIL(p, n, mask) load_bf16_tail(p, n)

#define DEFINE_TILES(SUFFIX, WT, LOADW, LOADW_TAIL)                                                     \
    DEFINE_TILE(tile_1x4_##SUFFIX, 1, 4, WT, LOADW, LOADW_TAIL)                                       \
    DEFINE_TILE(tile_2x4_##SUFFIX, 2, 4, WT, LOADW, LOADW_TAIL)                                       \
    DEFINE_TILE(tile_3x4_##SUFFIX, 3, 4, WT, LOADW, LOADW_TAIL)                                       \
    DEFINE_TILE(tile_1x1_##SUFFIX, 1, 1, WT, LOADW, LOADW_TAIL)                                       \
    /* the tile at (m0, n0) of mr x nr, into acc: full-width tiles at once, the last columns one by one */ \
    static inline void tile_##SUFFIX(const float *xf, const WT *w, int K, int m0, int n0, int mr, int nr, \
                                     __m256 acc[MR][NR]) {                                            \
        if (nr == NR) {                                                                               \
            if (mr == 3) tile_3x4_##SUFFIX(xf, w, K, m0, n0, acc);                                    \
            else if (mr == 2) tile_2x4_##SUFFIX(xf, w, K, m0, n0, acc);                               \
            else tile_1x4_##SUFFIX(xf, w, K, m0, n0, acc);                                            \
            return;                                                                                   \
        }                                                                                             \
        for (int i = 0; i < mr; i++)                                                                  \
            for (int j = 0; j < nr; j++) {                                                            \
                __m256 one[MR][NR];                                                                   \
                tile_1x1_##SUFFIX(xf, w, K, m0 + i, n0 + j, one);                                     \
                acc[i][j] = one[0][0];                                                                \
            }                                                                                         \
    }

DEFINE_TILES(f32, float, LOAD_F32, LOAD_F32_TAIL)
DEFINE_TILES(bf16, uint16_t, LOAD_BF16, LOAD_BF16_TAIL)

#define F32_ID(v) (v)

/* y[M, N] (+ bias), every (row tile, 4 weight rows) tile on the OpenMP threads, weights in order */
#define DEFINE_DRIVER(SUFFIX, WT, TO_F32, FROM_F32)                                                     \
    static void tiles_##SUFFIX(const float *xf, const WT *w, const WT *b, WT *y, int M, int N, int K,   \
                               int n_blocks) {                                                        \
        _Pragma("omp parallel for schedule(static)")                                                  \
        for (int nb = 0; nb < n_blocks; nb++) {                                                       \
            int n0 = nb * NR, nr = N - n0 < NR ? N - n0 : NR;                                         \
            for (int m0 = 0; m0 < M; m0 += MR) {                                                      \
                int mr = M - m0 < MR ? M - m0 : MR;                                                   \
                __m256 acc[MR][NR];                                                                   \
                tile_##SUFFIX(xf, w, K, m0, n0, mr, nr, acc);                                         \
                for (int i = 0; i < mr; i++)                                                          \
                    for (int j = 0; j < nr; j++) {                                                    \
                        float s = hsum(acc[i][j]);                                                    \
                        if (b) s += TO_F32(b[n0 + j]);                                                \
                        y[(size_t)(m0 + i) * N + n0 + j] = FROM_F32(s);                               \
                    }                                                                                 \
            }                                                                                         \
        }                                                                                             \
    }

DEFINE_DRIVER(f32, float, F32_ID, F32_ID)
DEFINE_DRIVER(bf16, uint16_t, bf16_to_f32, f32_to_bf16)

void thin_linear_f32(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
    tiles_f32(x, w, b, y, M, N, K, (N + NR - 1) / NR);
}

/* Returns 0, or -1 when the float32 copy of x could not be allocated. */
int thin_linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int M, int N,
                     int K) {
    float *xf = malloc((size_t)M * K * sizeof(float));
    if (!xf) return -1;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    tiles_bf16(xf, w, b, y, M, N, K, (N + NR - 1) / NR);
    free(xf);
    return 0;
}

/* RMSNorm of each row of x [M, H]: y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and rounded
 * once (PyTorch's order for bfloat16 rows). One row's result depends on that row only. */
static inline float row_inv_rms(const float *x, int H, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= H; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; k < H; k++) ss += x[k] * x[k];
    return 1.0f / sqrtf(ss / (float)H + eps);
}

void thin_rms_norm_f32(const float *x, const float *w, float *y, int M, int H, float eps) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * H;
        float r = row_inv_rms(xr, H, eps);
        for (int k = 0; k < H; k++) y[(size_t)m * H + k] = xr[k] * r * w[k];
    }
}

int thin_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int H, float eps) {
    int failed = 0;
#pragma omp parallel for schedule(static) if (M >= 64) reduction(| : failed)
    for (int m = 0; m < M; m++) {
        float *xf = malloc((size_t)H * sizeof(float));
        if (!xf) {
            failed = 1;
            continue;
        }
        for (int k = 0; k < H; k++) xf[k] = bf16_to_f32(x[(size_t)m * H + k]);
        float r = row_inv_rms(xf, H, eps);
        for (int k = 0; k < H; k++) y[(size_t)m * H + k] = f32_to_bf16(xf[k] * r * bf16_to_f32(w[k]));
        free(xf);
    }
    return failed ? -1 : 0;
}

/* q . k over d elements (q in float32; k float32 or bfloat16), 8 lanes then the fixed-order lane sum */
static inline float dot_f32(const float *q, const float *k, int d) {
    __m256 acc = _mm256_setzero_ps();
    int x = 0;
    for (; x + 8 <= d; x += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + x), _mm256_loadu_ps(k + x), acc);
    float s = hsum(acc);
    for (; x < d; x++) s += q[x] * k[x];
    return s;
}

static inline float dot_bf16(const float *q, const uint16_t *k, int d) {
    __m256 acc = _mm256_setzero_ps();
    int x = 0;
    for (; x + 8 <= d; x += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + x), load_bf16(k + x), acc);
    float s = hsum(acc);
    for (; x < d; x++) s += q[x] * bf16_to_f32(k[x]);
    return s;
}

/* One decode step's attention over a paged KV cache, read in place through the block tables (no gathered
 * copy): for sequence b, query head i (of h; key/value head i / (h / g) of g), keys at positions
 * lo..pos[b] where lo = pos[b] - window + 1 (or 0 without a window); cache rows are
 * tables[b][p / bs] * bs + p % bs of a flat [rows, g, d] cache. Scores in float32, softmax with the maximum
 * subtracted, the weighted sum of values in float32, rounded once to the output type. One (b, i)'s result
 * depends on its own query and context only. */
#define DEFINE_PAGED(SUFFIX, T, TO_F32, FROM_F32, DOT)                                                       \
    int paged_decode_attention_##SUFFIX(const T *q, const T *kc, const T *vc, const int64_t *tables, int nb, \
                                        const int64_t *pos, int B, int h, int g, int d, int bs, int window, \
                                        float scale, T *out) {                                        \
        int failed = 0, per = h / g;  /* failed: out of memory, or a position its table does not cover */ \
        _Pragma("omp parallel for schedule(dynamic) reduction(| : failed)")                            \
        for (int bi = 0; bi < B * h; bi++) {                                                          \
            int b = bi / h, i = bi % h, j = i / per;                                                  \
            int64_t hi = pos[b], lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;        \
            if (hi < 0 || hi / bs >= nb) { /* a position past its block table */                      \
                failed = 1;                                                                           \
                continue;                                                                             \
            }                                                                                         \
            int n = (int)(hi - lo + 1);                                                               \
            float *buf = malloc(((size_t)n + (size_t)d * 2) * sizeof(float));                         \
            if (!buf) {                                                                               \
                failed = 1;                                                                           \
                continue;                                                                             \
            }                                                                                         \
            float *qf = buf + n, *acc = qf + d;                                                       \
            const T *qr = q + ((size_t)b * h + i) * d;                                                \
            for (int x = 0; x < d; x++) qf[x] = TO_F32(qr[x]);                                        \
            float mx = -INFINITY;                                                                     \
            for (int t = 0; t < n; t++) {                                                             \
                int64_t p = lo + t, row = tables[(size_t)b * nb + p / bs] * bs + p % bs;               \
                const T *kr = kc + ((size_t)row * g + j) * d;                                         \
                buf[t] = DOT(qf, kr, d) * scale;                                                      \
                if (buf[t] > mx) mx = buf[t];                                                         \
            }                                                                                         \
            float sum = 0.0f;                                                                         \
            for (int x = 0; x < d; x++) acc[x] = 0.0f;                                                \
            for (int t = 0; t < n; t++) {                                                             \
                int64_t p = lo + t, row = tables[(size_t)b * nb + p / bs] * bs + p % bs;               \
                const T *vr = vc + ((size_t)row * g + j) * d;                                         \
                float wgt = expf(buf[t] - mx);                                                        \
                sum += wgt;                                                                           \
                for (int x = 0; x < d; x++) acc[x] += wgt * TO_F32(vr[x]);                            \
            }                                                                                         \
            T *o = out + ((size_t)b * h + i) * d;                                                     \
            for (int x = 0; x < d; x++) o[x] = FROM_F32(acc[x] / sum);                                \
            free(buf);                                                                                \
        }                                                                                             \
        return failed ? -1 : 0;                                                                       \
    }

DEFINE_PAGED(f32, float, F32_ID, F32_ID, dot_f32)
DEFINE_PAGED(bf16, uint16_t, bf16_to_f32, f32_to_bf16, dot_bf16)

#else /* no AVX2: thin_linear_isa() says 0 and the caller keeps PyTorch's kernels */

void thin_rms_norm_f32(const float *x, const float *w, float *y, int M, int H, float eps) {
    (void)x; (void)w; (void)y; (void)M; (void)H; (void)eps;
}

#define DEFINE_PAGED_NONE(SUFFIX, T)                                                                    \
    int paged_decode_attention_##SUFFIX(const T *q, const T *kc, const T *vc, const int64_t *tables, int nb, \
                                        const int64_t *pos, int B, int h, int g, int d, int bs, int window, \
                                        float scale, T *out) {                                        \
        (void)q; (void)kc; (void)vc; (void)tables; (void)nb; (void)pos; (void)B; (void)h; (void)g;   \
        (void)d; (void)bs; (void)window; (void)scale; (void)out;                                      \
        return -1;                                                                                    \
    }
DEFINE_PAGED_NONE(f32, float)
DEFINE_PAGED_NONE(bf16, uint16_t)

int thin_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int H, float eps) {
    (void)x; (void)w; (void)y; (void)M; (void)H; (void)eps;
    return -1;
}

void thin_linear_f32(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
    (void)x; (void)w; (void)b; (void)y; (void)M; (void)N; (void)K;
}

int thin_linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int M, int N,
                     int K) {
    (void)x; (void)w; (void)b; (void)y; (void)M; (void)N; (void)K;
    return -1;
}

#endif
