/*
 * sleeper - a process that spends nearly all its time blocked in a syscall.
 *
 * Each round it deterministically updates a 64 KiB malloc'd buffer and an
 * array of stack locals, remembers a hash of them, then blocks for
 * --sleep-ms milliseconds: even rounds in nanosleep(), odd rounds in
 * clock_nanosleep(CLOCK_MONOTONIC, 0, ...), both relative and resumed with
 * the remaining time on EINTR. After waking it re-hashes the state and
 * checks it is unchanged. At the end the whole computation is replayed in
 * a fresh buffer and compared with the live state.
 *
 * With --fd-signals 1 each SIGUSR1 opens a UDP socket (fd 40) if it is
 * closed and closes it if it is open, in the handler: a descriptor that
 * cannot migrate, open for a window the caller controls (a freeze that
 * finds it is let go and tried again). The state does not depend on it.
 * With --fd-signals 2 the first SIGUSR1 opens a TCP listener on loopback
 * (fd 40) and connects to it (fd 41) without accepting, a listener with a
 * connection not yet accepted (as a server a moment before its accept);
 * the next accepts that connection and closes all three.
 */
#include "common.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#define HEAP_BYTES (64u * 1024u)
#define HEAP_WORDS (HEAP_BYTES / sizeof(uint64_t))
#define STACK_WORDS 64

#define TOGGLED_FD 40
#define CLIENT_FD 41

/* Moves fd to target (async-signal-safe calls only: this runs in the handler). */
static void move_fd(int fd, int target)
{
    if (fd >= 0 && fd != target) {
        dup2(fd, target);
        close(fd);
    }
}

static void toggle_pending_listener(int signal_number)
{
    (void)signal_number;
    if (fcntl(TOGGLED_FD, F_GETFD) != -1) {
        int accepted = accept(TOGGLED_FD, NULL, NULL);
        if (accepted >= 0)
            close(accepted);
        close(CLIENT_FD);
        close(TOGGLED_FD);
        return;
    }
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0
        || listen(listener, 4) != 0 || getsockname(listener, (struct sockaddr *)&address, &length) != 0) {
        if (listener >= 0)
            close(listener);
        return;
    }
    move_fd(listener, TOGGLED_FD);
    int client = socket(AF_INET, SOCK_STREAM, 0);
    if (client >= 0 && connect(client, (struct sockaddr *)&address, sizeof address) != 0) {
        close(client);
        return;
    }
    move_fd(client, CLIENT_FD);
}

static void toggle_fd(int signal_number)
{
    (void)signal_number;
    if (fcntl(TOGGLED_FD, F_GETFD) != -1) {
        close(TOGGLED_FD);
        return;
    }
    move_fd(socket(AF_INET, SOCK_DGRAM, 0), TOGGLED_FD);
}

static uint64_t round_key(uint64_t seed, uint64_t r)
{
    return tp_mix64(tp_mix64(seed ^ 0x736c65657065ULL) + r * TP_GOLDEN);
}

static void init_state(uint64_t seed, uint64_t *heap, volatile uint64_t *stk)
{
    uint64_t s = tp_mix64(seed ^ 0x696e6974ULL);
    for (size_t i = 0; i < HEAP_WORDS; i++)
        heap[i] = tp_rand(&s);
    for (size_t j = 0; j < STACK_WORDS; j++)
        stk[j] = tp_rand(&s);
}

/* One deterministic update. Each heap word also depends on a neighbour,
 * so the update is not a per-word bijection that could hide corruption. */
static void update_state(uint64_t seed, uint64_t r, uint64_t *heap,
                         volatile uint64_t *stk)
{
    uint64_t k = round_key(seed, r);
    uint64_t carry = k;
    for (size_t i = 0; i < HEAP_WORDS; i++) {
        heap[i] = tp_mix64(heap[i] + carry + i);
        carry = heap[i] ^ k;
    }
    for (size_t j = 0; j < STACK_WORDS; j++)
        stk[j] = tp_mix64(stk[j] ^ k ^ (j * 0x100000001ULL) ^ heap[j * 97]);
}

