// postcopy-socket's source strategy, the page server: the state goes over the link, then the pages the
// target asks for first, and pushed chunks within a window of acknowledgements.
import Logging
import Sys

final class SocketPageServer: PostcopySource, SourcePageStrategy {
    let push: Bool
    let batchPageCount: Int
    /// Which pages went over the socket.
    var sent: [Bool] = []
    var sentPageCount = 0
    /// Pages per push message: doubles with every acknowledgement that comes while no request does, and
    /// halves with every step that brings requests (while the target faults, its answers must not queue
    /// behind big pushes; under a steady stream of faults it settles where the two balance, instead of
    /// starving the push); growing only on acknowledgements keeps it at what the target takes in.
    lazy var pushChunkPageCount = minimumPushChunkPageCount
    var minimumPushChunkPageCount: Int { min(32, batchPageCount) }
    /// Pushing stops while more than this is unacknowledged, so an answer to a fault never waits behind
    /// more than that in the connection. Three chunks in flight: one being installed, one on the wire,
    /// one being read from the victim.
    var pushWindowByteCount: UInt64 { UInt64(3 * pushChunkPageCount * .pageSize) }
    /// Full when one more chunk would not fit.
    var pushWindowIsFull: Bool {
        sentPageByteCount - acknowledgedPageByteCount + UInt64(pushChunkPageCount * .pageSize) > pushWindowByteCount
    }

    init(transport: any Transport, push: Bool, batchPageCount: Int) {
        self.push = push
        self.batchPageCount = batchPageCount
        super.init(transport: transport)
    }

    override var usesFAM: Bool { false }

    override func requestsTaken(requestArrived: Bool, acknowledgementAdvanced: Bool, batchPageCount: Int) {
        if requestArrived {
            pushChunkPageCount = max(minimumPushChunkPageCount, pushChunkPageCount / 2)
        } else if acknowledgementAdvanced {
            pushChunkPageCount = min(2 * pushChunkPageCount, batchPageCount)
        }
    }

    func writeMetadata(_ dumper: Dumper, state: ProcessState, metadata: [UInt8]) throws(EngineError) {
        do { try link.send(.metadata(state: metadata, pageAddresses: dumper.pageAddresses)) } catch {
            throw .aborted("sending the process state to the target: \(error)")
        }
        sent = [Bool](repeating: false, count: dumper.pageAddresses.count)
        dumper.timeline.record(.metadataCommitted, at: dumper.clock.now())
        lastHeard = dumper.clock.now()
    }

    /// Waiting on the target (nothing asked, nothing more to push) for longer than the stall timeout.
    func stalled(_ dumper: Dumper) -> Bool { dumper.clock.now() - lastHeard > dumper.stallTimeout }

    func waitingForHandOver(_ dumper: Dumper) -> NextAction? {
        guard targetCompleteCount < 2, !linkEnded, !stalled(dumper), !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        guard let descriptor = link.readableDescriptor else { return .waiting(.retryAfter(.microseconds(100))) }
        return .waiting(.readable([descriptor], timeout: .milliseconds(5)))
    }

    func handedOver(_ dumper: Dumper) throws(EngineError) -> Bool {
        try receiveRequests(dumper)
        if targetCompleteCount >= 2 { return true }
        let leftStopped = "pid \(dumper.victimProcessID) is left stopped: if the target's restored process runs, kill -9 \(dumper.victimProcessID); "
            + "otherwise let it run on with kill -CONT \(dumper.victimProcessID)"
        if linkEnded {
            let how: String
            if case .malformed? = linkEnding { how = "the channel from the target was refused (\(linkEnding!))" } else { how = "the target went away" }
            throw .aborted("\(how) after it was handed the process, before it said it holds it; \(leftStopped)")
        }
        if stalled(dumper) {
            throw .stalled("the target did not say it holds the process within \(dumper.stallTimeout) of being handed it; \(leftStopped)")
        }
        return false
    }

    /// Without pushing (or with every page pushed), a socket source only answers: wait for the target's
    /// next request, or its word that it needs nothing more.
    func waitingWhileDumping(_ dumper: Dumper) -> NextAction? {
        guard prioritySlots.isEmpty, !everyPageAcknowledged, !push || sentPageCount == sent.count || pushWindowIsFull,
              !stalled(dumper), !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        guard let descriptor = link.readableDescriptor else { return .waiting(.retryAfter(.microseconds(100))) }
        return .waiting(.readable([descriptor], timeout: .milliseconds(5)))
    }

    /// Every page went out and the target took in every byte sent: nothing it could still ask for (a
    /// page it lost is asked for before it acknowledges the message that brought it).
    var everyPageAcknowledged: Bool {
        sentPageCount == sent.count && acknowledgedPageByteCount == sentPageByteCount && prioritySlots.isEmpty
    }

    func sealed(_ dumper: Dumper, slots: Range<Int>) -> DumpProgress { .stay }

    /// Answers every request with its page, then (pushing, while the window allows) sends the next run of
    /// pages not sent yet, one chunk. Done when the target acknowledged every page, or says it needs no more.
    func dump(_ dumper: Dumper, nextSlot: Int) throws(EngineError) -> DumpProgress {
        try receiveRequests(dumper)
        let waitsOnTarget = prioritySlots.isEmpty && !everyPageAcknowledged && !targetDone
            && (!push || sentPageCount == sent.count || pushWindowIsFull)
        if waitsOnTarget && stalled(dumper) {
            throw .stalled("the target took in nothing and asked for nothing for \(dumper.stallTimeout) "
                            + "(\(acknowledgedPageByteCount) of \(sentPageByteCount) page bytes sent acknowledged)")
        }
        do {
            // A page asked for again was lost on the target's side (the process moved its memory while
            // it arrived): answer every request, sent before or not.
            for slot in Set(prioritySlots).sorted() {
                try send(dumper, slots: slot..<(slot + 1))
            }
            prioritySlots.removeAll()
            if push && !pushWindowIsFull {
                let pageAddresses = dumper.pageAddresses
                while backgroundCursor < sent.count && sent[backgroundCursor] { backgroundCursor += 1 }
                var end = backgroundCursor
                while end < sent.count && end - backgroundCursor < pushChunkPageCount && !sent[end]
                        && (end == backgroundCursor || pageAddresses[end] == pageAddresses[end - 1] + .pageSize) {
                    end += 1
                }
                if end > backgroundCursor { try send(dumper, slots: backgroundCursor..<end) }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("sending pages to the target: \(error)")
        }
        // Until the target took in every page, or says it needs nothing more: a page it lost (the
        // process moved its memory while the page arrived) is asked for again, even after every page
        // went out once.
        return targetDone || everyPageAcknowledged ? .done : .stay
    }

    func send(_ dumper: Dumper, slots: Range<Int>) throws {
        let address = dumper.pageAddresses[slots.lowerBound]
        // A tree's slots are one process's (runs end where the ordinal changes: tagged addresses jump).
        let bytes = try readProcessMemory(dumper.sourceProcessID(slot: slots.lowerBound), address: TreePageAddress.address(of: address),
                                          byteCount: slots.count * .pageSize)
        try link.send(.pages(address: address, bytes: bytes))
        sentPageByteCount += UInt64(bytes.count)
        dumper.logger.trace("reply sent", metadata: ["us": "\(nanoseconds(dumper.clock.now()) / 1000)"])
        for slot in slots where !sent[slot] {
            sent[slot] = true
            sentPageCount += 1
        }
        dumper.timeline.add(slots.count, to: "pagesDumped")
    }
}
