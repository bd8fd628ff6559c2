/*
 * common.h - shared helpers for the fammig victim test programs.
 *
 * Everything here is static inline so each program only pays for what it
 * uses (and -Wunused-function stays quiet).
 *
 * Exit codes used by all programs:
 *   0  self-check passed, checksum line printed
 *   1  self-check failed ("selfcheck FAILED: ..." on stderr)
 *   2  bad command line
 *   3  system/environment error (mmap failed, stdout write failed, ...)
 *
 * Every program also takes the common flag --rendezvous N (see
 * tp_rendezvous below); tp_parse_args handles it, so no program lists it.
 */
#ifndef FAMMIG_TESTPROGRAMS_COMMON_H
#define FAMMIG_TESTPROGRAMS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TP_EXIT_OK       0
#define TP_EXIT_SELFCHK  1
#define TP_EXIT_USAGE    2
#define TP_EXIT_SYSERR   3

/* ------------------------------------------------------------------ */
/* PRNG and hashing                                                    */
/* ------------------------------------------------------------------ */

#define TP_GOLDEN 0x9e3779b97f4a7c15ULL

/* Bijective 64-bit finaliser (splitmix64 output function). */
static inline uint64_t tp_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* splitmix64 generator: state advances by the golden gamma. */
static inline uint64_t tp_rand(uint64_t *state)
{
    *state += TP_GOLDEN;
    return tp_mix64(*state);
}

/* Uniform value in [0, n) without a division (n > 0). */
static inline uint64_t tp_rand_below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)tp_rand(state) * n) >> 64);
}

/* Fold one 64-bit word into a running hash. Cheap enough for bulk data. */
static inline uint64_t tp_hash_word(uint64_t h, uint64_t w)
{
    h ^= w;
    h *= 0x100000001b3ULL ^ TP_GOLDEN;   /* odd multiplier */
    return h ^ (h >> 29);
}

/* Stronger fold for a handful of values (counts, ids, ...). */
static inline uint64_t tp_hash_mix(uint64_t h, uint64_t w)
{
    return tp_mix64(h ^ tp_mix64(w + TP_GOLDEN));
}

static inline uint64_t tp_hash_words(uint64_t h, const uint64_t *w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = tp_hash_word(h, w[i]);
    return h;
}

/* ------------------------------------------------------------------ */
/* Errors and output                                                   */
/* ------------------------------------------------------------------ */

static inline const char *tp_progname(const char *set)
{
    static const char *name = "testprog";
    if (set)
        name = set;
    return name;
}

__attribute__((noreturn, format(printf, 1, 2)))
static inline void tp_selfcheck_fail(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "selfcheck FAILED: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    exit(TP_EXIT_SELFCHK);
}

__attribute__((noreturn, format(printf, 1, 2)))
static inline void tp_syserr(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: error: ", tp_progname(NULL));
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s\n", strerror(saved));
    fflush(stderr);
    exit(TP_EXIT_SYSERR);
}

/* printf to stdout and flush at once, so a frozen process has its output
 * so far already in the (regular) output file. Only deterministic text may
 * be printed on stdout. */
__attribute__((format(printf, 1, 2)))
static inline void tp_say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    if (fflush(stdout) != 0 || ferror(stdout))
        tp_syserr("writing stdout");
}

/* Print the final checksum line (must be the last stdout line) and exit 0. */
__attribute__((noreturn))
static inline void tp_finish(uint64_t checksum)
{
    printf("checksum=%016llx\n", (unsigned long long)checksum);
    if (fflush(stdout) != 0 || ferror(stdout))
        tp_syserr("writing stdout");
    exit(TP_EXIT_OK);
}

/* ------------------------------------------------------------------ */
/* Sleeping                                                            */
/* ------------------------------------------------------------------ */

static inline struct timespec tp_ts_from_ns(uint64_t ns)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000ULL);
    ts.tv_nsec = (long)(ns % 1000000000ULL);
    return ts;
}

