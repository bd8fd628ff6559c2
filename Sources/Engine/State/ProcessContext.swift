// The process context besides memory, registers, signals and credentials: the directory it works in, the
// mask it creates files with, how the OOM killer and core dumps treat it, whether it may get transparent
// huge pages, its interval timers, and each thread's alternate signal stack. Each field is read at freeze (StateReader, the
// same reader the state oracle uses on the target), restored by ContextRestorer and compared by the state
// oracle, so a loss is caught instead of shipped. What cannot be restored is refused here, before the
// freeze where /proc tells it, else right after it, while the victim is still untouched.
import Sys

/// One thread's sigaltstack (`stack_t`), without SS_ONSTACK: that bit says whether the stack pointer is
/// inside the stack right now, which the kernel derives from the registers; it is not stored anywhere.
public struct SignalStack: Equatable, Sendable, CustomStringConvertible {
    public var address: UInt64
    public var byteCount: UInt64
    /// SS_DISABLE and SS_AUTODISARM.
    public var flags: UInt32

    public static let onStackFlag: UInt32 = 1
    public static let disableFlag: UInt32 = 2
    public static let autoDisarmFlag: UInt32 = 1 << 31
    /// What the kernel reports for a thread that never set one.
    public static let disabled = SignalStack(address: 0, byteCount: 0, flags: disableFlag)

    public var isDisabled: Bool { flags & Self.disableFlag != 0 }
    public var description: String {
        isDisabled ? "disabled" : "\(byteCount) bytes at \(hex(address))\(flags & Self.autoDisarmFlag != 0 ? " (autodisarm)" : "")"
    }

    /// The 24 bytes of `stack_t` as sigaltstack(2) answers them.
    init(stackT raw: [UInt8]) {
        address = raw.littleEndianWord(at: 0)
        flags = UInt32(truncatingIfNeeded: raw.littleEndianWord(at: 8)) & ~Self.onStackFlag
        byteCount = raw.littleEndianWord(at: 16)
        if isDisabled { (address, byteCount) = (0, 0) }
    }

    public init(address: UInt64, byteCount: UInt64, flags: UInt32) {
        (self.address, self.byteCount, self.flags) = (address, byteCount, flags)
    }
}

/// One of setitimer's timers, with the time left as getitimer answers it (0: disarmed).
public struct IntervalTimer: Equatable, Sendable, CustomStringConvertible {
    /// ITIMER_REAL (wall time, SIGALRM), ITIMER_VIRTUAL (user CPU time, SIGVTALRM), ITIMER_PROF (all
    /// CPU time, SIGPROF).
    public enum Kind: Int32, CaseIterable, Sendable {
        case real = 0, virtual = 1, profiling = 2
        /// The signal the kernel sends (process-wide) when it expires.
        public var signal: Int32 { [14, 26, 27][Int(rawValue)] }
    }
    public var kind: Kind
    public var intervalMicroseconds: UInt64
    public var valueMicroseconds: UInt64

    public var isArmed: Bool { valueMicroseconds != 0 }
    public var description: String { "\(kind): \(valueMicroseconds) us left, interval \(intervalMicroseconds) us" }

    /// What setitimer takes (tv_sec of a timeval is a signed 64-bit word; larger values are clamped by
    /// the kernel anyway): about 68 years.
    public static let microsecondsMax: UInt64 = UInt64(Int32.max) * 1_000_000

    public init(kind: Kind, intervalMicroseconds: UInt64, valueMicroseconds: UInt64) {
        (self.kind, self.intervalMicroseconds, self.valueMicroseconds) = (kind, intervalMicroseconds, valueMicroseconds)
    }

