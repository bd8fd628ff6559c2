// Why this file exists: the sealed channel (SecureChannel.swift) is what stands between the nodes and
// whoever is on the wire, so its receiving side is a fuzz target of its own. An input is a byte stream
// of outer frames as the source node would send them after the handshake (corpus: transcripts sealed
// under the corpus key and two fixed nonces). Two kinds of mutation: anyone's (any byte of the stream
// changed, without the key) and an insider's (one frame's plaintext changed, then sealed with the key,
// so the decoder behind the seal is reached). The oracle, one for both: every message the target side
// accepts, sealed again by a fresh source side, gives exactly the input's frame at that position (so
// nothing is accepted that the key holder did not seal there, and what opens decodes to one value);
// once a frame is refused, every later receive is refused too (the channel stays poisoned).
import Engine
import Sys

public enum ChannelFuzz {
    static let sourceNonce = (0..<Message.handshakeNonceByteCount).map { UInt8($0) }
    static let targetNonce = (0..<Message.handshakeNonceByteCount).map { UInt8(0xFF - $0) }

    /// Both ends of a fresh channel under the corpus key, over `source` and `target`.
    static func pair(source: any Transport, target: any Transport) -> (source: SecureTransport, target: SecureTransport) {
        SecureChannel.sealedPair(source: source, target: target, key: Fuzzer.corpusKey, sourceNonce: sourceNonce, targetNonce: targetNonce)
    }

    /// The wire bytes of `messages` sent by the source side of a fresh channel (a corpus transcript).
    public static func transcript(_ messages: [Message]) throws(TransportError) -> [UInt8] {
        let wire = QueueTransport()
        let channel = pair(source: wire, target: QueueTransport())
        for message in messages { try channel.source.send(message) }
        return wire.sent.flatMap { $0.encoded() }
    }

    /// The outer frames of a stream, up to its first bad frame.
    static func outerFrames(_ bytes: [UInt8]) -> [Message] {
        var assembler = FrameAssembler()
        assembler.append(bytes)
        var frames: [Message] = []
        // Each frame takes at least its length prefix: a bound on the loop.
        for _ in 0...(bytes.count / Message.lengthPrefixByteCount + 1) {
            guard let frame = try? assembler.nextMessage() else { break }
            frames.append(frame)
        }
        return frames
    }

    /// An insider's input: frame `random`'s plaintext (opened with the key) mutated, every frame sealed again.
    static func insiderMutation(of bytes: [UInt8], mutator: FuzzMutator, random: inout FuzzRandom) -> [UInt8] {
        let frames = outerFrames(bytes)
        let opener = pair(source: QueueTransport(), target: QueueTransport(frames))
        var plaintexts: [[UInt8]] = []
        while let message = try? opener.target.receive() { plaintexts.append(message.encoded()) }
        guard !plaintexts.isEmpty else { return bytes }
        let changed = random.below(plaintexts.count)
        plaintexts[changed] = mutator.mutated(plaintexts[changed], other: plaintexts[random.below(plaintexts.count)], random: &random)
        let sealer = pair(source: QueueTransport(), target: QueueTransport())
        return plaintexts.flatMap { sealer.source.sealedFrame(plaintext: $0).encoded() }
    }

    static func check(_ bytes: [UInt8]) -> FuzzVerdict {
        let frames = outerFrames(bytes)
        let receiver = pair(source: QueueTransport(), target: QueueTransport(frames)).target
        var accepted: [Message] = []
        var refused = false
        for _ in 0...frames.count {
            do {
                guard let message = try receiver.receive() else { break }
                accepted.append(message)
            } catch {
                refused = true
                break
            }
        }
        if refused {
            for _ in 0..<2 where (try? receiver.receive()) != nil { return .broken("a channel that refused a frame accepted a later one") }
        }
        let resealer = QueueTransport()
        let source = pair(source: resealer, target: QueueTransport()).source
        for message in accepted {
            do { try source.send(message) } catch { return .broken("an accepted \(message.kindName) cannot be sent again: \(error)") }
        }
        guard resealer.sent == Array(frames.prefix(accepted.count)) else {
            return .broken("the channel accepted a frame the key holder did not seal at that position (\(accepted.count) accepted)")
        }
        return refused || accepted.count < frames.count ? .refused : .accepted
    }
}

/// A transport that hands out the frames it was given, then nothing, and keeps what is sent.
final class QueueTransport: Transport, @unchecked Sendable {
    private var incoming: [Message]
    private var nextIndex = 0
    private(set) var sent: [Message] = []
    init(_ incoming: [Message] = []) { self.incoming = incoming }
    func send(_ message: Message) throws(TransportError) { sent.append(message) }
    func receive() throws(TransportError) -> Message? {
        guard nextIndex < incoming.count else { return nil }
        nextIndex += 1
        return incoming[nextIndex - 1]
    }
    func waitReadable(timeoutMilliseconds: Int32) -> Bool { nextIndex < incoming.count }
    var readableDescriptor: Int32? { nil }
    func close() {}
    var bytesSent: Int { 0 }
    var bytesReceived: Int { 0 }
}
