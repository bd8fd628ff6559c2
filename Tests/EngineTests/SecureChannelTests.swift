// The authenticated, sealed channel between the nodes (SecureChannel.swift), over real loopback TCP and
// over a queue pair whose frames a test can change: the key holder gets through, no one else; every
// frame changed, replayed or reordered on the wire is refused; and `fammig source` refuses a first
// connection that cannot prove the key while the real target still migrates the process.
import Engine
import Foundation
import Synchronization
import Sys
import Testing

/// Two transports joined by queues; `tap` sees (and may change) every frame on its way.
final class QueueTransport: Transport, @unchecked Sendable {
    private let lock = Lock()
    private var inbox: [Message] = []
    private var closed = false
    weak var peer: QueueTransport?
    var tap: ((Message) -> [Message])?

    static func pair() -> (QueueTransport, QueueTransport) {
        let a = QueueTransport()
        let b = QueueTransport()
        a.peer = b
        b.peer = a
        return (a, b)
    }

    func send(_ message: Message) throws(TransportError) {
        guard let peer else { throw .peerClosed }
        let delivered = tap?(message) ?? [message]
        peer.lock.withLock { peer.inbox += delivered }
    }
    func receive() throws(TransportError) -> Message? {
        try lock.withLock { () throws(TransportError) -> Message? in
            if !inbox.isEmpty { return inbox.removeFirst() }
            if closed { throw .peerClosed }
            return nil
        }
    }
    func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        for _ in 0..<max(1, Int(timeoutMilliseconds)) {
            if lock.withLock({ !inbox.isEmpty || closed }) { return true }
            OSThread.sleep(for: .milliseconds(1))
        }
        return false
    }
    var readableDescriptor: Int32? { nil }
    func close() { peer?.lock.withLock { peer?.closed = true } }
    var bytesSent: Int { 0 }
    var bytesReceived: Int { 0 }
}

@Suite struct SecureChannelTests {
    let agreement = ChannelAgreement(mode: .postcopySocket, generation: 1)

    /// Runs the two handshakes at once: the source's on a thread, the target's here.
    func handshake(source: any Transport, target: any Transport, sourceKey: MigrationKey, targetKey: MigrationKey,
                   sourceAgreement: ChannelAgreement? = nil, timeout: Int32 = 3000)
        -> (source: Result<SecureTransport, TransportError>, target: Result<SecureTransport, TransportError>) {
        final class Box: @unchecked Sendable { var result: Result<SecureTransport, TransportError>? }
        let box = Box()
        let agreement = self.agreement
        let thread = try! OSThread(name: "test-source") {
            box.result = Result { () throws(TransportError) in
                try SecureChannel.establish(over: source, role: .source, key: sourceKey, agreement: sourceAgreement ?? agreement,
                                            nonce: SecureChannel.randomNonce(), timeoutMilliseconds: timeout)
            }
        }
        let target = Result { () throws(TransportError) in
            try SecureChannel.establish(over: target, role: .target, key: targetKey, agreement: agreement,
                                        nonce: SecureChannel.randomNonce(), timeoutMilliseconds: timeout)
        }
        thread.join()
        return (box.result!, target)
    }

    func receive(_ transport: any Transport) throws -> Message? {
        for _ in 0..<2000 {
            if let message = try transport.receive() { return message }
            _ = transport.waitReadable(timeoutMilliseconds: 1)
        }
        return nil
    }

