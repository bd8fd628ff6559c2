// postcopy-socket's page server: pages the target asks for first, then pushed chunks within a window
// of acknowledgements: the Dumper's socket half.
import Logging
import Sys

extension Dumper {
    /// postcopy-socket: answers every request with its page, then (pushing, while the window allows)
    /// sends the next run of pages not sent yet, one chunk. Done when
    /// the target acknowledged every page, or says it needs no more.
    func servePages(transport: any Transport, push: Bool) throws(EngineError) {
        try receiveRequests(transport: transport)
        do {
            // A page asked for again was lost on the target's side (the process moved its memory while
            // it arrived): answer every request, sent before or not.
            for slot in Set(prioritySlots).sorted() {
                try send(slots: slot..<(slot + 1), transport: transport)
            }
            prioritySlots.removeAll()
            if push && !pushWindowIsFull {
                while backgroundCursor < sent.count && sent[backgroundCursor] { backgroundCursor += 1 }
                var end = backgroundCursor
                while end < sent.count && end - backgroundCursor < pushChunkPageCount && !sent[end]
                        && (end == backgroundCursor || pageAddresses[end] == pageAddresses[end - 1] + .pageSize) {
                    end += 1
                }
                if end > backgroundCursor { try send(slots: backgroundCursor..<end, transport: transport) }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("sending pages to the target: \(error)")
        }
        // Until the target took in every page, or says it needs nothing more: a page it lost (the
        // process moved its memory while the page arrived) is asked for again, even after every page
        // went out once.
        if targetDone || everyPageAcknowledged { state = .commit }
    }

    func send(slots: Range<Int>, transport: any Transport) throws {
        let bytes = try readProcessMemory(victimProcessID, address: pageAddresses[slots.lowerBound], byteCount: slots.count * .pageSize)
        try transport.send(.pages(address: pageAddresses[slots.lowerBound], bytes: bytes))
        sentPageByteCount += UInt64(bytes.count)
        logger.trace("reply sent", metadata: ["us": "\(nanoseconds(clock.now()) / 1000)"])
        for slot in slots where !sent[slot] {
            sent[slot] = true
            sentPageCount += 1
        }
        timeline.add(slots.count, to: "pagesDumped")
    }
}
