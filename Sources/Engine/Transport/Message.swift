// Why this file exists: the wire format between the source node and the target node. A frame is a u32
// little-endian payload length, then the payload: a u8 kind and the fields, written by BinaryWriter. The
// encoder is ours, so it asserts; the decoder reads the other node, which may be another version, broken
// or hostile: every length is checked against a limit before anything is allocated, and any bad byte
// throws `TransportError.malformed`, never traps.

/// One message between the nodes.
public enum Message: Equatable, Sendable {
    /// The handshake (SecureChannel.swift), in the clear: the migration mode (the caller's code), the
    /// generation, this node's nonce (`handshakeNonceByteCount` bytes) and its proof of the key (empty in
    /// the source's first hello, else `handshakeProofByteCount` bytes).
    case hello(mode: UInt8, generation: UInt64, nonce: [UInt8], proof: [UInt8])
    /// postcopy-socket: the process state blob and the page table (page-aligned, strictly increasing).
    case metadata(state: [UInt8], pageAddresses: [UInt64])
    /// postcopy-fam: the image's metadata is durable in FAM.
    case metadataCommitted(generation: UInt64)
    /// Target to source: a fault on a page that is not available yet.
    case pageRequest(address: UInt64)
    /// postcopy-socket: contiguous pages from `address`; a whole number of pages, at most 2 MiB.
    case pages(address: UInt64, bytes: [UInt8])
    /// postcopy-fam: the marks of these page slots are stored, flushed and fenced.
    case marked(slots: [UInt32])
    /// Every page dumped and the commit record durable (postcopy-fam), or every page sent (postcopy-socket).
    case complete(generation: UInt64)
    /// postcopy-socket, target to source: the bytes of `pages` messages the target has taken in so far
    /// (installed, or re-requested when they came too late). The source bounds what it pushes ahead of
    /// this, and lets the victim go once it covers every page.
    case received(pageByteCount: UInt64)
    case abort(reason: String)
    /// After the handshake, every message: the encoded message sealed with the channel's AEAD key
    /// (ciphertext and tag; the nonce is the frame's number, which both nodes count).
    case sealed(bytes: [UInt8])

    public static let handshakeNonceByteCount = 32
    public static let handshakeProofByteCount = 32
    public static let pageSize = ImageLayout.pageSize
    /// The most bytes one `pages` message carries.
    public static let maximumPagesByteCount = 2 << 20
    /// The most bytes of an `abort` reason; longer reasons are cut when encoded.
    public static let maximumStringByteCount = 4 << 10
    /// The most elements of an array field (page table entries, marked slots).
    public static let maximumArrayCount = 1 << 20
    /// The largest payload a frame may announce: a full `pages` or `marked` message and its fields.
    public static let maximumPayloadByteCount = (4 << 20) + 128
    /// The u32 length in front of every payload.
    public static let lengthPrefixByteCount = 4

    /// The kind byte that starts a payload.
    private enum Kind: UInt8 {
        case hello = 1, metadata, metadataCommitted, pageRequest, pages, marked, complete, abort, received, sealed
    }

    /// The kind's name, for errors and logs.
    public var kindName: String {
        switch self {
        case .hello: "hello"
        case .metadata: "metadata"
        case .metadataCommitted: "metadataCommitted"
        case .pageRequest: "pageRequest"
        case .pages: "pages"
        case .marked: "marked"
        case .complete: "complete"
        case .abort: "abort"
        case .received: "received"
        case .sealed: "sealed"
        }
    }

