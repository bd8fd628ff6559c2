// TCP sockets: what the image carries for a listening socket or an established connection, how the
// source reads it (an established one in repair mode, Sys/TCPRepair.swift), how it is encoded, and the
// checks a decoded record must pass. Restore is in Restore/TCPSocketRestorer.swift.
import Sys

/// Socket options restored on every TCP socket (0 or the value getsockopt gave).
public struct TCPSocketOptions: Equatable, Sendable {
    public var reuseAddress: Int32 = 0
    public var reusePort: Int32 = 0
    public var keepAlive: Int32 = 0
    public var noDelay: Int32 = 0
    /// IPV6_V6ONLY (IPv6 listeners only; 0 otherwise).
    public var ipv6Only: Int32 = 0
    public var keepIdleSeconds: Int32 = 0
    public var keepIntervalSeconds: Int32 = 0
    public var keepCount: Int32 = 0

    var words: [Int32] { [reuseAddress, reusePort, keepAlive, noDelay, ipv6Only, keepIdleSeconds, keepIntervalSeconds, keepCount] }
    init() {}
    init(words: [Int32]) {
        (reuseAddress, reusePort, keepAlive, noDelay, ipv6Only) = (words[0], words[1], words[2], words[3], words[4])
        (keepIdleSeconds, keepIntervalSeconds, keepCount) = (words[5], words[6], words[7])
    }
}

/// An established connection as repair mode reads it.
public struct TCPConnection: Equatable, Sendable {
    /// TCP_QUEUE_SEQ of the send queue: the sequence number after its last byte (write_seq).
    public var sendSequence: UInt32
    /// TCP_QUEUE_SEQ of the receive queue: the sequence number after its last byte (rcv_nxt).
    public var receiveSequence: UInt32
    /// Bytes written by the process and not yet acknowledged by the peer (sent or not).
    public var sendQueue: [UInt8]
    /// Bytes received and acknowledged, not yet read by the process.
    public var receiveQueue: [UInt8]
    /// TCP_MAXSEG.
    public var maximumSegment: UInt32
    /// TCPI_OPT_TIMESTAMPS 1 | TCPI_OPT_SACK 2 | TCPI_OPT_WSCALE 4, as the handshake agreed.
    public var handshakeOptions: UInt8
    public var sendWindowScale: UInt8
    public var receiveWindowScale: UInt8
    public var window: TCPRepairWindow
    /// TCP_TIMESTAMP at the checkpoint: the target's timestamps go on from it. It moves with time, so
    /// the state oracle does not compare it.
    public var timestamp: UInt32
}

/// A TCP socket: listening (`connection` nil, `backlog` set) or established.
public struct TCPSocketEnd: Equatable, Sendable {
    public var local: InetAddress
    /// The peer (established only).
    public var peer: InetAddress?
    /// listen(2)'s backlog (listening only; 0 otherwise).
    public var backlog: Int32
    public var options: TCPSocketOptions
    public var connection: TCPConnection?

    public var isListening: Bool { connection == nil }
    /// The same socket with what moves with time alone (the timestamp) set aside, for the state oracle.
    public var comparable: TCPSocketEnd {
        var copy = self
        copy.connection?.timestamp = 0
        return copy
    }
}

/// Why a TCP socket cannot migrate (the reader turns it into a refusal naming the descriptor).
struct TCPRefusal: Error { let reason: String }

enum TCPSocketReader {
    static let established: UInt8 = 1, listening: UInt8 = 10

