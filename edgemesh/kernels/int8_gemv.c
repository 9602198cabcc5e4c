/* y[m, n] = scale[n] * sum_k w[n, k] * x[m, k]   (int8 weights, fp32 activations and output)
 * and its 4-bit sibling (q4: groups of 32 columns with a scale each; see "q4" below).
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
 * Threads: the products split their output rows over a small pool (see "pool" below) sized
 * by the caller to the rank's thread budget; a row's arithmetic does not depend on which
 * thread computes it, so results are bitwise the same for any thread count. A rank that
 * shares its cores with other ranks gets a budget of 1 and runs on the calling thread alone.
 * Weight rows are prefetched PREFETCH bytes ahead: without it the kernel streamed 6.5 GB/s
 * from DRAM, with it 15 GB/s (the machine's plain read is 24 GB/s).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define MAX_M 4

/* ---- pool ---------------------------------------------------------------------------------
 * nthreads - 1 helper threads; the calling thread takes share 0 of every job. A job is "rows
 * [0, n) of fn": share i is a contiguous range, multiples of 16 rows. Helpers wait for the next
 * job by spinning on the job counter for up to POOL_SPIN_NS (the gaps between the products of
 * a decode step are a few microseconds of Python; waking a sleeping thread costs tens of
 * microseconds on a VM), then sleep on a futex. The pool is process-wide and serves one job at
 * a time: a second thread that calls while a job runs computes alone (same results). A forked
 * child has no helpers: it starts with a pool of 1. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define POOL_MAX 16
#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 1000000ull
#endif
#define POOL_MIN_WORK 32768u  /* weights per job below which splitting costs more than it saves */

typedef void (*rows_fn)(const void *ctx, size_t n0, size_t n1);
#define ROW_UNIT 16  /* rows per share of a product: whole blocks of the 4-row kernels */

static struct {
    int nthreads;                /* including the caller; changed only by edgemesh_pool_threads */
    pthread_t tid[POOL_MAX];
    _Atomic uint32_t gen;        /* job counter, also the futex word helpers sleep on */
    _Atomic int done;            /* helpers finished with the current job */
    _Atomic int sleepers;
    _Atomic int stop;
    atomic_flag busy;            /* a job is running */
    uint32_t start_gen;          /* the job counter when the helpers were started */
    rows_fn fn;
    const void *ctx;
    size_t n, unit;
} P = {.nthreads = 1, .busy = ATOMIC_FLAG_INIT};
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void share_of(size_t n, size_t unit, int parts, int i, size_t *a, size_t *b) {
    size_t step = (n + (size_t)parts - 1) / (size_t)parts;
    step = (step + unit - 1) / unit * unit;
    *a = step * (size_t)i < n ? step * (size_t)i : n;
    *b = step * (size_t)(i + 1) < n ? step * (size_t)(i + 1) : n;
}

static void run_share(int i) {
    size_t a, b;
    share_of(P.n, P.unit, P.nthreads, i, &a, &b);
    if (a < b) P.fn(P.ctx, a, b);
}

static void *pool_helper(void *arg) {
    int me = (int)(intptr_t)arg;
    uint32_t seen = P.start_gen;  /* not the counter now: a job may already have been posted */
    for (;;) {
        uint64_t t0 = now_ns();
        unsigned spins = 0;
        uint32_t g;
        while ((g = atomic_load(&P.gen)) == seen) {
            cpu_relax();
            if ((++spins & 255u) == 0 && now_ns() - t0 > POOL_SPIN_NS) {
                atomic_fetch_add(&P.sleepers, 1);
                if (atomic_load(&P.gen) == seen)  /* the poster checks sleepers after its bump */
                    syscall(SYS_futex, &P.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&P.sleepers, 1);
                t0 = now_ns();
            }
        }
        seen = g;
        if (atomic_load(&P.stop)) return NULL;
        run_share(me);
        atomic_fetch_add(&P.done, 1);
    }
}

static void pool_post(void) {
    atomic_fetch_add(&P.gen, 1);
    if (atomic_load(&P.sleepers) > 0)
        syscall(SYS_futex, &P.gen, FUTEX_WAKE_PRIVATE, POOL_MAX, NULL, NULL, 0);
}

/* rows [0, n) of fn in shares of whole units, over the pool when the job is worth it (work:
 * multiply-adds it does). */
static void par_units(rows_fn fn, const void *ctx, size_t n, size_t unit, size_t work) {
    int T = P.nthreads;
    if (T <= 1 || work < POOL_MIN_WORK || n < 2 * unit || atomic_flag_test_and_set(&P.busy)) {
        fn(ctx, 0, n);
        return;
    }
    T = P.nthreads;  /* read again under the busy flag */
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.unit = unit;
    atomic_store(&P.done, 0);
    pool_post();
    run_share(0);
    while (atomic_load(&P.done) != T - 1) cpu_relax();
    atomic_flag_clear(&P.busy);
}

