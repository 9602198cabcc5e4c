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


/* ---- whole decode blocks (one token, batch 1) -------------------------------------------
 * A decode step of a small model is dominated by per-op overhead when each of ~50 small ops
 * per layer is a separate torch call from Python. These run a rank's attention and MLP block
 * for one token in one call each, fp32 activations, int8 weights through the kernel above. */

#include <math.h>
#include <string.h>

static void rms_norm1(const float *x, const float *w, float eps, size_t n, float *out) {
    float ss = 0.0f;
    for (size_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (size_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* rotate-half RoPE of one head in place: cos/sin hold d values */
static void rope1(float *v, const float *cs, const float *sn, size_t d) {
    size_t h = d / 2;
    for (size_t i = 0; i < h; i++) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

/* out [hdim]: this rank's partial attention output (its heads through its wo columns) for the
 * token at position pos. kcache/vcache: [n_kv, max_seq, d]; the token's k and v are written
 * at pos. scratch: at least hdim + 2*(n_q + n_kv)*d + pos + 1 floats. */
int edgemesh_int8_attn_decode(const float *x, const float *norm, float eps, size_t hdim,
                              const int8_t *wq, const float *sq, const int8_t *wk, const float *sk,
                              const int8_t *wv, const float *sv, const int8_t *wo, const float *so,
                              size_t n_q, size_t n_kv, size_t d,
                              const float *cs, const float *sn, float *kcache, float *vcache,
                              size_t max_seq, size_t pos, float *scratch, float *out) {
    if (n_kv == 0 || n_q % n_kv != 0 || pos >= max_seq || d % 2) return -1;
    float *xn = scratch, *q = xn + hdim, *k = q + n_q * d, *v = k + n_kv * d, *a = v + n_kv * d;
    float *p = a + n_q * d;
    rms_norm1(x, norm, eps, hdim, xn);
    edgemesh_int8_gemv(xn, wq, sq, q, 1, n_q * d, hdim, 0, n_q * d);
    edgemesh_int8_gemv(xn, wk, sk, k, 1, n_kv * d, hdim, 0, n_kv * d);
    edgemesh_int8_gemv(xn, wv, sv, v, 1, n_kv * d, hdim, 0, n_kv * d);
    for (size_t h = 0; h < n_q; h++) rope1(q + h * d, cs, sn, d);
    for (size_t g = 0; g < n_kv; g++) {
        rope1(k + g * d, cs, sn, d);
        memcpy(kcache + (g * max_seq + pos) * d, k + g * d, d * sizeof(float));
        memcpy(vcache + (g * max_seq + pos) * d, v + g * d, d * sizeof(float));
    }
    float scale = 1.0f / sqrtf((float)d);
    size_t group = n_q / n_kv, T = pos + 1;
    for (size_t h = 0; h < n_q; h++) {
        const float *qh = q + h * d;
        const float *K = kcache + (h / group) * max_seq * d, *V = vcache + (h / group) * max_seq * d;
        float mx = -INFINITY;
        for (size_t t = 0; t < T; t++) {
            const float *kt = K + t * d;
            float s = 0.0f;
            for (size_t i = 0; i < d; i++) s += qh[i] * kt[i];
            p[t] = s * scale;
            if (p[t] > mx) mx = p[t];
        }
        float sum = 0.0f;
        for (size_t t = 0; t < T; t++) { p[t] = expf(p[t] - mx); sum += p[t]; }
        float inv = 1.0f / sum;
        float *o = a + h * d;
        for (size_t i = 0; i < d; i++) o[i] = 0.0f;
        for (size_t t = 0; t < T; t++) {
            const float *vt = V + t * d;
            float w = p[t] * inv;
            for (size_t i = 0; i < d; i++) o[i] += w * vt[i];
        }
    }
    edgemesh_int8_gemv(a, wo, so, out, 1, hdim, n_q * d, 0, hdim);
    return 0;
}

/* out [hdim]: this rank's partial SwiGLU output for one token. scratch: hdim + 2*f floats. */
int edgemesh_int8_mlp_decode(const float *x, const float *norm, float eps, size_t hdim,
                             const int8_t *wg, const float *sg, const int8_t *wu, const float *su,
                             const int8_t *wd, const float *sd, size_t f, float *scratch, float *out) {
    float *xn = scratch, *g = xn + hdim, *u = g + f;
    rms_norm1(x, norm, eps, hdim, xn);
    edgemesh_int8_gemv(xn, wg, sg, g, 1, f, hdim, 0, f);
    edgemesh_int8_gemv(xn, wu, su, u, 1, f, hdim, 0, f);
    for (size_t i = 0; i < f; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    edgemesh_int8_gemv(g, wd, sd, out, 1, hdim, f, 0, hdim);
    return 0;
}