/* Relative nanosleep; on EINTR continue with the remaining time. */
static inline void tp_nanosleep_ns(uint64_t ns)
{
    struct timespec req = tp_ts_from_ns(ns), rem;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR)
            tp_syserr("nanosleep");
        req = rem;
    }
}

/* Relative clock_nanosleep on CLOCK_MONOTONIC; EINTR -> remaining time. */
static inline void tp_clock_nanosleep_ns(uint64_t ns)
{
    struct timespec req = tp_ts_from_ns(ns), rem;
    int rc;
    while ((rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &rem)) != 0) {
        if (rc != EINTR) {
            errno = rc;
            tp_syserr("clock_nanosleep");
        }
        req = rem;
    }
}

/* Monotonic seconds, for optional stderr diagnostics only (never hashed). */
static inline double tp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ */
/* Rendezvous: a deterministic freeze point                            */
/* ------------------------------------------------------------------ */

/*
 * With --rendezvous N (N > 0) the program blocks SIGUSR2 as soon as its
 * command line is parsed, and waits in sigwaitinfo() for SIGUSR2 just before
 * it starts step N of its main loop. A migrator freezes it there, so a seed
 * replays from exactly the same point; the reference run is released the
 * same way, so stdout does not depend on the option. SIGUSR2 stays blocked
 * for the rest of the run: unblocking it would make the mask depend on
 * whether the rendezvous was reached. If the program takes fewer than N
 * steps it never waits. Nothing about the rendezvous is ever printed.
 */

/* The step to wait before; 0 = no rendezvous. Set once by tp_parse_args. */
static inline unsigned long long *tp_rendezvous_step_slot(void)
{
    static unsigned long long step;
    return &step;
}

static inline void tp_rendezvous_block_signal(void)
{
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &usr2, NULL) != 0)
        tp_syserr("sigprocmask(block SIGUSR2) for --rendezvous");
}

/*
 * --rendezvous-wait K picks the call the program waits in at its rendezvous,
 * so that a freeze catches it inside each kind of interrupted system call:
 *   0  sigwaitinfo(SIGUSR2) (rt_sigtimedwait: not restarted, EINTR)
 *   1  nanosleep, the raw system call, for a day (-ERESTART_RESTARTBLOCK)
 *   2  FUTEX_WAIT_PRIVATE, no timeout (-ERESTARTSYS)
 *   3  FUTEX_WAIT_PRIVATE with a relative timeout of a day
 *      (-ERESTART_RESTARTBLOCK)
 *   4  ppoll on no descriptors, no timeout, with a temporary signal mask
 *      (-ERESTARTNOHAND; the thread's own mask is then the kernel's
 *      saved_sigmask, which a restore must give back)
 * Kinds 1-4 are released by TP_RENDEZVOUS_RELEASE_SIGNAL, whose handler
 * (installed at start-up, so the program's state is the same in every run)
 * only sets a flag: the call ends with EINTR and the loop sees the flag. A
 * release that lands before the call is entered is lost in the call's day
 * of sleep, so a migrator sends it once it sees the thread blocked in the
 * call (the futex value TP_RENDEZVOUS_FUTEX_VALUE, nanosleep rather than
 * glibc's clock_nanosleep, and ppoll's NULL timeout tell the rendezvous
 * call from a program's own). After the wait the program checks that its
 * signal mask is the one it had before (a lost saved_sigmask shows there).
 */
#define TP_RENDEZVOUS_WAIT_KINDS 5
#define TP_RENDEZVOUS_RELEASE_SIGNAL 62 /* SIGRTMAX - 2 under glibc */
#define TP_RENDEZVOUS_FUTEX_VALUE 0x52454e44u

static inline unsigned long long *tp_rendezvous_wait_slot(void)
{
    static unsigned long long kind;
    return &kind;
}

static inline volatile sig_atomic_t *tp_rendezvous_released_slot(void)
{
    static volatile sig_atomic_t released;
    return &released;
}

static void tp_rendezvous_release_handler(int signal_number)
{
    (void)signal_number;
    *tp_rendezvous_released_slot() = 1;
}

