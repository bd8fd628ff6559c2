/*
 * signals - signal dispositions, the blocked mask and pending signals.
 *
 * Installs:
 *   SIGUSR1     SA_SIGINFO|SA_RESTART, sa_sigaction handler
 *   SIGUSR2     plain handler, sa_mask = { SIGINT }
 *   SIGRTMIN+2  plain handler, SA_NODEFER
 *   SIGPIPE     SIG_IGN
 * and blocks { SIGUSR2, SIGRTMIN+3 }.
 *
 * Each round: kill(getpid(), SIGUSR1) one to three times (count drawn from
 * --seed), raise(SIGRTMIN+2), then query the mask and all four
 * dispositions and require them to be exactly as installed; pause
 * --pause-us. Every 50th round SIGUSR2 is sent while blocked, must show in
 * sigpending(), and must run its handler exactly once when briefly
 * unblocked. Handlers also check the mask they run under.
 */
#include "common.h"

#include <signal.h>
#include <unistd.h>

#define USR2_EVERY 50

/* Handler-side state. */
static volatile sig_atomic_t g_usr1_count;
static volatile sig_atomic_t g_usr2_count;
static volatile sig_atomic_t g_rt_count;
static volatile sig_atomic_t g_handler_errors;   /* bit set, see below */
static volatile sig_atomic_t g_rt_depth;

#define HERR_USR1_INFO  0x01   /* bad siginfo in SIGUSR1 handler */
#define HERR_USR1_MASK  0x02   /* unexpected mask inside SIGUSR1 handler */
#define HERR_USR2_MASK  0x04   /* unexpected mask inside SIGUSR2 handler */
#define HERR_RT_MASK    0x08   /* unexpected mask inside SIGRTMIN+2 handler */
#define HERR_RT_NEST    0x10   /* SIGRTMIN+2 handler re-entered */

static int g_sig_rt;       /* SIGRTMIN + 2 */
static int g_sig_rt_blk;   /* SIGRTMIN + 3 */

/* Expected masks (bit n-1 = signal n), computed once in main(). */
static uint64_t g_mask_main;      /* outside handlers */
static uint64_t g_mask_in_usr1;
static uint64_t g_mask_in_usr2;
static uint64_t g_mask_in_rt;

static inline uint64_t sigbit(int sig)
{
    return 1ULL << (sig - 1);
}

/* Bitmap of signals 1..64 in a sigset (async-signal-safe). */
static uint64_t set_bits(const sigset_t *set)
{
    uint64_t bits = 0;
    for (int s = 1; s <= 64 && s < NSIG; s++)
        if (sigismember(set, s) == 1)
            bits |= sigbit(s);
    return bits;
}

static uint64_t current_mask_bits(void)
{
    sigset_t cur;
    sigemptyset(&cur);
    if (sigprocmask(SIG_SETMASK, NULL, &cur) != 0)
        return ~0ULL;
    return set_bits(&cur);
}

static void on_usr1(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    if (sig != SIGUSR1 || info == NULL || info->si_signo != SIGUSR1 ||
        info->si_code != SI_USER || info->si_pid != getpid() ||
        info->si_uid != getuid())
        g_handler_errors |= HERR_USR1_INFO;
    if (current_mask_bits() != g_mask_in_usr1)
        g_handler_errors |= HERR_USR1_MASK;
    g_usr1_count++;
}

static void on_usr2(int sig)
{
    (void)sig;
    if (current_mask_bits() != g_mask_in_usr2)
        g_handler_errors |= HERR_USR2_MASK;
    g_usr2_count++;
}

static void on_rt(int sig)
{
    (void)sig;
    if (g_rt_depth != 0)
        g_handler_errors |= HERR_RT_NEST;
    g_rt_depth++;
    if (current_mask_bits() != g_mask_in_rt)
        g_handler_errors |= HERR_RT_MASK;
    g_rt_count++;
    g_rt_depth--;
}

/* ------------------------------------------------------------------ */

