#define _GNU_SOURCE
#include "CSys.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/ptrace.h>
#include <sys/prctl.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <string.h>
#include <pthread.h>
#include <poll.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <stdio.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/capability.h>

long csys_ptrace(long request, pid_t pid, void *address, void *data) {
    return syscall(SYS_ptrace, request, pid, address, data);
}

long csys_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6) {
    return syscall(number, a1, a2, a3, a4, a5, a6);
}

pid_t csys_gettid(void) { return (pid_t)syscall(SYS_gettid); }
int csys_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
int csys_pidfd_getfd(int pidfd, int targetfd) { return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, 0); }
int csys_pidfd_send_signal(int pidfd, int signal) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, signal, NULL, 0);
}

ssize_t csys_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long localCount,
                              const struct iovec *remote, unsigned long remoteCount) {
    return process_vm_readv(pid, local, localCount, remote, remoteCount, 0);
}

ssize_t csys_process_vm_writev(pid_t pid, const struct iovec *local, unsigned long localCount,
                               const struct iovec *remote, unsigned long remoteCount) {
    return process_vm_writev(pid, local, localCount, remote, remoteCount, 0);
}

int csys_pin_to_cpu(pid_t tid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(tid, sizeof set, &set);
}

int csys_get_affinity(uint64_t mask[16]) {
    return sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)mask);
}

int csys_set_affinity(const uint64_t mask[16]) {
    return sched_setaffinity(0, sizeof(cpu_set_t), (const cpu_set_t *)mask);
}

int csys_get_thread_affinity(pid_t tid, uint64_t mask[16]) {
    return sched_getaffinity(tid, sizeof(cpu_set_t), (cpu_set_t *)mask);
}

int csys_set_thread_affinity(pid_t tid, const uint64_t mask[16]) {
    return sched_setaffinity(tid, sizeof(cpu_set_t), (const cpu_set_t *)mask);
}

int csys_first_in_first_out(pid_t tid, int priority) {
    struct sched_param param = { .sched_priority = priority };
    return sched_setscheduler(tid, SCHED_FIFO, &param);
}

int csys_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5) {
    return prctl(option, a2, a3, a4, a5);
}


/// In a freshly cloned child: every signal back to its default action and an empty mask, since ignored
/// signals and the mask survive execve and the restored process must start from nothing of ours.
static void reset_signals(void) {
    for (int signal = 1; signal < 65; signal++) {
        struct { unsigned long handler, flags, restorer, mask; } action = {0, 0, 0, 0};
        syscall(SYS_rt_sigaction, signal, &action, 0, 8);
    }
    unsigned long empty = 0;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &empty, 0, 8);
}

static int open_onto(const char *path, int flags, int descriptor) {
    long opened = syscall(SYS_openat, AT_FDCWD, path, flags, 0600);
    if (opened < 0) return -1;
    if (opened != descriptor) {
        if (syscall(SYS_dup2, opened, descriptor) < 0) return -1;
        syscall(SYS_close, opened);
    }
    return 0;
}

struct program_spawn {
    const char *path;
    char *const *argv;
    char *const *envp;
    /// NULL: keep this process's standard input, output and error (and every other descriptor).
    const char *standardInput, *standardOutput, *standardError;
    unsigned long personalityValue;
    int traced, dieWithParent;
};

/// The child of spawn_sharing_memory, on its own stack in the parent's memory (CLONE_VM): only raw
/// syscalls, nothing that writes memory the parent owns, until execve replaces the address space.
static int program_spawn_child(void *argument) {
    const struct program_spawn *spawn = argument;
    // Default dispositions and an empty mask, whatever the parent had (its handlers must never run here).
    reset_signals();
    if (spawn->standardInput != NULL) {
        if (open_onto(spawn->standardInput, O_RDONLY, 0) != 0) syscall(SYS_exit_group, 125);
        if (open_onto(spawn->standardOutput, O_WRONLY | O_CREAT | O_TRUNC, 1) != 0) syscall(SYS_exit_group, 125);
        if (open_onto(spawn->standardError, O_WRONLY | O_CREAT | O_TRUNC, 2) != 0) syscall(SYS_exit_group, 125);
        syscall(SYS_close_range, 3, ~0U, 0);
    }
    // A fixed layout for a run that must be repeatable; and it dies with whoever started it.
    if (spawn->personalityValue != 0xffffffffUL) syscall(SYS_personality, spawn->personalityValue);
    if (spawn->dieWithParent) syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    // Traced by the thread that called clone: the exec stops with SIGTRAP before the program's first instruction.
    if (spawn->traced && syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0) != 0) syscall(SYS_exit_group, 126);
    syscall(SYS_execve, spawn->path, spawn->argv, spawn->envp);
    syscall(SYS_exit_group, 127);
    return 127;
}