    /// The 32 bytes of `struct itimerval` (interval, then value; each tv_sec, tv_usec); nil when they
    /// are not two valid timevals.
    init?(kind: Kind, itimerval raw: [UInt8]) {
        func microseconds(at offset: Int) -> UInt64? {
            let seconds = raw.littleEndianWord(at: offset), micros = raw.littleEndianWord(at: offset + 8)
            guard seconds <= UInt64(Int32.max), micros < 1_000_000 else { return nil }
            return seconds * 1_000_000 + micros
        }
        guard raw.count == 32, let interval = microseconds(at: 0), let value = microseconds(at: 16) else { return nil }
        self.init(kind: kind, intervalMicroseconds: interval, valueMicroseconds: value)
    }

    /// The `struct itimerval` setitimer takes.
    var itimerval: [UInt8] {
        var bytes: [UInt8] = []
        for micros in [intervalMicroseconds, valueMicroseconds] {
            bytes.appendLittleEndian(micros / 1_000_000)
            bytes.appendLittleEndian(micros % 1_000_000)
        }
        return bytes
    }
}

/// Process-wide context (shared by every thread).
public struct ProcessContext: Equatable, Sendable {
    /// The current working directory, restored by path (its file identity is checked at freeze).
    public var workingDirectory: String = "/"
    /// The root directory (chroot), restored by path once everything else that opens by path is open.
    public var rootDirectory: String = "/"
    /// umask(2), /proc/PID/status `Umask`.
    public var fileCreationMask: UInt32 = 0o022
    /// /proc/PID/oom_score_adj, -1000...1000.
    public var oomScoreAdjustment: Int32 = 0
    /// PR_GET_DUMPABLE: 0 or 1 (2, SUID_DUMP_ROOT, cannot be set by prctl and is refused).
    public var dumpable: Int32 = 1
    /// PR_GET_THP_DISABLE's answer: 0, 1 (disabled) or 3 (disabled except where madvised, 6.18).
    public var transparentHugePagesDisabled: UInt32 = 0
    /// membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS)'s answer: the registration commands the process
    /// issued (MEMBARRIER_CMD_REGISTER_*), each given again by the restorer.
    public var membarrierRegistrations: UInt32 = 0
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, in that order.
    public var intervalTimers: [IntervalTimer] = IntervalTimer.Kind.allCases.map {
        IntervalTimer(kind: $0, intervalMicroseconds: 0, valueMicroseconds: 0)
    }
    /// timer_create's timers, by ID (PosixTimers.swift).
    public var posixTimers: [PosixTimer] = []

    public init() {}

    public static let oomScoreAdjustments: ClosedRange<Int32> = -1000...1000
    public static let fileCreationMaskMax: UInt32 = 0o777
    public static let dumpableValues: Set<Int32> = [0, 1]
    public static let transparentHugePageValues: Set<UInt32> = [0, 1, 3]
    /// MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, _PRIVATE_EXPEDITED, _PRIVATE_EXPEDITED_SYNC_CORE and
    /// _PRIVATE_EXPEDITED_RSEQ: what GET_REGISTRATIONS (Linux 6.3) can answer.
    public static let membarrierRegistrationCommands: [UInt32] = [1 << 1, 1 << 4, 1 << 6, 1 << 8]
    public static let membarrierGetRegistrations: UInt64 = 1 << 9
    /// PATH_MAX counts the terminating NUL.
    public static let workingDirectoryByteCountMax = 4095
}

enum ContextReader {
    static let capabilitySystemResource = 24

    /// The working directory as a path that resolves, now, to the very directory the process works in;
    /// refused when it was deleted, lies outside this node's root, or the path names another file.
    static func workingDirectory(_ processID: ProcessID) throws(CheckpointError) -> String {
        try directory(processID, link: .workingDirectory, what: "working directory")
    }

    /// The root directory (chroot) as a path that resolves, now, from this node's root to the very
    /// directory the process has as its root; refused when it was deleted or its path leads elsewhere
    /// (another mount namespace, a pivot_root). Every other path of the process reads the same way
    /// (/proc shows them from the reader's root), so they open before the restored process is chrooted.
    static func rootDirectory(_ processID: ProcessID) throws(CheckpointError) -> String {
        try directory(processID, link: .rootDirectory, what: "root directory")
    }

