/* The load generator's hot roles in C: sink, source, echo and rr.
 *
 * Same command line, stdout protocol and JSON results as sockmap.bench.endpoint
 * (the Python one), so the harness runs either. A benchmark tool, not part of the
 * sockmap library: the harness builds it with the system's C compiler on first use
 * and falls back to the Python endpoint when there is none. Python reached only
 * 0.52x iperf3 on a stream and 0.73-0.82x sockperf's round trips on the direct path
 * (docs/benchmarks.md, calibration); this reaches them, so no path's figure is
 * capped by the load generator.
 *
 * Integrity: the source writes blocks of --block bytes, each a fixed body (the
 * same pseudo-random bytes for every block) whose first 8 bytes are replaced by the
 * block's index on its connection (little-endian); the sink checks every byte
 * against that. rr stamps the round trip's number into each request (when it has 8
 * bytes or more) and checks every echoed byte.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct {
    const char *role;
    long long bytes;
    int conns;
    int port;
    long block;
    long count;
    const char *cpus;
    double stall;
} opt = {.conns = 1, .block = 65536, .count = 10000};

static unsigned char *body; /* --block bytes of the pattern */

static void die(const char *what) {
    fprintf(stderr, "fastend %s: %s: %s\n", opt.role ? opt.role : "", what, strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void make_body(long n) {
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    body = malloc((size_t)(n < 8 ? 8 : n));
    if (!body) die("malloc");
    for (long i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        body[i] = (unsigned char)x;
    }
}

static void pin(void) {
    if (!opt.cpus) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    char *copy = strdup(opt.cpus), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
        CPU_SET(atoi(tok), &set);
    free(copy);
    if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity");
}

static int listener(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (s < 0) die("socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, opt.conns < 4096 ? opt.conns : 4096))
        die("bind/listen");
    if (getsockname(s, (struct sockaddr *)&a, &len)) die("getsockname");
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    return s;
}

static int dial(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (s < 0) die("socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
    return s;
}

static void nodelay(int s) {
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void wait_go(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) exit(0);
}

static int write_all(int s, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(s, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---------------------------------------------------------------- source / sink */

struct conn {
    int fd;
    long long got;
    long long bad_at; /* first byte offset that did not match, or -1 */
    double first;
    long long trips;
    double *lat;
};

static void *pump(void *arg) {
    struct conn *c = arg;
    unsigned char *block = malloc((size_t)opt.block);
    if (!block) die("malloc");
    memcpy(block, body, (size_t)opt.block);
    long long left = opt.bytes;
    for (uint64_t i = 0; left > 0; i++) {
        size_t n = left < opt.block ? (size_t)left : (size_t)opt.block;
        if (opt.block >= 8) memcpy(block, &i, 8);
        if (write_all(c->fd, block, n)) die("send");
        left -= (long long)n;
    }
    shutdown(c->fd, SHUT_WR);
    free(block);
    return NULL;
}

/* Check ``n`` bytes at stream offset ``off`` against the source's pattern. */
static long long check(const unsigned char *p, size_t n, long long off) {
    size_t done = 0;
    while (done < n) {
        long long o = off + (long long)done;
        long in = (long)(o % opt.block);
        size_t run = (size_t)(opt.block - in);
        if (run > n - done) run = n - done;
        long k = in;
        const unsigned char *q = p + done;
        size_t r = run;
        if (k < 8 && opt.block >= 8) { /* the block's index */
            uint64_t idx = (uint64_t)(o / opt.block);
            const unsigned char *stamp = (const unsigned char *)&idx;
            while (k < 8 && r) {
                if (*q != stamp[k]) return o + (q - (p + done));
                q++; k++; r--;
            }
        }
        if (r && memcmp(q, body + k, r)) {
            for (size_t j = 0; j < r; j++)
                if (q[j] != body[k + (long)j]) return o + (long long)(q - (p + done)) + (long long)j;
        }
        done += run;
    }
    return -1;
}

static void *drain(void *arg) {
    struct conn *c = arg;
    size_t cap = 65536; /* what iperf3 reads with -l 64K: fits the caches */
    unsigned char *buf = malloc(cap);
    if (!buf) die("malloc");
    c->bad_at = -1;
    while (c->got < opt.bytes) {
        ssize_t n = recv(c->fd, buf, cap, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (n == 0) break;
        if (c->first == 0) c->first = now();
        if (c->bad_at < 0) {
            long long bad = check(buf, (size_t)n, c->got);
            if (bad >= 0) c->bad_at = bad;
        }
        c->got += n;
    }
    close(c->fd);
    free(buf);
    return NULL;
}

static int run_threads(struct conn *cs, void *(*fn)(void *)) {
    pthread_t *t = calloc((size_t)opt.conns, sizeof *t);
    if (!t) die("calloc");
    for (int i = 0; i < opt.conns; i++)
        if (pthread_create(&t[i], NULL, fn, &cs[i])) die("pthread_create");
    for (int i = 0; i < opt.conns; i++) pthread_join(t[i], NULL);
    free(t);
    return 0;
}

static int sink(void) {
    int srv = listener();
    struct conn *cs = calloc((size_t)opt.conns, sizeof *cs);
    if (!cs) die("calloc");
    for (int i = 0; i < opt.conns; i++)
        if ((cs[i].fd = accept(srv, NULL, NULL)) < 0) die("accept");
    close(srv);
    if (opt.stall > 0) usleep((useconds_t)(opt.stall * 1e6));
    run_threads(cs, drain);
    double first = 0, end = now();
    long long total = 0, bad = -1;
    for (int i = 0; i < opt.conns; i++) {
        total += cs[i].got;
        if (cs[i].first && (first == 0 || cs[i].first < first)) first = cs[i].first;
        if (cs[i].bad_at >= 0 && bad < 0) bad = cs[i].bad_at;
    }
    printf("{\"bytes\": %lld, \"seconds\": %.9f, \"corrupt_at\": %lld}\n", total,
           first ? end - first : 0.0, bad);
    return 0;
}

static int source(void) {
    struct conn *cs = calloc((size_t)opt.conns, sizeof *cs);
    if (!cs) die("calloc");
    for (int i = 0; i < opt.conns; i++) cs[i].fd = dial();
    wait_go();
    double t0 = now();
    run_threads(cs, pump);
    double dt = now() - t0;
    for (int i = 0; i < opt.conns; i++) close(cs[i].fd);
    printf("{\"bytes\": %lld, \"seconds\": %.9f}\n", opt.bytes * opt.conns, dt);
    return 0;
}

/* ---------------------------------------------------------------- echo / rr */

static long long echoed;
static pthread_mutex_t echo_lock = PTHREAD_MUTEX_INITIALIZER;

static void *serve(void *arg) {
    struct conn *c = arg;
    unsigned char buf[65536];
    long long mine = 0;
    nodelay(c->fd);
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (write_all(c->fd, buf, (size_t)n)) break;
        mine += n;
    }
    close(c->fd);
    pthread_mutex_lock(&echo_lock);
    echoed += mine;
    pthread_mutex_unlock(&echo_lock);
    return NULL;
}

static int echo(void) {
    int srv = listener();
    struct conn *cs = calloc((size_t)opt.conns, sizeof *cs);
    pthread_t *t = calloc((size_t)opt.conns, sizeof *t);
    if (!cs || !t) die("calloc");
    for (int i = 0; i < opt.conns; i++) { /* serve each as soon as it is accepted */
        if ((cs[i].fd = accept(srv, NULL, NULL)) < 0) die("accept");
        if (pthread_create(&t[i], NULL, serve, &cs[i])) die("pthread_create");
    }
    close(srv);
    for (int i = 0; i < opt.conns; i++) pthread_join(t[i], NULL);
    printf("{\"bytes\": %lld, \"seconds\": 0.0}\n", echoed);
    return 0;
}

static void *trips(void *arg) {
    struct conn *c = arg;
    size_t n = (size_t)opt.block;
    unsigned char *msg = malloc(n), *got = malloc(n);
    if (!msg || !got) die("malloc");
    memcpy(msg, body, n);
    nodelay(c->fd);
    for (long i = 0; i < opt.count; i++) {
        if (n >= 8) memcpy(msg, &i, 8);
        double t0 = now();
        if (write_all(c->fd, msg, n)) die("send");
        size_t have = 0;
        while (have < n) {
            ssize_t r = recv(c->fd, got + have, n - have, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                fprintf(stderr, "fastend rr: the peer closed during a round trip\n");
                exit(1);
            }
            have += (size_t)r;
        }
        c->lat[i] = now() - t0;
        if (memcmp(msg, got, n)) {
            fprintf(stderr, "fastend rr: round trip %ld came back different\n", i);
            exit(1);
        }
        c->trips++;
    }
    shutdown(c->fd, SHUT_WR);
    free(msg);
    free(got);
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int rr(void) {
    struct conn *cs = calloc((size_t)opt.conns, sizeof *cs);
    double *lat = calloc((size_t)opt.conns * (size_t)opt.count, sizeof *lat);
    if (!cs || !lat) die("calloc");
    for (int i = 0; i < opt.conns; i++) {
        cs[i].fd = dial();
        cs[i].lat = lat + (size_t)i * (size_t)opt.count;
    }
    wait_go();
    double t0 = now();
    run_threads(cs, trips);
    double dt = now() - t0;
    long long total = 0;
    for (int i = 0; i < opt.conns; i++) {
        total += cs[i].trips;
        close(cs[i].fd);
    }
    qsort(lat, (size_t)total, sizeof *lat, cmp);
#define PCT(q) (lat[(size_t)((q) * (double)total) < (size_t)total ? (size_t)((q) * (double)total) : (size_t)total - 1] * 1e6)
    printf("{\"round_trips\": %lld, \"seconds\": %.9f, \"p50_us\": %.3f, \"p99_us\": %.3f, "
           "\"p999_us\": %.3f}\n",
           total, dt, PCT(0.50), PCT(0.99), PCT(0.999));
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: fastend sink|source|echo|rr [--bytes N] [--conns N] [--port P] "
                        "[--block N] [--count N] [--cpus LIST] [--stall S]\n");
        return 2;
    }
    opt.role = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--bytes")) opt.bytes = atoll(v);
        else if (!strcmp(k, "--conns")) opt.conns = atoi(v);
        else if (!strcmp(k, "--port")) opt.port = atoi(v);
        else if (!strcmp(k, "--block")) opt.block = atol(v);
        else if (!strcmp(k, "--count")) opt.count = atol(v);
        else if (!strcmp(k, "--cpus")) opt.cpus = v;
        else if (!strcmp(k, "--stall")) opt.stall = atof(v);
        else {
            fprintf(stderr, "fastend: unknown option %s\n", k);
            return 2;
        }
    }
    if (opt.block < 1 || opt.conns < 1) {
        fprintf(stderr, "fastend: --block and --conns must be positive\n");
        return 2;
    }
    pin();
    make_body(opt.block);
    if (!strcmp(opt.role, "sink")) return sink();
    if (!strcmp(opt.role, "source")) return source();
    if (!strcmp(opt.role, "echo")) return echo();
    if (!strcmp(opt.role, "rr")) return rr();
    fprintf(stderr, "fastend: unknown role %s\n", opt.role);
    return 2;
}
