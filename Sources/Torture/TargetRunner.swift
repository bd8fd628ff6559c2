// Why this file exists: the restored process as one more scheduled actor (DESIGN.md §4). It is the
// engine's TargetGate under torture: the restorer's resume and every wake after an install are held
// here, and only this participant's step carries them out and then lets the real process run until it
// blocks on its next fault or exits. Between its steps the target never runs, so the same seed gives the
// same faults.
import Engine
import Sys

final class TargetRunner: Participant, TargetGate, @unchecked Sendable {
    let actor = ActorName.target
    let isEssential = true
    /// How the test program is released from its rendezvous once the process runs (nil: a workload,
    /// which has none): SIGUSR2 at once, or the release signal once it sleeps in its rendezvous call.
    private let release: RendezvousWait?
    /// Real time a run may take before the target counts as hung.
    private let runLimit: Duration
    private var processID: ProcessID?
    private var pendingResume: (() throws(RestoreError) -> Void)?
    private var pendingWakes: [(address: UInt64, byteCount: Int, wake: () throws(SyscallError) -> Void)] = []
    /// The process ended (it is a zombie until the iteration reaps it).
    private(set) var ended = false
    private var resumed = false
    private var aborted = false

    /// A release that waits until the program is seen blocked in its rendezvous call (RendezvousWait).
    private var releaseDue = false

    init(release: RendezvousWait?, runLimit: Duration) {
        self.release = release
        self.runLimit = runLimit
    }

    /// The restored process, once the restorer asked to resume it.
    var restoredProcessID: ProcessID? { processID }

    // MARK: TargetGate

    func resume(processID: ProcessID, _ start: @escaping () throws(RestoreError) -> Void) throws(RestoreError) {
        self.processID = processID
        pendingResume = start
    }

    func wake(processID: ProcessID, address: UInt64, byteCount: Int, _ wake: @escaping () throws(SyscallError) -> Void) throws(SyscallError) {
        self.processID = processID
        // Before the resume the process is stopped and no thread can wait on a page: nothing to defer.
        guard resumed else { return try wake() }
        pendingWakes.append((address, byteCount, wake))
    }

    func released(processID: ProcessID) {
        self.processID = processID
        isReleased = true
        // Releasing the userfaultfd woke every waiting thread; a held wake has nothing left to do.
        pendingWakes.removeAll()
    }

    /// The restored process was let go (it is no longer traced) and ran.
    var hasResumed: Bool { resumed }

    /// The target node died: the wakes its fault handler had asked for died with it.
    func nodeDied() { pendingWakes.removeAll() }

    /// Releasing the userfaultfd let the process go: it runs on its own until it ends, and the next target step
    /// waits for that.
    private var isReleased = false

    /// Reading a memory event let the thread that caused it go: it runs, now, within the step that
    /// read the event, until the target is quiet again (its next fault, or its end). Left running, it
    /// would race the steps that follow, and a replay would not see the same faults.
    func memoryEventRead(processID: ProcessID) {
        guard resumed, !ended, !isReleased, !aborted, hangDuringEvent == nil else { return }
        do { _ = try runUntilQuiet(processID) } catch { hangDuringEvent = error }
    }

    /// The target hung after an event released it; its next step reports it.
    private var hangDuringEvent: (any Error)?

    // MARK: Participant

    func availability() -> Availability {
        if ended || aborted { return .finished }
        if hangDuringEvent != nil { return .choices(["report the hang"]) }
        if pendingResume != nil { return .choices(["resume and run"]) }
        if !pendingWakes.isEmpty { return .choices(["wake \(pendingWakes.count) and run"]) }
        if resumed && isReleased { return .choices(["run on"]) }
        return .waiting(nil, resumed ? "blocked on a fault" : "not restored yet")
    }

    /// Something outside the gate may have let the process run: unregistering a range wakes the threads
    /// faulting in it, and the kernel then serves their faults itself.
    func availabilityWhenStuck() -> Availability {
        let usual = availability()
        guard case .waiting = usual, resumed, let processID else { return usual }
        return Self.isQuiet(processID) ? usual : .choices(["run on"])
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        guard let processID else { preconditionFailure("target step without a process") }
        if let hangDuringEvent { throw hangDuringEvent }
        if let start = pendingResume {
            pendingResume = nil
            try serialiseThreads(processID)
            try start()
            resumed = true
            if let release {
                if release.releasedWhenBlocked { releaseDue = true } else { Spawn.kill(processID, signal: release.releaseSignal) }
            }
        }
        let wakes = pendingWakes
        pendingWakes.removeAll()
        for wake in wakes { try wake.wake() }
        return try runUntilQuiet(processID)
    }

    /// Several threads running at once within one target step would fault, take locks and wake each
    /// other in an order that timing decides. On one CPU under SCHED_FIFO they run one at a time, each
    /// until it blocks, in an order that follows from what they do (threads they create inherit both).
    /// The restored state was judged before this; the program's output does not depend on it.
    /// A tree's processes too: every thread of every process on the one CPU.
    private func serialiseThreads(_ processID: ProcessID) throws {
        let cpu = Int32(Spawn.onlineCPUCount - 1)
        for process in Self.treeProcessIDs(processID) {
            for thread in try ProcFS.threadIDs(process) {
                Spawn.pin(threadID: thread, cpu: cpu)
                try Spawn.runFirstInFirstOut(threadID: thread)
            }
        }
    }

