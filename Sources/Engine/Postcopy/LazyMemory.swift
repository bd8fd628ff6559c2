// The target's memory while post-copy fills it: which dumped pages are installed, which are asked for,
// and the one userfaultfd every installer uses. The restorer, the fault handler and the pusher share it
// (each on its own thread under the threaded driver), so every field lives behind one lock.
import Sys

/// Where missing pages come from: the FAM image (marks say which are dumped) or the source's socket.
public enum PageOrigin: Sendable {
    case fam(ImageReader)
    case socket
}

/// Which path installed a page, for the per-path latency histograms.
public enum InstallPath: String, Sendable, CaseIterable {
    case famSync = "fam-sync"
    case sourceAsync = "source-async"
    case push
    case eager
}

public final class LazyMemory: @unchecked Sendable {
    public let targetProcessID: ProcessID
    public let pageAddresses: [UInt64]
    /// `package`: torture's racing installer copies through it behind the engine's back.
    /// A tree's: one per process, addressed by tagged addresses (TreeUserfaultfd).
    package let userfaultfd: TreeUserfaultfd
    /// This node's PID of each process of the tree by ordinal (nil: a zombie); the root's is `targetProcessID`.
    public let processIDsByOrdinal: [ProcessID?]
    let registeredRanges: [Range<UInt64>]
    let lock = Lock()
    var reader: ImageReader?
    var installed: [Bool]
    var requested: [Bool]
    /// Slots an installer is reading and checking outside the install lock (`installFromFAM`): another
    /// installer leaves them out of its run, so no page is read and coded twice (a pusher's run and a
    /// fault-around racing on one range did both code the same pages).
    var claimed: [Bool]
    public internal(set) var installedPageCount = 0
    let observer: (any MigrationObserver)?
    let gate: any TargetGate
    /// Set by the restorer once the target runs: from then on faults may come.
    var running = false
    var unregistered = false
    /// The commit record was seen and verified (imageIsCommitted).
    var commitVerified = false
    /// Where each slot's page is now: its frozen address until an mremap moves it.
    var currentAddresses: [UInt64]
    /// Lookup by current address, once any page moved (nil: current == frozen, use binary search).
    var slotByCurrentAddress: [UInt64: Int]?
    /// Installs and the process's memory events are serialised: an install checks and copies while no
    /// event is being applied, so nothing is copied into a range the process dropped or moved meanwhile.
    let installLock = Lock()
    /// Pages dropped (MADV_DONTNEED, munmap) before anyone installed them: they count as done and are
    /// never installed; the dropped range reads as zeros, or is gone.
    public internal(set) var discardedPageCount = 0
    /// postcopy-socket: bytes of `pages` messages taken in (by the restorer before the resume, by the
    /// fault handler after): what the fault handler acknowledges to the source.
    var receivedPageBytes: UInt64 = 0
    /// Kills the target if this process goes away before every page is in (never run on holes);
    /// disarmed once `unregisterAll` proved every page installed.
    /// One per process of the tree, each holding that process's userfaultfd.
    let watchdogs: [HoleWatchdog]

    /// From now on each restored process lives only while this node runs and renews its lease
    /// (HoleWatchdog.startLease): a node stopped for longer than `duration` loses its process.
    func startLease(_ duration: Duration) throws(SyscallError) {
        for watchdog in watchdogs { try watchdog.startLease(duration) }
    }

    /// Whether a watchdog's lease ran out (its process is killed, or about to be).
    var leaseLapsed: Bool { watchdogs.contains { $0.leaseLapsed } }

    /// Registered shared-memory mappings: a page found present there was installed through another
    /// mapping of the same object (with the same dumped bytes), and shown to the oracle there. It is not
    /// shown again: read back now, it holds what the target wrote since.
    let sharedRanges: [Range<UInt64>]
    /// Shared-memory mappings installed before the resume (memfds: their descriptors read and write
    /// the object without any fault).
    let eagerRanges: [Range<UInt64>]
    /// Slots counted installed because their page was already there through another mapping.
    public internal(set) var aliasPageCount = 0