/// Starts a program the way posix_spawn does: the child shares this process's memory (CLONE_VM) on a
/// stack of its own, and this thread waits (CLONE_VFORK) until it has exec'd or died. A fork instead
/// copied torture's page tables for every victim, reference run and stub, and made the parent take a
/// copy-on-write fault on each page it wrote until the child's exec (a tenth of a campaign's CPU time
/// together). Signals stay blocked across the clone so that none of the parent's handlers runs in the
/// child before it resets them.
static pid_t spawn_sharing_memory(const struct program_spawn *spawn, int cloneFlags) {
    const size_t stackByteCount = 64 * 1024;
    void *stack = mmap(NULL, stackByteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -1;
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pid_t child = clone(program_spawn_child, (char *)stack + stackByteCount, CLONE_VM | CLONE_VFORK | cloneFlags | SIGCHLD,
                        (void *)spawn);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    munmap(stack, stackByteCount);
    errno = saved;
    return child;
}

static pid_t spawn_program_new_pid_namespace(const char *path, char *const argv[], char *const envp[],
                                             const char *standardInput, const char *standardOutput,
                                             const char *standardError, unsigned long personalityValue, int traced,
                                             int dieWithParent) {
    struct program_spawn spawn = { path, argv, envp, standardInput, standardOutput, standardError, personalityValue,
                                   traced, dieWithParent };
    return spawn_sharing_memory(&spawn, CLONE_NEWPID);
}

/// clone3 (with `flags`, and `wantedPID` as set_tid unless 0), then in the child: default signals,
/// PDEATHSIG, personality, PTRACE_TRACEME and execve; only raw syscalls there (the parent may have
/// other threads).
static pid_t spawn_traced(const char *path, char *const argv[], char *const envp[], pid_t wantedPID,
                          unsigned long personalityValue, unsigned long long flags) {
    if (wantedPID <= 0) {
        struct program_spawn spawn = { path, argv, envp, NULL, NULL, NULL, personalityValue, 1, 1 };
        return spawn_sharing_memory(&spawn, (int)flags);
    }
    // clone() cannot ask for a PID (set_tid is clone3's): a fork, then.
    struct clone_args arguments = {0};
    pid_t tids[1] = {wantedPID};
    arguments.flags = flags;
    arguments.exit_signal = SIGCHLD;
    if (wantedPID > 0) {
        arguments.set_tid = (uint64_t)(uintptr_t)tids;
        arguments.set_tid_size = 1;
    }
    long child = syscall(SYS_clone3, &arguments, sizeof arguments);
    if (child != 0) return (pid_t)child;
    reset_signals();
    syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (personalityValue != 0xffffffffUL) syscall(SYS_personality, personalityValue);
    if (syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0) != 0) syscall(SYS_exit_group, 126);
    syscall(SYS_execve, path, argv, envp);
    syscall(SYS_exit_group, 127);
    return -1;
}

pid_t csys_spawn_traced(const char *path, char *const argv[], char *const envp[], pid_t wantedPID,
                        unsigned long personalityValue) {
    return spawn_traced(path, argv, envp, wantedPID, personalityValue, 0);
}

__attribute__((target("clwb"))) static void flush_clwb(const char *p, const char *end) {
    for (; p < end; p += 64) _mm_clwb((void *)p);
}
__attribute__((target("clflushopt"))) static void flush_clflushopt(const char *p, const char *end) {
    for (; p < end; p += 64) _mm_clflushopt((void *)p);
}
static void flush_clflush(const char *p, const char *end) {
    for (; p < end; p += 64) _mm_clflush((void *)p);
}

void csys_flush_range(const void *address, size_t byteCount, int method) {
    if (byteCount == 0) return;
    const char *start = (const char *)((uintptr_t)address & ~(uintptr_t)63);
    const char *end = (const char *)address + byteCount;
    switch (method) {
    case 0: flush_clwb(start, end); break;
    case 1: flush_clflushopt(start, end); break;
    default: flush_clflush(start, end); break;
    }
}

void csys_sfence(void) { _mm_sfence(); }

int csys_best_flush_method(void) {
    unsigned int a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (b & (1u << 24)) return 0;
        if (b & (1u << 23)) return 1;
    }
    return 2;
}

uint64_t csys_digest64(const void *address, size_t byteCount, uint64_t seed) {
    // Four independent multiply-rotate lanes keep the loop near memory bandwidth.
    const uint64_t *word = (const uint64_t *)address;
    size_t count = byteCount / 8;
    const uint64_t k1 = 0x9E3779B97F4A7C15ULL, k2 = 0xC2B2AE3D27D4EB4FULL;
    uint64_t h[4] = {seed ^ k1, seed ^ k2, seed + k1, seed - k2};
    size_t i = 0;
    for (; i + 4 <= count; i += 4) {
        for (int lane = 0; lane < 4; lane++) {
            uint64_t v = h[lane] ^ (word[i + lane] * k2);
            h[lane] = ((v << 31) | (v >> 33)) * k1;
        }
    }
    uint64_t result = byteCount * k1;
    for (; i < count; i++) result ^= ((word[i] * k2) << 27 | (word[i] * k2) >> 37) * k1;
    for (int lane = 0; lane < 4; lane++) {
        result ^= h[lane];
        result = ((result << 27) | (result >> 37)) * k1 + k2;
    }
    result ^= result >> 33;
    result *= 0xFF51AFD7ED558CCDULL;
    result ^= result >> 33;
    return result;
}

