// Why this file exists: a TCP socket's state is not in /proc. A listening socket is read and rebuilt with
// ordinary calls (getsockname, the options, TCP_INFO's backlog). An established connection is read and
// rebuilt with the kernel's repair mode (TCP_REPAIR, needs CAP_NET_ADMIN): while it is on, the socket
// sends nothing (no FIN or RST on close, no segment for queued data), its sequence numbers can be read
// and set (TCP_QUEUE_SEQ for the queue TCP_REPAIR_QUEUE selects), both queues can be read with MSG_PEEK
// and refilled with send(), connect() makes the connection ESTABLISHED at once without a SYN, and the
// options negotiated at its handshake (TCP_REPAIR_OPTIONS) and its windows (TCP_REPAIR_WINDOW) can be
// set. Every call here works on a pidfd_getfd copy, so it acts on the victim's or the target's socket.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// Numbers from <linux/tcp.h> and <asm-generic/socket.h> that Glibc does not export to Swift.
public enum TCPOption {
    public static let level: Int32 = 6                       // IPPROTO_TCP
    public static let noDelay: Int32 = 1                     // TCP_NODELAY
    public static let maximumSegment: Int32 = 2              // TCP_MAXSEG
    public static let keepIdle: Int32 = 4, keepInterval: Int32 = 5, keepCount: Int32 = 6
    public static let info: Int32 = 11                       // TCP_INFO
    public static let repair: Int32 = 19                     // TCP_REPAIR
    public static let repairQueue: Int32 = 20                // TCP_REPAIR_QUEUE
    public static let queueSequence: Int32 = 21              // TCP_QUEUE_SEQ
    public static let repairOptions: Int32 = 22              // TCP_REPAIR_OPTIONS
    public static let timestamp: Int32 = 24                  // TCP_TIMESTAMP
    public static let repairWindow: Int32 = 29               // TCP_REPAIR_WINDOW
    public static let receiveQueue: Int32 = 1, sendQueue: Int32 = 2  // TCP_RECV_QUEUE, TCP_SEND_QUEUE
    public static let socketLevel: Int32 = 1                 // SOL_SOCKET
    public static let reuseAddress: Int32 = 2, keepAlive: Int32 = 9, reusePort: Int32 = 15
    public static let socketType: Int32 = 3, socketProtocol: Int32 = 38, socketDomain: Int32 = 39
    public static let ipv6Level: Int32 = 41, ipv6Only: Int32 = 26
}

/// What TCP_INFO says (the part the engine uses).
public struct TCPInfo: Equatable, Sendable {
    /// TCP_ESTABLISHED 1, SYN_SENT 2, ... CLOSE 7, LISTEN 10.
    public var state: UInt8
    /// TCPI_OPT_TIMESTAMPS 1 | TCPI_OPT_SACK 2 | TCPI_OPT_WSCALE 4 | TCPI_OPT_ECN 8 | TCPI_OPT_SYN_DATA 32.
    public var options: UInt8
    public var sendWindowScale: UInt8
    public var receiveWindowScale: UInt8
    /// A listening socket: connections waiting to be accepted (tcpi_unacked) and the backlog (tcpi_sacked).
    public var unacknowledged: UInt32
    public var selectivelyAcknowledged: UInt32
}

/// struct tcp_repair_window.
public struct TCPRepairWindow: Equatable, Sendable {
    public var sendWindowLastUpdate: UInt32   // snd_wl1
    public var sendWindow: UInt32             // snd_wnd
    public var maximumWindow: UInt32          // max_window
    public var receiveWindow: UInt32          // rcv_wnd
    public var receiveWindowUpdate: UInt32    // rcv_wup
    public init(sendWindowLastUpdate: UInt32, sendWindow: UInt32, maximumWindow: UInt32, receiveWindow: UInt32, receiveWindowUpdate: UInt32) {
        (self.sendWindowLastUpdate, self.sendWindow, self.maximumWindow, self.receiveWindow, self.receiveWindowUpdate)
            = (sendWindowLastUpdate, sendWindow, maximumWindow, receiveWindow, receiveWindowUpdate)
    }
}

/// An IPv4 or IPv6 socket address: the family (AF_INET 2, AF_INET6 10), 4 or 16 address bytes, the port.
public struct InetAddress: Equatable, Sendable, CustomStringConvertible {
    public var family: Int32
    public var bytes: [UInt8]
    public var port: UInt16
    public init(family: Int32, bytes: [UInt8], port: UInt16) { (self.family, self.bytes, self.port) = (family, bytes, port) }
    public var description: String {
        if family == 2 { return bytes.map { String($0) }.joined(separator: ".") + ":\(port)" }
        let groups = stride(from: 0, to: bytes.count, by: 2).map { String(UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]), radix: 16) }
        return "[" + groups.joined(separator: ":") + "]:\(port)"
    }
    /// The length a sockaddr of this family has.
    var isWellFormed: Bool { (family == 2 && bytes.count == 4) || (family == 10 && bytes.count == 16) }

    /// A sockaddr_in (16 bytes) or sockaddr_in6 (28 bytes) of this address, port in network order.
    var socketAddressBytes: [UInt8] {
        precondition(isWellFormed, "\(self) is not an IPv4 or IPv6 address")
        var raw = [UInt8](repeating: 0, count: family == 2 ? 16 : 28)
        raw[0] = UInt8(family & 0xff); raw[1] = UInt8(family >> 8)
        raw[2] = UInt8(port >> 8); raw[3] = UInt8(port & 0xff)
        let start = family == 2 ? 4 : 8
        for (index, byte) in bytes.enumerated() { raw[start + index] = byte }
        return raw
    }
}

