// The node-wide tables of /proc read as typed values, so that the engine consumes IDs, never text.
extension ProcFS {
    /// The IDs of the SysV shared memory segments of this IPC namespace (/proc/sysvipc/shm: a header
    /// line, then one segment a line, its key then its ID first), as a set.
    public static func sysvSharedMemoryIdentifiers() throws -> Set<Int32> {
        let text = try readText("/proc/sysvipc/shm")
        return Set(text.split(separator: "\n").dropFirst().compactMap { line in
            line.split(separator: " ").dropFirst().first.flatMap { Int32($0) }
        })
    }
}
