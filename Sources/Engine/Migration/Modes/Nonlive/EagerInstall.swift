// nonlive's target strategy: every page of the committed image, checked, before the process runs.
import Logging
import Sys

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
