/* expertmix: small-row products for CPU decode steps, y[r, o] = scale[o] * sum_i W[o, i] * x[r, i].
 *
 * A decode step reads every weight once for 1-4 rows of activations, so it is bound by memory
 * bandwidth; MKL's sgemm/sgemv reached ~8 GB/s of the ~17 GB/s two cores read here (AVX2 EPYC).
 * This streams four weight rows at a time (with prefetch) against all input rows held in
 * registers, one contiguous share of the output rows per OpenMP thread; the number of input rows
 * is a compile-time constant per kernel. Weights: float32, or int8 with one float32 scale per
 * output row (4x fewer bytes: the activations stay float32). AVX2 + FMA; built at first use by
 * experts/backends/cpu_kernels.py and linked against the process's libgomp (torch's).
 *
 * The *_lora variants add each row's LoRA term in the same call (S-LoRA/Punica BGMV):
 * y[r] += B[r] (A[r] x[r]) with A[r] (I x rank) and B[r] (rank x O, the scale folded in) at
 * element strides a_stride / b_stride between rows (0: one adapter for every row). Each thread
 * computes the tiny A-products itself and adds the B-product to its own output rows.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

#define LOAD_F32(p) _mm256_loadu_ps((const float *)(p))
#define LOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
/* Each pass over one cache line of the four current weight rows prefetches the same line of the
 * rows PREFETCH_ROWS further on (rows are contiguous: that is the block after next). Prefetching
 * within the current rows (256 bytes ahead) left the first lines of every new block to the
 * hardware prefetcher: int8 rows are only 9 lines long at 576 inputs, and the kernel streamed
 * ~8.5 GB/s against ~11.5 GB/s with this (scratch microbench, the SmolLM2 shapes, two threads). */
#define PREFETCH_ROWS 8
#define LINE_ELEMS(T) ((long)(sizeof(T) == 1 ? 32 : 16)) /* int8: twice a line measured faster */

