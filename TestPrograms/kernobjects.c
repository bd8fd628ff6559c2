/*
 * kernobjects - kernel objects a process holds besides memory and plain
 * descriptors, each checked every round.
 *
 * --with takes a comma-separated list (default: timers,inotify,seals,sysv):
 *   timers   POSIX timers (timer_create), made in ID order 0..5 with timer 1
 *            deleted again, so their IDs have a gap:
 *              0  CLOCK_MONOTONIC, SIGEV_SIGNAL SIGUSR1, value 0xa11ce,
 *                 every --timer-ms ms (the handler checks si_value and
 *                 si_timerid and counts); with --timer-ms 0 one-shot in
 *                 an hour instead (nothing asynchronous: torture's runs)
 *              2  CLOCK_REALTIME, SIGEV_NONE, one-shot in an hour
 *              3  CLOCK_MONOTONIC, SIGEV_SIGNAL SIGWINCH, value 0xb0b,
 *                 one-shot in an hour
 *              4  CLOCK_REALTIME, SIGEV_THREAD_ID to the main thread,
 *                 SIGVTALRM, periodic: an hour, then every 30 minutes
 *              5  CLOCK_BOOTTIME, SIGEV_SIGNAL SIGURG, disarmed
 *            each round: timer 1 is gone (EINVAL), every other one has its
 *            period, no one-shot's time left ever went up, timer 5 is still
 *            disarmed, and SIGUSR1 keeps coming (within 200 periods)
 *   inotify  an inotify descriptor (IN_NONBLOCK) watching a directory it
 *            made (mkdtemp "fammig-ino-XXXXXX" in --dir; wd 1, IN_CREATE|
 *            IN_DELETE|IN_CLOSE_WRITE), a file in it (wd 2, IN_MODIFY) and,
 *            after a watch that was removed again (wd 3), a subdirectory
 *            (wd 4, IN_ATTRIB): each round makes, writes and removes a file,
 *            modifies the file and touches the subdirectory, and reads
 *            exactly the expected events back at once
 *   seals    a memfd "fammig-sealed" of 4 pages, mode 0640 (fchmod), mapped
 *            shared and written, then sealed F_SEAL_SHRINK|F_SEAL_GROW|
 *            F_SEAL_FUTURE_WRITE and F_SEAL_SEAL, its descriptor kept: each
 *            round the seals, its name and mode, that it can neither grow
 *            nor take a write(), and that a store through the (older,
 *            writable) mapping shows in pread
 *   sysv     a SysV segment (IPC_PRIVATE, 5 pages, mode 0640) attached and
 *            marked for removal (it goes with the process), plus a second
 *            attach of it read-only: each round updates words through the
 *            first and checks both against the model
 *   sysvkey  (not in the default) a SysV segment with key --shm-key that is
 *            not marked for removal: it outlives the process, which is
 *            refused (the program removes it when it ends)
 *
 * Each round is one step (--rendezvous counts rounds); it prints one line
 * per round and pauses --pause-us. The checksum hashes what the rounds
 * computed, never a count that depends on time.
 */
#include "common.h"

#include <fcntl.h>
#include <limits.h>
#include <mqueue.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef SIGEV_THREAD_ID
#define SIGEV_THREAD_ID 4
#endif

#define PAGE 4096UL
#define WORDS_PER_PAGE (PAGE / 8)
#define HOUR_NS (3600ULL * 1000000000ULL)

static char work_dir[PATH_MAX];
static int made_dir;
static int sysvkey_id = -1;
static volatile sig_atomic_t usr1_count, usr1_bad;

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

static void path_in(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", work_dir, name);
}

/* --with mqueue: a POSIX message queue of its own, open the whole run
 * (fammig refuses it: its descriptor names "/name" of the mqueue file
 * system, which no path of this node leads to). */
static char mqueue_name[64];

static void cleanup(void)
{
    if (mqueue_name[0] != '\0') {
        mq_unlink(mqueue_name);
        mqueue_name[0] = '\0';
    }
    if (sysvkey_id >= 0) {
        shmctl(sysvkey_id, IPC_RMID, NULL);
        sysvkey_id = -1;
    }
    if (made_dir) {
        char path[PATH_MAX + 16];
        path_in(path, sizeof path, "watched");
        unlink(path);
        path_in(path, sizeof path, "sub");
        rmdir(path);
        path_in(path, sizeof path, "gone");
        rmdir(path);
        rmdir(work_dir);
        made_dir = 0;
    }
}

