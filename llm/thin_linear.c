/* Thin matmuls for CPU decoding: y[M, N] = x[M, K] . w[N, K]^T (+ b[N]) for a few rows M (a decode step).
 *
 * A decode step reads every weight once for a handful of rows, so its speed is the memory bandwidth the
 * matmul reaches, and past a few rows the FMAs it issues. This kernel streams each weight row once per call,
 * in order, on every OpenMP thread (PyTorch's own runtime: it is loaded first), with register tiles of FMAs
 * (4 x 4 of AVX-512's 16 lanes where the compiler targets it, else 3 x 3 of AVX2's 8) and software
 * prefetching of the rows ahead.
 *
 * Every output element is the same sequence of operations whatever M is and wherever it falls in a tile
 * (one VL-lane accumulator over k in steps of VL, the tail masked, then a fixed-order sum of the lanes), so
 * a row's result never depends on the other rows: batch-invariant from one row up, on a given CPU.
 *
 * Types: f32 (x, w, b, y float32) and bf16 (x, w, b, y bfloat16 as uint16; products and sums in float32,
 * the result rounded to nearest even once).
 */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A tile is MR rows of x by NR rows of w, its MR x NR accumulators and the MR + NR vectors it loads per step
 * held in registers. AVX2 (16 registers): 3 x 3 (3 x 4 needed 17, and the compiler folded the weight loads
 * into each FMA instead: 15 loads per 12 FMAs, bound by the load ports); measured on this project's 2-core
 * Zen 3 VM, SmolLM2-135M, the compiled decode step, medians of 3 interleaved runs: float32 74.9 -> 65.4 ms at
 * 16 sequences, bfloat16 84.0 -> 76.1; batch 1 unchanged (23.2 / 23.3 ms). AVX-512 (32 registers, twice
 * the lanes; this project's 2-core AVX-512 VM issues 16-lane FMAs at twice the 8-lane rate: 370 vs 184
 * GFLOP/s on one core): 4 x 4 of 16 lanes; on that VM one 3072 x 576 float32 weight at 16 rows 293 -> 178
 * us and at 64 rows 1116 -> 681 us against the 3 x 3 AVX2 tiles, and the compiled float32 decode step
 * (medians of 3 interleaved rounds) 66 -> 44 ms at 32 sequences, 121 -> 88 at 64; bfloat16 36 -> 25 at
 * 16, 137 -> 96 at 64. */
/* AVX-512 F, BW and VL, where the compiler targets them (-march=native on such a CPU): 16-lane tiles */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define THIN_AVX512 1
#else
#define THIN_AVX512 0
#endif
#if THIN_AVX512
#define MR 4
#define NR 4
#else
#define MR 3
#define NR 3
#endif
/* bytes ahead of a tile's reads to prefetch, each line once (a tile's weight rows are contiguous): the
 * hardware prefetcher alone left bandwidth unused. Measured on this project's 2-core Zen 3 VM, SmolLM2-135M,
 * a whole batch-1 decode step (services.textgen.fused): 2 KB ahead 36.6 / 24.6 ms (float32 / bfloat16),
 * 4 KB 22.5 / 14.9, 8 KB 19.1 / 11.1, 16 KB 20.0 / 11.4, 32 KB 22.0 / 12.1; each row's own 8 KB ahead (a
 * line prefetched twice) 19.3-20.6 / 13.0 */
#define PREFETCH 8192

