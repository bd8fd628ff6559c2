// Why this file exists: a restored process's userfaultfd can have copies its fault handler does not
// know of (a debugger's pidfd_getfd, a child that inherited it), and while one is open, the fault
// handler's close releases nothing: a mapping still registered then sends its faults, and a memory event
// queued before the release its thread, to a reader that no longer exists, and the process blocks for
// good (a fresh-clone CI run saw heapchurn so, in userfaultfd_event_wait_completion). Torture holds such
// a copy through every post-copy run, so a release that leans on the last close hangs the target (the
// run limit's liveness failure); and once the fault handler let the running process go, nothing of the
// tree may still be registered.
import Engine
import Sys

final class ReleaseWatch {
    /// The copies, held from the step after the restorer laid out lazy memory to the iteration's end.
    private var copies: [Userfaultfd] = []
    private var tookCopies = false
    private var checkedRelease = false
    /// What was still registered after the release, said once.
    private(set) var failure: String?

    /// Looked at before every step: takes the copies, and checks the registrations once released.
    /// Neither draws from the seed nor changes the schedule.
    func observe(_ memory: LazyMemory?) {
        guard let memory else { return }
        if !tookCopies && !memory.isReleased {
            tookCopies = true
            copies = (try? memory.userfaultfd.copies()) ?? []
        }
        guard tookCopies, !checkedRelease, memory.isReleased, memory.releasedWhileRunning else { return }
        checkedRelease = true
        var registered: [String] = []
        for processID in memory.processIDsByOrdinal.compactMap({ $0 }) where !Spawn.hasEnded(processID) {
            guard let flags = try? ProcFS.smapsFlags(processID) else { continue }  // ended meanwhile
            for (start, flag) in flags.sorted(by: { $0.key < $1.key }) where flag.contains("um") || flag.contains("uw") {
                registered.append("pid \(processID.rawValue) \(hex(start))")
            }
        }
        if !registered.isEmpty {
            failure = "release: the fault handler let the process go with \(registered.count) mapping(s) still registered "
                + "(\(registered.prefix(4).joined(separator: ", "))): with a copy of the userfaultfd held elsewhere, their faults wait for good"
        }
    }

    func close() {
        for copy in copies { copy.close() }
        copies = []
    }
}
