/* The data plane of tcp_links.SecureLinks in C, over the same connections and the same TLS
 * sessions as the Python path: a decode step's small records (one out, the expected ones in),
 * and a prefill's ring allreduce (below: large records, fp32 or q8_0).
 *
 * Python keeps every decision. It hands in the connection's socket, its OpenSSL session (or
 * none for a plain link) and its read buffer, and the exact bytes it expects (record prefix and
 * envelope, known in full on both sides). These functions only move bytes:
 *   - a send gathers prefix, envelope and tensor into one buffer and writes it;
 *   - a receive reads each awaited record into that connection's read buffer, never past the
 *     record's end, and compares its head with the expected bytes as they arrive.
 * Whatever is not the plain case stops the call at once with the bytes read so far left in the
 * read buffer (`got`): the Python decoder takes them from there, so a different record, an abort,
 * a closed or tampered link end exactly as they do without this file. Nothing is consumed that
 * Python cannot see.
 *
 * OpenSSL is not linked: Python passes the addresses of the functions of the libssl its own ssl
 * module runs on, so one session is driven by one library. */

#define _GNU_SOURCE /* clock_gettime, MSG_NOSIGNAL under -std=c11 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

enum { EM_OK = 0, EM_OTHER = 1, EM_TIMEOUT = 2, EM_IO = 3, EM_BLOCKED = 4, EM_EOF = 5, EM_ELSEWHERE = 6 };
enum { SSL_ERROR_WANT_READ = 2, SSL_ERROR_WANT_WRITE = 3 };
#define EM_MAX_LINKS 64

typedef struct {
    void *ssl;            /* SSL*, NULL for a plain socket */
    int fd;
    int got;              /* bytes of the awaited record now in rbuf */
    uint8_t *rbuf;        /* the connection's read buffer (at least the record's size) */
    int err;              /* on EM_IO: SSL_get_error's code, or 0 for a socket error */
    int sent;             /* on a send that stopped: bytes of the record already taken */
    uint8_t *wbuf;        /* the connection's send scratch (at least the record's size) */
    unsigned long detail; /* on EM_IO: ERR_peek_last_error() or errno */
} em_link;

typedef int (*ssl_io_fn)(void *, void *, int);
typedef int (*ssl_err_fn)(const void *, int);
typedef void (*err_clear_fn)(void);
typedef unsigned long (*err_peek_fn)(void);

static ssl_io_fn ssl_read, ssl_write;
static ssl_err_fn ssl_get_error;
static err_clear_fn err_clear;
static err_peek_fn err_peek;

int edgemesh_links_tls(void *read, void *write, void *get_error, void *clear, void *peek) {
    ssl_read = (ssl_io_fn)read;
    ssl_write = (ssl_io_fn)write;
    ssl_get_error = (ssl_err_fn)get_error;
    err_clear = (err_clear_fn)clear;
    err_peek = (err_peek_fn)peek;
    return 0;
}

static int64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* One read: > 0 bytes, 0 nothing now, -EM_EOF or -EM_IO (details in l). */
static int read_some(em_link *l, uint8_t *p, int n) {
    if (!l->ssl) {
        for (;;) {
            ssize_t k = recv(l->fd, p, (size_t)n, 0);
            if (k > 0) return (int)k;
            if (k == 0) return -EM_EOF;
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            l->err = 0;
            l->detail = (unsigned long)errno;
            return -EM_IO;
        }
    }
    err_clear();
    int k = ssl_read(l->ssl, p, n);
    if (k > 0) return k;
    int e = ssl_get_error(l->ssl, k);
    if (e == SSL_ERROR_WANT_READ) return 0;
    if (e == SSL_ERROR_WANT_WRITE) return -EM_BLOCKED; /* TLS must write first: Python's read waits; the ring polls */
    l->err = e;
    l->detail = err_peek();
    if (e == 0) l->detail = (unsigned long)errno;
    return -EM_IO;
}

/* Read l's record up to `total` bytes, checking its first `elen` bytes against `expect`.
 * 1: complete; 0: waiting for bytes; < 0: -status. */
