// Why this file exists: starting processes is where fds, PIDs and signals leak. Victims are started with
// posix_spawn and explicit stdio; restore targets with clone3(set_tid) + PTRACE_TRACEME from the tracer
// thread, in C, because the child may run only raw syscalls.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum ExitStatus: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case killed(signal: Int32)

    public var description: String {
        switch self {
        case .exited(let code): "exited with status \(code)"
        case .killed(let signal): "killed by signal \(signal)"
        }
    }
}

public enum Spawn {
    /// Starts `path` with stdin from /dev/null and stdout/stderr appended to the given files.
    public static func program(path: String, arguments: [String], environment: [String],
                               standardOutputPath: String, standardErrorPath: String) throws(SyscallError) -> ProcessID {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, standardOutputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, standardErrorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        // Nothing else of ours leaks into the program (a pipe there would make it unmigratable).
        csys_spawn_actions_close_from(&actions, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Start with default dispositions and an empty mask, whatever this (multi-threaded) process has.
        var everySignal = sigset_t()
        sigfillset(&everySignal)
        var noSignal = sigset_t()
        sigemptyset(&noSignal)
        posix_spawnattr_setsigdefault(&attributes, &everySignal)
        posix_spawnattr_setsigmask(&attributes, &noSignal)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var processID: pid_t = 0
        let result = posix_spawn(&processID, path, &actions, &attributes, argv, envp)
        guard result == 0 else { throw SyscallError(call: "posix_spawn(\(path))", errno: .init(rawValue: result)) }
        return ProcessID(processID)
    }

    /// Starts `path` as pid 1 of a new PID namespace (a node of its own on this machine), stdio from and
    /// to the given files, nothing else inherited. Returns the PID this namespace sees.
    /// With `personality` (e.g. ADDR_NO_RANDOMIZE for a repeatable layout) the program also dies with
    /// the thread that started it (PDEATHSIG).
    public static func programInNewPIDNamespace(path: String, arguments: [String], environment: [String],
                                                standardOutputPath: String, standardErrorPath: String,
                                                personality: UInt32? = nil) throws(SyscallError) -> ProcessID {
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        let processID = try checked("clone3(CLONE_NEWPID) for \(path)") {
            argv.withUnsafeBufferPointer { argvBuffer in
                envp.withUnsafeBufferPointer { envpBuffer in
                    csys_spawn_program_new_pid_namespace(path, argvBuffer.baseAddress, envpBuffer.baseAddress, "/dev/null",
                                                         standardOutputPath, standardErrorPath,
                                                         UInt(personality ?? 0xffff_ffff))
                }
            }
        }
        return ProcessID(processID)
    }

    /// Starts `path` as pid 1 of a new PID namespace, traced by the calling thread and stopped at exec.
    /// With `newIPCNamespace`, in a fresh IPC namespace too (a SysV segment's ID must be free for the
    /// restored process while the victim, on the same machine, still holds it).
    public static func tracedStubInNewPIDNamespace(path: String, newIPCNamespace: Bool = false) throws(SyscallError) -> ProcessID {
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(path), nil]
        let envp: [UnsafeMutablePointer<CChar>?] = [nil]
        defer { argv.forEach { free($0) } }
        let processID = try checked(newIPCNamespace ? "clone3(CLONE_NEWPID|CLONE_NEWIPC)" : "clone3(CLONE_NEWPID)") {
            argv.withUnsafeBufferPointer { argvBuffer in
                envp.withUnsafeBufferPointer { envpBuffer in
                    csys_spawn_traced_new_pid_namespace(path, argvBuffer.baseAddress, envpBuffer.baseAddress, newIPCNamespace ? 1 : 0)
                }
            }
        }
        return ProcessID(processID)
    }

