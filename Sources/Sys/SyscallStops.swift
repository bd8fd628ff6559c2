// Why this file exists: a program that knows nothing of fammig has no rendezvous to stop at, but it makes
// the same system calls in the same order every run (when it is deterministic, with a fixed address
// layout). Counted under ptrace (PTRACE_SYSCALL with TRACESYSGOOD: an entry stop and an exit stop per
// call), the N-th call is a repeatable freeze point. The program is started traced by the calling thread
// (which must stay the one that waits for it), run to the exit stop of its N-th call, and detached with
// SIGSTOP: it stops in a group-stop before its next instruction, with the call's result in rax, where
// the dumper seizes it. Freezing after the call, not at its entry, means nothing has to be rewound: the
// registers are those of a program that has just come back from a system call.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum SyscallStopError: Error, CustomStringConvertible, Equatable {
    case cannotStart(path: String, reason: String)
    case endedBefore(syscall: Int, counted: Int, status: ExitStatus)
    case tooLong(path: String, limit: Duration)

    public var description: String {
        switch self {
        case .cannotStart(let path, let reason): "cannot start \(path) traced: \(reason)"
        case .endedBefore(let syscall, let counted, let status):
            "the program \(status) after \(counted) system calls, before the exit of call \(syscall); give a smaller --freeze-at-syscall"
        case .tooLong(let path, let limit): "\(path) ran longer than \(limit) under ptrace; give it less work (a workload must end by itself)"
        }
    }
}

public enum SyscallStops {
    /// What a traced run to the end saw.
    public struct Count: Sendable, Equatable {
        /// System calls entered, the last (exit_group) included.
        public var syscallCount: Int
        public var status: ExitStatus
    }

    /// Runs the program (as pid 1 of a new PID namespace, stdio from and to these paths, with `personality`)
    /// to its end, counting its system calls.
    public static func countToEnd(path: String, arguments: [String], environment: [String], standardOutputPath: String,
                                  standardErrorPath: String, personality: UInt32?, limit: Duration) throws(SyscallStopError) -> Count {
        let tracee = try start(path: path, arguments: arguments, environment: environment, standardOutputPath: standardOutputPath,
                               standardErrorPath: standardErrorPath, personality: personality, diesWithStarter: true)
        switch try run(tracee, path: path, toExitOf: nil, limit: limit) {
        case .ended(let count, let status): return Count(syscallCount: count, status: status)
        case .frozen: preconditionFailure("a run without a freeze point froze")
        }
    }

    /// Starts the program like `countToEnd`, runs it to the exit of its `syscall`-th system call (1-based) and
    /// leaves it detached and group-stopped there. Returns its PID. With `diesWithStarter` it gets PDEATHSIG
    /// SIGKILL (it dies with the calling thread); a migration keeps that, so its target then dies with the
    /// restorer's thread.
    public static func startFrozen(atSyscall syscall: Int, path: String, arguments: [String], environment: [String],
                                   standardOutputPath: String, standardErrorPath: String, personality: UInt32?,
                                   diesWithStarter: Bool, limit: Duration) throws(SyscallStopError) -> ProcessID {
        precondition(syscall >= 1, "system calls are counted from 1")
        let tracee = try start(path: path, arguments: arguments, environment: environment, standardOutputPath: standardOutputPath,
                               standardErrorPath: standardErrorPath, personality: personality, diesWithStarter: diesWithStarter)
        switch try run(tracee, path: path, toExitOf: syscall, limit: limit) {
        case .frozen: return tracee.processID
        case .ended(let count, let status): throw .endedBefore(syscall: syscall, counted: count, status: status)
        }
    }

