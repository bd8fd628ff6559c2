// CSys: one-line C shims for what Swift's Glibc module lacks (ptrace, raw syscalls, cache-line flushes,
// ioctl numbers). Only the Sys module imports this header.
#ifndef CSYS_H
#define CSYS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <spawn.h>
#include <sys/user.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include <linux/sched.h>
#include <sys/ptrace.h>

/// All return -1 and set errno on failure, like libc.
long csys_ptrace(long request, pid_t pid, void *address, void *data);
long csys_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6);
pid_t csys_gettid(void);
int csys_pidfd_open(pid_t pid);
int csys_pidfd_getfd(int pidfd, int targetfd);
int csys_pidfd_send_signal(int pidfd, int signal);
ssize_t csys_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long localCount,
                              const struct iovec *remote, unsigned long remoteCount);
ssize_t csys_process_vm_writev(pid_t pid, const struct iovec *local, unsigned long localCount,
                               const struct iovec *remote, unsigned long remoteCount);
int csys_pin_to_cpu(pid_t tid, int cpu);
/// The calling thread's CPU mask (a 1024-bit cpu_set_t as 16 words), read and set again.
int csys_get_affinity(uint64_t mask[16]);
int csys_set_affinity(const uint64_t mask[16]);
/* Another thread's CPU mask (1024 bits), as sched_getaffinity/sched_setaffinity(tid) see it. */
int csys_get_thread_affinity(pid_t tid, uint64_t mask[16]);
int csys_set_thread_affinity(pid_t tid, const uint64_t mask[16]);
int csys_first_in_first_out(pid_t tid, int priority);
int csys_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);

/// Starts `path` in a new process whose PID is `wantedPID` (0: any), which calls PTRACE_TRACEME and
/// stops at its exec. `personality` is applied before exec unless it is 0xffffffff. Only syscalls run
/// in the child, so this is safe from a multi-threaded parent. Returns the PID or -1 (errno).
pid_t csys_spawn_traced(const char *path, char *const argv[], char *const envp[], pid_t wantedPID,
                        unsigned long personality);

/// Like csys_spawn_traced, but the child is the first process (pid 1) of a new PID namespace: a target
/// node's PID space on a machine that also hosts the source node.
/* With newIPCNamespace, the child gets a fresh IPC namespace too (CLONE_NEWIPC). */
pid_t csys_spawn_traced_new_pid_namespace(const char *path, char *const argv[], char *const envp[], int newIPCNamespace);

/// Starts `path` as pid 1 of a new PID namespace with stdin, stdout and stderr opened from the given
/// paths (stdout/stderr created 0600, truncated) and every other descriptor closed. Returns the PID
/// (as this namespace sees it) or -1 (errno).
pid_t csys_spawn_program_new_pid_namespace(const char *path, char *const argv[], char *const envp[],
                                           const char *standardInput, const char *standardOutput,
                                           const char *standardError, unsigned long personality);
/// The same, traced (PTRACE_TRACEME) by the calling thread and stopped at the exec; PDEATHSIG SIGKILL
/// only with `dieWithParent` (a migrated process keeps it, and dies with its restorer's thread).
pid_t csys_spawn_traced_program_new_pid_namespace(const char *path, char *const argv[], char *const envp[],
                                                  const char *standardInput, const char *standardOutput,
                                                  const char *standardError, unsigned long personality, int dieWithParent);

/// Starts a watchdog for a restored process that still lacks pages: a child of this process that keeps
/// only `pidfd` (the restored process), a copy of `userfaultfd` (so the userfaultfd outlives this process:
/// a fault of the target then stays blocked instead of reading zeros) and the read end of a pipe whose
/// other end (a socket pair), returned in *disarmDescriptor (O_CLOEXEC), only this process holds. If that end closes
/// without a 'D' written first (this process died, or gave up), the watchdog SIGKILLs the restored process
/// through the pidfd and waits (at most 5 s) until it is gone; on 'D' (every page installed), or once the
/// restored process has ended, it just exits. It ignores terminal signals and has its own session, so a
/// ^C or SIGTERM that kills this process does not kill the watchdog with it. Only syscalls run in the
/// child, so this is safe from a multi-threaded parent. Returns the watchdog's PID, or -1 (errno).
pid_t csys_spawn_hole_watchdog(int pidfd, int userfaultfd, int *disarmDescriptor);
/// Sends the watchdog its 'D' (MSG_NOSIGNAL: no SIGPIPE when it has exited already).
int csys_hole_watchdog_disarm(int disarmDescriptor);
/// Gives the watchdog a lease of `leaseMilliseconds` from now: unless renewed ('R', below) within it,
/// the watchdog says so on stderr and kills the restored process as if its owner had died (exit 3).
int csys_hole_watchdog_lease(int disarmDescriptor, uint32_t leaseMilliseconds);
/// Renews the lease for another `leaseMilliseconds` from now.
int csys_hole_watchdog_renew(int disarmDescriptor);

