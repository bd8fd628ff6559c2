/*
 * tcpsockets - holds TCP sockets on loopback and checks their kernel state
 * every round against its own model.
 *
 * --with takes a comma-separated list (default: all):
 *   listen4  a listener on 127.0.0.1 (kernel-chosen port, SO_REUSEADDR,
 *            backlog 7, blocking); each round a client connects to it, one
 *            byte goes each way, both close. Each round checks the bound
 *            address, SO_REUSEADDR, the backlog (TCP_INFO) and the flags.
 *   listen6  the same on [::1] with IPV6_V6ONLY, backlog 5, O_NONBLOCK
 *            (accepted with poll)
 *   conn4    an established connection over 127.0.0.1 whose two ends the
 *            program holds: each round 50 bytes go client->server and 40
 *            server->client, 30 and 25 are read, so bytes stay queued both
 *            ways; contents are checked byte by byte, FIONREAD may not
 *            exceed the model, TCP_NODELAY (client) and SO_KEEPALIVE
 *            (server) must stay set
 *   conn6    the same over [::1]
 *   pending  a listener on 127.0.0.1 with one connection it never accepts
 *            (not migratable: refused before the freeze)
 *   closewait a connection whose other end it closed: the end it keeps is in
 *            CLOSE_WAIT (not migratable: refused before the freeze)
 *   urgent   (not in the default) a connection with one urgent byte
 *            (MSG_OOB) sent and never read (refused before the freeze)
 *   fastopen (not in the default) a listener with TCP_FASTOPEN set
 *            (refused before the freeze)
 * Each round is one step (--rendezvous counts rounds); it prints one line
 * per round and pauses --pause-us. The checksum hashes only data the model
 * determines (no ports).
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int want(const char *list, const char *kind)
{
    size_t n = strlen(kind);
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && strncmp(p, kind, n) == 0)
            return 1;
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

struct listener {
    const char *name;
    int family, fd, backlog, nonblocking;
    struct sockaddr_storage address;
    socklen_t length;
};

static socklen_t loopback(int family, struct sockaddr_storage *address, uint16_t port)
{
    memset(address, 0, sizeof *address);
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)address;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return sizeof *a;
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)address;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    a->sin6_addr = in6addr_loopback;
    return sizeof *a;
}

static int option(int fd, int level, int name, const char *what)
{
    int value = 0;
    socklen_t length = sizeof value;
    if (getsockopt(fd, level, name, &value, &length) != 0)
        tp_syserr("getsockopt(%s)", what);
    return value;
}

static void set_option(int fd, int level, int name, int value, const char *what)
{
    if (setsockopt(fd, level, name, &value, sizeof value) != 0)
        tp_syserr("setsockopt(%s)", what);
}

static void make_listener(struct listener *l)
{
    l->fd = socket(l->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l->fd < 0)
        tp_syserr("socket(%s)", l->name);
    set_option(l->fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
    if (l->family == AF_INET6)
        set_option(l->fd, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
    struct sockaddr_storage address;
    socklen_t length = loopback(l->family, &address, 0);
    if (bind(l->fd, (struct sockaddr *)&address, length) != 0)
        tp_syserr("bind(%s)", l->name);
    if (listen(l->fd, l->backlog) != 0)
        tp_syserr("listen(%s)", l->name);
    if (l->nonblocking && fcntl(l->fd, F_SETFL, O_NONBLOCK) != 0)
        tp_syserr("F_SETFL(%s)", l->name);
    l->length = sizeof l->address;
    if (getsockname(l->fd, (struct sockaddr *)&l->address, &l->length) != 0)
        tp_syserr("getsockname(%s)", l->name);
}

static int accept_one(struct listener *l)
{
    if (l->nonblocking) {
        struct pollfd p = { .fd = l->fd, .events = POLLIN };
        for (;;) {
            int n = poll(&p, 1, 10000);
            if (n < 0 && errno == EINTR)
                continue;
            if (n != 1)
                tp_selfcheck_fail("%s: no connection to accept within 10 s", l->name);
            break;
        }
    }
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (errno != EINTR)
            tp_syserr("accept(%s)", l->name);
    }
}

static int connect_to(struct listener *l)
{
    int fd = socket(l->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        tp_syserr("socket(client of %s)", l->name);
    while (connect(fd, (struct sockaddr *)&l->address, l->length) != 0)
        if (errno != EINTR)
            tp_syserr("connect(%s)", l->name);
    return fd;
}

static void write_all(int fd, const uint8_t *p, size_t n, const char *what)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            tp_syserr("write(%s)", what);
        }
        p += w;
        n -= (size_t)w;
    }
}

static void read_exact(int fd, uint8_t *p, size_t n, const char *what)
{
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            tp_selfcheck_fail("read(%s) gave %zd (%s) with %zu bytes still expected", what, r,
                              r < 0 ? strerror(errno) : "end", n);
        p += r;
        n -= (size_t)r;
    }
}

/* One round of a listener: checks its state, then serves one connection. */
static uint64_t listener_round(struct listener *l, uint64_t round, uint64_t h)
{
    struct sockaddr_storage now;
    socklen_t length = sizeof now;
    if (getsockname(l->fd, (struct sockaddr *)&now, &length) != 0)
        tp_syserr("getsockname(%s)", l->name);
    if (length != l->length || memcmp(&now, &l->address, length) != 0)
        tp_selfcheck_fail("round %llu: %s is no longer bound where it was", (unsigned long long)round, l->name);
    if (option(l->fd, SOL_SOCKET, SO_REUSEADDR, "SO_REUSEADDR") != 1)
        tp_selfcheck_fail("round %llu: %s lost SO_REUSEADDR", (unsigned long long)round, l->name);
    if (option(l->fd, SOL_SOCKET, SO_ACCEPTCONN, "SO_ACCEPTCONN") != 1)
        tp_selfcheck_fail("round %llu: %s does not listen", (unsigned long long)round, l->name);
    if (l->family == AF_INET6 && option(l->fd, IPPROTO_IPV6, IPV6_V6ONLY, "IPV6_V6ONLY") != 1)
        tp_selfcheck_fail("round %llu: %s lost IPV6_V6ONLY", (unsigned long long)round, l->name);
    struct tcp_info info;
    socklen_t info_length = sizeof info;
    if (getsockopt(l->fd, IPPROTO_TCP, TCP_INFO, &info, &info_length) != 0)
        tp_syserr("TCP_INFO(%s)", l->name);
    if (info.tcpi_state != TCP_LISTEN || info.tcpi_sacked != (uint32_t)l->backlog || info.tcpi_unacked != 0)
        tp_selfcheck_fail("round %llu: %s state %u, backlog %u (expected %d), %u waiting", (unsigned long long)round,
                          l->name, info.tcpi_state, info.tcpi_sacked, l->backlog, info.tcpi_unacked);
    int flags = fcntl(l->fd, F_GETFL);
    if (((flags & O_NONBLOCK) != 0) != l->nonblocking)
        tp_selfcheck_fail("round %llu: %s flags %o", (unsigned long long)round, l->name, flags);
    int client = connect_to(l), server = accept_one(l);
    uint8_t out = (uint8_t)tp_mix64(round), back = (uint8_t)(out ^ 0x5a), got = 0;
    write_all(client, &out, 1, l->name);
    read_exact(server, &got, 1, l->name);
    if (got != out)
        tp_selfcheck_fail("%s: the server read %u, not %u", l->name, got, out);
    write_all(server, &back, 1, l->name);
    read_exact(client, &got, 1, l->name);
    if (got != back)
        tp_selfcheck_fail("%s: the client read %u, not %u", l->name, got, back);
    close(client);
    close(server);
    return tp_hash_mix(h, got);
}

