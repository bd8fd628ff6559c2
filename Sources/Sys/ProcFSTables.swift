// The tables and one-value files of /proc read as typed values, so that the engine consumes numbers and
// names, never /proc text (issue 14): the SysV shared memory table, and a process's personality, command
// name and OOM score adjustment.

/// One line of /proc/sysvipc/shm: `key shmid perms size cpid lpid nattch uid gid cuid cgid ...`.
public struct SysVSharedMemoryEntry: Equatable, Sendable {
    public var key: Int64
    public var identifier: Int32
    /// The mode word as the kernel prints it (octal): permission bits, SHM_DEST (0o1000), SHM_LOCKED (0o2000).
    public var permissions: UInt32
    public var byteCount: UInt64
    /// How many VMAs attach it, in every process.
    public var attachCount: Int
    public var userID: UInt32
    public var groupID: UInt32
}

extension ProcFS {
    /// The SysV shared memory table's text parsed: its header line skipped, a line it cannot read left out.
    public static func parseSysVSharedMemory(_ text: String) -> [SysVSharedMemoryEntry] {
        text.split(separator: "\n").dropFirst().compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 11, let key = Int64(fields[0]), let identifier = Int32(fields[1]),
                  let permissions = UInt32(fields[2], radix: 8), let byteCount = UInt64(fields[3]), let attachCount = Int(fields[6]),
                  let userID = UInt32(fields[7]), let groupID = UInt32(fields[8]) else { return nil }
            return SysVSharedMemoryEntry(key: key, identifier: identifier, permissions: permissions, byteCount: byteCount,
                                         attachCount: attachCount, userID: userID, groupID: groupID)
        }
    }

    /// The IDs of the SysV shared memory segments of this thread's IPC namespace.
    public static func sysvSharedMemoryIdentifiers() throws -> Set<Int32> {
        Set(parseSysVSharedMemory(try readText("/proc/sysvipc/shm")).map(\.identifier))
    }

    /// The persona word of /proc/PID/personality (hex); nil when the file holds no hex number.
    public static func personality(_ processID: ProcessID) throws -> UInt32? {
        UInt32(try readText("/proc/\(processID)/personality").filter { $0.isHexDigit }, radix: 16)
    }

    /// The command name (comm) of a process, or of one of its threads, without its newline.
    public static func commandName(_ processID: ProcessID, thread threadID: ProcessID? = nil) throws -> String {
        let path = threadID.map { "/proc/\(processID)/task/\($0)/comm" } ?? "/proc/\(processID)/comm"
        return String(try readText(path).prefix { $0 != "\n" })
    }

    /// /proc/PID/oom_score_adj as a number; nil when it holds something else (the kernel bounds it to
    /// -1000...1000: the caller checks).
    public static func oomScoreAdjustment(_ processID: ProcessID) throws -> Int32? {
        Int32(try readText(path(of: processID, .oomScoreAdjustment)).filter { !$0.isWhitespace })
    }
}

extension IPCNamespace {
    /// The SysV shared memory table of `processID`'s IPC namespace.
    public static func sysvSharedMemory(asSeenBy processID: ProcessID) throws -> [SysVSharedMemoryEntry] {
        ProcFS.parseSysVSharedMemory(try readText("/proc/sysvipc/shm", asSeenBy: processID))
    }
}