static void par_rows(rows_fn fn, const void *ctx, size_t n, size_t work) {
    par_units(fn, ctx, n, ROW_UNIT, work);
}

static void pool_stop(void) {
    int helpers = P.nthreads - 1;
    if (helpers <= 0) return;
    while (atomic_flag_test_and_set(&P.busy)) cpu_relax();  /* let a running job finish */
    atomic_store(&P.stop, 1);
    pool_post();
    for (int i = 1; i <= helpers; i++) pthread_join(P.tid[i], NULL);
    atomic_store(&P.stop, 0);
    P.nthreads = 1;
    atomic_flag_clear(&P.busy);
}

static void pool_after_fork(void) {  /* the child's helpers did not come along */
    P.nthreads = 1;
    atomic_store(&P.stop, 0);
    atomic_store(&P.sleepers, 0);
    atomic_flag_clear(&P.busy);
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pool_lock = fresh;
}

/* Sets the pool to n threads (the caller included, 1..POOL_MAX); returns the count it has. */
int edgemesh_pool_threads(int n) {
    static int fork_hook = 0;
    if (n < 1) n = 1;
    if (n > POOL_MAX) n = POOL_MAX;
    pthread_mutex_lock(&pool_lock);
    if (!fork_hook) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        fork_hook = 1;
    }
    if (n != P.nthreads) {
        pool_stop();
        int started = 1;
        while (atomic_flag_test_and_set(&P.busy)) cpu_relax();
        P.start_gen = atomic_load(&P.gen);
        for (int i = 1; i < n; i++) {
            if (pthread_create(&P.tid[i], NULL, pool_helper, (void *)(intptr_t)i) != 0) break;
            pthread_setname_np(P.tid[i], "edgemesh-kernel");  /* as top and ps show it */
            started++;
        }
        P.nthreads = started;
        atomic_flag_clear(&P.busy);
    }
    int out = P.nthreads;
    pthread_mutex_unlock(&pool_lock);
    return out;
}

int edgemesh_pool_size(void) { return P.nthreads; }

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

/* ---- q4: 4-bit codes in groups of 32 columns, a step d and an offset m per (row, group) ---
 * Layout (edgemesh/weights/quant.py): a row is k/2 bytes; group g is bytes [16g, 16g + 16),
 * byte i holding column 32g + i in its low nibble and column 32g + 16 + i in its high one;
 * weight = d[row, g] * code + m[row, g], (d, m) stored as a pair of IEEE halves per group.
 *
 * Activations: fp32 in and out, but each group of 32 values of x is quantized on entry to
 * int8 with its own scale (sx = max|x| / 127, xq = round-to-even(x * (1 / sx))), the q8_0
 * activations of llama.cpp and distributed-llama. A group's sums sum(code * xq) and sum(xq)
 * are then exact integers, and
 *
 *     y[row] = sum over groups of  sx[g] * (d * float(sum code * xq) + m * float(sum xq))
 *
 * in fp32. Why not fp32 activations: widening 4-bit codes to fp32 costs more instructions per
 * weight than int8's widening, and such a kernel (table lookup per nibble) was compute-bound
 * on an AVX-512 EPYC at about 15-22 G weights/s, no faster than the int8 kernel; integer dot
 * products (AVX-512 VNNI, 64 multiply-adds per instruction) are what make 4 bits pay. The
 * rounding of x is at most half a step of 1/254 of its group's largest value (README: its
 * measured effect on the logits).
 *
 * Exactness: x's quantization depends only on x and the group boundaries (multiples of 32),
 * so a rank holding some rows computes bitwise what one device computes for them, and a rank
 * holding a column slice (wo, w_down: whole groups) quantizes its part of x as one device
 * does; the summation order of the fp32 part depends only on k.
 *
 * The VNNI path keeps 16 lanes; lane 4j + q of a step of four groups holds the sums over 4
 * low-nibble and 4 high-nibble columns of quarter q of group 4s + j, and adds
 * sx * (d * lane + m * sum of its 8 xq). Other CPUs run the plain C below (the same integers,
 * one accumulator, group by group): correct, not fast. */
#define Q4_GROUP 32

