// Why this file exists: the link between the nodes is untrusted (issue "trust boundaries"): whoever
// connects first to a source, or listens where a target connects, must get nothing and say nothing that
// counts. So before any state or page moves, both nodes prove that they hold the migration's key, with a
// nonce from each side (no replay of an old handshake), and agree on the mode and the generation; every
// frame after that is sealed with ChaCha20-Poly1305 under a key of its direction, derived from the
// migration key and both nonces (HKDF), its nonce the frame's number (no reorder, no replay, no drop
// goes unseen). All cryptography is swift-crypto's.
//
//   source → target  hello(mode, generation, nonce S, no proof)
//   target → source  hello(mode, generation, nonce T, HMAC(K, "target" S T mode generation))
//   source → target  hello(mode, generation, nonce S, HMAC(K, "source" S T mode generation))
//
// The target proves itself first, so a rogue listener learns nothing from the source; a source proves
// itself before the target uses anything it sends. Both proofs cover S, so both nodes leave with the same
// image identity (`imageIdentity`, derived from S: fresh per migration): the source writes it into the
// image, and the target refuses an image without it (another migration's, of the same key).
import Crypto
import Sys

public enum NodeRole: String, Sendable {
    case source, target
}

/// What the two nodes of a migration must agree on before anything moves.
public struct ChannelAgreement: Equatable, Sendable {
    public var mode: MigrationMode
    public var generation: UInt64
    public init(mode: MigrationMode, generation: UInt64) {
        self.mode = mode
        self.generation = generation
    }

    var modeCode: UInt8 { mode.wireCode }
}

public enum SecureChannel {
    /// How long a handshake may take before the peer is refused.
    public static let handshakeTimeoutMilliseconds: Int32 = 10_000

    /// A fresh handshake nonce from the system's cryptographic random source (only executables call
    /// this; the engine never reads randomness itself).
    public static func randomNonce() -> [UInt8] {
        var random = SystemRandomNumberGenerator()
        return (0..<Message.handshakeNonceByteCount).map { _ in UInt8.random(in: .min ... .max, using: &random) }
    }

