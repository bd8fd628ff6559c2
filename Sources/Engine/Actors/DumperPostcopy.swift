// Why this file exists: the source's post-copy side of the dumper, apart from its lifecycle: which pages a
// post-copy target needs before it resumes, the target's page requests, and the background dump that
// serves them first.
import Logging
import Sys

extension Dumper {
    // MARK: Post-copy

    /// Runs of slots a post-copy target installs before it resumes (LazyMemory's rule, seen from the
    /// source): pages outside the memory it registers lazily (private file pages, which userfaultfd
    /// cannot register on ext4), memfd pages, and the rseq areas the kernel writes at registration. A
    /// hint: the target still asks for any such page that is not marked when it looks.
    static func slotsNeededBeforeResume(_ state: ProcessState, pageAddresses: [UInt64]) -> [Range<Int>] {
        var ranges: [Range<UInt64>] = []
        for mapping in state.mappings {
            switch mapping.kind {
            case .anonymous where !mapping.shared, .heap where !mapping.shared, .stack where !mapping.shared: continue
            case .sharedMemory(let object) where object.memfdName == nil: continue
            default: ranges.append(mapping.start..<mapping.end)
            }
        }
        for rseq in state.threads.compactMap(\.rseq) {
            let firstPage = rseq.address & ~UInt64(ImageLayout.pageSize - 1)
            ranges.append(firstPage..<((rseq.address + UInt64(max(rseq.byteCount, 1)) + UInt64(ImageLayout.pageSize) - 1) & ~UInt64(ImageLayout.pageSize - 1)))
        }
        var runs: [Range<Int>] = []
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            // pageAddresses is sorted: the slots of a range are one run.
            let first = firstSlot(notBelow: range.lowerBound, in: pageAddresses)
            let end = firstSlot(notBelow: range.upperBound, in: pageAddresses)
            guard first < end else { continue }
            if let last = runs.last, last.upperBound >= first {
                runs[runs.count - 1] = last.lowerBound..<max(last.upperBound, end)
            } else {
                runs.append(first..<end)
            }
        }
        return runs
    }

    /// At most this many frames are taken off the transport per step, so a peer that floods requests
    /// cannot keep the dumper from its own work; the rest wait for the next step.
    static let maximumFramesPerStep = 1 << 12

    /// Takes the target's page requests off the transport (without waiting).
    func receiveRequests(transport: any Transport) throws(EngineError) {
        var requestArrived = false
        var acknowledgementAdvanced = false
        defer {
            if requestArrived {
                pushChunkPageCount = max(minimumPushChunkPageCount, pushChunkPageCount / 2)
            } else if acknowledgementAdvanced {
                pushChunkPageCount = min(2 * pushChunkPageCount, batchPageCount)
            }
        }
        for _ in 0..<Self.maximumFramesPerStep {
            let message: Message?
            do { message = try transport.receive() } catch {
                if targetDone { return }
                throw .aborted("the target node went away: \(error)")
            }
            guard let message else { return }
            switch message {
            case .pageRequest(let address):
                logger.trace("request arrived", metadata: ["address": "\(hex(address))", "us": "\(nanoseconds(clock.now()) / 1000)"])
                guard let slot = slot(for: address) else {
                    throw .aborted("the target asked for page \(hex(address)), which the victim never touched")
                }
                prioritySlots.append(slot)
                requestArrived = true
            case .received(let pageByteCount):
                guard pageByteCount <= sentPageByteCount else {
                    throw .aborted("the target acknowledged \(pageByteCount) bytes of pages, more than the \(sentPageByteCount) sent")
                }
                if pageByteCount > acknowledgedPageByteCount { acknowledgementAdvanced = true }
                acknowledgedPageByteCount = max(acknowledgedPageByteCount, pageByteCount)
            case .complete:
                targetDone = true
            case .abort(let reason):
                throw .aborted("the target aborted: \(reason)")
            default:
                logger.debug("dumper ignores \(message)")
            }
        }
    }

    func slot(for address: UInt64) -> Int? {
        slotIndex(of: address, in: pageAddresses)
    }

    /// postcopy-fam: one step dumps either every requested page (then fences their marks and tells the
    /// target) or the next background batch of pages not dumped yet.
    /// Background batches are small (64 pages) so that a request waits for at most one of them.
    func dumpPostcopy(transport: any Transport, backgroundBatchPageCount: Int) throws(EngineError) {
        try receiveRequests(transport: transport)
        let requested = prioritySlots.filter { !writer!.isMarked(slot: $0) }
        prioritySlots.removeAll()
        do {
            if !requested.isEmpty {
                try writer!.dumpPagesMarkedNow(processID: victimProcessID, slots: Set(requested).sorted().map { $0..<($0 + 1) })
                try? transport.send(.marked(slots: Set(requested).sorted().map { UInt32($0) }))
                timeline.add(Set(requested).count, to: "pagesDumped")
            } else {
                while backgroundCursor < pageAddresses.count && writer!.isMarked(slot: backgroundCursor) { backgroundCursor += 1 }
                var end = backgroundCursor
                while end < pageAddresses.count && end - backgroundCursor < backgroundBatchPageCount && !writer!.isMarked(slot: end) { end += 1 }
                if end > backgroundCursor {
                    try copy(backgroundCursor..<end)
                    backgroundCursor = end
                }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .fam("dumping pages of pid \(victimProcessID): \(error)")
        }
        if writer!.markedPageCount == pageAddresses.count { state = .commit }
    }
}
