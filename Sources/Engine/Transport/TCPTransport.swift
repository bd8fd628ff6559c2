// Why this file exists: the threaded driver's transport, messages over one real TCP connection. TCP is a
// byte stream: a frame arrives in as many reads as the network likes, and one read may end in the middle
// of the next frame, so FrameAssembler (testable without a socket) cuts the stream back into frames.
// Several actor threads may send at once: a lock keeps each frame whole on the wire.
import Synchronization
import Sys

/// A TCP connection to the other node.
public final class TCPTransport: Transport {
    /// The most bytes taken from the socket in one read (the scratch buffer is allocated once, up front).
    public static let receiveChunkByteCount = 256 << 10
    /// Enough reads for one receive to take in the largest frame; after that it returns and is called again.
    static let readLimitPerReceive = Message.maximumPayloadByteCount / receiveChunkByteCount + 2

    private struct ReceiveState {
        var assembler: FrameAssembler
        var chunk: [UInt8]
        /// How the stream ended (`peerClosed`, or a socket error): thrown once the frames before it are out.
        var ending: TransportError?
    }

    private let socket: TCPSocket
    private let stallTimeoutMilliseconds: Int32
    /// Held for a whole frame, so frames from several threads never interleave; also keeps `close` from
    /// freeing the descriptor under a sender.
    private let sendLock = Mutex(())
    private let receiveState: Mutex<ReceiveState>
    private let isClosed = Atomic(false)
    private let sentByteCount = Atomic(0)
    private let receivedByteCount = Atomic(0)

    /// Takes over a connected socket. A send that makes no progress for `stallTimeoutMilliseconds`
    /// (the peer stopped reading) fails.
    public init(connected socket: TCPSocket, stallTimeoutMilliseconds: Int32 = 30_000) {
        precondition(socket.descriptor >= 0, "TCPTransport over a closed socket")
        self.socket = socket
        self.stallTimeoutMilliseconds = stallTimeoutMilliseconds
        receiveState = Mutex(ReceiveState(
            assembler: FrameAssembler(reservingByteCount: Message.lengthPrefixByteCount + Message.maximumPayloadByteCount + Self.receiveChunkByteCount),
            chunk: [UInt8](repeating: 0, count: Self.receiveChunkByteCount)))
    }

    deinit { close() }

    public var bytesSent: Int { sentByteCount.load(ordering: .relaxed) }
    public var bytesReceived: Int { receivedByteCount.load(ordering: .relaxed) }

    public func send(_ message: Message) throws(TransportError) {
        let frame = message.encoded()
        let payloadByteCount = frame.count - Message.lengthPrefixByteCount
        guard payloadByteCount <= Message.maximumPayloadByteCount else {
            throw .messageTooLarge(kind: message.kindName, payloadByteCount: payloadByteCount)
        }
        try sendLock.withLock { _ throws(TransportError) in
            guard !isClosed.load(ordering: .acquiring) else { throw .closed }
            do throws(SyscallError) {
                try socket.send(frame, stallTimeoutMilliseconds: stallTimeoutMilliseconds)
            } catch {
                // close() shuts the socket down to wake a blocked sender: that EPIPE is ours, not the peer's.
                throw isClosed.load(ordering: .acquiring) ? .closed : Self.transportError(error)
            }
        }
        sentByteCount.add(frame.count, ordering: .relaxed)
    }

    public func receive() throws(TransportError) -> Message? {
        try receiveState.withLock { state throws(TransportError) -> Message? in
            guard !isClosed.load(ordering: .acquiring) else { throw .closed }
            pull(into: &state)
            if let message = try state.assembler.nextMessage() { return message }
            if let ending = state.ending { throw ending }
            return nil
        }
    }

