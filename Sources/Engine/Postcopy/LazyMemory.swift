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
    package let userfaultfd: Userfaultfd
    private let registeredRanges: [Range<UInt64>]
    private let lock = Lock()
    private var reader: ImageReader?
    private var installed: [Bool]
    private var requested: [Bool]
    public private(set) var installedPageCount = 0
    private let observer: (any MigrationObserver)?
    private let gate: any TargetGate
    /// Set by the restorer once the target runs: from then on faults may come.
    private var running = false
    private var unregistered = false
    /// Where each slot's page is now: its frozen address until an mremap moves it.
    private var currentAddresses: [UInt64]
    /// Lookup by current address, once any page moved (nil: current == frozen, use binary search).
    private var slotByCurrentAddress: [UInt64: Int]?
    /// Installs and the process's memory events are serialised: an install checks and copies while no
    /// event is being applied, so nothing is copied into a range the process dropped or moved meanwhile.
    private let installLock = Lock()
    /// Pages dropped (MADV_DONTNEED, munmap) before anyone installed them: they count as done and are
    /// never installed; the dropped range reads as zeros, or is gone.
    public private(set) var discardedPageCount = 0
    /// postcopy-socket: bytes of `pages` messages taken in (by the restorer before the resume, by the
    /// fault handler after): what the fault handler acknowledges to the source.
    private var receivedPageBytes: UInt64 = 0
    /// Kills the target if this process goes away before every page is in (never run on holes);
    /// disarmed once `unregisterAll` proved every page installed.
    private let watchdog: HoleWatchdog?

    /// Registered shared-memory mappings: a page found present there was installed through another
    /// mapping of the same object (with the same dumped bytes), and shown to the oracle there. It is not
    /// shown again: read back now, it holds what the target wrote since.
    private let sharedRanges: [Range<UInt64>]
    /// Shared-memory mappings installed before the resume (memfds: their descriptors read and write
    /// the object without any fault).
    private let eagerRanges: [Range<UInt64>]
    /// Slots counted installed because their page was already there through another mapping.
    public private(set) var aliasPageCount = 0

    init(targetProcessID: ProcessID, pageAddresses: [UInt64], userfaultfd: Userfaultfd, registeredRanges: [Range<UInt64>],
         sharedRanges: [Range<UInt64>] = [], eagerRanges: [Range<UInt64>] = [], origin: PageOrigin,
         observer: (any MigrationObserver)?, gate: any TargetGate, watchdog: HoleWatchdog? = nil) {
        self.sharedRanges = sharedRanges
        self.eagerRanges = eagerRanges
        self.watchdog = watchdog
        self.gate = gate
        self.targetProcessID = targetProcessID
        self.pageAddresses = pageAddresses
        self.userfaultfd = userfaultfd
        self.registeredRanges = registeredRanges
        if case .fam(let reader) = origin { self.reader = reader }
        self.observer = observer
        installed = [Bool](repeating: false, count: pageAddresses.count)
        requested = [Bool](repeating: false, count: pageAddresses.count)
        currentAddresses = pageAddresses
    }

    public var pageCount: Int { pageAddresses.count }
    public var isComplete: Bool { lock.withLock { installedPageCount == pageAddresses.count } }
    public var isRunning: Bool { lock.withLock { running } }
    func markRunning() { lock.withLock { running = true } }
    /// Counts a `pages` message taken in.
    func noteReceivedPages(byteCount: Int) { lock.withLock { receivedPageBytes += UInt64(byteCount) } }
    var receivedPageByteCount: UInt64 { lock.withLock { receivedPageBytes } }
    var usesFAM: Bool { reader != nil }

    /// The slot of the dumped page now at `address`, or nil for a page the victim never touched.
    public func slot(for address: UInt64) -> Int? {
        lock.withLock {
            if let slotByCurrentAddress { return slotByCurrentAddress[address & ~UInt64(4095)] }
            return slotIndex(of: address, in: pageAddresses)
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
    private var deferredFaults: [PageFault] = []

    /// Reads every queued message: events are applied in their order, faults kept for `nextFault`.
    /// Install lock held. Bounded: a thread queues at most one message at a time, so a queue longer
    /// than this many is read on the next call.
    private func drainEvents() throws {
        var readAny = false
        for _ in 0..<4096 {
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
    private func discard(_ slot: Int) {
        lock.withLock {
            if !installed[slot] {
                installed[slot] = true
                installedPageCount += 1
                discardedPageCount += 1
            }
        }
    }

    /// Forgets that a slot was asked for, so that the next fault on it asks again.
    func clearRequested(_ slot: Int) { lock.withLock { requested[slot] = false } }

    private func apply(_ event: MemoryEvent) {
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
                  currentAddresses[slot + count] == currentAddresses[slot] + UInt64(count) * 4096,
                  reader!.isMarked(slot: slot + count) {
                count += 1
            }
            return (slot, count)
        }
    }

    /// Whether the image's commit record is durable (from then on FAM alone completes the migration).
    func imageIsCommitted() -> Bool {
        lock.withLock { (try? reader?.currentState()) == .complete }
    }

    /// The first slot at or after `start` that is not installed, or nil.
    func firstMissing(from start: Int) -> Int? {
        lock.withLock { (start..<installed.count).first { !installed[$0] } }
    }

    /// Installs `count` adjacent slots from FAM (the marks must be stored), shows the oracle the bytes
    /// copied, then wakes whoever faulted on them. Returns how many were newly installed here.
    @discardableResult
    func installFromFAM(slot: Int, count: Int) throws -> Int {
        guard let reader = lock.withLock({ reader }) else { preconditionFailure("installFromFAM without an image") }
        for index in slot..<(slot + count) {
            precondition(lock.withLock { self.reader!.hasObservedMark(slot: index) }, "page slot \(index) read before its mark was seen")
        }
        return try installLock.withLock { () throws -> Int in
            // Only the leading run still missing and still adjacent where the pages are now.
            let run = missingRun(slot: slot, count: count)
            guard run > 0 else { return 0 }
            // Invariant 4 on this path too: every page against its mark's digest before it goes in. A
            // page changed in FAM after its seal stops the migration (the target is killed) rather than
            // running the program on it.
            for index in slot..<(slot + run) { try verifyPage(slot: index) }
            let address = currentAddress(slot)
            let byteCount = run * 4096
            let region = reader.backend.readableRegion(at: reader.pageOffset(slot: slot), count: byteCount)
            let copied = try copyAll(slot: slot, address: address, byteCount: byteCount) { offset, remaining throws -> CopyOutcome in
                try userfaultfd.copy(from: region.mapping, at: region.offset + offset,
                                     to: address + UInt64(offset), byteCount: remaining, dontWake: true)
            }
            try finishInstall(slot: slot, count: run, copied: copied) { offset in
                reader.backend.loadBytes(at: reader.pageOffset(slot: slot) + offset * 4096, count: 4096)
            }
            return copied.newly.count
        }
    }

    /// How many slots from `slot` (at most `count`) are not installed and lie adjacent at their current
    /// addresses. Call with the install lock held.
    private func missingRun(slot: Int, count: Int) -> Int {
        lock.withLock {
            var run = 0
            while run < count, !installed[slot + run],
                  currentAddresses[slot + run] == currentAddresses[slot] + UInt64(run) * 4096 {
                run += 1
            }
            return run
        }
    }

    /// Installs pages that came over the socket (`bytes` covers whole pages from `address`).
    @discardableResult
    func installBytes(address: UInt64, bytes: [UInt8]) throws -> Int {
        guard let slot = frozenSlot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), which is not in the page table") }
        let count = bytes.count / 4096
        guard slot + count <= pageAddresses.count,
              pageAddresses[slot + count - 1] == address + UInt64(count - 1) * 4096 else {
            throw EngineError.aborted("the source sent \(count) pages at \(hex(address)) that are not adjacent dumped pages")
        }
        return try installLock.withLock { () throws -> Int in
            var total = 0
            var index = 0
            while index < count {
                let run = missingRun(slot: slot + index, count: count - index)
                guard run > 0 else { index += 1; continue }
                let destination = currentAddress(slot + index)
                // Whole messages (the usual case) go to the kernel without another copy.
                let chunk = index == 0 && run == count ? bytes : Array(bytes[(index * 4096)..<((index + run) * 4096)])
                let copied = try copyAll(slot: slot + index, address: destination, byteCount: chunk.count) { offset, remaining throws -> CopyOutcome in
                    let piece = offset == 0 && remaining == chunk.count ? chunk : Array(chunk[offset..<(offset + remaining)])
                    return try userfaultfd.copy(bytes: piece, to: destination + UInt64(offset), dontWake: true)
                }
                try finishInstall(slot: slot + index, count: run, copied: copied) { offset in
                    Array(chunk[(offset * 4096)..<((offset + 1) * 4096)])
                }
                total += copied.newly.count
                index += run
            }
            return total
        }
    }

    /// The slot of a page by the address it had at the freeze (the source's numbering).
    func frozenSlot(for address: UInt64) -> Int? { slotIndex(of: address, in: pageAddresses) }

    /// Checks a page in FAM against its mark's digest (its mark must have been seen here first).
    func verifyPage(slot: Int) throws(ImageError) {
        guard let reader = lock.withLock({ reader }) else { preconditionFailure("verifyPage without an image") }
        try reader.verifyPage(slot: slot)
    }

    /// Where a dumped page lies in FAM, for an installer that does not use the userfaultfd (pwrite of
    /// a private file page). The mark must have been seen here first (invariant 3).
    func famLocation(slot: Int) -> (mapping: SharedMapping, offset: Int) {
        lock.withLock {
            guard let reader else { preconditionFailure("famLocation without an image") }
            return reader.backend.readableRegion(at: reader.pageOffset(slot: slot), count: 4096)
        }
    }

    /// A page outside registered memory was written another way (pwrite of a private file page).
    func noteInstalledElsewhere(slot: Int) {
        lock.withLock {
            if !installed[slot] { installed[slot] = true; installedPageCount += 1 }
        }
    }

    /// Kills the target: a migration that cannot complete must never leave it running on holes.
    func killTarget() {
        Spawn.kill(targetProcessID)
    }

    /// A never-touched anonymous page: zeros, then wake.
    func installZeroPage(address: UInt64) throws {
        try installLock.withLock { () throws in
            try zeroFill(address: address)
            try wake(address: address)
        }
    }

    /// UFFDIO_ZEROPAGE that waits out a mapping change in progress (EAGAIN: its event is applied first);
    /// a page present already (EEXIST) or no longer registered (ENOENT) needs nothing. Install lock held.
    private func zeroFill(address: UInt64) throws {
        for _ in 0..<10_000 {
            let failure: SyscallError
            do {
                _ = try userfaultfd.zeroPage(at: address, dontWake: true)
                return
            } catch { failure = error }
            switch failure.errno {
            case .resourceTemporarilyUnavailable:
                try drainEvents()
                OSThread.sleep(for: .microseconds(20))
            case .noSuchFileOrDirectory:
                return
            default:
                throw failure
            }
        }
        throw EngineError.aborted("the target kept changing its mappings while page \(hex(address)) was zero-filled")
    }

    /// Wakes threads waiting on a page someone else installed (EEXIST still needs a wake).
    func wake(address: UInt64, byteCount: Int = 4096) throws {
        let userfaultfd = self.userfaultfd
        try gate.wake(processID: targetProcessID, address: address, byteCount: byteCount) { () throws(SyscallError) in
            try userfaultfd.wake(address: address, byteCount: byteCount)
        }
    }

    /// Runs a multi-page UFFDIO_COPY to the end: EAGAIN advances by what was copied, EEXIST skips one
    /// page (someone else installed it). Returns the page offsets (in pages) this call installed, and
    /// those it found present.
    private func copyAll(slot: Int, address: UInt64, byteCount: Int,
                         _ copy: (Int, Int) throws -> CopyOutcome) throws -> (newly: [Int], present: [Int]) {
        var newly: [Int] = []
        var present: [Int] = []
        var done = 0
        // A run that crosses a mapping boundary (neighbours with other protections) fails as a whole
        // with ENOENT: from then on page by page.
        var pageByPage = false
        while done < byteCount {
            let outcome: CopyOutcome
            do { outcome = try copy(done, pageByPage ? 4096 : byteCount - done) } catch let error as SyscallError
                where error.errno == .noSuchFileOrDirectory || error.errno == .resourceTemporarilyUnavailable {
                // The range was unmapped or moved away (ENOENT), or the process is changing its mappings
                // right now (EAGAIN, nothing copied): the event that says so is queued. Apply it (faults
                // read meanwhile wait their turn); if it moved the page, let the caller try again where
                // the page is now.
                try drainEvents()
                let page = slot + done / 4096
                if error.errno == .resourceTemporarilyUnavailable || currentAddress(page) != address + UInt64(done) { return (newly, present) }
                if !pageByPage {
                    pageByPage = true
                    continue
                }
                // This one page has no registered mapping and no event about it: the process replaced
                // the mapping (mmap over it); the dumped page has no place any more.
                discard(page)
                done += 4096
                continue
            }
            switch outcome {
            case .copied where pageByPage:
                newly.append(done / 4096)
                done += 4096
            case .copied:
                newly.append(contentsOf: (done / 4096)..<(byteCount / 4096))
                done = byteCount
            case .partial(let copiedByteCount):
                newly.append(contentsOf: (done / 4096)..<((done + copiedByteCount) / 4096))
                done += copiedByteCount
            case .firstPageAlreadyPresent:
                present.append(done / 4096)
                done += 4096
            }
        }
        return (newly, present)
    }

    /// `present`: pages another installer put there first (EEXIST). They count as installed: nobody of
    /// ours will ever copy them, and a slot left missing would be asked for forever. Whoever installed one
    /// showed it to the oracle (in shared memory: we did, through another mapping of the object).
    private func finishInstall(slot: Int, count: Int, copied: (newly: [Int], present: [Int]), installedBytes: (Int) -> [UInt8]) throws {
        let newly = copied.newly
        lock.withLock {
            let present = Set(copied.present)
            for offset in newly + copied.present where !installed[slot + offset] {
                installed[slot + offset] = true
                installedPageCount += 1
                // currentAddresses directly: the lock is held here.
                if present.contains(offset), sharedRanges.contains(where: { $0.contains(currentAddresses[slot + offset]) }) {
                    aliasPageCount += 1
                }
            }
        }
        // The oracle judges each page copied against its digest from where it was at the freeze, before
        // the wake below lets a waiting thread on (see MigrationObserver for why it gets the bytes).
        for offset in newly {
            guard let observer else { break }
            try observer.pagesInstalled(processID: targetProcessID, address: pageAddresses[slot + offset],
                                        targetAddress: currentAddress(slot + offset), byteCount: 4096, installedBytes: installedBytes(offset))
        }
        // Wake explicitly: the copies used DONTWAKE; pages skipped for EEXIST may have waiters too.
        try wake(address: currentAddress(slot), byteCount: count * 4096)
    }

    /// After every dumped page is proved installed: let the userfaultfd go, so the kernel serves the
    /// rest (never before: an unregistered missing page would read as zeros).
    ///
    /// Closing it, not only unregistering, is what makes this safe: an mremap, munmap or MADV_DONTNEED
    /// that began while a range was still registered queues its event after any drain of ours, and its
    /// thread then waits for a reader that no longer exists (the process hung in mremap, state D, once
    /// the fault handler had finished). Releasing the userfaultfd completes every queued and future event
    /// and wakes every fault, and clears every registration, tmpfs-backed ones included.
    func unregisterAll() throws {
        let proceed = lock.withLock { () -> Bool in
            if unregistered { return false }
            precondition(installedPageCount == pageAddresses.count,
                         "\(pageAddresses.count - installedPageCount) dumped pages not installed")
            unregistered = true
            return true
        }
        guard proceed else { return }
        installLock.withLock {
            lock.withLock { deferredFaults.removeAll() }
            userfaultfd.close()
            // The watchdog holds the last copy of the userfaultfd: the release happens once it is disarmed
            // (and it leaves the target alone: every page is in).
            watchdog?.disarm()
        }
        gate.released(processID: targetProcessID)
    }

    /// What the death of this node does to the restored process's memory, done while the node lives on
    /// (torture's target-node nemesis): the userfaultfd is closed and the watchdog loses its owner, so it
    /// kills the process unless every page was in (then it was disarmed already). Nothing of this memory
    /// is used afterwards: the node's actors are dead.
    package func loseNode() {
        installLock.withLock {
            lock.withLock {
                deferredFaults.removeAll()
                unregistered = true
            }
            userfaultfd.close()
            watchdog?.abandon()
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