#define BLOCK(NAME, T, LOAD, R)                                                                   \
    static void NAME##_r##R(const T *W, const float *x, float *y, const float *sc, long o0,       \
                            long o1, long I, long ldy) {                                          \
        long o = o0;                                                                              \
        for (; o + 4 <= o1; o += 4) {                                                             \
            const T *w0 = W + o * I;                                                              \
            __m256 a[4][R];                                                                       \
            for (int j = 0; j < 4; j++)                                                           \
                for (int r = 0; r < R; r++) a[j][r] = _mm256_setzero_ps();                        \
            long i = 0;                                                                           \
            for (; i + LINE_ELEMS(T) <= I; i += LINE_ELEMS(T)) {                                  \
                for (int j = 0; j < 4; j++)                                                       \
                    _mm_prefetch((const char *)(w0 + (PREFETCH_ROWS + j) * I + i), _MM_HINT_T0);  \
                for (long k = i; k < i + LINE_ELEMS(T); k += 8) {                                 \
                    __m256 v[4];                                                                  \
                    for (int j = 0; j < 4; j++) v[j] = LOAD(w0 + j * I + k);                      \
                    for (int r = 0; r < R; r++) {                                                 \
                        __m256 xv = _mm256_loadu_ps(x + r * I + k);                               \
                        for (int j = 0; j < 4; j++) a[j][r] = _mm256_fmadd_ps(v[j], xv, a[j][r]); \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (; i + 8 <= I; i += 8) {                                                          \
                __m256 v[4];                                                                      \
                for (int j = 0; j < 4; j++) v[j] = LOAD(w0 + j * I + i);                          \
                for (int r = 0; r < R; r++) {                                                     \
                    __m256 xv = _mm256_loadu_ps(x + r * I + i);                                   \
                    for (int j = 0; j < 4; j++) a[j][r] = _mm256_fmadd_ps(v[j], xv, a[j][r]);     \
                }                                                                                 \
            }                                                                                     \
            for (int j = 0; j < 4; j++)                                                           \
                for (int r = 0; r < R; r++) {                                                     \
                    float s = hsum(a[j][r]);                                                      \
                    for (long k = i; k < I; k++) s += (float)w0[j * I + k] * x[r * I + k];        \
                    y[r * ldy + o + j] = sc ? s * sc[o + j] : s;                                  \
                }                                                                                 \
        }                                                                                         \
        for (; o < o1; o++) {                                                                     \
            const T *w0 = W + o * I;                                                              \
            for (int r = 0; r < R; r++) {                                                         \
                float s = 0.f;                                                                    \
                for (long k = 0; k < I; k++) s += (float)w0[k] * x[r * I + k];                    \
                y[r * ldy + o] = sc ? s * sc[o] : s;                                              \
            }                                                                                     \
        }                                                                                         \
    }

/* h = A[r]^T x[r] (rank values), 8 lanes of the rank at a time; four input positions in flight
 * so the FMA latency does not serialize short ranks */
static void lora_h(const float *xr, const float *a, long I, int rank, float *h) {
    int nv = rank / 8;
    long i = 0;
    if (nv <= 2) {
        __m256 s[4][2];
        for (int u = 0; u < 4; u++) s[u][0] = s[u][1] = _mm256_setzero_ps();
        for (; i + 4 <= I; i += 4)
            for (int u = 0; u < 4; u++) {
                __m256 xv = _mm256_set1_ps(xr[i + u]);
                const float *ai = a + (i + u) * rank;
                s[u][0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ai), s[u][0]);
                if (nv == 2) s[u][1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ai + 8), s[u][1]);
            }
        for (; i < I; i++) {
            __m256 xv = _mm256_set1_ps(xr[i]);
            s[0][0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + i * rank), s[0][0]);
            if (nv == 2) s[0][1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + i * rank + 8), s[0][1]);
        }
        for (int v = 0; v < nv; v++)
            _mm256_storeu_ps(h + 8 * v, _mm256_add_ps(_mm256_add_ps(s[0][v], s[1][v]), _mm256_add_ps(s[2][v], s[3][v])));
        return;
    }
    __m256 s[8];
    for (int v = 0; v < nv; v++) s[v] = _mm256_setzero_ps();
    for (; i < I; i++) {
        __m256 xv = _mm256_set1_ps(xr[i]);
        for (int v = 0; v < nv; v++) s[v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + i * rank + 8 * v), s[v]);
    }
    for (int v = 0; v < nv; v++) _mm256_storeu_ps(h + 8 * v, s[v]);
}

/* y[o0:o1] += B^T h, 32 outputs at a time (four independent FMA chains over the rank) */
static void lora_out(const float *h, const float *b, float *yr, long o0, long o1, long O, int rank) {
    long o = o0;
    for (; o + 32 <= o1; o += 32) {
        __m256 c0 = _mm256_loadu_ps(yr + o), c1 = _mm256_loadu_ps(yr + o + 8);
        __m256 c2 = _mm256_loadu_ps(yr + o + 16), c3 = _mm256_loadu_ps(yr + o + 24);
        for (int k = 0; k < rank; k++) {
            __m256 hk = _mm256_set1_ps(h[k]);
            const float *bk = b + k * O + o;
            c0 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(bk), c0);
            c1 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(bk + 8), c1);
            c2 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(bk + 16), c2);
            c3 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(bk + 24), c3);
        }
        _mm256_storeu_ps(yr + o, c0);
        _mm256_storeu_ps(yr + o + 8, c1);
        _mm256_storeu_ps(yr + o + 16, c2);
        _mm256_storeu_ps(yr + o + 24, c3);
    }
    for (; o < o1; o++) {
        float s = yr[o];
        for (int k = 0; k < rank; k++) s += h[k] * b[k * O + o];
        yr[o] = s;
    }
}

static void lora_rows(const float *x, float *y, const float *A, const float *B, long a_stride,
                      long b_stride, long o0, long o1, long O, long I, int R, int rank) {
    float h[64];
    for (int r = 0; r < R; r++) {
        const float *a = A + r * a_stride, *b = B + r * b_stride, *xr = x + r * I;
        if (rank % 8 == 0) {
            lora_h(xr, a, I, rank, h);
        } else {
            for (int k = 0; k < rank; k++) h[k] = 0.f;
            for (long i = 0; i < I; i++) {
                float xi = xr[i];
                const float *ai = a + i * rank;
                for (int k = 0; k < rank; k++) h[k] += xi * ai[k];
            }
        }
        lora_out(h, b, y + r * O, o0, o1, O, rank);
    }
}