static int pull(em_link *l, const uint8_t *expect, int elen, int total) {
    while (l->got < total) {
        int k = read_some(l, l->rbuf + l->got, total - l->got);
        if (k <= 0) return k;
        int lo = l->got, hi = l->got + k < elen ? l->got + k : elen;
        l->got += k;
        if (lo < hi && memcmp(l->rbuf + lo, expect + lo, (size_t)(hi - lo)) != 0) return -EM_OTHER;
    }
    return 1;
}

/* The next record of each of the k links: link i's must start with expect[i*elen .. +elen) and
 * be `total` bytes long. Waits up to timeout_ms for all of them, reading whichever is ready.
 * EM_OK: every record is whole in its rbuf. Otherwise the status of link *which, and each link's
 * `got` says how much of its record its rbuf holds. */
int edgemesh_links_recv(em_link *links, int k, const uint8_t *expect, int elen, int total,
                        int timeout_ms, int spin_us, int *which) {
    if (k < 1 || k > EM_MAX_LINKS) return EM_OTHER;
    for (int i = 0; i < k; i++) links[i].got = 0;
    if (elen > total) return EM_OTHER;
    struct pollfd pf[EM_MAX_LINKS];
    int idx[EM_MAX_LINKS];
    uint8_t done[EM_MAX_LINKS] = {0};
    int left = k;
    int64_t deadline = now_ms() + timeout_ms;
    int64_t spin_until = now_us() + spin_us;
    for (int i = 0; i < k; i++) idx[i] = i; /* first pass: whatever is already there */
    int ready = k;
    for (;;) {
        for (int j = 0; j < ready; j++) {
            int i = idx[j];
            int r = pull(&links[i], expect + (size_t)i * elen, elen, total);
            if (r < 0) {
                *which = i;
                return -r;
            }
            if (r == 1) {
                done[i] = 1;
                left--;
            }
        }
        if (left == 0) return EM_OK;
        if (spin_us > 0 && now_us() < spin_until) {
            /* Waiting briefly without sleeping: the sender then need not wake us (in a VM that
             * wake-up is an interrupt to another CPU, tens of microseconds). Yielding lets a
             * rank that shares this core run meanwhile. */
            sched_yield();
            for (int i = 0; i < k; i++) idx[i] = i;
            ready = 0;
            for (int i = 0; i < k; i++)
                if (!done[i]) idx[ready++] = i;
            continue;
        }
        int n = 0;
        for (int i = 0; i < k; i++) {
            if (!done[i]) {
                pf[n].fd = links[i].fd;
                pf[n].events = POLLIN | POLLPRI;
                pf[n].revents = 0;
                idx[n++] = i;
            }
        }
        int64_t wait = deadline - now_ms();
        if (wait <= 0) {
            *which = idx[0];
            return EM_TIMEOUT;
        }
        int r = poll(pf, (nfds_t)n, (int)wait);
        if (r < 0) {
            *which = idx[0];
            if (errno == EINTR) return EM_OTHER; /* a signal: Python handles it, then goes on */
            links[idx[0]].err = 0;
            links[idx[0]].detail = (unsigned long)errno;
            return EM_IO;
        }
        ready = 0;
        for (int j = 0; j < n && r > 0; j++)
            if (pf[j].revents) idx[ready++] = idx[j];
    }
}

/* One record (head = prefix and envelope, then n bytes of data), gathered into l->wbuf and
 * written. EM_BLOCKED: the socket is full after l->sent bytes; the caller writes the rest of
 * wbuf[0 .. hl+n) from there (TLS needs the same bytes again). */
/* One write: > 0 bytes taken, 0 the socket is full (*want_read: TLS must read first), or
 * -EM_IO (details in l). TLS without partial writes takes all of it or must be called again
 * with the same bytes. */