    /// The restored process and its descendants (a tree restored post-copy runs as one target), breadth
    /// first, bounded as trees are.
    static func treeProcessIDs(_ root: ProcessID) -> [ProcessID] {
        var processes = [root]
        var next = 0
        while next < processes.count && processes.count <= TreeLimits.processCountMax {
            processes += (try? ProcFS.childProcessIDs(processes[next])) ?? []
            next += 1
        }
        return processes
    }

    /// Waits until every thread of the target is blocked on a userfaultfd fault, or the process ended.
    private func runUntilQuiet(_ processID: ProcessID) throws -> String {
        let clock = ContinuousClock()
        let start = clock.now
        var spins = 0
        // Ends at the process's end, its quiet state, or after `runLimit` (a hang is an error).
        while true {
            if Spawn.hasEnded(processID) {
                ended = true
                return "ended"
            }
            // The program sleeps in its rendezvous call again: let it go, as the unmigrated one was.
            if releaseDue, let release, release.isBlocked(processID, thread: processID) {
                releaseDue = false
                Spawn.kill(processID, signal: release.releaseSignal)
            }
            // Once released, nothing can hold the process any more: only its end ends the step (a
            // sample of its state on the way would depend on timing). But a released process asleep in
            // the userfault code (and only there or on its own futexes) can never move again: its
            // faults or memory events wait for a reader that is gone (torture holds a copy of the
            // userfaultfd, so no release completes them: ReleaseWatch). That is a hang, judged at once.
            if isReleased && Self.isQuiet(processID) {
                throw TortureError.targetHung("the process was let go, yet it waits in the userfault code: "
                                              + "its faults or memory events have no reader any more (\(Self.userfaultWaits(processID)))")
            }
            if !isReleased && Self.isQuiet(processID) {
                // It may have gone to sleep in its rendezvous call since the look above, while another
                // thread (or process of a tree) faulted: it is let go first, as the unmigrated one was,
                // whatever the timing (seed 0x5623aa95c000173 of the tree parted so at step 114).
                if releaseDue, let release, release.isBlocked(processID, thread: processID) { continue }
                return "blocked on a fault"
            }
            spins += 1
            if spins > 50 { OSThread.sleep(for: .microseconds(50)) } else { OSThread.yield() }
            if clock.now - start > runLimit {
                throw TortureError.targetHung("the target ran \(runLimit) without a fault or an exit")
            }
        }
    }

    /// Nothing in the target can move by itself: every thread sleeps in the kernel's userfault handler
    /// or on a futex (a thread waiting for another: a mutex, a condition variable, a join), or has
    /// exited, and at least one waits for a page. A thread that runs, or sleeps on a timer, is not quiet.
    ///
    /// A tree: every thread of every process of it, and a parent waiting for a child (wait4, waitid)
    /// waits for another of the tree too; a child that ends wakes it, and none runs while all are quiet.
    ///
    /// The threads are read one after another, not at one instant: a thread seen asleep may be woken by
    /// one read later, which then blocks before it is read (seen with trees: a worker answered, woke the
    /// parent and faulted; the parent, read asleep before, ran on behind the verdict and faulted at a
    /// time the schedule did not choose). So each thread's count of times it was put on a CPU
    /// (schedstat) is read before its state and again after every thread's: unchanged, it slept from
    /// its reading to the end of the pass, and all of them slept at once.
    static func isQuiet(_ processID: ProcessID) -> Bool {
        var faulting = false
        var runCounts: [(process: ProcessID, thread: ProcessID, count: Substring?)] = []
        for process in treeProcessIDs(processID) {
            guard let threads = try? ProcFS.threadIDs(process), !threads.isEmpty else {
                if process == processID { return false }
                continue  // a member that ended and was reaped meanwhile
            }
            for thread in threads {
                let count = runCount(process, thread: thread)
                switch ProcFS.threadWait(process, thread: thread) {
                case .ended: continue
                case .futex: break
                case .userfault: faulting = true
                case .other(let wchan) where wchan.hasPrefix("do_wait"): break
                case .running, .other: return false
                }
                runCounts.append((process, thread, count))
            }
        }
        guard faulting else { return false }
        return runCounts.allSatisfy { runCount($0.process, thread: $0.thread) == $0.count }
    }

    /// Which threads of the tree wait in the userfault code, for the hang's message.
    static func userfaultWaits(_ processID: ProcessID) -> String {
        treeProcessIDs(processID).flatMap { process in
            ((try? ProcFS.threadIDs(process)) ?? []).filter { ProcFS.threadWait(process, thread: $0) == .userfault }
                .map { "pid \(process.rawValue) thread \($0.rawValue)" }
        }.joined(separator: ", ")
    }

    /// How many times the thread was put on a CPU (the third field of schedstat); nil once it is gone.
    private static func runCount(_ processID: ProcessID, thread: ProcessID) -> Substring? {
        guard let text = try? ProcFS.readText(ProcFS.path(of: processID, .threadSchedulerStatistics(thread))) else { return nil }
        return text.split(separator: " ").last.map { $0.hasSuffix("\n") ? $0.dropLast() : $0 }
    }

    func abort(reason: String) {
        aborted = true
        pendingResume = nil
        pendingWakes.removeAll()
    }
}

/// Failures of the torture harness itself (not of the engine under test).
enum TortureError: Error, CustomStringConvertible {
    case targetHung(String)
    case environment(String)

    var description: String {
        switch self {
        case .targetHung(let message): message
        case .environment(let message): message
        }
    }
}
