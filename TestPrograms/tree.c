/*
 * tree - a process tree: what a migrator must move as a whole.
 *
 * Before the loop the parent makes a MAP_SHARED|MAP_ANONYMOUS area, a pipe
 * and a memfd, then forks (each child inherits all three):
 *   A  a worker with a second thread; it reads the pipe and appends to the
 *      memfd (one open file description with the parent: one offset);
 *   B  a worker that leads its own process group (setpgid);
 *   C  a worker that leads its own session (setsid), with a grandchild G
 *      (a worker too, in C's session and group);
 *   Z1 a child that exits with status 7 at once, and
 *   Z2 a child killed by SIGUSR1 at once: both stay zombies (never reaped)
 *      until the end, the parent having seen them end with waitid(WNOWAIT).
 * Each round the parent writes the round into the pipe (A reads the one of
 * the round before: one word stays buffered), then asks every worker, in a
 * fixed order, for one step through the shared area (a request word and a
 * futex; the worker mixes its own state with the round, checks its parent,
 * group and session, and answers); the parent checks every answer against
 * its own replay, the memfd's shared offset, B's group and C's session,
 * prints a progress line, and pauses --pause-us. At the end the workers are
 * told to quit, each exits with its own status, the zombies are reaped with
 * theirs, and the checksum covers every answer. Only the parent prints.
 *
 * --with adds what a migrator must refuse (the run is otherwise the same):
 *   pidns  one more child, the first of its own PID namespace, asleep;
 *   vfork  a thread of the parent vforks a child that sleeps until the end
 *          (a vfork in progress: the child shares the parent's memory).
 * and what migrates too: dup  B duplicates its inherited stdout as fd 9 (a
 * dup of an inherited description: still the parent's one); split  the pipe
 * is split between the parent and A: the parent keeps only its write end,
 * A only its read end, B and C neither (a tree pipe: each end in another
 * process, a word always buffered between them); pipeline  a second pipe
 * between two workers, as a shell's pipeline: B writes a word each round,
 * the grandchild G reads one (a word or two always buffered); the parent,
 * which made the pipe, and C, G's parent, hold neither end; renumber  A
 * moves its inherited read end to fd 7 (dup2, then close), which the parent
 * keeps at its own number: one open file description at two numbers.
 */
#define _GNU_SOURCE
#include "common.h"

#include <linux/futex.h>
#include <sched.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

enum { W_A, W_A_THREAD, W_B, W_C, W_G, WORKERS };
static const char *const worker_names[WORKERS] = { "A", "A's thread", "B", "C", "G" };

struct slot {
    uint32_t request;  /* round + 1 asked for; UINT32_MAX: quit */
    uint32_t answered; /* round + 1 answered */
    uint64_t answer;
    uint64_t failure;  /* nonzero: what the worker found wrong */
};

struct shared {
    struct slot slot[WORKERS];
    pid_t parent, c_pid;
};

static struct shared *sh;
static int pipe_fd[2];
static int log_fd;

static volatile int vfork_quit;
static int b_duplicates_stdout;
static int pipe_split;
static int pipeline;
static int renumber;
/* The descriptor A reads the pipe from (fd 7 with --with renumber). */
static int a_read_fd = -1;
static int pipeline_fd[2] = { -1, -1 };
/* --answer-stall-us: a pause between reading a worker's answer word and waiting on it (the window of
 * a lost wake-up, made wide enough that a test meets it every time). */
static unsigned long long answer_stall_us;

/* Sleeps in vfork's child (sharing the parent's memory) until the parent says so. */
static void *vfork_thread(void *arg)
{
    (void)arg;
    pid_t child = vfork();
    if (child == 0) {
        struct timespec pause = { 0, 1000000 };
        while (!vfork_quit)
            syscall(SYS_nanosleep, &pause, NULL);
        _exit(0);
    }
    int status = -1;
    if (child < 0 || waitpid(child, &status, 0) != child || status != 0)
        return (void *)1;
    return NULL;
}

static void futex_wait(uint32_t *word, uint32_t value)
{
    syscall(SYS_futex, word, FUTEX_WAIT, value, NULL, NULL, 0);
}