static int write_some(em_link *l, const uint8_t *p, int n, int *want_read) {
    *want_read = 0;
    if (l->ssl) {
        err_clear();
        int k = ssl_write(l->ssl, (void *)p, n);
        if (k > 0) return k;
        int e = ssl_get_error(l->ssl, k);
        if (e == SSL_ERROR_WANT_WRITE) return 0;
        if (e == SSL_ERROR_WANT_READ) {
            *want_read = 1;
            return 0;
        }
        l->err = e;
        l->detail = e == 0 ? (unsigned long)errno : err_peek();
        return -EM_IO;
    }
    for (;;) {
        ssize_t s = send(l->fd, p, (size_t)n, MSG_NOSIGNAL);
        if (s >= 0) return (int)s;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        l->err = 0;
        l->detail = (unsigned long)errno;
        return -EM_IO;
    }
}

int edgemesh_links_send(em_link *l, const uint8_t *head, int hl, const void *data, int n) {
    uint8_t *out = l->wbuf;
    memcpy(out, head, (size_t)hl);
    memcpy(out + hl, data, (size_t)n);
    int total = hl + n, off = 0, want_read = 0;
    l->sent = 0;
    while (off < total) {
        int k = write_some(l, out + off, total - off, &want_read);
        if (k <= 0) {
            l->sent = off;
            return k == 0 ? EM_BLOCKED : -k;
        }
        off += k;
    }
    l->sent = total;
    return EM_OK;
}

/* The hub's side of a one-piece float32 star allreduce: the k workers' records (expected bytes
 * as in edgemesh_links_recv), their tensors added into acc[0..n) in link order, then acc sent to
 * each with record head `head` (hl bytes). *phase: 0 = failed while receiving (nothing summed,
 * every byte read is in the rbufs), 1 = failed sending to link *which (those before it have
 * the result). */
int edgemesh_star_hub(em_link *links, int k, const uint8_t *expect, int elen, int total, float *acc,
                      int n, const uint8_t *head, int hl, int timeout_ms, int spin_us, int *which, int *phase) {
    *phase = 0;
    int st = edgemesh_links_recv(links, k, expect, elen, total, timeout_ms, spin_us, which);
    if (st != EM_OK) return st;
    for (int i = 0; i < k; i++) {
        const uint8_t *src = links[i].rbuf + elen;
        for (int j = 0; j < n; j++) {
            float v;
            memcpy(&v, src + (size_t)j * 4, 4);
            acc[j] += v;
        }
    }
    *phase = 1;
    for (int i = 0; i < k; i++) {
        st = edgemesh_links_send(&links[i], head, hl, acc, n * 4);
        if (st != EM_OK) {
            *which = i;
            return st;
        }
    }
    return EM_OK;
}

/* A worker's side: `mine` sent to the hub with record head `head`, then the hub's record (the
 * expected `elen` bytes, then n floats) read, and its tensor copied to out. *phase as above:
 * 1 = the send failed, 0 = the receive failed (the send is done). */
int edgemesh_star_worker(em_link *hub, const uint8_t *head, int hl, const float *mine, int n,
                         const uint8_t *expect, int elen, float *out, int timeout_ms, int spin_us, int *phase) {
    *phase = 1;
    int st = edgemesh_links_send(hub, head, hl, mine, n * 4);
    if (st != EM_OK) return st;
    *phase = 0;
    int which = 0;
    st = edgemesh_links_recv(hub, 1, expect, elen, elen + n * 4, timeout_ms, spin_us, &which);
    if (st == EM_OK) memcpy(out, hub->rbuf + elen, (size_t)n * 4);
    return st;
}

/* One rank's side of a direct (all-to-all) float32 allreduce over k+1 ranks: `mine` sent to each
 * of the k others (links in rank order, this rank's place is `me`), then their k records read
 * (expected bytes as in edgemesh_links_recv), and out = the k+1 parts added in rank order from
 * rank 0's — the order, and so the bits, of the star's hub. *phase: 1 = a send stopped at link
 * *which (those before it are sent), 0 = the receive failed (every send is done). */