static float q4_half(uint16_t h) {  /* IEEE half → float (normal, subnormal, zero, inf/nan) */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023, bits;
    if (e == 0) {
        if (f == 0) { bits = sign; }
        else { float v = (float)f * (1.0f / 16777216.0f); return (h & 0x8000) ? -v : v; }  /* f * 2^-24 */
    } else if (e == 31) { bits = sign | 0x7F800000u | (f << 13); }
    else { bits = sign | ((e + 112) << 23) | (f << 13); }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* x [k] → xq [k] int8 and sx [k/32]: per group sx = amax / 127, xq = rint(x * (1 / sx)). */
static void q4_quantize_x(const float *x, size_t k, int8_t *xq, float *sx) {
    for (size_t g = 0; g < k / Q4_GROUP; g++) {
        const float *xg = x + g * Q4_GROUP;
        float amax = 0.0f;
        for (int i = 0; i < Q4_GROUP; i++) { float v = fabsf(xg[i]); if (v > amax) amax = v; }
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < Q4_GROUP; i++) xq[g * Q4_GROUP + i] = (int8_t)lrintf(xg[i] * id);
        sx[g] = d;
    }
}

/* s: the row's (d, m) halves, 2 per group */
static float q4_row_plain(const uint8_t *w, const uint16_t *s, size_t k, const int8_t *xq, const float *sx) {
    float acc = 0.0f;
    for (size_t g = 0; g < k / Q4_GROUP; g++) {
        const uint8_t *b = w + g * 16;
        const int8_t *xg = xq + g * Q4_GROUP;
        int32_t dot = 0, sum = 0;
        for (int i = 0; i < 16; i++) {
            dot += (int32_t)(b[i] & 15) * xg[i] + (int32_t)(b[i] >> 4) * xg[16 + i];
            sum += xg[i] + xg[16 + i];
        }
        acc += sx[g] * (q4_half(s[2 * g]) * (float)dot + q4_half(s[2 * g + 1]) * (float)sum);
    }
    return acc;
}

#if VECTOR == 2 && defined(__AVX512VNNI__)
#define Q4_VNNI 1
/* The x side of one call, laid out for the steps (each of four groups, the last padded with
 * zeros): xlo/xhi [16 * ng4] (low/high 16 values of each group), lsum [4 * ng4] (the sum of
 * the 8 xq values a lane multiplies, as float), sxl [4 * ng4] (each lane's group scale). */
typedef struct { int8_t *xlo, *xhi; float *lsum, *sxl; size_t ng, steps; } q4_xside;

static void q4_prepare(const int8_t *xq, const float *sx, size_t k, q4_xside *p) {
    size_t ng = k / Q4_GROUP, ng4 = (ng + 3) & ~(size_t)3;
    p->ng = ng;
    p->steps = ng4 / 4;
    memset(p->xlo, 0, 16 * ng4);
    memset(p->xhi, 0, 16 * ng4);
    for (size_t g = 0; g < ng4; g++) {
        for (int q = 0; q < 4; q++) {
            int32_t c = 0;
            for (int i = 4 * q; i < 4 * q + 4 && g < ng; i++) {
                p->xlo[16 * g + i] = xq[32 * g + i];
                p->xhi[16 * g + i] = xq[32 * g + 16 + i];
                c += xq[32 * g + i] + xq[32 * g + 16 + i];
            }
            p->lsum[4 * g + q] = (float)c;
            p->sxl[4 * g + q] = g < ng ? sx[g] : 0.0f;
        }
    }
}

#define Q4_ROWS_DOT(R)                                                                           \
static inline void q4_rows_dot_##R(const uint8_t *w, const uint16_t *s, size_t k,               \
                                   const q4_xside *p, float *out) {                              \
    size_t kb = k / 2, ng = p->ng;                                                               \
    const __m512i m4 = _mm512_set1_epi8(15);                                                     \
    const __m512i id = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);         \
    const __m512i im = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);         \
    __m512 acc[R];                                                                               \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                    \
    for (size_t st = 0; st < p->steps; st++) {                                                   \
        size_t g = 4 * st, rem = ng - g < 4 ? ng - g : 4;                                        \
        __mmask64 mb = rem == 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * rem)) - 1);            \
        __mmask8 ms = (__mmask8)((1u << (2 * rem)) - 1);                                         \
        __m512i xl = _mm512_loadu_si512(p->xlo + 16 * g), xh = _mm512_loadu_si512(p->xhi + 16 * g); \
        __m512 ls = _mm512_loadu_ps(p->lsum + 4 * g), sxv = _mm512_loadu_ps(p->sxl + 4 * g);     \
        _mm_prefetch((const char *)(w + PREFETCH + g * 16 * R), _MM_HINT_T0);                    \
        if (R > 1) _mm_prefetch((const char *)(w + PREFETCH + g * 16 * R + 64), _MM_HINT_T0);    \
        if (R > 2) _mm_prefetch((const char *)(w + PREFETCH + g * 16 * R + 128), _MM_HINT_T0);   \
        if (R > 3) _mm_prefetch((const char *)(w + PREFETCH + g * 16 * R + 192), _MM_HINT_T0);   \
        for (int r = 0; r < R; r++) {                                                            \
            __m512i b = _mm512_maskz_loadu_epi8(mb, w + r * kb + g * 16);                        \
            __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4); \
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh); \
            __m512 dm = _mm512_castps256_ps512(                                                  \
                _mm256_cvtph_ps(_mm_maskz_loadu_epi16(ms, s + 2 * (r * ng + g))));               \
            __m512 t = _mm512_fmadd_ps(_mm512_permutexvar_ps(id, dm), _mm512_cvtepi32_ps(dot),   \
                                       _mm512_mul_ps(_mm512_permutexvar_ps(im, dm), ls));        \
            acc[r] = _mm512_fmadd_ps(t, sxv, acc[r]);                                            \
        }                                                                                        \
    }                                                                                            \
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);                           \
}
Q4_ROWS_DOT(1)
Q4_ROWS_DOT(4)
#else
#define Q4_VNNI 0
#endif

