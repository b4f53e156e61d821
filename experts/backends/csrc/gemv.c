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
#define PREFETCH_BYTES 256

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
            for (; i + 8 <= I; i += 8) {                                                          \
                __m256 v[4];                                                                      \
                for (int j = 0; j < 4; j++) {                                                     \
                    _mm_prefetch((const char *)(w0 + j * I + i) + PREFETCH_BYTES, _MM_HINT_T0);   \
                    v[j] = LOAD(w0 + j * I + i);                                                  \
                }                                                                                 \
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

static void lora_rows(const float *x, float *y, const float *A, const float *B, long a_stride,
                      long b_stride, long o0, long o1, long O, long I, int R, int rank) {
    float h[64];
    for (int r = 0; r < R; r++) {
        const float *a = A + r * a_stride, *b = B + r * b_stride, *xr = x + r * I;
        for (int k = 0; k < rank; k++) h[k] = 0.f;
        for (long i = 0; i < I; i++) {
            float xi = xr[i];
            const float *ai = a + i * rank;
            for (int k = 0; k < rank; k++) h[k] += xi * ai[k];
        }
        float *yr = y + r * O;
        for (int k = 0; k < rank; k++) {
            float hk = h[k];
            const float *bk = b + k * O;
            for (long o = o0; o < o1; o++) yr[o] += hk * bk[o];
        }
    }
}

#define KERNEL(NAME, T, LOAD)                                                                     \
    BLOCK(NAME, T, LOAD, 1)                                                                       \
    BLOCK(NAME, T, LOAD, 2)                                                                       \
    BLOCK(NAME, T, LOAD, 3)                                                                       \
    BLOCK(NAME, T, LOAD, 4)                                                                       \
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