int edgemesh_direct(em_link *links, int k, int me, const uint8_t *head, int hl, const float *mine, int n,
                    const uint8_t *expect, int elen, float *out, int timeout_ms, int spin_us, int *which,
                    int *phase) {
    *phase = 1;
    for (int i = 0; i < k; i++) {
        int st = edgemesh_links_send(&links[i], head, hl, mine, n * 4);
        if (st != EM_OK) {
            *which = i;
            return st;
        }
    }
    *phase = 0;
    int st = edgemesh_links_recv(links, k, expect, elen, elen + n * 4, timeout_ms, spin_us, which);
    if (st != EM_OK) return st;
    for (int r = 0; r <= k; r++) {
        const uint8_t *src = r == me ? (const uint8_t *)mine : links[r < me ? r : r - 1].rbuf + elen;
        if (r == 0) {
            memcpy(out, src, (size_t)n * 4);
            continue;
        }
        for (int j = 0; j < n; j++) {
            float v;
            memcpy(&v, src + (size_t)j * 4, 4);
            out[j] += v;
        }
    }
    return EM_OK;
}

/* ---- the direct allreduce as a callback, for the native decode loop (kernels/int8_gemv.c) ----
 * One context per group and vector size. Every op builds its envelopes from templates: each is
 * the same msgpack array as Python's ``op.part_header`` (pre + the op's sequence number + the
 * sender's tail), with the record prefix in front. An op that does not finish natively stops
 * the loop with status, phase and link in the context; Python finishes that op (sequence
 * number `seq`) and takes the loop's later ops from there. */

#define EM_TAIL_MAX 64
#define EM_PRE_MAX 32

typedef struct {
    em_link *links;       /* the other ranks, in rank order */
    int k, me;            /* k others; this rank's place in rank order */
    int n;                /* floats per op */
    int timeout_ms, spin_us;
    uint64_t seq;         /* the sequence number of the next op */
    uint64_t ops, bytes;  /* ops done here; payload bytes sent (= received) by them */
    uint64_t ns;          /* time spent in the ops (sending, waiting, receiving, adding) */
    int status, phase, which;
    int pre_len, tail_len;
    uint8_t pre[EM_PRE_MAX];
    uint8_t tails[(EM_MAX_LINKS + 1) * EM_TAIL_MAX]; /* rank r's at r * EM_TAIL_MAX */
    uint8_t head[16 + EM_PRE_MAX + 9 + EM_TAIL_MAX];
    uint8_t expect[EM_MAX_LINKS * (16 + EM_PRE_MAX + 9 + EM_TAIL_MAX)];
} em_direct_ctx;

int edgemesh_direct_ctx_size(void) { return (int)sizeof(em_direct_ctx); }

static int pack_uint(uint8_t *p, uint64_t v) { /* msgpack's shortest form, as msgpack.packb */
    if (v < 128) { p[0] = (uint8_t)v; return 1; }
    int nb = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffu ? 4 : 8;
    p[0] = nb == 1 ? 0xcc : nb == 2 ? 0xcd : nb == 4 ? 0xce : 0xcf;
    for (int i = 0; i < nb; i++) p[1 + i] = (uint8_t)(v >> (8 * (nb - 1 - i)));
    return 1 + nb;
}

static int put_record_head(uint8_t *p, const em_direct_ctx *c, const uint8_t *seq, int sl, int rank) {
    uint32_t elen = (uint32_t)(c->pre_len + sl + c->tail_len), data = (uint32_t)c->n * 4, body = elen + data;
    uint8_t *q = p;
    memcpy(q, &body, 4); q[4] = 0; q[5] = 2; q[6] = q[7] = 0; memcpy(q + 8, &elen, 4); memcpy(q + 12, &data, 4);
    q += 16;
    memcpy(q, c->pre, (size_t)c->pre_len); q += c->pre_len;
    memcpy(q, seq, (size_t)sl); q += sl;
    memcpy(q, c->tails + (size_t)rank * EM_TAIL_MAX, (size_t)c->tail_len); q += c->tail_len;
    return (int)(q - p);
}

