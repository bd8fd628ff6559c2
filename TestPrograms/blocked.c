/*
 * blocked - a process that is nearly always inside a blocking syscall.
 *
 * Each round makes one call per mode in --in (a comma-separated list, in
 * that order), each of which must block for --wait-ms milliseconds and end
 * by its timeout:
 *
 *   nanosleep  nanosleep(), resumed with the remaining time after EINTR;
 *   futex      FUTEX_WAIT_PRIVATE with a relative timeout on a word that
 *              holds the expected value, so only the timeout ends it
 *              (ETIMEDOUT);
 *   poll       ppoll() on no descriptors with a timeout (returns 0);
 *   epoll      epoll_wait() with a timeout on an epoll instance that
 *              watches nothing (returns 0). The epoll descriptor is
 *              created at start-up and stays open the whole run, so it is
 *              not in the default list: fammig migrates only regular files
 *              and /dev/null.
 *
 * `read` is not a mode: with only regular files and /dev/null open
 * nothing can block in read() (both answer at once), so --in read is
 * refused with a usage error.
 *
 * An interrupted call (EINTR, or a spurious futex wake-up) is made again
 * with the time left until its deadline, so how often that happens never
 * shows on stdout. After each call the program checks that at least
 * --wait-ms passed (CLOCK_MONOTONIC) and that the futex word and a stack
 * canary are unchanged. It prints one line per round; the checksum covers
 * the modes, outcomes and rounds, never a time.
 */
#include "common.h"

#include <linux/futex.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

enum mode { MODE_NANOSLEEP, MODE_FUTEX, MODE_POLL, MODE_EPOLL, MODE_COUNT };
static const char *const g_mode_names[] = { "nanosleep", "futex", "poll",
                                            "epoll" };
#define MODES_MAX 16u

#define FUTEX_VALUE 0x5eed5eedu

static uint32_t g_futex_word = FUTEX_VALUE;

static uint64_t now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        tp_syserr("clock_gettime");
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Parses "a,b,c" into modes; returns how many. Exits 2 on a bad list. */
static size_t parse_modes(const char *list, enum mode *modes)
{
    size_t count = 0;
    const char *p = list;
    while (*p != '\0') {
        size_t length = strcspn(p, ",");
        if (length == 4 && strncmp(p, "read", 4) == 0)
            tp_usage_error("--in read: nothing can block in read() with "
                           "only regular files and /dev/null open (both "
                           "answer at once, and fammig migrates no other "
                           "descriptor); use nanosleep, futex, poll or "
                           "epoll");
        int found = -1;
        for (int m = 0; m < MODE_COUNT; m++)
            if (strlen(g_mode_names[m]) == length &&
                strncmp(p, g_mode_names[m], length) == 0)
                found = m;
        if (found < 0)
            tp_usage_error("--in: unknown mode '%.*s' (want a comma-separated "
                           "list of nanosleep, futex, poll, epoll)",
                           (int)length, p);
        if (count == MODES_MAX)
            tp_usage_error("--in: more than %u modes", MODES_MAX);
        modes[count++] = (enum mode)found;
        p += length;
        if (*p == ',') {
            p++;
            if (*p == '\0')
                tp_usage_error("--in: the list ends with a comma");
        }
    }
    if (count == 0)
        tp_usage_error("--in: empty list");
    return count;
}

/* One blocking call of `mode` until `deadline_ns`; returns its outcome
 * code (hashed): 0 for nanosleep, 1 for a timeout. */