size_t csys_select_pagemap_pages(uint64_t *words, size_t count, uint64_t anyOf, uint64_t noneOf, uint64_t firstAddress) {
    size_t selected = 0;
    for (size_t index = 0; index < count; index++) {
        uint64_t word = words[index];
        // selected <= index: the address overwrites a word already looked at.
        if ((word & anyOf) != 0 && (word & noneOf) == 0) words[selected++] = firstAddress + (uint64_t)index * 4096;
    }
    return selected;
}

int csys_ioctl_pointer(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}

int csys_spawn_actions_close_from(posix_spawn_file_actions_t *actions, int firstDescriptor) {
    return posix_spawn_file_actions_addclosefrom_np(actions, firstDescriptor);
}

pid_t csys_spawn_traced_new_pid_namespace(const char *path, char *const argv[], char *const envp[], int newIPCNamespace) {
    return spawn_traced(path, argv, envp, 0, 0xffffffffUL, CLONE_NEWPID | (newIPCNamespace ? CLONE_NEWIPC : 0));
}

pid_t csys_spawn_program_new_pid_namespace(const char *path, char *const argv[], char *const envp[],
                                           const char *standardInput, const char *standardOutput,
                                           const char *standardError, unsigned long personalityValue) {
    return spawn_program_new_pid_namespace(path, argv, envp, standardInput, standardOutput, standardError, personalityValue, 0,
                                           personalityValue != 0xffffffffUL);
}

pid_t csys_spawn_traced_program_new_pid_namespace(const char *path, char *const argv[], char *const envp[],
                                                  const char *standardInput, const char *standardOutput,
                                                  const char *standardError, unsigned long personalityValue, int dieWithParent) {
    return spawn_program_new_pid_namespace(path, argv, envp, standardInput, standardOutput, standardError, personalityValue, 1,
                                           dieWithParent);
}

static char cleanup_paths[16][512];
static volatile sig_atomic_t cleanup_path_count = 0;
static volatile pid_t cleanup_processes[8];
static volatile sig_atomic_t cleanup_process_count = 0;

// Sections (csys_cleanup_defer_begin/end) in which a process is started and registered: a termination
// signal that another thread takes meanwhile waits for the section's end, else the process, started
// but not yet registered, would outlive fammig (seen: TerminationTests in a fresh-clone CI run). The
// section's own thread blocks the signals too; this covers the process's other threads.
static volatile sig_atomic_t cleanup_deferrals = 0;
static volatile sig_atomic_t cleanup_pending = 0;

static void cleanup_on_signal(int signal) {
    if (__atomic_load_n(&cleanup_deferrals, __ATOMIC_SEQ_CST) > 0) {
        cleanup_pending = signal;
        return;
    }
    // Registered files before their directory: a directory is removed once it is empty.
    for (int index = 0; index < cleanup_path_count; index++) {
        if (unlink(cleanup_paths[index]) != 0) rmdir(cleanup_paths[index]);
    }
    for (int index = 0; index < cleanup_process_count; index++) {
        if (cleanup_processes[index] > 0) kill(cleanup_processes[index], SIGKILL);
    }
    struct sigaction defaultAction = {0};
    defaultAction.sa_handler = SIG_DFL;
    sigaction(signal, &defaultAction, 0);
    raise(signal);
}

void csys_cleanup_install(void) {
    struct sigaction action = {0};
    action.sa_handler = cleanup_on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, 0);
    sigaction(SIGTERM, &action, 0);
    sigaction(SIGHUP, &action, 0);
    // A parent may have started us with these blocked (the mask survives exec): take them back, so the
    // handler can run. Threads started later inherit this mask.
    sigset_t termination;
    sigemptyset(&termination);
    sigaddset(&termination, SIGINT);
    sigaddset(&termination, SIGTERM);
    sigaddset(&termination, SIGHUP);
    pthread_sigmask(SIG_UNBLOCK, &termination, 0);
}

void csys_cleanup_defer_begin(void) { __atomic_add_fetch(&cleanup_deferrals, 1, __ATOMIC_SEQ_CST); }

void csys_cleanup_defer_end(void) {
    if (__atomic_sub_fetch(&cleanup_deferrals, 1, __ATOMIC_SEQ_CST) == 0 && cleanup_pending != 0) cleanup_on_signal(cleanup_pending);
}

void csys_cleanup_register_path(const char *path) {
    if (cleanup_path_count >= 16 || strlen(path) >= sizeof cleanup_paths[0]) return;
    strcpy(cleanup_paths[cleanup_path_count], path);
    cleanup_path_count = cleanup_path_count + 1;
}

void csys_cleanup_register_process(pid_t processID) {
    if (cleanup_process_count >= 8) return;
    cleanup_processes[cleanup_process_count] = processID;
    cleanup_process_count = cleanup_process_count + 1;
}

static void close_all_but(const int *keep, int keepCount) {
    // keep is sorted ascending; close every range between the kept descriptors.
    unsigned int next = 0;
    for (int index = 0; index < keepCount; index++) {
        if ((unsigned int)keep[index] > next) syscall(SYS_close_range, next, (unsigned int)keep[index] - 1, 0);
        next = (unsigned int)keep[index] + 1;
    }
    syscall(SYS_close_range, next, ~0U, 0);
}

