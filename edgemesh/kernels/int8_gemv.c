/* y[m, n] = scale[n] * sum_k w[n, k] * x[m, k]   (int8 weights, fp32 activations and output)
 *
 * Decode-size products of a weight-only int8 matrix (one scale per output row, see
 * edgemesh/weights/quant.py) for 1..MAX_M activation rows. Each weight row is read once for all
 * rows of x; the int8 values are widened to fp32 and multiplied in fp32, so the result is the
 * exact fp32 dot product of the dequantized row up to summation order.
 *
 * The summation order depends only on k (fixed lanes, fixed accumulator count, fixed final
 * reduction), never on n or on which rows a caller passes: a rank holding rows [a, b) of a
 * matrix computes bitwise what one device computes for those rows.
 *
 * Built at first use with the machine's own instruction set (-march=native) by
 * edgemesh/kernels/__init__.py; the vector path is chosen at compile time.
 *
 * One thread. A pool of threads splitting the rows was tried: 16.6 against 15.0 GB/s on a
 * 2-core EPYC for the kernel alone (memory-bound), and 3x slower decode end to end, its
 * spinning threads fighting torch's own intra-op threads for the two cores. Weight rows are
 * prefetched PREFETCH bytes ahead: without it the kernel streamed 6.5 GB/s from DRAM, with it
 * 15 GB/s (the machine's plain read is 24 GB/s).
 */
#include <stdint.h>
#include <stddef.h>

#define MAX_M 4

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VECTOR 2
#ifndef PREFETCH
#define PREFETCH 8192  /* bytes ahead of the rows being read: DRAM latency is not hidden otherwise */
#endif

static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* R weight rows (stride k) against one activation row x: out[r] = sum_j w[r][j] * x[j].
 * Per row: two 16-lane accumulators over 32-wide steps, one more 16-wide step, a fixed
 * reduction, then the scalar tail. R only changes how many rows share the loads of x. */
#define ROWS_DOT(R)                                                                              \
static inline void rows_dot_##R(const int8_t *w, size_t k, const float *x, float *out) {         \
    __m512 a0[R], a1[R];                                                                         \
    size_t k32 = k & ~(size_t)31, k16 = k & ~(size_t)15;                                         \
    for (int r = 0; r < R; r++) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }    \
    for (size_t j = 0; j < k32; j += 32) {                                                       \
        __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);                    \
        _mm_prefetch((const char *)(w + PREFETCH + j * R), _MM_HINT_T0);                         \
        if (R > 1) _mm_prefetch((const char *)(w + PREFETCH + j * R + 64), _MM_HINT_T0);         \
        for (int r = 0; r < R; r++) {                                                            \
            a0[r] = _mm512_fmadd_ps(widen16(w + r * k + j), x0, a0[r]);                          \
            a1[r] = _mm512_fmadd_ps(widen16(w + r * k + j + 16), x1, a1[r]);                     \
        }                                                                                        \
    }                                                                                            \
    if (k16 > k32) {                                                                             \
        __m512 x0 = _mm512_loadu_ps(x + k32);                                                    \
        for (int r = 0; r < R; r++) a0[r] = _mm512_fmadd_ps(widen16(w + r * k + k32), x0, a0[r]); \
    }                                                                                            \
    for (int r = 0; r < R; r++) {                                                                \
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));                             \
        for (size_t j = k16; j < k; j++) s += (float)w[r * k + j] * x[j];                        \
        out[r] = s;                                                                              \
    }                                                                                            \
}
ROWS_DOT(1)
ROWS_DOT(4)

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR 1
#ifndef PREFETCH
#define PREFETCH 8192
#endif

static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float hsum8(__m256 s) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
}

#define ROWS_DOT(R)                                                                              \
static inline void rows_dot_##R(const int8_t *w, size_t k, const float *x, float *out) {         \
    __m256 a0[R], a1[R];                                                                         \
    size_t k16 = k & ~(size_t)15;                                                                \
    for (int r = 0; r < R; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }    \
    for (size_t j = 0; j < k16; j += 16) {                                                       \
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);                     \
        _mm_prefetch((const char *)(w + PREFETCH + j * R), _MM_HINT_T0);                         \
        for (int r = 0; r < R; r++) {                                                            \
            a0[r] = _mm256_fmadd_ps(widen8(w + r * k + j), x0, a0[r]);                           \
            a1[r] = _mm256_fmadd_ps(widen8(w + r * k + j + 8), x1, a1[r]);                       \
        }                                                                                        \
    }                                                                                            \
    for (int r = 0; r < R; r++) {                                                                \
        float s = hsum8(_mm256_add_ps(a0[r], a1[r]));                                            \
        for (size_t j = k16; j < k; j++) s += (float)w[r * k + j] * x[j];                        \
        out[r] = s;                                                                              \
    }                                                                                            \
}
ROWS_DOT(1)
ROWS_DOT(4)

#else
#define VECTOR 0
#define ROWS_DOT(R)                                                                              \
static inline void rows_dot_##R(const int8_t *w, size_t k, const float *x, float *out) {         \
    for (int r = 0; r < R; r++) {                                                                \
        float s = 0.0f;                                                                          \
        for (size_t j = 0; j < k; j++) s += (float)w[r * k + j] * x[j];                          \
        out[r] = s;                                                                              \
    }                                                                                            \
}
ROWS_DOT(1)
ROWS_DOT(4)
#endif

int edgemesh_int8_gemv_max_m(void) { return MAX_M; }

int edgemesh_int8_gemv_vector(void) { return VECTOR; }  /* 0 plain C, 1 AVX2, 2 AVX-512 */

/* x [m, k] fp32 contiguous, w [n, k] int8 contiguous, scale [n] fp32, y [m, n] fp32.
 * Rows [n0, n1) of the output only (a caller may split n across threads). Returns 0, or -1
 * for an m outside 1..MAX_M. Four weight rows at a time share the loads of x; the rest one by
 * one, with the same arithmetic per row. */
int edgemesh_int8_gemv(const float *x, const int8_t *w, const float *scale, float *y,
                       size_t m, size_t n, size_t k, size_t n0, size_t n1) {
    if (m < 1 || m > MAX_M) return -1;
    if (n1 > n) n1 = n;
    float out[4];
    for (size_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float *yr = y + r * n;
        size_t i = n0;
        for (; i + 4 <= n1; i += 4) {
            rows_dot_4(w + i * k, k, xr, out);
            for (int j = 0; j < 4; j++) yr[i + j] = out[j] * scale[i + j];
        }
        for (; i < n1; i++) {
            rows_dot_1(w + i * k, k, xr, out);
            yr[i] = out[0] * scale[i];
        }
    }
    return 0;
}

