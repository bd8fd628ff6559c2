/*
 * redisclient - a Redis client that keeps ONE TCP connection for its whole
 * run (it never reconnects: a lost connection is a failure), writes keys
 * with known values and reads them back, and records what it wrote.
 *
 * It connects to --host:--port (retrying for up to 10 s while the server
 * starts), then for --seconds runs a loop: SET key:K to a value derived
 * from (K, version), and every --get-every'th op a GET of an earlier key
 * whose reply must be the value it recorded. Every --report-ms it prints
 * "t_ms=T ops=N" (ops completed in that interval). At the end it checks
 * the whole key space against its record: DBSIZE must be the number of
 * keys it wrote and a full SCAN must give exactly those keys, each with
 * its recorded value; then, with --shutdown, it sends SHUTDOWN NOSAVE.
 * Last line: "ops=N keys=K verified" (exit 0), else a message (exit 1).
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEYS_MAX 100000

static int fd = -1;
static char in[1 << 16];
static size_t in_len, in_pos;
static uint32_t version[KEYS_MAX];

static void lost(const char *what)
{
    fprintf(stdout, "connection lost: %s (%s)\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static void send_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            lost("send");
        p += w;
        n -= (size_t)w;
    }
}

static int next_byte(void)
{
    if (in_pos == in_len) {
        ssize_t r;
        do
            r = recv(fd, in, sizeof in, 0);
        while (r < 0 && errno == EINTR);
        if (r <= 0)
            lost(r == 0 ? "the server closed it" : "recv");
        in_len = (size_t)r;
        in_pos = 0;
    }
    return (unsigned char)in[in_pos++];
}

/* One reply line without its CRLF. */
static void read_line(char *line, size_t size)
{
    size_t n = 0;
    for (;;) {
        int c = next_byte();
        if (c == '\r') {
            if (next_byte() != '\n')
                tp_selfcheck_fail("malformed reply");
            break;
        }
        if (n + 1 < size)
            line[n++] = (char)c;
    }
    line[n] = '\0';
}

/* A bulk string reply into out (NUL-terminated); returns its length, -1 for nil. */
static long read_bulk(char *out, size_t size)
{
    char line[64];
    read_line(line, sizeof line);
    if (line[0] != '$')
        tp_selfcheck_fail("expected a bulk reply, got '%s'", line);
    long n = atol(line + 1);
    if (n < 0)
        return -1;
    if ((size_t)n + 1 > size)
        tp_selfcheck_fail("a reply of %ld bytes is too long", n);
    for (long i = 0; i < n; i++)
        out[i] = (char)next_byte();
    out[n] = '\0';
    if (next_byte() != '\r' || next_byte() != '\n')
        tp_selfcheck_fail("malformed bulk reply");
    return n;
}