/* 3: AVX-512 tiles, 2: AVX2 ones, 0: no kernels (the caller keeps PyTorch's) */
int thin_linear_isa(void) {
#if THIN_AVX512 && defined(__FMA__)
    return 3;
#elif defined(__AVX2__) && defined(__FMA__)
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

static inline __m256i tail_mask(int n) {
    int32_t m[8];
    for (int i = 0; i < 8; i++) m[i] = i < n ? -1 : 0;
    return _mm256_loadu_si256((const __m256i *)m);
}

/* The matmul tiles' vector: 16 lanes where the compiler targets AVX-512 (F, BW, VL: -march=native on such a
 * CPU), else AVX2's 8. A lane count is a summation order: a host computes every row the same way, and an
 * AVX-512 host's sums differ from an AVX2 host's in the last bits. Measured on this project's 2-core AVX-512
 * VM (2026-12-03, SmolLM2-135M, the compiled float32 decode step): see the header of this section. */
#if THIN_AVX512
#define VL 16
typedef __m512 vec;
typedef __mmask16 vmask;
#define VZERO() _mm512_setzero_ps()
#define VLOADX(p) _mm512_loadu_ps(p)
#define VLOADX_TAIL(p, mask) _mm512_maskz_loadu_ps(mask, p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VPIN(v) __asm__("" : "+v"(v)) /* keeps a loaded vector in its register (see MR) */
static inline vmask vtail_mask(int n) { return (vmask)((1u << n) - 1u); }
/* the fixed-order sum of 16 lanes: lanes i + (i + 8), then AVX2's order over the 8 */
static inline float vhsum(vec v) {
    __m256 lo = _mm512_castps512_ps256(v), hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum(_mm256_add_ps(lo, hi));
}
/* 16 bfloat16 -> 16 float32 (exact: the bits shifted into the high half) */
static inline vec widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
static inline vec vload_bf16(const uint16_t *p) { return widen_bf16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec vload_bf16_tail(const uint16_t *p, int n, vmask mask) {
    (void)n;
    return widen_bf16(_mm256_maskz_loadu_epi16(mask, p));
}
#else
#define VL 8
typedef __m256 vec;
typedef __m256i vmask;
#define VZERO() _mm256_setzero_ps()
#define VLOADX(p) _mm256_loadu_ps(p)
#define VLOADX_TAIL(p, mask) _mm256_maskload_ps(p, mask)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VPIN(v) __asm__("" : "+x"(v)) /* without it, the load is folded into every FMA using it */
static inline vmask vtail_mask(int n) { return tail_mask(n); }
static inline float vhsum(vec v) { return hsum(v); }
static inline vec vload_bf16(const uint16_t *p) { return load_bf16(p); }
static inline vec vload_bf16_tail(const uint16_t *p, int n, vmask mask) {
    (void)mask;
    return load_bf16_tail(p, n);
}
#endif

/* One tile: rows [m0, m0 + MRC) of x (float32) against weight rows [n0, n0 + NRC); constant sizes, so the
 * accumulators stay in registers. Edge tiles use the same arithmetic per element (see the top). */
#define DEFINE_TILE(NAME, MRC, NRC, WT, LOADW, LOADW_TAIL)                                               \
    static inline void NAME(const float *xf, const WT *w, int K, int m0, int n0, vec out[MR][NR]) {      \
        vec acc[MRC][NRC];                                                                            \
        for (int i = 0; i < MRC; i++)                                                                 \
            for (int j = 0; j < NRC; j++) acc[i][j] = VZERO();                                        \
        int k = 0;                                                                                    \
        for (; k + VL <= K; k += VL) {                                                                \
            vec wv[NRC];                                                                              \
            /* the tile's rows are one contiguous run: prefetch as far ahead in it as this step reads */ \
            const char *ahead = (const char *)(w + (size_t)n0 * K + (size_t)k * NRC) + PREFETCH;       \
            for (size_t at = 0; at < VL * NRC * sizeof(WT); at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0); \
            for (int j = 0; j < NRC; j++) {                                                           \
                wv[j] = LOADW(w + (size_t)(n0 + j) * K + k);                                          \
                VPIN(wv[j]);                                                                          \
            }                                                                                         \
            vec xv[MRC];                                                                              \
            for (int i = 0; i < MRC; i++) {                                                           \
                xv[i] = VLOADX(xf + (size_t)(m0 + i) * K + k);                                        \
                VPIN(xv[i]);                                                                          \
            }                                                                                         \
            for (int i = 0; i < MRC; i++)                                                             \
                for (int j = 0; j < NRC; j++) acc[i][j] = VFMA(xv[i], wv[j], acc[i][j]);              \
        }                                                                                             \
        if (k < K) {                                                                                  \
            vmask mask = vtail_mask(K - k);                                                           \
            vec wv[NRC];                                                                              \
            for (int j = 0; j < NRC; j++) wv[j] = LOADW_TAIL(w + (size_t)(n0 + j) * K + k, K - k, mask); \
            for (int i = 0; i < MRC; i++) {                                                           \
                vec xv = VLOADX_TAIL(xf + (size_t)(m0 + i) * K + k, mask);                            \
                for (int j = 0; j < NRC; j++) acc[i][j] = VFMA(xv, wv[j], acc[i][j]);                 \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MRC; i++)                                                                 \
            for (int j = 0; j < NRC; j++) out[i][j] = acc[i][j];                                      \
    }

#define LOAD_F32(p) VLOADX(p)
#define LOAD_F32_TAIL(p, n, mask) VLOADX_TAIL(p, mask)
#define LOAD_BF16(p) vload_bf16(p)
#define LOAD_BF16_TAIL(p, n, mask) vload_bf16_tail(p, n, mask)

#define DEFINE_TILES(SUFFIX, WT, LOADW, LOADW_TAIL)                                                     \
    DEFINE_TILE(tile_1xn_##SUFFIX, 1, NR, WT, LOADW, LOADW_TAIL)                                      \
    DEFINE_TILE(tile_2xn_##SUFFIX, 2, NR, WT, LOADW, LOADW_TAIL)                                      \
    DEFINE_TILE(tile_3xn_##SUFFIX, 3, NR, WT, LOADW, LOADW_TAIL)                                      \
    DEFINE_TILE(tile_4xn_##SUFFIX, 4, NR, WT, LOADW, LOADW_TAIL)                                      \
    DEFINE_TILE(tile_1x1_##SUFFIX, 1, 1, WT, LOADW, LOADW_TAIL)                                       \
    /* the tile at (m0, n0) of mr x nr, into acc: full-width tiles at once, the last columns one by one */ \
    static inline void tile_##SUFFIX(const float *xf, const WT *w, int K, int m0, int n0, int mr, int nr, \
                                     vec acc[MR][NR]) {                                               \
        if (nr == NR) {                                                                               \
            if (mr == 4) tile_4xn_##SUFFIX(xf, w, K, m0, n0, acc);                                    \
            else if (mr == 3) tile_3xn_##SUFFIX(xf, w, K, m0, n0, acc);                               \
            else if (mr == 2) tile_2xn_##SUFFIX(xf, w, K, m0, n0, acc);                               \
            else tile_1xn_##SUFFIX(xf, w, K, m0, n0, acc);                                            \
            return;                                                                                   \
        }                                                                                             \
        for (int i = 0; i < mr; i++)                                                                  \
            for (int j = 0; j < nr; j++) {                                                            \
                vec one[MR][NR];                                                                      \
                tile_1x1_##SUFFIX(xf, w, K, m0 + i, n0 + j, one);                                     \
                acc[i][j] = one[0][0];                                                                \
            }                                                                                         \
    }

DEFINE_TILES(f32, float, LOAD_F32, LOAD_F32_TAIL)
DEFINE_TILES(bf16, uint16_t, LOAD_BF16, LOAD_BF16_TAIL)

#define F32_ID(v) (v)
#define F32_ROUND(v) (v)
#define BF16_ROUND(v) bf16_to_f32(f32_to_bf16(v))

/* y[M, N] = x . w^T (+ bias), every (row tile, NR weight rows) tile, weights in order, as a worksharing loop
 * of the enclosing OpenMP region. The result is rounded to WT once; then either stored to y (WT), or kept as
 * float in yf, plus res (which may be yf itself: a residual added in place, rounded once more). */
#define DEFINE_DRIVER(SUFFIX, WT, TO_F32, FROM_F32, ROUND)                                              \
    static void tiles_##SUFFIX(const float *xf, const WT *w, const WT *b, WT *y, float *yf, const float *res, \
                               int M, int N, int K) {                                                 \
        int n_blocks = (N + NR - 1) / NR;                                                             \
        _Pragma("omp for schedule(static)")                                                           \
        for (int nb = 0; nb < n_blocks; nb++) {                                                       \
            int n0 = nb * NR, nr = N - n0 < NR ? N - n0 : NR;                                         \
            for (int m0 = 0; m0 < M; m0 += MR) {                                                      \
                int mr = M - m0 < MR ? M - m0 : MR;                                                   \
                vec acc[MR][NR];                                                                      \
                tile_##SUFFIX(xf, w, K, m0, n0, mr, nr, acc);                                         \
                for (int i = 0; i < mr; i++)                                                          \
                    for (int j = 0; j < nr; j++) {                                                    \
                        size_t at = (size_t)(m0 + i) * N + n0 + j;                                    \
                        float s = vhsum(acc[i][j]);                                                   \
                        if (b) s += TO_F32(b[n0 + j]);                                                \
                        if (yf) yf[at] = res ? ROUND(res[at] + ROUND(s)) : ROUND(s);                  \
                        else y[at] = FROM_F32(s);                                                     \
                    }                                                                                 \
            }                                                                                         \
        }                                                                                             \
    }

DEFINE_DRIVER(f32, float, F32_ID, F32_ID, F32_ROUND)
DEFINE_DRIVER(bf16, uint16_t, bf16_to_f32, f32_to_bf16, BF16_ROUND)

void thin_linear_f32(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
#pragma omp parallel
    tiles_f32(x, w, b, y, NULL, NULL, M, N, K);
}

/* Returns 0, or -1 when the float32 copy of x could not be allocated. */
int thin_linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int M, int N,
                     int K) {
    float *xf = malloc((size_t)M * K * sizeof(float));
    if (!xf) return -1;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
#pragma omp parallel
    tiles_bf16(xf, w, b, y, NULL, NULL, M, N, K);
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

/* q . k over d elements (q in float32; k float32 or bfloat16) for KN keys at once: each its own 8-lane
 * accumulator over x, then the fixed-order lane sum and the tail, so a key's score is the same whichever
 * keys share its call (the calls only overlap their dependency chains) */
#define LOADK_F32(p) _mm256_loadu_ps(p)
#define LOADK_BF16(p) load_bf16(p)
#define DEFINE_DOTS(SUFFIX, T, TO_F32, LOADK)                                                           \
    static inline void dots_##SUFFIX(const float *q, const T *const *k, int kn, int d, float *out) {    \
        __m256 acc[4];                                                                                \
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();                                     \
        int x = 0;                                                                                    \
        if (kn == 4) { /* a constant count: the 4 accumulators stay in registers */                   \
            for (; x + 8 <= d; x += 8) {                                                              \
                __m256 qv = _mm256_loadu_ps(q + x);                                                   \
                for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(qv, LOADK(k[i] + x), acc[i]);    \
            }                                                                                         \
        } else {                                                                                      \
            for (; x + 8 <= d; x += 8) {                                                              \
                __m256 qv = _mm256_loadu_ps(q + x);                                                   \
                for (int i = 0; i < kn; i++) acc[i] = _mm256_fmadd_ps(qv, LOADK(k[i] + x), acc[i]);   \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < kn; i++) {                                                                \
            float s = hsum(acc[i]);                                                                   \
            for (int t = x; t < d; t++) s += q[t] * TO_F32(k[i][t]);                                  \
            out[i] = s;                                                                               \
        }                                                                                             \
    }

DEFINE_DOTS(f32, float, F32_ID, LOADK_F32)
DEFINE_DOTS(bf16, uint16_t, bf16_to_f32, LOADK_BF16)

/* One query head of a decode step over a paged KV cache, read in place through the block table (no gathered
 * copy): query qf [d] (float32) against key/value head j of g at positions lo..hi of the sequence whose table
 * is `table` (cache row of position p: table[p / bs] * bs + p % bs, of a flat [rows, g, d] cache). Scores in
 * float32 (into buf [hi - lo + 1]), softmax with the maximum subtracted, the weighted sum of values in
 * float32, 64 outputs at a time held in registers over every position (each output summed over the
 * positions in order, a product then a sum, as a scalar loop would); of [d] gets the unrounded result. It
 * depends on its own query and context only. */
/* position (blk, off) of a block table -> the next one (a division per position cost more than the sums) */
#define ADVANCE(blk, off, bs) (++(off) == (bs) ? ((off) = 0, ++(blk)) : 0)
/* the first element of key/value head j of g (head dim d) at block-table position (blk, off) */
static inline size_t head_at(const int64_t *table, int64_t blk, int64_t off, int bs, int g, int j, int d) {
    return ((size_t)(table[blk] * bs + off) * g + j) * d;
}
#define DEFINE_HEAD(SUFFIX, T, TO_F32, LOADK)                                                           \
    static void head_##SUFFIX(const float *qf, const T *kc, const T *vc, const int64_t *table, int64_t lo,  \
                              int64_t hi, int g, int j, int d, int bs, float scale, float *buf, float *of) { \
        int n = (int)(hi - lo + 1);                                                                   \
        float mx = -INFINITY, sum = 0.0f;                                                             \
        int64_t blk = lo / bs, off = lo % bs;                                                         \
        for (int t = 0; t < n; t += 4) {                                                              \
            int kn = n - t < 4 ? n - t : 4;                                                           \
            const T *k[4] = {0};                                                                      \
            for (int i = 0; i < kn; i++, ADVANCE(blk, off, bs))                                       \
                k[i] = kc + head_at(table, blk, off, bs, g, j, d);                                    \
            dots_##SUFFIX(qf, k, kn, d, buf + t);                                                     \
            for (int i = 0; i < kn; i++) {                                                            \
                buf[t + i] *= scale;                                                                  \
                if (buf[t + i] > mx) mx = buf[t + i];                                                 \
            }                                                                                         \
        }                                                                                             \
        for (int t = 0; t < n; t++) {                                                                 \
            buf[t] = expf(buf[t] - mx);                                                               \
            sum += buf[t];                                                                            \
        }                                                                                             \
        int x0 = 0;                                                                                   \
        while (x0 + 8 <= d) { /* 8 vectors of outputs at a time */                                   \
            int nv = (d - x0) / 8 < 8 ? (d - x0) / 8 : 8;                                             \
            __m256 acc[8];                                                                            \
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();                                 \
            blk = lo / bs, off = lo % bs;                                                             \
            for (int t = 0; t < n; t++, ADVANCE(blk, off, bs)) {                                      \
                const T *vr = vc + head_at(table, blk, off, bs, g, j, d) + x0;                        \
                __m256 w = _mm256_set1_ps(buf[t]);                                                    \
                if (nv == 8) /* a constant count: the 8 accumulators stay in registers */             \
                    for (int v = 0; v < 8; v++) acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(w, LOADK(vr + 8 * v))); \
                else                                                                                  \
                    for (int v = 0; v < nv; v++) acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(w, LOADK(vr + 8 * v))); \
            }                                                                                         \
            for (int v = 0; v < nv; v++) _mm256_storeu_ps(of + x0 + 8 * v, acc[v]);                   \
            x0 += 8 * nv;                                                                             \
        }                                                                                             \
        for (int x = x0; x < d; x++) { /* outputs past the last 8 */                                  \
            float o = 0.0f;                                                                           \
            blk = lo / bs, off = lo % bs;                                                             \
            for (int t = 0; t < n; t++, ADVANCE(blk, off, bs))                                        \
                o += buf[t] * TO_F32(vc[head_at(table, blk, off, bs, g, j, d) + x]);                  \
            of[x] = o;                                                                                \
        }                                                                                             \
        for (int x = 0; x < d; x++) of[x] /= sum;                                                     \
    }

DEFINE_HEAD(f32, float, F32_ID, LOADK_F32)
DEFINE_HEAD(bf16, uint16_t, bf16_to_f32, LOADK_BF16)

/* The first position sequence b's query sees (a sliding window's start, or 0); -1 when pos[b] lies past its
 * block table of nb blocks (or is negative). */
static inline int64_t context_start(const int64_t *pos, int b, int nb, int bs, int window) {
    int64_t hi = pos[b];
    if (hi < 0 || hi / bs >= nb) return -1;
    return window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
}

/* One decode step's attention: for sequence b, query head i of h (key/value head i / (h / g) of g), the keys
 * at positions context_start..pos[b] through the block tables [B, nb]; out in q's type. Returns -1 for a
 * position past its block table or no memory for the scores. */
#define DEFINE_PAGED(SUFFIX, T, TO_F32, FROM_F32)                                                       \
    int paged_decode_attention_##SUFFIX(const T *q, const T *kc, const T *vc, const int64_t *tables, int nb, \
                                        const int64_t *pos, int B, int h, int g, int d, int bs, int window, \
                                        float scale, T *out) {                                        \
        int failed = 0;                                                                               \
        _Pragma("omp parallel for schedule(dynamic) reduction(| : failed)")                            \
        for (int bi = 0; bi < B * h; bi++) {                                                          \
            int b = bi / h, i = bi % h;                                                               \
            int64_t lo = context_start(pos, b, nb, bs, window);                                       \
            float *buf = lo < 0 ? NULL : malloc(((size_t)(pos[b] - lo + 1) + (size_t)d * 2) * sizeof(float)); \
            if (!buf) {                                                                               \
                failed = 1;                                                                           \
                continue;                                                                             \
            }                                                                                         \
            float *qf = buf + (pos[b] - lo + 1), *of = qf + d;                                        \
            const T *qr = q + ((size_t)b * h + i) * d;                                                \
            for (int x = 0; x < d; x++) qf[x] = TO_F32(qr[x]);                                        \
            head_##SUFFIX(qf, kc, vc, tables + (size_t)b * nb, lo, pos[b], g, i / (h / g), d, bs, scale, buf, of); \
            T *o = out + ((size_t)b * h + i) * d;                                                     \
            for (int x = 0; x < d; x++) o[x] = FROM_F32(of[x]);                                       \
            free(buf);                                                                                \
        }                                                                                             \
        return failed ? -1 : 0;                                                                       \
    }

DEFINE_PAGED(f32, float, F32_ID, F32_ID)
DEFINE_PAGED(bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* A whole decode step of a dense pre-norm decoder (RMSNorm, rotary embeddings, gated SiLU MLP: Llama, Mistral,
 * Qwen2/3) in one call and one OpenMP region: per layer, with one barrier between dependent phases instead of
 * a dozen PyTorch ops and kernel calls,
 *   a = rms(x) . ln1;  qkv = a . Wqkv^T (+b);  per head: q/k RMSNorm (Qwen3), rotary;  k, v into the cache;
 *   o = paged attention;  x += o . Wproj^T (+b);  a = rms(x) . ln2;  [gate | up] = a . Wfc1^T (+b);
 *   x += (silu(gate) * up) . Wfc2^T (+b)
 * then x = rms(x) . final_w, written back over x [B, H] (the embeddings in, the final hidden states out).
 * Activations are kept in float32 and rounded to T wherever the composed path stores a T tensor, so a row's
 * numbers are the composed path's up to the rounding of the rotary and SiLU products; each row depends on its
 * own sequence only. layers holds L x 12 pointers: ln1, qkv_w, qkv_b, q_norm, k_norm, proj_w, proj_b, ln2,
 * fc1_w, fc1_b, fc2_w, fc2_b (0 for an absent bias or norm); kcs, vcs the L caches [rows, g, d]; rows [B]
 * the cache row each sequence writes; cos, sin [B, d] (NULL without rotary embeddings). Returns -1 for a
 * position past its block table or no memory for the activations. */
#define DEFINE_STEP(SUFFIX, T, TO_F32, FROM_F32, ROUND)                                                  \
    static void norm_rows_##SUFFIX(const float *x, const T *w, float *y, int M, int H, float eps) {     \
        _Pragma("omp for schedule(static)")                                                           \
        for (int m = 0; m < M; m++) {                                                                 \
            const float *xr = x + (size_t)m * H;                                                      \
            float r = row_inv_rms(xr, H, eps);                                                        \
            for (int k = 0; k < H; k++) y[(size_t)m * H + k] = ROUND(xr[k] * r * TO_F32(w[k]));       \
        }                                                                                             \
    }                                                                                                 \
    int decode_step_##SUFFIX(T *x, const int64_t *layers, const int64_t *kcs, const int64_t *vcs,      \
                             const T *final_w, const int64_t *tables, int nb, const int64_t *pos,       \
                             const int64_t *rows, const T *cos, const T *sin, int L, int B, int H, int h, \
                             int g, int d, int F, int bs, int window, float eps, float scale) {        \
        int nq = h * d, nkv = g * d, nqkv = nq + 2 * nkv, half = d / 2, threads = omp_get_max_threads(); \
        size_t ctx = 1;                                                                               \
        for (int b = 0; b < B; b++) {                                                                 \
            int64_t lo = context_start(pos, b, nb, bs, window);                                       \
            if (lo < 0) return -1;                                                                    \
            if ((size_t)(pos[b] - lo + 1) > ctx) ctx = (size_t)(pos[b] - lo + 1);                     \
        }                                                                                             \
        size_t wide = (size_t)(H > nq ? H : nq), per_thread = ctx + (size_t)d;                        \
        float *ws = malloc(((size_t)B * (H + wide + nqkv + 3 * (size_t)F) + threads * per_thread) * sizeof(float)); \
        if (!ws) return -1;                                                                           \
        float *xs = ws, *a = xs + (size_t)B * H, *qkv = a + (size_t)B * wide, *hb = qkv + (size_t)B * nqkv; \
        float *gb = hb + (size_t)B * 2 * F, *scratch = gb + (size_t)B * F;                            \
        _Pragma("omp parallel")                                                                       \
        {                                                                                             \
            float *buf = scratch + (size_t)omp_get_thread_num() * per_thread;                         \
            _Pragma("omp for schedule(static)")                                                       \
            for (int i = 0; i < B * H; i++) xs[i] = TO_F32(x[i]);                                     \
            for (int l = 0; l < L; l++) {                                                             \
                const T *const *P = (const T *const *)(layers + (size_t)l * 12);                      \
                T *kc = (T *)kcs[l], *vc = (T *)vcs[l];                                               \
                norm_rows_##SUFFIX(xs, P[0], a, B, H, eps);                                           \
                tiles_##SUFFIX(a, P[1], P[2], NULL, qkv, NULL, B, nqkv, H);                           \
                _Pragma("omp for schedule(static)")                                                   \
                for (int bi = 0; bi < B * (h + g); bi++) { /* q and k heads: norm, rotary; k, v cached */ \
                    int b = bi / (h + g), i = bi % (h + g);                                           \
                    float *v = qkv + (size_t)b * nqkv + (size_t)i * d;                                \
                    const T *norm = i < h ? P[3] : P[4];                                              \
                    if (norm) {                                                                       \
                        float r = row_inv_rms(v, d, eps);                                             \
                        for (int t = 0; t < d; t++) v[t] = ROUND(v[t] * r * TO_F32(norm[t]));         \
                    }                                                                                 \
                    if (cos) {                                                                        \
                        const T *c = cos + (size_t)b * d, *s = sin + (size_t)b * d;                   \
                        for (int t = 0; t < half; t++) {                                              \
                            float x1 = v[t], x2 = v[t + half];                                        \
                            v[t] = ROUND(x1 * TO_F32(c[t]) + -x2 * TO_F32(s[t]));                     \
                            v[t + half] = ROUND(x2 * TO_F32(c[t + half]) + x1 * TO_F32(s[t + half])); \
                        }                                                                             \
                    }                                                                                 \
                    if (i >= h) {                                                                     \
                        size_t at = ((size_t)rows[b] * g + (i - h)) * d;                              \
                        const float *vv = v + (size_t)nkv;                                            \
                        for (int t = 0; t < d; t++) {                                                 \
                            kc[at + t] = FROM_F32(v[t]);                                              \
                            vc[at + t] = FROM_F32(vv[t]);                                             \
                        }                                                                             \
                    }                                                                                 \
                }                                                                                     \
                _Pragma("omp for schedule(dynamic)")                                                  \
                for (int bi = 0; bi < B * h; bi++) {                                                  \
                    int b = bi / h, i = bi % h;                                                       \
                    int64_t lo = context_start(pos, b, nb, bs, window);                               \
                    float *o = a + (size_t)b * nq + (size_t)i * d, *of = buf + ctx;                   \
                    head_##SUFFIX(qkv + (size_t)b * nqkv + (size_t)i * d, kc, vc, tables + (size_t)b * nb, lo, \
                                  pos[b], g, i / (h / g), d, bs, scale, buf, of);                     \
                    for (int t = 0; t < d; t++) o[t] = ROUND(of[t]);                                  \
                }                                                                                     \
                tiles_##SUFFIX(a, P[5], P[6], NULL, xs, xs, B, H, nq);                                \
                norm_rows_##SUFFIX(xs, P[7], a, B, H, eps);                                           \
                tiles_##SUFFIX(a, P[8], P[9], NULL, hb, NULL, B, 2 * F, H);                           \
                _Pragma("omp for schedule(static)")                                                   \
                for (int i = 0; i < B * F; i++) {                                                     \
                    int b = i / F, j = i % F;                                                         \
                    float gate = hb[(size_t)b * 2 * F + j], up = hb[(size_t)b * 2 * F + F + j];       \
                    gb[i] = ROUND(ROUND(gate / (1.0f + expf(-gate))) * up);                           \
                }                                                                                     \
                tiles_##SUFFIX(gb, P[10], P[11], NULL, xs, xs, B, H, F);                              \
            }                                                                                         \
            norm_rows_##SUFFIX(xs, final_w, a, B, H, eps);                                            \
            _Pragma("omp for schedule(static)")                                                       \
            for (int i = 0; i < B * H; i++) x[i] = FROM_F32(a[i]);                                    \
        }                                                                                             \
        free(ws);                                                                                     \
        return 0;                                                                                     \
    }

DEFINE_STEP(f32, float, F32_ID, F32_ID, F32_ROUND)
DEFINE_STEP(bf16, uint16_t, bf16_to_f32, f32_to_bf16, BF16_ROUND)

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

#define DEFINE_STEP_NONE(SUFFIX, T)                                                                     \
    int decode_step_##SUFFIX(T *x, const int64_t *layers, const int64_t *kcs, const int64_t *vcs,      \
                             const T *final_w, const int64_t *tables, int nb, const int64_t *pos,       \
                             const int64_t *rows, const T *cos, const T *sin, int L, int B, int H, int h, \
                             int g, int d, int F, int bs, int window, float eps, float scale) {        \
        (void)x; (void)layers; (void)kcs; (void)vcs; (void)final_w; (void)tables; (void)nb; (void)pos; \
        (void)rows; (void)cos; (void)sin; (void)L; (void)B; (void)H; (void)h; (void)g; (void)d; (void)F; \
        (void)bs; (void)window; (void)eps; (void)scale;                                               \
        return -1;                                                                                    \
    }
DEFINE_STEP_NONE(f32, float)
DEFINE_STEP_NONE(bf16, uint16_t)

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