    /// Runs the handshake over `transport` (blocking, at most `timeoutMilliseconds`) and returns the sealed
    /// channel. Throws `.refused` naming why when the peer does not prove the key or disagrees on mode or
    /// generation: the caller closes that connection (a source then waits for the next one).
    public static func establish(over transport: any Transport, role: NodeRole, key: MigrationKey, agreement: ChannelAgreement,
                                 nonce: [UInt8], timeoutMilliseconds: Int32 = handshakeTimeoutMilliseconds) throws(TransportError) -> SecureTransport {
        precondition(nonce.count == Message.handshakeNonceByteCount, "a handshake nonce of \(nonce.count) bytes")
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeoutMilliseconds))
        func next() throws(TransportError) -> (nonce: [UInt8], proof: [UInt8]) {
            // Ends at a message, the peer's close or an error, or the deadline.
            while true {
                let received: Message?
                do { received = try transport.receive() } catch .peerClosed {
                    throw .refused(role == .target
                        ? "the source closed the connection during the handshake: it did not accept this node's proof of the key (another key file, mode or generation)"
                        : "the peer closed the connection during the handshake")
                }
                if let message = received {
                    guard case .hello(let mode, let generation, let peerNonce, let proof) = message else {
                        throw .refused("the peer sent \(message.kindName) before proving that it holds the migration key")
                    }
                    guard mode == agreement.modeCode else {
                        let theirs = MigrationMode.allCases.first { $0.wireCode == mode }?.rawValue ?? "mode \(mode)"
                        throw .refused("the peer migrates \(theirs), this node \(agreement.mode.rawValue)")
                    }
                    guard generation == agreement.generation else {
                        throw .refused("the peer is at generation \(generation), this node at \(agreement.generation)")
                    }
                    return (peerNonce, proof)
                }
                let left = deadline - ContinuousClock.now
                guard left > .zero else { throw .refused("the peer did not complete the handshake within \(timeoutMilliseconds / 1000) s") }
                _ = transport.waitReadable(timeoutMilliseconds: Int32(max(1, min(left.components.seconds * 1000 + 1, 1000))))
            }
        }
        let proofKey = key.subkey("channel handshake")
        /// What a prover's code covers: who proves, both nonces, and what the nodes agree on.
        func transcript(_ prover: NodeRole, sourceNonce: [UInt8], targetNonce: [UInt8]) -> [UInt8] {
            var writer = BinaryWriter()
            writer.writeBytes(Array(prover.rawValue.utf8))
            writer.writeBytes(sourceNonce)
            writer.writeBytes(targetNonce)
            writer.writeUInt8(agreement.modeCode)
            writer.writeUInt64(agreement.generation)
            return writer.bytes
        }
        func proof(_ prover: NodeRole, sourceNonce: [UInt8], targetNonce: [UInt8]) -> [UInt8] {
            Array(HMAC<SHA256>.authenticationCode(for: transcript(prover, sourceNonce: sourceNonce, targetNonce: targetNonce), using: proofKey))
        }
        func verify(_ received: [UInt8], _ prover: NodeRole, sourceNonce: [UInt8], targetNonce: [UInt8]) throws(TransportError) {
            // swift-crypto's check of a code runs in constant time.
            guard HMAC<SHA256>.isValidAuthenticationCode(received, authenticating: transcript(prover, sourceNonce: sourceNonce, targetNonce: targetNonce),
                                                         using: proofKey) else {
                throw .refused("the \(prover.rawValue) did not prove that it holds this migration's key (another key file, or not a fammig node)")
            }
        }
        let sourceNonce: [UInt8]
        let targetNonce: [UInt8]
        switch role {
        case .source:
            sourceNonce = nonce
            try transport.send(.hello(mode: agreement.modeCode, generation: agreement.generation, nonce: nonce, proof: []))
            let answer = try next()
            targetNonce = answer.nonce
            try verify(answer.proof, .target, sourceNonce: sourceNonce, targetNonce: targetNonce)
            try transport.send(.hello(mode: agreement.modeCode, generation: agreement.generation, nonce: nonce,
                                      proof: proof(.source, sourceNonce: sourceNonce, targetNonce: targetNonce)))
        case .target:
            targetNonce = nonce
            let opening = try next()
            guard opening.proof.isEmpty else { throw .refused("the source's first hello carries a proof: not a fammig source of this version") }
            sourceNonce = opening.nonce
            try transport.send(.hello(mode: agreement.modeCode, generation: agreement.generation, nonce: nonce,
                                      proof: proof(.target, sourceNonce: sourceNonce, targetNonce: targetNonce)))
            let closing = try next()
            guard closing.nonce == sourceNonce else { throw .refused("the source changed its nonce within the handshake") }
            try verify(closing.proof, .source, sourceNonce: sourceNonce, targetNonce: targetNonce)
        }
        return sealed(transport, role: role, key: key, sourceNonce: sourceNonce, targetNonce: targetNonce)
    }

    /// The channel a handshake with these nonces leaves `role` with.
    static func sealed(_ transport: any Transport, role: NodeRole, key: MigrationKey, sourceNonce: [UInt8], targetNonce: [UInt8]) -> SecureTransport {
        func directionKey(_ from: NodeRole) -> SymmetricKey {
            HKDF<SHA256>.deriveKey(inputKeyMaterial: key.subkey("channel"), salt: sourceNonce + targetNonce,
                                   info: Array("fammig channel from \(from.rawValue)".utf8), outputByteCount: 32)
        }
        let other: NodeRole = role == .source ? .target : .source
        return SecureTransport(inner: transport, sendKey: directionKey(role), receiveKey: directionKey(other),
                               imageIdentity: imageIdentity(sourceNonce: sourceNonce))
    }

    /// The image identity a handshake with this source nonce agrees on (never all zeros, which is none).
    static func imageIdentity(sourceNonce: [UInt8]) -> [UInt8] {
        var identity = Array(SHA256.hash(data: Array("fammig image identity".utf8) + sourceNonce).prefix(ImageLayout.imageIdentityByteCount))
        if !identity.contains(where: { $0 != 0 }) { identity[0] = 1 }
        return identity
    }

    /// Both ends of one connection sealed as a handshake with these nonces would leave them, without the
    /// exchange: for torture's one-thread driver, which cannot run two blocking handshakes against each
    /// other (the handshake itself runs over TCP in every node command and in SecureChannelTests). Every
    /// frame after it is sealed, numbered and checked exactly as between two nodes.
    public static func sealedPair(source: any Transport, target: any Transport, key: MigrationKey,
                                  sourceNonce: [UInt8], targetNonce: [UInt8]) -> (source: SecureTransport, target: SecureTransport) {
        precondition(sourceNonce.count == Message.handshakeNonceByteCount && targetNonce.count == Message.handshakeNonceByteCount,
                     "handshake nonces of \(sourceNonce.count) and \(targetNonce.count) bytes")
        return (sealed(source, role: .source, key: key, sourceNonce: sourceNonce, targetNonce: targetNonce),
                sealed(target, role: .target, key: key, sourceNonce: sourceNonce, targetNonce: targetNonce))
    }
}

/// A transport whose every message is sealed (ChaCha20-Poly1305) under its direction's key, numbered.
/// A frame that does not open (changed, replayed, reordered, dropped before it, or from another key)
/// poisons the channel: `malformed`, and nothing more is read.
public final class SecureTransport: Transport, @unchecked Sendable {
    /// Which migration's image the two nodes agreed on (SecureChannel.imageIdentity): MigrationPlan's.
    public let imageIdentity: [UInt8]
    private let inner: any Transport
    private let sendKey: SymmetricKey
    private let receiveKey: SymmetricKey
    /// Guards `sentCount` and keeps numbering and sending one step (several threads send).
    private let sendLock = Lock()
    private var sentCount: UInt64 = 0
    /// Read by the one receiving thread only.
    private var receivedCount: UInt64 = 0
    private var poisoned: TransportError?
    /// A sealed frame carries the inner frame, the tag, and its own kind and length.
    static let overheadByteCount = 64