static inline void tp_rendezvous_install_release_handler(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = tp_rendezvous_release_handler;
    sigemptyset(&action.sa_mask);
    if (sigaction(TP_RENDEZVOUS_RELEASE_SIGNAL, &action, NULL) != 0)
        tp_syserr("sigaction(release signal) for --rendezvous-wait");
}

static inline void tp_rendezvous_wait_in_call(unsigned long long kind)
{
    static uint32_t word = TP_RENDEZVOUS_FUTEX_VALUE;
    const struct timespec day = { 86400, 0 };
    sigset_t before, temporary, after;
    if (sigprocmask(SIG_BLOCK, NULL, &before) != 0)
        tp_syserr("sigprocmask(read) for --rendezvous-wait");
    temporary = before;
    sigaddset(&temporary, SIGWINCH);
    sigdelset(&temporary, TP_RENDEZVOUS_RELEASE_SIGNAL);
    while (!*tp_rendezvous_released_slot()) {
        long rc;
        switch (kind) {
        case 1: rc = syscall(SYS_nanosleep, &day, NULL); break;
        case 2: rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, TP_RENDEZVOUS_FUTEX_VALUE, NULL, NULL, 0); break;
        case 3: rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, TP_RENDEZVOUS_FUTEX_VALUE, &day, NULL, 0); break;
        default: rc = syscall(SYS_ppoll, NULL, 0, NULL, &temporary, sizeof(uint64_t)); break;
        }
        if (rc != 0 && errno != EINTR && errno != EAGAIN)
            tp_syserr("the --rendezvous-wait %llu call", kind);
    }
    if (sigprocmask(SIG_BLOCK, NULL, &after) != 0)
        tp_syserr("sigprocmask(read) for --rendezvous-wait");
    for (int signal_number = 1; signal_number < 65; signal_number++) {
        if (sigismember(&before, signal_number) != sigismember(&after, signal_number))
            tp_selfcheck_fail("signal %d is %s after the rendezvous wait, "
                              "%s before", signal_number,
                              sigismember(&after, signal_number) ? "blocked" : "unblocked",
                              sigismember(&before, signal_number) ? "blocked" : "unblocked");
    }
}

/* Call once per step of the main loop, before the step's work, with the
 * 1-based number of the step about to run. */
static inline void tp_rendezvous(uint64_t step)
{
    unsigned long long target = *tp_rendezvous_step_slot();
    if (target == 0 || step != target)
        return;
    int saved = errno;
    if (*tp_rendezvous_wait_slot() != 0) {
        tp_rendezvous_wait_in_call(*tp_rendezvous_wait_slot());
        errno = saved;
        return;
    }
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    /* A ptrace or freezer stop ends rt_sigtimedwait with EINTR (it is not
     * restarted), so wait again: only SIGUSR2 itself releases us. */
    while (sigwaitinfo(&usr2, NULL) != SIGUSR2) {
        if (errno != EINTR)
            tp_syserr("sigwaitinfo(SIGUSR2) for --rendezvous");
    }
    errno = saved;
}

/* ------------------------------------------------------------------ */
/* Command line: only "--name value" (also "--name=value") and --help   */
/* ------------------------------------------------------------------ */

struct tp_opt {
    const char *name;          /* without the leading "--" */
    unsigned long long *val;   /* holds the default on entry */
    unsigned long long min, max;
    const char *help;
};

/* A flag whose value is text (a path, a workload letter, a mode list).
 * With choices (a NULL-terminated list) the value must be one of them,
 * compared without regard to case, and *val is then set to the list's own
 * spelling; without choices any non-empty text is taken as it is. A
 * separate type (not extra tp_opt fields) keeps every existing
 * { name, &val, min, max, help } initialiser complete under
 * -Wmissing-field-initializers. */
struct tp_stropt {
    const char *name;            /* without the leading "--" */
    const char **val;            /* holds the default on entry */
    const char *const *choices;  /* NULL-terminated, or NULL = any text */
    const char *help;
};