#define KERNEL(NAME, T, LOAD)                                                                     \
    BLOCK(NAME, T, LOAD, 1)                                                                       \
    BLOCK(NAME, T, LOAD, 2)                                                                       \
    BLOCK(NAME, T, LOAD, 3)                                                                       \
    BLOCK(NAME, T, LOAD, 4)                                                                       \
    ENTRY_POINTS(NAME, T)

#define ENTRY_POINTS(NAME, T)                                                                     \
    int NAME(const T *W, const float *x, float *y, const float *sc, long O, long I, int R) {     \
        if (R < 1 || R > 4) return -1;                                                            \
        _Pragma("omp parallel") {                                                                 \
            int nt = omp_get_num_threads(), t = omp_get_thread_num();                             \
            long per = ((O + nt - 1) / nt + 3) & ~3L;                                             \
            long o0 = t * per, o1 = o0 + per < O ? o0 + per : O;                                  \
            if (o0 < O) switch (R) {                                                              \
                case 1: NAME##_r1(W, x, y, sc, o0, o1, I, O); break;                              \
                case 2: NAME##_r2(W, x, y, sc, o0, o1, I, O); break;                              \
                case 3: NAME##_r3(W, x, y, sc, o0, o1, I, O); break;                              \
                default: NAME##_r4(W, x, y, sc, o0, o1, I, O); break;                             \
            }                                                                                     \
        }                                                                                         \
        return 0;                                                                                 \
    }                                                                                             \
    int NAME##_lora(const T *W, const float *x, float *y, const float *sc, long O, long I, int R, \
                    const float *A, const float *B, long a_stride, long b_stride, int rank) {     \
        if (R < 1 || R > 4 || rank < 1 || rank > 64) return -1;                                   \
        _Pragma("omp parallel") {                                                                 \
            int nt = omp_get_num_threads(), t = omp_get_thread_num();                             \
            long per = ((O + nt - 1) / nt + 3) & ~3L;                                             \
            long o0 = t * per, o1 = o0 + per < O ? o0 + per : O;                                  \
            if (o0 < O) {                                                                         \
                switch (R) {                                                                      \
                    case 1: NAME##_r1(W, x, y, sc, o0, o1, I, O); break;                          \
                    case 2: NAME##_r2(W, x, y, sc, o0, o1, I, O); break;                          \
                    case 3: NAME##_r3(W, x, y, sc, o0, o1, I, O); break;                          \
                    default: NAME##_r4(W, x, y, sc, o0, o1, I, O); break;                         \
                }                                                                                 \
                lora_rows(x, y, A, B, a_stride, b_stride, o0, o1, O, I, R, rank);                 \
            }                                                                                     \
        }                                                                                         \
        return 0;                                                                                 \
    }

KERNEL(expertmix_gemv_f32, float, LOAD_F32)
KERNEL(expertmix_gemv_i8, int8_t, LOAD_I8)

/* 4-bit weights (llama.cpp's Q4_1 layout per group): each output row is I/32 groups of 32 inputs,
 * 16 bytes per group (byte k: element k in the low nibble, element k + 16 in the high one) and a
 * half-precision (scale, min) pair per group, w = scale * q + min. 0.625 bytes a weight. `sc`
 * points at the (O, I/32, 2) halves. The SmolLM2 GGUF the default base comes from is Q4_1, so its
 * projections quantize back to exactly the values it shipped.
 *
 * Converting every nibble to float (as the int8 kernel does its bytes) made this compute-bound at
 * ~8 GB/s; as llama.cpp's Q4_1 x Q8_1 product does, each call instead rounds its input rows to
 * integers per group of 32 (one float step a group) and takes the group's dot product in integers,
 * one float FMA a group and row. int16, not llama.cpp's int8: rounding the inputs to int8 cost up
 * to 3.1 % per-token NLL through decode steps (bench/backend.py --int4), int16's step is 256x
 * finer at about the same speed (madd_epi16 on zero-extended nibbles).
 * The min term uses each row's float per-group sums of x. One output row at a time; the rows
 * PREFETCH_ROWS further on are prefetched a line per four groups. */