#define CHECKED_FLAGS (SA_SIGINFO | SA_RESTART | SA_NODEFER | SA_RESETHAND | \
                       SA_ONSTACK | SA_NOCLDSTOP | SA_NOCLDWAIT)

struct expect_disp {
    int sig;
    const char *name;
    int handler_id;        /* 0 = SIG_DFL, 1 = SIG_IGN, 2.. = our handlers */
    int flags;             /* expected sa_flags & CHECKED_FLAGS */
    uint64_t mask;         /* expected sa_mask bitmap */
};

static int handler_id(const struct sigaction *sa)
{
    if (sa->sa_flags & SA_SIGINFO) {
        if (sa->sa_sigaction == on_usr1)
            return 2;
        return -1;
    }
    if (sa->sa_handler == SIG_DFL)
        return 0;
    if (sa->sa_handler == SIG_IGN)
        return 1;
    if (sa->sa_handler == on_usr2)
        return 3;
    if (sa->sa_handler == on_rt)
        return 4;
    return -1;
}

static void install(int sig, const char *name, void (*h)(int),
                    void (*sh)(int, siginfo_t *, void *), int flags,
                    const int *mask_sigs, size_t nmask)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < nmask; i++)
        sigaddset(&sa.sa_mask, mask_sigs[i]);
    sa.sa_flags = flags;
    if (flags & SA_SIGINFO)
        sa.sa_sigaction = sh;
    else
        sa.sa_handler = h;
    if (sigaction(sig, &sa, NULL) != 0)
        tp_syserr("sigaction(%s)", name);
}

/* Verify mask and dispositions; returns a hash of the checked state. */
static uint64_t check_state(const struct expect_disp *ex, size_t n,
                            uint64_t round, const char *where)
{
    uint64_t mask = current_mask_bits();
    if (mask != g_mask_main)
        tp_selfcheck_fail("round %llu (%s): signal mask %016llx, "
                          "expected %016llx", (unsigned long long)round,
                          where, (unsigned long long)mask,
                          (unsigned long long)g_mask_main);
    uint64_t h = tp_hash_mix(0x7369676eULL, mask);

    for (size_t i = 0; i < n; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        if (sigaction(ex[i].sig, NULL, &sa) != 0)
            tp_syserr("sigaction query %s", ex[i].name);
        int id = handler_id(&sa);
        int flags = sa.sa_flags & CHECKED_FLAGS;
        uint64_t smask = set_bits(&sa.sa_mask);
        if (id != ex[i].handler_id)
            tp_selfcheck_fail("round %llu (%s): %s handler is not the "
                              "installed one (id %d, expected %d)",
                              (unsigned long long)round, where, ex[i].name,
                              id, ex[i].handler_id);
        if (flags != ex[i].flags)
            tp_selfcheck_fail("round %llu (%s): %s sa_flags&checked %#x, "
                              "expected %#x", (unsigned long long)round,
                              where, ex[i].name, (unsigned)flags,
                              (unsigned)ex[i].flags);
        if (smask != ex[i].mask)
            tp_selfcheck_fail("round %llu (%s): %s sa_mask %016llx, "
                              "expected %016llx", (unsigned long long)round,
                              where, ex[i].name, (unsigned long long)smask,
                              (unsigned long long)ex[i].mask);
        h = tp_hash_mix(h, (uint64_t)ex[i].sig);
        h = tp_hash_mix(h, (uint64_t)id);
        h = tp_hash_mix(h, (uint64_t)(unsigned)flags);
        h = tp_hash_mix(h, smask);
    }
    return h;
}

static void check_handler_errors(uint64_t round)
{
    int e = g_handler_errors;
    if (e == 0)
        return;
    tp_selfcheck_fail("round %llu: handler reported:%s%s%s%s%s",
                      (unsigned long long)round,
                      (e & HERR_USR1_INFO) ? " bad-SIGUSR1-siginfo" : "",
                      (e & HERR_USR1_MASK) ? " bad-mask-in-SIGUSR1" : "",
                      (e & HERR_USR2_MASK) ? " bad-mask-in-SIGUSR2" : "",
                      (e & HERR_RT_MASK) ? " bad-mask-in-SIGRTMIN+2" : "",
                      (e & HERR_RT_NEST) ? " SIGRTMIN+2-nested" : "");
}