static uint64_t block_once(enum mode mode, int epoll_fd, uint64_t wait_ns,
                           uint64_t round)
{
    const uint64_t start_ns = now_ns();
    const uint64_t deadline_ns = start_ns + wait_ns;
    uint64_t outcome = 0;
    switch (mode) {
    case MODE_NANOSLEEP:
        tp_nanosleep_ns(wait_ns);
        outcome = 0;
        break;
    case MODE_FUTEX:
        for (;;) {
            uint64_t t = now_ns();
            if (t >= deadline_ns) {
                outcome = 1;   /* interrupted after the deadline */
                break;
            }
            struct timespec left = tp_ts_from_ns(deadline_ns - t);
            long rc = syscall(SYS_futex, &g_futex_word, FUTEX_WAIT_PRIVATE,
                              FUTEX_VALUE, &left, NULL, 0);
            if (rc == -1 && errno == ETIMEDOUT) {
                outcome = 1;
                break;
            }
            if (rc == -1 && errno == EAGAIN)
                tp_selfcheck_fail("round %llu: futex word is %#x, expected "
                                  "%#x", (unsigned long long)round,
                                  (unsigned)g_futex_word, FUTEX_VALUE);
            if (rc == -1 && errno != EINTR)
                tp_syserr("futex(FUTEX_WAIT_PRIVATE)");
            /* EINTR or a spurious wake-up: wait for the rest. */
        }
        break;
    case MODE_POLL:
        for (;;) {
            uint64_t t = now_ns();
            if (t >= deadline_ns) {
                outcome = 1;
                break;
            }
            struct timespec left = tp_ts_from_ns(deadline_ns - t);
            int rc = ppoll(NULL, 0, &left, NULL);
            if (rc == 0) {
                outcome = 1;
                break;
            }
            if (rc > 0)
                tp_selfcheck_fail("round %llu: ppoll on no descriptors "
                                  "returned %d", (unsigned long long)round,
                                  rc);
            if (errno != EINTR)
                tp_syserr("ppoll");
        }
        break;
    case MODE_EPOLL:
        for (;;) {
            uint64_t t = now_ns();
            if (t >= deadline_ns) {
                outcome = 1;
                break;
            }
            /* Milliseconds, rounded up so the call never ends early. */
            int left_ms = (int)((deadline_ns - t + 999999) / 1000000);
            struct epoll_event event;
            int rc = epoll_wait(epoll_fd, &event, 1, left_ms);
            if (rc == 0) {
                outcome = 1;
                break;
            }
            if (rc > 0)
                tp_selfcheck_fail("round %llu: epoll_wait on an empty "
                                  "instance returned %d",
                                  (unsigned long long)round, rc);
            if (errno != EINTR)
                tp_syserr("epoll_wait");
        }
        break;
    case MODE_COUNT:
        break;
    }
    uint64_t elapsed_ns = now_ns() - start_ns;
    if (elapsed_ns < wait_ns)
        tp_selfcheck_fail("round %llu: %s ended after %llu ns, before its "
                          "%llu ns timeout", (unsigned long long)round,
                          g_mode_names[mode], (unsigned long long)elapsed_ns,
                          (unsigned long long)wait_ns);
    return outcome;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 20, wait_ms = 5, seed = 1;
    const char *in = "nanosleep,futex,poll";
    const struct tp_opt opts[] = {
        { "rounds",  &rounds,  0, 100000000ULL, "number of rounds" },
        { "wait-ms", &wait_ms, 1, 3600000ULL, "milliseconds each call blocks" },
        { "seed",    &seed,    0, UINT64_MAX, "seed of the stack canary" },
    };
    const struct tp_stropt string_opts[] = {
        { "in", &in, NULL,
          "comma-separated blocking calls per round: nanosleep, futex, "
          "poll, epoll" },
    };
    tp_parse_args_with_strings(argc, argv,
                               "Spends its time blocked in nanosleep, futex, "
                               "ppoll or epoll_wait, each ending by timeout.",
                               opts, TP_NOPTS(opts), string_opts,
                               TP_NOPTS(string_opts));
    enum mode modes[MODES_MAX];
    const size_t mode_count = parse_modes(in, modes);

    int epoll_fd = -1;
    for (size_t i = 0; i < mode_count; i++) {
        if (modes[i] == MODE_EPOLL && epoll_fd < 0) {
            epoll_fd = epoll_create1(EPOLL_CLOEXEC);
            if (epoll_fd < 0)
                tp_syserr("epoll_create1");
        }
    }

    tp_say("blocked: rounds=%llu wait-ms=%llu in=%s\n", rounds, wait_ms, in);
    volatile uint64_t canary = tp_mix64(seed ^ 0x626c6f636bULL);
    const uint64_t canary_value = canary;
    uint64_t sum = tp_hash_mix(0x626c6f636b6564ULL, mode_count);
    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        char line[512];
        size_t used = (size_t)snprintf(line, sizeof(line), "round %llu/%llu",
                                       (unsigned long long)(r + 1), rounds);
        for (size_t i = 0; i < mode_count; i++) {
            uint64_t outcome = block_once(modes[i], epoll_fd,
                                          wait_ms * 1000000ULL, r + 1);
            if (canary != canary_value)
                tp_selfcheck_fail("round %llu: stack canary changed after %s",
                                  (unsigned long long)(r + 1),
                                  g_mode_names[modes[i]]);
            if (g_futex_word != FUTEX_VALUE)
                tp_selfcheck_fail("round %llu: futex word changed after %s",
                                  (unsigned long long)(r + 1),
                                  g_mode_names[modes[i]]);
            sum = tp_hash_mix(sum, (uint64_t)modes[i] << 8 ^ outcome);
            if (used < sizeof(line))
                used += (size_t)snprintf(line + used, sizeof(line) - used,
                                         " %s=%s", g_mode_names[modes[i]],
                                         outcome ? "timeout" : "slept");
        }
        sum = tp_hash_mix(sum, r);
        tp_say("%s\n", line);
    }
    if (epoll_fd >= 0 && close(epoll_fd) != 0)
        tp_syserr("close epoll");
    tp_finish(tp_hash_mix(sum, canary));
}