    init(inner: any Transport, sendKey: SymmetricKey, receiveKey: SymmetricKey, imageIdentity: [UInt8]) {
        self.imageIdentity = imageIdentity
        self.inner = inner
        self.sendKey = sendKey
        self.receiveKey = receiveKey
    }

    private static func nonce(_ count: UInt64) -> ChaChaPoly.Nonce {
        try! ChaChaPoly.Nonce(data: nonceBytes(count))  // 12 bytes: always a valid nonce
    }

    private static func nonceBytes(_ count: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 12)
        for index in 0..<8 { bytes[index] = UInt8(truncatingIfNeeded: count >> (8 * UInt64(index))) }
        return bytes
    }

    public func send(_ message: Message) throws(TransportError) {
        let frame = message.encoded()
        guard frame.count + Self.overheadByteCount <= Message.maximumPayloadByteCount else {
            throw .messageTooLarge(kind: message.kindName, payloadByteCount: frame.count - Message.lengthPrefixByteCount)
        }
        try sendLock.withLock { () throws(TransportError) in
            let sealed: ChaChaPoly.SealedBox
            do { sealed = try ChaChaPoly.seal(frame, using: sendKey, nonce: Self.nonce(sentCount)) } catch {
                throw .malformed("sealing a \(message.kindName) frame failed: \(error)")
            }
            sentCount += 1
            try inner.send(.sealed(bytes: Array(sealed.ciphertext) + Array(sealed.tag)))
        }
    }

    /// The next frame this side would send for `plaintext`, which need not be a valid message: the fuzzer's
    /// insider, who holds the key and seals what it likes. Numbered like `send`; nothing is sent.
    package func sealedFrame(plaintext: [UInt8]) -> Message {
        sendLock.withLock {
            let sealed = try! ChaChaPoly.seal(plaintext, using: sendKey, nonce: Self.nonce(sentCount))  // a 32-byte key, a 12-byte nonce
            sentCount += 1
            return .sealed(bytes: Array(sealed.ciphertext) + Array(sealed.tag))
        }
    }

    public func receive() throws(TransportError) -> Message? {
        if let poisoned { throw poisoned }
        guard let outer = try inner.receive() else { return nil }
        do throws(TransportError) {
            guard case .sealed(let bytes) = outer else { throw .malformed("an unsealed \(outer.kindName) frame after the handshake") }
            guard bytes.count >= 16 else { throw .malformed("a sealed frame of \(bytes.count) bytes has no tag") }
            let plain: [UInt8]
            do {
                // One contiguous nonce + ciphertext + tag: SealedBox(nonce:ciphertext:tag:) joins its parts
                // with Data's generic `+`, byte by byte (3.4 % of a socket-mode profile).
                var combined = Self.nonceBytes(receivedCount)
                combined.reserveCapacity(12 + bytes.count)
                combined.append(contentsOf: bytes)
                let box = try ChaChaPoly.SealedBox(combined: combined)
                plain = Array(try ChaChaPoly.open(box, using: receiveKey))
            } catch {
                throw .malformed("frame \(receivedCount) does not open under this migration's channel key (changed, replayed, reordered or forged)")
            }
            receivedCount += 1
            return try Message.decode(plain)
        } catch {
            poisoned = error
            throw error
        }
    }

    public func waitReadable(timeoutMilliseconds: Int32) -> Bool { poisoned != nil || inner.waitReadable(timeoutMilliseconds: timeoutMilliseconds) }
    public var readableDescriptor: Int32? { inner.readableDescriptor }
    public func close() { inner.close() }
    public var bytesSent: Int { inner.bytesSent }
    public var bytesReceived: Int { inner.bytesReceived }
}

extension SecureChannel {
    /// Both ends of one in-process connection (`fammig run`, `bench`, chaos): the two handshakes run at
    /// once, the source's on a thread of its own.
    public static func establishBoth(source: any Transport, target: any Transport, key: MigrationKey,
                                     agreement: ChannelAgreement) throws(TransportError) -> (source: SecureTransport, target: SecureTransport) {
        final class Outcome: @unchecked Sendable { var result: Result<SecureTransport, TransportError>? }
        let outcome = Outcome()
        let sourceNonce = randomNonce()
        let thread: OSThread
        do {
            thread = try OSThread(name: "fammig-handshake") {
                do throws(TransportError) {
                    outcome.result = .success(try establish(over: source, role: .source, key: key, agreement: agreement, nonce: sourceNonce))
                } catch {
                    outcome.result = .failure(error)
                }
            }
        } catch { throw .system(error) }
        let targetSide = Result { () throws(TransportError) in
            try establish(over: target, role: .target, key: key, agreement: agreement, nonce: randomNonce())
        }
        thread.join()
        let sourceSide = try outcome.result!.get()
        return (sourceSide, try targetSide.get())
    }
}