#define TP_NOPTS(a) (sizeof(a) / sizeof((a)[0]))

static inline void tp_usage(FILE *f, const char *desc,
                            const struct tp_opt *opts, size_t n,
                            const struct tp_stropt *sopts, size_t ns)
{
    fprintf(f, "usage: %s [--name value]...\n%s\n\noptions:\n",
            tp_progname(NULL), desc);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "  --%-10s %s (default %llu, range %llu..%llu)\n",
                opts[i].name, opts[i].help, *opts[i].val,
                opts[i].min, opts[i].max);
    for (size_t i = 0; i < ns; i++) {
        fprintf(f, "  --%-10s %s (default %s", sopts[i].name, sopts[i].help,
                *sopts[i].val);
        if (sopts[i].choices != NULL) {
            fprintf(f, ", one of ");
            for (size_t k = 0; sopts[i].choices[k] != NULL; k++)
                fprintf(f, "%s%s", k ? "|" : "", sopts[i].choices[k]);
        }
        fprintf(f, ")\n");
    }
    fprintf(f, "  --%-10s step (1-based) before which to wait for SIGUSR2; "
               "0 = never (default 0, range 0..%llu)\n",
            "rendezvous", (unsigned long long)UINT64_MAX);
    fprintf(f, "  --%-10s the call to wait in at the rendezvous: 0 sigwaitinfo "
               "for SIGUSR2, 1 nanosleep, 2 futex, 3 futex with a timeout, 4 ppoll "
               "(1-4 released by signal %d; default 0)\n",
            "rendezvous-wait", TP_RENDEZVOUS_RELEASE_SIGNAL);
    fprintf(f, "  --%-10s print this help and exit\n", "help");
    fprintf(f, "\nThe last stdout line is checksum=<16 hex digits>. Exit codes: "
               "0 ok, 1 self-check failed, 2 bad usage, 3 system error.\n");
}

__attribute__((noreturn, format(printf, 1, 2)))
static inline void tp_usage_error(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", tp_progname(NULL));
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n(try --help)\n");
    exit(TP_EXIT_USAGE);
}

/* Decimal, or hexadecimal with a 0x prefix. No sign, no trailing junk. */
static inline int tp_parse_u64(const char *s, unsigned long long *out)
{
    int base = 10;
    char *end;
    if (s == NULL || *s == '\0')
        return -1;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        if (*s == '\0')
            return -1;
    }
    if (*s < '0' || (*s > '9' && base == 10) ||
        (base == 16 && !((*s >= '0' && *s <= '9') ||
                         (*s >= 'a' && *s <= 'f') ||
                         (*s >= 'A' && *s <= 'F'))))
        return -1;
    errno = 0;
    *out = strtoull(s, &end, base);
    if (errno != 0 || *end != '\0')
        return -1;
    return 0;
}

/* ASCII-only case-insensitive equality (no locale involved). */
static inline int tp_same_text_ignoring_case(const char *a, const char *b)
{
    for (;; a++, b++) {
        char x = *a, y = *b;
        if (x >= 'A' && x <= 'Z')
            x = (char)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z')
            y = (char)(y - 'A' + 'a');
        if (x != y)
            return 0;
        if (x == '\0')
            return 1;
    }
}

static inline void tp_set_string(const struct tp_stropt *o, const char *value)
{
    if (*value == '\0')
        tp_usage_error("flag '--%s' needs a non-empty value", o->name);
    if (o->choices == NULL) {
        *o->val = value;
        return;
    }
    for (size_t k = 0; o->choices[k] != NULL; k++) {
        if (tp_same_text_ignoring_case(value, o->choices[k])) {
            *o->val = o->choices[k];
            return;
        }
    }
    fprintf(stderr, "%s: bad value '%s' for '--%s' (want one of ",
            tp_progname(NULL), value, o->name);
    for (size_t k = 0; o->choices[k] != NULL; k++)
        fprintf(stderr, "%s%s", k ? "|" : "", o->choices[k]);
    fprintf(stderr, ")\n(try --help)\n");
    exit(TP_EXIT_USAGE);
}