/* A helper child (the hole watchdog, the source guard) keeps only `keep` (three descriptors), leaves the
 * session and the terminal's signals, runs with no signal blocked, and takes `name`. */
static void become_helper(int keep[3], const char *name) {
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (keep[j] < keep[i]) { int swap = keep[i]; keep[i] = keep[j]; keep[j] = swap; }
    close_all_but(keep, 3);
    setsid();
    int ignored[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2 };
    for (size_t index = 0; index < sizeof ignored / sizeof ignored[0]; index++) signal(ignored[index], SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}


static long long monotonic_milliseconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void wait_for_exit(int pidfd, int timeoutMilliseconds) {
    struct pollfd waiting = { .fd = pidfd, .events = POLLIN };
    while (poll(&waiting, 1, timeoutMilliseconds) < 0 && errno == EINTR) {}
}

pid_t csys_spawn_hole_watchdog(int pidfd, int userfaultfd, int *disarmDescriptor) {
    // A socket pair, not a pipe: the disarm word is sent with MSG_NOSIGNAL, since the watchdog may have
    // exited already (its target ended), and a write to a pipe without reader would raise SIGPIPE here.
    int pipeDescriptors[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pipeDescriptors) != 0) return -1;
    pid_t child = fork();
    if (child < 0) {
        int saved = errno;
        close(pipeDescriptors[0]);
        close(pipeDescriptors[1]);
        errno = saved;
        return -1;
    }
    if (child == 0) {
        int keep[3] = { pipeDescriptors[0], pidfd, userfaultfd };
        become_helper(keep, "fammig-watchdog");
        // A lease ('L' and its milliseconds, then 'R' to renew it): an owner that is alive but does not
        // run (a stopped node) loses its process too, once the lease runs out.
        uint32_t leaseMilliseconds = 0;
        long long deadline = 0;
        int lapsed = 0;
        for (;;) {
            int timeout = -1;
            if (leaseMilliseconds > 0) {
                long long left = deadline - monotonic_milliseconds();
                if (left <= 0) { lapsed = 1; break; }
                timeout = (int)left;
            }
            struct pollfd watched[2] = { { .fd = pipeDescriptors[0], .events = POLLIN }, { .fd = pidfd, .events = POLLIN } };
            int ready = poll(watched, 2, timeout);
            if (ready < 0) {
                if (errno == EINTR) continue;
                break;  // cannot watch any more: treat like a dead owner
            }
            if (ready == 0) continue;
            if (watched[1].revents) _exit(0);  // the restored process ended: nothing to guard
            if (watched[0].revents) {
                char word = 0;
                ssize_t count = read(pipeDescriptors[0], &word, 1);
                if (count < 0 && errno == EINTR) continue;
                if (count == 1 && word == 'D') _exit(0);
                if (count == 1 && word == 'R') { deadline = monotonic_milliseconds() + leaseMilliseconds; continue; }
                if (count == 1 && word == 'L') {
                    uint32_t milliseconds = 0;
                    size_t done = 0;
                    while (done < sizeof milliseconds) {
                        ssize_t got = read(pipeDescriptors[0], (char *)&milliseconds + done, sizeof milliseconds - done);
                        if (got < 0 && errno == EINTR) continue;
                        if (got <= 0) break;
                        done += (size_t)got;
                    }
                    if (done < sizeof milliseconds) break;
                    leaseMilliseconds = milliseconds;
                    deadline = monotonic_milliseconds() + leaseMilliseconds;
                    continue;
                }
                break;  // EOF (owner gone) or anything else
            }
        }
        if (lapsed)
            dprintf(2, "fammig: this target node did not renew its lease (%u ms) on its restored process: it was stopped or stalled, "
                       "and its source may have let the victim run on; the restored process is killed, so that only one copy lives\n",
                    leaseMilliseconds);
        syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
        wait_for_exit(pidfd, 5000);
        _exit(lapsed ? 3 : 1);
    }
    close(pipeDescriptors[0]);
    *disarmDescriptor = pipeDescriptors[1];
    return child;
}

// The source guard's work once its owner (the tracer) is gone. The kernel detaches a dead tracer's
// tracees only as the tracer thread finishes exiting, after its descriptors closed: seizing is retried
// until the victim is free (bounded). A victim frozen by the owner sits in a group-stop, so it stays
// stopped once detached until the guard lets it go.
static int guard_seize(pid_t thread) {
    const unsigned long options = 0x200000UL | 1UL;  // PTRACE_O_SUSPEND_SECCOMP | PTRACE_O_TRACESYSGOOD
    for (int attempt = 0; attempt < 10000; attempt++) {
        if (syscall(SYS_ptrace, PTRACE_SEIZE, thread, NULL, (void *)options) == 0) break;
        if (errno != EPERM) return -1;
        usleep(1000);
        if (attempt == 9999) return -1;
    }
    syscall(SYS_ptrace, PTRACE_INTERRUPT, thread, NULL, NULL);
    for (int stops = 0; stops < 1000; stops++) {
        int status = 0;
        if (waitpid(thread, &status, __WALL) < 0) { if (errno == EINTR) continue; return -1; }
        if (!WIFSTOPPED(status)) return -1;
        if ((status >> 16) == PTRACE_EVENT_STOP) return 0;
        // A signal of the victim's own: deliver it, then stop again.
        int signal = WSTOPSIG(status) == (SIGTRAP | 0x80) ? 0 : WSTOPSIG(status);
        syscall(SYS_ptrace, PTRACE_CONT, thread, NULL, (void *)(long)signal);
        syscall(SYS_ptrace, PTRACE_INTERRUPT, thread, NULL, NULL);
    }
    return -1;
}

