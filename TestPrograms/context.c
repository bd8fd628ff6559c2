/*
 * context - process context that lives outside memory and registers.
 *
 * At start-up it creates a directory (mkdtemp "fammig-context-XXXXXX" in
 * --dir, never printed) holding a file "marker", and chdirs into it; sets
 * umask --umask, writes --oom to /proc/self/oom_score_adj, sets
 * PR_SET_DUMPABLE --dumpable and PR_SET_THP_DISABLE as --thp says (0 off,
 * 1 disabled, 3 disabled except where madvised), and installs a 64 KiB
 * alternate signal stack (with SS_AUTODISARM when --autodisarm 1) and a
 * SIGUSR1 handler with SA_ONSTACK; with --thread 1 a second thread sets its
 * own alternate stack and checks it (raise, sigaltstack) when asked, once a
 * round. With --itimers 1 it also arms
 * ITIMER_REAL periodically every --alarm-ms ms (a SIGALRM handler counts
 * the expiries) and ITIMER_VIRTUAL and ITIMER_PROF one-shot for an hour.
 * With --advise 1 it maps 16 pages and gives pairs of them madvise flags
 * (MADV_DONTDUMP, DONTFORK, WIPEONFORK, HUGEPAGE, NOHUGEPAGE, MERGEABLE,
 * SEQUENTIAL, RANDOM), and registers for private expedited membarriers
 * (plain, SYNC_CORE and RSEQ); each round it checks that each of the three
 * membarriers is allowed (EPERM unregistered) and the registrations
 * membarrier reports, and at the end the flags in its own /proc/self/smaps
 * (not each round: a descriptor open on /proc is refused by fammig). (A global
 * expedited registration is not reported by GET_REGISTRATIONS, 6.18.)
 *
 * Each round it makes one deterministic update of a heap buffer, raises
 * SIGUSR1 (the handler must run on the alternate stack), then checks that
 * the working directory is still the one it made (getcwd, the identity of
 * ".", and "marker" found by a relative path), the umask, oom_score_adj, the
 * dumpable and THP-disable flags, and sigaltstack are all still as set;
 * with --itimers 1, that the two CPU timers are still armed and never went
 * up, that ITIMER_REAL is still armed with its interval, and that a SIGALRM
 * arrives within 100 alarm periods. It prints one line per round and pauses
 * --pause-us. At the end it removes its directory (also on failure, via
 * atexit) and replays the computation.
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>

#ifndef SS_AUTODISARM
#define SS_AUTODISARM (1U << 31)
#endif
#ifndef PR_THP_DISABLE_EXCEPT_ADVISED
#define PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1)
#endif

#define HEAP_WORDS 4096
#define ALT_STACK_BYTES (64 * 1024)

static char work_dir[PATH_MAX];
static char marker_path[PATH_MAX + 16];
static int made_dir;
static unsigned char alt_stack[ALT_STACK_BYTES] __attribute__((aligned(16)));
static unsigned char worker_alt_stack[ALT_STACK_BYTES] __attribute__((aligned(16)));
static volatile sig_atomic_t alarm_count;
/* Per thread: each thread has its own alternate stack and counts its own
 * SIGUSR1s (raise() sends to the calling thread). */
static __thread unsigned char *my_alt_stack;
static __thread volatile sig_atomic_t usr1_count, usr1_on_alt;

/* --advise 1: what each odd page of the region gets (the even ones stay
 * plain, so that every advised page is a mapping of its own). */
static const struct { int advice; const char *mnemonic; } advised[] = {
    { 16 /* MADV_DONTDUMP */, "dd" }, { 10 /* MADV_DONTFORK */, "dc" },
    { 18 /* MADV_WIPEONFORK */, "wf" }, { 14 /* MADV_HUGEPAGE */, "hg" },
    { 15 /* MADV_NOHUGEPAGE */, "nh" }, { 12 /* MADV_MERGEABLE */, "mg" },
    { 2 /* MADV_SEQUENTIAL */, "sr" }, { 1 /* MADV_RANDOM */, "rr" },
};
#define ADVISED_COUNT (sizeof advised / sizeof advised[0])
/* Each private expedited membarrier command, and its registration (the
 * next bit). */