static void q16_groups(const float *x, long I, int16_t *q, float *d, float *sum) {
    for (long g = 0; g < I / 32; g++) {
        const float *xg = x + g * 32;
        __m256 v[4], mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xg + 8 * k);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
            sm = _mm256_add_ps(sm, v[k]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4), dd = amax / 32767.f;
        d[g] = dd;
        sum[g] = hsum(sm);
        __m256 inv = _mm256_set1_ps(dd > 0.f ? 1.f / dd : 0.f);
        for (int k = 0; k < 4; k += 2) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(v[k + 1], inv));
            /* packs works per 128-bit lane: a0-3 b0-3 a4-7 b4-7 -> a0-7 b0-7 */
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(q + g * 32 + 8 * k), p);
        }
    }
}

#define Q4_BLOCK(R)                                                                               \
    static void expertmix_gemv_q4_r##R(const uint8_t *W, const float *x, float *y,               \
                                       const float *scv, long o0, long o1, long I, long ldy) {    \
        const uint16_t *sm = (const uint16_t *)scv;                                               \
        long G = I / 32, rb = I / 2, G8 = G & ~7L;                                                \
        float xd[R * G], xs[R * G], f[R * G + 8];                                                 \
        int16_t xq[R * I];                                                                        \
        for (int r = 0; r < R; r++) q16_groups(x + r * I, I, xq + r * I, xd + r * G, xs + r * G); \
        const __m128i nib = _mm_set1_epi8(0x0F);                                                  \
        const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);                           \
        for (long o = o0; o < o1; o++) {                                                          \
            const uint8_t *w = W + o * rb;                                                        \
            const uint16_t *s = sm + o * G * 2;                                                   \
            /* per group: f[r][g] = scale * x's step; the min term sum_g min * sum(x) at once */  \
            float mt[R];                                                                          \
            __m256 mv[R];                                                                         \
            for (int r = 0; r < R; r++) mv[r] = _mm256_setzero_ps();                              \
            long g = 0;                                                                           \
            for (; g < G8; g += 8) {                                                              \
                __m256 sdm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 2 * g)));      \
                __m256 sdm2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 2 * g + 8))); \
                /* (d0 m0 d1 m1 ...) x2 -> d0..d7 and m0..m7 */                                   \
                __m256 lo = _mm256_permutevar8x32_ps(sdm, even), hi = _mm256_permutevar8x32_ps(sdm2, even); \
                __m256 d = _mm256_permute2f128_ps(lo, hi, 0x20), m = _mm256_permute2f128_ps(lo, hi, 0x31); \
                for (int r = 0; r < R; r++) {                                                     \
                    _mm256_storeu_ps(f + r * G + g, _mm256_mul_ps(d, _mm256_loadu_ps(xd + r * G + g))); \
                    mv[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs + r * G + g), mv[r]);           \
                }                                                                                 \
            }                                                                                     \
            for (int r = 0; r < R; r++) mt[r] = hsum(mv[r]);                                      \
            for (; g < G; g++) {                                                                  \
                float d = _cvtsh_ss(s[2 * g]), m = _cvtsh_ss(s[2 * g + 1]);                       \
                for (int r = 0; r < R; r++) f[r * G + g] = d * xd[r * G + g], mt[r] += m * xs[r * G + g]; \
            }                                                                                     \
            __m256 acc[R];                                                                        \
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                             \
            for (g = 0; g < G; g++) {                                                             \
                if ((g & 3) == 0) _mm_prefetch((const char *)(w + PREFETCH_ROWS * rb + g * 16), _MM_HINT_T0); \
                __m128i b = _mm_loadu_si128((const __m128i *)(w + g * 16));                      \
                __m256i q0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, nib));                         \
                __m256i q1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), nib));      \
                for (int r = 0; r < R; r++) {                                                     \
                    const int16_t *xg = xq + r * I + g * 32;                                      \
                    __m256i dot = _mm256_add_epi32(                                               \
                        _mm256_madd_epi16(q0, _mm256_loadu_si256((const __m256i *)xg)),           \
                        _mm256_madd_epi16(q1, _mm256_loadu_si256((const __m256i *)(xg + 16))));   \
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(f + r * G + g), acc[r]); \
                }                                                                                 \
            }                                                                                     \
            for (int r = 0; r < R; r++) y[r * ldy + o] = hsum(acc[r]) + mt[r];                    \
        }                                                                                         \
    }

