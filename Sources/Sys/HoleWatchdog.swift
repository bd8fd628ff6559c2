// Why this file exists: a restored process that still lacks pages depends on whoever serves its faults.
// If that process dies, the kernel releases the userfaultfd and every page not yet installed reads as
// zeros: the process would run on holes. A watchdog (a small child process, see CSys.h) holds the
// restored process's pidfd and a copy of the userfaultfd, and kills the restored process the moment its
// owner goes away without saying "every page is in". Holding the userfaultfd is what closes the race:
// while the watchdog lives, a fault stays blocked instead of being filled with zeros.
internal import CSys
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Invariant: while armed, `disarmDescriptor` is the only write end of the watchdog's socket pair and
/// `watchdogProcessID` is an unreaped child of this process; `disarm()` or `deinit` reaps it.
public final class HoleWatchdog: Sendable {
    public let guardedProcessID: ProcessID
    public let watchdogProcessID: ProcessID
    private let disarmDescriptor: Mutex<Int32?>

    /// Starts a watchdog over `processID`, whose missing pages `userfaultfd` serves.
    public convenience init(guarding processID: ProcessID, userfaultfd: Userfaultfd) throws(SyscallError) {
        try self.init(guarding: try ProcessHandle(processID), userfaultfd: userfaultfd)
    }

    /// Starts a watchdog over `process`, whose missing pages `userfaultfd` serves. The watchdog gets its
    /// own copy of the pidfd (it is forked with it); `process` may be closed afterwards.
    public init(guarding process: ProcessHandle, userfaultfd: Userfaultfd) throws(SyscallError) {
        var descriptor: Int32 = -1
        let child = try process.withDescriptor { pidfd throws(SyscallError) in
            try checked("fork(hole watchdog)") { csys_spawn_hole_watchdog(pidfd, userfaultfd.descriptor, &descriptor) }
        }
        guardedProcessID = process.processID
        watchdogProcessID = ProcessID(child)
        disarmDescriptor = Mutex(descriptor)
    }

    /// Every page is installed: the restored process no longer depends on us, so the watchdog leaves it
    /// alone and exits. Reaps the watchdog. Calling it twice does nothing more.
    public func disarm() { release(disarming: true) }

    /// Ends the watchdog's watch without disarming it: the restored process is killed if it still runs.
    public func abandon() { release(disarming: false) }

    deinit { release(disarming: false) }

    private func release(disarming: Bool) {
        guard let descriptor = disarmDescriptor.withLock({ value -> Int32? in
            defer { value = nil }
            return value
        }) else { return }
        if disarming { _ = csys_hole_watchdog_disarm(descriptor) }
        _ = Glibc.close(descriptor)
        var status: Int32 = 0
        while waitpid(watchdogProcessID.rawValue, &status, 0) < 0 && errno == EINTR {}
    }
}
