// Why this file exists: the target strategies of both post-copy modes. Once the layout is built, the
// restorer hands the userfaultfd to lazy memory (LazyMemory), which the fault handler and the pusher
// share once the process runs, and installs only the pages the kernel itself touches before the process
// runs (private file pages, mapped memfds, the rseq area): from FAM once marked (LazyFromFAM), or as the
// source's socket brings them (LazyFromSocket).
import Logging
import Synchronization
import Sys

/// The handover both post-copy modes share, and the pages needed before the resume.
class LazyHandover {
    let link: any Transport
    /// Pages that must be in before the process runs, not yet installed.
    var eagerSlotsLeft: Set<Int> = []
    var eagerRequested = false
    /// Dumped pages found present in registered memory before anything was installed there
    /// (TargetProcess.checkStrayPages, which the restorer ran before this step): written with their dumped
    /// bytes before the resume, since an installer of lazy memory takes a present page for installed.
    var strayPageSlots: Set<Int> = []
    var strayPagesNoted = false

    init(transport: any Transport) { link = transport }

    /// Makes each stray page one to install before the resume, by pwrite.
    func noteStrayPages(_ restorer: Restorer, _ memory: LazyMemory) {
        guard !strayPagesNoted else { return }
        strayPagesNoted = true
        guard let strayPageAddresses = restorer.target!.strayPageAddresses else { preconditionFailure("stray pages noted before the look for them") }
        for address in strayPageAddresses.sorted() {
            guard let slot = memory.slot(for: address), !memory.isInstalled(slot) else { continue }
            restorer.logger.info("a registered page was present before its install; it is written with its dumped bytes",
                                 metadata: ["address": "\(hex(address))"])
            strayPageSlots.insert(slot)
            eagerSlotsLeft.insert(slot)
        }
    }

    var transport: (any Transport)? { link }
    var needsCompleteImage: Bool { false }
    /// Every process of a tree gets its lazy memory (TargetTree.makeLazyMemory).
    var restoresTrees: Bool { true }

    func installBatch(_ restorer: Restorer, from nextSlot: Int) throws(EngineError) -> Restorer.State {
        preconditionFailure("a post-copy restore installs no batches")
    }
    func finishPagesBeforeState(_ restorer: Restorer) throws(RestoreError) {}

    /// Hands the userfaultfd over to shared lazy memory and lists the pages needed before the resume:
    /// those outside registered memory (private file pages and SysV attaches, written with pwrite) and the rseq area
    /// (rseq registration makes the kernel write it, and no fault handler may be needed mid-injection).
    func pagesAfterLayout(_ restorer: Restorer) throws(EngineError) -> Restorer.State {
        let pageAddresses = restorer.pageAddresses
        let origin: PageOrigin = restorer.reader.map { .fam($0) } ?? .socket
        let memory: LazyMemory
        do {
            memory = try restorer.target!.makeLazyMemory(pageAddresses: pageAddresses, origin: origin, observer: restorer.observer,
                                                         gate: restorer.gate)
        } catch { throw .restore(error) }
        if let lease = restorer.lease {
            do { try memory.startLease(lease) } catch { throw .restore(.system("starting this node's lease on its restored process: \(error)")) }
        }
        restorer.handedOver.withLock { $0 = memory }
        var slots = Set<Int>()
        for (slot, address) in pageAddresses.enumerated() where !memory.isRegistered(address) || memory.isInstalledBeforeResume(address) {
            slots.insert(slot)
        }
        // Every process of a tree: its pages carry its ordinal (TreePageAddress).
        for (ordinal, process) in restorer.checkpointedState!.liveProcesses {
            for rseq in process.threads.compactMap(\.rseq) {
                let firstPage = rseq.address & ~UInt64(ImageLayout.pageSize - 1)
                let lastPage = (rseq.address + UInt64(max(rseq.byteCount, 1)) - 1) & ~UInt64(ImageLayout.pageSize - 1)
                for page in stride(from: firstPage, through: lastPage, by: .pageSize) {
                    if let slot = memory.slot(for: TreePageAddress.tagged(page, ordinal: ordinal)) { slots.insert(slot) }
                }
            }
        }
        eagerSlotsLeft = slots
        return .eagerPages
    }
}

/// postcopy-fam: the image's metadata commit is enough to start; the pages needed before the resume go
/// in from FAM once their marks are stored (asked of the source first).
final class LazyFromFAM: LazyHandover, TargetPageStrategy {
    var stateLink: (any Transport)? { nil }
    var sourceSpokeFirst: Bool { link.waitReadable(timeoutMilliseconds: 0) }

    /// A source that refused the victim (before any image existed) says so, or hangs up: waiting out the
    /// image wait for an image that never comes would only hide its reason.
    func readSourceWord() throws(EngineError) {
        let message: Message?
        do { message = try link.receive() } catch {
            throw .aborted("the source node went away before it wrote an image: \(error)")
        }
        if case .abort(let reason) = message { throw .aborted("the source aborted: \(reason)") }
    }

    func imageAvailable(_ restorer: Restorer) -> Bool {
        guard let backend = try? restorer.openBackend(), let imageState = ImageReader.peekState(backend: backend) else { return false }
        return imageState != .creating
    }