    /// Is this socket (a copy of the victim's) an IPv4/IPv6 TCP stream socket?
    static func isTCP(_ copy: ForeignDescriptor) -> Bool {
        guard let domain = try? copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.socketDomain),
              let type = try? copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.socketType),
              let proto = try? copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.socketProtocol) else { return false }
        return (domain == 2 || domain == 10) && type == 1 && proto == 6
    }

    /// Reads a TCP socket. Without `contents` (the preflight: the victim runs) nothing is changed and
    /// queues are only checked; with it (the victim frozen, or the restored target read back) an
    /// established connection is put in repair mode and left there: it must send nothing from now on.
    static func read(_ copy: ForeignDescriptor, contents: Bool) throws -> TCPSocketEnd {
        let info = try copy.tcpInfo()
        guard info.state == listening || info.state == established else {
            throw TCPRefusal(reason: "a TCP socket in state \(stateName(info.state)); only listening and established ones migrate")
        }
        guard let local = try copy.inetAddress(peer: false) else { throw TCPRefusal(reason: "a TCP socket without an IPv4 or IPv6 address") }
        var options = TCPSocketOptions()
        options.reuseAddress = try copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.reuseAddress)
        options.reusePort = try copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.reusePort)
        options.keepAlive = try copy.socketOption(level: TCPOption.socketLevel, name: TCPOption.keepAlive)
        options.noDelay = try copy.socketOption(level: TCPOption.level, name: TCPOption.noDelay)
        // IPV6_V6ONLY decides what a listener accepts; a connected socket is past it (and binding one to
        // its address, as the restore must, sets it), so it is kept for listeners only.
        if local.family == 10 && info.state == listening {
            options.ipv6Only = try copy.socketOption(level: TCPOption.ipv6Level, name: TCPOption.ipv6Only)
        }
        options.keepIdleSeconds = try copy.socketOption(level: TCPOption.level, name: TCPOption.keepIdle)
        options.keepIntervalSeconds = try copy.socketOption(level: TCPOption.level, name: TCPOption.keepInterval)
        options.keepCount = try copy.socketOption(level: TCPOption.level, name: TCPOption.keepCount)
        // TCP Fast Open: a listener's queue of fast-open requests and its cookie key, and a client's
        // pending fast-open connect, are kernel state no call reads back.
        let fastOpen: Int32 = 23, fastOpenConnect: Int32 = 30
        if try copy.socketOption(level: TCPOption.level, name: fastOpen) != 0 {
            throw TCPRefusal(reason: "a TCP socket with TCP_FASTOPEN set, whose fast-open state does not migrate")
        }
        if try copy.socketOption(level: TCPOption.level, name: fastOpenConnect) != 0 {
            throw TCPRefusal(reason: "a TCP socket with TCP_FASTOPEN_CONNECT set, whose fast-open state does not migrate")
        }
        if info.state == listening {
            // tcpi_unacked is the accept queue, tcpi_sacked the backlog, for a listener.
            guard info.unacknowledged == 0 else {
                throw TCPRefusal(reason: "a listening TCP socket with \(info.unacknowledged) connections not yet accepted")
            }
            return TCPSocketEnd(local: local, peer: nil, backlog: Int32(clamping: info.selectivelyAcknowledged), options: options, connection: nil)
        }
        guard let peer = try copy.inetAddress(peer: true) else { throw TCPRefusal(reason: "an established TCP socket without a peer address") }
        // Repair mode carries the queues' bytes, not the urgent pointer: the byte would arrive in band.
        if try copy.hasUrgentData() {
            throw TCPRefusal(reason: "an established TCP socket with urgent (MSG_OOB) data not yet read, whose urgent mark does not migrate")
        }
        let limit = DescriptorLimits.carriedByteCountMax
        let receiveCount = try copy.queuedByteCount(), sendCount = try copy.sendQueueByteCount()
        guard receiveCount + sendCount <= limit else { throw TCPRefusal(reason: "\(receiveCount + sendCount) bytes queued, more than an image carries") }
        guard contents else {
            return TCPSocketEnd(local: local, peer: peer, backlog: 0, options: options, connection: nil)
        }
        try copy.setRepair(true)
        // Read again in repair mode: nothing moves any more.
        let receiveQueued = try copy.queuedByteCount(), sendQueued = try copy.sendQueueByteCount()
        guard let receiveQueue = try copy.peekRepairQueue(TCPOption.receiveQueue, expected: receiveQueued, maximumByteCount: limit),
              let sendQueue = try copy.peekRepairQueue(TCPOption.sendQueue, expected: sendQueued, maximumByteCount: limit) else {
            throw TCPRefusal(reason: "more queued than an image carries")
        }
        let connection = TCPConnection(
            sendSequence: try copy.queueSequence(TCPOption.sendQueue), receiveSequence: try copy.queueSequence(TCPOption.receiveQueue),
            sendQueue: sendQueue, receiveQueue: receiveQueue,
            maximumSegment: UInt32(bitPattern: try copy.socketOption(level: TCPOption.level, name: TCPOption.maximumSegment)),
            handshakeOptions: info.options & 7, sendWindowScale: info.sendWindowScale, receiveWindowScale: info.receiveWindowScale,
            window: try copy.repairWindow(),
            timestamp: UInt32(bitPattern: try copy.socketOption(level: TCPOption.level, name: TCPOption.timestamp)))
        return TCPSocketEnd(local: local, peer: peer, backlog: 0, options: options, connection: connection)
    }

    /// The bytes the socket will carry, counted before the freeze.
    static func plannedByteCount(_ copy: ForeignDescriptor) -> Int {
        ((try? copy.queuedByteCount()) ?? 0) + ((try? copy.sendQueueByteCount()) ?? 0)
    }

    static func stateName(_ state: UInt8) -> String {
        let names = ["", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE (not connected)",
                     "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"]
        return Int(state) < names.count ? names[Int(state)] : "\(state)"
    }
}

// MARK: Image encoding