/* em_allreduce_fn: sum = the rank-order sum of every rank's `part`. 0: done; 1: stopped (see above). */
static int direct_step(em_direct_ctx *c, const float *part, float *sum, int n);

int edgemesh_direct_step(void *vctx, const float *part, float *sum, int n) {
    em_direct_ctx *c = vctx;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    int rc = direct_step(c, part, sum, n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    c->ns += (uint64_t)((int64_t)(b.tv_sec - a.tv_sec) * 1000000000 + (b.tv_nsec - a.tv_nsec));
    return rc;
}

static int direct_step(em_direct_ctx *c, const float *part, float *sum, int n) {
    if (n != c->n) {
        c->status = EM_OTHER; c->phase = 2; c->which = 0;
        return 1;
    }
    uint8_t seq[9];
    int sl = pack_uint(seq, c->seq);
    int hl = put_record_head(c->head, c, seq, sl, c->me), el = 0;
    for (int i = 0; i < c->k; i++)
        el = put_record_head(c->expect + (size_t)i * hl, c, seq, sl, i < c->me ? i : i + 1);
    (void)el;
    int which = 0, phase = 0;
    int st = edgemesh_direct(c->links, c->k, c->me, c->head, hl, part, n, c->expect, hl, sum, c->timeout_ms,
                             c->spin_us, &which, &phase);
    if (st == EM_OK) {
        c->seq++;
        c->ops++;
        c->bytes += (uint64_t)c->k * (uint64_t)(hl - 16 + n * 4);
        return 0;
    }
    c->status = st; c->phase = phase; c->which = which;
    return 1;
}

void *edgemesh_direct_step_fn(void) { return (void *)edgemesh_direct_step; }

/* ---- the ring allreduce of a prefill's partial sums (fp32, or the q8_0 wire) ----
 * One C call runs a whole op: its 2(W-1) steps, each sending one record to the next rank while
 * receiving one from the previous, so neither direction waits for the other and the GIL is free
 * for the compute thread the whole time. Python (ring.py, tcp_links.ring_native) plans every
 * step: which part of `acc` goes out with which record head, and which record heads may come in
 * before the data is added into (reduce-scatter) or copied over (allgather) a part of `acc`. The
 * records are byte for byte those of the Python ring, so a rank running it talks to one that
 * does not. On the q8_0 wire a part that q8_0 cannot carry (a value not finite, or a block
 * scale over fp16's range) goes as fp32, as compress.encode does, so each step has two heads:
 * [0] fp32's and [1] q8_0's (length 0 on the fp32 wire). A record head that is neither stops the
 * op with its bytes left in the previous rank's read buffer (`got`) for the Python decoder (an
 * abort, or ranks out of step); the data is read into `rx`, never past the record's end. */

typedef struct {
    int send_off, send_cnt;   /* floats of acc sent */
    int send_mode;            /* 0: encode the part; 1: the same, then the part becomes what the
                                 receivers decode (the owner's result); 2: forward the record
                                 received in the previous step, unchanged */
    int send_hoff[2], send_hlen[2]; /* record heads in `heads`: [0] fp32, [1] q8_0 (0: none) */
    int recv_off, recv_cnt;   /* floats of acc received into */
    int recv_hoff[2], recv_hlen[2];
    int add;                  /* 1: acc part += received; 0: acc part = received */
} em_ring_step;

int edgemesh_ring_step_size(void) { return (int)sizeof(em_ring_step); }

/* Where a ring op stands between calls: a call that returns EM_ELSEWHERE (bytes arrived on
 * another link, for Python to take) is continued by calling again with the same state. */
typedef struct {
    int step;      /* the step under way */
    int started;   /* 0: step `step` has not begun (its counters are reset when it does) */
    int part, off; /* the send: part 0 = head, 1 = data; bytes of it out */
    int sdone, rdone, dgot;
    int svar, rvar;   /* variants of this step's send and receive (0 fp32, 1 q8_0; -1 not known) */
    int slen;         /* data bytes of this step's send */
    int prev_rvar, prev_rlen; /* the previous step's receive: what a forward sends */
    int rwant;        /* the receive's TLS session must write before it reads on (poll POLLOUT) */
    long long sent_payload, recv_payload; /* envelope and data bytes of the records done */
} em_ring_state;

int edgemesh_ring_state_size(void) { return (int)sizeof(em_ring_state); }

/* ---- q8_0, bit for bit as compress.q8_encode / q8_decode compute it with numpy ----
 * fp16 conversions by hand (round to nearest even), so no compiler flag or CPU feature enters. */

static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf (not reached) */
    if (ax < 0x38800000u) {                                    /* below 2^-14: a subnormal half */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)rintf(v * 16777216.0f)); /* exact scaling, then RNE */
    }
    uint32_t r = ax - 0x38000000u; /* rebias the exponent */
    r += 0xfffu + ((r >> 13) & 1u); /* round the 13 dropped mantissa bits to nearest even */
    return (uint16_t)(sign | (r >> 13));
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v;
    if (e == 0) {
        v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    uint32_t x = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    memcpy(&v, &x, 4);
    return v;
}