static void on_usr1(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)context;
    if (info->si_code != SI_TIMER || info->si_value.sival_ptr != (void *)0xa11ce || info->si_timerid != 0)
        usr1_bad++;
    usr1_count++;
}

static void on_other(int sig)
{
    (void)sig;
}

/* ---- POSIX timers ---- */

static timer_t make_timer(clockid_t clock, int notify, int signal, uint64_t value, int expected_id)
{
    struct sigevent event;
    memset(&event, 0, sizeof event);
    event.sigev_notify = notify;
    event.sigev_signo = signal;
    event.sigev_value.sival_ptr = (void *)value;
    if (notify == SIGEV_THREAD_ID)
        event._sigev_un._tid = (int)syscall(SYS_gettid);
    int id = -1;
    if (syscall(SYS_timer_create, clock, &event, &id) != 0)
        tp_syserr("timer_create(%d)", expected_id);
    if (id != expected_id)
        tp_selfcheck_fail("timer_create gave timer %d, expected %d", id, expected_id);
    return (timer_t)(intptr_t)id;
}

static void arm(int id, uint64_t value_ns, uint64_t interval_ns)
{
    struct itimerspec setting = { tp_ts_from_ns(interval_ns), tp_ts_from_ns(value_ns) };
    if (syscall(SYS_timer_settime, id, 0, &setting, NULL) != 0)
        tp_syserr("timer_settime(%d)", id);
}

static uint64_t ns_of(struct timespec t) { return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec; }

struct timer_check {
    int id;
    uint64_t interval_ns;
    int one_shot;      /* time left never goes up */
    int disarmed;
    uint64_t last_left_ns;
};

static void check_timers(uint64_t round, struct timer_check *checks, size_t count)
{
    struct itimerspec now;
    if (syscall(SYS_timer_gettime, 1, &now) == 0 || errno != EINVAL)
        tp_selfcheck_fail("round %llu: deleted timer 1 exists again", (unsigned long long)round);
    for (size_t i = 0; i < count; i++) {
        struct timer_check *c = &checks[i];
        if (syscall(SYS_timer_gettime, c->id, &now) != 0)
            tp_selfcheck_fail("round %llu: timer %d is gone (%s)", (unsigned long long)round, c->id, strerror(errno));
        uint64_t left = ns_of(now.it_value), interval = ns_of(now.it_interval);
        if (interval != c->interval_ns)
            tp_selfcheck_fail("round %llu: timer %d has interval %llu ns, expected %llu", (unsigned long long)round, c->id,
                              (unsigned long long)interval, (unsigned long long)c->interval_ns);
        if (c->disarmed) {
            if (left != 0)
                tp_selfcheck_fail("round %llu: disarmed timer %d runs", (unsigned long long)round, c->id);
            continue;
        }
        if (left == 0)
            tp_selfcheck_fail("round %llu: timer %d was disarmed", (unsigned long long)round, c->id);
        if (c->one_shot && c->last_left_ns != 0 && left > c->last_left_ns)
            tp_selfcheck_fail("round %llu: timer %d has %llu ns left, more than the %llu before", (unsigned long long)round, c->id,
                              (unsigned long long)left, (unsigned long long)c->last_left_ns);
        c->last_left_ns = left;
    }
}

/* ---- inotify ---- */