// munmap(address, byteCount) run by `thread` from `at` (the victim's own code: `syscall` written there
// for the call and put back), to the syscall's exit stop: no int3, no signal.
static void guard_unmap(pid_t thread, int memory, const struct user_regs_struct *template,
                        uint64_t address, uint64_t byteCount) {
    uint8_t saved[2], code[2] = { 0x0f, 0x05 };
    uint64_t at = template->rip;
    if (pread(memory, saved, 2, (off_t)at) != 2 || pwrite(memory, code, 2, (off_t)at) != 2) return;
    struct user_regs_struct registers = *template;
    registers.rax = 11;  // munmap
    registers.orig_rax = (unsigned long long)-1;
    registers.rdi = address;
    registers.rsi = byteCount;
    registers.rip = at;
    uint64_t blocked = ~0ULL;
    syscall(SYS_ptrace, 0x420b /* PTRACE_SETSIGMASK */, thread, (void *)8, &blocked);
    if (syscall(SYS_ptrace, PTRACE_SETREGS, thread, NULL, &registers) == 0) {
        for (int stops = 0, syscallStops = 0; syscallStops < 2 && stops < 100; stops++) {
            if (syscall(SYS_ptrace, PTRACE_SYSCALL, thread, NULL, NULL) != 0) break;
            int status = 0;
            while (waitpid(thread, &status, __WALL) < 0 && errno == EINTR) {}
            if (!WIFSTOPPED(status)) break;
            if (WSTOPSIG(status) == (SIGTRAP | 0x80)) syscallStops++;
        }
    }
    pwrite(memory, saved, 2, (off_t)at);
}

// The victim's pidfd, opened before the fork: a victim that ended meanwhile is left alone (its PID, and
// its threads' IDs, may already name other processes), and the kill goes through it.
static int guard_victim_pidfd = -1;

static int guard_victim_ended(void) {
    struct pollfd watched = { .fd = guard_victim_pidfd, .events = POLLIN };
    return guard_victim_pidfd < 0 || poll(&watched, 1, 0) != 0;
}

int csys_source_guard_run_recipe(int descriptor, const uint8_t *operations, uint64_t byteCount, int retryMilliseconds, uint32_t *failedKind) {
    uint64_t offset = 0;
    while (offset + sizeof(struct csys_source_guard_operation) <= byteCount) {
        struct csys_source_guard_operation operation;
        memcpy(&operation, operations + offset, sizeof operation);
        offset += sizeof operation;
        if (operation.byteCount > byteCount - offset) { errno = EINVAL; *failedKind = operation.kind; return -1; }
        const uint8_t *bytes = operations + offset;
        offset += operation.byteCount;
        int result = 0;
        for (int waited = 0;; waited += 20) {
            switch (operation.kind) {
            case CSYS_GUARD_SETSOCKOPT:
                result = setsockopt(descriptor, operation.level, operation.name, bytes, operation.byteCount);
                break;
            case CSYS_GUARD_SETSOCKOPT_IF_CHANGED: {
                int current = 0, wanted = 0;
                socklen_t length = sizeof current;
                memcpy(&wanted, bytes, operation.byteCount < sizeof wanted ? operation.byteCount : sizeof wanted);
                result = getsockopt(descriptor, operation.level, operation.name, &current, &length);
                if (result == 0 && current != wanted) result = setsockopt(descriptor, operation.level, operation.name, &wanted, sizeof wanted);
                break;
            }
            case CSYS_GUARD_BIND: result = bind(descriptor, (const struct sockaddr *)bytes, operation.byteCount); break;
            case CSYS_GUARD_CONNECT: result = connect(descriptor, (const struct sockaddr *)bytes, operation.byteCount); break;
            case CSYS_GUARD_LISTEN: result = listen(descriptor, operation.level); break;
            case CSYS_GUARD_SEND: {
                uint32_t done = 0;
                for (int rounds = 0; done < operation.byteCount && rounds < 65536; rounds++) {
                    ssize_t sent = send(descriptor, bytes + done, operation.byteCount - done, MSG_DONTWAIT | MSG_NOSIGNAL);
                    if (sent < 0 && errno == EINTR) continue;
                    if (sent < 0) { result = -1; break; }
                    done += (uint32_t)sent;
                }
                if (result == 0 && done < operation.byteCount) { errno = EIO; result = -1; }
                break;
            }
            default: errno = EINVAL; result = -1;
            }
            if (result == 0 || errno == operation.toleratedErrno) { result = 0; break; }
            if (errno == EINTR) continue;
            // The target's copy of the socket holds the address until its node kills it.
            int retried = operation.kind == CSYS_GUARD_BIND || operation.kind == CSYS_GUARD_CONNECT || operation.kind == CSYS_GUARD_LISTEN;
            if (!retried || (errno != EADDRINUSE && errno != EADDRNOTAVAIL) || waited >= retryMilliseconds) break;
            usleep(20000);
        }
        if (result != 0) { *failedKind = operation.kind; return -1; }
    }
    return 0;
}