    /// A tree's ranges are tagged with their process's ordinal, as its page addresses are.
    init(targetProcessID: ProcessID, pageAddresses: [UInt64], userfaultfd: TreeUserfaultfd, registeredRanges: [Range<UInt64>],
         sharedRanges: [Range<UInt64>] = [], eagerRanges: [Range<UInt64>] = [], origin: PageOrigin,
         observer: (any MigrationObserver)?, gate: any TargetGate, watchdogs: [HoleWatchdog] = [], processIDsByOrdinal: [ProcessID?]? = nil) {
        self.sharedRanges = sharedRanges
        self.eagerRanges = eagerRanges
        self.watchdogs = watchdogs
        self.processIDsByOrdinal = processIDsByOrdinal ?? [targetProcessID]
        self.gate = gate
        self.targetProcessID = targetProcessID
        self.pageAddresses = pageAddresses
        self.userfaultfd = userfaultfd
        self.registeredRanges = registeredRanges
        if case .fam(let reader) = origin { self.reader = reader }
        self.observer = observer
        installed = [Bool](repeating: false, count: pageAddresses.count)
        requested = [Bool](repeating: false, count: pageAddresses.count)
        claimed = [Bool](repeating: false, count: pageAddresses.count)
        currentAddresses = pageAddresses
    }

    public var pageCount: Int { pageAddresses.count }
    public var isComplete: Bool { lock.withLock { installedPageCount == pageAddresses.count } }
    public var isRunning: Bool { lock.withLock { running } }
    /// Whether the userfaultfd was let go and the watchdogs disarmed (`unregisterAll`): the restored
    /// process no longer depends on this node. Until then a failed migration kills it.
    public var isReleased: Bool { lock.withLock { unregistered } }
    /// Released while the restored process still ran (not after its own end): from then on it is the
    /// process, and it runs on (torture's one-live-copy oracle).
    public private(set) var releasedWhileRunning = false
    func markRunning() { lock.withLock { running = true } }
    /// Counts a `pages` message taken in.
    func noteReceivedPages(byteCount: Int) { lock.withLock { receivedPageBytes += UInt64(byteCount) } }
    var receivedPageByteCount: UInt64 { lock.withLock { receivedPageBytes } }
    var usesFAM: Bool { reader != nil }

    /// The slot of the dumped page now at `address`, or nil for a page the victim never touched.
    public func slot(for address: UInt64) -> Int? {
        lock.withLock {
            if let slotByCurrentAddress { return slotByCurrentAddress[address & ~(UInt64.pageSize - 1)] }
            return slotIndex(of: address, in: pageAddresses)
        }
    }

    /// What a fault on `address` finds, under one hold of the lock (the fault path asks this first).
    enum FaultTarget: Equatable {
        /// The victim never touched the page: it reads as zeros.
        case neverDumped
        case installed(slot: Int)
        /// Its dumped mark is stored (postcopy-fam): it can go in from FAM now.
        case dumped(slot: Int)
        /// Not dumped yet, or it comes over the socket.
        case missing(slot: Int)
    }

    /// `slot(for:)`, `isInstalled` and `isDumped` in one go (the mark is read only for a missing page).
    func faultTarget(address: UInt64) -> FaultTarget {
        lock.withLock {
            let found: Int?
            if let slotByCurrentAddress { found = slotByCurrentAddress[address & ~(UInt64.pageSize - 1)] } else { found = slotIndex(of: address, in: pageAddresses) }
            guard let slot = found else { return .neverDumped }
            if installed[slot] { return .installed(slot: slot) }
            return reader?.isMarked(slot: slot) == true ? .dumped(slot: slot) : .missing(slot: slot)
        }
    }

    /// Where the slot's page is in the target now.
    package func currentAddress(_ slot: Int) -> UInt64 { lock.withLock { currentAddresses[slot] } }

    /// The next fault, after applying every memory event queued with it. Returns nil when nothing is
    /// pending. The install lock is held while reading: the thread that caused an event runs on as soon
    /// as the event is read, and no install may slip in before the event is applied.
    func nextFault() throws -> PageFault? {
        try installLock.withLock { () throws -> PageFault? in
            try drainEvents()
            return lock.withLock { deferredFaults.isEmpty ? nil : deferredFaults.removeFirst() }
        }
    }

    /// Faults read but not served yet, in address order (then thread): threads that fault at once queue
    /// their messages in whatever order the CPUs raced, and serving the same set in one order gives the
    /// same service whatever the race.
    var deferredFaults: [PageFault] = []

    /// Reads every queued message: events are applied in their order, faults kept for `nextFault`.
    /// Install lock held. Bounded: a thread queues at most one message at a time, so a queue longer
    /// than this many is read on the next call.
    private static let messagesPerDrain = 1 << 12

