// Why this file exists: the engine, torture and the oracles read a process's /proc entries by name.
// Spelling each path by hand ("/proc/\(pid)/map_files/\(hex)-\(hex)") in twenty places lets one of them
// drift (a decimal range, a missing "task/"), so the entries are named here once, typed, and the rest ask
// `ProcFS.path(of:_:)`.

/// One entry of /proc/PID that fammig reads or writes.
public enum ProcEntry: Equatable, Sendable {
    case status
    case stat
    case auxiliaryVector
    case executable
    case commandLine
    case timers
    case oomScoreAdjustment
    case workingDirectory
    case rootDirectory
    /// fd/N: the link to what descriptor N holds.
    case descriptor(Int32)
    /// fdinfo/N: the kernel's text about descriptor N (position, flags, kind-specific lines).
    case descriptorInfo(Int32)
    /// map_files/START-END: the file behind the mapping at [start, end), its bounds in hex as maps shows them.
    case mappedFile(start: UInt64, end: UInt64)
    /// task/TID/schedstat: a thread's run time, wait time and time slices.
    case threadSchedulerStatistics(ProcessID)

    /// The entry's path below /proc/PID.
    public var relativePath: String {
        switch self {
        case .status: "status"
        case .stat: "stat"
        case .auxiliaryVector: "auxv"
        case .executable: "exe"
        case .commandLine: "cmdline"
        case .timers: "timers"
        case .oomScoreAdjustment: "oom_score_adj"
        case .workingDirectory: "cwd"
        case .rootDirectory: "root"
        case .descriptor(let number): "fd/\(number)"
        case .descriptorInfo(let number): "fdinfo/\(number)"
        case .mappedFile(let start, let end): "map_files/\(String(start, radix: 16))-\(String(end, radix: 16))"
        case .threadSchedulerStatistics(let thread): "task/\(thread.rawValue)/schedstat"
        }
    }
}

extension ProcFS {
    /// The absolute path of `entry` of the process (or thread group) `processID`.
    public static func path(of processID: ProcessID, _ entry: ProcEntry) -> String {
        "/proc/\(processID.rawValue)/\(entry.relativePath)"
    }
}