static void futex_wake(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static uint64_t step_of(int worker, uint64_t seed, uint64_t state, uint64_t round)
{
    return tp_mix64(state ^ tp_mix64(seed + (uint64_t)worker * TP_GOLDEN) ^ (round * 0x9e3779b97f4a7c15ULL));
}

/* What a worker checks of its own place in the tree, each step. */
static uint64_t check_place(int worker, pid_t expected_parent)
{
    if (getppid() != expected_parent)
        return 1;
    if (worker == W_B && getpgrp() != getpid())
        return 2;
    if (worker == W_C && getsid(0) != getpid())
        return 3;
    if (worker == W_G && (getsid(0) != sh->c_pid || getpgrp() != sh->c_pid))
        return 4;
    return 0;
}

struct worker_args {
    int worker;
    uint64_t seed;
    pid_t parent;
};

/* Answers requests until told to quit; returns the number of steps done. */
static uint64_t serve(int worker, uint64_t seed, pid_t expected_parent)
{
    struct slot *s = &sh->slot[worker];
    uint64_t state = 0, steps = 0;
    for (;;) {
        uint32_t request = __atomic_load_n(&s->request, __ATOMIC_ACQUIRE);
        if (request == s->answered) {
            futex_wait(&s->request, request);
            continue;
        }
        if (request == UINT32_MAX)
            return steps;
        uint64_t round = request - 1;
        if (worker == W_A) {
            uint64_t word;
            if (round > 0) {
                if (read(a_read_fd, &word, sizeof word) != sizeof word || word != round - 1)
                    s->failure = 10;
            }
            if (write(log_fd, &round, sizeof round) != sizeof round)
                s->failure = 11;
        }
        if (pipeline && worker == W_B && write(pipeline_fd[1], &(uint64_t){ round + 1 }, sizeof(uint64_t)) != sizeof(uint64_t))
            s->failure = 12;
        if (pipeline && worker == W_G) {
            uint64_t word;
            if (read(pipeline_fd[0], &word, sizeof word) != sizeof word || word != round)
                s->failure = 13;
        }
        if (s->failure == 0)
            s->failure = check_place(worker, expected_parent);
        state = step_of(worker, seed, state, round);
        s->answer = state;
        steps++;
        __atomic_store_n(&s->answered, request, __ATOMIC_RELEASE);
        futex_wake(&s->answered);
    }
}

static void *thread_main(void *arg)
{
    struct worker_args *a = arg;
    serve(a->worker, a->seed, a->parent);
    return NULL;
}

static pid_t fork_or_die(void)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        tp_syserr("fork");
    return pid;
}

static void worker_process(int worker, uint64_t seed, pid_t parent)
{
    /* A worker never outlives its parent (a killed test leaves no worker waiting forever). */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != parent)
        _exit(TP_EXIT_SYSERR);
    /* Split: A keeps only the read end, the others no end at all. */
    if (pipe_split && (close(pipe_fd[1]) != 0 || (worker != W_A && close(pipe_fd[0]) != 0)))
        _exit(TP_EXIT_SYSERR);
    /* Pipeline: B keeps only the write end (and writes the first word), G only the read end. */
    if (pipeline && worker != W_B && worker != W_C && (close(pipeline_fd[0]) != 0 || close(pipeline_fd[1]) != 0))
        _exit(TP_EXIT_SYSERR);
    if (pipeline && worker == W_B && (close(pipeline_fd[0]) != 0
                                      || write(pipeline_fd[1], &(uint64_t){ 0 }, sizeof(uint64_t)) != sizeof(uint64_t)))
        _exit(TP_EXIT_SYSERR);
    if (renumber && worker == W_A) {
        if (dup2(pipe_fd[0], 7) != 7 || close(pipe_fd[0]) != 0)
            _exit(TP_EXIT_SYSERR);
        a_read_fd = 7;
    }
    if (worker == W_A) {
        static struct worker_args thread_args;
        thread_args = (struct worker_args){ W_A_THREAD, seed, parent };
        pthread_t thread;
        if (pthread_create(&thread, NULL, thread_main, &thread_args) != 0)
            _exit(TP_EXIT_SYSERR);
        serve(W_A, seed, parent);
        pthread_join(thread, NULL);
        _exit(20);
    }
    if (worker == W_B) {
        if (setpgid(0, 0) != 0)
            _exit(TP_EXIT_SYSERR);
        if (b_duplicates_stdout && dup2(1, 9) != 9)
            _exit(TP_EXIT_SYSERR);
        serve(W_B, seed, parent);
        _exit(21);
    }
    if (worker == W_C) {
        if (setsid() < 0)
            _exit(TP_EXIT_SYSERR);
        sh->c_pid = getpid();
        pid_t g = fork_or_die();
        if (g == 0) {
            if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != sh->c_pid)
                _exit(TP_EXIT_SYSERR);
            if (pipeline && close(pipeline_fd[1]) != 0)
                _exit(TP_EXIT_SYSERR);
            serve(W_G, seed, sh->c_pid);
            _exit(23);
        }
        if (pipeline && (close(pipeline_fd[0]) != 0 || close(pipeline_fd[1]) != 0))
            _exit(TP_EXIT_SYSERR);
        serve(W_C, seed, parent);
        int status;
        while (waitpid(g, &status, 0) < 0)
            if (errno != EINTR)
                _exit(TP_EXIT_SYSERR);
        _exit(WIFEXITED(status) && WEXITSTATUS(status) == 23 ? 22 : TP_EXIT_SELFCHK);
    }
    _exit(TP_EXIT_SYSERR);
}