    func drainEvents() throws {
        var readAny = false
        for _ in 0..<Self.messagesPerDrain {
            guard let message = try userfaultfd.nextMessage() else { break }
            switch message {
            case .fault(let fault):
                lock.withLock { deferredFaults.append(fault) }
                readAny = true
            case .event(let event):
                apply(event)
                // Reading the event let the thread that caused it go on.
                gate.memoryEventRead(processID: targetProcessID)
            }
        }
        if readAny {
            lock.withLock { deferredFaults.sort { ($0.address, $0.threadID.rawValue) < ($1.address, $1.threadID.rawValue) } }
        }
    }

    /// A page that has nowhere to go: it counts as done and is never installed.
    func discard(_ slot: Int) {
        lock.withLock {
            if !installed[slot] {
                installed[slot] = true
                installedPageCount += 1
                discardedPageCount += 1
            }
        }
    }

    /// Ordinals of tree members seen ended (their slots discarded).
    private var endedOrdinals: Set<Int> = []

    /// A member of a tree that ended needs no more pages (its memory is gone, and an install into it
    /// fails with ESRCH): its missing slots count as done, never installed. The root's end ends the
    /// migration instead (the fault handler finishes). Returns how many slots this call discarded.
    @discardableResult
    func discardPagesOfEndedMembers() -> Int {
        guard processIDsByOrdinal.count > 1 else { return 0 }
        var newlyEnded: Set<Int> = []
        for (ordinal, processID) in processIDsByOrdinal.enumerated().dropFirst() {
            guard let processID, !lock.withLock({ endedOrdinals.contains(ordinal) }), Spawn.hasEnded(processID) else { continue }
            newlyEnded.insert(ordinal)
        }
        guard !newlyEnded.isEmpty else { return 0 }
        // Under the install lock: no install into the ended process is half-way.
        return installLock.withLock {
            lock.withLock {
                endedOrdinals.formUnion(newlyEnded)
                var count = 0
                for slot in pageAddresses.indices where !installed[slot] && newlyEnded.contains(TreePageAddress.ordinal(of: pageAddresses[slot])) {
                    installed[slot] = true
                    installedPageCount += 1
                    discardedPageCount += 1
                    count += 1
                }
                deferredFaults.removeAll { newlyEnded.contains(TreePageAddress.ordinal(of: $0.address)) }
                return count
            }
        }
    }

    /// Forgets that a slot was asked for, so that the next fault on it asks again.
    func clearRequested(_ slot: Int) { lock.withLock { requested[slot] = false } }

    func apply(_ event: MemoryEvent) {
        lock.withLock {
            switch event {
            case .remapped(let from, let to, let length):
                for slot in currentAddresses.indices where currentAddresses[slot] >= from && currentAddresses[slot] - from < length {
                    currentAddresses[slot] = to + (currentAddresses[slot] - from)
                }
                slotByCurrentAddress = Dictionary(uniqueKeysWithValues: currentAddresses.enumerated().map { ($0.element, $0.offset) })
            case .removed(let start, let end), .unmapped(let start, let end):
                for slot in currentAddresses.indices where currentAddresses[slot] >= start && currentAddresses[slot] < end && !installed[slot] {
                    installed[slot] = true
                    installedPageCount += 1
                    discardedPageCount += 1
                }
            }
        }
    }

    package func isRegistered(_ address: UInt64) -> Bool { registeredRanges.contains { $0.contains(address) } }
    /// Registered, but to be installed before the target runs.
    package func isInstalledBeforeResume(_ address: UInt64) -> Bool { eagerRanges.contains { $0.contains(address) } }
    package func isInstalled(_ slot: Int) -> Bool { lock.withLock { installed[slot] } }

    /// Records a request; true when this is the first for the slot (send it then).
    func noteRequested(_ slot: Int) -> Bool {
        lock.withLock {
            if requested[slot] || installed[slot] { return false }
            requested[slot] = true
            return true
        }
    }

    /// Whether the slot's dumped mark is stored (reads the mark in FAM; invariant 3: read a page only
    /// after its mark).
    func isDumped(_ slot: Int) -> Bool {
        lock.withLock { reader?.isMarked(slot: slot) ?? false }
    }

    /// The first not-installed slot at or after `start` whose mark is stored, and how many adjacent
    /// slots after it are marked and not installed (at most `limit`).
    func nextInstallableRun(from start: Int, limit: Int) -> (slot: Int, count: Int)? {
        lock.withLock {
            guard reader != nil else { return nil }
            var slot = start
            while slot < installed.count && (installed[slot] || !(reader!.isMarked(slot: slot))) { slot += 1 }
            guard slot < installed.count else { return nil }
            var count = 1
            while count < limit, slot + count < installed.count, !installed[slot + count],
                  currentAddresses[slot + count] == currentAddresses[slot] + UInt64(count) * .pageSize,
                  reader!.isMarked(slot: slot + count) {
                count += 1
            }
            return (slot, count)
        }
    }

