// Why this file exists: ptrace answers only the OS thread that attached, and every request has its own
// calling convention. `Tracee` wraps one traced thread, checks the thread rule on every call, and turns
// each request into a typed method.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// How a traced thread stopped (from `waitpid`).
public enum StopReason: Equatable, Sendable {
    case exited(status: Int32)
    case killed(signal: Int32)
    /// A signal-delivery stop (or the legacy SIGTRAP after exec for PTRACE_TRACEME).
    case signal(Int32)
    /// A ptrace event stop: `event` is PTRACE_EVENT_*; PTRACE_INTERRUPT gives PTRACE_EVENT_STOP (128).
    case event(Int32, signal: Int32)
    /// A syscall-enter or syscall-exit stop (PTRACE_O_TRACESYSGOOD).
    case syscall

    public var isTerminal: Bool {
        switch self {
        case .exited, .killed: true
        default: false
        }
    }
}

/// The kernel's `struct ptrace_rseq_configuration`.
public struct RseqConfiguration: Equatable, Sendable {
    public var address: UInt64
    public var byteCount: UInt32
    public var signature: UInt32
    public var flags: UInt32
    public init(address: UInt64, byteCount: UInt32, signature: UInt32, flags: UInt32) {
        (self.address, self.byteCount, self.signature, self.flags) = (address, byteCount, signature, flags)
    }
}

/// One traced thread. Every call must come from the thread that attached (checked).
public final class Tracee: @unchecked Sendable {
    public let processID: ProcessID
    private let tracerThreadID: pid_t
    public private(set) var isAttached: Bool

    public static let eventStop: Int32 = 128
    static let optionExitKill: UInt = 0x100000
    static let optionTraceSysGood: UInt = 1
    static let optionSuspendSeccomp: UInt = 0x200000

    private init(processID: ProcessID, attached: Bool) {
        self.processID = processID
        self.tracerThreadID = csys_gettid()
        self.isAttached = attached
    }

    /// PTRACE_SEIZE (no stop) with SUSPEND_SECCOMP, so that injected syscalls are not judged by the
    /// victim's own seccomp filter, and with EXITKILL unless `killedWithTracer` is false: a source's
    /// victim must outlive its tracer until the commit record (`setKilledWithTracer` turns it on then).
    public static func seize(_ processID: ProcessID, killedWithTracer: Bool = true) throws -> Tracee {
        let options = (killedWithTracer ? optionExitKill : 0) | optionTraceSysGood | optionSuspendSeccomp
        try checked("ptrace(PTRACE_SEIZE, \(processID))") {
            csys_ptrace(Int(PTRACE_SEIZE.rawValue), processID.rawValue, nil, UnsafeMutableRawPointer(bitPattern: options))
        }
        return Tracee(processID: processID, attached: true)
    }

    /// Adopts a child that called PTRACE_TRACEME: waits for its exec stop, then sets the options.
    /// Returns the stop seen (a SIGTRAP signal stop when the exec worked).
    /// Without `suspendSeccomp` the child's own seccomp filter judges its syscalls as it would untraced.
    public static func adoptTracedChild(_ processID: ProcessID, suspendSeccomp: Bool = true) throws -> (Tracee, StopReason) {
        let tracee = Tracee(processID: processID, attached: true)
        let reason = try tracee.waitForStop()
        guard reason == .signal(SIGTRAP) else { return (tracee, reason) }
        let options = optionExitKill | optionTraceSysGood | (suspendSeccomp ? optionSuspendSeccomp : 0)
        try tracee.request("PTRACE_SETOPTIONS", PTRACE_SETOPTIONS.rawValue, nil, UnsafeMutableRawPointer(bitPattern: options))
        return (tracee, reason)
    }

    private func checkThread() {
        precondition(csys_gettid() == tracerThreadID,
                     "ptrace for \(processID) called from thread \(csys_gettid()), attached by \(tracerThreadID)")
    }

    @discardableResult
    private func request(_ name: String, _ code: UInt32, _ address: UnsafeMutableRawPointer?,
                         _ data: UnsafeMutableRawPointer?) throws -> Int {
        checkThread()
        return try checked("ptrace(\(name), \(processID))") {
            csys_ptrace(Int(code), processID.rawValue, address, data)
        }
    }

