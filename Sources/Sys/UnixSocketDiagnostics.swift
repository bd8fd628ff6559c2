// Why this file exists: a UNIX socket's peer is not in /proc, only in the kernel's socket diagnostics
// (NETLINK_SOCK_DIAG, unix_diag). One exact query by inode gives the peer's inode, the socket's type,
// state and shutdown mask. The answer is kernel input: every length is checked before it is used.
#if canImport(Glibc)
import Glibc
#endif

/// What unix_diag says about one UNIX socket.
public struct UnixSocketInfo: Equatable, Sendable {
    public var inode: UInt64
    /// SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5.
    public var type: UInt8
    /// TCP_ESTABLISHED 1, TCP_CLOSE 7, TCP_LISTEN 10 (the kernel reuses TCP's numbers).
    public var state: UInt8
    /// The peer's inode, 0 without one.
    public var peerInode: UInt64
    /// The socket has a name (bound), or not (socketpair, unbound).
    public var isBound: Bool
    /// RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2.
    public var shutdown: UInt8
}

public enum UnixSocketDiagnostics {
    /// The socket with `inode`, asked of the kernel; nil if it has no such UNIX socket (anymore).
    public static func socket(inode: UInt64) throws(SyscallError) -> UnixSocketInfo? {
        guard inode <= UInt64(UInt32.max) else { return nil }
        let netlink = try checked("socket(NETLINK_SOCK_DIAG)") { Glibc.socket(AF_NETLINK, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 4) }
        defer { close(netlink) }
        var request: [UInt8] = []
        func append<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { request.append(contentsOf: $0) } }
        // struct nlmsghdr: length, SOCK_DIAG_BY_FAMILY (20), NLM_F_REQUEST (1), sequence, port.
        append(UInt32(16 + 24)); append(UInt16(20)); append(UInt16(1)); append(UInt32(1)); append(UInt32(0))
        // struct unix_diag_req: AF_UNIX, protocol 0, pad, every state, the inode, UDIAG_SHOW_NAME |
        // UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN, and no cookie (INET_DIAG_NOCOOKIE twice).
        append(UInt8(1)); append(UInt8(0)); append(UInt16(0)); append(UInt32.max); append(UInt32(inode))
        append(UInt32(1 | 4 | 16)); append(UInt32.max); append(UInt32.max)
        let sent = request.withUnsafeBytes { send(netlink, $0.baseAddress, $0.count, 0) }
        if sent < 0 { throw SyscallError.current("send(unix_diag)") }
        var answer = [UInt8](repeating: 0, count: 8192)
        let received = try retryingInterrupts("recv(unix_diag)") {
            answer.withUnsafeMutableBytes { recv(netlink, $0.baseAddress, $0.count, 0) }
        }
        return try parse(Array(answer[0..<received]), inode: inode)
    }

    static func parse(_ bytes: [UInt8], inode: UInt64) throws(SyscallError) -> UnixSocketInfo? {
        func word32(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[offset + $1]) << (8 * $1) } }
        func word16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
        let malformed = SyscallError(call: "unix_diag answered a malformed message", errno: .ioError)
        guard bytes.count >= 16 else { throw malformed }
        let length = Int(word32(0))
        guard length >= 16, length <= bytes.count else { throw malformed }
        switch word16(4) {
        case 2:  // NLMSG_ERROR: an errno; ENOENT means no such socket.
            guard length >= 20 else { throw malformed }
            let error = Int32(bitPattern: word32(16))
            if error == -ENOENT || error == 0 { return nil }
            throw SyscallError(call: "unix_diag", errno: .init(rawValue: -error))
        case 20: break
        default: throw malformed
        }
        // struct unix_diag_msg: family, type, state, pad, inode, cookie[2]; then attributes.
        guard length >= 16 + 16 else { throw malformed }
        var info = UnixSocketInfo(inode: UInt64(word32(16 + 4)), type: bytes[17], state: bytes[18], peerInode: 0,
                                  isBound: false, shutdown: 0)
        guard info.inode == inode else { throw malformed }
        var offset = 32
        while offset + 4 <= length {
            let attributeLength = Int(word16(offset)), attributeType = word16(offset + 2)
            guard attributeLength >= 4, offset + attributeLength <= length else { throw malformed }
            let payload = offset + 4
            switch attributeType {
            case 0: info.isBound = attributeLength > 4                               // UNIX_DIAG_NAME
            case 2 where attributeLength >= 8: info.peerInode = UInt64(word32(payload))  // UNIX_DIAG_PEER
            case 6 where attributeLength >= 5: info.shutdown = bytes[payload]           // UNIX_DIAG_SHUTDOWN
            default: break
            }
            offset += (attributeLength + 3) & ~3
        }
        return info
    }
}