    /// Starts `path` as PID `wantedPID` (clone3 set_tid), traced by the calling thread and stopped at exec.
    public static func tracedStub(path: String, wantedPID: ProcessID, personality: UInt32?) throws(SyscallError) -> ProcessID {
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(path), nil]
        let envp: [UnsafeMutablePointer<CChar>?] = [nil]
        defer { argv.forEach { free($0) } }
        let processID = try checked("clone3(set_tid=\(wantedPID))") {
            argv.withUnsafeBufferPointer { argvBuffer in
                envp.withUnsafeBufferPointer { envpBuffer in
                    csys_spawn_traced(path, argvBuffer.baseAddress, envpBuffer.baseAddress, wantedPID.rawValue,
                                      UInt(personality ?? 0xffff_ffff))
                }
            }
        }
        return ProcessID(processID)
    }

    /// Waits for a child to end (EINTR retried).
    public static func waitForExit(_ processID: ProcessID) throws(SyscallError) -> ExitStatus {
        var status: Int32 = 0
        // Ends when the child exits or is killed (stops of a traced child are waited past).
        while true {
            try retryingInterrupts("waitpid(\(processID))") { waitpid(processID.rawValue, &status, __WALL) }
            if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
            if status & 0xff != 0x7f { return .killed(signal: status & 0x7f) }
        }
    }

    /// Non-blocking check whether a child ended; nil while it runs.
    public static func pollExit(_ processID: ProcessID) throws(SyscallError) -> ExitStatus? {
        var status: Int32 = 0
        let result = try retryingInterrupts("waitpid(\(processID), WNOHANG)") {
            waitpid(processID.rawValue, &status, __WALL | WNOHANG)
        }
        if result == 0 { return nil }
        if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
        return .killed(signal: status & 0x7f)
    }

    /// Whether a child of this process has ended (a zombie counts), without reaping it: cheap enough
    /// for a fault loop, unlike parsing /proc.
    public static func hasEnded(_ processID: ProcessID) -> Bool {
        var information = siginfo_t()
        let result = waitid(P_PID, id_t(processID.rawValue), &information, WEXITED | WNOHANG | WNOWAIT)
        if result != 0 { return !ProcFS.isAlive(processID) }  // not our child: fall back to /proc
        guard information._sifields._sigchld.si_pid == processID.rawValue else { return false }
        // waitid also reports a traced child's unread stop, whatever the options ask for; a zombie is
        // reported before any stop, so a stop means the child still lives.
        switch information.si_code {
        case Int32(CLD_EXITED), Int32(CLD_KILLED), Int32(CLD_DUMPED): return true
        default: return false
        }
    }

    /// Whether a child has ended or ends within `grace` (an install that failed with ESRCH may have
    /// met a target whose memory is already gone but whose exit is not yet visible).
    public static func endsSoon(_ processID: ProcessID, graceMilliseconds: Int = 200) -> Bool {
        for _ in 0..<max(1, graceMilliseconds) {
            if hasEnded(processID) { return true }
            usleep(1000)
        }
        return false
    }

    public static func kill(_ processID: ProcessID, signal: Int32 = SIGKILL) {
        _ = Glibc.kill(processID.rawValue, signal)
    }

    /// Kills a child and reaps it, with every thread of it this process traces: a traced thread stays a
    /// zombie until its tracer waits for it, and the leader (and, for pid 1 of a namespace, the whole
    /// namespace) cannot go before it. Returns the leader's status, nil if it was not ours to reap.
    @discardableResult
    /// So are the processes of its tree this process traces (a tree frozen by a source that died): each
    /// stays a zombie until waited for here, and a namespace's pid 1 waits for them.
    public static func killAndReap(_ processID: ProcessID, limit: Duration = .seconds(10)) -> ExitStatus? {
        let descendants = descendantProcessIDs(processID)
        kill(processID)
        let clock = ContinuousClock()
        let start = clock.now
        while clock.now - start < limit {
            for descendant in descendants {
                for thread in (try? ProcFS.threadIDs(descendant)) ?? [descendant] {
                    var status: Int32 = 0
                    _ = waitpid(thread.rawValue, &status, __WALL | WNOHANG)
                }
            }
            let threads = (try? ProcFS.threadIDs(processID)) ?? []
            for thread in threads where thread != processID {
                var status: Int32 = 0
                _ = waitpid(thread.rawValue, &status, __WALL | WNOHANG)
            }
            var status: Int32 = 0
            let result = waitpid(processID.rawValue, &status, __WALL | WNOHANG)
            if result == processID.rawValue {
                if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
                if status & 0xff != 0x7f { return .killed(signal: status & 0x7f) }
                continue  // a ptrace stop of the leader: its death follows
            }
            if result < 0 { return nil }
            usleep(200)
        }
        return nil
    }

    /// Every descendant of a process (children first listed, then theirs), at most 4096.
    public static func descendantProcessIDs(_ processID: ProcessID) -> [ProcessID] {
        var found: [ProcessID] = []
        var queue = [processID]
        var next = 0
        while next < queue.count && found.count < 4096 {
            let children = (try? ProcFS.childProcessIDs(queue[next])) ?? []
            next += 1
            found += children
            queue += children
        }
        return found
    }

    /// The number of CPUs online.
    public static var onlineCPUCount: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

    /// Pins the calling thread (or `threadID`) to one CPU: cross-CPU ptrace wake-ups are slow in VMs.
    public static func pin(threadID: ProcessID? = nil, cpu: Int32) {
        _ = csys_pin_to_cpu(threadID?.rawValue ?? 0, cpu)
    }

    /// Puts one thread under SCHED_FIFO at the lowest real-time priority. With every thread of a process
    /// so, and on one CPU, exactly one of them runs at a time, until it blocks; a thread it wakes waits
    /// at the back of the queue instead of preempting it, and no time slice ends a run. The order the
    /// threads run in then follows from what they do, not from timing.
    public static func runFirstInFirstOut(threadID: ProcessID) throws(SyscallError) {
        _ = try checked("sched_setscheduler(\(threadID), SCHED_FIFO)") { csys_first_in_first_out(threadID.rawValue, 1) }
    }

    /// Blocks until one of the descriptors is readable or the timeout passes.
    public static func waitReadable(_ descriptors: [Int32], timeoutMilliseconds: Int32) {
        var pollers = descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        _ = poll(&pollers, nfds_t(pollers.count), timeoutMilliseconds)
    }

    /// On SIGINT, SIGTERM or SIGHUP this process removes these files and kills these processes before it
    /// dies: a killed `fammig run` must not leave a FAM file or a victim behind.
    /// Runs `body` with SIGINT, SIGTERM and SIGHUP held back on this thread, then lets any that came
    /// meanwhile in: a process started and registered for `cleanUpOnTermination` inside `body` is never
    /// left running by a termination that arrives between its start and its registration.
    public static func deferringTermination<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        var termination = sigset_t()
        sigemptyset(&termination)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&termination, signal) }
        var previous = sigset_t()
        // This thread blocks them; another thread that takes one waits for the section's end (csys.c).
        csys_cleanup_defer_begin()
        pthread_sigmask(SIG_BLOCK, &termination, &previous)
        defer {
            pthread_sigmask(SIG_SETMASK, &previous, nil)
            csys_cleanup_defer_end()
        }
        return try body()
    }

    public static func cleanUpOnTermination(paths: [String], processes: [ProcessID]) {
        csys_cleanup_install()
        for path in paths { csys_cleanup_register_path(path) }
        for process in processes { csys_cleanup_register_process(process.rawValue) }
    }

    public static func currentThreadID() -> ProcessID { ProcessID(csys_gettid()) }
}