extension TCPSocketEnd {
    func encode(into writer: inout BinaryWriter) {
        func writeAddress(_ address: InetAddress) {
            writer.writeInt32(address.family); writer.writeBytes(address.bytes); writer.writeUInt32(UInt32(address.port))
        }
        writeAddress(local)
        writer.writeBool(peer != nil)
        if let peer { writeAddress(peer) }
        writer.writeInt32(backlog)
        for word in options.words { writer.writeInt32(word) }
        writer.writeBool(connection != nil)
        guard let connection else { return }
        writer.writeUInt32(connection.sendSequence); writer.writeUInt32(connection.receiveSequence)
        writer.writeBytes(connection.sendQueue); writer.writeBytes(connection.receiveQueue)
        writer.writeUInt32(connection.maximumSegment); writer.writeUInt8(connection.handshakeOptions)
        writer.writeUInt8(connection.sendWindowScale); writer.writeUInt8(connection.receiveWindowScale)
        let window = connection.window
        for word in [window.sendWindowLastUpdate, window.sendWindow, window.maximumWindow, window.receiveWindow, window.receiveWindowUpdate] {
            writer.writeUInt32(word)
        }
        writer.writeUInt32(connection.timestamp)
    }

    /// Bounds every length and value; the relations to other records are checked by `validate`.
    static func decode(_ reader: inout BinaryReader, descriptor: Int32) throws(ImageError) -> TCPSocketEnd {
        func bad(_ reason: String) -> ImageError { .malformedMetadata(reason: "fd \(descriptor) (TCP socket) \(reason)") }
        func readAddress() throws(ImageError) -> InetAddress {
            let family = try reader.readInt32()
            let bytes = try reader.readBytes(maximumByteCount: 16)
            let port = try reader.readUInt32()
            guard (family == 2 && bytes.count == 4) || (family == 10 && bytes.count == 16), port <= 0xffff else {
                throw bad("has address family \(family) with \(bytes.count) bytes, port \(port)")
            }
            return InetAddress(family: family, bytes: bytes, port: UInt16(port))
        }
        let local = try readAddress()
        let peer: InetAddress? = try reader.readBool() ? try readAddress() : nil
        let backlog = try reader.readInt32()
        var words: [Int32] = []
        for _ in 0..<8 { words.append(try reader.readInt32()) }
        var end = TCPSocketEnd(local: local, peer: peer, backlog: backlog, options: TCPSocketOptions(words: words), connection: nil)
        if try reader.readBool() {
            let limit = DescriptorLimits.carriedByteCountMax
            let sendSequence = try reader.readUInt32(), receiveSequence = try reader.readUInt32()
            let sendQueue = try reader.readBytes(maximumByteCount: limit), receiveQueue = try reader.readBytes(maximumByteCount: limit)
            let maximumSegment = try reader.readUInt32(), handshakeOptions = try reader.readUInt8()
            let sendWindowScale = try reader.readUInt8(), receiveWindowScale = try reader.readUInt8()
            var window: [UInt32] = []
            for _ in 0..<5 { window.append(try reader.readUInt32()) }
            end.connection = TCPConnection(sendSequence: sendSequence, receiveSequence: receiveSequence, sendQueue: sendQueue, receiveQueue: receiveQueue,
                                           maximumSegment: maximumSegment, handshakeOptions: handshakeOptions,
                                           sendWindowScale: sendWindowScale, receiveWindowScale: receiveWindowScale,
                                           window: TCPRepairWindow(sendWindowLastUpdate: window[0], sendWindow: window[1], maximumWindow: window[2],
                                                                   receiveWindow: window[3], receiveWindowUpdate: window[4]),
                                           timestamp: try reader.readUInt32())
        }
        if let problem = end.problem { throw bad(problem) }
        return end
    }

    /// What makes a record impossible to restore; nil when it is well formed.
    var problem: String? {
        if let connection {
            guard let peer, peer.family == local.family else { return "is established without a peer of its family" }
            guard backlog == 0 else { return "is established with a backlog" }
            guard connection.handshakeOptions & ~7 == 0, connection.sendWindowScale <= 14, connection.receiveWindowScale <= 14 else {
                return "has handshake options \(connection.handshakeOptions), window scales \(connection.sendWindowScale)/\(connection.receiveWindowScale)"
            }
            guard (1...65535).contains(connection.maximumSegment) else { return "has MSS \(connection.maximumSegment)" }
            guard connection.sendQueue.count + connection.receiveQueue.count <= DescriptorLimits.carriedByteCountMax else { return "queues too many bytes" }
        } else {
            guard peer == nil else { return "is listening with a peer" }
            guard (0...65535).contains(backlog) else { return "has backlog \(backlog)" }
        }
        guard options.words.allSatisfy({ $0 >= 0 }) else { return "has a negative option" }
        return nil
    }
}
