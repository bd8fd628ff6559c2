// Why this file exists: the target's one seam between the restorer's lifecycle (Restorer: image, spawn,
// layout, pages, state, prepare, resume) and what a mode does with the pages. A mode is one strategy in
// this folder: the eager install of a committed image (below), or the lazy handover to the fault handler
// and the pusher, from FAM or from the socket (LazyHandover). A fourth mode is a fourth strategy.
import Logging
import Sys

/// What one mode does with the restored process's pages. Called by the restorer only, on its thread.
protocol TargetPageStrategy: AnyObject {
    /// The link to the source, if the mode has one.
    var transport: (any Transport)? { get }
    /// The link the process state comes over (postcopy-socket), instead of an image in FAM.
    var stateLink: (any Transport)? { get }
    /// Whether the image must be complete before the restore opens it (else the metadata commit is enough).
    var needsCompleteImage: Bool { get }
    /// Whether a process tree may be restored.
    var restoresTrees: Bool { get }
    /// While no image is there: whether the source spoke first (it refused the victim, or hung up).
    var sourceSpokeFirst: Bool { get }
    /// Reads that word: an abort names the source's reason.
    func readSourceWord() throws(EngineError)
    /// Whether what the restore starts from is there.
    func imageAvailable(_ restorer: Restorer) -> Bool
    /// Once the layout is built: the restorer's next state (pages to install, or the handover made).
    func pagesAfterLayout(_ restorer: Restorer) throws(EngineError) -> Restorer.State
    /// Eager: installs the batch from `nextSlot`; returns the next state.
    func installBatch(_ restorer: Restorer, from nextSlot: Int) throws(EngineError) -> Restorer.State
    /// Lazy: why installing the pages needed before the resume would change nothing now (nil: ready).
    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction?
    /// Lazy: installs what it can of the pages needed before the resume; true once all are in.
    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool
    /// Before the rest of the state is restored: the pages' end (eager: every page in, userfaultfd gone).
    func finishPagesBeforeState(_ restorer: Restorer) throws(RestoreError)
}

/// nonlive: waits for the commit, opens and verifies the whole image, and installs every page in batches
/// (each batch's checked copy loaded one batch ahead) before the rest of the state.
final class EagerInstall: TargetPageStrategy {
    /// The next batch's checked copy, under way while this batch is installed.
    var verificationAhead: PendingVerifiedPages?

    var transport: (any Transport)? { nil }
    var stateLink: (any Transport)? { nil }
    var needsCompleteImage: Bool { true }
    var restoresTrees: Bool { true }
    var sourceSpokeFirst: Bool { false }
    func readSourceWord() throws(EngineError) {}

    func imageAvailable(_ restorer: Restorer) -> Bool {
        guard let backend = try? restorer.openBackend(), let imageState = ImageReader.peekState(backend: backend) else { return false }
        return imageState == .complete || imageState == .aborted
    }

    func pagesAfterLayout(_ restorer: Restorer) throws(EngineError) -> Restorer.State {
        restorer.pageAddresses.isEmpty ? .restoreState : .installing(nextSlot: 0)
    }

    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction? { nil }
    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool { true }

    func finishPagesBeforeState(_ restorer: Restorer) throws(RestoreError) {
        precondition(restorer.installedPageCount == restorer.pageAddresses.count,
                     "\(restorer.pageAddresses.count - restorer.installedPageCount) dumped pages not installed")
        restorer.timeline.record(.lastPageInstalled, at: restorer.clock.now())
        try restorer.target!.finishInstalling()
    }

    func installBatch(_ restorer: Restorer, from nextSlot: Int) throws(EngineError) -> Restorer.State {
        guard let pageCount = restorer.reader?.pageCount else { preconditionFailure("pages before the image was opened") }
        let batchPageCount = restorer.batchPageCount
        let slots = nextSlot..<min(nextSlot + batchPageCount, pageCount)
        // Each page against its mark digest, from the one copy that is installed (invariants 3 and 4: its
        // mark observed, nothing used that does not verify, and nothing installed that was not verified);
        // a corrupted page stops the restore, and the target is killed.
        let pages: [UInt8]
        do throws(ImageError) {
            let verification: PendingVerifiedPages
            if let ahead = verificationAhead, ahead.slots == slots { verification = ahead } else { verification = try Self.startVerifying(&restorer.reader!, slots) }
            verificationAhead = nil
            pages = try verification.finish()
            // The next batch is loaded and digested (on a thread of the real backend) while this one is installed.
            let next = slots.upperBound..<min(slots.upperBound + batchPageCount, pageCount)
            if !next.isEmpty { verificationAhead = try Self.startVerifying(&restorer.reader!, next) }
        } catch { throw .image(error) }
        let reader = restorer.reader!
        // Write runs of pages that are adjacent in the victim with one call each.
        var runStart = slots.lowerBound
        for slot in slots {
            let runEnds = slot + 1 == slots.upperBound
                || reader.pageAddresses[slot + 1] != reader.pageAddresses[slot] + UInt64(ImageLayout.pageSize)
            guard runEnds else { continue }
            do {
                let byteCount = (slot + 1 - runStart) * ImageLayout.pageSize
                let newlyInstalled = try restorer.target!.writePages(pages, offset: (runStart - slots.lowerBound) * ImageLayout.pageSize,
                                                                     byteCount: byteCount, to: reader.pageAddresses[runStart])
                // Every page of the run is in: copied, or written over a page found present.
                precondition(newlyInstalled == slot + 1 - runStart, "page run at \(hex(reader.pageAddresses[runStart])) not wholly installed")
            } catch { throw .restore(error) }
            runStart = slot + 1
        }
        restorer.installedPageCount += slots.count
        return slots.upperBound == pageCount ? .restoreState : .installing(nextSlot: slots.upperBound)
    }

    /// Observes each slot's mark, then starts digesting the pages against them.
    static func startVerifying(_ reader: inout ImageReader, _ slots: Range<Int>) throws(ImageError) -> PendingVerifiedPages {
        for slot in slots {
            guard reader.isMarked(slot: slot) else { throw .pageNotMarked(path: reader.path, slot: slot, address: reader.pageAddresses[slot]) }
        }
        return try reader.startVerifiedPages(slots: slots)
    }
}