static const int barriers[] = { 1 << 3, 1 << 5, 1 << 7 };
#define BARRIER_COUNT (sizeof barriers / sizeof barriers[0])
#define MEMBARRIER_GET_REGISTRATIONS (1 << 9)

/* Whether the VmFlags of the mapping at `start` (in /proc/self/smaps) hold
 * `mnemonic`; -1 when no mapping starts there. */
static int has_vm_flag(uintptr_t start, const char *mnemonic)
{
    FILE *smaps = fopen("/proc/self/smaps", "re");
    if (smaps == NULL)
        tp_syserr("open /proc/self/smaps");
    char line[512];
    int found = -1, in_it = 0;
    while (fgets(line, sizeof line, smaps) != NULL) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in_it = lo == start;
        } else if (in_it && strncmp(line, "VmFlags:", 8) == 0) {
            char wanted[8];
            snprintf(wanted, sizeof wanted, " %s", mnemonic);
            char *at = strstr(line, wanted);
            found = at != NULL && (at[3] == ' ' || at[3] == '\n');
            break;
        }
    }
    fclose(smaps);
    return found;
}

static const char *check_advice(unsigned char *region, long page, int with_flags)
{
    static char error[160];
    for (size_t i = 0; with_flags && i < ADVISED_COUNT; i++) {
        uintptr_t start = (uintptr_t)(region + (2 * i + 1) * page);
        int has = has_vm_flag(start, advised[i].mnemonic);
        if (has != 1) {
            snprintf(error, sizeof error, "page %zu: %s", 2 * i + 1,
                     has < 0 ? "no mapping starts there" : "VmFlags lost its flag");
            return error;
        }
        if (has_vm_flag(start - (uintptr_t)page, advised[i].mnemonic) == 1) {
            snprintf(error, sizeof error, "page %zu: plain page has %s", 2 * i, advised[i].mnemonic);
            return error;
        }
    }
    long registrations = syscall(SYS_membarrier, MEMBARRIER_GET_REGISTRATIONS, 0, 0);
    long want = 0;
    for (size_t i = 0; i < BARRIER_COUNT; i++)
        want |= barriers[i] << 1;
    if (registrations != want) {
        snprintf(error, sizeof error, "membarrier registrations %#lx, want %#lx", registrations, want);
        return error;
    }
    for (size_t i = 0; i < BARRIER_COUNT; i++)
        if (syscall(SYS_membarrier, barriers[i], 0, 0) != 0) {
            snprintf(error, sizeof error, "membarrier %#x: %s", barriers[i], strerror(errno));
            return error;
        }
    return NULL;
}

static void cleanup(void)
{
    if (made_dir) {
        unlink(marker_path);
        rmdir(work_dir);
        made_dir = 0;
    }
}

static void on_usr1(int sig)
{
    volatile unsigned char here = 0;
    (void)sig;
    uintptr_t at = (uintptr_t)&here;
    if (my_alt_stack != NULL && at >= (uintptr_t)my_alt_stack &&
        at < (uintptr_t)my_alt_stack + ALT_STACK_BYTES)
        usr1_on_alt++;
    usr1_count++;
}

static void on_alarm(int sig)
{
    (void)sig;
    alarm_count++;
}

