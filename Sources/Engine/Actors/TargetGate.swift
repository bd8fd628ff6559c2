// Why this file exists: the one decision the engine leaves to its driver about the restored process,
// namely when it runs (DESIGN.md §4). The engine installs pages without waking anyone (UFFDIO_COPY with
// DONTWAKE) and then asks the gate to resume the process or wake its faulting threads. The threaded
// driver's gate does so at once; torture's deterministic driver holds each request until the target's
// own scheduled step, so the target runs only when its scheduler says so and the same seed replays the
// same interleaving.
import Sys

/// Decides when the restored process runs. Requests come from the actor threads that own the target's
/// ptrace (the restorer) and userfaultfd (fault handler, pusher); a deferring gate runs them later on the
/// driver's one thread, which is then the same thread.
public protocol TargetGate: AnyObject, Sendable {
    /// The restorer has built the process and the oracles have looked at it: `start` detaches it.
    func resume(processID: ProcessID, _ start: @escaping () throws(RestoreError) -> Void) throws(RestoreError)
    /// Pages were installed in `address..<address+byteCount`: `wake` wakes the threads faulting there.
    func wake(processID: ProcessID, address: UInt64, byteCount: Int, _ wake: @escaping () throws(SyscallError) -> Void) throws(SyscallError)
    /// Every page is in and the userfaultfd released: the kernel itself lets any waiting thread go, and
    /// the process runs on its own from here.
    func released(processID: ProcessID)
    /// A memory event (mremap, munmap, MADV_DONTNEED of registered memory) was read and applied: the
    /// thread that caused it, held by the kernel until then, runs on from here.
    func memoryEventRead(processID: ProcessID)
}

/// The production gate: the process runs as soon as the engine lets it.
public final class ImmediateTargetGate: TargetGate {
    public init() {}

    public func resume(processID: ProcessID, _ start: @escaping () throws(RestoreError) -> Void) throws(RestoreError) {
        try start()
    }

    public func wake(processID: ProcessID, address: UInt64, byteCount: Int, _ wake: @escaping () throws(SyscallError) -> Void) throws(SyscallError) {
        try wake()
    }

    public func released(processID: ProcessID) {}

    public func memoryEventRead(processID: ProcessID) {}
}
