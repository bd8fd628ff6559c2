// Errors of the source node: each says what is wrong and what to do about it.
import Sys

public enum CheckpointError: Error, CustomStringConvertible, Sendable {
    case noSuchProcess(ProcessID)
    case cannotCheckpointSelf(ProcessID)
    case alreadyTraced(ProcessID, tracer: String)
    case multipleThreads(ProcessID, count: Int)
    case unsupportedDescriptor(ProcessID, descriptor: Int32, target: String)
    case unsupportedMapping(ProcessID, range: String, reason: String)
    /// Children (zombies included) would be orphaned by the checkpoint and cannot be restored with it.
    case hasChildren(ProcessID, children: [ProcessID])
    /// A process tree holding something its restore could not rebuild (TreePreflight).
    case unsupportedTree(ProcessID, reason: String)
    /// A part of the process context (cwd, oom_score_adj, dumpable, ...) that cannot be restored.
    case unsupportedContext(ProcessID, reason: String)
    case victimDied(ProcessID, reason: String)
    case system(ProcessID, String)

    public var description: String {
        switch self {
        case .noSuchProcess(let pid):
            "pid \(pid): no such process; pass the PID of a running process."
        case .cannotCheckpointSelf(let pid):
            "pid \(pid) is fammig itself or its parent; pass the PID of another process."
        case .alreadyTraced(let pid, let tracer):
            "pid \(pid) is already traced by pid \(tracer) (a debugger?); detach it first."
        case .multipleThreads(let pid, let count):
            "pid \(pid) has \(count) threads; at most \(ProcessState.maximumThreadCount) can be migrated. It was left running untouched."
        case .unsupportedDescriptor(let pid, let descriptor, let target):
            "pid \(pid): fd \(descriptor) is \(target), which cannot be migrated. Close or redirect it (e.g. stdout to a file). The process was left running untouched."
        case .unsupportedMapping(let pid, let range, let reason):
            "pid \(pid): mapping \(range) cannot be migrated (\(reason)). The process was left running untouched."
        case .hasChildren(let pid, let children):
            "pid \(pid) has \(children.count) child process\(children.count == 1 ? "" : "es") (\(children.prefix(8).map { "\($0)" }.joined(separator: ", "))\(children.count > 8 ? ", ..." : "")); this mode does not migrate process trees, and migrating the parent alone would orphan them. The process was left running untouched."
        case .unsupportedTree(let pid, let reason):
            "pid \(pid)'s process tree cannot be migrated: \(reason). Every process of it was left running untouched."
        case .unsupportedContext(let pid, let reason):
            "pid \(pid) cannot be migrated: \(reason). The process was left running untouched."
        case .victimDied(let pid, let reason):
            "pid \(pid) ended during the checkpoint (\(reason)); nothing was migrated."
        case .system(let pid, let message):
            "checkpoint of pid \(pid) failed: \(message)"
        }
    }
}

extension CheckpointError {
    /// What a failed read of `processID`'s /proc files means: the process is gone, or (while it still
    /// lives) the read itself failed, named with `what` and the error, never taken for a vanished process.
    static func readFailed(_ processID: ProcessID, _ what: String, _ error: any Error) -> CheckpointError {
        ProcFS.isAlive(processID) ? .system(processID, "\(what): \(error)") : .noSuchProcess(processID)
    }
}