static long read_oom(void)
{
    char text[32];
    int fd = open("/proc/self/oom_score_adj", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        tp_syserr("open /proc/self/oom_score_adj");
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        tp_syserr("read /proc/self/oom_score_adj");
    text[n] = '\0';
    return strtol(text, NULL, 10);
}

static void write_oom(long value)
{
    char text[32];
    int len = snprintf(text, sizeof text, "%ld", value);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        tp_syserr("open /proc/self/oom_score_adj for writing");
    if (write(fd, text, (size_t)len) != len)
        tp_syserr("write %s to /proc/self/oom_score_adj", text);
    close(fd);
}

static uint64_t timeval_us(struct timeval tv)
{
    return (uint64_t)tv.tv_sec * 1000000ULL + (uint64_t)tv.tv_usec;
}

static void update(uint64_t seed, uint64_t r, uint64_t *heap)
{
    uint64_t k = tp_mix64(seed ^ (r * TP_GOLDEN) ^ 0x636f6e74ULL);
    for (size_t i = 0; i < HEAP_WORDS; i++) {
        heap[i] = tp_mix64(heap[i] + k + i);
        k ^= heap[i];
    }
}

/* Raises SIGUSR1 in the calling thread (the handler must run on this
 * thread's alternate stack) and checks sigaltstack; returns an error text
 * or NULL. */
static const char *check_alt_stack(unsigned char *stack, int autodisarm)
{
    sig_atomic_t before = usr1_count, on_alt = usr1_on_alt;
    raise(SIGUSR1);
    if (usr1_count != before + 1 || usr1_on_alt != on_alt + 1)
        return "the SIGUSR1 handler did not run once on the alternate stack";
    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0)
        return "sigaltstack query failed";
    if (cur.ss_sp != stack || cur.ss_size != ALT_STACK_BYTES ||
        ((unsigned)cur.ss_flags & ~(unsigned)SS_ONSTACK) != (autodisarm ? (unsigned)SS_AUTODISARM : 0u))
        return "sigaltstack is not the one set";
    return NULL;
}

/* --thread 1: a second thread with its own alternate stack, which checks it
 * whenever the main thread asks (once per round). */
static pthread_mutex_t worker_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t worker_cond = PTHREAD_COND_INITIALIZER;
static uint64_t worker_requested, worker_done;
static int worker_quit, worker_autodisarm;
static const char *worker_error;

