// The transport between the source node and the target node: every message over a real loopback TCP
// connection, frames cut at every byte, malformed and hostile input (always TransportError.malformed,
// never a trap), a peer that goes away, and endpoint parsing. Blocking work runs on Foundation threads,
// not on Swift's cooperative pool, which a blocked poll would starve.
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
@testable import Engine
import Sys

@Suite struct TransportTests {
    // MARK: Helpers

    /// A thread for one side of a connection; `join` waits for it and rethrows what it threw.
    final class SideThread: Sendable {
        private let finished = DispatchSemaphore(value: 0)
        private let failure = Mutex<(any Error)?>(nil)

        static func start(_ body: @escaping @Sendable () throws -> Void) -> SideThread {
            let side = SideThread()
            Thread { side.run(body) }.start()
            return side
        }

        private func run(_ body: () throws -> Void) {
            do { try body() } catch { failure.withLock { $0 = error } }
            finished.signal()
        }

        func join(timeoutSeconds: Int = 30) throws {
            guard finished.wait(timeout: .now() + .seconds(timeoutSeconds)) == .success else {
                throw TransportError.malformed("test thread did not finish within \(timeoutSeconds) s")
            }
            if let error = failure.withLock({ $0 }) { throw error }
        }
    }

    /// A connected pair over 127.0.0.1: (the side that connected, the side that accepted).
    static func connectedPair() throws -> (client: TCPTransport, server: TCPTransport) {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        #expect(listener.endpoint.port != 0)
        let client = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5_000)
        guard let server = try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000) else {
            throw TransportError.malformed("no connection accepted on \(listener.endpoint)")
        }
        return (client, server)
    }

    /// Receives `count` messages, waiting at most `timeoutSeconds` in all.
    static func receive(_ count: Int, from transport: some Transport, timeoutSeconds: Int = 30) throws -> [Message] {
        var messages: [Message] = []
        let deadline = ContinuousClock.now + .seconds(timeoutSeconds)
        while messages.count < count, ContinuousClock.now < deadline {
            if let message = try transport.receive() { messages.append(message); continue }
            _ = transport.waitReadable(timeoutMilliseconds: 100)
        }
        return messages
    }

    /// Deterministic bytes: a different pattern per seed.
    static func pattern(byteCount: Int, seed: UInt8) -> [UInt8] {
        (0..<byteCount).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 9) &+ Int(seed) &* 17) }
    }

    /// Every case, with edge values; the first `pages` has `largePagesByteCount` bytes.
    static func sampleMessages(largePagesByteCount: Int) -> [Message] {
        [
            .hello(mode: 2, generation: 0xDEAD_BEEF_0000_0001, nonce: [UInt8](repeating: 7, count: 32), proof: []),
            .metadata(state: pattern(byteCount: 1_000, seed: 1), pageAddresses: [0x40_0000, 0x40_1000, 0x7fff_ffff_f000]),
            .metadata(state: [], pageAddresses: []),
            .metadataCommitted(generation: 7),
            .pageRequest(address: 0x7fff_ffff_e000),
            .pages(address: 0x40_0000, bytes: pattern(byteCount: largePagesByteCount, seed: 2)),
            .pages(address: 0, bytes: pattern(byteCount: 4096, seed: 3)),
            .marked(slots: [0, 1, 5, UInt32.max]),
            .marked(slots: []),
            .complete(generation: UInt64.max),
            .received(pageByteCount: 0),
            .received(pageByteCount: 512 << 20),
            .abort(reason: "dumper: ptrace(PTRACE_INTERRUPT): No such process — victim gone ✓"),
            .abort(reason: ""),
        ]
    }

    /// The TransportError `body` threw, or nil.
    static func caught(_ body: () throws -> Void) -> TransportError? {
        do {
            try body()
            return nil
        } catch let error as TransportError {
            return error
        } catch {
            Issue.record("not a TransportError: \(error)")
            return nil
        }
    }

    static func isMalformed(_ error: TransportError?) -> Bool {
        if case .malformed = error { return true }
        return false
    }

    /// A frame around `payload`, announcing `announcedByteCount` (default: the true size).
    static func frame(_ payload: [UInt8], announcing announcedByteCount: UInt32? = nil) -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt32(announcedByteCount ?? UInt32(payload.count))
        writer.writeRawBytes(payload)
        return writer.bytes
    }

    static func payload(kind: UInt8, _ write: (inout BinaryWriter) -> Void = { _ in }) -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt8(kind)
        write(&writer)
        return writer.bytes
    }

    // MARK: Over a real connection

    @Test func everyMessageRoundTripsOverLoopback() throws {
        let (client, server) = try Self.connectedPair()
        defer { client.close(); server.close() }
        let messages = Self.sampleMessages(largePagesByteCount: Message.maximumPagesByteCount)
        // The 2 MiB message cannot arrive in one read: the receive chunk is smaller.
        #expect(TCPTransport.receiveChunkByteCount < Message.maximumPagesByteCount)

        let sender = SideThread.start { for message in messages { try client.send(message) } }
        let received = try Self.receive(messages.count, from: server)
        try sender.join()
        #expect(received == messages)

        // And back: the target's page request reaches the source.
        try server.send(.pageRequest(address: 0x1000))
        #expect(try Self.receive(1, from: client) == [.pageRequest(address: 0x1000)])

        let wireByteCount = messages.reduce(0) { $0 + $1.encoded().count }
        #expect(client.bytesSent == wireByteCount)
        #expect(server.bytesReceived == wireByteCount)
        #expect(try server.receive() == nil)
    }

    @Test func largePagesMessageReassemblesFromDribbledPieces() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let rawClient = try TCPSocket.connect(host: "127.0.0.1", port: listener.endpoint.port, timeoutMilliseconds: 5_000)
        defer { rawClient.close() }
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000))
        defer { server.close() }

        let message = Message.pages(address: 0x7f00_0000_0000, bytes: Self.pattern(byteCount: Message.maximumPagesByteCount, seed: 9))
        let frame = message.encoded()
        // Odd-sized pieces with pauses, so frames boundaries never line up with reads.
        let sender = SideThread.start {
            var pieceIndex = 0
            for startIndex in stride(from: 0, to: frame.count, by: 4093) {
                try rawClient.send(Array(frame[startIndex..<min(startIndex + 4093, frame.count)]))
                pieceIndex += 1
                if pieceIndex % 64 == 0 { usleep(2_000) }
            }
        }
        var partialObservationCount = 0
        var received: Message?
        let deadline = ContinuousClock.now + .seconds(30)
        while received == nil, ContinuousClock.now < deadline {
            received = try server.receive()
            if received == nil, server.bytesReceived > 0 { partialObservationCount += 1 }
            if received == nil { _ = server.waitReadable(timeoutMilliseconds: 100) }
        }
        try sender.join()
        #expect(received == message)
        #expect(partialObservationCount > 0, "the frame arrived in one piece; the test did not exercise reassembly")
        #expect(server.bytesReceived == frame.count)
    }

    @Test func concurrentSendersNeverInterleaveFrames() throws {
        let (client, server) = try Self.connectedPair()
        defer { client.close(); server.close() }
        let senderCount = 4
        let messagesPerSender = 150
        let senders = (0..<senderCount).map { senderIndex in
            SideThread.start {
                for messageIndex in 0..<messagesPerSender {
                    let address = UInt64(senderIndex) << 32 | UInt64(messageIndex) << 12
                    try client.send(messageIndex % 2 == 0
                        ? .pages(address: address, bytes: Self.pattern(byteCount: 4096 * (1 + messageIndex % 3), seed: UInt8(senderIndex)))
                        : .pageRequest(address: address))
                }
            }
        }
        let received = try Self.receive(senderCount * messagesPerSender, from: server)
        for sender in senders { try sender.join() }
        #expect(received.count == senderCount * messagesPerSender)
        // Each sender's messages arrive whole and in its order.
        var nextMessageIndexBySender = [Int](repeating: 0, count: senderCount)
        for message in received {
            let address: UInt64
            switch message {
            case .pages(let pagesAddress, let bytes):
                address = pagesAddress
                let senderIndex = Int(address >> 32), messageIndex = Int(address >> 12 & 0xFFFFF)
                #expect(bytes == Self.pattern(byteCount: 4096 * (1 + messageIndex % 3), seed: UInt8(senderIndex)))
            case .pageRequest(let requestAddress):
                address = requestAddress
            default:
                Issue.record("unexpected \(message)")
                continue
            }
            let senderIndex = Int(address >> 32)
            #expect(Int(address >> 12 & 0xFFFFF) == nextMessageIndexBySender[senderIndex])
            nextMessageIndexBySender[senderIndex] += 1
        }
    }

    @Test func waitReadableSeesASecondFrameAlreadyBuffered() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let rawClient = try TCPSocket.connect(host: "127.0.0.1", port: listener.endpoint.port, timeoutMilliseconds: 5_000)
        defer { rawClient.close() }
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000))
        defer { server.close() }

        // Both frames in one send: one read takes both, and the socket has nothing left to poll for.
        try rawClient.send(Message.marked(slots: [1, 2]).encoded() + Message.complete(generation: 3).encoded())
        #expect(server.waitReadable(timeoutMilliseconds: 5_000))
        #expect(try server.receive() == .marked(slots: [1, 2]))
        #expect(server.waitReadable(timeoutMilliseconds: 0))
        #expect(try server.receive() == .complete(generation: 3))
        #expect(!server.waitReadable(timeoutMilliseconds: 0))
        #expect(try server.receive() == nil)
    }

    @Test func oversizedMessageIsRefusedBeforeTheWire() throws {
        let (client, server) = try Self.connectedPair()
        defer { client.close(); server.close() }
        let pageAddresses = (0..<600_000).map { UInt64($0) << 12 }
        let error = Self.caught { try client.send(.metadata(state: [], pageAddresses: pageAddresses)) }
        guard case .messageTooLarge(kind: "metadata", let payloadByteCount) = error else {
            Issue.record("expected messageTooLarge, got \(String(describing: error))")
            return
        }
        #expect(payloadByteCount > Message.maximumPayloadByteCount)
        #expect(client.bytesSent == 0)
    }

    // MARK: Peer close and local close

    @Test func peerCloseComesAfterTheMessagesSentBeforeIt() throws {
        let (client, server) = try Self.connectedPair()
        defer { server.close() }
        try client.send(.complete(generation: 5))
        client.close()
        #expect(try Self.receive(1, from: server) == [.complete(generation: 5)])
        #expect(server.waitReadable(timeoutMilliseconds: 5_000))
        #expect(Self.caught { _ = try server.receive() } == .peerClosed)
        // It stays closed.
        #expect(Self.caught { _ = try server.receive() } == .peerClosed)
    }

    @Test func peerClosingMidFrameIsPeerClosed() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let rawClient = try TCPSocket.connect(host: "127.0.0.1", port: listener.endpoint.port, timeoutMilliseconds: 5_000)
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000))
        defer { server.close() }
        let frame = Message.pageRequest(address: 0x2000).encoded()
        try rawClient.send(Array(frame[..<7]))
        rawClient.close()
        #expect(server.waitReadable(timeoutMilliseconds: 5_000))
        #expect(Self.caught { _ = try server.receive() } == .peerClosed)
    }

    @Test func sendingToAClosedPeerIsPeerClosed() throws {
        let (client, server) = try Self.connectedPair()
        defer { client.close() }
        server.close()
        // The first sends may still fit the kernel's buffer; the peer's reset fails a later one.
        var error: TransportError?
        for _ in 0..<200 where error == nil {
            error = Self.caught { try client.send(.pageRequest(address: 0x3000)) }
            usleep(5_000)
        }
        #expect(error == .peerClosed)
    }

    @Test func closedTransportRefusesUseAndWakesAWaiter() throws {
        let (client, server) = try Self.connectedPair()
        defer { client.close() }
        let waitStart = ContinuousClock.now
        let waiter = SideThread.start { _ = server.waitReadable(timeoutMilliseconds: 20_000) }
        usleep(100_000)
        server.close()
        try waiter.join()
        #expect(ContinuousClock.now - waitStart < .seconds(10), "close did not wake waitReadable")
        server.close()
        #expect(server.waitReadable(timeoutMilliseconds: 0))
        #expect(Self.caught { _ = try server.receive() } == .closed)
        #expect(Self.caught { try server.send(.complete(generation: 1)) } == .closed)
    }

    // MARK: Connecting

    @Test func connectRetriesUntilTheListenerStarts() throws {
        // A free port: take one, let it go, and listen on it again a little later.
        let probe = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = probe.endpoint
        probe.close()
        let listenerSide = SideThread.start {
            usleep(300_000)
            let listener = try TCPTransport.listen(on: endpoint)
            defer { listener.close() }
            let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 10_000))
            defer { server.close() }
            try server.send(.hello(mode: 1, generation: 9, nonce: [UInt8](repeating: 7, count: 32), proof: []))
            _ = try Self.receive(1, from: server)
        }
        let client = try TCPTransport.connect(host: endpoint.host, port: endpoint.port, timeoutMilliseconds: 10_000)
        defer { client.close() }
        #expect(try Self.receive(1, from: client) == [.hello(mode: 1, generation: 9, nonce: [UInt8](repeating: 7, count: 32), proof: [])])
        try client.send(.hello(mode: 1, generation: 9, nonce: [UInt8](repeating: 7, count: 32), proof: []))
        try listenerSide.join()
    }

    @Test func connectWithoutListenerFailsAfterItsTimeout() throws {
        let probe = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = probe.endpoint
        probe.close()
        let start = ContinuousClock.now
        let error = Self.caught { _ = try TCPTransport.connect(to: endpoint, timeoutMilliseconds: 200) }
        #expect(ContinuousClock.now - start >= .milliseconds(190))
        guard case .cannotConnect(endpoint, let syscallError) = error else {
            Issue.record("expected cannotConnect, got \(String(describing: error))")
            return
        }
        #expect(syscallError.errno.rawValue == ECONNREFUSED)
        #expect(error?.description.contains("start the other node's listener first") == true)
    }

    @Test func acceptTimesOutWithNil() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        #expect(try TCPTransport.accept(on: listener, timeoutMilliseconds: 50) == nil)
    }

    @Test func listenOnAnAddressOfNoInterfaceFails() {
        for host in ["192.0.2.1", "not-an-address"] {
            let endpoint = Endpoint(host: host, port: 0)
            let error = Self.caught { _ = try TCPTransport.listen(on: endpoint) }
            guard case .cannotListen(endpoint, _) = error else {
                Issue.record("listen on \(host): expected cannotListen, got \(String(describing: error))")
                continue
            }
        }
    }

    // MARK: Framing without a socket

    @Test func framesSplitAtEveryByteBoundaryDecode() throws {
        for message in Self.sampleMessages(largePagesByteCount: 8192) {
            let frame = message.encoded()
            #expect(try Message.decode(frame) == message)
            for splitIndex in 0...frame.count {
                var assembler = FrameAssembler()
                assembler.append(frame[..<splitIndex])
                if splitIndex < frame.count { #expect(try assembler.nextMessage() == nil, "\(message.kindName) cut at \(splitIndex)") }
                assembler.append(frame[splitIndex...])
                #expect(try assembler.nextMessage() == message, "\(message.kindName) cut at \(splitIndex)")
                #expect(assembler.bufferedByteCount == 0)
            }
        }
    }

    @Test func streamFedOneByteAtATimeDecodesInOrder() throws {
        let messages = Self.sampleMessages(largePagesByteCount: 64 << 10)
        let stream = messages.flatMap { $0.encoded() }
        var assembler = FrameAssembler()
        var received: [Message] = []
        for byte in stream {
            assembler.append(CollectionOfOne(byte))
            if let message = try assembler.nextMessage() { received.append(message) }
        }
        #expect(received == messages)
        #expect(assembler.bufferedByteCount == 0)
    }

    @Test func abortReasonIsCutToTheLimitAtACharacterBoundary() throws {
        let reason = String(repeating: "é", count: 3_000)  // 6,000 bytes of 2-byte characters
        guard case .abort(let decodedReason) = try Message.decode(Message.abort(reason: reason).encoded()) else {
            Issue.record("abort did not decode as abort")
            return
        }
        #expect(decodedReason.utf8.count == Message.maximumStringByteCount)
        #expect(reason.hasPrefix(decodedReason))
    }

    // MARK: Malformed input

    /// Frames each decoder must refuse, by name.
    static let malformedFrames: [(String, [UInt8])] = {
        let hugeLength = UInt32(Message.maximumPayloadByteCount + 1)
        return [
            ("length too big", frame([], announcing: hugeLength)),
            ("length 4 GiB", frame([1, 2, 3], announcing: UInt32.max)),
            ("empty payload", frame([])),
            ("unknown kind", frame(payload(kind: 0xEE))),
            ("kind zero", frame(payload(kind: 0))),
            ("truncated hello", frame(payload(kind: 1) { $0.writeUInt8(2); $0.writeUInt32(7) })),
            ("trailing bytes", frame(payload(kind: 7) { $0.writeUInt64(1); $0.writeUInt8(0) })),
            ("unaligned page request", frame(payload(kind: 4) { $0.writeUInt64(0x1001) })),
            ("unaligned pages", frame(payload(kind: 5) { $0.writeUInt64(0x10); $0.writeBytes([UInt8](repeating: 0, count: 4096)) })),
            ("unaligned page table entry", frame(payload(kind: 2) { $0.writeBytes([]); $0.writeArray([0x1000, 0x2008] as [UInt64]) { $0.writeUInt64($1) } })),
            ("pages not whole pages", frame(payload(kind: 5) { $0.writeUInt64(0x1000); $0.writeBytes([UInt8](repeating: 0, count: 100)) })),
            ("no pages", frame(payload(kind: 5) { $0.writeUInt64(0x1000); $0.writeBytes([]) })),
            ("pages over 2 MiB", frame(payload(kind: 5) { $0.writeUInt64(0x1000); $0.writeUInt32(UInt32(Message.maximumPagesByteCount + 4096)) })),
            ("truncated pages", frame(payload(kind: 5) { $0.writeUInt64(0x1000); $0.writeUInt32(4096); $0.writeRawBytes([UInt8](repeating: 0, count: 100)) })),
            ("pages past the address space", frame(payload(kind: 5) { $0.writeUInt64(0xFFFF_FFFF_FFFF_F000); $0.writeBytes([UInt8](repeating: 0, count: 8192)) })),
            ("string too long", frame(payload(kind: 8) { $0.writeBytes([UInt8](repeating: 0x41, count: Message.maximumStringByteCount + 1)) })),
            ("string not UTF-8", frame(payload(kind: 8) { $0.writeBytes([0x41, 0xFF, 0xFE]) })),
            ("array count too big", frame(payload(kind: 6) { $0.writeUInt32(UInt32(Message.maximumArrayCount + 1)) })),
            ("array count 4 G", frame(payload(kind: 2) { $0.writeBytes([]); $0.writeUInt32(UInt32.max) })),
            ("array shorter than its count", frame(payload(kind: 6) { $0.writeUInt32(3); $0.writeUInt32(1) })),
            ("state longer than the frame", frame(payload(kind: 2) { $0.writeUInt32(1_000) })),
        ]
    }()

    @Test func malformedFramesAreRefusedByBothDecoders() {
        for (name, frame) in Self.malformedFrames {
            #expect(Self.isMalformed(Self.caught { _ = try Message.decode(frame) }), "decode: \(name)")
            var assembler = FrameAssembler()
            assembler.append(frame)
            #expect(Self.isMalformed(Self.caught { _ = try assembler.nextMessage() }), "assembler: \(name)")
        }
        let validFrame = Message.complete(generation: 1).encoded()
        #expect(Self.isMalformed(Self.caught { _ = try Message.decode(Array(validFrame.dropLast())) }), "frame shorter than announced")
        #expect(Self.isMalformed(Self.caught { _ = try Message.decode([1, 0]) }), "no length prefix")
    }

    @Test func badLengthIsSeenFromItsFourBytesAndPoisonsTheStream() {
        var assembler = FrameAssembler()
        assembler.append(Self.frame([], announcing: UInt32(Message.maximumPayloadByteCount + 1)))
        #expect(assembler.hasFrameOrFailure)
        #expect(Self.isMalformed(Self.caught { _ = try assembler.nextMessage() }))
        // The frame boundaries are lost: a valid frame after it is not trusted either.
        assembler.append(Message.complete(generation: 1).encoded())
        #expect(Self.isMalformed(Self.caught { _ = try assembler.nextMessage() }))
    }

    @Test func malformedFrameOverTCPIsMalformed() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let rawClient = try TCPSocket.connect(host: "127.0.0.1", port: listener.endpoint.port, timeoutMilliseconds: 5_000)
        defer { rawClient.close() }
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5_000))
        defer { server.close() }
        try rawClient.send(Self.frame(Self.payload(kind: 4) { $0.writeUInt64(0x1001) }))
        #expect(server.waitReadable(timeoutMilliseconds: 5_000))
        #expect(Self.isMalformed(Self.caught { _ = try server.receive() }))
    }

    /// Mutated and random frames: decoding returns a message or throws malformed, and never traps
    /// (a trap would end the whole test run).
    @Test func mutatedFramesNeverTrap() {
        var state: UInt64 = 0x5EED_0F_7A45
        func nextRandom() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var mixed = state
            mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
            mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
            return mixed ^ (mixed >> 31)
        }
        let frames = Self.sampleMessages(largePagesByteCount: 4096).map { $0.encoded() }
        var decodedCount = 0
        for _ in 0..<20_000 {
            var frame = frames[Int(nextRandom() % UInt64(frames.count))]
            switch nextRandom() % 4 {
            case 0: frame[Int(nextRandom() % UInt64(frame.count))] ^= UInt8(truncatingIfNeeded: nextRandom() | 1)
            case 1: frame.removeLast(Int(nextRandom() % UInt64(frame.count)))
            case 2: frame.append(contentsOf: (0..<(nextRandom() % 16)).map { _ in UInt8(truncatingIfNeeded: nextRandom()) })
            default: frame = (0..<(nextRandom() % 64)).map { _ in UInt8(truncatingIfNeeded: nextRandom()) }
            }
            if (try? Message.decode(frame)) != nil { decodedCount += 1 }
            var assembler = FrameAssembler()
            assembler.append(frame)
            _ = try? assembler.nextMessage()
        }
        // Some mutations (a flipped generation byte) stay valid; most do not.
        #expect(decodedCount > 0)
        #expect(decodedCount < 20_000)
    }

    // MARK: Endpoints

    @Test(arguments: [("127.0.0.1:7000", "127.0.0.1", UInt16(7000)), ("10.77.0.2:65535", "10.77.0.2", 65535), ("0.0.0.0:1", "0.0.0.0", 1)])
    func endpointParses(text: String, host: String, port: UInt16) throws {
        let endpoint = try Endpoint(parsing: text)
        #expect(endpoint == Endpoint(host: host, port: port))
        #expect(endpoint.description == text)
    }

    @Test(arguments: ["nohost", "1.2.3.4:99999", ":1", "1.2.3.4:", "1.2.3.4:0", "1.2.3.4:+80", "1.2.3.4:8o", "256.1.1.1:80",
                      "1.2.3:80", "1.2.3.4.5:80", "01.2.3.4:80", "1..3.4:80", "localhost:80", "1.2.3.4:80:90", ""])
    func endpointRejects(text: String) {
        let error = Self.caught { _ = try Endpoint(parsing: text) }
        guard case .badEndpoint(text, _) = error else {
            Issue.record("\"\(text)\": expected badEndpoint, got \(String(describing: error))")
            return
        }
        #expect(error?.description.contains("IPV4:PORT") == true)
    }
}