Q4_BLOCK(1)
Q4_BLOCK(2)
Q4_BLOCK(3)
Q4_BLOCK(4)
ENTRY_POINTS(expertmix_gemv_q4, uint8_t)

/* ---------------------------------------------------------------------------------------------
 * A whole decode step of a Llama-family decoder (1-4 new tokens, one per row) in one OpenMP
 * region: the per-layer small ops (RMSNorm, rotary embedding, KV-cache append, attention over
 * the cache, SiLU gate, residuals) cost ~30 ms of a ~75 ms SmolLM2 step as ~600 torch calls and
 * their Python; here they are a few microseconds each and the threads meet at barriers instead.
 * The products are the kernels above, one contiguous share of output rows per thread, each with
 * its optional bias and per-row LoRA term (same layout as *_lora). Same math as transformers'
 * Llama forward in float32 (tests compare tokens and logits).
 * ------------------------------------------------------------------------------------------- */
#include <math.h>
#include <stdlib.h>

typedef struct {
    const void *w;       /* (O, I) float32, int8 with scale, or 4-bit (O, I/2) bytes */
    const float *scale;  /* per output row (int8), (O, I/32, 2) halves (4-bit), or NULL */
    const float *bias;   /* (O) or NULL */
    const float *a;      /* LoRA A^T (I, rank) per row at a_stride, or NULL */
    const float *b;      /* LoRA s*B^T (rank, O) per row at b_stride */
    long a_stride, b_stride, O, I;
    int rank, wtype;      /* 0 float32, 1 int8, 2 4-bit */
} em_proj;

typedef struct {
    const float *ln1, *ln2; /* RMSNorm weights (H) */
    float eps1, eps2;
    em_proj p[7];           /* q k v o gate up down */
    float *kc, *vc;         /* caches (B, KVH, cap, HD); the new token goes to position T */
} em_layer;

typedef struct {
    int B, H, NH, KVH, HD, FF, n_layers, cos_rows;
    long cap, T;
    float scaling;
    const float *cos, *sin; /* (cos_rows, HD) */
    const uint8_t *mask;    /* (B, T + 1), 0 = padding; NULL = attend to all */
    float *x;               /* (B, H) hidden states in, pre-norm output of the last layer out */
    em_layer *layers;
} em_step;

static void proj_share(const em_proj *p, const float *x, float *y, int R, int t, int nt) {
    long O = p->O, I = p->I;
    long per = ((O + nt - 1) / nt + 3) & ~3L;
    long o0 = t * per, o1 = o0 + per < O ? o0 + per : O;
    if (o0 >= O) return;
    if (p->wtype == 2) {
        const uint8_t *w = (const uint8_t *)p->w;
        switch (R) {
            case 1: expertmix_gemv_q4_r1(w, x, y, p->scale, o0, o1, I, O); break;
            case 2: expertmix_gemv_q4_r2(w, x, y, p->scale, o0, o1, I, O); break;
            case 3: expertmix_gemv_q4_r3(w, x, y, p->scale, o0, o1, I, O); break;
            default: expertmix_gemv_q4_r4(w, x, y, p->scale, o0, o1, I, O); break;
        }
    } else if (p->wtype == 1) {
        const int8_t *w = (const int8_t *)p->w;
        switch (R) {
            case 1: expertmix_gemv_i8_r1(w, x, y, p->scale, o0, o1, I, O); break;
            case 2: expertmix_gemv_i8_r2(w, x, y, p->scale, o0, o1, I, O); break;
            case 3: expertmix_gemv_i8_r3(w, x, y, p->scale, o0, o1, I, O); break;
            default: expertmix_gemv_i8_r4(w, x, y, p->scale, o0, o1, I, O); break;
        }
    } else {
        const float *w = (const float *)p->w;
        switch (R) {
            case 1: expertmix_gemv_f32_r1(w, x, y, NULL, o0, o1, I, O); break;
            case 2: expertmix_gemv_f32_r2(w, x, y, NULL, o0, o1, I, O); break;
            case 3: expertmix_gemv_f32_r3(w, x, y, NULL, o0, o1, I, O); break;
            default: expertmix_gemv_f32_r4(w, x, y, NULL, o0, o1, I, O); break;
        }
    }
    if (p->bias)
        for (int r = 0; r < R; r++)
            for (long o = o0; o < o1; o++) y[r * O + o] += p->bias[o];
    if (p->a) lora_rows(x, y, p->a, p->b, p->a_stride, p->b_stride, o0, o1, O, I, R, p->rank);
}