static void *worker_main(void *unused)
{
    (void)unused;
    stack_t ss = { .ss_sp = worker_alt_stack, .ss_size = ALT_STACK_BYTES,
                   .ss_flags = worker_autodisarm ? (int)SS_AUTODISARM : 0 };
    if (sigaltstack(&ss, NULL) != 0)
        worker_error = "worker sigaltstack failed";
    my_alt_stack = worker_alt_stack;
    pthread_mutex_lock(&worker_lock);
    for (;;) {
        while (worker_requested == worker_done && !worker_quit)
            pthread_cond_wait(&worker_cond, &worker_lock);
        if (worker_quit)
            break;
        pthread_mutex_unlock(&worker_lock);
        const char *error = check_alt_stack(worker_alt_stack, worker_autodisarm);
        pthread_mutex_lock(&worker_lock);
        if (error != NULL && worker_error == NULL)
            worker_error = error;
        worker_done++;
        pthread_cond_broadcast(&worker_cond);
    }
    pthread_mutex_unlock(&worker_lock);
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, pause_us = 10000, seed = 1;
    unsigned long long mask = 027, oom = 345, dumpable = 0, thp = 1;
    unsigned long long autodisarm = 0, itimers = 0, alarm_ms = 5, thread = 0, advise = 0, lock_page = 0;
    const char *dir = "/tmp";
    const struct tp_opt opts[] = {
        { "rounds",     &rounds,     0, 100000000ULL, "number of rounds" },
        { "pause-us",   &pause_us,   0, 10000000ULL, "microseconds paused per round" },
        { "seed",       &seed,       0, UINT64_MAX, "seed of the heap updates" },
        { "umask",      &mask,       0, 0777, "umask to set" },
        { "oom",        &oom,        0, 1000, "oom_score_adj to set (0..1000)" },
        { "dumpable",   &dumpable,   0, 1, "PR_SET_DUMPABLE value" },
        { "thp",        &thp,        0, 3, "THP: 0 enabled, 1 disabled, 3 disabled except madvised" },
        { "autodisarm", &autodisarm, 0, 1, "SS_AUTODISARM on the alternate stack" },
        { "itimers",    &itimers,    0, 1, "arm ITIMER_REAL/VIRTUAL/PROF and check them" },
        { "alarm-ms",   &alarm_ms,   1, 1000, "ITIMER_REAL period in ms (--itimers 1)" },
        { "thread",     &thread,     0, 1, "a second thread with its own alternate stack" },
        { "advise",     &advise,     0, 1, "madvise flags on 8 pages and membarrier registrations" },
        { "mlock",      &lock_page,  0, 1, "mlock one page of its own (which fammig refuses)" },
    };
    const struct tp_stropt sopts[] = {
        { "dir", &dir, NULL, "where to create the working directory" },
    };
    tp_parse_args_with_strings(argc, argv,
                               "Sets cwd, umask, oom_score_adj, dumpable, "
                               "THP-disable, sigaltstack (and itimers); "
                               "checks them every round.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));
    if (thp == 2)
        tp_usage_error("--thp takes 0, 1 or 3");

    uint64_t *heap = calloc(HEAP_WORDS, sizeof *heap);
    uint64_t *replay = calloc(HEAP_WORDS, sizeof *replay);
    if (heap == NULL || replay == NULL)
        tp_syserr("calloc");
    tp_say("context: rounds=%llu umask=%03llo oom=%llu dumpable=%llu thp=%llu "
           "autodisarm=%llu itimers=%llu\n", rounds, mask, oom, dumpable, thp,
           autodisarm, itimers);

    /* The working directory. */
    if (snprintf(work_dir, sizeof work_dir, "%s/fammig-context-XXXXXX", dir)
            >= (int)sizeof work_dir)
        tp_usage_error("--dir is too long");
    if (mkdtemp(work_dir) == NULL)
        tp_syserr("mkdtemp in %s", dir);
    made_dir = 1;
    atexit(cleanup);
    snprintf(marker_path, sizeof marker_path, "%s/marker", work_dir);
    int fd = open(marker_path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0)
        tp_syserr("create %s", marker_path);
    close(fd);
    if (chdir(work_dir) != 0)
        tp_syserr("chdir %s", work_dir);
    struct stat dir_id;
    if (stat(".", &dir_id) != 0)
        tp_syserr("stat .");

    umask((mode_t)mask);
    write_oom((long)oom);
    if (prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0) != 0)
        tp_syserr("PR_SET_DUMPABLE");
    if (prctl(PR_SET_THP_DISABLE, thp & 1, thp & PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0) != 0)
        tp_syserr("PR_SET_THP_DISABLE %llu", thp);

    stack_t ss = { .ss_sp = alt_stack, .ss_size = ALT_STACK_BYTES,
                   .ss_flags = autodisarm ? (int)SS_AUTODISARM : 0 };
    if (sigaltstack(&ss, NULL) != 0)
        tp_syserr("sigaltstack");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        tp_syserr("sigaction SIGUSR1");
    my_alt_stack = alt_stack;
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *region = NULL;
    if (advise) {
        region = mmap(NULL, (size_t)(2 * ADVISED_COUNT) * (size_t)page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (region == MAP_FAILED)
            tp_syserr("mmap");
        for (size_t i = 0; i < ADVISED_COUNT; i++)
            if (madvise(region + (2 * i + 1) * page, (size_t)page, advised[i].advice) != 0)
                tp_syserr("madvise %s", advised[i].mnemonic);
        for (size_t i = 0; i < BARRIER_COUNT; i++)
            if (syscall(SYS_membarrier, barriers[i] << 1, 0, 0) != 0)
                tp_syserr("membarrier register %#x", barriers[i] << 1);
        const char *error = check_advice(region, page, 1);
        if (error != NULL)
            tp_syserr("right after madvise: %s", error);
    }
    if (lock_page) {
        unsigned char *locked = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (locked == MAP_FAILED || mlock(locked, (size_t)page) != 0)
            tp_syserr("mlock");
    }
    pthread_t worker;
    if (thread) {
        worker_autodisarm = (int)autodisarm;
        int rc = pthread_create(&worker, NULL, worker_main, NULL);
        if (rc != 0) {
            errno = rc;
            tp_syserr("pthread_create");
        }
    }

    /* setitimer adds a tick to CPU timers (so they never fire early): the
     * first reading may be above the hour, so start from no bound; a
     * restorer that sets the time left again adds a tick too, so allow one
     * (at most 10 ms: HZ >= 100) above the previous reading. */
    const uint64_t tick_slack_us = 10000;
    uint64_t last_virtual = UINT64_MAX - tick_slack_us, last_prof = UINT64_MAX - tick_slack_us;
    if (itimers) {
        sa.sa_handler = on_alarm;
        sa.sa_flags = SA_RESTART;
        if (sigaction(SIGALRM, &sa, NULL) != 0)
            tp_syserr("sigaction SIGALRM");
        struct itimerval real = {
            .it_interval = { 0, (suseconds_t)(alarm_ms * 1000) },
            .it_value = { 0, (suseconds_t)(alarm_ms * 1000) },
        };
        if (alarm_ms >= 1000)
            real.it_interval = real.it_value = (struct timeval){ 1, 0 };
        struct itimerval cpu = { .it_interval = { 0, 0 }, .it_value = { 3600, 0 } };
        if (setitimer(ITIMER_REAL, &real, NULL) != 0 ||
            setitimer(ITIMER_VIRTUAL, &cpu, NULL) != 0 ||
            setitimer(ITIMER_PROF, &cpu, NULL) != 0)
            tp_syserr("setitimer");
    }

    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        update(seed, r, heap);

        const char *alt_error = check_alt_stack(alt_stack, (int)autodisarm);
        if (alt_error != NULL)
            tp_selfcheck_fail("round %llu: main thread: %s", (unsigned long long)(r + 1), alt_error);
        if (thread) {
            pthread_mutex_lock(&worker_lock);
            worker_requested++;
            pthread_cond_broadcast(&worker_cond);
            while (worker_done != worker_requested)
                pthread_cond_wait(&worker_cond, &worker_lock);
            const char *error = worker_error;
            pthread_mutex_unlock(&worker_lock);
            if (error != NULL)
                tp_selfcheck_fail("round %llu: second thread: %s", (unsigned long long)(r + 1), error);
        }

        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof cwd) == NULL)
            tp_selfcheck_fail("round %llu: getcwd: %s", (unsigned long long)(r + 1),
                              strerror(errno));
        if (strcmp(cwd, work_dir) != 0)
            tp_selfcheck_fail("round %llu: working directory is %s, not %s",
                              (unsigned long long)(r + 1), cwd, work_dir);
        struct stat now_id, marker;
        if (stat(".", &now_id) != 0 || now_id.st_dev != dir_id.st_dev ||
            now_id.st_ino != dir_id.st_ino)
            tp_selfcheck_fail("round %llu: \".\" is no longer the directory made",
                              (unsigned long long)(r + 1));
        if (stat("marker", &marker) != 0)
            tp_selfcheck_fail("round %llu: ./marker not found: %s",
                              (unsigned long long)(r + 1), strerror(errno));

        mode_t old = umask(0);
        umask(old);
        if (old != (mode_t)mask)
            tp_selfcheck_fail("round %llu: umask %03o, want %03llo",
                              (unsigned long long)(r + 1), (unsigned)old, mask);
        long oom_now = read_oom();
        if (oom_now != (long)oom)
            tp_selfcheck_fail("round %llu: oom_score_adj %ld, want %llu",
                              (unsigned long long)(r + 1), oom_now, oom);
        int d = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
        if (d != (int)dumpable)
            tp_selfcheck_fail("round %llu: dumpable %d, want %llu",
                              (unsigned long long)(r + 1), d, dumpable);
        int t = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
        if (t != (int)thp)
            tp_selfcheck_fail("round %llu: THP-disable %d, want %llu",
                              (unsigned long long)(r + 1), t, thp);

        if (itimers) {
            struct itimerval v, p, real;
            if (getitimer(ITIMER_VIRTUAL, &v) != 0 || getitimer(ITIMER_PROF, &p) != 0 ||
                getitimer(ITIMER_REAL, &real) != 0)
                tp_syserr("getitimer");
            uint64_t v_us = timeval_us(v.it_value), p_us = timeval_us(p.it_value);
            if (v_us == 0 || v_us > last_virtual + tick_slack_us || p_us == 0 ||
                p_us > last_prof + tick_slack_us || v_us > 3601000000ULL || p_us > 3601000000ULL)
                tp_selfcheck_fail("round %llu: CPU timers left %llu/%llu us, before "
                                  "%llu/%llu us (must stay armed and not go up)",
                                  (unsigned long long)(r + 1), (unsigned long long)v_us,
                                  (unsigned long long)p_us, (unsigned long long)last_virtual,
                                  (unsigned long long)last_prof);
            last_virtual = v_us;
            last_prof = p_us;
            uint64_t period = alarm_ms >= 1000 ? 1000000ULL : alarm_ms * 1000;
            /* A periodic ITIMER_REAL that has just expired reads 0 left until its SIGALRM is
             * dequeued (the kernel re-arms it then): under load that happens between two of
             * these reads. Armed shows in the interval, and in the SIGALRM awaited below. */
            if (timeval_us(real.it_interval) != period || timeval_us(real.it_value) > period)
                tp_selfcheck_fail("round %llu: ITIMER_REAL %llu us left of period "
                                  "%llu us, want 0..%llu of %llu",
                                  (unsigned long long)(r + 1),
                                  (unsigned long long)timeval_us(real.it_value),
                                  (unsigned long long)timeval_us(real.it_interval),
                                  (unsigned long long)period, (unsigned long long)period);
            sig_atomic_t alarms = alarm_count;
            for (int i = 0; alarm_count == alarms; i++) {
                if (i >= 100)
                    tp_selfcheck_fail("round %llu: no SIGALRM within 100 periods",
                                      (unsigned long long)(r + 1));
                tp_nanosleep_ns(period * 1000ULL);
            }
        }

        if (advise) {
            const char *error = check_advice(region, page, r + 1 == rounds);
            if (error != NULL)
                tp_selfcheck_fail("round %llu: %s", (unsigned long long)(r + 1), error);
        }

        tp_say("round %llu/%llu ok\n", (unsigned long long)(r + 1), rounds);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    if (thread) {
        pthread_mutex_lock(&worker_lock);
        worker_quit = 1;
        pthread_cond_broadcast(&worker_cond);
        pthread_mutex_unlock(&worker_lock);
        pthread_join(worker, NULL);
    }
    for (uint64_t r = 0; r < rounds; r++)
        update(seed, r, replay);
    for (size_t i = 0; i < HEAP_WORDS; i++)
        if (heap[i] != replay[i])
            tp_selfcheck_fail("replay: heap word %zu differs", i);

    uint64_t sum = tp_hash_words(tp_hash_mix(0x636f6e74ULL, rounds), heap, HEAP_WORDS);
    sum = tp_hash_mix(sum, mask);
    sum = tp_hash_mix(sum, oom);
    sum = tp_hash_mix(sum, dumpable * 16 + thp);
    sum = tp_hash_mix(sum, (uint64_t)usr1_count);
    if (advise)
        sum = tp_hash_mix(sum, ADVISED_COUNT);
    if (chdir("/") != 0)
        tp_syserr("chdir /");
    cleanup();
    tp_finish(tp_mix64(sum));
}