/* Parses numeric flags (opts) and text flags (sopts). */
static inline void tp_parse_args_with_strings(int argc, char **argv,
                                              const char *desc,
                                              const struct tp_opt *opts,
                                              size_t n,
                                              const struct tp_stropt *sopts,
                                              size_t ns)
{
    if (argc > 0 && argv[0] != NULL) {
        const char *slash = strrchr(argv[0], '/');
        tp_progname(slash ? slash + 1 : argv[0]);
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = NULL;
        size_t namelen;

        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            tp_usage(stdout, desc, opts, n, sopts, ns);
            fflush(stdout);
            exit(TP_EXIT_OK);
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0')
            tp_usage_error("unexpected argument '%s'", arg);
        arg += 2;
        namelen = strcspn(arg, "=");
        if (arg[namelen] == '=')
            value = arg + namelen + 1;

        /* --rendezvous is common to every program, so it is not in opts. */
        const struct tp_opt rendezvous = {
            "rendezvous", tp_rendezvous_step_slot(), 0, UINT64_MAX,
            "step before which to wait for SIGUSR2",
        };
        const struct tp_opt rendezvous_wait = {
            "rendezvous-wait", tp_rendezvous_wait_slot(), 0, TP_RENDEZVOUS_WAIT_KINDS - 1,
            "the call to wait in at the rendezvous: 0 sigwaitinfo, 1 nanosleep, "
            "2 futex, 3 futex with a timeout, 4 ppoll",
        };
        const struct tp_opt *o = NULL;
        const struct tp_stropt *so = NULL;
        if (strlen(rendezvous.name) == namelen &&
            strncmp(rendezvous.name, arg, namelen) == 0)
            o = &rendezvous;
        if (strlen(rendezvous_wait.name) == namelen &&
            strncmp(rendezvous_wait.name, arg, namelen) == 0)
            o = &rendezvous_wait;
        for (size_t k = 0; o == NULL && k < n; k++) {
            if (strlen(opts[k].name) == namelen &&
                strncmp(opts[k].name, arg, namelen) == 0) {
                o = &opts[k];
                break;
            }
        }
        for (size_t k = 0; o == NULL && so == NULL && k < ns; k++) {
            if (strlen(sopts[k].name) == namelen &&
                strncmp(sopts[k].name, arg, namelen) == 0)
                so = &sopts[k];
        }
        if (o == NULL && so == NULL)
            tp_usage_error("unknown flag '--%.*s'", (int)namelen, arg);
        if (value == NULL) {
            if (i + 1 >= argc)
                tp_usage_error("flag '--%s' needs a value",
                               o ? o->name : so->name);
            value = argv[++i];
        }
        if (so != NULL) {
            tp_set_string(so, value);
            continue;
        }
        unsigned long long v;
        if (tp_parse_u64(value, &v) != 0)
            tp_usage_error("bad value '%s' for '--%s' "
                           "(want an unsigned integer)", value, o->name);
        if (v < o->min || v > o->max)
            tp_usage_error("value %llu for '--%s' out of range "
                           "%llu..%llu", v, o->name, o->min, o->max);
        *o->val = v;
    }
    /* Before the program does anything else, so SIGUSR2 is blocked for the
     * whole run and the signal mask is the same in every run. */
    if (*tp_rendezvous_step_slot() != 0)
        tp_rendezvous_block_signal();
    if (*tp_rendezvous_step_slot() != 0 && *tp_rendezvous_wait_slot() != 0)
        tp_rendezvous_install_release_handler();
}

/* Parses numeric flags only (all programs without text flags). */
static inline void tp_parse_args(int argc, char **argv, const char *desc,
                                 const struct tp_opt *opts, size_t n)
{
    tp_parse_args_with_strings(argc, argv, desc, opts, n, NULL, 0);
}

#endif /* FAMMIG_TESTPROGRAMS_COMMON_H */
