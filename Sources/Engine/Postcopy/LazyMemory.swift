// The target's memory while post-copy fills it: which dumped pages are installed, which are asked for,
// and the one userfaultfd every installer uses. The restorer, the fault handler and the pusher share it
// (each on its own thread under the threaded driver), so every field lives behind one lock.
import Foundation
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
    let userfaultfd: Userfaultfd
    private let registeredRanges: [Range<UInt64>]
    private let lock = NSLock()
    private var reader: ImageReader?
    private var installed: [Bool]
    private var requested: [Bool]
    public private(set) var installedPageCount = 0
    private let observer: (any MigrationObserver)?
    private let gate: any TargetGate
    /// Set by the restorer once the target runs: from then on faults may come.
    private var running = false
    private var unregistered = false

    init(targetProcessID: ProcessID, pageAddresses: [UInt64], userfaultfd: Userfaultfd, registeredRanges: [Range<UInt64>],
         origin: PageOrigin, observer: (any MigrationObserver)?, gate: any TargetGate) {
        self.gate = gate
        self.targetProcessID = targetProcessID
        self.pageAddresses = pageAddresses
        self.userfaultfd = userfaultfd
        self.registeredRanges = registeredRanges
        if case .fam(let reader) = origin { self.reader = reader }
        self.observer = observer
        installed = [Bool](repeating: false, count: pageAddresses.count)
        requested = [Bool](repeating: false, count: pageAddresses.count)
    }

    public var pageCount: Int { pageAddresses.count }
    public var isComplete: Bool { lock.withLock { installedPageCount == pageAddresses.count } }
    public var isRunning: Bool { lock.withLock { running } }
    func markRunning() { lock.withLock { running = true } }
    var usesFAM: Bool { reader != nil }

    /// The slot of a dumped page, or nil for a page the victim never touched.
    public func slot(for address: UInt64) -> Int? {
        slotIndex(of: address, in: pageAddresses)
    }

    func isRegistered(_ address: UInt64) -> Bool { registeredRanges.contains { $0.contains(address) } }
    func isInstalled(_ slot: Int) -> Bool { lock.withLock { installed[slot] } }

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
                  pageAddresses[slot + count] == pageAddresses[slot] + UInt64(count) * 4096,
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

    /// Installs `count` adjacent slots from FAM (the marks must be stored), lets the oracle read them
    /// back, then wakes whoever faulted on them. Returns how many were newly installed here.
    /// `readBack`: the oracle reads the pages back through the target (see MigrationObserver); else it
    /// checks the FAM bytes that were copied.
    @discardableResult
    func installFromFAM(slot: Int, count: Int, readBack: Bool) throws -> Int {
        guard let reader = lock.withLock({ reader }) else { preconditionFailure("installFromFAM without an image") }
        for index in slot..<(slot + count) {
            precondition(lock.withLock { self.reader!.hasObservedMark(slot: index) }, "page slot \(index) read before its mark was seen")
        }
        let address = pageAddresses[slot]
        let byteCount = count * 4096
        let region = reader.backend.readableRegion(at: reader.pageOffset(slot: slot), count: byteCount)
        let newly = try copyAll(address: address, byteCount: byteCount) { offset, remaining throws -> CopyOutcome in
            try userfaultfd.copy(from: region.mapping, at: region.offset + offset,
                                 to: address + UInt64(offset), byteCount: remaining, dontWake: true)
        }
        try finishInstall(slot: slot, count: count, newly: newly) { offset in
            readBack ? nil : reader.backend.loadBytes(at: reader.pageOffset(slot: slot) + offset * 4096, count: 4096)
        }
        return newly.count
    }

    /// Installs pages that came over the socket (`bytes` covers whole pages from `address`).
    @discardableResult
    func installBytes(address: UInt64, bytes: [UInt8]) throws -> Int {
        guard let slot = slot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), which is not in the page table") }
        let count = bytes.count / 4096
        guard slot + count <= pageAddresses.count,
              pageAddresses[slot + count - 1] == address + UInt64(count - 1) * 4096 else {
            throw EngineError.aborted("the source sent \(count) pages at \(hex(address)) that are not adjacent dumped pages")
        }
        let newly = try copyAll(address: address, byteCount: bytes.count) { offset, remaining throws -> CopyOutcome in
            try userfaultfd.copy(bytes: Array(bytes[offset..<(offset + remaining)]), to: address + UInt64(offset), dontWake: true)
        }
        try finishInstall(slot: slot, count: count, newly: newly) { offset in Array(bytes[(offset * 4096)..<((offset + 1) * 4096)]) }
        return newly.count
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
        _ = try userfaultfd.zeroPage(at: address, dontWake: true)
        try wake(address: address)
    }

    /// Wakes threads waiting on a page someone else installed (EEXIST still needs a wake).
    func wake(address: UInt64, byteCount: Int = 4096) throws {
        let userfaultfd = self.userfaultfd
        try gate.wake(processID: targetProcessID, address: address, byteCount: byteCount) { () throws(SyscallError) in
            try userfaultfd.wake(address: address, byteCount: byteCount)
        }
    }

    /// Runs a multi-page UFFDIO_COPY to the end: EAGAIN advances by what was copied, EEXIST skips one
    /// page (someone else installed it). Returns the page offsets (in pages) this call installed.
    private func copyAll(address: UInt64, byteCount: Int, _ copy: (Int, Int) throws -> CopyOutcome) throws -> [Int] {
        var newly: [Int] = []
        var done = 0
        while done < byteCount {
            switch try copy(done, byteCount - done) {
            case .copied:
                newly.append(contentsOf: (done / 4096)..<(byteCount / 4096))
                done = byteCount
            case .partial(let copiedByteCount):
                newly.append(contentsOf: (done / 4096)..<((done + copiedByteCount) / 4096))
                done += copiedByteCount
            case .firstPageAlreadyPresent:
                done += 4096
            }
        }
        return newly
    }

    private func finishInstall(slot: Int, count: Int, newly: [Int], installedBytes: (Int) -> [UInt8]?) throws {
        lock.withLock {
            for offset in newly where !installed[slot + offset] {
                installed[slot + offset] = true
                installedPageCount += 1
            }
        }
        // The oracle reads the installed pages back through the target before anyone runs on them.
        for offset in newly {
            guard let observer else { break }
            try observer.pagesInstalled(processID: targetProcessID, address: pageAddresses[slot + offset], byteCount: 4096,
                                        installedBytes: installedBytes(offset))
        }
        // Wake explicitly: the copies used DONTWAKE; pages skipped for EEXIST may have waiters too.
        try wake(address: pageAddresses[slot], byteCount: count * 4096)
    }

    /// After every dumped page is proved installed: unregister, so the kernel serves the rest (never
    /// before: an unregistered missing page would read as zeros).
    func unregisterAll() throws {
        let proceed = lock.withLock { () -> Bool in
            if unregistered { return false }
            precondition(installedPageCount == pageAddresses.count,
                         "\(pageAddresses.count - installedPageCount) dumped pages not installed")
            unregistered = true
            return true
        }
        guard proceed else { return }
        for range in registeredRanges {
            // ENOMEM/EINVAL here mean the target is gone or unmapped the range itself: nothing to do.
            try? userfaultfd.unregister(start: range.lowerBound, byteCount: range.upperBound - range.lowerBound)
        }
    }
}