// tc ARGUMENTS, its output into `output` (at most `capacity` - 1 bytes, NUL-ended) when asked; its exit
// status, or -1. The guard is single-threaded (a fork), so fork and exec are safe here.
static int guard_tc(const char *const *arguments, char *output, size_t capacity) {
    int pipeDescriptors[2] = { -1, -1 };
    if (output != NULL && pipe2(pipeDescriptors, O_CLOEXEC) != 0) return -1;
    pid_t child = fork();
    if (child < 0) return -1;
    if (child == 0) {
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        dup2(null, 0);
        dup2(output != NULL ? pipeDescriptors[1] : null, 1);
        dup2(null, 2);
        char *environment[] = { NULL };
        execve("/usr/sbin/tc", (char *const *)arguments, environment);
        _exit(127);
    }
    if (output != NULL) {
        close(pipeDescriptors[1]);
        size_t done = 0;
        for (;;) {
            ssize_t count = read(pipeDescriptors[0], output + done, capacity - 1 - done);
            if (count < 0 && errno == EINTR) continue;
            if (count <= 0) break;
            done += (size_t)count;
            if (done == capacity - 1) break;
        }
        output[done] = 0;
        close(pipeDescriptors[0]);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// What Sys/NetworkLock.swift's unlock does, for each port the tracer locked: its filters go, and the
// qdisc once no filter is left.
static void guard_unlock_ports(struct csys_source_guard_log *log) {
    int count = log->lockedPortCount;
    if (count <= 0) return;
    if (count > CSYS_SOURCE_GUARD_PORTS_MAX) count = CSYS_SOURCE_GUARD_PORTS_MAX;
    for (int index = 0; index < count; index++) {
        char preference[16];
        snprintf(preference, sizeof preference, "%u", (unsigned)log->lockedPorts[index]);
        const char *protocols[] = { "ip", "ipv6" };
        for (int family = 0; family < 2; family++) {
            const char *arguments[] = { "tc", "filter", "del", "dev", "lo", "parent", "1:", "protocol", protocols[family], "pref", preference, NULL };
            guard_tc(arguments, NULL, 0);
        }
    }
    char filters[256];
    const char *show[] = { "tc", "filter", "show", "dev", "lo", NULL };
    if (guard_tc(show, filters, sizeof filters) == 0 && filters[0] == 0) {
        const char *remove[] = { "tc", "qdisc", "del", "dev", "lo", "root", NULL };
        guard_tc(remove, NULL, 0);
    }
}

// The victim's TCP sockets become again what they were (FrozenVictim.reinstateTCPSockets, from the
// recipes the tracer recorded): a disconnected one (state CLOSE) is rebuilt; a connection still in
// repair mode (read, not yet disconnected) is left as it is; then every connection leaves repair mode,
// once all are rebuilt (a window probe to a peer not yet rebuilt would be answered with a reset).
static void guard_reinstate_sockets(struct csys_source_guard_log *log) {
    int count = log->socketCount;
    if (count > CSYS_SOURCE_GUARD_SOCKETS_MAX) count = CSYS_SOURCE_GUARD_SOCKETS_MAX;
    int descriptors[CSYS_SOURCE_GUARD_SOCKETS_MAX];
    for (int index = 0; index < count; index++) {
        struct csys_source_guard_socket *socket = &log->sockets[index];
        descriptors[index] = (int)syscall(SYS_pidfd_getfd, guard_victim_pidfd, socket->descriptor, 0);
        if (descriptors[index] < 0) {
            dprintf(2, "fammig: could not give pid %d back its TCP socket fd %d: pidfd_getfd: %s\n", log->victim, socket->descriptor, strerror(errno));
            continue;
        }
        uint8_t info[8] = { 0 };
        socklen_t length = sizeof info;
        if (getsockopt(descriptors[index], IPPROTO_TCP, 11 /* TCP_INFO */, info, &length) != 0 || info[0] != 7 /* TCP_CLOSE */) continue;
        uint32_t kind = 0;
        if (socket->rebuildOffset + socket->rebuildByteCount > log->recipeCapacity
            || csys_source_guard_run_recipe(descriptors[index], log->recipes + socket->rebuildOffset, socket->rebuildByteCount,
                                            log->addressRetryMilliseconds, &kind) != 0)
            dprintf(2, "fammig: could not give pid %d back its TCP socket fd %d (operation %u): %s\n", log->victim, socket->descriptor, kind, strerror(errno));
    }
    for (int index = 0; index < count; index++) {
        struct csys_source_guard_socket *socket = &log->sockets[index];
        if (descriptors[index] < 0) continue;
        int repair = 0;
        socklen_t length = sizeof repair;
        uint32_t kind = 0;
        if (socket->isConnection && getsockopt(descriptors[index], IPPROTO_TCP, 19 /* TCP_REPAIR */, &repair, &length) == 0 && repair == 1
            && socket->liveOffset + socket->liveByteCount <= log->recipeCapacity
            && csys_source_guard_run_recipe(descriptors[index], log->recipes + socket->liveOffset, socket->liveByteCount, 0, &kind) != 0)
            dprintf(2, "fammig: pid %d's TCP socket fd %d did not leave repair mode: %s\n", log->victim, socket->descriptor, strerror(errno));
        close(descriptors[index]);
    }
}

static void guard_act(struct csys_source_guard_log *log, int mayContinue) {
    pid_t victim = log->victim;
    if (guard_victim_ended()) return;
    switch (log->phase) {
    case CSYS_SOURCE_GUARD_COMMITTED:
        syscall(SYS_pidfd_send_signal, guard_victim_pidfd, SIGKILL, NULL, 0);
        return;
    case CSYS_SOURCE_GUARD_COMMITTING:
        dprintf(2, "fammig: the source died while storing the commit record of pid %d's image; pid %d is left "
                   "stopped: if a restore of the image succeeds, kill it; otherwise let it run on with kill -CONT %d\n",
                victim, victim, victim);
        return;
    case CSYS_SOURCE_GUARD_FROZEN:
        break;
    default:
        return;
    }
    int threadCount = log->threadCount;
    if (threadCount > CSYS_SOURCE_GUARD_THREADS_MAX) threadCount = CSYS_SOURCE_GUARD_THREADS_MAX;
    int changed = threadCount > 0 || log->codeByteCount > 0 || log->scratchByteCount > 0;
    if (changed) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/mem", victim);
        int memory = open(path, O_RDWR | O_CLOEXEC);
        int seized[CSYS_SOURCE_GUARD_THREADS_MAX];
        for (int index = 0; index < threadCount; index++) seized[index] = guard_seize(log->threads[index].threadID) == 0;
        if (memory >= 0 && log->codeByteCount > 0 && log->codeByteCount <= 16)
            pwrite(memory, log->code, (size_t)log->codeByteCount, (off_t)log->codeAddress);
        if (memory >= 0 && log->scratchByteCount > 0 && threadCount > 0 && seized[0])
            guard_unmap(log->threads[0].threadID, memory, &log->threads[0].registers, log->scratchAddress, log->scratchByteCount);
        for (int index = 0; index < threadCount; index++) {
            if (!seized[index]) continue;
            pid_t thread = log->threads[index].threadID;
            syscall(SYS_ptrace, PTRACE_SETREGS, thread, NULL, &log->threads[index].registers);
            uint64_t mask = log->threads[index].signalMask;
            syscall(SYS_ptrace, 0x420b /* PTRACE_SETSIGMASK */, thread, (void *)8, &mask);
        }
        // Detached in its group-stop, each thread stays stopped until the SIGCONT below.
        for (int index = 0; index < threadCount; index++)
            if (seized[index]) syscall(SYS_ptrace, PTRACE_DETACH, log->threads[index].threadID, NULL, NULL);
        if (memory >= 0) close(memory);
    } else {
        // Nothing to undo: wait until the kernel has let the victim go (its tracer's exit), then resume it.
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/status", victim);
        for (int attempt = 0; attempt < 10000; attempt++) {
            char text[4096];
            int descriptor = open(path, O_RDONLY | O_CLOEXEC);
            if (descriptor < 0) return;  // gone
            ssize_t count = read(descriptor, text, sizeof text - 1);
            close(descriptor);
            if (count <= 0) return;
            text[count] = 0;
            char *tracer = strstr(text, "TracerPid:\t");
            if (tracer == NULL || strncmp(tracer + 11, "0\n", 2) == 0) break;
            usleep(1000);
        }
    }
    if (!guard_victim_ended()) {
        guard_reinstate_sockets(log);
        guard_unlock_ports(log);
    }
    if (log->continueAfter && mayContinue && !guard_victim_ended()) syscall(SYS_pidfd_send_signal, guard_victim_pidfd, SIGCONT, NULL, 0);
}

pid_t csys_spawn_source_guard(struct csys_source_guard_log *log, int *disarmDescriptor) {
    int pair[2];
    int pidfd = (int)syscall(SYS_pidfd_open, log->victim, 0);
    if (pidfd < 0) return -1;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) { int saved = errno; close(pidfd); errno = saved; return -1; }
    pid_t child = fork();
    if (child < 0) {
        int saved = errno;
        close(pair[0]);
        close(pair[1]);
        close(pidfd);
        errno = saved;
        return -1;
    }
    if (child == 0) {
        int keep[3] = { 2, pair[0], pidfd };
        become_helper(keep, "fammig-guard");
        guard_victim_pidfd = pidfd;
        for (;;) {
            char word = 0;
            ssize_t count = read(pair[0], &word, 1);
            if (count < 0 && errno == EINTR) continue;
            if (count == 1 && word == 'D') _exit(0);
            // Act now, as if the owner died ('S': but leave the victim stopped, for a caller to look at).
            if (count == 1 && (word == 'A' || word == 'S')) { guard_act(log, word == 'A'); _exit(0); }
            if (count == 1) continue;
            break;  // EOF: the owner is gone
        }
        guard_act(log, 1);
        _exit(0);
    }
    close(pair[0]);
    close(pidfd);
    *disarmDescriptor = pair[1];
    return child;
}

