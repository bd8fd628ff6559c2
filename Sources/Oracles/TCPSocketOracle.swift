// The state oracle's part for TCP sockets: a restored socket must have the checkpointed addresses,
// state, options, sequence numbers, queued bytes, handshake options and windows. Only the timestamp is
// left out: it moves with time.
import Engine
import Sys

extension StateOracle {
    /// What differs between a checkpointed and a restored TCP socket, named; nil when nothing does.
    static func tcpSocketProblem(_ wanted: TCPSocketEnd, _ got: TCPSocketEnd) -> String? {
        if wanted.local != got.local { return "local address \(got.local), not \(wanted.local)" }
        if wanted.peer != got.peer { return "peer \(got.peer.map { "\($0)" } ?? "none"), not \(wanted.peer.map { "\($0)" } ?? "none")" }
        if wanted.isListening != got.isListening { return got.isListening ? "listening, not established" : "established, not listening" }
        if wanted.backlog != got.backlog { return "backlog \(got.backlog), not \(wanted.backlog)" }
        if wanted.options != got.options { return "options \(got.options), not \(wanted.options)" }
        guard let expected = wanted.connection, let actual = got.connection else { return nil }
        if expected.sendSequence != actual.sendSequence || expected.receiveSequence != actual.receiveSequence {
            return "sequences send \(actual.sendSequence) receive \(actual.receiveSequence), not \(expected.sendSequence) \(expected.receiveSequence)"
        }
        if expected.sendQueue != actual.sendQueue || expected.receiveQueue != actual.receiveQueue {
            return "queues of \(actual.sendQueue.count)/\(actual.receiveQueue.count) bytes (send/receive, digests \(hex(digest(actual.sendQueue)))/\(hex(digest(actual.receiveQueue)))), not \(expected.sendQueue.count)/\(expected.receiveQueue.count) (\(hex(digest(expected.sendQueue)))/\(hex(digest(expected.receiveQueue))))"
        }
        if expected.comparableOptions != actual.comparableOptions { return "handshake options \(actual.comparableOptions), not \(expected.comparableOptions)" }
        if expected.window != actual.window { return "window \(actual.window), not \(expected.window)" }
        return nil
    }

    static func tcpDescription(_ end: TCPSocketEnd) -> String {
        guard let connection = end.connection, let peer = end.peer else { return "listening on \(end.local), backlog \(end.backlog), \(end.options)" }
        return "\(end.local) to \(peer), send \(connection.sendSequence) (\(connection.sendQueue.count) queued), receive \(connection.receiveSequence) (\(connection.receiveQueue.count) queued), \(connection.comparableOptions)"
    }
}

extension TCPConnection {
    var comparableOptions: String {
        "mss \(maximumSegment), options \(handshakeOptions), window scales \(sendWindowScale)/\(receiveWindowScale)"
    }
}
