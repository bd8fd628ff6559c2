/*
 * descriptors - holds descriptors of many kinds, each with state in the
 * kernel that a migration must carry exactly, and checks that state every
 * round against its own model.
 *
 * --with takes a comma-separated list (default: all but halfpipe):
 *   dir      a directory it made (mkdtemp "fammig-fd-XXXXXX" in --dir)
 *            holding 8 files; each round reads ONE entry with getdents64,
 *            so the directory offset carries the walk: every cycle must
 *            see each name exactly once (a lost offset repeats names)
 *   deleted  a file in that directory, unlinked while open (O_RDWR): each
 *            round checks its contents against the model, then write()s 8
 *            bytes at the current offset (the offset moves on)
 *   memfd    memfd "fammig-fd" (MFD_ALLOW_SEALING, F_SEAL_SHRINK added):
 *            contents, size, seals, the name, the offset
 *   pipe     a pipe with 128 KiB capacity: each round writes 100 bytes and
 *            reads 60, so bytes stay buffered; FIONREAD and the byte
 *            sequence must match
 *   fifo     the same through a FIFO made in the directory
 *   eventfd  a counter (write 3 each round, read every 4th) and a
 *            semaphore eventfd (write 2, read 1), both non-blocking
 *   stream   a SOCK_STREAM socketpair: 50 bytes sent each way per round,
 *            30 received, so data stays queued both ways
 *   dgram    a SOCK_DGRAM socketpair with 3 datagrams of varying size
 *            always queued: one sent, one received per round (sizes and
 *            contents checked: boundaries matter)
 *   signalfd SIGRTMIN+3 blocked and read through a signalfd; one sent by
 *            sigqueue each round is read the next round (value checked)
 *   timerfd  a periodic CLOCK_MONOTONIC timer every --timer-ms ms (its
 *            expirations must keep coming: at least one in any 50 rounds)
 *            and a one-shot timer an hour away (still armed, never later)
 *   epoll    an epoll set watching the pipe, the stream socket, the
 *            eventfd counter (level-triggered) and the signalfd; each round
 *            epoll_wait(0) must report exactly the ready ones, with their
 *            data words
 *   halfpipe a pipe whose write end is closed (not migratable: refused)
 * A kind that another needs is enabled with it (epoll needs pipe, stream,
 * eventfd, signalfd; deleted and fifo need dir).
 *
 * Each round is one step (--rendezvous counts rounds); it prints one line
 * per round and pauses --pause-us. At the end it removes its directory
 * (also on failure, via atexit). The checksum hashes only data the model
 * determines (no times, no timer counts).
 */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define DIR_FILES 8
#define DELETED_BYTES 3000
#define MEMFD_BYTES 5000

static char work_dir[PATH_MAX];
static int made_dir;
static char fifo_path[PATH_MAX + 16];

static void cleanup(void)
{
    char path[PATH_MAX + 16];
    if (!made_dir)
        return;
    for (int i = 0; i < DIR_FILES; i++) {
        snprintf(path, sizeof path, "%s/%c", work_dir, 'a' + i);
        unlink(path);
    }
    if (fifo_path[0])
        unlink(fifo_path);
    rmdir(work_dir);
    made_dir = 0;
}

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

/* Byte i of a stream named by seed: what the writer sends and the reader
 * expects. */
static uint8_t stream_byte(uint64_t seed, uint64_t i)
{
    return (uint8_t)tp_mix64(seed * 0x10001 + i);
}

static void write_all(int fd, const void *buf, size_t n, const char *what)
{
    const uint8_t *p = buf;
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

static void read_exact(int fd, void *buf, size_t n, const char *what)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            tp_selfcheck_fail("read(%s) gave %zd (%s) with %zu bytes still expected",
                              what, r, r < 0 ? strerror(errno) : "end", n);
        p += r;
        n -= (size_t)r;
    }
}

/* A byte stream through (wfd, rfd) with its model: sent and received
 * counts. Each round sends `out` bytes and receives `in`. */
struct channel {
    const char *name;
    int wfd, rfd;
    uint64_t seed, sent, received;
};