    /// /proc/PID/`link` as a path of this node that names the very directory it links to.
    private static func directory(_ processID: ProcessID, link entry: ProcEntry, what: String) throws(CheckpointError) -> String {
        let link = ProcFS.path(of: processID, entry)
        let path: String
        do { path = try ProcFS.readLink(link) } catch {
            if !ProcFS.isAlive(processID) { throw .noSuchProcess(processID) }
            throw .unsupportedContext(processID, reason: "its \(what) cannot be read (\(error))")
        }
        if KernelPath(path).isDeleted {
            throw .unsupportedContext(processID, reason: "its \(what) \(KernelPath(path).name) was deleted, so no path leads back to it")
        }
        guard path.hasPrefix("/"), path.utf8.count <= ProcessContext.workingDirectoryByteCountMax, !path.utf8.contains(0) else {
            throw .unsupportedContext(processID, reason: "its \(what) \"\(path.prefix(256))\" is not reachable by a path from this node's root")
        }
        guard let actual = FileIdentity.of(path: link) else { throw .unsupportedContext(processID, reason: "its \(what) cannot be examined") }
        guard let named = FileIdentity.of(path: path), named.isSameFile(as: actual), named.isDirectory else {
            throw .unsupportedContext(processID, reason: "its \(what)'s path \(path) names another file here (another mount namespace, a chroot or pivot_root?)")
        }
        return path
    }

    static func fileCreationMask(status: [String: String], processID: ProcessID) throws(CheckpointError) -> UInt32 {
        guard let text = status["Umask"], let mask = UInt32(text, radix: 8), mask <= ProcessContext.fileCreationMaskMax else {
            throw .system(processID, "/proc/\(processID)/status has no readable Umask line")
        }
        return mask
    }

    static func oomScoreAdjustment(_ processID: ProcessID) throws(CheckpointError) -> Int32 {
        let path = ProcFS.path(of: processID, .oomScoreAdjustment)
        let value: Int32?
        do { value = try ProcFS.oomScoreAdjustment(processID) } catch { throw .readFailed(processID, "reading \(path)", error) }
        guard let value, ProcessContext.oomScoreAdjustments.contains(value) else {
            throw .system(processID, "\(path) holds \(value.map { "\($0)" } ?? "no number"), not a value in -1000...1000")
        }
        return value
    }

    /// Before the freeze: what /proc shows that the restorer could not give back. A lower oom_score_adj
    /// than this node's own needs CAP_SYS_RESOURCE (the kernel's oom_score_adj_min), which these
    /// machines lack; the restored process inherits the restorer's minimum.
    static func checkRestorable(_ processID: ProcessID) throws(CheckpointError) {
        _ = try rootDirectory(processID)
        _ = try workingDirectory(processID)
        _ = try PosixTimerReader.list(processID)
        let wanted = try oomScoreAdjustment(processID)
        let own = try oomScoreAdjustment(.current)
        let ownStatus = (try? ProcFS.status(.current)) ?? [:]
        let effective = UInt64(ownStatus["CapEff"] ?? "0", radix: 16) ?? 0
        if wanted < own && effective & (1 << capabilitySystemResource) == 0 {
            throw .unsupportedContext(processID, reason: "its oom_score_adj is \(wanted), below this node's \(own), and restoring a lower value needs CAP_SYS_RESOURCE")
        }
    }

    /// After the freeze, on what only injected syscalls tell.
    static func checkRestorable(_ state: ProcessState, processID: ProcessID) throws(CheckpointError) {
        guard ProcessContext.dumpableValues.contains(state.context.dumpable) else {
            throw .unsupportedContext(processID, reason: "its dumpable flag is \(state.context.dumpable) (set by a setuid exec), which prctl cannot set again")
        }
        guard ProcessContext.transparentHugePageValues.contains(state.context.transparentHugePagesDisabled) else {
            throw .unsupportedContext(processID, reason: "PR_GET_THP_DISABLE answers \(state.context.transparentHugePagesDisabled), which this fammig does not know")
        }
    }
}