enum { Q8_BLOCK = 32 };

static int q8_bytes(int n) { return (n + Q8_BLOCK - 1) / Q8_BLOCK * (2 + Q8_BLOCK); }

/* n floats → the q8_0 frame (all fp16 scales, then all int8 codes, the last block zero padded).
 * 0: done; -1: not representable (the caller sends fp32). */
int edgemesh_q8_encode(const float *x, int n, uint8_t *out) {
    int blocks = (n + Q8_BLOCK - 1) / Q8_BLOCK;
    for (int b = 0; b < blocks; b++) {
        float amax = 0.0f;
        int hi = (b + 1) * Q8_BLOCK < n ? (b + 1) * Q8_BLOCK : n;
        for (int j = b * Q8_BLOCK; j < hi; j++) {
            float a = fabsf(x[j]);
            if (!isfinite(a)) return -1;
            if (a > amax) amax = a;
        }
        if ((double)amax / 127 > 65504.0) return -1;
        uint16_t s16 = f32_to_f16(amax / 127.0f);
        float scale = f16_to_f32(s16);
        float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        memcpy(out + 2 * b, &s16, 2);
        int8_t *codes = (int8_t *)(out + 2 * blocks + b * Q8_BLOCK);
        for (int j = 0; j < Q8_BLOCK; j++) {
            int k = b * Q8_BLOCK + j;
            float v = k < n ? rintf(x[k] * inv) : 0.0f;
            codes[j] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
        }
    }
    return 0;
}

/* The frame's n values into acc: added (add = 1) or copied. */
void edgemesh_q8_decode(const uint8_t *frame, int n, float *acc, int add) {
    int blocks = (n + Q8_BLOCK - 1) / Q8_BLOCK;
    const int8_t *codes = (const int8_t *)(frame + 2 * blocks);
    for (int b = 0; b < blocks; b++) {
        uint16_t s16;
        memcpy(&s16, frame + 2 * b, 2);
        float scale = f16_to_f32(s16);
        int hi = (b + 1) * Q8_BLOCK < n ? (b + 1) * Q8_BLOCK : n;
        for (int k = b * Q8_BLOCK; k < hi; k++) {
            float v = (float)codes[k] * scale;
            acc[k] = add ? acc[k] + v : v;
        }
    }
}

/* Write what the socket takes of part p (0 = head, 1 = data) from *off. 1: the record is all
 * out; 0: blocked (*want_read: TLS must read first); < 0: -status. l->sent counts bytes out. */
static int push(em_link *l, const uint8_t *const p[2], const int len[2], int *part, int *off, int *want_read) {
    while (*part < 2) {
        if (*off >= len[*part]) {
            (*part)++;
            *off = 0;
            continue;
        }
        int k = write_some(l, p[*part] + *off, len[*part] - *off, want_read);
        if (k <= 0) return k; /* `off` only moves on a positive return: TLS retries the same bytes */
        *off += k;
        l->sent += k;
    }
    *want_read = 0;
    return 1;
}