    private static func start(path: String, arguments: [String], environment: [String], standardOutputPath: String,
                              standardErrorPath: String, personality: UInt32?, diesWithStarter: Bool) throws(SyscallStopError) -> Tracee {
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        let processID: pid_t
        do {
            processID = try checked("clone3(CLONE_NEWPID) for \(path)") {
                argv.withUnsafeBufferPointer { argvBuffer in
                    envp.withUnsafeBufferPointer { envpBuffer in
                        csys_spawn_traced_program_new_pid_namespace(path, argvBuffer.baseAddress, envpBuffer.baseAddress, "/dev/null",
                                                                    standardOutputPath, standardErrorPath, UInt(personality ?? 0xffff_ffff),
                                                                    diesWithStarter ? 1 : 0)
                    }
                }
            }
        } catch { throw .cannotStart(path: path, reason: "\(error)") }
        do {
            let (tracee, stop) = try Tracee.adoptTracedChild(ProcessID(processID), suspendSeccomp: false)
            guard stop == .signal(SIGTRAP) else {
                if !stop.isTerminal { Spawn.kill(ProcessID(processID)) }
                _ = try? Spawn.waitForExit(ProcessID(processID))
                throw SyscallStopError.cannotStart(path: path, reason: "it did not stop at its exec (\(stop)); is it an executable?")
            }
            return tracee
        } catch let error as SyscallStopError {
            throw error
        } catch {
            _ = Spawn.killAndReap(ProcessID(processID))
            throw .cannotStart(path: path, reason: "\(error)")
        }
    }

    private enum Ending {
        case frozen
        case ended(syscallCount: Int, status: ExitStatus)
    }

    /// Blocks until the child `processID` is in a group-stop or has ended, without reaping it.
    private static func waitForStopOrEnd(_ processID: ProcessID) {
        var information = siginfo_t()
        // Ends at the stop or the end (EINTR retried); any other error means it is not ours to wait for.
        while waitid(P_PID, id_t(processID.rawValue), &information, WSTOPPED | WEXITED | WNOWAIT | __WALL) != 0 {
            guard errno == EINTR else { return }
        }
    }

    private static func run(_ tracee: Tracee, path: String, toExitOf target: Int?, limit: Duration) throws(SyscallStopError) -> Ending {
        let clock = ContinuousClock()
        let start = clock.now
        var entered = 0
        var insideCall = false
        var idleSpins = 0
        do {
            try tracee.resumeToSyscall()
            // Ends at the wanted system call's exit, the program's end, or after `limit` (then it throws).
            while true {
                guard let stop = try tracee.pollStop() else {
                    // Polled, not waited for: a program that blocks forever must not hang its tracer.
                    if clock.now - start > limit {
                        _ = Spawn.killAndReap(tracee.processID)
                        throw SyscallStopError.tooLong(path: path, limit: limit)
                    }
                    idleSpins += 1
                    if idleSpins > 100 { usleep(50) } else { sched_yield() }
                    continue
                }
                idleSpins = 0
                switch stop {
                case .syscall:
                    if insideCall {
                        insideCall = false
                        if entered == target {
                            try tracee.detach(signal: SIGSTOP)
                            // The SIGSTOP is taken once it runs again: wait for the group-stop callers are
                            // promised (read at once, it was still running: WorkloadTests saw state R).
                            // It is our child, no longer traced: its parent is told of the stop (or of its
                            // death, if something killed it meanwhile). WNOWAIT leaves either to be
                            // waited for again, by the dumper that seizes it or by whoever reaps it.
                            waitForStopOrEnd(tracee.processID)
                            return .frozen
                        }
                    } else {
                        insideCall = true
                        entered += 1
                    }
                    try tracee.resumeToSyscall()
                case .signal(let signal):
                    // The legacy SIGTRAP after an exec of its own is ours, not the program's.
                    try tracee.resumeToSyscall(signal: signal == SIGTRAP ? 0 : signal)
                case .event:
                    try tracee.resumeToSyscall()
                case .exited(let code):
                    return .ended(syscallCount: entered, status: .exited(code))
                case .killed(let signal):
                    return .ended(syscallCount: entered, status: .killed(signal: signal))
                }
            }
        } catch let error as SyscallStopError {
            throw error
        } catch {
            _ = Spawn.killAndReap(tracee.processID)
            throw .cannotStart(path: path, reason: "tracing it: \(error)")
        }
    }
}
