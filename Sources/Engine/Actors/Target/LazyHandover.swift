// Why this file exists: what the target strategies of both post-copy modes share (Migration/Modes). Once
// the layout is built, the restorer hands the userfaultfd to lazy memory (LazyMemory), which the fault
// handler and the pusher share once the process runs, and installs only the pages the kernel itself
// touches before the process runs (private file pages, mapped memfds, the rseq area): from FAM once
// marked (LazyFromFAM), or as the source's socket brings them (LazyFromSocket).
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