    /// May return false before the timeout when only part of a message arrived; the caller waits again.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        receiveState.withLock { state in
            if isClosed.load(ordering: .acquiring) { return true }
            pull(into: &state)
            if Self.hasNews(state) { return true }
            // close() shuts the socket down first, which ends this poll at once.
            guard socket.waitReadable(timeoutMilliseconds: timeoutMilliseconds) else { return false }
            pull(into: &state)
            return Self.hasNews(state)
        }
    }

    public var readableDescriptor: Int32? { socket.descriptor >= 0 ? socket.descriptor : nil }

    /// Kernel buffers of `byteCount` each way (a single-threaded test whose one end reads only between
    /// the other's sends needs room for a whole window).
    public func reserveBuffers(byteCount: Int32) throws(TransportError) {
        do { try socket.reserveBuffers(byteCount: byteCount) } catch { throw .system(error) }
    }

    public func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // Wake any thread blocked in send or waitReadable, then wait for both to let go before the number
        // of the descriptor can be reused (TCPSocket's invariant).
        socket.shutdown()
        sendLock.withLock { _ in
            receiveState.withLock { _ in socket.close() }
        }
    }

    /// Moves what the socket holds now into the assembler, until a whole frame (or the end) is there.
    private func pull(into state: inout ReceiveState) {
        for _ in 0..<Self.readLimitPerReceive {
            if Self.hasNews(state) { return }
            let byteCount: Int?
            do throws(SyscallError) {
                byteCount = try socket.receive(into: &state.chunk)
            } catch {
                state.ending = Self.transportError(error)
                return
            }
            guard let byteCount else { return }
            guard byteCount > 0 else { state.ending = .peerClosed; return }
            receivedByteCount.add(byteCount, ordering: .relaxed)
            state.assembler.append(state.chunk[..<byteCount])
        }
    }

    private static func hasNews(_ state: ReceiveState) -> Bool {
        state.ending != nil || state.assembler.hasFrameOrFailure
    }

    /// A reset or a broken pipe is the peer going away, like an orderly close.
    private static func transportError(_ error: SyscallError) -> TransportError {
        error.errno == .connectionReset || error.errno == .brokenPipe ? .peerClosed : .system(error)
    }
}

// MARK: Setting up a connection

extension TCPTransport {
    /// A listener on `endpoint` (port 0: a free port, see `TCPListener.endpoint`).
    public static func listen(on endpoint: Endpoint) throws(TransportError) -> TCPListener {
        do {
            return TCPListener(socket: try TCPSocket.listen(host: endpoint.host, port: endpoint.port), host: endpoint.host)
        } catch {
            throw .cannotListen(endpoint, error)
        }
    }

    /// The next connection to `listener`, or nil when none arrived within `timeoutMilliseconds`. Its
    /// sends fail once the peer took nothing in for `stallTimeoutMilliseconds`.
    public static func accept(on listener: TCPListener, timeoutMilliseconds: Int32,
                              stallTimeoutMilliseconds: Int32 = 30_000) throws(TransportError) -> TCPTransport? {
        do {
            return try listener.socket.accept(timeoutMilliseconds: timeoutMilliseconds).map {
                TCPTransport(connected: $0, stallTimeoutMilliseconds: stallTimeoutMilliseconds)
            }
        } catch {
            throw .system(error)
        }
    }

    /// Connects to `endpoint`, retrying while it refuses (its listener may start a little later).
    public static func connect(to endpoint: Endpoint, timeoutMilliseconds: Int32,
                               stallTimeoutMilliseconds: Int32 = 30_000) throws(TransportError) -> TCPTransport {
        do {
            return TCPTransport(connected: try TCPSocket.connect(host: endpoint.host, port: endpoint.port,
                                                                 timeoutMilliseconds: timeoutMilliseconds),
                                stallTimeoutMilliseconds: stallTimeoutMilliseconds)
        } catch {
            throw .cannotConnect(endpoint, error)
        }
    }

    public static func connect(host: String, port: UInt16, timeoutMilliseconds: Int32) throws(TransportError) -> TCPTransport {
        try connect(to: Endpoint(host: host, port: port), timeoutMilliseconds: timeoutMilliseconds)
    }
}

/// A listening socket of the node that waits for the other. Used by one thread: `close` must not race
/// `TCPTransport.accept(on:)`.
public final class TCPListener: Sendable {
    let socket: TCPSocket
    /// Where it listens, with the port the kernel chose when asked for port 0.
    public let endpoint: Endpoint

    init(socket: TCPSocket, host: String) {
        self.socket = socket
        endpoint = Endpoint(host: host, port: socket.localPort)
    }

    public func close() { socket.close() }
}

// MARK: Framing

/// Cuts a byte stream into frames, whatever pieces it arrives in. The length prefix is checked as soon as
/// its 4 bytes are in, so a hostile length never makes it buffer more than one frame's limit.
public struct FrameAssembler: Sendable {
    private var buffer: [UInt8] = []
    /// Bytes at the front of `buffer` already handed out.
    private var consumedByteCount = 0
    /// A bad length prefix loses the frame boundaries for good: every later call throws it again.
    private var failure: TransportError?