    /// PTRACE_SETOPTIONS with or without EXITKILL (the tracee must be in a ptrace-stop).
    public func setKilledWithTracer(_ killed: Bool) throws {
        let options = (killed ? Tracee.optionExitKill : 0) | Tracee.optionTraceSysGood | Tracee.optionSuspendSeccomp
        try request("PTRACE_SETOPTIONS", PTRACE_SETOPTIONS.rawValue, nil, UnsafeMutableRawPointer(bitPattern: options))
    }

    public func interrupt() throws {
        try request("PTRACE_INTERRUPT", PTRACE_INTERRUPT.rawValue, nil, nil)
    }

    /// Waits for the next stop or the end of the thread.
    public func waitForStop() throws -> StopReason {
        try nextStop(blocking: true)!
    }

    /// The next stop or end if one is there, else nil at once.
    public func pollStop() throws -> StopReason? {
        try nextStop(blocking: false)
    }

    private func nextStop(blocking: Bool) throws -> StopReason? {
        checkThread()
        var status: Int32 = 0
        let result = try retryingInterrupts("waitpid(\(processID))") {
            waitpid(processID.rawValue, &status, __WALL | (blocking ? 0 : WNOHANG))
        }
        if result == 0 { return nil }
        if status & 0x7f == 0 { isAttached = false; return .exited(status: (status >> 8) & 0xff) }
        if status & 0xff != 0x7f { isAttached = false; return .killed(signal: status & 0x7f) }
        let signal = (status >> 8) & 0xff
        let event = status >> 16
        if event != 0 { return .event(event, signal: signal) }
        if signal == (SIGTRAP | 0x80) { return .syscall }
        return .signal(signal)
    }

    public func resume(signal: Int32 = 0) throws {
        try request("PTRACE_CONT", PTRACE_CONT.rawValue, nil, UnsafeMutableRawPointer(bitPattern: Int(signal)))
    }

    /// Resumes until the next syscall-enter or syscall-exit stop.
    public func resumeToSyscall(signal: Int32 = 0) throws {
        try request("PTRACE_SYSCALL", PTRACE_SYSCALL.rawValue, nil, UnsafeMutableRawPointer(bitPattern: Int(signal)))
    }

    /// Kills the whole process and waits until every one of `threads` (all traced by the caller) has
    /// reported its end. Non-blocking waits in turn: a dying thread group may need its other threads
    /// reaped before its last one can finish (an exiting pid 1 waits for its namespace to empty).
    public static func killAndWait(_ threads: [Tracee], processID: ProcessID) {
        _ = Glibc.kill(processID.rawValue, SIGKILL)
        var left = threads
        var rounds = 0
        while !left.isEmpty && rounds < 100_000 {
            left = left.filter { thread in
                // Ends when the thread has no stop left to report (each is resumed past) or ended.
                while true {
                    let reason: StopReason?
                    do { reason = try thread.pollStop() } catch { return false }  // ECHILD: nothing left to report
                    guard let reason else { return true }
                    if reason.isTerminal { return false }
                    try? thread.resume()
                }
            }
            rounds += 1
            if !left.isEmpty { usleep(100) }
        }
    }

    public func detach() throws {
        try request("PTRACE_DETACH", PTRACE_DETACH.rawValue, nil, nil)
        isAttached = false
    }

    /// Detaches and lets the thread go with `signal` delivered (SIGSTOP: it stops in a group-stop before
    /// its next instruction, where another tracer can seize it).
    public func detach(signal: Int32) throws {
        try request("PTRACE_DETACH", PTRACE_DETACH.rawValue, nil, UnsafeMutableRawPointer(bitPattern: Int(signal)))
        isAttached = false
    }

    public func registers() throws -> GeneralRegisters {
        var raw = user_regs_struct()
        try request("PTRACE_GETREGS", PTRACE_GETREGS.rawValue, nil, &raw)
        return GeneralRegisters(raw)
    }

    public func setRegisters(_ registers: GeneralRegisters) throws {
        var raw = registers.raw
        try request("PTRACE_SETREGS", PTRACE_SETREGS.rawValue, nil, &raw)
    }

    static let noteX86XState: UInt = 0x202