/* A connection whose two ends the program holds, with its model. */
struct connection {
    const char *name;
    int client, server;
    uint64_t seed, sent[2], received[2];  /* [0] client->server, [1] server->client */
};

static uint8_t stream_byte(uint64_t seed, uint64_t i) { return (uint8_t)tp_mix64(seed * 0x10001 + i); }

static uint64_t direction_round(struct connection *c, int direction, size_t out, size_t in, uint64_t round, uint64_t h)
{
    int writer = direction == 0 ? c->client : c->server, reader = direction == 0 ? c->server : c->client;
    uint64_t seed = c->seed + (uint64_t)direction;
    uint8_t buffer[64];
    int queued = -1;
    if (ioctl(reader, FIONREAD, &queued) != 0)
        tp_syserr("FIONREAD(%s)", c->name);
    /* Bytes still in the writer's send queue (not yet acknowledged) are not in the reader's yet. */
    if (queued < 0 || (uint64_t)queued > c->sent[direction] - c->received[direction])
        tp_selfcheck_fail("round %llu: %s direction %d holds %d bytes, the model at most %llu", (unsigned long long)round,
                          c->name, direction, queued, (unsigned long long)(c->sent[direction] - c->received[direction]));
    for (size_t i = 0; i < out; i++)
        buffer[i] = stream_byte(seed, c->sent[direction] + i);
    write_all(writer, buffer, out, c->name);
    c->sent[direction] += out;
    read_exact(reader, buffer, in, c->name);
    for (size_t i = 0; i < in; i++) {
        if (buffer[i] != stream_byte(seed, c->received[direction] + i))
            tp_selfcheck_fail("round %llu: %s direction %d byte %llu is %u, expected %u", (unsigned long long)round, c->name,
                              direction, (unsigned long long)(c->received[direction] + i), buffer[i],
                              stream_byte(seed, c->received[direction] + i));
        h = tp_hash_word(h, buffer[i]);
    }
    c->received[direction] += in;
    return h;
}

