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

    // MARK: The lease

    private struct Lease {
        var duration: Duration
        var lastRenewal: Duration
        var lapsed = false
        var stopWriteDescriptor: Int32
        var stopReadDescriptor: Int32
        var thread: OSThread?
    }
    private let lease = Mutex<Lease?>(nil)

    /// From now on the restored process lives only while this process runs: a thread renews the lease
    /// every quarter of `duration`; a watchdog that hears no renewal within `duration` (this node was
    /// stopped, or starved) kills the restored process. A renewal that comes later than `duration` after
    /// the one before is not sent: the lease has lapsed (`leaseLapsed`), and the watchdog acts.
    public func startLease(_ duration: Duration) throws(SyscallError) {
        precondition(duration >= .milliseconds(200), "a lease of \(duration) is shorter than its renewals can keep")
        var ends: [Int32] = [-1, -1]
        try checked("pipe(lease)") { pipe(&ends) }
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        let milliseconds = UInt32(clamping: duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
        let sent = disarmDescriptor.withLock { descriptor -> Bool in
            guard let descriptor else { return false }
            return csys_hole_watchdog_lease(descriptor, milliseconds) == 5
        }
        guard sent else {
            close(ends[0]); close(ends[1])
            return  // disarmed or gone already: nothing to lease
        }
        let stopReadDescriptor = ends[0]
        let interval = Int32(max(50, milliseconds / 4))
        // Started under the lock, so that stopLease always finds the thread to join (its first renewal
        // waits for the lock). Weakly: a watchdog dropped without a word (deinit) stops its renewals
        // there. The read end stays open until stopLease has written its word and joined (a pipe
        // without a reader would answer that write with SIGPIPE).
        try lease.withLock { lease throws(SyscallError) in
            let thread = try OSThread(name: "fammig-lease", stackByteCount: 256 << 10) { [weak self] in
                // Renewals until stopLease writes its word, the watchdog is gone, or the lease lapsed: it ends then.
                while true {
                    var waiting = pollfd(fd: stopReadDescriptor, events: Int16(POLLIN), revents: 0)
                    let ready = poll(&waiting, 1, interval)
                    if ready > 0 { return }  // stopped
                    if ready < 0 && errno == EINTR { continue }
                    guard let self, self.renew() else { return }
                }
            }
            lease = Lease(duration: duration, lastRenewal: MonotonicTime.now(), stopWriteDescriptor: ends[1], stopReadDescriptor: ends[0], thread: thread)
        }
    }

    /// One renewal, unless the last came more than the lease ago (then: lapsed, and no more).
    private func renew() -> Bool {
        let now = MonotonicTime.now()
        let renewing = lease.withLock { lease -> Bool in
            guard var current = lease, !current.lapsed else { return false }
            if now - current.lastRenewal > current.duration {
                current.lapsed = true
                lease = current
                return false
            }
            current.lastRenewal = now
            lease = current
            return true
        }
        guard renewing else { return false }
        disarmDescriptor.withLock { descriptor in if let descriptor { _ = csys_hole_watchdog_renew(descriptor) } }
        return true
    }

    /// Whether the lease ran out: this node did not run for longer than it (its watchdog then kills
    /// the restored process, if it has not yet). Seen at once on waking, before any renewal.
    public var leaseLapsed: Bool {
        let now = MonotonicTime.now()
        return lease.withLock { lease in
            guard let lease else { return false }
            return lease.lapsed || now - lease.lastRenewal > lease.duration
        }
    }

    private func stopLease() {
        guard let (thread, stop, stopRead) = lease.withLock({ lease -> (OSThread?, Int32, Int32)? in
            guard let current = lease, current.stopWriteDescriptor >= 0 else { return nil }
            lease?.stopWriteDescriptor = -1
            return (current.thread, current.stopWriteDescriptor, current.stopReadDescriptor)
        }) else { return }
        var word: UInt8 = 1
        _ = write(stop, &word, 1)
        thread?.join()
        close(stop)
        close(stopRead)
    }

    private func release(disarming: Bool) {
        stopLease()
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