static void add_floats(float *restrict acc, const float *restrict src, int n) {
    for (int j = 0; j < n; j++) acc[j] += src[j];
}

enum { EM_PREFIX = 16 }; /* record prefix and both frame lengths: they tell the variants apart */

/* Read the awaited record of step st into l->rbuf (head, checked against the variant its prefix
 * names) and rx (data). 1: whole; 0: waiting; < 0: -status. */
static int pull_step_io(em_link *l, const em_ring_step *st, const uint8_t *heads, em_ring_state *rs, uint8_t *rx) {
    if (rs->rvar < 0) {
        int r = pull(l, heads, 0, EM_PREFIX);
        if (r <= 0) return r;
        for (int v = 1; v >= 0 && rs->rvar < 0; v--)
            if (st->recv_hlen[v] >= EM_PREFIX && memcmp(l->rbuf, heads + st->recv_hoff[v], EM_PREFIX) == 0)
                rs->rvar = v;
        if (rs->rvar < 0) return -EM_OTHER;
    }
    int v = rs->rvar, hlen = st->recv_hlen[v];
    if (l->got < hlen) {
        int r = pull(l, heads + st->recv_hoff[v], hlen, hlen);
        if (r <= 0) return r;
    }
    int n = v ? q8_bytes(st->recv_cnt) : st->recv_cnt * 4;
    while (rs->dgot < n) {
        int k = read_some(l, rx + rs->dgot, n - rs->dgot);
        if (k <= 0) return k;
        rs->dgot += k;
    }
    return 1;
}

/* The same, a TLS read that must write first turned into waiting (rs->rwant: poll for POLLOUT). */
static int pull_step(em_link *l, const em_ring_step *st, const uint8_t *heads, em_ring_state *rs, uint8_t *rx) {
    int r = pull_step_io(l, st, heads, rs, rx);
    rs->rwant = r == -EM_BLOCKED;
    return rs->rwant ? 0 : r;
}

/* The step's send: its variant, data and length (encoding the part if the wire is q8_0). */
static const uint8_t *send_data(const em_ring_step *st, em_ring_state *rs, float *acc, uint8_t *tx,
                                const uint8_t *prev_rx) {
    if (rs->svar >= 0) /* chosen earlier in this step */
        return st->send_mode == 2 ? prev_rx : rs->svar ? tx : (const uint8_t *)(acc + st->send_off);
    if (st->send_mode == 2) {
        rs->svar = rs->prev_rvar;
        rs->slen = rs->prev_rlen;
        return prev_rx;
    }
    float *part = acc + st->send_off;
    if (st->send_hlen[1] > 0 && edgemesh_q8_encode(part, st->send_cnt, tx) == 0) {
        rs->svar = 1;
        rs->slen = q8_bytes(st->send_cnt);
        if (st->send_mode == 1) edgemesh_q8_decode(tx, st->send_cnt, part, 0); /* keep what they get */
        return tx;
    }
    rs->svar = 0;
    rs->slen = st->send_cnt * 4;
    return (const uint8_t *)part;
}

/* One rank's ring allreduce: steps[0 .. nsteps) in order over links nx (to the next rank) and
 * pv (from the previous one), from where *rs stands; tx (an encoded part) and rx[0], rx[1] (the
 * records of alternate steps) are scratch space of the largest part's size. EM_OK: acc holds
 * the sum. EM_ELSEWHERE: one of the `others` descriptors (this rank's other links, and nx's for
 * reading) became readable, or a signal came: Python takes those bytes (an abort, a faster
 * rank's next message) or handles the signal, then calls again with the same state. Otherwise rs->step is where it stopped and *phase says
 * which side: 1 = the send to nx (nx->sent bytes of that record are out), 0 = the receive from
 * pv (pv->got bytes of its head are in its rbuf; only EM_OTHER leaves the head incomplete or
 * wrong, and then no data byte of it was read). */