int edgemesh_q4_gemv_vector(void) { return Q4_VNNI; }  /* 1: AVX-512 VNNI, 0: plain C */

/* One activation row made ready for q4 products: its int8 rounding and (VNNI) the step layout.
 * Made once per row of x and shared by every matrix that multiplies it (q, k, v; gate, up).
 * Small rows live in the struct itself: no allocation per call. */
#define Q4_LOCAL_BYTES 16384
typedef struct {
    size_t k;
    int8_t *xq;
    float *sx;
#if Q4_VNNI
    q4_xside p;
#endif
    unsigned char *heap;
    _Alignas(64) unsigned char local[Q4_LOCAL_BYTES];
} q4_x;

static void q4_quantize_x_fast(const float *x, size_t k, int8_t *xq, float *sx) {
#if Q4_VNNI
    for (size_t g = 0; g < k / Q4_GROUP; g++) {  /* the same numbers as q4_quantize_x */
        __m512 a = _mm512_loadu_ps(x + g * Q4_GROUP), b = _mm512_loadu_ps(x + g * Q4_GROUP + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m512 v = _mm512_set1_ps(id);
        __m128i qa = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, v)));
        __m128i qb = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, v)));
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP), qa);
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP + 16), qb);
        sx[g] = d;
    }
#else
    q4_quantize_x(x, k, xq, sx);
#endif
}

/* Returns 0, or -2 out of memory. */
static int q4_x_init(q4_x *X, const float *x, size_t k, int plain) {
    size_t ng = k / Q4_GROUP, ng4 = (ng + 3) & ~(size_t)3;
    size_t bytes = ((k + 63) & ~(size_t)63) + 4 * ng + 64 * ng4 + 64;
    unsigned char *buf = X->local;
    X->heap = NULL;
    X->k = k;
    if (bytes > Q4_LOCAL_BYTES) {
        buf = X->heap = malloc(bytes);
        if (!buf) return -2;
    }
    X->xq = (int8_t *)buf;
    X->sx = (float *)(buf + ((k + 63) & ~(size_t)63));
    if (plain) {
        q4_quantize_x(x, k, X->xq, X->sx);
        return 0;
    }
    q4_quantize_x_fast(x, k, X->xq, X->sx);
#if Q4_VNNI
    X->p.lsum = X->sx + ng;
    X->p.sxl = X->p.lsum + 4 * ng4;
    X->p.xlo = (int8_t *)(X->p.sxl + 4 * ng4);
    X->p.xhi = X->p.xlo + 16 * ng4;
    q4_prepare(X->xq, X->sx, k, &X->p);
#endif
    return 0;
}

static void q4_x_free(q4_x *X) { free(X->heap); }

/* y[i] for rows [n0, n1) of w [n, k/2] (scale [n, k/32, 2]) against a prepared row. */
static void q4_rows(const q4_x *X, const uint8_t *w, const uint16_t *scale, float *y, size_t n0, size_t n1, int plain) {
    size_t k = X->k, kb = k / 2, ng = k / Q4_GROUP, i = n0;
    (void)plain;  /* without VNNI every call is plain */
#if Q4_VNNI
    if (!plain) {
        float out[4];
        for (; i + 4 <= n1; i += 4) {
            q4_rows_dot_4(w + i * kb, scale + 2 * i * ng, k, &X->p, out);
            for (int j = 0; j < 4; j++) y[i + j] = out[j];
        }
        for (; i < n1; i++) q4_rows_dot_1(w + i * kb, scale + 2 * i * ng, k, &X->p, y + i);
    }
#endif
    for (; i < n1; i++) y[i] = q4_row_plain(w + i * kb, scale + 2 * i * ng, k, X->xq, X->sx);
}