    /// Whether the image's commit record is durable and authentic (from then on FAM alone completes the
    /// migration). Once it verified, it stays so (a commit is never undone); the state word is read until
    /// then, and the record with every mark checked only while the word says complete.
    /// The record and the marks are read outside the lock: installers and the fault path go on meanwhile.
    func imageIsCommitted() -> Bool {
        let (verified, image) = lock.withLock { (commitVerified, reader) }
        if verified { return true }
        guard image?.isCommittedAuthentically() == true else { return false }
        lock.withLock { commitVerified = true }
        return true
    }

    /// The first slot at or after `start` that is not installed, or nil.
    func firstMissing(from start: Int) -> Int? {
        lock.withLock { (start..<installed.count).first { !installed[$0] } }
    }

    /// After every dumped page is proved installed: let the userfaultfd go, so the kernel serves the
    /// rest (never before: an unregistered missing page would read as zeros).
    ///
    /// Closing it, not only unregistering, is what makes this safe: an mremap, munmap or MADV_DONTNEED
    /// that began while a range was still registered queues its event after any drain of ours, and its
    /// thread then waits for a reader that no longer exists (the process hung in mremap, state D, once
    /// the fault handler had finished). Releasing the userfaultfd completes every queued and future event
    /// and wakes every fault, and clears every registration, tmpfs-backed ones included.
    ///
    /// Both are needed: every mapping is unregistered first (Linux 6.18, PREEMPT_NONE), because a fault
    /// that meets a released userfaultfd is retried inside the kernel without sleeping until the release
    /// has cleared the mapping's flags, and the release needs the mmap lock for writing. A restored
    /// process faulting on a registered page it dropped (heapchurn's heap) then spun for over 100 s while
    /// the releasing process waited for that CPU (soft lockup). UFFDIO_UNREGISTER runs before the release,
    /// so such a fault sleeps instead and is woken by it; and a copy of the userfaultfd held elsewhere no
    /// longer keeps the process's faults blocked after we let it go. Events queued before the
    /// unregistration are then read (so completed): such a copy does not keep them waiting either.
    func unregisterAll() throws {
        let proceed = lock.withLock { () -> Bool in
            if unregistered { return false }
            precondition(installedPageCount == pageAddresses.count,
                         "\(pageAddresses.count - installedPageCount) dumped pages not installed")
            unregistered = true
            return true
        }
        guard proceed else { return }
        let running = !Spawn.hasEnded(targetProcessID)
        lock.withLock { releasedWhileRunning = running }
        installLock.withLock {
            lock.withLock { deferredFaults.removeAll() }
            if running {
                userfaultfd.unregisterEveryMapping(processIDsByOrdinal: processIDsByOrdinal)
                userfaultfd.completeQueuedEvents()
            }
            userfaultfd.close()
            // The watchdogs hold the last copies of the userfaultfds: the release happens once they are
            // disarmed (and they leave the target alone: every page is in).
            for watchdog in watchdogs { watchdog.disarm() }
        }
        gate.released(processID: targetProcessID)
    }

    /// What the death of this node does to the restored process's memory, done while the node lives on
    /// (torture's target-node nemesis): the userfaultfd is closed and the watchdog loses its owner, so it
    /// kills the process unless every page was in (then it was disarmed already). Nothing of this memory
    /// is used afterwards: the node's actors are dead.
    /// Returns whether the watchdog was still armed (then it kills the process, even with every page in:
    /// the node died before it said so).
    @discardableResult
    package func loseNode() -> Bool {
        installLock.withLock {
            let armed = lock.withLock { () -> Bool in
                deferredFaults.removeAll()
                defer { unregistered = true }
                return !unregistered && !watchdogs.isEmpty
            }
            userfaultfd.close()
            for watchdog in watchdogs { watchdog.abandon() }
            return armed
        }
    }

    /// A fault on a page already installed: the process dropped it since (MADV_DONTNEED), and a private
    /// anonymous page reads as zeros then; or it is a stale fault on a page installed meanwhile. A zero
    /// page settles both: EEXIST says it was present, and only a wake is due.
    func refault(address: UInt64) throws {
        try installLock.withLock { () throws in
            try zeroFill(address: address)
            try wake(address: address)
        }
    }
}

