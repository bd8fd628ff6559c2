// Why this file exists: a ptrace round trip (resume the tracee, wait for its stop) between two CPUs costs
// an inter-processor wake-up each way, and on a loaded VM each of them may wait behind other work: the
// freeze, capture and restore steps inject some hundred syscalls each (KERNEL_FACTS: a 129-syscall restore
// took 8-45 ms across CPUs, 2.5-3.2 ms on one). So an actor thread runs those steps on the CPU its tracee
// last ran on, and gets its own CPU mask back afterwards. Only the calling thread's mask changes: the
// tracee's is never touched (a restored process keeps the mask it was created with).
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// The calling thread's CPU mask before a pin; `release()` sets it again. Not Sendable: the mask is the
/// calling thread's, and so is the release.
public struct TracerPin {
    private var saved: [UInt64]?
    /// The thread that pinned itself: only it may set its mask back.
    private var pinnedThread: Int32 = 0

    /// Nothing pinned yet.
    public init() {}

    /// Pins the calling thread to the CPU `tracee` last ran on (/proc/PID/stat field 39), saving the
    /// thread's mask first; does nothing when already pinned, or when either cannot be read (the steps
    /// only run slower then).
    public mutating func pin(near tracee: ProcessID) {
        guard saved == nil, let fields = try? ProcFS.statFields(tracee), let cpu = fields[39].flatMap({ Int32($0) }), cpu >= 0 else { return }
        var mask = [UInt64](repeating: 0, count: 16)
        guard csys_get_affinity(&mask) == 0 else { return }
        // Only onto a CPU this thread may use anyway (a driver or a test may have narrowed its mask).
        guard cpu < 1024, mask[Int(cpu) / 64] & (1 << UInt64(cpu % 64)) != 0 else { return }
        guard csys_pin_to_cpu(0, cpu) == 0 else { return }
        saved = mask
        pinnedThread = csys_gettid()
    }

    /// Gives the calling thread back the mask it had before `pin` (nothing when another thread calls it:
    /// an abort from elsewhere leaves the pinned thread as it is, and it ends soon after).
    public mutating func release() {
        guard let mask = saved, pinnedThread == csys_gettid() else { return }
        _ = csys_set_affinity(mask)
        saved = nil
    }

    public var isPinned: Bool { saved != nil }
}