typedef struct { const q4_x *X; const uint8_t *w; const uint16_t *scale; float *y; size_t n0; int plain; } q4_job;

static void q4_job_rows(const void *ctx, size_t a, size_t b) {
    const q4_job *J = ctx;
    q4_rows(J->X, J->w, J->scale, J->y, J->n0 + a, J->n0 + b, J->plain);
}

/* rows [n0, n1) of one prepared row, over the pool */
static void q4_rows_par(const q4_x *X, const uint8_t *w, const uint16_t *scale, float *y, size_t n0, size_t n1, int plain) {
    if (n1 <= n0) return;
    q4_job J = {X, w, scale, y, n0, plain};
    par_rows(q4_job_rows, &J, n1 - n0, (n1 - n0) * X->k);
}

/* x [m, k] fp32, w [n, k/2] q4 bytes, scale [n, k/32, 2] halves (d, m), y [m, n] fp32; rows [n0, n1).
 * Returns 0, -1 for m outside 1..MAX_M or k not a multiple of 32, -2 out of memory.
 * plain != 0: the plain-C arithmetic whatever the build (tests). */
static int q4_gemv(const float *x, const uint8_t *w, const uint16_t *scale, float *y,
                   size_t m, size_t n, size_t k, size_t n0, size_t n1, int plain) {
    if (m < 1 || m > MAX_M || k % Q4_GROUP) return -1;
    if (n1 > n) n1 = n;
    q4_x X;
    for (size_t r = 0; r < m; r++) {
        if (q4_x_init(&X, x + r * k, k, plain)) return -2;
        q4_rows_par(&X, w, scale, y + r * n, n0, n1, plain);
        q4_x_free(&X);
    }
    return 0;
}

int edgemesh_q4_gemv(const float *x, const uint8_t *w, const uint16_t *scale, float *y,
                     size_t m, size_t n, size_t k, size_t n0, size_t n1, int plain) {
    return q4_gemv(x, w, scale, y, m, n, k, n0, n1, plain);
}

/* ---- q4 → fp32 rows, for prefill-size products ---------------------------------------------
 * out[(i - n0) * k + c] = (float)code * d + m for rows [n0, n1) of a q4 matrix: bitwise what
 * weights/quant.py's dequantize_q4 gives (the half → float conversion is exact, and the product
 * and the sum are rounded separately: -ffp-contract=off). The caller (kernels.q4_linear) turns a
 * block of rows at a time into a buffer that stays in cache and multiplies it there, instead of
 * dequantizing a whole matrix with a handful of torch ops, each a pass over memory.
 * w [n, k/2], scale [n, k/32, 2], out [n1 - n0, k]; -1 if k is not a multiple of 32 or the rows
 * are out of range. On the calling thread only: the product that
 * follows runs on torch's threads, and the pool's helpers, spinning after a job, took cores
 * from them (a 2-thread prefill ran 5x slower); a block takes ~0.2 ns per weight here. */
int edgemesh_q4_dequant(const uint8_t *wq, const uint16_t *scale, float *out, size_t n, size_t k,
                        size_t n0, size_t n1) {
    if (k % Q4_GROUP || n0 > n1 || n1 > n) return -1;
    size_t kb = k / 2, ng = k / Q4_GROUP;
    for (size_t i = n0; i < n1; i++) {
        const uint8_t *w = wq + i * kb;
        const uint16_t *s = scale + 2 * i * ng;
        float *o = out + (i - n0) * k;
        for (size_t g = 0; g < ng; g++) {
            const float d = q4_half(s[2 * g]), m = q4_half(s[2 * g + 1]);
            const uint8_t *wg = w + g * (Q4_GROUP / 2);
            float *og = o + g * Q4_GROUP;
#if VECTOR == 2
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wg));
            const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
            _mm512_storeu_ps(og, _mm512_add_ps(_mm512_mul_ps(lo, vd), vm));
            _mm512_storeu_ps(og + Q4_GROUP / 2, _mm512_add_ps(_mm512_mul_ps(hi, vd), vm));
            continue;
#endif
            for (int c = 0; c < Q4_GROUP / 2; c++) {
                og[c] = (float)(wg[c] & 15) * d + m;
                og[c + Q4_GROUP / 2] = (float)(wg[c] >> 4) * d + m;
            }
        }
    }
    return 0;
}

int edgemesh_int8_gemv_max_m(void) { return MAX_M; }

int edgemesh_int8_gemv_vector(void) { return VECTOR; }  /* 0 plain C, 1 AVX2, 2 AVX-512 */

/* Rows [n0, n1) of y [m, n] = (x [m, k] . w [n, k]^T) * scale [n] on the calling thread. Four
 * weight rows at a time share the loads of x; the rest one by one, with the same arithmetic. */