    /// The extended FP state (NT_X86_XSTATE), exactly as many bytes as the kernel gives.
    public func extendedState() throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 16384)
        let byteCount = try buffer.withUnsafeMutableBytes { (bytes) throws -> Int in
            var vector = iovec(iov_base: bytes.baseAddress, iov_len: bytes.count)
            try request("PTRACE_GETREGSET", PTRACE_GETREGSET.rawValue,
                        UnsafeMutableRawPointer(bitPattern: Tracee.noteX86XState), &vector)
            return vector.iov_len
        }
        return Array(buffer.prefix(byteCount))
    }

    public func setExtendedState(_ state: [UInt8]) throws {
        var copy = state
        try copy.withUnsafeMutableBytes { (bytes) throws in
            var vector = iovec(iov_base: bytes.baseAddress, iov_len: bytes.count)
            try request("PTRACE_SETREGSET", PTRACE_SETREGSET.rawValue,
                        UnsafeMutableRawPointer(bitPattern: Tracee.noteX86XState), &vector)
        }
    }

    public func signalMask() throws -> UInt64 {
        var mask: UInt64 = 0
        try request("PTRACE_GETSIGMASK", 0x420a, UnsafeMutableRawPointer(bitPattern: 8), &mask)
        return mask
    }

    public func setSignalMask(_ mask: UInt64) throws {
        var copy = mask
        try request("PTRACE_SETSIGMASK", 0x420b, UnsafeMutableRawPointer(bitPattern: 8), &copy)
    }

    /// The thread's rseq registration, or nil when it has none.
    public func rseqConfiguration() throws -> RseqConfiguration? {
        var raw = (UInt64(0), UInt32(0), UInt32(0), UInt32(0), UInt32(0))
        try request("PTRACE_GET_RSEQ_CONFIGURATION", 0x420f,
                    UnsafeMutableRawPointer(bitPattern: MemoryLayout.size(ofValue: raw)), &raw)
        guard raw.0 != 0 else { return nil }
        return RseqConfiguration(address: raw.0, byteCount: raw.1, signature: raw.2, flags: raw.3)
    }

    /// The seccomp filters, oldest first, each as raw `sock_filter` bytes, with their flags.
    public func seccompFilters() throws -> [(program: [UInt8], flags: UInt64)] {
        var newestFirst: [(program: [UInt8], flags: UInt64)] = []
        for index in 0..<512 {
            checkThread()
            let count = csys_ptrace(0x420c, processID.rawValue, UnsafeMutableRawPointer(bitPattern: index), nil)
            if count < 0 {
                let error = SyscallError.current("ptrace(PTRACE_SECCOMP_GET_FILTER, \(processID))")
                // EINVAL: the process has no filter at all; ENOENT: past the oldest filter.
                if error.errno == .invalidArgument || error.errno == .noSuchFileOrDirectory { break }
                throw error
            }
            var program = [UInt8](repeating: 0, count: count * 8)
            try program.withUnsafeMutableBytes { (bytes) throws in
                try request("PTRACE_SECCOMP_GET_FILTER", 0x420c, UnsafeMutableRawPointer(bitPattern: index), bytes.baseAddress)
            }
            var metadata = (UInt64(index), UInt64(0))
            try request("PTRACE_SECCOMP_GET_METADATA", 0x420d,
                        UnsafeMutableRawPointer(bitPattern: MemoryLayout.size(ofValue: metadata)), &metadata)
            newestFirst.append((program, metadata.1))
        }
        return newestFirst.reversed()
    }

    /// Pending signals (`PTRACE_PEEKSIGINFO`), each as the raw 128-byte siginfo.
    public func pendingSignals(shared: Bool) throws -> [[UInt8]] {
        var result: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 128 * 32)
        while result.count < 4096 {
            var arguments = (UInt64(result.count), UInt32(shared ? 1 : 0), Int32(32))
            let count = try buffer.withUnsafeMutableBytes { (bytes) throws -> Int in
                try request("PTRACE_PEEKSIGINFO", 0x4209, &arguments, bytes.baseAddress)
            }
            if count == 0 { break }
            for index in 0..<count { result.append(Array(buffer[(index * 128)..<((index + 1) * 128)])) }
        }
        return result
    }
}