/// What a source guard (below) undoes in a victim whose tracer died before the commit record: every
/// field is written by the tracer before it changes the victim, so the log always holds the victim's
/// original values (putting them back twice does no harm). Lives in a MAP_SHARED page both processes see.
#define CSYS_SOURCE_GUARD_THREADS_MAX 256
enum {
    CSYS_SOURCE_GUARD_IDLE = 0,        // nothing to do: the victim is not ours (not frozen, or released)
    CSYS_SOURCE_GUARD_FROZEN = 1,      // before the commit record: undo, detach, let it run on
    CSYS_SOURCE_GUARD_COMMITTING = 2,  // the commit record is being stored: leave it stopped, say so
    CSYS_SOURCE_GUARD_COMMITTED = 3,   // the image is the process: kill the victim
};
struct csys_source_guard_thread {
    int32_t threadID;
    int32_t reserved;
    uint64_t signalMask;
    struct user_regs_struct registers;
};
#define CSYS_SOURCE_GUARD_SOCKETS_MAX 512
#define CSYS_SOURCE_GUARD_PORTS_MAX 512
/// One operation on a socket, as the engine's rebuild of it would make the call (Engine's
/// TCPSocketRestorer records them): setsockopt(level, name, value), the same only when getsockopt
/// answers another value, bind or connect to the sockaddr in `bytes`, send `bytes` (a repair queue's
/// fill), listen(`level`). `toleratedErrno` is an answer that counts as done (bind's EINVAL on a socket
/// still bound). Followed by `byteCount` bytes.
enum {
    CSYS_GUARD_SETSOCKOPT = 1, CSYS_GUARD_SETSOCKOPT_IF_CHANGED = 2, CSYS_GUARD_BIND = 3, CSYS_GUARD_CONNECT = 4,
    CSYS_GUARD_SEND = 5, CSYS_GUARD_LISTEN = 6,
};
struct csys_source_guard_operation {
    uint32_t kind;
    int32_t toleratedErrno;
    int32_t level;
    int32_t name;
    uint32_t byteCount;
};
/// A TCP socket of the victim (its descriptor number there): `rebuild` (offset and length in the
/// recipes) makes it again what it was once disconnected; `live` ends its repair mode (a connection).
struct csys_source_guard_socket {
    int32_t descriptor;
    int32_t isConnection;
    uint64_t rebuildOffset, rebuildByteCount;
    uint64_t liveOffset, liveByteCount;
};
struct csys_source_guard_log {
    volatile int32_t phase;
    int32_t victim;
    /// 1 once the tracer sent the victim the SIGSTOP of its freeze: the guard sends SIGCONT.
    volatile int32_t continueAfter;
    volatile int32_t threadCount;
    volatile uint64_t codeAddress;
    volatile int32_t codeByteCount;
    uint8_t code[16];
    volatile uint64_t scratchAddress;
    volatile uint64_t scratchByteCount;
    struct csys_source_guard_thread threads[CSYS_SOURCE_GUARD_THREADS_MAX];
    /// The victim's TCP sockets the tracer read (and then disconnected, so that the target's could take
    /// their addresses) and the loopback ports it locked: a guard that lets the victim run on rebuilds
    /// each socket from its recipe and unlocks each port first (csys_source_guard_socket).
    volatile int32_t socketCount;
    volatile int32_t lockedPortCount;
    uint16_t lockedPorts[CSYS_SOURCE_GUARD_PORTS_MAX];
    struct csys_source_guard_socket sockets[CSYS_SOURCE_GUARD_SOCKETS_MAX];
    /// How long a rebuild retries a bind, connect or listen that meets the address still taken (by the
    /// target's copy, until its node kills it): milliseconds.
    int32_t addressRetryMilliseconds;
    /// The recipes' operations (csys_source_guard_operation, one after another), in a second shared
    /// mapping of `recipeCapacity` bytes made before the fork.
    uint8_t *recipes;
    uint64_t recipeCapacity;
};
/// Forks a source guard over `log->victim`: a child that keeps only the read end of a socket pair whose
/// other end (O_CLOEXEC, returned in *disarmDescriptor) only this process holds, and stderr. On 'D' it
/// exits; when the other end closes without it (this process died: SIGKILL included) it acts on `log`
/// as its phase says. It ignores terminal signals and has its own session. Only syscalls run in the
/// child, so this is safe from a multi-threaded parent. Returns the guard's PID, or -1 (errno).
pid_t csys_spawn_source_guard(struct csys_source_guard_log *log, int *disarmDescriptor);
/// Runs the recipe at `operations` (`byteCount` bytes of csys_source_guard_operation records) on
/// `descriptor`, retrying a bind, connect or listen that meets EADDRINUSE or EADDRNOTAVAIL for up to
/// `retryMilliseconds`. 0, or -1 with errno of the first operation that failed (and *failedKind its kind).
int csys_source_guard_run_recipe(int descriptor, const uint8_t *operations, uint64_t byteCount, int retryMilliseconds, uint32_t *failedKind);
/// Sends the guard 'D' (disarm: exit, touch nothing), 'A' (act now on the log, as if this process died)
/// or 'S' (the same, but without the SIGCONT).
int csys_source_guard_send(int disarmDescriptor, char word);

