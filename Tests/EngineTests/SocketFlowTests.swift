// postcopy-socket's flow between the source and the target, seen from the target's end of a real TCP
// connection while the test steps the source's dumper itself: pushed pages stay inside a window of
// unacknowledged bytes (so a fault's answer never queues behind more than that), a request is answered
// even with the window full, push chunks grow with acknowledgements and halve on a request, and the
// frozen victim is released only once the last page is acknowledged.
import Engine
import Foundation
import Logging
import Sys
import Testing

/// The target's end: what arrived, in order.
private final class TargetEnd {
    let transport: TCPTransport
    var pageTable: [UInt64] = []
    var pushedSizes: [Int] = []
    var answered: [UInt64] = []
    var receivedPageBytes: UInt64 = 0
    var pagesSeen = Set<UInt64>()
    var sawComplete = false

    init(transport: TCPTransport) { self.transport = transport }

    /// Takes in what the source sent, waiting up to 200 ms for the first message.
    func drain(expectingAnswerTo request: UInt64? = nil) throws {
        var waited = false
        while transport.waitReadable(timeoutMilliseconds: waited ? 20 : 200) {
            waited = true
            guard let message = try transport.receive() else { continue }
            switch message {
            case .metadata(_, let addresses): pageTable = addresses
            case .pages(let address, let bytes):
                receivedPageBytes += UInt64(bytes.count)
                for index in 0..<(bytes.count / 4096) { pagesSeen.insert(address + UInt64(index) * 4096) }
                if address == request && bytes.count == 4096 { answered.append(address) } else { pushedSizes.append(bytes.count / 4096) }
            case .complete: sawComplete = true
            default: break
            }
        }
    }
}

extension ProcessTests {
    @Suite(.serialized) struct SocketFlowTests {
        @Test func pushStaysInItsWindowAnswersFaultsFirstAndReleasesTheVictimOnTheLastAcknowledgement() throws {
            let program = try TestPaths.testProgram("memwalk-static")
            let victim = try Spawn.program(path: program, arguments: ["--mib", "16", "--steps", "600000", "--pause-us", "20000"],
                                           environment: [], standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
            defer { Spawn.kill(victim); _ = try? Spawn.waitForExit(victim) }
            usleep(300_000)
            let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
            defer { listener.close() }
            let targetSide = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
            let sourceSide = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000))
            defer { targetSide.close(); sourceSide.close() }
            // One thread plays both ends: the source's sends of a full window (up to three 2 MiB chunks)
            // must fit in the kernel's buffers while the target end reads only between them (a loaded
            // machine's autotuned loopback buffers held less: the send stalled 30 s and timed out).
            try targetSide.reserveBuffers(byteCount: 16 << 20)
            try sourceSide.reserveBuffers(byteCount: 16 << 20)
            let dumper = try Migration.source(MigrationPlan(mode: .postcopySocket, push: true, key: testKey), victim: victim, ports: SourcePorts(
                makeBackend: { (_: Int) throws(ImageError) -> any FAMBackend in preconditionFailure("no FAM in socket mode") },
                transport: sourceSide, observer: nil, clock: MonotonicClock(), timeline: MigrationTimeline(),
                logger: Logger(label: "flow"))).dumper
            /// Steps the dumper until it waits (or finishes), giving messages in flight time to arrive.
            func stepUntilWaiting() throws {
                for _ in 0..<10_000 {
                    if case .ready = dumper.nextAction() { try dumper.perform(); continue }
                    usleep(2_000)
                    guard case .ready = dumper.nextAction() else { return }
                }
                Issue.record("the dumper never waited")
            }
            let target = TargetEnd(transport: targetSide)
            let windowLimit = UInt64(3 * 512 * 4096)

            // Nothing acknowledged: three minimum chunks (32 pages) at most, and the victim stays frozen.
            try stepUntilWaiting()
            try target.drain()
            let pageCount = target.pageTable.count
            try #require(pageCount > 4096, "a 16 MiB walk has more than 4096 pages: \(pageCount)")
            #expect(target.receivedPageBytes <= UInt64(3 * 32 * 4096), "pushed \(target.receivedPageBytes) bytes with nothing acknowledged")
            #expect(target.pushedSizes.allSatisfy { $0 <= 32 }, "\(target.pushedSizes)")

            // A fault with the window full is answered at once.
            let faulted = try #require(target.pageTable.last)
            try targetSide.send(.pageRequest(address: faulted))
            try stepUntilWaiting()
            try target.drain(expectingAnswerTo: faulted)
            #expect(target.answered == [faulted], "the request for \(hex(faulted)) was not answered with the window full")

            // Acknowledgements open the window and grow the chunks; a request halves them.
            var requestedMidway = false
            var sizesAfterRequest: [Int] = []
            var largestBeforeRequest = 0
            for _ in 0..<10_000 where target.pagesSeen.count < pageCount {
                let pushesBefore = target.pushedSizes.count
                try targetSide.send(.received(pageByteCount: target.receivedPageBytes))
                if !requestedMidway, (target.pushedSizes.max() ?? 0) >= 256 {
                    largestBeforeRequest = target.pushedSizes.max() ?? 0
                    let missing = try #require(target.pageTable.first { !target.pagesSeen.contains($0) })
                    try targetSide.send(.pageRequest(address: missing))
                    requestedMidway = true
                    try stepUntilWaiting()
                    try target.drain(expectingAnswerTo: missing)
                    sizesAfterRequest = Array(target.pushedSizes[pushesBefore...])
                    continue
                }
                try stepUntilWaiting()
                let acknowledged = target.receivedPageBytes
                try target.drain()
                #expect(target.receivedPageBytes - acknowledged <= windowLimit, "more than the window pushed past an acknowledgement")
            }
            #expect(target.pagesSeen.count == pageCount, "\(pageCount - target.pagesSeen.count) pages never came")
            #expect(target.pushedSizes.max() == 512, "push chunks never grew to 512 pages: \(Set(target.pushedSizes).sorted())")
            #expect(requestedMidway && !sizesAfterRequest.isEmpty && sizesAfterRequest.allSatisfy { $0 <= largestBeforeRequest / 2 },
                    "after a request, pushes of \(sizesAfterRequest) pages (\(largestBeforeRequest) before it)")

            // Every page out, the last not yet acknowledged: the victim is still held.
            try stepUntilWaiting()
            #expect(processLife(victim) == .running && !target.sawComplete, "the victim was let go before the last acknowledgement")
            try targetSide.send(.received(pageByteCount: target.receivedPageBytes))
            // The last acknowledgement: the source hands the process over (its `complete`) and holds the
            // victim until the target says it holds the process (its own two: nothing more needed, disarmed).
            try stepUntilWaiting()
            try target.drain()
            #expect(target.sawComplete, "the source did not hand the process over on the last acknowledgement")
            #expect(processLife(victim) == .running, "the victim was let go before the target said it holds the process")
            try targetSide.send(.complete(generation: 1))
            try targetSide.send(.complete(generation: 1))
            try stepUntilWaiting()
            #expect(dumper.nextAction() == .finished)
            // Killed and reaped by the dumper, which traced it.
            #expect(pollUntil(timeout: .seconds(5)) { processLife(victim) == .gone }, "the victim was not killed")
        }
    }
}