    /// Requested and not marked yet: a step now would change nothing (seed 0x251de377e567a71d: pct ran
    /// it 10,000 times in a row and starved the dumper that marks them).
    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction? {
        guard eagerRequested, !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        if let memory = restorer.lazyMemory, !eagerSlotsLeft.contains(where: { memory.isDumped($0) }) {
            return .waiting(.retryAfter(.microseconds(100)))
        }
        return nil
    }

    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool {
        guard let memory = restorer.lazyMemory else { preconditionFailure("eager pages without lazy memory") }
        do {
            noteStrayPages(restorer, memory)
            // After the commit record FAM alone completes the migration: the source may be gone.
            let committed = memory.imageIsCommitted()
            if !eagerRequested {
                for slot in eagerSlotsLeft.sorted() where !memory.isDumped(slot) {
                    do { try link.send(.pageRequest(address: restorer.pageAddresses[slot])) } catch { if !committed { throw error } }
                }
                eagerRequested = true
            }
            for slot in eagerSlotsLeft.sorted() where memory.isDumped(slot) {
                try install(restorer, slot: slot, memory: memory)
            }
            // Drain the source's messages: the marks themselves are read from FAM.
            do {
                while let message = try link.receive() {
                    if case .abort(let reason) = message { throw EngineError.aborted("the source aborted: \(reason)") }
                }
            } catch let error as TransportError {
                if !memory.imageIsCommitted() { throw error }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("installing the pages needed before the resume: \(error)")
        }
        return eagerSlotsLeft.isEmpty
    }

    func install(_ restorer: Restorer, slot: Int, memory: LazyMemory) throws {
        let address = restorer.pageAddresses[slot]
        if memory.isRegistered(address) && !strayPageSlots.contains(slot) {
            try memory.installFromFAM(slot: slot, count: 1)
        } else {
            precondition(memory.isDumped(slot), "page slot \(slot) read before its mark was seen")
            // Checked and written from one copy: nothing read from FAM after the check.
            let page = try memory.verifiedPages(slot: slot, count: 1)
            let target = restorer.target!
            try target.writePages(page, offset: 0, byteCount: .pageSize, to: address)
            try restorer.observer?.pagesInstalled(processID: target.processID, address: address, targetAddress: address, byteCount: .pageSize,
                                                  installedBytes: nil)
            memory.noteInstalledElsewhere(slot: slot)
        }
        eagerSlotsLeft.remove(slot)
    }
}

/// postcopy-socket: the process state comes over the socket, and so do the pages needed before the resume.
final class LazyFromSocket: LazyHandover, TargetPageStrategy {
    var stateLink: (any Transport)? { link }
    var sourceSpokeFirst: Bool { false }
    func readSourceWord() throws(EngineError) {}

    func imageAvailable(_ restorer: Restorer) -> Bool { link.waitReadable(timeoutMilliseconds: 0) }

    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction? {
        guard eagerRequested, !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        return .waiting(.retryAfter(.microseconds(100)))
    }

    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool {
        guard let memory = restorer.lazyMemory else { preconditionFailure("eager pages without lazy memory") }
        do {
            noteStrayPages(restorer, memory)
            if !eagerRequested {
                for slot in eagerSlotsLeft.sorted() { try link.send(.pageRequest(address: restorer.pageAddresses[slot])) }
                eagerRequested = true
            }
            // Only until the pages needed before the resume are in: what the source pushes after
            // that is the fault handler's, once the process runs (it must not lengthen the downtime).
            while !eagerSlotsLeft.isEmpty, let message = try link.receive() {
                switch message {
                case .pages(let address, let bytes):
                    try installReceived(restorer, address: address, bytes: bytes, memory: memory)
                    memory.noteReceivedPages(byteCount: bytes.count)
                case .abort(let reason):
                    throw EngineError.aborted("the source aborted: \(reason)")
                default:
                    continue
                }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("installing the pages needed before the resume: \(error)")
        }
        return eagerSlotsLeft.isEmpty
    }

    /// Any page that arrives before the resume goes in now, page by page into registered memory
    /// (UFFDIO_COPY) or not (pwrite), since one run of pages may span both.
    func installReceived(_ restorer: Restorer, address: UInt64, bytes: [UInt8], memory: LazyMemory) throws {
        guard let first = memory.slot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), not in the page table") }
        let target = restorer.target!
        for index in 0..<(bytes.count / .pageSize) {
            let pageAddress = address + UInt64(index) * .pageSize
            let page = Array(bytes[(index * .pageSize)..<((index + 1) * .pageSize)])
            guard memory.slot(for: pageAddress) == first + index else {
                throw EngineError.aborted("the source sent pages at \(hex(address)) that are not adjacent dumped pages")
            }
            if memory.isRegistered(pageAddress) && !strayPageSlots.contains(first + index) {
                try memory.installBytes(address: pageAddress, bytes: page)
            } else if !memory.isInstalled(first + index) {
                try target.writeBytes(page, to: pageAddress)
                try restorer.observer?.pagesInstalled(processID: target.processID, address: pageAddress, targetAddress: pageAddress,
                                                      byteCount: .pageSize, installedBytes: nil)
                memory.noteInstalledElsewhere(slot: first + index)
            }
            eagerSlotsLeft.remove(first + index)
        }
    }
}
