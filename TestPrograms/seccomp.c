/*
 * seccomp - a process confined by a seccomp-BPF allow-list (libseccomp).
 *
 * Start-up (before the loop): allocate two 64 KiB heap buffers, print the
 * header line (so stdio has set up stdout), lower the soft RLIMIT_CORE to 0
 * (a filter kill must not leave a core file behind), set no_new_privs with
 * prctl(PR_SET_NO_NEW_PRIVS), then load a filter built with
 * seccomp_init(SCMP_ACT_KILL_PROCESS) that allows only:
 *
 *   write            stdout progress lines, stderr on self-check failure
 *   clock_nanosleep  glibc's nanosleep() makes this syscall (checked with
 *                    strace on glibc 2.36; the nanosleep syscall never is)
 *   restart_syscall  a sleep stopped by SIGSTOP/SIGCONT (or a ptrace or
 *                    freezer stop) is resumed through this syscall
 *   getpid           called once per round
 *   prctl            only with option PR_GET_NO_NEW_PRIVS or PR_GET_SECCOMP
 *   exit_group       exit()
 *   rt_sigtimedwait  the --rendezvous wait (glibc's sigwaitinfo())
 *   rt_sigprocmask   --rendezvous too; SIGUSR2 is blocked before the
 *                    filter is loaded; --rendezvous-wait reads the mask
 *   nanosleep, futex, ppoll, rt_sigreturn
 *                    the --rendezvous-wait calls, and the return from the
 *                    handler of their release signal
 *
 * Everything else, notably getppid, kills the whole process with SIGSYS.
 *
 * Each round: one deterministic update of the heap buffer, getpid() (must
 * still be the PID seen before the filter went on), prctl checks
 * (PR_GET_NO_NEW_PRIVS == 1, PR_GET_SECCOMP == 2 = filter mode), a progress
 * line, then a --pause-us sleep. If the round number equals --violate-at,
 * the program calls syscall(SYS_getppid) after printing the round line; the
 * filter must kill it (exit by SIGSYS, shell status 159), so no checksum
 * is printed. At the end the computation is replayed in the second buffer
 * and compared. The checksum covers the computation only.
 *
 * With --rendezvous N the program waits for SIGUSR2 before round N's
 * update, under the filter; at N == --violate-at it waits before that
 * round, so a migrated process makes the forbidden call after restore.
 */
#include "common.h"

#include <seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BUF_BYTES (64u * 1024u)
#define BUF_WORDS (BUF_BYTES / sizeof(uint64_t))

static void init_buf(uint64_t *buf)
{
    uint64_t s = tp_mix64(0x736563636f6d70ULL);
    for (size_t i = 0; i < BUF_WORDS; i++)
        buf[i] = tp_rand(&s);
}

/* One round of the computation; each word also depends on its predecessor. */
static void update_buf(uint64_t *buf, uint64_t r)
{
    uint64_t k = tp_mix64(0x726f756e64ULL + r * TP_GOLDEN);
    uint64_t carry = k;
    for (size_t i = 0; i < BUF_WORDS; i++) {
        buf[i] = tp_mix64(buf[i] ^ carry) + i;
        carry = buf[i] + k;
    }
}

static uint64_t hash_buf(const uint64_t *buf, uint64_t r)
{
    return tp_mix64(tp_hash_words(tp_hash_mix(0x7365636bULL, r), buf,
                                  BUF_WORDS));
}

static void check_modes(uint64_t round, const char *where)
{
    int nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
    if (nnp != 1)
        tp_selfcheck_fail("round %llu (%s): PR_GET_NO_NEW_PRIVS is %d, "
                          "expected 1", (unsigned long long)round, where, nnp);
    int mode = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
    if (mode != 2)
        tp_selfcheck_fail("round %llu (%s): PR_GET_SECCOMP is %d, expected 2 "
                          "(filter mode)", (unsigned long long)round, where,
                          mode);
}

static void allow(scmp_filter_ctx ctx, const char *name)
{
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) {
        errno = ENOSYS;
        tp_syserr("seccomp: unknown syscall %s", name);
    }
    int rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
    if (rc < 0) {
        errno = -rc;
        tp_syserr("seccomp_rule_add(%s)", name);
    }
}

static void allow_prctl_option(scmp_filter_ctx ctx, int option)
{
    int rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(prctl), 1,
                              SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)option));
    if (rc < 0) {
        errno = -rc;
        tp_syserr("seccomp_rule_add(prctl %d)", option);
    }
}