static void int8_rows(const float *x, const int8_t *w, const float *scale, float *y,
                      size_t m, size_t n, size_t k, size_t n0, size_t n1) {
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
}

typedef struct { const float *x; const int8_t *w; const float *scale; float *y; size_t m, n, k, n0; } int8_job;

static void int8_job_rows(const void *ctx, size_t a, size_t b) {
    const int8_job *J = ctx;
    int8_rows(J->x, J->w, J->scale, J->y, J->m, J->n, J->k, J->n0 + a, J->n0 + b);
}

/* x [m, k] fp32 contiguous, w [n, k] int8 contiguous, scale [n] fp32, y [m, n] fp32.
 * Rows [n0, n1) of the output only, split over the pool. Returns 0, or -1 for an m outside
 * 1..MAX_M. */
int edgemesh_int8_gemv(const float *x, const int8_t *w, const float *scale, float *y,
                       size_t m, size_t n, size_t k, size_t n0, size_t n1) {
    if (m < 1 || m > MAX_M) return -1;
    if (n1 > n) n1 = n;
    if (n1 <= n0) return 0;
    int8_job J = {x, w, scale, y, m, n, k, n0};
    par_rows(int8_job_rows, &J, n1 - n0, (n1 - n0) * k * m);
    return 0;
}


/* ---- whole decode blocks (one token, batch 1) -------------------------------------------
 * A decode step of a small model is dominated by per-op overhead when each of ~50 small ops
 * per layer is a separate torch call from Python. These run a rank's attention and MLP block
 * for one token in one call each, fp32 activations, int8 or q4 weights through the kernels above. */

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

/* One matrix product of a block in the block's weight format: FMT_INT8 (int8 [n, k], scale
 * [n] fp32) or FMT_Q4 (q4 bytes [n, k/2], scale [n, k/32, 2] halves). */
enum { FMT_INT8 = 0, FMT_Q4 = 1 };

/* The input x of a block's products, made ready once for every matrix that multiplies it. */
typedef struct { int fmt; const float *x; size_t k; q4_x q; } block_in;

static int block_in_init(block_in *in, int fmt, const float *x, size_t k) {
    in->fmt = fmt;
    in->x = x;
    in->k = k;
    return fmt == FMT_Q4 ? q4_x_init(&in->q, x, k, 0) : 0;
}

static void block_in_free(block_in *in) {
    if (in->fmt == FMT_Q4) q4_x_free(&in->q);
}

/* Up to three products of one block input, their rows taken as one list [w0 rows, w1 rows, …]
 * and split over the pool in one job (q, k, v; gate, up): one wait per block step, not three. */
typedef struct {
    const block_in *in;
    int nm;
    const void *w[3], *s[3];
    float *y[3];
    size_t n[3];
} mats_job;

static void mats_rows(const void *ctx, size_t a, size_t b) {
    const mats_job *J = ctx;
    const block_in *in = J->in;
    size_t off = 0;
    for (int m = 0; m < J->nm; off += J->n[m], m++) {
        if (b <= off || a >= off + J->n[m]) continue;
        size_t lo = a > off ? a - off : 0, hi = b - off < J->n[m] ? b - off : J->n[m];
        if (in->fmt == FMT_Q4)
            q4_rows(&in->q, (const uint8_t *)J->w[m], (const uint16_t *)J->s[m], J->y[m], lo, hi, 0);
        else
            int8_rows(in->x, (const int8_t *)J->w[m], (const float *)J->s[m], J->y[m], 1, J->n[m], in->k, lo, hi);
    }
}

static void mats_gemv(const block_in *in, int nm, const void *const *w, const void *const *s, float *const *y,
                      const size_t *n) {
    mats_job J = {.in = in, .nm = nm};
    size_t rows = 0;
    for (int m = 0; m < nm; m++) {
        J.w[m] = w[m];
        J.s[m] = s[m];
        J.y[m] = y[m];
        J.n[m] = n[m];
        rows += n[m];
    }
    par_rows(mats_rows, &J, rows, rows * in->k);
}

static void mat_gemv(const block_in *in, const void *w, const void *s, float *y, size_t n) {
    mats_gemv(in, 1, &w, &s, &y, &n);
}

/* q . k over d values: 16 partial sums (lane j takes i = j mod 16), then added in lane order;
 * the order depends only on d. */