static void expect_events(uint64_t round, int fd, const int *wds, const uint32_t *masks, const char *const *names, int count)
{
    char buffer[4096] __attribute__((aligned(8)));
    ssize_t n = read(fd, buffer, sizeof buffer);
    if (n < 0)
        tp_selfcheck_fail("round %llu: no inotify events (%s)", (unsigned long long)round, strerror(errno));
    int seen = 0;
    for (char *p = buffer; p < buffer + n; seen++) {
        struct inotify_event *event = (struct inotify_event *)p;
        if (seen >= count)
            tp_selfcheck_fail("round %llu: unexpected inotify event wd %d mask %x", (unsigned long long)round, event->wd, event->mask);
        const char *name = event->len ? event->name : "";
        if (event->wd != wds[seen] || event->mask != masks[seen] || strcmp(name, names[seen]) != 0)
            tp_selfcheck_fail("round %llu: inotify event %d is wd %d mask %x name \"%s\", expected wd %d mask %x name \"%s\"",
                              (unsigned long long)round, seen, event->wd, event->mask, name, wds[seen], masks[seen], names[seen]);
        p += sizeof *event + event->len;
    }
    if (seen != count)
        tp_selfcheck_fail("round %llu: %d inotify events, expected %d", (unsigned long long)round, seen, count);
    if (read(fd, buffer, sizeof buffer) >= 0 || errno != EAGAIN)
        tp_selfcheck_fail("round %llu: more inotify events than expected", (unsigned long long)round);
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 60, pause_us = 10000, timer_ms = 2, shm_key = 0x66616d;
    const char *with = "timers,inotify,seals,sysv";
    const char *dir = "/tmp";
    struct tp_opt opts[] = {
        { "rounds", &rounds, 1, 1000000, "rounds to run" },
        { "pause-us", &pause_us, 0, 10000000, "pause after each round (us)" },
        { "timer-ms", &timer_ms, 0, 1000, "period of timer 0 (ms; 0: one-shot in an hour)" },
        { "shm-key", &shm_key, 1, 0x7fffffff, "key of the sysvkey segment" },
    };
    struct tp_stropt sopts[] = {
        { "with", &with, NULL, "comma-separated kinds: timers,inotify,seals,sysv,sysvkey,mqueue" },
        { "dir", &dir, NULL, "directory for the inotify directory" },
    };
    tp_parse_args_with_strings(argc, argv, "POSIX timers, inotify watches, a sealed mapped memfd and SysV shared memory, checked every round.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));
    int use_timers = want(with, "timers"), use_inotify = want(with, "inotify"), use_seals = want(with, "seals");
    int use_sysv = want(with, "sysv"), use_sysvkey = want(with, "sysvkey");
    atexit(cleanup);
    if (want(with, "mqueue")) {
        snprintf(mqueue_name, sizeof mqueue_name, "/fammig-kernobjects-%d", (int)getpid());
        struct mq_attr attributes = { .mq_maxmsg = 4, .mq_msgsize = 64 };
        mqd_t queue = mq_open(mqueue_name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600, &attributes);
        if (queue == (mqd_t)-1) {
            mqueue_name[0] = '\0';
            tp_syserr("mq_open");
        }
        if (mq_send(queue, "queued", 6, 1) != 0)
            tp_syserr("mq_send");
    }
    uint64_t seed = 0x6b6f626a;
    uint64_t h = 0x6b6f;

    struct timer_check timer_checks[] = {
        { 0, 0, 0, 0, 0 }, { 2, 0, 1, 0, 0 }, { 3, 0, 1, 0, 0 }, { 4, HOUR_NS / 2, 1, 0, 0 }, { 5, 0, 0, 1, 0 },
    };
    if (use_timers) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_usr1;
        action.sa_flags = SA_SIGINFO | SA_RESTART;
        if (sigaction(SIGUSR1, &action, NULL) != 0)
            tp_syserr("sigaction(SIGUSR1)");
        signal(SIGWINCH, on_other);
        signal(SIGVTALRM, on_other);
        signal(SIGURG, on_other);
        make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 0xa11ce, 0);
        make_timer(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 1);
        make_timer(CLOCK_REALTIME, SIGEV_NONE, SIGHUP, 0x2, 2);
        make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGWINCH, 0xb0b, 3);
        make_timer(CLOCK_REALTIME, SIGEV_THREAD_ID, SIGVTALRM, 0x4, 4);
        make_timer(CLOCK_BOOTTIME, SIGEV_SIGNAL, SIGURG, 0x5, 5);
        if (syscall(SYS_timer_delete, 1) != 0)
            tp_syserr("timer_delete(1)");
        timer_checks[0].interval_ns = timer_ms * 1000000ULL;
        timer_checks[0].one_shot = timer_ms == 0;
        arm(0, timer_ms ? timer_ms * 1000000ULL : HOUR_NS, timer_ms * 1000000ULL);
        arm(2, HOUR_NS, 0);
        arm(3, HOUR_NS, 0);
        arm(4, HOUR_NS, HOUR_NS / 2);
    }

    int inotify_fd = -1;
    char watched[PATH_MAX + 16], sub[PATH_MAX + 16];
    if (use_inotify) {
        snprintf(work_dir, sizeof work_dir, "%s/fammig-ino-XXXXXX", dir);
        if (mkdtemp(work_dir) == NULL)
            tp_syserr("mkdtemp in %s", dir);
        made_dir = 1;
        path_in(watched, sizeof watched, "watched");
        path_in(sub, sizeof sub, "sub");
        char gone[PATH_MAX + 16];
        path_in(gone, sizeof gone, "gone");
        int fd = open(watched, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0 || close(fd) != 0 || mkdir(sub, 0700) != 0 || mkdir(gone, 0700) != 0)
            tp_syserr("making the watched files");
        inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (inotify_fd < 0)
            tp_syserr("inotify_init1");
        if (inotify_add_watch(inotify_fd, work_dir, IN_CREATE | IN_DELETE | IN_CLOSE_WRITE) != 1 ||
            inotify_add_watch(inotify_fd, watched, IN_MODIFY) != 2 || inotify_add_watch(inotify_fd, gone, IN_ATTRIB) != 3)
            tp_syserr("inotify_add_watch");
        if (inotify_rm_watch(inotify_fd, 3) != 0)
            tp_syserr("inotify_rm_watch(3)");
        if (inotify_add_watch(inotify_fd, sub, IN_ATTRIB) != 4)
            tp_syserr("inotify_add_watch(sub)");
        if (rmdir(gone) != 0)
            tp_syserr("rmdir %s", gone);
        /* The removals queued IN_IGNORED for wd 3 and IN_DELETE for "gone": drain. */
        char drain[4096];
        while (read(inotify_fd, drain, sizeof drain) > 0) {}
    }

    int sealed_fd = -1;
    uint64_t *sealed = NULL, *sealed_model = NULL;
    const size_t sealed_pages = 4;
    const unsigned sealed_seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL;
    if (use_seals) {
        sealed_fd = (int)syscall(SYS_memfd_create, "fammig-sealed", MFD_ALLOW_SEALING);
        if (sealed_fd < 0 || ftruncate(sealed_fd, (off_t)(sealed_pages * PAGE)) != 0 || fchmod(sealed_fd, 0640) != 0)
            tp_syserr("memfd_create/ftruncate/fchmod (sealed)");
        sealed = mmap(NULL, sealed_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, sealed_fd, 0);
        sealed_model = calloc(sealed_pages * WORDS_PER_PAGE, 8);
        if (sealed == MAP_FAILED || sealed_model == NULL)
            tp_syserr("mmap/calloc (sealed)");
        for (size_t i = 0; i < sealed_pages * WORDS_PER_PAGE; i += 7)
            sealed[i] = sealed_model[i] = tp_mix64(i + 0x5ea1);
        if (fcntl(sealed_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE) != 0 ||
            fcntl(sealed_fd, F_ADD_SEALS, F_SEAL_SEAL) != 0)
            tp_syserr("F_ADD_SEALS");
    }

    uint64_t *sysv = NULL, *sysv_view = NULL, *sysv_model = NULL;
    const size_t sysv_pages = 5;
    if (use_sysv) {
        int id = shmget(IPC_PRIVATE, sysv_pages * PAGE, IPC_CREAT | 0640);
        if (id < 0)
            tp_syserr("shmget");
        sysv = shmat(id, NULL, 0);
        sysv_view = shmat(id, NULL, SHM_RDONLY);
        if (sysv == (void *)-1 || sysv_view == (void *)-1)
            tp_syserr("shmat");
        if (shmctl(id, IPC_RMID, NULL) != 0)
            tp_syserr("shmctl(IPC_RMID)");
        sysv_model = calloc(sysv_pages * WORDS_PER_PAGE, 8);
        if (sysv_model == NULL)
            tp_syserr("calloc");
    }
    if (use_sysvkey) {
        sysvkey_id = shmget((key_t)shm_key, 2 * PAGE, IPC_CREAT | IPC_EXCL | 0600);
        if (sysvkey_id < 0)
            tp_syserr("shmget(key %llx)", shm_key);
        uint64_t *kept = shmat(sysvkey_id, NULL, 0);
        if (kept == (void *)-1)
            tp_syserr("shmat(key)");
        kept[0] = 1;
    }

    unsigned long long usr1_seen = 0;
    for (uint64_t round = 1; round <= rounds; round++) {
        tp_rendezvous(round);
        if (use_timers) {
            check_timers(round, timer_checks, sizeof timer_checks / sizeof timer_checks[0]);
            if (usr1_bad)
                tp_selfcheck_fail("round %llu: a SIGUSR1 without timer 0's siginfo", (unsigned long long)round);
            /* Timer 0 must keep firing: wait up to 200 periods for the next expiry. */
            for (int waited = 0; timer_ms && (unsigned long long)usr1_count == usr1_seen; waited++) {
                if (waited > 200)
                    tp_selfcheck_fail("round %llu: timer 0 stopped firing", (unsigned long long)round);
                tp_nanosleep_ns(timer_ms * 1000000ULL);
            }
            usr1_seen = (unsigned long long)usr1_count;
            h = tp_hash_mix(h, round * 0x71);
        }
        if (use_inotify) {
            char name[32], path[PATH_MAX + 48];
            snprintf(name, sizeof name, "f%llu", (unsigned long long)round);
            path_in(path, sizeof path, name);
            int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
            if (fd < 0 || write(fd, "x", 1) != 1 || close(fd) != 0 || unlink(path) != 0)
                tp_syserr("making and removing %s", path);
            fd = open(watched, O_WRONLY | O_APPEND | O_CLOEXEC);
            if (fd < 0 || write(fd, "y", 1) != 1 || close(fd) != 0)
                tp_syserr("appending to %s", watched);
            if (chmod(sub, round % 2 ? 0750 : 0700) != 0)
                tp_syserr("chmod %s", sub);
            const int wds[] = { 1, 1, 1, 2, 1, 4 };
            const uint32_t masks[] = { IN_CREATE, IN_CLOSE_WRITE, IN_DELETE, IN_MODIFY, IN_CLOSE_WRITE, IN_ATTRIB | IN_ISDIR };
            const char *const names[] = { name, name, name, "", "watched", "" };
            expect_events(round, inotify_fd, wds, masks, names, 6);
            h = tp_hash_mix(h, round * 0x1b0);
        }
        if (use_seals) {
            if ((unsigned)fcntl(sealed_fd, F_GET_SEALS) != sealed_seals)
                tp_selfcheck_fail("round %llu: memfd seals are %x, expected %x", (unsigned long long)round,
                                  (unsigned)fcntl(sealed_fd, F_GET_SEALS), sealed_seals);
            char link[64], target[128];
            snprintf(link, sizeof link, "/proc/self/fd/%d", sealed_fd);
            ssize_t n = readlink(link, target, sizeof target - 1);
            target[n < 0 ? 0 : n] = '\0';
            if (strcmp(target, "/memfd:fammig-sealed (deleted)") != 0)
                tp_selfcheck_fail("round %llu: the sealed memfd is \"%s\"", (unsigned long long)round, target);
            struct stat status;
            if (fstat(sealed_fd, &status) != 0 || (status.st_mode & 07777) != 0640)
                tp_selfcheck_fail("round %llu: the sealed memfd has mode %o, expected 640", (unsigned long long)round,
                                  (unsigned)(status.st_mode & 07777));
            if (ftruncate(sealed_fd, (off_t)(2 * sealed_pages * PAGE)) == 0 || write(sealed_fd, "z", 1) >= 0 ||
                fcntl(sealed_fd, F_ADD_SEALS, F_SEAL_WRITE) == 0)
                tp_selfcheck_fail("round %llu: the sealed memfd grew, took a write or a seal", (unsigned long long)round);
            for (size_t i = 0; i < sealed_pages * WORDS_PER_PAGE; i++)
                if (sealed[i] != sealed_model[i])
                    tp_selfcheck_fail("round %llu: sealed memfd word %zu differs", (unsigned long long)round, i);
            size_t at = (size_t)tp_rand_below(&seed, sealed_pages * WORDS_PER_PAGE);
            sealed[at] = sealed_model[at] = tp_rand(&seed);
            uint64_t back;
            if (pread(sealed_fd, &back, 8, (off_t)(at * 8)) != 8 || back != sealed_model[at])
                tp_selfcheck_fail("round %llu: pread of the sealed memfd misses the mapping's store", (unsigned long long)round);
        }
        if (use_sysv) {
            for (size_t i = 0; i < sysv_pages * WORDS_PER_PAGE; i++)
                if (sysv[i] != sysv_model[i] || sysv_view[i] != sysv_model[i])
                    tp_selfcheck_fail("round %llu: SysV word %zu is %llx (view %llx), expected %llx", (unsigned long long)round, i,
                                      (unsigned long long)sysv[i], (unsigned long long)sysv_view[i], (unsigned long long)sysv_model[i]);
            for (int k = 0; k < 4; k++) {
                /* Page 4 stays a hole until the last round. */
                size_t page = round == rounds ? 4 : (size_t)tp_rand_below(&seed, 4);
                size_t word = page * WORDS_PER_PAGE + (size_t)tp_rand_below(&seed, WORDS_PER_PAGE);
                sysv[word] = sysv_model[word] = tp_rand(&seed);
            }
        }
        tp_say("round %llu ok\n", (unsigned long long)round);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    if (use_seals)
        h = tp_hash_words(h, sealed_model, sealed_pages * WORDS_PER_PAGE);
    if (use_sysv)
        h = tp_hash_words(h, sysv_model, sysv_pages * WORDS_PER_PAGE);
    cleanup();
    tp_finish(h);
}
