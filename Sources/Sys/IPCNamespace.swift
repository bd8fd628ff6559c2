// Why this file exists: SysV IPC objects, and the /proc files that show and steer them
// (/proc/sysvipc/shm, /proc/sys/kernel/shm_next_id), belong to an IPC namespace, and such a file shows
// the namespace of the thread that opens it. A victim in an IPC namespace of its own, or a restored
// process in a fresh one, is read and prepared through files opened from inside its namespace: the
// calling thread enters it with setns(2), does the file's work, and returns home.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum IPCNamespace {
    /// /proc/sysvipc/shm as `processID`'s IPC namespace lists it.
    public static func readText(_ path: String, asSeenBy processID: ProcessID) throws -> String {
        try within(processID) { try ProcFS.readText(path) }
    }

    /// Writes `text` to `path` (an IPC sysctl such as kernel.shm_next_id) of `processID`'s IPC namespace.
    public static func writeText(_ path: String, _ text: String, asSeenBy processID: ProcessID) throws {
        try within(processID) { try ProcFS.writeText(path, text) }
    }

    /// Runs `body` on the calling thread inside `processID`'s IPC namespace (directly when it is the
    /// thread's own), then returns the thread to its own namespace.
    private static func within<Result>(_ processID: ProcessID, _ body: () throws -> Result) throws -> Result {
        let theirs = "/proc/\(processID)/ns/ipc", home = "/proc/thread-self/ns/ipc"
        if try ProcFS.readLink(theirs) == ProcFS.readLink(home) { return try body() }
        let homeDescriptor = try checked("open(\(home))") { open(home, O_RDONLY | O_CLOEXEC) }
        defer { close(homeDescriptor) }
        let targetDescriptor = try checked("open(\(theirs))") { open(theirs, O_RDONLY | O_CLOEXEC) }
        defer { close(targetDescriptor) }
        _ = try checked("setns(\(theirs))") { setIPCNamespace(targetDescriptor) }
        defer {
            // Home again, or this thread would go on in another process's namespace.
            let back = setIPCNamespace(homeDescriptor)
            precondition(back == 0, "setns back to this thread's own IPC namespace failed: errno \(errno)")
        }
        return try body()
    }

    /// setns(descriptor, CLONE_NEWIPC) (x86-64 syscall 308), which Swift's Glibc does not import.
    private static func setIPCNamespace(_ descriptor: Int32) -> Int {
        csys_syscall6(308, Int(descriptor), 0x0800_0000, 0, 0, 0, 0)
    }
}