extension ForeignDescriptor {
    /// getsockname (local) or getpeername; nil for a family other than IPv4 and IPv6.
    public func inetAddress(peer: Bool) throws(SyscallError) -> InetAddress? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try checked(peer ? "getpeername" : "getsockname") {
            withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    peer ? getpeername(descriptor, $0, &length) : getsockname(descriptor, $0, &length)
                }
            }
        }
        return withUnsafeBytes(of: &storage) { raw -> InetAddress? in
            let family = Int32(raw.load(as: UInt16.self))
            let port = UInt16(raw[2]) << 8 | UInt16(raw[3])
            switch family {
            case 2: return InetAddress(family: 2, bytes: Array(raw[4..<8]), port: port)
            case 10: return InetAddress(family: 10, bytes: Array(raw[8..<24]), port: port)
            default: return nil
            }
        }
    }

    /// bind(2) or connect(2) to `address` (connect in repair mode makes the connection without a SYN).
    public func bindOrConnect(_ address: InetAddress, connect: Bool) throws(SyscallError) {
        let socketAddress = address.socketAddressBytes
        var storage = sockaddr_storage()
        let length: Int = withUnsafeMutableBytes(of: &storage) { raw in
            for (index, byte) in socketAddress.enumerated() { raw[index] = byte }
            return socketAddress.count
        }
        try retryingInterrupts(connect ? "connect(\(address))" : "bind(\(address))") {
            withUnsafePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect ? Glibc.connect(descriptor, $0, socklen_t(length)) : Glibc.bind(descriptor, $0, socklen_t(length))
                }
            }
        }
    }

    public func listen(backlog: Int32) throws(SyscallError) {
        try checked("listen(\(backlog))") { Glibc.listen(descriptor, backlog) }
    }

    /// Whether urgent data (MSG_OOB) waits to be read: recv(MSG_OOB | MSG_PEEK) answers the urgent byte
    /// when it is there, EAGAIN when the urgent pointer came before the byte, EINVAL when there is none
    /// (or SO_OOBINLINE put it in the stream; SIOCATMARK then says whether the stream is at the mark).
    /// Nothing is consumed.
    public func hasUrgentData() throws(SyscallError) -> Bool {
        var byte: UInt8 = 0
        let oob: Int32 = 0x1, peek: Int32 = 0x2, dontWait: Int32 = 0x40
        let received = recv(descriptor, &byte, 1, oob | peek | dontWait)
        if received >= 0 { return received > 0 }
        switch Glibc.errno {
        case EAGAIN: return true
        case EINVAL:
            var atMark: Int32 = 0
            try checked("ioctl(SIOCATMARK)") { csys_ioctl_pointer(descriptor, 0x8905, &atMark) }
            return atMark != 0
        default: throw SyscallError.current("recv(MSG_OOB|MSG_PEEK)")
        }
    }

    public func tcpInfo() throws(SyscallError) -> TCPInfo {
        var bytes = [UInt8](repeating: 0, count: 232)
        var length = socklen_t(bytes.count)
        try checked("getsockopt(TCP_INFO)") { bytes.withUnsafeMutableBytes { getsockopt(descriptor, TCPOption.level, TCPOption.info, $0.baseAddress, &length) } }
        guard length >= 32 else { throw SyscallError(call: "getsockopt(TCP_INFO) answered \(length) bytes", errno: .ioError) }
        func word(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[offset + $1]) << (8 * $1) } }
        // tcpi_snd_wscale is the low nibble of byte 6, tcpi_rcv_wscale the high one (bit fields, x86-64).
        return TCPInfo(state: bytes[0], options: bytes[5], sendWindowScale: bytes[6] & 0xf, receiveWindowScale: bytes[6] >> 4,
                       unacknowledged: word(24), selectivelyAcknowledged: word(28))
    }

    /// TCP_REPAIR on or off. Off without a window probe (TCP_REPAIR_OFF_NO_WP, -1) while the peer cannot
    /// hear it yet; off with one (0) when the connection goes live, so the peer learns the window at once.
    public func setRepair(_ on: Bool, windowProbe: Bool = true) throws(SyscallError) {
        try setSocketOption(level: TCPOption.level, name: TCPOption.repair, value: on ? 1 : (windowProbe ? 0 : -1))
    }

    /// TCP_REPAIR_QUEUE then TCP_QUEUE_SEQ: the sequence number of the selected queue's end (read), or of
    /// its start before the connection is made (set).
    public func queueSequence(_ queue: Int32) throws(SyscallError) -> UInt32 {
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        return UInt32(bitPattern: try socketOption(level: TCPOption.level, name: TCPOption.queueSequence))
    }

    public func setQueueSequence(_ queue: Int32, _ sequence: UInt32) throws(SyscallError) {
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        try setSocketOption(level: TCPOption.level, name: TCPOption.queueSequence, value: Int32(bitPattern: sequence))
    }

    /// SIOCOUTQ: bytes in the send queue (sent and not acknowledged, and not sent yet).
    public func sendQueueByteCount() throws(SyscallError) -> Int {
        var count: Int32 = 0
        try checked("ioctl(SIOCOUTQ)") { csys_ioctl_pointer(descriptor, 0x5411, &count) }
        return Int(count)
    }

    /// In repair mode: the bytes of the selected queue (TCP_RECV_QUEUE or TCP_SEND_QUEUE), left in place
    /// (MSG_PEEK); `expected` is what FIONREAD/SIOCOUTQ counted. Nil when it is more than `maximumByteCount`.
    public func peekRepairQueue(_ queue: Int32, expected: Int, maximumByteCount: Int) throws(SyscallError) -> [UInt8]? {
        guard expected <= maximumByteCount else { return nil }
        guard expected > 0 else { return [] }
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        var buffer = [UInt8](repeating: 0, count: expected + 1)
        let count = try retryingInterrupts("recv(MSG_PEEK, queue \(queue))") {
            buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, Int32(MSG_PEEK | MSG_DONTWAIT)) }
        }
        guard count == expected else {
            throw SyscallError(call: "recv(MSG_PEEK) of queue \(queue) gave \(count) bytes, \(expected) were counted", errno: .ioError)
        }
        return Array(buffer[0..<count])
    }

    /// In repair mode: appends `bytes` to the selected queue without sending anything.
    public func fillRepairQueue(_ queue: Int32, _ bytes: [UInt8]) throws(SyscallError) {
        guard !bytes.isEmpty else { return }
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        var done = 0
        var rounds = 0
        while done < bytes.count {
            rounds += 1
            guard rounds <= 1 << 16 else { throw SyscallError(call: "send(repair queue \(queue)) made no progress", errno: .ioError) }
            let count = try retryingInterrupts("send(repair queue \(queue))") {
                bytes.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress! + done, $0.count - done, Int32(MSG_DONTWAIT)) }
            }
            done += count
        }
    }

    public func repairWindow() throws(SyscallError) -> TCPRepairWindow {
        var words = [UInt32](repeating: 0, count: 5)
        var length = socklen_t(20)
        try checked("getsockopt(TCP_REPAIR_WINDOW)") {
            words.withUnsafeMutableBytes { getsockopt(descriptor, TCPOption.level, TCPOption.repairWindow, $0.baseAddress, &length) }
        }
        return TCPRepairWindow(sendWindowLastUpdate: words[0], sendWindow: words[1], maximumWindow: words[2], receiveWindow: words[3], receiveWindowUpdate: words[4])
    }

    public func setRepairWindow(_ window: TCPRepairWindow) throws(SyscallError) {
        let words = [window.sendWindowLastUpdate, window.sendWindow, window.maximumWindow, window.receiveWindow, window.receiveWindowUpdate]
        try checked("setsockopt(TCP_REPAIR_WINDOW)") {
            words.withUnsafeBytes { setsockopt(descriptor, TCPOption.level, TCPOption.repairWindow, $0.baseAddress, 20) }
        }
    }

    /// TCP_REPAIR_OPTIONS: (TCPOPT_* code, value) pairs, as the handshake negotiated them. Only on an
    /// ESTABLISHED socket in repair mode that has sent nothing yet.
    public func setRepairOptions(_ options: [(code: UInt32, value: UInt32)]) throws(SyscallError) {
        guard !options.isEmpty else { return }
        let words = options.flatMap { [$0.code, $0.value] }
        try checked("setsockopt(TCP_REPAIR_OPTIONS)") {
            words.withUnsafeBytes { setsockopt(descriptor, TCPOption.level, TCPOption.repairOptions, $0.baseAddress, socklen_t($0.count)) }
        }
    }

    /// connect(AF_UNSPEC): disconnects the socket (a listener stops listening; an established one in
    /// repair mode is dropped without a FIN or RST): its address and port are free for the target's
    /// socket, and the descriptor still holds a socket that can be connected (or listen) again.
    public func disconnect() throws(SyscallError) {
        var address = sockaddr()
        address.sa_family = sa_family_t(AF_UNSPEC)
        try retryingInterrupts("connect(AF_UNSPEC)") { Glibc.connect(descriptor, &address, socklen_t(MemoryLayout<sockaddr>.size)) }
    }
}
