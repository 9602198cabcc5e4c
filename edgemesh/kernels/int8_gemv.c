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
 * Threads: edgemesh_int8_gemv_mt splits the output rows over the caller and up to
 * MAX_THREADS-1 pool threads (a process that has the cores to itself, e.g. one device with
 * 2 threads). Pool threads spin briefly after a job, since decode calls come back to back, and
 * then sleep on a condition variable. A rank that shares its cores passes nthreads = 1 and
 * never starts the pool.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#define MAX_M 4

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VECTOR 2

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

/* ---- the thread pool ------------------------------------------------------------------ */

#define MAX_THREADS 8
#define SPIN 4000            /* polls of the job counter before a pool thread sleeps (~100 us) */
#define MIN_PARALLEL 65536   /* multiply-adds below which one thread does it all */

typedef struct {
    const float *x; const int8_t *w; const float *scale; float *y;
    size_t m, n, k, n0, n1;
} job_t;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static _Atomic unsigned long pool_gen;   /* bumped once per posted job */
static _Atomic int pool_pending;         /* pool threads that have not finished the current job */
static _Atomic int pool_sleepers;        /* pool threads waiting on pool_cv (or about to) */
static job_t pool_jobs[MAX_THREADS];
static int pool_size;                    /* pool threads running (caller excluded) */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one multi-threaded call at a time */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_job(const job_t *j) {
    if (j->n1 > j->n0) edgemesh_int8_gemv(j->x, j->w, j->scale, j->y, j->m, j->n, j->k, j->n0, j->n1);
}

static void *pool_main(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned long seen = atomic_load(&pool_gen);
    for (;;) {
        unsigned long g;
        int spins = 0;
        while ((g = atomic_load(&pool_gen)) == seen) {
            if (++spins < SPIN) { relax(); continue; }
            pthread_mutex_lock(&pool_mu);
            atomic_fetch_add(&pool_sleepers, 1);
            while ((g = atomic_load(&pool_gen)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            atomic_fetch_sub(&pool_sleepers, 1);
            pthread_mutex_unlock(&pool_mu);
            break;
        }
        seen = g;
        run_job(&pool_jobs[id]);
        atomic_fetch_sub(&pool_pending, 1);
    }
    return NULL;
}

static void after_fork_child(void) {  /* the pool's threads do not exist in a forked child */
    pool_size = 0;
    atomic_store(&pool_pending, 0);
    atomic_store(&pool_sleepers, 0);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
}

static int grow_pool(int want) {
    static int atfork_done;
    if (!atfork_done) { pthread_atfork(NULL, NULL, after_fork_child); atfork_done = 1; }
    while (pool_size < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, pool_main, (void *)(intptr_t)(pool_size + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_size++;
    }
    return pool_size;
}

/* As edgemesh_int8_gemv over all n rows, split across nthreads threads (the caller is one). */
int edgemesh_int8_gemv_mt(const float *x, const int8_t *w, const float *scale, float *y,
                          size_t m, size_t n, size_t k, int nthreads) {
    if (m < 1 || m > MAX_M) return -1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads <= 1 || m * n * k < MIN_PARALLEL || n < 8)
        return edgemesh_int8_gemv(x, w, scale, y, m, n, k, 0, n);
    pthread_mutex_lock(&call_mu);
    int helpers = grow_pool(nthreads - 1);
    int parts = helpers + 1;
    size_t step = ((n + parts - 1) / parts + 3) & ~(size_t)3;
    for (int i = 0; i <= helpers; i++) {
        size_t a = (size_t)i * step, b = a + step;
        if (a > n) a = n;
        if (b > n) b = n;
        pool_jobs[i] = (job_t){x, w, scale, y, m, n, k, a, b};
    }
    for (int i = helpers + 1; i <= pool_size; i++) pool_jobs[i] = (job_t){x, w, scale, y, m, n, k, 0, 0};
    atomic_store(&pool_pending, pool_size);
    atomic_fetch_add(&pool_gen, 1);
    if (atomic_load(&pool_sleepers) > 0) {
        pthread_mutex_lock(&pool_mu);
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_mu);
    }
    run_job(&pool_jobs[0]);
    while (atomic_load(&pool_pending) > 0) relax();
    pthread_mutex_unlock(&call_mu);
    return 0;
}