static void expect_counts(uint64_t round, const char *where, uint64_t usr1,
                          uint64_t usr2, uint64_t rt)
{
    if ((uint64_t)g_usr1_count != usr1 || (uint64_t)g_usr2_count != usr2 ||
        (uint64_t)g_rt_count != rt)
        tp_selfcheck_fail("round %llu (%s): handler counts usr1=%llu "
                          "usr2=%llu rt=%llu, expected %llu/%llu/%llu",
                          (unsigned long long)round, where,
                          (unsigned long long)g_usr1_count,
                          (unsigned long long)g_usr2_count,
                          (unsigned long long)g_rt_count,
                          (unsigned long long)usr1, (unsigned long long)usr2,
                          (unsigned long long)rt);
}

static int is_pending(int sig)
{
    sigset_t p;
    sigemptyset(&p);
    if (sigpending(&p) != 0)
        tp_syserr("sigpending");
    return sigismember(&p, sig) == 1;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 200, pause_us = 2000, seed = 1;
    const struct tp_opt opts[] = {
        { "rounds",   &rounds,   0, 100000000ULL, "number of rounds" },
        { "pause-us", &pause_us, 0, 60000000ULL, "pause per round in microseconds" },
        { "seed",     &seed,     0, UINT64_MAX, "seed for the SIGUSR1 sends per round (1..3)" },
    };
    tp_parse_args(argc, argv,
                  "Self-signalling with checked dispositions, blocked mask and "
                  "pending signals.",
                  opts, TP_NOPTS(opts));

    g_sig_rt = SIGRTMIN + 2;
    g_sig_rt_blk = SIGRTMIN + 3;
    if (g_sig_rt_blk > SIGRTMAX || g_sig_rt_blk > 64)
        tp_syserr("no room for SIGRTMIN+3");

    const int usr2_mask[] = { SIGINT };
    g_mask_main = sigbit(SIGUSR2) | sigbit(g_sig_rt_blk);
    g_mask_in_usr1 = g_mask_main | sigbit(SIGUSR1);
    g_mask_in_rt = g_mask_main;                      /* SA_NODEFER */
    /* SIGUSR2 only runs while it is unblocked: mask then is
     * {SIGRTMIN+3} + sa_mask {SIGINT} + SIGUSR2 itself. */
    g_mask_in_usr2 = sigbit(g_sig_rt_blk) | sigbit(SIGINT) | sigbit(SIGUSR2);

    install(SIGUSR1, "SIGUSR1", NULL, on_usr1, SA_SIGINFO | SA_RESTART,
            NULL, 0);
    install(SIGUSR2, "SIGUSR2", on_usr2, NULL, 0, usr2_mask, 1);
    install(g_sig_rt, "SIGRTMIN+2", on_rt, NULL, SA_NODEFER, NULL, 0);
    install(SIGPIPE, "SIGPIPE", SIG_IGN, NULL, 0, NULL, 0);

    sigset_t blk, usr2only;
    sigemptyset(&blk);
    sigaddset(&blk, SIGUSR2);
    sigaddset(&blk, g_sig_rt_blk);
    if (sigprocmask(SIG_SETMASK, &blk, NULL) != 0)
        tp_syserr("sigprocmask");
    sigemptyset(&usr2only);
    sigaddset(&usr2only, SIGUSR2);

    const struct expect_disp ex[] = {
        { SIGUSR1,  "SIGUSR1",    2, SA_SIGINFO | SA_RESTART, 0 },
        { SIGUSR2,  "SIGUSR2",    3, 0, sigbit(SIGINT) },
        { g_sig_rt, "SIGRTMIN+2", 4, SA_NODEFER, 0 },
        { SIGPIPE,  "SIGPIPE",    1, 0, 0 },
    };
    const size_t nex = sizeof(ex) / sizeof(ex[0]);

    tp_say("signals: rounds=%llu pause-us=%llu seed=%llu\n",
           rounds, pause_us, seed);
    uint64_t sum = check_state(ex, nex, 0, "start");

    uint64_t rng = tp_mix64(seed ^ 0x7369676e616c73ULL);
    uint64_t want_usr1 = 0, want_usr2 = 0, want_rt = 0;
    for (uint64_t r = 0; r < rounds; r++) {
        /* SIGUSR2 is blocked here (only the SIGUSR2 check below unblocks
         * it, briefly), so the rendezvous can wait for it. */
        tp_rendezvous(r + 1);
        uint64_t sends = 1 + tp_rand_below(&rng, 3);
        for (uint64_t k = 0; k < sends; k++) {
            if (kill(getpid(), SIGUSR1) != 0)
                tp_syserr("kill SIGUSR1");
            want_usr1++;
            expect_counts(r + 1, "after SIGUSR1", want_usr1, want_usr2,
                          want_rt);
        }
        if (raise(g_sig_rt) != 0)
            tp_syserr("raise SIGRTMIN+2");
        want_rt++;
        expect_counts(r + 1, "after SIGRTMIN+2", want_usr1, want_usr2, want_rt);
        check_handler_errors(r + 1);

        uint64_t st = check_state(ex, nex, r + 1, "round");

        if ((r + 1) % USR2_EVERY == 0) {
            if (is_pending(SIGUSR2))
                tp_selfcheck_fail("round %llu: SIGUSR2 pending before send",
                                  (unsigned long long)(r + 1));
            if (kill(getpid(), SIGUSR2) != 0)
                tp_syserr("kill SIGUSR2");
            if (!is_pending(SIGUSR2))
                tp_selfcheck_fail("round %llu: blocked SIGUSR2 not pending",
                                  (unsigned long long)(r + 1));
            expect_counts(r + 1, "SIGUSR2 blocked", want_usr1, want_usr2,
                          want_rt);
            if (sigprocmask(SIG_UNBLOCK, &usr2only, NULL) != 0)
                tp_syserr("sigprocmask unblock");
            want_usr2++;
            expect_counts(r + 1, "SIGUSR2 unblocked", want_usr1, want_usr2,
                          want_rt);
            if (sigprocmask(SIG_BLOCK, &usr2only, NULL) != 0)
                tp_syserr("sigprocmask block");
            if (is_pending(SIGUSR2))
                tp_selfcheck_fail("round %llu: SIGUSR2 still pending after "
                                  "its handler ran",
                                  (unsigned long long)(r + 1));
            check_handler_errors(r + 1);
            st = tp_hash_mix(st, check_state(ex, nex, r + 1,
                                             "after SIGUSR2"));
        }

        sum = tp_hash_mix(sum, r);
        sum = tp_hash_mix(sum, sends);
        sum = tp_hash_mix(sum, (uint64_t)g_usr1_count);
        sum = tp_hash_mix(sum, (uint64_t)g_usr2_count);
        sum = tp_hash_mix(sum, (uint64_t)g_rt_count);
        sum = tp_hash_mix(sum, st);

        if ((r + 1) % USR2_EVERY == 0 || r + 1 == rounds)
            tp_say("round %llu/%llu usr1=%llu usr2=%llu rt=%llu\n",
                   (unsigned long long)(r + 1), rounds,
                   (unsigned long long)g_usr1_count,
                   (unsigned long long)g_usr2_count,
                   (unsigned long long)g_rt_count);

        if (r + 1 < rounds)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    sum = tp_hash_mix(sum, check_state(ex, nex, rounds, "end"));
    expect_counts(rounds, "end", want_usr1, want_usr2, want_rt);
    check_handler_errors(rounds);
    tp_finish(sum);
}