    @Test func theKeyHoldersTalkOverTCPAndNothingTravelsInTheClear() throws {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let client = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 2000)
        let server = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 2000))
        let key = MigrationKey.generate()
        let (source, target) = handshake(source: server, target: client, sourceKey: key, targetKey: key)
        let sourceChannel = try source.get()
        let targetChannel = try target.get()
        let page = [UInt8](repeating: 0x5A, count: 4 * Message.pageSize)
        try sourceChannel.send(.pages(address: 0x7000_0000, bytes: page))
        try targetChannel.send(.pageRequest(address: 0x1000))
        #expect(try receive(targetChannel) == .pages(address: 0x7000_0000, bytes: page))
        #expect(try receive(sourceChannel) == .pageRequest(address: 0x1000))
        sourceChannel.close()
        targetChannel.close()
    }

    @Test func anotherKeyIsRefusedOnBothSides() {
        let (a, b) = QueueTransport.pair()
        let (source, target) = handshake(source: a, target: b, sourceKey: MigrationKey.generate(), targetKey: MigrationKey.generate())
        guard case .failure(.refused(let why)) = source else { Issue.record("source: \(source)"); return }
        #expect(why.contains("target did not prove"))
        // The source never proved itself to a target that failed to: the target times out or is refused.
        guard case .failure(.refused) = target else { Issue.record("target: \(target)"); return }
    }

    @Test func anotherModeOrGenerationIsRefusedNamingIt() {
        let key = MigrationKey.generate()
        let (a, b) = QueueTransport.pair()
        let (_, target) = handshake(source: a, target: b, sourceKey: key, targetKey: key,
                                    sourceAgreement: ChannelAgreement(mode: .postcopyFAM, generation: 1), timeout: 500)
        guard case .failure(.refused(let why)) = target else { Issue.record("target: \(target)"); return }
        #expect(why.contains("postcopy-fam") && why.contains("postcopy-socket"))
        let (c, d) = QueueTransport.pair()
        let (_, other) = handshake(source: c, target: d, sourceKey: key, targetKey: key,
                                   sourceAgreement: ChannelAgreement(mode: .postcopySocket, generation: 2), timeout: 500)
        guard case .failure(.refused(let reason)) = other else { Issue.record("target: \(other)"); return }
        #expect(reason.contains("generation 2"))
    }

    /// Both nodes leave the handshake with one image identity, fresh per handshake: the source writes it
    /// into the image and the target refuses an image without it (ImageTests.anImageOfAnotherMigrationIsRefused).
    @Test func bothNodesAgreeOnTheImageIdentityAndEachMigrationHasItsOwn() throws {
        let key = MigrationKey.generate()
        var identities: [[UInt8]] = []
        for _ in 0..<2 {
            let (a, b) = QueueTransport.pair()
            let (source, target) = handshake(source: a, target: b, sourceKey: key, targetKey: key)
            let sourceIdentity = try source.get().imageIdentity
            #expect(try target.get().imageIdentity == sourceIdentity)
            #expect(sourceIdentity.count == ImageLayout.imageIdentityByteCount && sourceIdentity.contains { $0 != 0 })
            identities.append(sourceIdentity)
        }
        #expect(identities[0] != identities[1])
    }

    @Test func aSilentPeerIsRefusedAtTheDeadline() {
        let (a, _) = QueueTransport.pair()
        #expect(throws: TransportError.self) {
            try SecureChannel.establish(over: a, role: .target, key: MigrationKey.generate(), agreement: agreement,
                                        nonce: SecureChannel.randomNonce(), timeoutMilliseconds: 200)
        }
    }

    enum Meddling: CaseIterable { case flipBit, replay, swap, unsealed }

    @Test(arguments: Meddling.allCases)
    func aFrameChangedOnTheWireIsRefusedAndPoisonsTheChannel(_ meddling: Meddling) throws {
        let key = MigrationKey.generate()
        let (a, b) = QueueTransport.pair()
        let (source, target) = handshake(source: a, target: b, sourceKey: key, targetKey: key)
        let sourceChannel = try source.get()
        let targetChannel = try target.get()
        var held: Message?
        a.tap = { message in
            guard case .sealed(var bytes) = message else { return [message] }
            switch meddling {
            case .flipBit:
                bytes[bytes.count / 2] ^= 0x10
                return [.sealed(bytes: bytes)]
            case .replay:
                return [message, message]
            case .swap:
                if let first = held { held = nil; return [message, first] }
                held = message
                return []
            case .unsealed:
                return [.complete(generation: 1)]
            }
        }
        try sourceChannel.send(.pageRequest(address: 0x1000))
        try sourceChannel.send(.pageRequest(address: 0x2000))
        var received: [Message] = []
        var refusal: TransportError?
        do {
            while let message = try receive(targetChannel) { received.append(message) }
        } catch { refusal = error as? TransportError }
        if meddling == .replay { #expect(received == [.pageRequest(address: 0x1000)]) } else { #expect(received.isEmpty) }
        guard case .malformed = refusal else { Issue.record("\(meddling): \(String(describing: refusal))"); return }
        // Poisoned: nothing more is read, whatever comes.
        #expect(throws: TransportError.self) { try targetChannel.receive() }
    }
}