static void wait_answer(int worker, uint32_t request)
{
    struct slot *s = &sh->slot[worker];
    /* The value seen is the one the wait compares: read again, it may already be the answer, and the
     * wait would sleep on it with the wake already gone (the tree hung so under load, 60 s in torture). */
    uint32_t seen;
    while ((seen = __atomic_load_n(&s->answered, __ATOMIC_ACQUIRE)) != request) {
        if (answer_stall_us)
            usleep((useconds_t)answer_stall_us);
        futex_wait(&s->answered, seen);
    }
}

static void ask(int worker, uint32_t request)
{
    __atomic_store_n(&sh->slot[worker].request, request, __ATOMIC_RELEASE);
    futex_wake(&sh->slot[worker].request);
    wait_answer(worker, request);
}

static void expect_end(pid_t pid, int status_wanted, const char *what)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            tp_syserr("waitpid %s", what);
    if (status != status_wanted)
        tp_selfcheck_fail("%s ended with status %#x, not %#x", what, status, status_wanted);
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, pause_us = 10000, seed = 1;
    const struct tp_opt opts[] = {
        { "rounds",   &rounds,   0, 100000000ULL, "number of rounds" },
        { "pause-us", &pause_us, 0, 10000000ULL, "microseconds paused per round" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the workers' steps" },
        { "answer-stall-us", &answer_stall_us, 0, 1000000ULL, "microseconds between reading an answer word and waiting on it" },
    };
    const char *with = "none";
    static const char *const with_choices[] = { "none", "pidns", "vfork", "dup", "split", "pipeline", "renumber", NULL };
    struct tp_stropt sopts[] = {
        { "with", &with, with_choices, "what to add: none, pidns or vfork (refused), dup, split, pipeline or renumber (migrate)" },
    };
    tp_parse_args_with_strings(argc, argv,
                  "A parent with workers in their own group and session, a grandchild, a threaded child and two "
                  "zombies, sharing memory, a pipe and a memfd; each round every worker takes one step.",
                  opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));

    b_duplicates_stdout = strcmp(with, "dup") == 0;
    pipe_split = strcmp(with, "split") == 0;
    pipeline = strcmp(with, "pipeline") == 0;
    renumber = strcmp(with, "renumber") == 0;
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        tp_syserr("mmap shared");
    if (pipe(pipe_fd) != 0)
        tp_syserr("pipe");
    a_read_fd = pipe_fd[0];
    if (pipeline && pipe(pipeline_fd) != 0)
        tp_syserr("pipe (pipeline)");
    log_fd = memfd_create("tree-log", MFD_CLOEXEC);
    if (log_fd < 0)
        tp_syserr("memfd_create");
    pid_t parent = getpid();
    sh->parent = parent;
    tp_say("tree: rounds=%llu seed=%llu\n", rounds, seed);

    pid_t zombie_exit = fork_or_die();
    if (zombie_exit == 0)
        _exit(7);
    pid_t zombie_signal = fork_or_die();
    if (zombie_signal == 0) {
        signal(SIGUSR1, SIG_DFL);
        sigset_t usr1;
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        sigprocmask(SIG_UNBLOCK, &usr1, NULL);
        raise(SIGUSR1);
        _exit(TP_EXIT_SYSERR);
    }
    /* Seen ended, left unreaped: zombies until the end. */
    siginfo_t info;
    if (waitid(P_PID, (id_t)zombie_exit, &info, WEXITED | WNOWAIT) != 0 || info.si_code != CLD_EXITED || info.si_status != 7)
        tp_selfcheck_fail("the first zombie did not exit with 7");
    if (waitid(P_PID, (id_t)zombie_signal, &info, WEXITED | WNOWAIT) != 0 || info.si_code != CLD_KILLED || info.si_status != SIGUSR1)
        tp_selfcheck_fail("the second zombie was not killed by SIGUSR1");

    pid_t workers[3];
    const int kinds[3] = { W_A, W_B, W_C };
    for (int i = 0; i < 3; i++) {
        workers[i] = fork_or_die();
        if (workers[i] == 0)
            worker_process(kinds[i], seed, parent);
    }
    /* Split: the parent keeps only the write end (A holds the read end alone). */
    if (pipe_split && close(pipe_fd[0]) != 0)
        tp_syserr("close pipe read end");
    if (pipeline && (close(pipeline_fd[0]) != 0 || close(pipeline_fd[1]) != 0))
        tp_syserr("close the pipeline's ends");
    pid_t namespaced = 0;
    pthread_t vforker;
    if (strcmp(with, "pidns") == 0) {
        fflush(stdout);
        namespaced = (pid_t)syscall(SYS_clone, CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
        if (namespaced < 0)
            tp_syserr("clone(CLONE_NEWPID)");
        if (namespaced == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
            for (;;)
                pause();
        }
    } else if (strcmp(with, "vfork") == 0 && pthread_create(&vforker, NULL, vfork_thread, NULL) != 0) {
        tp_syserr("pthread_create");
    }
    /* A reads the word of the round before: one word is always buffered in the pipe. */
    if (write(pipe_fd[1], &(uint64_t){ 0 }, sizeof(uint64_t)) != sizeof(uint64_t))
        tp_syserr("write pipe");
    /* Every worker (and G) has taken its step 0 before the loop: C's pid is known, B and C lead. */
    for (int w = 0; w < WORKERS; w++)
        ask(w, 1);

    uint64_t replay[WORKERS] = { 0 };
    uint64_t checksum = tp_hash_mix(0x74726565ULL, rounds);
    for (int w = 0; w < WORKERS; w++)
        replay[w] = step_of(w, seed, 0, 0);
    for (uint64_t r = 1; r <= rounds; r++) {
        tp_rendezvous(r);
        if (write(pipe_fd[1], &(uint64_t){ r }, sizeof(uint64_t)) != sizeof(uint64_t))
            tp_syserr("write pipe");
        for (int w = 0; w < WORKERS; w++) {
            ask(w, (uint32_t)(r + 1));
            struct slot *s = &sh->slot[w];
            if (s->failure != 0)
                tp_selfcheck_fail("round %llu: worker %s found fault %llu", (unsigned long long)r, worker_names[w],
                                  (unsigned long long)s->failure);
            replay[w] = step_of(w, seed, replay[w], r);
            if (s->answer != replay[w])
                tp_selfcheck_fail("round %llu: worker %s answered %#llx, replay says %#llx", (unsigned long long)r,
                                  worker_names[w], (unsigned long long)s->answer, (unsigned long long)replay[w]);
            checksum = tp_hash_word(checksum, s->answer);
        }
        off_t offset = lseek(log_fd, 0, SEEK_CUR);
        if (offset != (off_t)((r + 1) * sizeof(uint64_t)))
            tp_selfcheck_fail("round %llu: the shared memfd offset is %lld, not %llu", (unsigned long long)r,
                              (long long)offset, (unsigned long long)((r + 1) * sizeof(uint64_t)));
        if (getpgid(workers[1]) != workers[1] || getsid(workers[2]) != workers[2])
            tp_selfcheck_fail("round %llu: B lost its group or C its session", (unsigned long long)r);
        tp_say("round %llu/%llu tree ok\n", (unsigned long long)r, rounds);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    /* G first (C waits for it), then the others. */
    __atomic_store_n(&sh->slot[W_G].request, UINT32_MAX, __ATOMIC_RELEASE);
    futex_wake(&sh->slot[W_G].request);
    for (int w = 0; w < WORKERS; w++) {
        if (w == W_G)
            continue;
        __atomic_store_n(&sh->slot[w].request, UINT32_MAX, __ATOMIC_RELEASE);
        futex_wake(&sh->slot[w].request);
    }
    if (namespaced > 0) {
        kill(namespaced, SIGKILL);
        expect_end(namespaced, SIGKILL, "the child in its own PID namespace");
    } else if (strcmp(with, "vfork") == 0) {
        void *result;
        vfork_quit = 1;
        if (pthread_join(vforker, &result) != 0 || result != NULL)
            tp_selfcheck_fail("the vforked child did not end well");
    }
    expect_end(workers[0], 20 << 8, "A");
    expect_end(workers[1], 21 << 8, "B");
    expect_end(workers[2], 22 << 8, "C");
    expect_end(zombie_exit, 7 << 8, "the exited zombie");
    expect_end(zombie_signal, SIGUSR1, "the killed zombie");
    tp_finish(tp_mix64(checksum));
}
