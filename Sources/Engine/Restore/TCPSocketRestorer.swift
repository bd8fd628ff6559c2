// Rebuilds a TCP socket on a fresh socket made by the target (or, when a checkpoint is abandoned, on the
// victim's own disconnected socket), through a pidfd_getfd copy. A listener is bound and listens again.
// An established connection is rebuilt in repair mode, in the order the kernel accepts:
//   sequence numbers (only while CLOSE) -> options -> bind -> connect (no SYN: ESTABLISHED at once) ->
//   handshake options (only while nothing was sent) -> receive queue -> send queue -> windows,
// and is left in repair mode, sending nothing, until the process is let go (`goLive`).
import Sys

enum TCPSocketRestorer {
    /// Makes `socket` (a new or disconnected TCP socket of the record's family) what `end` describes.
    /// `socket` makes each call at once (a ForeignDescriptor) or writes it down (a TCPSocketRecipe, which
    /// the source guard runs if its owner dies: the one rebuild either way).
    static func rebuild(_ socket: some TCPSocketCalls, _ end: TCPSocketEnd) throws {
        if let connection = end.connection, let peer = end.peer {
            // Options before repair mode: SO_REUSEADDR would undo the address reuse repair mode forces
            // (and a bind would then collide with a TIME_WAIT socket on the port).
            try setOptions(socket, end)
            try socket.setRepair(true, windowProbe: true)
            // A queue's sequence is set to its start; refilling it moves it to the end we read.
            try socket.setQueueSequence(TCPOption.sendQueue, connection.sendSequence &- UInt32(connection.sendQueue.count))
            try socket.setQueueSequence(TCPOption.receiveQueue, connection.receiveSequence &- UInt32(connection.receiveQueue.count))
            // Repair mode forces address reuse: the victim's socket may still hold the port on this node.
            // The victim's own socket, disconnected by `detach`, may still be bound (it was bound to a
            // port explicitly): bind answers EINVAL then. getsockname cannot tell, it still shows the
            // port a disconnect released.
            try socket.bindUnlessBound(end.local)
            try socket.bindOrConnect(peer, connect: true)
            var options: [(code: UInt32, value: UInt32)] = [(2, connection.maximumSegment)]  // TCPOPT_MAXSEG
            if connection.handshakeOptions & 4 != 0 {  // TCPOPT_WINDOW: send scale, receive scale << 16
                options.append((3, UInt32(connection.sendWindowScale) | UInt32(connection.receiveWindowScale) << 16))
            }
            if connection.handshakeOptions & 2 != 0 { options.append((4, 0)) }  // TCPOPT_SACK_PERM
            if connection.handshakeOptions & 1 != 0 { options.append((8, 0)) }  // TCPOPT_TIMESTAMP
            try socket.setRepairOptions(options)
            try socket.setSocketOption(level: TCPOption.level, name: TCPOption.timestamp, value: Int32(bitPattern: connection.timestamp))
            try socket.fillRepairQueue(TCPOption.receiveQueue, connection.receiveQueue)
            try socket.fillRepairQueue(TCPOption.sendQueue, connection.sendQueue)
            // After the queues: the kernel wants rcv_wup at or before rcv_nxt, which refilling the
            // receive queue moved to where it was.
            try socket.setRepairWindow(connection.window)
            // Bound and connected: the forced address reuse has done its work; the socket's own
            // setting reads back as it was (repair mode reports the forced one otherwise).
            try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress, value: end.options.reuseAddress)
            return
        }
        // A listener: options first (IPV6_V6ONLY only before bind), repair mode only to bind where the
        // victim's disconnected socket may still sit; leaving it clears address reuse, set again after.
        try setOptions(socket, end)
        try socket.setRepair(true, windowProbe: true)
        try socket.bindUnlessBound(end.local)
        try socket.setRepair(false, windowProbe: false)
        try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress, value: end.options.reuseAddress)
        try socket.listen(backlog: end.backlog)
    }

    private static func setOptions(_ socket: some TCPSocketCalls, _ end: TCPSocketEnd) throws {
        let options = end.options
        try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress, value: options.reuseAddress)
        try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reusePort, value: options.reusePort)
        try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.keepAlive, value: options.keepAlive)
        try socket.setSocketOption(level: TCPOption.level, name: TCPOption.noDelay, value: options.noDelay)
        // Only before bind; a socket still bound (given back to the victim) keeps its own.
        if end.local.family == 10 && end.isListening {
            try socket.setSocketOptionIfChanged(level: TCPOption.ipv6Level, name: TCPOption.ipv6Only, value: options.ipv6Only)
        }
        if options.keepIdleSeconds > 0 { try socket.setSocketOption(level: TCPOption.level, name: TCPOption.keepIdle, value: options.keepIdleSeconds) }
        if options.keepIntervalSeconds > 0 { try socket.setSocketOption(level: TCPOption.level, name: TCPOption.keepInterval, value: options.keepIntervalSeconds) }
        if options.keepCount > 0 { try socket.setSocketOption(level: TCPOption.level, name: TCPOption.keepCount, value: options.keepCount) }
    }

    /// Ends repair mode on a rebuilt connection, with a window probe so the peer hears from it at once;
    /// address reuse, which leaving repair mode clears, is set again.
    static func goLive(_ socket: some TCPSocketCalls, _ end: TCPSocketEnd) throws {
        try socket.setRepair(false, windowProbe: true)
        try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress, value: end.options.reuseAddress)
    }

    /// The local ports of established connections whose peer is not another socket of the same
    /// process: their segments must be held back (NetworkLock) while they are away.
    static func outsideConnectionPorts(_ files: [OpenFile]) -> [(port: UInt16, family: Int32)] {
        let ends = files.compactMap { file -> TCPSocketEnd? in if case .tcpSocket(let end) = file.kind { end } else { nil } }
        let locals = Set(ends.map { "\($0.local)" })
        var ports: [UInt16: Int32] = [:]
        for end in ends {
            guard let peer = end.peer, !locals.contains("\(peer)") else { continue }
            ports[end.local.port] = end.local.family
        }
        return ports.keys.sorted().map { ($0, ports[$0]!) }
    }

    /// On the source, once the victim's sockets are read: each stops holding its address (a listener
    /// stops listening; a connection in repair mode is dropped silently), so the target's socket can take
    /// it on this node; the victim's descriptor keeps an idle socket that `reinstate` can rebuild.
    static func detach(_ socket: ForeignDescriptor, _ end: TCPSocketEnd) throws {
        if end.isListening {
            // So that the target's listener does not conflict with this now idle, still bound socket.
            try socket.setSocketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress, value: 1)
        }
        try socket.disconnect()
    }

    /// The checkpoint was abandoned: the victim's socket becomes again what it was, in repair mode still
    /// if it is a connection (`goLive` each once all are rebuilt: a window probe to a peer not yet
    /// rebuilt would be answered with a reset).
    static func reinstate(_ socket: some TCPSocketCalls, _ end: TCPSocketEnd) throws {
        try rebuild(socket, end)
    }
}