int edgemesh_ring(em_link *nx, em_link *pv, float *acc, uint8_t *tx, uint8_t *rx0, uint8_t *rx1,
                  const em_ring_step *steps, int nsteps, const uint8_t *heads, const int *others, int nothers,
                  int timeout_ms, em_ring_state *rs, int *phase) {
    if (nothers < 0 || nothers > EM_MAX_LINKS) return EM_OTHER;
    int64_t deadline = now_ms() + timeout_ms;
    uint8_t *rx[2] = {rx0, rx1};
    for (; rs->step < nsteps; rs->step++, rs->started = 0) {
        const em_ring_step *st = &steps[rs->step];
        uint8_t *in = rx[rs->step & 1];
        if (!rs->started) {
            rs->started = 1;
            rs->part = rs->off = rs->sdone = rs->rdone = rs->dgot = 0;
            rs->rvar = rs->svar = -1;
            nx->sent = 0;
            pv->got = 0;
        }
        int want_read = 0;
        for (;;) {
            if (!rs->sdone) {
                /* Encoded once per step (svar < 0 until then); a call continuing the step finds
                 * the same bytes in tx, rx or acc. */
                const uint8_t *cur = send_data(st, rs, acc, tx, rx[(rs->step + 1) & 1]);
                const uint8_t *out[2];
                int olen[2];
                out[0] = heads + st->send_hoff[rs->svar];
                olen[0] = st->send_hlen[rs->svar];
                out[1] = cur;
                olen[1] = rs->slen;
                int r = push(nx, out, olen, &rs->part, &rs->off, &want_read);
                if (r < 0) {
                    *phase = 1;
                    return -r;
                }
                if (r == 1) rs->sent_payload += olen[0] - EM_PREFIX + rs->slen;
                rs->sdone = r;
            }
            if (!rs->rdone) {
                int r = pull_step(pv, st, heads, rs, in);
                if (r < 0) {
                    *phase = 0;
                    return -r;
                }
                rs->rdone = r;
            }
            if (rs->sdone && rs->rdone) break;
            struct pollfd pf[2 + EM_MAX_LINKS];
            int n = 0;
            if (!rs->sdone) {
                pf[n].fd = nx->fd;
                pf[n].events = (short)(want_read ? POLLIN : POLLOUT);
                pf[n++].revents = 0;
            }
            if (!rs->rdone) {
                pf[n].fd = pv->fd;
                pf[n].events = (short)(rs->rwant ? POLLOUT : POLLIN | POLLPRI);
                pf[n++].revents = 0;
            }
            int mine = n;
            for (int i = 0; i < nothers; i++) {
                pf[n].fd = others[i];
                pf[n].events = POLLIN | POLLPRI;
                pf[n++].revents = 0;
            }
            int64_t wait = deadline - now_ms();
            if (wait <= 0) {
                *phase = rs->sdone ? 0 : 1;
                return EM_TIMEOUT;
            }
            int r = poll(pf, (nfds_t)n, (int)wait);
            if (r < 0 && errno == EINTR) return EM_ELSEWHERE; /* a signal: Python handles it, then goes on */
            if (r < 0) {
                em_link *l = rs->sdone ? pv : nx;
                *phase = rs->sdone ? 0 : 1;
                l->err = 0;
                l->detail = (unsigned long)errno;
                return EM_IO;
            }
            for (int i = mine; i < n && r > 0; i++)
                if (pf[i].revents) return EM_ELSEWHERE;
        }
        int v = rs->rvar, cnt = st->recv_cnt;
        float *part = acc + st->recv_off;
        if (v == 1) {
            edgemesh_q8_decode(in, cnt, part, st->add);
        } else if (st->add) {
            add_floats(part, (const float *)in, cnt);
        } else {
            memcpy(part, in, (size_t)cnt * 4);
        }
        rs->recv_payload += st->recv_hlen[v] - EM_PREFIX + (v ? q8_bytes(cnt) : cnt * 4);
        rs->prev_rvar = v;
        rs->prev_rlen = v ? q8_bytes(cnt) : cnt * 4;
    }
    return EM_OK;
}
