// postcopy-fam's source strategy: the background dump into FAM, requested pages first.
import Logging
import Sys

/// postcopy-fam: one step dumps either every requested page (then fences their marks and tells the target)
/// or the next background batch of pages not dumped yet (copied in one step, sealed in the next).
final class PostcopyFAMDump: PostcopySource, SourcePageStrategy {
    func writeMetadata(_ dumper: Dumper, state: ProcessState, metadata: [UInt8]) throws(EngineError) {
        let timeline = dumper.timeline
        // Marked before the metadata commit, so a target finds them there at once instead of asking for
        // them and waiting for this node within its downtime.
        let early = dumper.splitByProcess(Dumper.slotsNeededBeforeResume(state, pageAddresses: dumper.pageAddresses))
        try dumper.createImage(metadata: metadata) { (writer) throws(SyscallError) in
            for (processID, run) in early { try writer.dumpPages(processID: processID, slots: run) }
            timeline.add(early.reduce(0) { $0 + $1.slots.count }, to: "pagesDumped")
        }
        do { try link.send(.metadataCommitted(generation: dumper.generation)) } catch {
            throw .aborted("telling the target the metadata is committed: \(error)")
        }
    }

    func waitingWhileDumping(_ dumper: Dumper) -> NextAction? { nil }

    func sealed(_ dumper: Dumper, slots: Range<Int>) -> DumpProgress {
        dumper.writer!.markedPageCount == dumper.pageAddresses.count ? .done : .stay
    }

    /// Background batches are small (64 pages) so that a request waits for at most one of them.
    func dump(_ dumper: Dumper, nextSlot: Int) throws(EngineError) -> DumpProgress {
        let backgroundBatchPageCount = min(dumper.batchPageCount, 64)
        let pageCount = dumper.pageAddresses.count
        try receiveRequests(dumper)
        let requested = prioritySlots.filter { !dumper.writer!.isMarked(slot: $0) }
        prioritySlots.removeAll()
        do {
            if !requested.isEmpty {
                // A tree's requests are pages of several processes: each read from its own.
                try dumper.writer!.dumpPagesMarkedNow(dumper.splitByProcess(Set(requested).sorted().map { $0..<($0 + 1) }))
                try? link.send(.marked(slots: Set(requested).sorted().map { UInt32($0) }))
                dumper.timeline.add(Set(requested).count, to: "pagesDumped")
            } else {
                while backgroundCursor < pageCount && dumper.writer!.isMarked(slot: backgroundCursor) { backgroundCursor += 1 }
                var end = backgroundCursor
                while end < pageCount && end - backgroundCursor < backgroundBatchPageCount && !dumper.writer!.isMarked(slot: end) { end += 1 }
                if end > backgroundCursor {
                    try dumper.copy(backgroundCursor..<end)
                    backgroundCursor = end
                }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .fam("dumping pages of pid \(dumper.victimProcessID): \(error)")
        }
        return dumper.writer!.markedPageCount == pageCount ? .done : .stay
    }
}