static void rms_row(const float *x, const float *w, float eps, float *out, int H) {
    double ss = 0.0;
    for (int i = 0; i < H; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / H) + eps);
    for (int i = 0; i < H; i++) out[i] = w[i] * (x[i] * inv);
}

/* v * cos + rotate_half(v) * sin, rotate_half(v) = cat(-v[half:], v[:half]) */
static void rope(float *v, const float *c, const float *s, int HD) {
    int half = HD / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void attend(const em_step *S, const em_layer *L, const float *q, float *out, int r, int j, float *sc) {
    long n = S->T + 1, HD = S->HD;
    const float *K = L->kc + ((long)(r * S->KVH + j) * S->cap) * HD;
    const float *V = L->vc + ((long)(r * S->KVH + j) * S->cap) * HD;
    const uint8_t *m = S->mask ? S->mask + r * n : NULL;
    float mx = -INFINITY;
    for (long p = 0; p < n; p++) {
        if (m && !m[p]) { sc[p] = -INFINITY; continue; }
        sc[p] = dot(q, K + p * HD, (int)HD) * S->scaling;
        if (sc[p] > mx) mx = sc[p];
    }
    for (long i = 0; i < HD; i++) out[i] = 0.f;
    if (mx == -INFINITY) return;
    float sum = 0.f;
    for (long p = 0; p < n; p++) {
        sc[p] = sc[p] == -INFINITY ? 0.f : expf(sc[p] - mx);
        sum += sc[p];
    }
    float inv = 1.f / sum;
    for (long p = 0; p < n; p++) {
        if (sc[p] == 0.f) continue;
        float wgt = sc[p] * inv;
        const float *v = V + p * HD;
        long i = 0;
        __m256 wv = _mm256_set1_ps(wgt);
        for (; i + 8 <= HD; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
        for (; i < HD; i++) out[i] += wgt * v[i];
    }
}

int expertmix_decode_step(em_step *S) {
    const int B = S->B, H = S->H, NH = S->NH, KVH = S->KVH, HD = S->HD, FF = S->FF;
    if (B < 1 || B > 4 || KVH < 1 || NH % KVH || HD % 2 || S->T < 0 || S->T >= S->cap) return -1;
    for (int l = 0; l < S->n_layers; l++)
        for (int i = 0; i < 7; i++)
            if (S->layers[l].p[i].rank > 64 || (S->layers[l].p[i].a && S->layers[l].p[i].rank < 1)) return -2;
    const int rep = NH / KVH;
    const long QD = (long)NH * HD, KD = (long)KVH * HD;
    float *buf = malloc(sizeof(float) * (size_t)(B * (2L * H + 2 * QD + 2 * KD + 2L * FF)));
    if (!buf) return -3;
    float *h = buf, *tmp = h + B * H, *q = tmp + B * H, *att = q + B * QD, *k = att + B * QD, *v = k + B * KD,
          *g = v + B * KD, *u = g + (long)B * FF;
    float *x = S->x;
    int failed = 0;
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        float *sc = malloc(sizeof(float) * (size_t)(S->T + 1));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            for (int l = 0; l < S->n_layers; l++) {
                const em_layer *L = S->layers + l;
                for (int r = t; r < B; r += nt) {
                    if (l > 0)
                        for (int i = 0; i < H; i++) x[r * H + i] += tmp[r * H + i];
                    rms_row(x + r * H, L->ln1, L->eps1, h + r * H, H);
                }
#pragma omp barrier
                proj_share(&L->p[0], h, q, B, t, nt);
                proj_share(&L->p[1], h, k, B, t, nt);
                proj_share(&L->p[2], h, v, B, t, nt);
#pragma omp barrier
                for (int task = t; task < B * KVH; task += nt) { /* rotate k, append k and v */
                    int r = task / KVH, j = task % KVH;
                    const float *c = S->cos + (S->cos_rows > 1 ? r : 0) * HD;
                    const float *s = S->sin + (S->cos_rows > 1 ? r : 0) * HD;
                    float *kr = k + r * KD + j * HD;
                    rope(kr, c, s, HD);
                    long at = ((long)(r * KVH + j) * S->cap + S->T) * HD;
                    for (int i = 0; i < HD; i++) {
                        L->kc[at + i] = kr[i];
                        L->vc[at + i] = v[r * KD + j * HD + i];
                    }
                }
#pragma omp barrier
                for (int task = t; task < B * NH; task += nt) { /* one query head of one row */
                    int r = task / NH, hd = task % NH;
                    const float *c = S->cos + (S->cos_rows > 1 ? r : 0) * HD;
                    const float *s = S->sin + (S->cos_rows > 1 ? r : 0) * HD;
                    float *qr = q + r * QD + hd * HD;
                    rope(qr, c, s, HD);
                    attend(S, L, qr, att + r * QD + hd * HD, r, hd / rep, sc);
                }
#pragma omp barrier
                proj_share(&L->p[3], att, tmp, B, t, nt);
#pragma omp barrier
                for (int r = t; r < B; r += nt) {
                    for (int i = 0; i < H; i++) x[r * H + i] += tmp[r * H + i];
                    rms_row(x + r * H, L->ln2, L->eps2, h + r * H, H);
                }
#pragma omp barrier
                proj_share(&L->p[4], h, g, B, t, nt);
                proj_share(&L->p[5], h, u, B, t, nt);
                { /* silu(gate) * up on this thread's share of rows (the same split as the products) */
                    long per = ((FF + nt - 1) / nt + 3) & ~3L;
                    long o0 = t * per, o1 = o0 + per < FF ? o0 + per : FF;
                    for (int r = 0; r < B; r++)
                        for (long o = o0; o < o1; o++) {
                            float a = g[r * FF + o];
                            g[r * FF + o] = a / (1.f + expf(-a)) * u[r * FF + o];
                        }
                }
#pragma omp barrier
                proj_share(&L->p[6], g, tmp, B, t, nt);
#pragma omp barrier
            }
            for (int r = t; r < B; r += nt)
                for (int i = 0; i < H; i++) x[r * H + i] += tmp[r * H + i];
        }
        free(sc);
    }
    free(buf);
    return failed ? -3 : 0;
}

/* 4-bit weights back to float32 (prefill: MKL's GEMM on a float32 copy of one layer at a time);
 * torch's unpack took ~5 ms for a 1536x576 layer, this ~0.1 ms. out is (O, I). */
int expertmix_dequant_q4(const uint8_t *W, const float *scv, float *out, long O, long I) {
    if (I % 32) return -1;
    const uint16_t *sm = (const uint16_t *)scv;
    long G = I / 32;
#pragma omp parallel for schedule(static)
    for (long o = 0; o < O; o++) {
        __m256 q[4];
        for (long g = 0; g < G; g++) {
            const uint8_t *p = W + o * (I / 2) + g * 16;
            __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
            __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
            q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            __m256 d = _mm256_set1_ps(_cvtsh_ss(sm[(o * G + g) * 2])), mn = _mm256_set1_ps(_cvtsh_ss(sm[(o * G + g) * 2 + 1]));
            float *dst = out + o * I + g * 32;
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(dst + 8 * k, _mm256_fmadd_ps(q[k], d, mn));
        }
    }
    return 0;
}