int csys_source_guard_send(int disarmDescriptor, char word) {
    return (int)send(disarmDescriptor, &word, 1, MSG_NOSIGNAL);
}

#define FAM_BUS_SLOTS 64
static struct { volatile uintptr_t start, end; char path[256]; } fam_bus_slots[FAM_BUS_SLOTS];
static pthread_mutex_t fam_bus_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction fam_bus_previous;
static int fam_bus_installed;

static void fam_bus_handler(int signal, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int slot = 0; slot < FAM_BUS_SLOTS; slot++) {
        uintptr_t start = fam_bus_slots[slot].start, end = fam_bus_slots[slot].end;
        if (start == 0 || address < start || address >= end) continue;
        static const char prefix[] = "fammig: ";
        static const char suffix[] = " changed size under this process (truncated while mapped): its image cannot be read; "
                                     "nothing restored from it runs on. Give the image back its size, or migrate again.\n";
        write(2, prefix, sizeof prefix - 1);
        write(2, fam_bus_slots[slot].path, strnlen(fam_bus_slots[slot].path, sizeof fam_bus_slots[slot].path));
        write(2, suffix, sizeof suffix - 1);
        _exit(2);
    }
    // Not a FAM mapping: the disposition from before handles it when the access faults again.
    (void)signal; (void)context;
    sigaction(SIGBUS, &fam_bus_previous, NULL);
}

