// Why this file exists: actors talk to the other node only through this port. The threaded driver gives
// them a TCPTransport; torture gives them an in-memory transport whose delivery order its scheduler picks.
// Actors never ask which one they hold, so the protocol stays as small as an actor needs.
import Sys

/// A connection to the other node carrying whole `Message`s, in order.
///
/// `send` may be called from several threads at once; each message goes out whole. `receive` and
/// `waitReadable` are called from the one thread of the actor that reads. `close` may come from any thread.
public protocol Transport: AnyObject, Sendable {
    /// Sends one message; it reaches the peer whole or the connection fails.
    func send(_ message: Message) throws(TransportError)
    /// The next whole message, without waiting: nil when none has fully arrived yet. Throws `peerClosed`
    /// once every message the peer sent before closing was received.
    func receive() throws(TransportError) -> Message?
    /// Waits up to `timeoutMilliseconds` (0: just look; negative: no limit) until `receive` has something to say: a whole
    /// message, the peer's close, or an error. False on timeout.
    func waitReadable(timeoutMilliseconds: Int32) -> Bool
    /// A descriptor a threaded driver may poll together with others (nil: poll `waitReadable` instead).
    /// Readable means "look": `waitReadable(0)` first, since whole messages may already be buffered.
    var readableDescriptor: Int32? { get }
    /// Ends the connection; a thread blocked in `send` or `waitReadable` wakes up. Idempotent.
    func close()
    /// Bytes of whole frames handed to the wire (length prefix included), as `Message.encoded()` counts them.
    var bytesSent: Int { get }
    /// Bytes taken from the wire so far, partial frames included.
    var bytesReceived: Int { get }
}

/// Everything that can go wrong between the nodes.
public enum TransportError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The other node closed the connection (or reset it): it finished, failed or aborted.
    case peerClosed
    /// This node closed the transport, then used it.
    case closed
    /// The peer sent bytes that are not a valid message. The connection cannot be trusted any more.
    case malformed(String)
    /// A message this node built does not fit in one frame.
    case messageTooLarge(kind: String, payloadByteCount: Int)
    /// "HOST:PORT" text that is not an endpoint.
    case badEndpoint(text: String, reason: String)
    case cannotListen(Endpoint, SyscallError)
    case cannotConnect(Endpoint, SyscallError)
    /// A socket call failed on an established connection.
    case system(SyscallError)
    /// The peer failed the handshake (SecureChannel.swift): it does not hold the key, or disagrees.
    case refused(String)

    public var description: String {
        switch self {
        case .peerClosed:
            "the other node closed the connection; it finished or failed: read its log, then migrate again if it failed."
        case .closed:
            "the transport was already closed on this node; the migration was aborted here, read the first error logged."
        case .malformed(let reason):
            "the other node sent a malformed message (\(reason)); run the same fammig version on both nodes, then migrate again."
        case .messageTooLarge(let kind, let payloadByteCount):
            "a \(kind) message of \(payloadByteCount) bytes does not fit one frame (at most \(Message.maximumPayloadByteCount)); "
                + "the process is too large for postcopy-socket: use postcopy-fam, whose metadata goes through FAM."
        case .badEndpoint(let text, let reason):
            "\"\(text)\" is not an endpoint: \(reason); write IPV4:PORT, for example 10.77.0.2:7000."
        case .cannotListen(let endpoint, let error):
            "cannot listen on \(endpoint) (\(error)); pick a port no other process uses and an address of this node."
        case .cannotConnect(let endpoint, let error):
            "cannot connect to \(endpoint) (\(error)); start the other node's listener first, and check that its address is reachable from here."
        case .system(let error):
            "the connection to the other node failed (\(error)); the network or the other node is gone, migrate again."
        case .refused(let reason):
            "refused the other node: \(reason). Both nodes need the same --key-file, mode and fammig version."
        }
    }
}