static void install_filter(void)
{
    /* rt_sigtimedwait, rt_sigprocmask and the last four are for --rendezvous. They are
     * allowed whether or not the flag is given, so the filter is the same
     * in every run. */
    static const char *const allowed[] = {
        "write", "clock_nanosleep", "restart_syscall",
        "getpid", "exit_group", "rt_sigtimedwait", "rt_sigprocmask",
        "nanosleep", "futex", "ppoll", "rt_sigreturn",
    };
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
    if (ctx == NULL) {
        errno = ENOMEM;
        tp_syserr("seccomp_init");
    }
    /* no_new_privs was set by us already; libseccomp need not do it. */
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    if (rc < 0) {
        errno = -rc;
        tp_syserr("seccomp_attr_set(CTL_NNP)");
    }
    for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++)
        allow(ctx, allowed[i]);
    allow_prctl_option(ctx, PR_GET_NO_NEW_PRIVS);
    allow_prctl_option(ctx, PR_GET_SECCOMP);
    rc = seccomp_load(ctx);
    if (rc < 0) {
        errno = -rc;
        tp_syserr("seccomp_load");
    }
    seccomp_release(ctx);   /* only frees user memory, no syscall needed */
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, pause_us = 20000, violate_at = 0;
    const struct tp_opt opts[] = {
        { "rounds",     &rounds,     0, 100000000ULL, "number of rounds" },
        { "pause-us",   &pause_us,   0, 60000000ULL, "pause per round in microseconds" },
        { "violate-at", &violate_at, 0, 100000000ULL,
          "round (1-based) that calls the forbidden getppid; 0 = never" },
    };
    tp_parse_args(argc, argv,
                  "Computation under a seccomp allow-list filter "
                  "(SCMP_ACT_KILL_PROCESS); getppid is forbidden.",
                  opts, TP_NOPTS(opts));
    if (violate_at > rounds)
        tp_usage_error("--violate-at %llu is beyond --rounds %llu",
                       violate_at, rounds);

    /* Everything that needs more than the allow-list happens here. */
    uint64_t *buf = malloc(BUF_BYTES);
    uint64_t *replay = malloc(BUF_BYTES);
    if (buf == NULL || replay == NULL)
        tp_syserr("malloc");
    init_buf(buf);
    tp_say("seccomp: rounds=%llu pause-us=%llu violate-at=%llu\n",
           rounds, pause_us, violate_at);

    struct rlimit rl;
    if (getrlimit(RLIMIT_CORE, &rl) != 0)
        tp_syserr("getrlimit(RLIMIT_CORE)");
    rl.rlim_cur = 0;
    if (setrlimit(RLIMIT_CORE, &rl) != 0)
        tp_syserr("setrlimit(RLIMIT_CORE)");

    const pid_t pid = getpid();
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        tp_syserr("prctl(PR_SET_NO_NEW_PRIVS)");
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        tp_selfcheck_fail("no_new_privs did not stick");
    install_filter();
    check_modes(0, "after load");
    tp_say("filter loaded\n");

    uint64_t sum = tp_hash_mix(0x736563636f6d70ULL, rounds);
    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        update_buf(buf, r);
        uint64_t h = hash_buf(buf, r);
        sum = tp_hash_mix(sum, h);

        pid_t now = getpid();
        if (now != pid)
            tp_selfcheck_fail("round %llu: getpid() is %ld, was %ld before "
                              "the filter", (unsigned long long)(r + 1),
                              (long)now, (long)pid);
        check_modes(r + 1, "round");

        tp_say("round %llu/%llu state=%016llx\n",
               (unsigned long long)(r + 1), rounds, (unsigned long long)h);

        if (r + 1 == violate_at) {
            tp_say("round %llu: calling forbidden getppid\n",
                   (unsigned long long)(r + 1));
            long ppid = syscall(SYS_getppid);
            tp_selfcheck_fail("round %llu: getppid returned %ld (errno %d); "
                              "the filter should have killed the process",
                              (unsigned long long)(r + 1), ppid, errno);
        }

        if (r + 1 < rounds)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    /* Replay the computation and compare with the live buffer. */
    init_buf(replay);
    for (uint64_t r = 0; r < rounds; r++)
        update_buf(replay, r);
    for (size_t i = 0; i < BUF_WORDS; i++)
        if (buf[i] != replay[i])
            tp_selfcheck_fail("replay: word %zu is %016llx, expected %016llx",
                              i, (unsigned long long)buf[i],
                              (unsigned long long)replay[i]);
    check_modes(rounds, "end");

    sum = tp_hash_mix(sum, hash_buf(buf, rounds));
    tp_say("replay ok\n");
    /* No free(): a trimming free() could need brk/munmap, which the
     * allow-list does not grant. exit() only flushes stdio (write). */
    tp_finish(sum);
}