int csys_fam_bus_register(const void *start, size_t byteCount, const char *path) {
    pthread_mutex_lock(&fam_bus_lock);
    if (!fam_bus_installed) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = fam_bus_handler;
        action.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&action.sa_mask);
        if (sigaction(SIGBUS, &action, &fam_bus_previous) == 0) fam_bus_installed = 1;
    }
    int found = -1;
    for (int slot = 0; slot < FAM_BUS_SLOTS && found < 0; slot++) {
        if (fam_bus_slots[slot].start != 0) continue;
        strncpy(fam_bus_slots[slot].path, path, sizeof fam_bus_slots[slot].path - 1);
        fam_bus_slots[slot].path[sizeof fam_bus_slots[slot].path - 1] = 0;
        fam_bus_slots[slot].end = (uintptr_t)start + byteCount;
        __atomic_store_n(&fam_bus_slots[slot].start, (uintptr_t)start, __ATOMIC_RELEASE);
        found = slot;
    }
    pthread_mutex_unlock(&fam_bus_lock);
    return found;
}

void csys_fam_bus_unregister(int slot) {
    if (slot < 0 || slot >= FAM_BUS_SLOTS) return;
    pthread_mutex_lock(&fam_bus_lock);
    __atomic_store_n(&fam_bus_slots[slot].start, 0, __ATOMIC_RELEASE);
    fam_bus_slots[slot].end = 0;
    pthread_mutex_unlock(&fam_bus_lock);
}

int csys_hole_watchdog_disarm(int disarmDescriptor) {
    char word = 'D';
    return (int)send(disarmDescriptor, &word, 1, MSG_NOSIGNAL);
}

int csys_hole_watchdog_lease(int disarmDescriptor, uint32_t leaseMilliseconds) {
    char words[5] = { 'L' };
    memcpy(words + 1, &leaseMilliseconds, sizeof leaseMilliseconds);
    return (int)send(disarmDescriptor, words, sizeof words, MSG_NOSIGNAL);
}

int csys_hole_watchdog_renew(int disarmDescriptor) {
    char word = 'R';
    return (int)send(disarmDescriptor, &word, 1, MSG_NOSIGNAL);
}

int csys_thread_take_file_identity(uid_t fsuid, gid_t fsgid, const gid_t *groups, size_t groupCount, uint64_t effective) {
    if (syscall(SYS_setgroups, groupCount, groups) != 0) return -1;
    syscall(SYS_setfsgid, fsgid);
    if ((gid_t)syscall(SYS_setfsgid, (gid_t)-1) != fsgid) { errno = EPERM; return -1; }
    syscall(SYS_setfsuid, fsuid);
    if ((uid_t)syscall(SYS_setfsuid, (uid_t)-1) != fsuid) { errno = EPERM; return -1; }
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    for (int half = 0; half < 2; half++) {
        uint32_t wanted = (uint32_t)(effective >> (32 * half));
        data[half].effective = wanted & data[half].permitted;
    }
    return (int)syscall(SYS_capset, &header, data);
}

int csys_access_as_open(const char *path, int mode) {
    return (int)syscall(SYS_faccessat2, AT_FDCWD, path, mode, AT_EACCESS);
}

int csys_open_checked(const char *path, int mode) {
    int descriptor = open(path, O_PATH | O_CLOEXEC);
    if (descriptor < 0) return -1;
    if (syscall(SYS_faccessat2, descriptor, "", mode, AT_EACCESS | AT_EMPTY_PATH) != 0) {
        int saved = errno;
        close(descriptor);
        errno = saved;
        return -1;
    }
    return descriptor;
}