    public init(reservingByteCount: Int = 0) { buffer.reserveCapacity(reservingByteCount) }

    /// Bytes received and not yet handed out as frames.
    public var bufferedByteCount: Int { buffer.count - consumedByteCount }

    /// True when `nextPayload()` would return a payload or throw.
    public var hasFrameOrFailure: Bool {
        if failure != nil { return true }
        guard let payloadByteCount = announcedPayloadByteCount else { return false }
        return payloadByteCount > Message.maximumPayloadByteCount
            || bufferedByteCount >= Message.lengthPrefixByteCount + payloadByteCount
    }

    public mutating func append(_ bytes: some Collection<UInt8>) { buffer.append(contentsOf: bytes) }

    /// The next whole payload, or nil while its frame is incomplete.
    public mutating func nextPayload() throws(TransportError) -> [UInt8]? {
        if let failure { throw failure }
        guard let payloadByteCount = announcedPayloadByteCount else { return nil }
        guard payloadByteCount <= Message.maximumPayloadByteCount else {
            let error = TransportError.malformed(
                "a frame announces \(payloadByteCount) payload bytes, the limit is \(Message.maximumPayloadByteCount)")
            failure = error
            throw error
        }
        let frameByteCount = Message.lengthPrefixByteCount + payloadByteCount
        guard bufferedByteCount >= frameByteCount else { return nil }
        let payloadStartIndex = consumedByteCount + Message.lengthPrefixByteCount
        let payload = Array(buffer[payloadStartIndex..<(payloadStartIndex + payloadByteCount)])
        consumedByteCount += frameByteCount
        compact()
        return payload
    }

    /// The next whole message, or nil while its frame is incomplete.
    public mutating func nextMessage() throws(TransportError) -> Message? {
        guard let payload = try nextPayload() else { return nil }
        return try Message.decode(payload: payload)
    }

    private var announcedPayloadByteCount: Int? {
        guard bufferedByteCount >= Message.lengthPrefixByteCount else { return nil }
        let startIndex = consumedByteCount
        return Int(buffer[startIndex]) | Int(buffer[startIndex + 1]) << 8
            | Int(buffer[startIndex + 2]) << 16 | Int(buffer[startIndex + 3]) << 24
    }

    /// Drops handed-out bytes once they are at least half the buffer, so each byte moves O(1) times.
    private mutating func compact() {
        if consumedByteCount == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            consumedByteCount = 0
        } else if consumedByteCount >= buffer.count / 2 {
            buffer.removeFirst(consumedByteCount)
            consumedByteCount = 0
        }
    }
}

// MARK: Endpoints

/// An IPv4 address and a TCP port, as written on the command line: "10.77.0.2:7000".
public struct Endpoint: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses "HOST:PORT": HOST a dotted IPv4 address, PORT in 1...65535.
    public init(parsing text: String) throws(TransportError) {
        guard let colonIndex = text.lastIndex(of: ":") else {
            throw .badEndpoint(text: text, reason: "there is no \":PORT\"")
        }
        let hostText = String(text[..<colonIndex])
        let portText = text[text.index(after: colonIndex)...]
        guard !hostText.isEmpty else { throw .badEndpoint(text: text, reason: "the host is missing") }
        if let reason = Self.ipv4Problem(hostText) { throw .badEndpoint(text: text, reason: reason) }
        guard !portText.isEmpty, portText.utf8.allSatisfy(Self.isDecimalDigit) else {
            throw .badEndpoint(text: text, reason: "the port \"\(portText)\" is not a decimal number")
        }
        guard let port = UInt16(portText), port > 0 else {
            throw .badEndpoint(text: text, reason: "the port \(portText) is not in 1...65535")
        }
        self.init(host: hostText, port: port)
    }

    public var description: String { "\(host):\(port)" }

    /// Why `host` is not four decimal numbers 0...255 joined by dots (no leading zeros, as inet_pton), or nil.
    private static func ipv4Problem(_ host: String) -> String? {
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return "the host \"\(host)\" is not a dotted IPv4 address" }
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.utf8.allSatisfy(isDecimalDigit),
                  part.count == 1 || part.first != "0", let value = Int(part), value <= 255
            else { return "the host \"\(host)\" is not a dotted IPv4 address (\"\(part)\" is not in 0...255)" }
        }
        return nil
    }

    private static func isDecimalDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }
}