static float dot_d(const float *q, const float *k, size_t d) {
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += q[i + j] * k[i + j];
    for (int j = 0; i + (size_t)j < d; j++) acc[j] += q[i + j] * k[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* Softmax attention of heads [h0, h1) for the token at position T - 1: a head reads its KV
 * group's cache, its scores go to p + h * T. */
typedef struct {
    const float *q, *kcache, *vcache;
    float *a, *p;
    size_t max_seq, d, group, T;
    float scale;
} att_job;

static void att_heads(const void *ctx, size_t h0, size_t h1) {
    const att_job *J = ctx;
    size_t d = J->d, T = J->T;
    for (size_t h = h0; h < h1; h++) {
        const float *qh = J->q + h * d;
        const float *K = J->kcache + (h / J->group) * J->max_seq * d, *V = J->vcache + (h / J->group) * J->max_seq * d;
        float *p = J->p + h * T, mx = -INFINITY;
        for (size_t t = 0; t < T; t++) {
            p[t] = dot_d(qh, K + t * d, d) * J->scale;
            if (p[t] > mx) mx = p[t];
        }
        float sum = 0.0f;
        for (size_t t = 0; t < T; t++) { p[t] = expf(p[t] - mx); sum += p[t]; }
        float inv = 1.0f / sum;
        float *o = J->a + h * d;
        for (size_t i = 0; i < d; i++) o[i] = 0.0f;
        for (size_t t = 0; t < T; t++) {
            const float *vt = V + t * d;
            float w = p[t] * inv;
            for (size_t i = 0; i < d; i++) o[i] += w * vt[i];
        }
    }
}

/* out [hdim]: this rank's partial attention output (its heads through its wo columns) for the
 * token at position pos. kcache/vcache: [n_kv, max_seq, d]; the token's k and v are written
 * at pos. scratch: at least hdim + 2*(n_q + n_kv)*d + n_q*(pos + 1) floats. */
static int attn_decode(int fmt, const float *x, const float *norm, float eps, size_t hdim,
                       const void *wq, const void *sq, const void *wk, const void *sk,
                       const void *wv, const void *sv, const void *wo, const void *so,
                       size_t n_q, size_t n_kv, size_t d,
                       const float *cs, const float *sn, float *kcache, float *vcache,
                       size_t max_seq, size_t pos, float *scratch, float *out) {
    if (n_kv == 0 || n_q % n_kv != 0 || pos >= max_seq || d % 2) return -1;
    if (fmt == FMT_Q4 && (hdim % Q4_GROUP || (n_q * d) % Q4_GROUP)) return -1;
    float *xn = scratch, *q = xn + hdim, *k = q + n_q * d, *v = k + n_kv * d, *a = v + n_kv * d;
    float *p = a + n_q * d;
    rms_norm1(x, norm, eps, hdim, xn);
    block_in in;  /* large: one per block call, on the stack */
    if (block_in_init(&in, fmt, xn, hdim)) return -2;
    {
        const void *w3[3] = {wq, wk, wv}, *s3[3] = {sq, sk, sv};
        float *y3[3] = {q, k, v};
        size_t n3[3] = {n_q * d, n_kv * d, n_kv * d};
        mats_gemv(&in, 3, w3, s3, y3, n3);
    }
    block_in_free(&in);
    for (size_t h = 0; h < n_q; h++) rope1(q + h * d, cs, sn, d);
    for (size_t g = 0; g < n_kv; g++) {
        rope1(k + g * d, cs, sn, d);
        memcpy(kcache + (g * max_seq + pos) * d, k + g * d, d * sizeof(float));
        memcpy(vcache + (g * max_seq + pos) * d, v + g * d, d * sizeof(float));
    }
    att_job J = {q, kcache, vcache, a, p, max_seq, d, n_q / n_kv, pos + 1, 1.0f / sqrtf((float)d)};
    par_units(att_heads, &J, n_q, 1, n_q * (pos + 1) * d * 2);
    if (block_in_init(&in, fmt, a, n_q * d)) return -2;
    mat_gemv(&in, wo, so, out, hdim);
    block_in_free(&in);
    return 0;
}

/* out [hdim]: this rank's partial SwiGLU output for one token. scratch: hdim + 2*f floats. */
static int mlp_decode(int fmt, const float *x, const float *norm, float eps, size_t hdim,
                      const void *wg, const void *sg, const void *wu, const void *su,
                      const void *wd, const void *sd, size_t f, float *scratch, float *out) {
    if (fmt == FMT_Q4 && (hdim % Q4_GROUP || f % Q4_GROUP)) return -1;
    float *xn = scratch, *g = xn + hdim, *u = g + f;
    rms_norm1(x, norm, eps, hdim, xn);
    block_in in;
    if (block_in_init(&in, fmt, xn, hdim)) return -2;
    {
        const void *w2[2] = {wg, wu}, *s2[2] = {sg, su};
        float *y2[2] = {g, u};
        size_t n2[2] = {f, f};
        mats_gemv(&in, 2, w2, s2, y2, n2);
    }
    block_in_free(&in);
    for (size_t i = 0; i < f; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    if (block_in_init(&in, fmt, g, f)) return -2;
    mat_gemv(&in, wd, sd, out, hdim);
    block_in_free(&in);
    return 0;
}

#define ATTN_ARGS(T, S) const float *x, const float *norm, float eps, size_t hdim,               \
    const T *wq, const S *sq, const T *wk, const S *sk, const T *wv, const S *sv,                 \
    const T *wo, const S *so, size_t n_q, size_t n_kv, size_t d, const float *cs,            \
    const float *sn, float *kcache, float *vcache, size_t max_seq, size_t pos, float *scratch,   \
    float *out
#define ATTN_CALL(FMT) attn_decode(FMT, x, norm, eps, hdim, wq, sq, wk, sk, wv, sv, wo, so, n_q, \
    n_kv, d, cs, sn, kcache, vcache, max_seq, pos, scratch, out)
#define MLP_ARGS(T, S) const float *x, const float *norm, float eps, size_t hdim, const T *wg,    \
    const S *sg, const T *wu, const S *su, const T *wd, const S *sd, size_t f,                    \
    float *scratch, float *out
#define MLP_CALL(FMT) mlp_decode(FMT, x, norm, eps, hdim, wg, sg, wu, su, wd, sd, f, scratch, out)

int edgemesh_int8_attn_decode(ATTN_ARGS(int8_t, float)) { return ATTN_CALL(FMT_INT8); }
int edgemesh_q4_attn_decode(ATTN_ARGS(uint8_t, uint16_t)) { return ATTN_CALL(FMT_Q4); }
int edgemesh_int8_mlp_decode(MLP_ARGS(int8_t, float)) { return MLP_CALL(FMT_INT8); }
int edgemesh_q4_mlp_decode(MLP_ARGS(uint8_t, uint16_t)) { return MLP_CALL(FMT_Q4); }

/* ---- a rank's decoder layers for one token, allreduces included ------------------------------
 * The same two blocks per layer as the Python loop (llm/model.py run_layers): partial attention,
 * allreduce, residual; partial SwiGLU, allreduce, residual. The allreduce is a callback from the
 * collective's own library (collective/native_links.c): this file knows nothing of links. A
 * callback that cannot finish an op returns nonzero; the loop stops there with that block's
 * partial output in `part` and tells which block (*stopped), so Python finishes the op and goes
 * on from the next block. */

typedef int (*em_allreduce_fn)(void *ctx, const float *part, float *sum, int n);

typedef struct {
    int att_fmt, mlp_fmt;
    const float *att_norm;
    const void *wq, *sq, *wk, *sk, *wv, *sv, *wo, *so;
    int64_t n_q, n_kv;
    float *kcache, *vcache;
    const float *mlp_norm;
    const void *wg, *sg, *wu, *su, *wd, *sd;
    int64_t f;
} em_layer;

int edgemesh_decode_layers(const em_layer *layers, int n_blocks, int from, float *h, int64_t hdim, float eps,
                           int64_t d, const float *cs, const float *sn, int64_t max_seq, int64_t pos,
                           float *scratch, float *part, float *sum, void *fn, void *ctx, int *stopped) {
    em_allreduce_fn allreduce = (em_allreduce_fn)fn;
    for (int b = from; b < n_blocks; b++) {
        const em_layer *L = &layers[b / 2];
        int rc = 0;
        if ((b % 2 == 0 && L->n_q == 0) || (b % 2 == 1 && L->f == 0))
            memset(part, 0, (size_t)hdim * sizeof(float)); /* no heads (rows) of this block here */
        else if (b % 2 == 0)
            rc = attn_decode(L->att_fmt, h, L->att_norm, eps, (size_t)hdim, L->wq, L->sq, L->wk, L->sk, L->wv,
                             L->sv, L->wo, L->so, (size_t)L->n_q, (size_t)L->n_kv, (size_t)d, cs, sn, L->kcache,
                             L->vcache, (size_t)max_seq, (size_t)pos, scratch, part);
        else
            rc = mlp_decode(L->mlp_fmt, h, L->mlp_norm, eps, (size_t)hdim, L->wg, L->sg, L->wu, L->su, L->wd,
                            L->sd, (size_t)L->f, scratch, part);
        if (rc != 0) {
            *stopped = b;
            return -1; /* shapes the Python checks should have refused */
        }
        if (!allreduce) { /* a world of one: the sum is the part */
            for (int64_t j = 0; j < hdim; j++) h[j] = h[j] + part[j];
            continue;
        }
        if (allreduce(ctx, part, sum, (int)hdim) != 0) {
            *stopped = b;
            return 1;
        }
        for (int64_t j = 0; j < hdim; j++) h[j] = h[j] + sum[j];
    }
    *stopped = n_blocks;
    return 0;
}
