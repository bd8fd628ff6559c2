// Why this file exists: a PID names a process only until it is reaped. With this machine's pid_max of
// 32768 the counter wraps every few minutes of a test run, and a `kill(pid)` aimed at a process that
// ended (reaped by init, or by someone else) can hit whatever took its number since. A pidfd names one
// process for as long as it is held, so a signal sent through it reaches that process or nobody.
internal import CSys
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Invariant: `descriptor` is a pidfd of the process `processID` named when it was opened, or nil once closed.
public final class ProcessHandle: Sendable {
    public let processID: ProcessID
    private let descriptor: Mutex<Int32?>

    /// A handle on `processID`, which must still exist (a zombie counts).
    public init(_ processID: ProcessID) throws(SyscallError) {
        let pidfd = try checked("pidfd_open(\(processID))") { csys_pidfd_open(processID.rawValue) }
        self.processID = processID
        descriptor = Mutex(pidfd)
    }

    /// pidfd_getfd(`remoteDescriptor`): a copy, in this process, of that process's descriptor (the very
    /// open file description it holds). The caller owns the copy.
    func copyOfDescriptor(_ remoteDescriptor: Int32) throws(SyscallError) -> Int32 {
        try withDescriptor { pidfd throws(SyscallError) in
            try checked("pidfd_getfd(\(processID), \(remoteDescriptor))") { csys_pidfd_getfd(pidfd, remoteDescriptor) }
        }
    }

    /// Runs `body` with the pidfd, which stays open meanwhile and must not be closed by it.
    func withDescriptor<Result>(_ body: (Int32) throws(SyscallError) -> Result) throws(SyscallError) -> Result {
        try descriptor.withLock { descriptor throws(SyscallError) -> Result in
            guard let descriptor else { preconditionFailure("pidfd of \(processID) used after it was closed") }
            return try body(descriptor)
        }
    }

    /// Sends `signal` to that process if it has not ended; never to a process that reuses its PID.
    public func kill(signal: Int32 = SIGKILL) {
        descriptor.withLock { descriptor in
            guard let descriptor else { return }
            _ = csys_pidfd_send_signal(descriptor, signal)
        }
    }

    deinit {
        descriptor.withLock { descriptor in
            if let open = descriptor { _ = Glibc.close(open) }
            descriptor = nil
        }
    }
}