static uint64_t connection_round(struct connection *c, uint64_t round, uint64_t h)
{
    if (option(c->client, IPPROTO_TCP, TCP_NODELAY, "TCP_NODELAY") == 0)
        tp_selfcheck_fail("round %llu: %s client lost TCP_NODELAY", (unsigned long long)round, c->name);
    if (option(c->server, SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE") == 0)
        tp_selfcheck_fail("round %llu: %s server lost SO_KEEPALIVE", (unsigned long long)round, c->name);
    h = direction_round(c, 0, 50, 30, round, h);
    return direction_round(c, 1, 40, 25, round, h);
}

static void make_connection(struct connection *c, int family, uint64_t seed)
{
    struct listener l = { .name = c->name, .family = family, .backlog = 1 };
    make_listener(&l);
    c->client = connect_to(&l);
    c->server = accept_one(&l);
    close(l.fd);
    set_option(c->client, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
    set_option(c->server, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
    c->seed = seed;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 60, pause_us = 10000;
    const char *with = "listen4,listen6,conn4,conn6";
    struct tp_opt opts[] = {
        { "rounds", &rounds, 1, 1000000, "rounds to run" },
        { "pause-us", &pause_us, 0, 10000000, "pause after each round (us)" },
    };
    struct tp_stropt sopts[] = {
        { "with", &with, NULL, "comma-separated kinds: listen4,listen6,conn4,conn6,pending,closewait" },
    };
    struct listener pending = { .name = "pending", .family = AF_INET, .backlog = 3 };
    int pending_client = -1;
    tp_parse_args_with_strings(argc, argv, "Holds TCP listeners and connections on loopback and checks them every round.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));
    struct listener listeners[2] = {
        { .name = "listen4", .family = AF_INET, .backlog = 7, .nonblocking = 0 },
        { .name = "listen6", .family = AF_INET6, .backlog = 5, .nonblocking = 1 },
    };
    struct connection connections[2] = { { .name = "conn4" }, { .name = "conn6" } };
    int use_listener[2] = { want(with, "listen4"), want(with, "listen6") };
    int use_connection[2] = { want(with, "conn4"), want(with, "conn6") };
    for (int i = 0; i < 2; i++) {
        if (use_listener[i])
            make_listener(&listeners[i]);
        if (use_connection[i])
            make_connection(&connections[i], i == 0 ? AF_INET : AF_INET6, 0x7c9 + (uint64_t)i * 2);
    }
    int closewait_fd = -1;
    if (want(with, "closewait")) {
        struct connection half = { .name = "closewait" };
        make_connection(&half, AF_INET, 1);
        close(half.server);
        closewait_fd = half.client;
    }
    if (want(with, "pending")) {
        make_listener(&pending);
        pending_client = connect_to(&pending);
    }
    struct connection urgent = { .name = "urgent" };
    if (want(with, "urgent")) {
        make_connection(&urgent, AF_INET, 3);
        if (send(urgent.client, "!", 1, MSG_OOB) != 1)
            tp_syserr("send(MSG_OOB)");
    }
    struct listener fastopen = { .name = "fastopen", .family = AF_INET, .backlog = 3, .nonblocking = 0 };
    if (want(with, "fastopen")) {
        make_listener(&fastopen);
        int queue = 5;
        if (setsockopt(fastopen.fd, IPPROTO_TCP, TCP_FASTOPEN, &queue, sizeof queue) != 0)
            tp_syserr("setsockopt(TCP_FASTOPEN)");
    }
    uint64_t h = 0x7c95eed;
    for (uint64_t round = 1; round <= rounds; round++) {
        tp_rendezvous(round);
        for (int i = 0; i < 2; i++) {
            if (use_listener[i])
                h = listener_round(&listeners[i], round, h);
            if (use_connection[i])
                h = connection_round(&connections[i], round, h);
        }
        tp_say("round %llu ok\n", (unsigned long long)round);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    if (closewait_fd >= 0)
        close(closewait_fd);
    if (pending_client >= 0) {
        close(pending_client);
        close(pending.fd);
    }
    tp_finish(h);
}