/// A FAM file truncated under its mapping makes every later access beyond the new end a SIGBUS: that is
/// input (another user, another node, a full disk), not a bug. Each registered mapping's range is known
/// to a SIGBUS handler (installed with the first registration) that, for a fault inside one, writes
/// "fammig: PATH changed size under this process ..." to stderr and exits 2 at once (so the processes
/// this one traces with EXITKILL, and the restored process its hole watchdog guards, die with it: no
/// half-restored process runs on). A fault anywhere else goes to the handler that was there before.
/// Returns the slot (for `unregister`), or -1 when all 64 slots are taken.
int csys_fam_bus_register(const void *start, size_t byteCount, const char *path);
void csys_fam_bus_unregister(int slot);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34), which Swift does not import.
int csys_spawn_actions_close_from(posix_spawn_file_actions_t *actions, int firstDescriptor);

/// Cleanup on SIGINT/SIGTERM/SIGHUP: the handler (async-signal-safe) unlinks every registered path and
/// SIGKILLs every registered process, then dies of the same signal. At most 16 paths (an empty directory
/// is removed too) and 8 processes.
void csys_cleanup_install(void);
/// Around starting and registering a process: a termination signal taken by any thread meanwhile is
/// acted on at the end of the outermost section.
void csys_cleanup_defer_begin(void);
void csys_cleanup_defer_end(void);
void csys_cleanup_register_path(const char *path);
void csys_cleanup_register_process(pid_t processID);

/// Cache-line write-back. method: 0 clwb, 1 clflushopt, 2 clflush. Each flushes every 64-byte line
/// overlapping [address, address+byteCount).
void csys_flush_range(const void *address, size_t byteCount, int method);
void csys_sfence(void);
/// Which flush instruction this CPU has (cpuid leaf 7 ebx bit 24 clwb, bit 23 clflushopt).
int csys_best_flush_method(void);

/// Fast 64-bit digest of a buffer whose size is a multiple of 8 (pages always are).
uint64_t csys_digest64(const void *address, size_t byteCount, uint64_t seed);
/// Compacts, in place, the pagemap words of `count` pages from `firstAddress`: each word with a bit of
/// `anyOf` and none of `noneOf` is replaced, in order, by its page's address. Returns how many there are.
/// A sparse mapping has millions of words, and a Swift loop over them took seconds in a debug build.
size_t csys_select_pagemap_pages(uint64_t *words, size_t count, uint64_t anyOf, uint64_t noneOf, uint64_t firstAddress);

/// The calling thread, and only it, takes on a file-access identity: supplementary `groups`, then
/// filesystem group and user IDs, then of its permitted capabilities only those in `effective` as
/// effective. Raw syscalls, because glibc's setgroups changes every thread of the process. For a
/// thread that makes its access checks and ends. 0, or -1 and errno (EPERM: an ID did not take).
int csys_thread_take_file_identity(uid_t fsuid, gid_t fsgid, const gid_t *groups, size_t groupCount, uint64_t effective);
/// faccessat2(AT_FDCWD, path, mode, AT_EACCESS): checked as an open would be, with the thread's
/// filesystem IDs, groups and effective capabilities.
int csys_access_as_open(const char *path, int mode);
/// The path resolved (O_PATH, as the calling thread's filesystem identity resolves it) and its inode
/// checked with faccessat2(AT_EACCESS|AT_EMPTY_PATH) for `mode`: one resolution serves the check and,
/// reopened through /proc/PID/fd, the later open. The O_PATH|O_CLOEXEC descriptor, or -1 and errno.
int csys_open_checked(const char *path, int mode);

/// A page-code key: OpenSSL's HMAC-SHA256 context (an EVP_MAC_CTX), keyed and fed the label once
/// (pagecode.c); opaque here so this header needs no OpenSSL header.
typedef struct { void *context; } csys_page_mac_key;
/// Prepares `key` for HMAC-SHA256 under `keyBytes`, already fed `label`; 0, or -1 when libcrypto has
/// no HMAC-SHA256.
int csys_page_mac_init(csys_page_mac_key *key, const uint8_t *keyBytes, size_t keyByteCount, const uint8_t *label, size_t labelByteCount);
/// Frees (and cleanses) what `csys_page_mac_init` made.
void csys_page_mac_free(csys_page_mac_key *key);
/// The first 8 bytes, little endian, of HMAC(key; label || generation (LE64) || address (LE64) ||
/// headerCode's byte count (LE32) || headerCode || page).
uint64_t csys_page_mac(const csys_page_mac_key *key, uint64_t generation, uint64_t address, const uint8_t *headerCode, size_t headerCodeByteCount,
                       const void *page, size_t pageByteCount);

static const unsigned long CSYS_UFFDIO_API = UFFDIO_API;
static const unsigned long CSYS_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long CSYS_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long CSYS_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long CSYS_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long CSYS_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long CSYS_UFFDIO_WRITEPROTECT = UFFDIO_WRITEPROTECT;
int csys_ioctl_pointer(int fd, unsigned long request, void *argument);

#endif