    /// The whole frame: length prefix, then payload. May exceed `maximumPayloadByteCount` (a huge page
    /// table): the transport refuses to send it with `messageTooLarge`, since the victim's size is input.
    public func encoded() -> [UInt8] {
        let payloadByteCount = self.payloadByteCount
        precondition(payloadByteCount <= Int(UInt32.max), "\(kindName) payload of \(payloadByteCount) bytes")
        var writer = BinaryWriter()
        writer.writeUInt32(UInt32(payloadByteCount))
        switch self {
        case .hello(let mode, let generation, let nonce, let proof):
            precondition(nonce.count == Self.handshakeNonceByteCount && (proof.isEmpty || proof.count == Self.handshakeProofByteCount),
                         "hello with a nonce of \(nonce.count) and a proof of \(proof.count) bytes")
            writer.writeUInt8(Kind.hello.rawValue)
            writer.writeUInt8(mode)
            writer.writeUInt64(generation)
            writer.writeBytes(nonce)
            writer.writeBytes(proof)
        case .metadata(let state, let pageAddresses):
            precondition(pageAddresses.allSatisfy(Self.isPageAligned), "metadata with an unaligned page address")
            precondition(zip(pageAddresses, pageAddresses.dropFirst()).allSatisfy { $0 < $1 }, "metadata with page addresses not increasing")
            writer.writeUInt8(Kind.metadata.rawValue)
            writer.writeBytes(state)
            writer.writeArray(pageAddresses) { $0.writeUInt64($1) }
        case .metadataCommitted(let generation):
            writer.writeUInt8(Kind.metadataCommitted.rawValue)
            writer.writeUInt64(generation)
        case .pageRequest(let address):
            precondition(Self.isPageAligned(address), "page request for unaligned 0x\(String(address, radix: 16))")
            writer.writeUInt8(Kind.pageRequest.rawValue)
            writer.writeUInt64(address)
        case .pages(let address, let bytes):
            precondition(Self.isPageAligned(address), "pages at unaligned 0x\(String(address, radix: 16))")
            precondition(!bytes.isEmpty && bytes.count % Self.pageSize == 0, "pages of \(bytes.count) bytes, not whole pages")
            precondition(bytes.count <= Self.maximumPagesByteCount, "pages of \(bytes.count) bytes, more than 2 MiB")
            writer.writeUInt8(Kind.pages.rawValue)
            writer.writeUInt64(address)
            writer.writeBytes(bytes)
        case .marked(let slots):
            writer.writeUInt8(Kind.marked.rawValue)
            writer.writeArray(slots) { $0.writeUInt32($1) }
        case .complete(let generation):
            writer.writeUInt8(Kind.complete.rawValue)
            writer.writeUInt64(generation)
        case .abort(let reason):
            writer.writeUInt8(Kind.abort.rawValue)
            writer.writeBytes(Self.truncatedUTF8(reason))
        case .received(let pageByteCount):
            writer.writeUInt8(Kind.received.rawValue)
            writer.writeUInt64(pageByteCount)
        case .sealed(let bytes):
            writer.writeUInt8(Kind.sealed.rawValue)
            writer.writeBytes(bytes)
        }
        // Paired with the length the decoder checks: the prefix must announce exactly what follows.
        precondition(writer.bytes.count == Self.lengthPrefixByteCount + payloadByteCount, "\(kindName) length prefix is wrong")
        return writer.bytes
    }

    /// Decodes one whole frame, length prefix included.
    public static func decode(_ frame: [UInt8]) throws(TransportError) -> Message {
        guard frame.count >= lengthPrefixByteCount else {
            throw .malformed("a frame of \(frame.count) bytes has no length prefix")
        }
        let announcedByteCount = Int(frame[0]) | Int(frame[1]) << 8 | Int(frame[2]) << 16 | Int(frame[3]) << 24
        guard announcedByteCount <= maximumPayloadByteCount else {
            throw .malformed("a frame announces \(announcedByteCount) payload bytes, the limit is \(maximumPayloadByteCount)")
        }
        guard announcedByteCount == frame.count - lengthPrefixByteCount else {
            throw .malformed("a frame announces \(announcedByteCount) payload bytes but carries \(frame.count - lengthPrefixByteCount)")
        }
        return try decode(payload: Array(frame[lengthPrefixByteCount...]))
    }

    /// Decodes a payload (what follows the length prefix).
    static func decode(payload: [UInt8]) throws(TransportError) -> Message {
        var reader = BinaryReader(payload)
        do {
            let kindByte = try reader.readUInt8()
            guard let kind = Kind(rawValue: kindByte) else { throw TransportError.malformed("unknown message kind \(kindByte)") }
            let message = try decodeFields(kind, from: &reader)
            try reader.expectEnd()
            return message
        } catch let error as TransportError {
            throw error
        } catch let error as ImageError {
            guard case .malformedMetadata(let reason) = error else { throw .malformed("\(error)") }
            throw .malformed(reason)
        } catch {
            throw .malformed("\(error)")
        }
    }

