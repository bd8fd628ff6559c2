// Errors of the target node: each says what is wrong and what to do about it.
import Sys

public enum RestoreError: Error, CustomStringConvertible, Sendable {
    case processIDInUse(ProcessID)
    case stubFailed(String)
    case layout(String)
    case injected(InjectionError)
    case system(String)
    case targetDied(String)
    case oracle(String)

    public var description: String {
        switch self {
        case .processIDInUse(let pid) where pid.rawValue == 1:
            "pid 1 is the init of this node's PID namespace; a process that was pid 1 of its own namespace (started by `fammig launch`) is restored with --pid-namespace fresh."
        case .processIDInUse(let pid):
            "pid \(pid) (or a SysV shared memory ID it held) is still in use on this node; the restored process needs its old PID and IDs. Kill that process (or wait for its parent to reap it; ipcs -m lists the IDs) and restore again."
        case .stubFailed(let message): "could not start the restore stub: \(message)"
        case .layout(let message): "could not rebuild the memory layout: \(message)"
        case .injected(let error): "restore failed: \(error)"
        case .system(let message): "restore failed: \(message)"
        case .targetDied(let message): "the restored process died before it could run: \(message)"
        case .oracle(let message): "oracle rejected the restored process before it ran: \(message)"
        }
    }
}

extension RestoreError {
    /// Classifies whatever a restore step threw.
    init(_ error: any Error) {
        switch error {
        case let error as RestoreError: self = error
        case let error as InjectionError: self = .injected(error)
        default: self = .system("\(error)")
        }
    }
}