static uint64_t hash_state(const uint64_t *heap, const volatile uint64_t *stk,
                           uint64_t r)
{
    uint64_t h = tp_hash_mix(0x736c6565ULL, r);
    h = tp_hash_words(h, heap, HEAP_WORDS);
    for (size_t j = 0; j < STACK_WORDS; j++)
        h = tp_hash_word(h, stk[j]);
    return tp_mix64(h);
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 20, sleep_ms = 50, seed = 1, fd_signals = 0;
    const struct tp_opt opts[] = {
        { "rounds",   &rounds,   0, 100000000ULL, "number of update+sleep rounds" },
        { "sleep-ms", &sleep_ms, 0, 3600000ULL, "milliseconds blocked per round" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the state updates" },
        { "fd-signals", &fd_signals, 0, 2,
          "1: each SIGUSR1 opens a UDP socket as fd 40, or closes it; "
          "2: a TCP listener (fd 40) with a connection not yet accepted "
          "(fd 41), or accepts it and closes them" },
    };
    tp_parse_args(argc, argv,
                  "Updates memory state, then blocks in nanosleep / "
                  "clock_nanosleep; checks the state after each wake-up.",
                  opts, TP_NOPTS(opts));

    if (fd_signals) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_handler = fd_signals == 2 ? toggle_pending_listener : toggle_fd;
        sigemptyset(&action.sa_mask);
        action.sa_flags = SA_RESTART;
        if (sigaction(SIGUSR1, &action, NULL) != 0)
            tp_syserr("sigaction(SIGUSR1)");
    }

    uint64_t *heap = malloc(HEAP_BYTES);
    if (heap == NULL)
        tp_syserr("malloc");
    volatile uint64_t stk[STACK_WORDS];          /* stack-resident state */
    volatile uint64_t round_no = 0;              /* more stack state */
    volatile uint64_t expect = 0;

    tp_say("sleeper: rounds=%llu sleep-ms=%llu seed=%llu\n",
           rounds, sleep_ms, seed);
    init_state(seed, heap, stk);

    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        round_no = r;
        update_state(seed, r, heap, stk);
        expect = hash_state(heap, stk, r);

        const char *how;
        if (r % 2 == 0) {
            how = "nanosleep";
            tp_nanosleep_ns(sleep_ms * 1000000ULL);
        } else {
            how = "clock_nanosleep";
            tp_clock_nanosleep_ns(sleep_ms * 1000000ULL);
        }

        if (round_no != r)
            tp_selfcheck_fail("round %llu: stack round counter became %llu",
                              (unsigned long long)(r + 1),
                              (unsigned long long)round_no);
        uint64_t now = hash_state(heap, stk, r);
        if (now != expect)
            tp_selfcheck_fail("round %llu: state hash %016llx after %s, "
                              "%016llx before",
                              (unsigned long long)(r + 1),
                              (unsigned long long)now,
                              how, (unsigned long long)expect);
        tp_say("round %llu/%llu %s state=%016llx\n",
               (unsigned long long)(r + 1), rounds, how,
               (unsigned long long)now);
    }

    /* Replay from scratch and compare with the live state. */
    uint64_t *heap2 = malloc(HEAP_BYTES);
    if (heap2 == NULL)
        tp_syserr("malloc");
    volatile uint64_t stk2[STACK_WORDS];
    init_state(seed, heap2, stk2);
    for (uint64_t r = 0; r < rounds; r++)
        update_state(seed, r, heap2, stk2);
    for (size_t i = 0; i < HEAP_WORDS; i++)
        if (heap[i] != heap2[i])
            tp_selfcheck_fail("replay: heap word %zu is %016llx, "
                              "expected %016llx", i,
                              (unsigned long long)heap[i],
                              (unsigned long long)heap2[i]);
    for (size_t j = 0; j < STACK_WORDS; j++)
        if (stk[j] != stk2[j])
            tp_selfcheck_fail("replay: stack word %zu is %016llx, "
                              "expected %016llx", j,
                              (unsigned long long)stk[j],
                              (unsigned long long)stk2[j]);

    uint64_t sum = tp_hash_mix(hash_state(heap, stk, rounds), rounds);
    free(heap);
    free(heap2);
    tp_finish(sum);
}