static void command(int argc, const char **argv)
{
    char buffer[512];
    int n = snprintf(buffer, sizeof buffer, "*%d\r\n", argc);
    for (int i = 0; i < argc; i++)
        n += snprintf(buffer + n, sizeof buffer - (size_t)n, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    send_all(buffer, (size_t)n);
}

static void value_of(unsigned key, uint32_t v, char *out, size_t size)
{
    snprintf(out, size, "v%u-%u-%016llx", key, v, (unsigned long long)tp_mix64(((uint64_t)key << 32) | v));
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
    unsigned long long port = 6379, seconds = 3, keys = 2000, get_every = 4, report_ms = 100, shutdown_server = 0;
    const char *host = "127.0.0.1";
    struct tp_opt opts[] = {
        { "port", &port, 1, 65535, "server port" },
        { "seconds", &seconds, 1, 3600, "how long to load the server" },
        { "keys", &keys, 1, KEYS_MAX, "distinct keys" },
        { "get-every", &get_every, 1, 1000, "every N-th op is a GET of a written key" },
        { "report-ms", &report_ms, 10, 60000, "interval of the ops lines" },
        { "shutdown", &shutdown_server, 0, 1, "send SHUTDOWN NOSAVE at the end" },
    };
    struct tp_stropt sopts[] = { { "host", &host, NULL, "server IPv4 address" } };
    tp_parse_args_with_strings(argc, argv, "Loads a Redis server over one TCP connection and checks every key against its record.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));
    struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1)
        tp_usage_error("--host %s is not an IPv4 address", host);
    for (int attempt = 0;; attempt++) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            tp_syserr("socket");
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0)
            break;
        close(fd);
        if (attempt >= 1000)
            tp_syserr("connect(%s:%llu)", host, port);
        tp_nanosleep_ns(10 * 1000000ULL);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t state = 0x5eed, ops = 0, interval_ops = 0, written = 0;
    char key[32], value[64], reply[128];
    double start = now_ms(), last_report = start, longest_gap = 0, last_op = start;
    while (now_ms() - start < (double)seconds * 1000) {
        unsigned k;
        if (written > 0 && ops % get_every == get_every - 1) {
            do
                k = (unsigned)tp_rand_below(&state, keys);
            while (version[k] == 0);
            snprintf(key, sizeof key, "key:%u", k);
            const char *get[] = { "GET", key };
            command(2, get);
            value_of(k, version[k], value, sizeof value);
            if (read_bulk(reply, sizeof reply) < 0 || strcmp(reply, value) != 0)
                tp_selfcheck_fail("GET %s gave '%s', the record says '%s'", key, reply, value);
        } else {
            k = (unsigned)tp_rand_below(&state, keys);
            if (version[k] == 0)
                written++;
            version[k]++;
            snprintf(key, sizeof key, "key:%u", k);
            value_of(k, version[k], value, sizeof value);
            const char *set[] = { "SET", key, value };
            command(3, set);
            read_line(reply, sizeof reply);
            if (strcmp(reply, "+OK") != 0)
                tp_selfcheck_fail("SET %s answered '%s'", key, reply);
        }
        ops++;
        interval_ops++;
        double t = now_ms();
        if (t - last_op > longest_gap)
            longest_gap = t - last_op;
        last_op = t;
        if (t - last_report >= (double)report_ms) {
            printf("t_ms=%.0f ops=%llu\n", t - start, (unsigned long long)interval_ops);
            fflush(stdout);
            interval_ops = 0;
            last_report = t;
        }
    }
    /* The whole key space against the record. */
    const char *dbsize[] = { "DBSIZE" };
    command(1, dbsize);
    read_line(reply, sizeof reply);
    if (reply[0] != ':' || strtoull(reply + 1, NULL, 10) != written)
        tp_selfcheck_fail("DBSIZE says '%s', the record holds %llu keys", reply, (unsigned long long)written);
    static unsigned char seen[KEYS_MAX];
    uint64_t scanned = 0;
    char cursor[32] = "0";
    do {
        const char *scan[] = { "SCAN", cursor, "COUNT", "1000" };
        command(4, scan);
        read_line(reply, sizeof reply);
        if (strcmp(reply, "*2") != 0)
            tp_selfcheck_fail("SCAN answered '%s'", reply);
        if (read_bulk(cursor, sizeof cursor) < 0)
            tp_selfcheck_fail("SCAN gave no cursor");
        read_line(reply, sizeof reply);
        long count = atol(reply + 1);
        for (long i = 0; i < count; i++) {
            char name[64];
            read_bulk(name, sizeof name);
            unsigned k;
            if (sscanf(name, "key:%u", &k) != 1 || k >= keys || version[k] == 0)
                tp_selfcheck_fail("SCAN found '%s', which the client never wrote", name);
            if (!seen[k]) {
                seen[k] = 1;
                scanned++;
            }
        }
    } while (strcmp(cursor, "0") != 0);
    if (scanned != written)
        tp_selfcheck_fail("SCAN found %llu of the %llu keys written", (unsigned long long)scanned, (unsigned long long)written);
    for (unsigned k = 0; k < keys; k++) {
        if (version[k] == 0)
            continue;
        snprintf(key, sizeof key, "key:%u", k);
        const char *get[] = { "GET", key };
        command(2, get);
        value_of(k, version[k], value, sizeof value);
        if (read_bulk(reply, sizeof reply) < 0 || strcmp(reply, value) != 0)
            tp_selfcheck_fail("at the end GET %s gave '%s', the record says '%s'", key, reply, value);
    }
    printf("longest_gap_ms=%.1f\n", longest_gap);
    if (shutdown_server) {
        const char *shutdown_command[] = { "SHUTDOWN", "NOSAVE" };
        command(2, shutdown_command);
    }
    printf("ops=%llu keys=%llu verified\n", (unsigned long long)ops, (unsigned long long)written);
    fflush(stdout);
    return 0;
}
