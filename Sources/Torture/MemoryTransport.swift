// Why this file exists: the transport torture swaps in for TCP (DESIGN.md §4). Each node holds one
// endpoint; a sent message is encoded into a frame and stays in flight until the link's delivery step,
// which the scheduler picks, decodes it into the receiver's inbox. Per direction frames keep their order
// (the Transport contract, as TCP gives it); the scheduler decides how long each waits, so messages race
// each other across directions and race what the other node sees in FAM.
import Engine

/// The two ends of one connection and what is in flight between them.
public final class MemoryLink: @unchecked Sendable {
    public enum Direction: String, Sendable, CaseIterable {
        case toTarget = "source→target"
        case toSource = "target→source"
    }

    /// One frame on its way: a message, or the sender's close (FIN).
    enum Frame {
        case message([UInt8], kind: String)
        case close
    }

    public let source: MemoryTransport
    public let target: MemoryTransport
    private var inFlight: [Direction: [Frame]] = [.toTarget: [], .toSource: []]

    public init() {
        let source = MemoryTransport(sending: .toTarget)
        let target = MemoryTransport(sending: .toSource)
        self.source = source
        self.target = target
        source.link = self
        target.link = self
    }

    /// Directions with a frame waiting for delivery, in a fixed order.
    public var deliverable: [Direction] { Direction.allCases.filter { !(inFlight[$0]!.isEmpty) } }

    /// What the next delivery in `direction` carries, for the trace.
    public func nextFrameDescription(_ direction: Direction) -> String? {
        guard let frame = inFlight[direction]!.first else { return nil }
        switch frame {
        case .message(_, let kind): return kind
        case .close: return "close"
        }
    }

    /// Frames delivered so far, both directions (the attacker's clock).
    public private(set) var deliveredCount = 0
    /// The last message frame delivered in each direction, as it went on the wire (what a replay resends).
    private var lastDelivered: [Direction: [UInt8]] = [:]

    /// Moves the oldest frame of `direction` into its receiver's inbox.
    public func deliver(_ direction: Direction) {
        guard !inFlight[direction]!.isEmpty else { preconditionFailure("nothing in flight \(direction.rawValue)") }
        let frame = inFlight[direction]!.removeFirst()
        deliveredCount += 1
        if case .message(let bytes, _) = frame { lastDelivered[direction] = bytes }
        let receiver = direction == .toTarget ? target : source
        receiver.arrive(frame)
    }

    /// The last message frame delivered in `direction`, nil before the first.
    public func lastDeliveredFrame(_ direction: Direction) -> [UInt8]? { lastDelivered[direction] }

    /// A frame that no node sent, queued in `direction` behind what is in flight (a rogue peer on the
    /// wire: it can add frames, not remove or reorder the nodes' own). Nothing is queued after the
    /// sender's close: the receiver stops reading there.
    public func inject(_ bytes: [UInt8], kind: String, direction: Direction) {
        if case .close? = inFlight[direction]!.last { return }
        inFlight[direction]!.append(.message(bytes, kind: kind))
    }

    /// A node died: its endpoint is closed at once; frames it had sent are lost (`dropInFlight`) or
    /// still arrive (they were already in the peer's socket buffer); the peer then sees the close.
    public func crash(_ endpoint: MemoryTransport, dropInFlight: Bool) {
        let direction = endpoint.sendingDirection
        if dropInFlight { inFlight[direction] = [] }
        if !endpoint.isClosed {
            endpoint.isClosed = true
            inFlight[direction]!.append(.close)
        }
    }

    /// Every frame a node sends arrives as it is sent (a link faster than the receiver's next look),
    /// unless frames are still in flight that way: it never overtakes them.
    public var deliversAtOnce = false

    fileprivate func enqueue(_ frame: Frame, from endpoint: MemoryTransport) {
        inFlight[endpoint.sendingDirection]!.append(frame)
        if deliversAtOnce && inFlight[endpoint.sendingDirection]!.count == 1 { deliver(endpoint.sendingDirection) }
    }

    fileprivate func hasInFlight(toward endpoint: MemoryTransport) -> Bool {
        let direction: Direction = endpoint === target ? .toTarget : .toSource
        return !inFlight[direction]!.isEmpty
    }
}

/// One node's end of a `MemoryLink`.
public final class MemoryTransport: Transport, @unchecked Sendable {
    fileprivate let sendingDirection: MemoryLink.Direction
    fileprivate weak var link: MemoryLink?
    private var inbox: [Message] = []
    private var inboxStart = 0
    fileprivate var isClosed = false
    private var peerClosed = false
    private var malformed: TransportError?
    public private(set) var bytesSent = 0
    public private(set) var bytesReceived = 0

    fileprivate init(sending direction: MemoryLink.Direction) {
        sendingDirection = direction
    }

    public func send(_ message: Message) throws(TransportError) {
        if isClosed { throw .closed }
        if peerClosed { throw .peerClosed }
        let frame = message.encoded()
        guard frame.count - Message.lengthPrefixByteCount <= Message.maximumPayloadByteCount else {
            throw .messageTooLarge(kind: message.kindName, payloadByteCount: frame.count - Message.lengthPrefixByteCount)
        }
        bytesSent += frame.count
        link?.enqueue(.message(frame, kind: Self.describe(message)), from: self)
    }

    public func receive() throws(TransportError) -> Message? {
        if isClosed { throw .closed }
        if inboxStart < inbox.count {
            let message = inbox[inboxStart]
            inboxStart += 1
            if inboxStart == inbox.count { inbox.removeAll(keepingCapacity: true); inboxStart = 0 }
            return message
        }
        if let malformed { throw malformed }
        if peerClosed { throw .peerClosed }
        return nil
    }

    /// One thread drives torture: there is nothing to wait for that could change during a wait.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        isClosed || inboxStart < inbox.count || peerClosed || malformed != nil
    }

    public var readableDescriptor: Int32? { nil }

    public func close() {
        if isClosed { return }
        isClosed = true
        link?.enqueue(.close, from: self)
    }

    fileprivate func arrive(_ frame: MemoryLink.Frame) {
        switch frame {
        case .close:
            peerClosed = true
        case .message(let bytes, _):
            bytesReceived += bytes.count
            guard !isClosed else { return }
            do { inbox.append(try Message.decode(bytes)) } catch { malformed = error }
        }
    }

    /// The kind and the one field a trace reader wants (page address, slot count).
    static func describe(_ message: Message) -> String {
        switch message {
        case .pageRequest(let address): "pageRequest 0x\(String(address, radix: 16))"
        case .pages(let address, let bytes): "pages 0x\(String(address, radix: 16))+\(bytes.count / .pageSize)"
        case .marked(let slots): "marked \(slots.count)"
        default: message.kindName
        }
    }
}