    private static func decodeFields(_ kind: Kind, from reader: inout BinaryReader) throws -> Message {
        switch kind {
        case .hello:
            let mode = try reader.readUInt8()
            let generation = try reader.readUInt64()
            let nonce = try reader.readBytes(maximumByteCount: handshakeNonceByteCount)
            let proof = try reader.readBytes(maximumByteCount: handshakeProofByteCount)
            guard nonce.count == handshakeNonceByteCount, proof.isEmpty || proof.count == handshakeProofByteCount else {
                throw TransportError.malformed("hello with a nonce of \(nonce.count) and a proof of \(proof.count) bytes")
            }
            return .hello(mode: mode, generation: generation, nonce: nonce, proof: proof)
        case .metadata:
            let state = try reader.readBytes(maximumByteCount: maximumPayloadByteCount)
            let pageAddresses = try reader.readArray(maximumCount: maximumArrayCount) { try $0.readUInt64() }
            for (slot, address) in pageAddresses.enumerated() {
                guard isPageAligned(address) else {
                    throw TransportError.malformed("page table entry \(slot) is 0x\(String(address, radix: 16)), not page-aligned")
                }
                // The target looks pages up by binary search: a repeated or falling entry would find the wrong slot.
                guard slot == 0 || pageAddresses[slot - 1] < address else {
                    throw TransportError.malformed("page table entry \(slot) is 0x\(String(address, radix: 16)), not above entry \(slot - 1)")
                }
            }
            return .metadata(state: state, pageAddresses: pageAddresses)
        case .metadataCommitted:
            return .metadataCommitted(generation: try reader.readUInt64())
        case .pageRequest:
            let address = try reader.readUInt64()
            guard isPageAligned(address) else {
                throw TransportError.malformed("page request for 0x\(String(address, radix: 16)), not page-aligned")
            }
            return .pageRequest(address: address)
        case .pages:
            let address = try reader.readUInt64()
            guard isPageAligned(address) else {
                throw TransportError.malformed("pages at 0x\(String(address, radix: 16)), not page-aligned")
            }
            let bytes = try reader.readBytes(maximumByteCount: maximumPagesByteCount)
            guard !bytes.isEmpty, bytes.count % pageSize == 0 else {
                throw TransportError.malformed("pages message of \(bytes.count) bytes, not a whole number of pages")
            }
            guard address <= UInt64.max - UInt64(bytes.count) + 1 else {
                throw TransportError.malformed("pages at 0x\(String(address, radix: 16)) run past the end of the address space")
            }
            return .pages(address: address, bytes: bytes)
        case .marked:
            return .marked(slots: try reader.readArray(maximumCount: maximumArrayCount) { try $0.readUInt32() })
        case .complete:
            return .complete(generation: try reader.readUInt64())
        case .abort:
            return .abort(reason: try reader.readString(maximumByteCount: maximumStringByteCount))
        case .received:
            return .received(pageByteCount: try reader.readUInt64())
        case .sealed:
            return .sealed(bytes: try reader.readBytes(maximumByteCount: maximumPayloadByteCount))
        }
    }

    private var payloadByteCount: Int {
        let kindByteCount = 1
        return switch self {
        case .hello(_, _, let nonce, let proof): kindByteCount + 1 + 8 + 4 + nonce.count + 4 + proof.count
        case .metadata(let state, let pageAddresses): kindByteCount + 4 + state.count + 4 + 8 * pageAddresses.count
        case .metadataCommitted, .pageRequest, .complete, .received: kindByteCount + 8
        case .pages(_, let bytes): kindByteCount + 8 + 4 + bytes.count
        case .marked(let slots): kindByteCount + 4 + 4 * slots.count
        case .abort(let reason): kindByteCount + 4 + Self.truncatedUTF8(reason).count
        case .sealed(let bytes): kindByteCount + 4 + bytes.count
        }
    }

    private static func isPageAligned(_ address: UInt64) -> Bool { address % UInt64(pageSize) == 0 }

    /// The reason's UTF-8, cut at a character boundary to fit `maximumStringByteCount`: an abort caused by
    /// a long error chain must still reach the peer, not trap here.
    private static func truncatedUTF8(_ text: String) -> [UInt8] {
        let utf8 = Array(text.utf8)
        guard utf8.count > maximumStringByteCount else { return utf8 }
        var endIndex = maximumStringByteCount
        // Step back over continuation bytes (top bits 10) so the cut lands before a character's first byte.
        while endIndex > 0, utf8[endIndex] & 0xC0 == 0x80 { endIndex -= 1 }
        return Array(utf8[..<endIndex])
    }
}
