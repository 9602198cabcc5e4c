/* The shared-memory data plane of a collective group whose ranks all run on one machine
 * (collective/shm.py): an allreduce of float32 parts through one mapped segment instead of
 * sockets and TLS.
 *
 * Segment layout (every rank maps the same file):
 *   [0, 32)                 the hub's random token (shm.py checks it on attach)
 *   [64 + 64 r, +4)         rank r's flag: the number (low 32 bits) of the last op it published
 *   [64 + 64 r + 4, +4)     how many ranks sleep on that flag (so a publisher wakes only if needed)
 *   [EM_SHM_HEAD + ((b W + r) S) 4, ...)   rank r's part in buffer b (0, 1), S floats per slot
 *
 * Op s: a rank copies its part into slot (s & 1, me) and publishes s in its flag (release); it
 * waits until every other flag has reached s (acquire), then adds the W slots in rank order 0,
 * 1, ..., W-1 from rank 0's, as the direct allreduce over sockets does: the same bits on every
 * rank. Two buffers suffice: a rank writes buffer s & 1 again at op s + 2 only after seeing every
 * flag at s + 1, and each rank publishes s + 1 only after it has read op s's slots.
 *
 * A wait spins briefly (yielding the core), then sleeps on the flag's futex in short slices.
 * Between slices it polls the group's sockets: bytes or a close there during an op mean an abort
 * or a lost peer (or a faster rank's next message), which Python reads; it then calls again and
 * the op resumes where it stopped (the part is not published twice). */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { EM_OK = 0, EM_OTHER = 1, EM_TIMEOUT = 2, EM_ELSEWHERE = 6 };
#define EM_SHM_MAX 64
#define EM_SHM_HEAD 8192 /* token, flags: 64 + 64 * EM_SHM_MAX bytes, rounded up to pages */
#define EM_SLICE_US 2000 /* one futex sleep, at most: then the sockets and the deadline are checked */

typedef struct {
    uint8_t *base;       /* the mapping */
    int world, me;
    int slot;            /* floats per slot */
    int timeout_ms;      /* one op's limit, from its first call */
    int spin_us;         /* how long a wait spins before it sleeps */
    int nfds;            /* the group's sockets, watched while waiting */
    int fds[EM_SHM_MAX];
    uint64_t seq;        /* the number of the op in progress or next */
    int phase;           /* 0: this rank's part not published yet; 1: published */
    int which;           /* on EM_TIMEOUT: the rank waited for */
    int64_t deadline_us; /* of the op in progress */
    int64_t stop_us;     /* if not 0: an earlier limit Python set (a peer's link closed, a close) */
    uint64_t ops, ns;    /* ops done and the time spent in them */
} em_shm_ctx;

int edgemesh_shm_ctx_size(void) { return (int)sizeof(em_shm_ctx); }
int edgemesh_shm_head(void) { return EM_SHM_HEAD; }

void *edgemesh_shm_map(int fd, long size) {
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int edgemesh_shm_unmap(void *p, long size) { return munmap(p, (size_t)size); }

static int64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static _Atomic uint32_t *flag_of(const em_shm_ctx *c, int r) {
    return (_Atomic uint32_t *)(c->base + 64 + 64 * r);
}

static _Atomic uint32_t *sleepers_of(const em_shm_ctx *c, int r) {
    return (_Atomic uint32_t *)(c->base + 64 + 64 * r + 4);
}

static float *slot_of(const em_shm_ctx *c, int buf, int r) {
    return (float *)(c->base + EM_SHM_HEAD + ((size_t)buf * c->world + r) * (size_t)c->slot * 4);
}

static int reached(uint32_t flag, uint32_t s) { return (int32_t)(flag - s) >= 0; }

static int sockets_busy(const em_shm_ctx *c) {
    if (c->nfds <= 0) return 0;
    struct pollfd pf[EM_SHM_MAX];
    for (int i = 0; i < c->nfds; i++) { pf[i].fd = c->fds[i]; pf[i].events = POLLIN; pf[i].revents = 0; }
    return poll(pf, (nfds_t)c->nfds, 0) > 0;
}

/* Until rank r's flag reaches s: EM_OK, EM_TIMEOUT (the op's deadline) or EM_ELSEWHERE. */
static int wait_for(em_shm_ctx *c, int r, uint32_t s) {
    _Atomic uint32_t *f = flag_of(c, r);
    if (reached(atomic_load_explicit(f, memory_order_acquire), s)) return EM_OK;
    int64_t spin_end = now_us() + c->spin_us;
    while (now_us() < spin_end) {
        if (reached(atomic_load_explicit(f, memory_order_acquire), s)) return EM_OK;
        sched_yield(); /* three ranks on two cores: give the core to one still computing */
    }
    _Atomic uint32_t *sleepers = sleepers_of(c, r);
    for (;;) {
        /* stop_us may be set by another thread meanwhile (a close): read it as it is now */
        int64_t stop = __atomic_load_n(&c->stop_us, __ATOMIC_RELAXED);
        int64_t limit = stop && stop < c->deadline_us ? stop : c->deadline_us;
        int64_t left = limit - now_us();
        if (left <= 0) { c->which = r; return EM_TIMEOUT; }
        if (sockets_busy(c)) return EM_ELSEWHERE;
        atomic_fetch_add(sleepers, 1);
        uint32_t seen = atomic_load(f); /* seq_cst with the publisher's store and load */
        if (!reached(seen, s)) {
            int64_t us = left < EM_SLICE_US ? left : EM_SLICE_US;
            struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
            syscall(SYS_futex, (uint32_t *)f, FUTEX_WAIT, seen, &ts, NULL, 0);
        }
        atomic_fetch_sub(sleepers, 1);
        if (reached(atomic_load_explicit(f, memory_order_acquire), s)) return EM_OK;
    }
}

/* One op of n floats (n <= slot): the sum of every rank's part into sum. */
int edgemesh_shm_allreduce(void *vctx, const float *part, float *sum, int n) {
    em_shm_ctx *c = (em_shm_ctx *)vctx;
    if (n < 0 || n > c->slot || c->world < 2 || c->world > EM_SHM_MAX) return EM_OTHER;
    int64_t t0 = now_us();
    uint32_t s = (uint32_t)c->seq;
    int buf = (int)(c->seq & 1);
    if (c->phase == 0) {
        c->deadline_us = t0 + (int64_t)c->timeout_ms * 1000;
        memcpy(slot_of(c, buf, c->me), part, (size_t)n * 4);
        _Atomic uint32_t *mine = flag_of(c, c->me);
        atomic_store(mine, s); /* seq_cst: orders the data before it, and the sleepers' load after */
        if (atomic_load(sleepers_of(c, c->me)) > 0)
            syscall(SYS_futex, (uint32_t *)mine, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        c->phase = 1;
    }
    for (int r = 0; r < c->world; r++) {
        if (r == c->me) continue;
        int st = wait_for(c, r, s);
        if (st != EM_OK) { c->ns += (uint64_t)(now_us() - t0) * 1000; return st; }
    }
    const float *p0 = slot_of(c, buf, 0);
    memcpy(sum, p0, (size_t)n * 4);
    for (int r = 1; r < c->world; r++) { /* rank order, as the socket paths add */
        const float *p = slot_of(c, buf, r);
        for (int i = 0; i < n; i++) sum[i] += p[i];
    }
    c->phase = 0;
    c->seq++;
    c->ops++;
    c->ns += (uint64_t)(now_us() - t0) * 1000;
    return EM_OK;
}

void *edgemesh_shm_allreduce_fn(void) { return (void *)edgemesh_shm_allreduce; }
