/*
 * forker - a parent with a child: what a migrator must refuse (or migrate
 * as a tree), never destroy.
 *
 * Before the loop it forks one child. The child sets PR_SET_PDEATHSIG
 * SIGKILL (so it never outlives its parent), blocks SIGTERM and waits for it
 * in sigwaitinfo, checking once a second that its parent is still the one
 * that forked it; on SIGTERM it exits with status 42. The parent runs
 * --rounds rounds: a deterministic heap update, a check that the child is
 * still running (waitpid WNOHANG answers 0), a progress line, a --pause-us
 * pause. At the end it sends SIGTERM to the child, reaps it and checks that
 * it exited with 42, then replays the computation. Only the parent prints.
 */
#include "common.h"

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define HEAP_WORDS 2048

static void update(uint64_t seed, uint64_t r, uint64_t *heap)
{
    uint64_t k = tp_mix64(seed ^ (r * TP_GOLDEN) ^ 0x666f726bULL);
    for (size_t i = 0; i < HEAP_WORDS; i++) {
        heap[i] = tp_mix64(heap[i] ^ k ^ i);
        k += heap[i];
    }
}

static void child_main(pid_t parent)
{
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        _exit(TP_EXIT_SYSERR);
    /* The parent may have died before the PDEATHSIG was armed. */
    if (getppid() != parent)
        _exit(TP_EXIT_SELFCHK);
    struct timespec second = { 1, 0 };
    for (;;) {
        int sig = sigtimedwait(&term, NULL, &second);
        if (sig == SIGTERM)
            _exit(42);
        if (getppid() != parent)
            _exit(TP_EXIT_SELFCHK);
    }
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, pause_us = 10000, seed = 1;
    const struct tp_opt opts[] = {
        { "rounds",   &rounds,   0, 100000000ULL, "number of rounds" },
        { "pause-us", &pause_us, 0, 10000000ULL, "microseconds paused per round" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the heap updates" },
    };
    tp_parse_args(argc, argv,
                  "Forks a child that waits for SIGTERM; the parent updates "
                  "memory and checks the child each round.",
                  opts, TP_NOPTS(opts));

    uint64_t *heap = calloc(HEAP_WORDS, sizeof *heap);
    uint64_t *replay = calloc(HEAP_WORDS, sizeof *replay);
    if (heap == NULL || replay == NULL)
        tp_syserr("calloc");
    tp_say("forker: rounds=%llu seed=%llu\n", rounds, seed);

    /* SIGTERM blocked before the fork, so the child cannot miss it. */
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &term, &old) != 0)
        tp_syserr("sigprocmask");
    pid_t parent = getpid();
    fflush(stdout);
    pid_t child = fork();
    if (child < 0)
        tp_syserr("fork");
    if (child == 0)
        child_main(parent);
    if (sigprocmask(SIG_SETMASK, &old, NULL) != 0)
        tp_syserr("sigprocmask");

    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        update(seed, r, heap);
        int status;
        pid_t got = waitpid(child, &status, WNOHANG);
        if (got != 0)
            tp_selfcheck_fail("round %llu: the child is gone (waitpid %d, status %#x)",
                              (unsigned long long)(r + 1), (int)got, got > 0 ? status : 0);
        tp_say("round %llu/%llu child running\n", (unsigned long long)(r + 1), rounds);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    if (kill(child, SIGTERM) != 0)
        tp_syserr("kill child");
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR)
            tp_syserr("waitpid");
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 42)
        tp_selfcheck_fail("the child ended with status %#x, not exit 42", status);

    for (uint64_t r = 0; r < rounds; r++)
        update(seed, r, replay);
    for (size_t i = 0; i < HEAP_WORDS; i++)
        if (heap[i] != replay[i])
            tp_selfcheck_fail("replay: heap word %zu differs", i);
    tp_finish(tp_mix64(tp_hash_words(tp_hash_mix(0x666f726bULL, rounds), heap, HEAP_WORDS)));
}