static uint64_t channel_round(struct channel *c, size_t out, size_t in, uint64_t h)
{
    uint8_t buf[256];
    int queued = -1;
    if (ioctl(c->rfd, FIONREAD, &queued) != 0)
        tp_syserr("FIONREAD(%s)", c->name);
    if ((uint64_t)queued != c->sent - c->received)
        tp_selfcheck_fail("%s holds %d bytes, the model %llu", c->name, queued,
                          (unsigned long long)(c->sent - c->received));
    for (size_t i = 0; i < out; i++)
        buf[i] = stream_byte(c->seed, c->sent + i);
    write_all(c->wfd, buf, out, c->name);
    c->sent += out;
    read_exact(c->rfd, buf, in, c->name);
    for (size_t i = 0; i < in; i++) {
        if (buf[i] != stream_byte(c->seed, c->received + i))
            tp_selfcheck_fail("%s byte %llu is %u, expected %u", c->name,
                              (unsigned long long)(c->received + i), buf[i],
                              stream_byte(c->seed, c->received + i));
        h = tp_hash_word(h, buf[i]);
    }
    c->received += in;
    return h;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 60, pause_us = 10000, timer_ms = 5;
    const char *dir = "/tmp";
    const char *with = "dir,deleted,memfd,pipe,fifo,eventfd,stream,dgram,signalfd,timerfd,epoll";
    struct tp_opt opts[] = {
        { "rounds", &rounds, 1, 1000000, "rounds to run" },
        { "pause-us", &pause_us, 0, 10000000, "pause after each round (us)" },
        { "timer-ms", &timer_ms, 1, 1000, "period of the periodic timerfd (ms)" },
    };
    struct tp_stropt sopts[] = {
        { "dir", &dir, NULL, "directory for its own directory (and the FIFO)" },
        { "with", &with, NULL, "comma-separated kinds: dir,deleted,memfd,pipe,fifo,eventfd,stream,dgram,signalfd,timerfd,epoll,halfpipe" },
    };
    tp_parse_args_with_strings(argc, argv, "Holds descriptors of many kinds and checks their kernel state every round.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));

    int use_epoll = want(with, "epoll");
    int use_pipe = want(with, "pipe") || use_epoll;
    int use_stream = want(with, "stream") || use_epoll;
    int use_eventfd = want(with, "eventfd") || use_epoll;
    int use_signalfd = want(with, "signalfd") || use_epoll;
    int use_deleted = want(with, "deleted");
    int use_fifo = want(with, "fifo");
    int use_dir = want(with, "dir") || use_deleted || use_fifo;
    int use_memfd = want(with, "memfd"), use_dgram = want(with, "dgram");
    int use_timerfd = want(with, "timerfd"), use_halfpipe = want(with, "halfpipe");
    uint64_t h = 0x5eed;

    atexit(cleanup);
    int dir_fd = -1, deleted_fd = -1;
    uint8_t deleted_model[DELETED_BYTES];
    uint64_t deleted_offset = 0;
    int dir_seen[DIR_FILES + 2];
    int dir_cycles = 0;
    if (use_dir) {
        snprintf(work_dir, sizeof work_dir, "%s/fammig-fd-XXXXXX", dir);
        if (mkdtemp(work_dir) == NULL)
            tp_syserr("mkdtemp(%s)", work_dir);
        made_dir = 1;
        for (int i = 0; i < DIR_FILES; i++) {
            char path[PATH_MAX + 16];
            snprintf(path, sizeof path, "%s/%c", work_dir, 'a' + i);
            int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
            if (fd < 0)
                tp_syserr("creating %s", path);
            close(fd);
        }
        dir_fd = open(work_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir_fd < 0)
            tp_syserr("open(%s)", work_dir);
        memset(dir_seen, 0, sizeof dir_seen);
    }
    if (use_deleted) {
        char path[PATH_MAX + 16];
        snprintf(path, sizeof path, "%s/deleted", work_dir);
        deleted_fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0640);
        if (deleted_fd < 0)
            tp_syserr("creating %s", path);
        for (int i = 0; i < DELETED_BYTES; i++)
            deleted_model[i] = stream_byte(7, (uint64_t)i);
        write_all(deleted_fd, deleted_model, DELETED_BYTES, "deleted file");
        if (lseek(deleted_fd, 0, SEEK_SET) != 0)
            tp_syserr("lseek(deleted)");
        if (unlink(path) != 0)
            tp_syserr("unlink(%s)", path);
    }
    int memfd = -1;
    uint8_t memfd_model[MEMFD_BYTES + 8 * 1024];
    size_t memfd_size = MEMFD_BYTES;
    if (use_memfd) {
        memfd = (int)syscall(SYS_memfd_create, "fammig-fd", MFD_ALLOW_SEALING);
        if (memfd < 0)
            tp_syserr("memfd_create");
        for (int i = 0; i < MEMFD_BYTES; i++)
            memfd_model[i] = stream_byte(11, (uint64_t)i);
        write_all(memfd, memfd_model, MEMFD_BYTES, "memfd");
        if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) != 0)
            tp_syserr("F_ADD_SEALS");
    }
    struct channel pipe_channel = { "pipe", -1, -1, 21, 0, 0 };
    if (use_pipe) {
        int ends[2];
        if (pipe2(ends, O_CLOEXEC) != 0)
            tp_syserr("pipe2");
        if (fcntl(ends[1], F_SETPIPE_SZ, 128 * 1024) < 0)
            tp_syserr("F_SETPIPE_SZ");
        pipe_channel.rfd = ends[0];
        pipe_channel.wfd = ends[1];
    }
    struct channel fifo_channel = { "fifo", -1, -1, 22, 0, 0 };
    if (use_fifo) {
        snprintf(fifo_path, sizeof fifo_path, "%s/fifo", work_dir);
        if (mkfifo(fifo_path, 0600) != 0)
            tp_syserr("mkfifo(%s)", fifo_path);
        fifo_channel.rfd = open(fifo_path, O_RDONLY | O_NONBLOCK);
        fifo_channel.wfd = open(fifo_path, O_WRONLY);
        if (fifo_channel.rfd < 0 || fifo_channel.wfd < 0)
            tp_syserr("open(%s)", fifo_path);
        /* Reads block from now on: the data is always there. */
        if (fcntl(fifo_channel.rfd, F_SETFL, 0) != 0)
            tp_syserr("F_SETFL(fifo)");
    }
    int counter_fd = -1, semaphore_fd = -1;
    uint64_t counter_model = 0, semaphore_model = 0;
    if (use_eventfd) {
        counter_fd = eventfd(5, EFD_NONBLOCK | EFD_CLOEXEC);
        semaphore_fd = eventfd(0, EFD_NONBLOCK | EFD_SEMAPHORE);
        if (counter_fd < 0 || semaphore_fd < 0)
            tp_syserr("eventfd");
        counter_model = 5;
    }
    struct channel stream_ab = { "stream a->b", -1, -1, 31, 0, 0 };
    struct channel stream_ba = { "stream b->a", -1, -1, 32, 0, 0 };
    if (use_stream) {
        int pair[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
            tp_syserr("socketpair(stream)");
        stream_ab.wfd = pair[0];
        stream_ab.rfd = pair[1];
        stream_ba.wfd = pair[1];
        stream_ba.rfd = pair[0];
    }
    int dgram[2] = { -1, -1 };
    uint64_t dgram_sent = 0, dgram_received = 0;
    if (use_dgram) {
        if (socketpair(AF_UNIX, SOCK_DGRAM, 0, dgram) != 0)
            tp_syserr("socketpair(dgram)");
    }
    int signal_fd = -1, signal_number = SIGRTMIN + 3;
    if (use_signalfd) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, signal_number);
        if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
            tp_syserr("sigprocmask");
        signal_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
        if (signal_fd < 0)
            tp_syserr("signalfd");
    }
    int periodic_fd = -1, oneshot_fd = -1;
    uint64_t last_expiry_round = 0, oneshot_left_ns = UINT64_MAX;
    if (use_timerfd) {
        periodic_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        oneshot_fd = timerfd_create(CLOCK_BOOTTIME, 0);
        if (periodic_fd < 0 || oneshot_fd < 0)
            tp_syserr("timerfd_create");
        struct itimerspec periodic = { tp_ts_from_ns(timer_ms * 1000000ULL), tp_ts_from_ns(timer_ms * 1000000ULL) };
        struct itimerspec oneshot = { { 0, 0 }, { 3600, 0 } };
        if (timerfd_settime(periodic_fd, 0, &periodic, NULL) != 0 || timerfd_settime(oneshot_fd, 0, &oneshot, NULL) != 0)
            tp_syserr("timerfd_settime");
    }
    int epoll_fd = -1;
    enum { TAG_PIPE = 0x1111, TAG_STREAM = 0x2222, TAG_COUNTER = 0x3333, TAG_SIGNAL = 0x4444 };
    if (use_epoll) {
        epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (epoll_fd < 0)
            tp_syserr("epoll_create1");
        struct { int fd; uint64_t tag; } watch[] = {
            { pipe_channel.rfd, TAG_PIPE }, { stream_ab.rfd, TAG_STREAM },
            { counter_fd, TAG_COUNTER }, { signal_fd, TAG_SIGNAL },
        };
        for (size_t i = 0; i < sizeof watch / sizeof watch[0]; i++) {
            struct epoll_event event = { .events = EPOLLIN, .data.u64 = watch[i].tag };
            if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, watch[i].fd, &event) != 0)
                tp_syserr("epoll_ctl");
        }
    }
    if (use_halfpipe) {
        int ends[2];
        if (pipe(ends) != 0)
            tp_syserr("pipe");
        close(ends[1]);
    }

    for (uint64_t round = 1; round <= rounds; round++) {
        tp_rendezvous(round);
        if (use_dir) {
            /* One entry per call: a buffer that holds one record only. */
            char buffer[40];
            long n = syscall(SYS_getdents64, dir_fd, buffer, sizeof buffer);
            if (n < 0)
                tp_syserr("getdents64");
            if (n == 0) {
                for (int i = 0; i < DIR_FILES + 2; i++)
                    if (dir_seen[i] != 1)
                        tp_selfcheck_fail("round %llu: directory cycle %d saw entry %d %d times",
                                          (unsigned long long)round, dir_cycles, i, dir_seen[i]);
                memset(dir_seen, 0, sizeof dir_seen);
                dir_cycles++;
                if (lseek(dir_fd, 0, SEEK_SET) != 0)
                    tp_syserr("lseek(dir)");
            } else {
                const char *name = buffer + 19;  /* d_name in struct linux_dirent64 */
                int index;
                if (strcmp(name, ".") == 0)
                    index = DIR_FILES;
                else if (strcmp(name, "..") == 0)
                    index = DIR_FILES + 1;
                else if (name[0] >= 'a' && name[0] < 'a' + DIR_FILES && name[1] == '\0')
                    index = name[0] - 'a';
                else if (strcmp(name, "fifo") == 0)
                    index = -1;
                else
                    tp_selfcheck_fail("round %llu: unexpected entry '%s'", (unsigned long long)round, name);
                if (index >= 0) {
                    dir_seen[index]++;
                    if (dir_seen[index] > 1)
                        tp_selfcheck_fail("round %llu: entry '%s' seen twice in one cycle (the directory offset was lost)",
                                          (unsigned long long)round, name);
                }
            }
            h = tp_hash_mix(h, (uint64_t)dir_cycles);
        }
        if (use_deleted) {
            uint8_t now[DELETED_BYTES];
            struct stat st;
            if (fstat(deleted_fd, &st) != 0)
                tp_syserr("fstat(deleted)");
            if (st.st_nlink != 0 || st.st_size != DELETED_BYTES || (st.st_mode & 07777) != 0640)
                tp_selfcheck_fail("deleted file: nlink %lu, size %lld, mode %o", (unsigned long)st.st_nlink,
                                  (long long)st.st_size, (unsigned)(st.st_mode & 07777));
            if (pread(deleted_fd, now, DELETED_BYTES, 0) != DELETED_BYTES)
                tp_syserr("pread(deleted)");
            if (memcmp(now, deleted_model, DELETED_BYTES) != 0)
                tp_selfcheck_fail("round %llu: the deleted file's contents changed", (unsigned long long)round);
            if ((uint64_t)lseek(deleted_fd, 0, SEEK_CUR) != deleted_offset)
                tp_selfcheck_fail("round %llu: deleted file offset %lld, expected %llu", (unsigned long long)round,
                                  (long long)lseek(deleted_fd, 0, SEEK_CUR), (unsigned long long)deleted_offset);
            if (deleted_offset + 8 > DELETED_BYTES) {
                deleted_offset = 0;
                if (lseek(deleted_fd, 0, SEEK_SET) != 0)
                    tp_syserr("lseek(deleted)");
            }
            uint8_t update[8];
            for (int i = 0; i < 8; i++)
                update[i] = stream_byte(round, (uint64_t)i);
            write_all(deleted_fd, update, 8, "deleted file");
            memcpy(deleted_model + deleted_offset, update, 8);
            deleted_offset += 8;
            h = tp_hash_words(h, (const uint64_t *)(const void *)deleted_model, DELETED_BYTES / 8);
        }
        if (use_memfd) {
            uint8_t now[sizeof memfd_model];
            char link[64], name[PATH_MAX];
            struct stat st;
            snprintf(link, sizeof link, "/proc/self/fd/%d", memfd);
            ssize_t len = readlink(link, name, sizeof name - 1);
            name[len > 0 ? len : 0] = '\0';
            if (strcmp(name, "/memfd:fammig-fd (deleted)") != 0)
                tp_selfcheck_fail("memfd is '%s'", name);
            if (fcntl(memfd, F_GET_SEALS) != F_SEAL_SHRINK)
                tp_selfcheck_fail("memfd seals %d, expected F_SEAL_SHRINK", fcntl(memfd, F_GET_SEALS));
            if (fstat(memfd, &st) != 0 || (size_t)st.st_size != memfd_size)
                tp_selfcheck_fail("memfd size %lld, expected %zu", (long long)st.st_size, memfd_size);
            if (pread(memfd, now, memfd_size, 0) != (ssize_t)memfd_size || memcmp(now, memfd_model, memfd_size) != 0)
                tp_selfcheck_fail("round %llu: the memfd's contents changed", (unsigned long long)round);
            if ((size_t)lseek(memfd, 0, SEEK_CUR) != memfd_size)
                tp_selfcheck_fail("memfd offset %lld, expected %zu", (long long)lseek(memfd, 0, SEEK_CUR), memfd_size);
            /* Append (it may grow, not shrink) while there is room in the model. */
            if (memfd_size + 64 <= sizeof memfd_model) {
                uint8_t more[64];
                for (int i = 0; i < 64; i++)
                    more[i] = stream_byte(round + 100, (uint64_t)i);
                write_all(memfd, more, 64, "memfd");
                memcpy(memfd_model + memfd_size, more, 64);
                memfd_size += 64;
            }
            h = tp_hash_mix(h, memfd_size);
        }
        if (use_pipe)
            h = channel_round(&pipe_channel, 100, 60, h);
        if (use_fifo)
            h = channel_round(&fifo_channel, 100, 60, h);
        if (use_eventfd) {
            uint64_t value;
            if (read(counter_fd, &value, 8) == 8 ? 0 : errno != EAGAIN)
                tp_syserr("read(eventfd)");
            /* A non-blocking read takes everything: check it is the model's, then put it back. */
            if (counter_model != 0 && value != counter_model)
                tp_selfcheck_fail("round %llu: eventfd counter %llu, expected %llu", (unsigned long long)round,
                                  (unsigned long long)value, (unsigned long long)counter_model);
            if (round % 4 == 0) {
                h = tp_hash_mix(h, counter_model);
                counter_model = 0;
            }
            counter_model += 3;
            if (write(counter_fd, &counter_model, 8) != 8)
                tp_syserr("write(eventfd)");
            uint64_t two = 2;
            if (write(semaphore_fd, &two, 8) != 8)
                tp_syserr("write(semaphore)");
            semaphore_model += 2;
            if (read(semaphore_fd, &value, 8) != 8 || value != 1)
                tp_selfcheck_fail("semaphore eventfd read %llu", (unsigned long long)value);
            semaphore_model -= 1;
            /* Its count is never read whole: compare through fdinfo. */
            char path[64], text[512];
            snprintf(path, sizeof path, "/proc/self/fdinfo/%d", semaphore_fd);
            int info = open(path, O_RDONLY);
            ssize_t n = info >= 0 ? read(info, text, sizeof text - 1) : -1;
            if (info >= 0)
                close(info);
            text[n > 0 ? n : 0] = '\0';
            const char *count_line = strstr(text, "eventfd-count:");
            if (count_line == NULL || strtoull(count_line + 14, NULL, 16) != semaphore_model)
                tp_selfcheck_fail("semaphore eventfd count is not %llu: %s", (unsigned long long)semaphore_model, text);
        }
        if (use_stream) {
            h = channel_round(&stream_ab, 50, 30, h);
            h = channel_round(&stream_ba, 50, 30, h);
        }
        if (use_dgram) {
            uint8_t buf[512];
            while (dgram_sent < dgram_received + 4) {
                size_t size = 10 + (size_t)(dgram_sent % 7) * 37;
                for (size_t i = 0; i < size; i++)
                    buf[i] = stream_byte(dgram_sent + 1000, i);
                if (send(dgram[0], buf, size, 0) != (ssize_t)size)
                    tp_syserr("send(dgram)");
                dgram_sent++;
            }
            size_t expected = 10 + (size_t)(dgram_received % 7) * 37;
            ssize_t got = recv(dgram[1], buf, sizeof buf, MSG_DONTWAIT);
            if (got != (ssize_t)expected)
                tp_selfcheck_fail("round %llu: datagram %llu has %zd bytes, expected %zu", (unsigned long long)round,
                                  (unsigned long long)dgram_received, got, expected);
            for (size_t i = 0; i < expected; i++)
                if (buf[i] != stream_byte(dgram_received + 1000, i))
                    tp_selfcheck_fail("datagram %llu byte %zu differs", (unsigned long long)dgram_received, i);
            h = tp_hash_mix(h, dgram_received * 1000 + expected);
            dgram_received++;
        }
        if (use_epoll) {
            struct epoll_event events[8];
            int n = epoll_wait(epoll_fd, events, 8, 0);
            if (n < 0)
                tp_syserr("epoll_wait");
            uint64_t seen = 0;
            for (int i = 0; i < n; i++)
                seen |= events[i].data.u64 == TAG_PIPE ? 1 : events[i].data.u64 == TAG_STREAM ? 2
                      : events[i].data.u64 == TAG_COUNTER ? 4 : events[i].data.u64 == TAG_SIGNAL ? 8 : 16;
            /* Pipe, stream and counter always hold data; the signal is pending from round 2 on. */
            uint64_t expected = 1 | 2 | 4 | (round > 1 ? 8 : 0);
            if (seen != expected)
                tp_selfcheck_fail("round %llu: epoll reported %llx, expected %llx", (unsigned long long)round,
                                  (unsigned long long)seen, (unsigned long long)expected);
            h = tp_hash_mix(h, seen);
        }
        if (use_signalfd) {
            struct signalfd_siginfo info;
            ssize_t n = read(signal_fd, &info, sizeof info);
            if (round == 1) {
                if (n >= 0 || errno != EAGAIN)
                    tp_selfcheck_fail("a signal was pending before any was sent");
            } else if (n != (ssize_t)sizeof info || (int)info.ssi_signo != signal_number || info.ssi_int != (int32_t)(round - 1)) {
                tp_selfcheck_fail("round %llu: signalfd read %zd bytes, signal %u value %d", (unsigned long long)round, n,
                                  n > 0 ? info.ssi_signo : 0, n > 0 ? info.ssi_int : 0);
            }
            union sigval value = { .sival_int = (int)round };
            if (sigqueue(getpid(), signal_number, value) != 0)
                tp_syserr("sigqueue");
            h = tp_hash_mix(h, round);
        }
        if (use_timerfd) {
            uint64_t expirations = 0;
            if (read(periodic_fd, &expirations, 8) == 8 && expirations > 0)
                last_expiry_round = round;
            else if (errno != EAGAIN)
                tp_syserr("read(timerfd)");
            if (round > last_expiry_round + 50)
                tp_selfcheck_fail("round %llu: no expiry of the %llu ms timer since round %llu", (unsigned long long)round,
                                  timer_ms, (unsigned long long)last_expiry_round);
            struct itimerspec left;
            if (timerfd_gettime(oneshot_fd, &left) != 0)
                tp_syserr("timerfd_gettime");
            uint64_t left_ns = (uint64_t)left.it_value.tv_sec * 1000000000ULL + (uint64_t)left.it_value.tv_nsec;
            if (left_ns == 0 || left_ns > oneshot_left_ns || left.it_interval.tv_sec != 0 || left.it_interval.tv_nsec != 0)
                tp_selfcheck_fail("round %llu: the one-shot timer has %llu ns left (before: %llu)", (unsigned long long)round,
                                  (unsigned long long)left_ns, (unsigned long long)oneshot_left_ns);
            oneshot_left_ns = left_ns;
        }
        tp_say("round %llu ok\n", (unsigned long long)round);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    cleanup();
    tp_finish(h);
}
