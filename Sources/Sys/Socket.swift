// Why this file exists: the source node and the target node talk over one TCP connection (post-copy page
// requests, pages, marks). This is the raw layer under the engine's TCPTransport: IPv4 only, every socket
// non-blocking and close-on-exec, every wait a poll with a timeout, so no thread of the engine can hang
// in a syscall the other node never answers. Expected outcomes (nothing to read yet, the peer closed, a
// timeout) are values; everything else throws `SyscallError` naming the call.
import SystemPackage
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// A TCP socket over IPv4: a listener or a connected stream.
///
/// Invariant: `descriptor` is a non-blocking, close-on-exec socket from `init` until `close()` sets it to
/// -1, and no other code closes it. The class is `@unchecked Sendable` because several threads may send
/// and receive on it at once (the kernel orders that); but `close()` must not run concurrently with any
/// other call, since a closed number is reused by the next open: the owner serializes `close()` with its
/// own locks, as `TCPTransport` does. `shutdown()` is the one call that is safe at any time: it wakes every
/// thread blocked on the socket, so the owner can take its locks and then close.
public final class TCPSocket: @unchecked Sendable {
    public private(set) var descriptor: Int32

    /// Between two connection attempts refused because the listener is not up yet.
    static let connectRetryDelayMilliseconds: Int32 = 10

    /// Takes ownership of an open socket.
    private init(descriptor: Int32) {
        precondition(descriptor >= 0, "TCPSocket of a closed descriptor")
        self.descriptor = descriptor
    }

    deinit { close() }

    /// Closes the socket; later calls do nothing. Must not race another call (see the invariant).
    public func close() {
        if descriptor >= 0 { Glibc.close(descriptor); self.descriptor = -1 }
    }

    /// Shuts both directions down: the peer reads end-of-stream, and every thread of this process blocked
    /// on the socket (poll, send) wakes up. Safe from any thread at any time before `close()`.
    public func shutdown() {
        // ENOTCONN (never connected, or the peer already reset) means there is nothing left to shut.
        if descriptor >= 0 { _ = Glibc.shutdown(descriptor, Int32(SHUT_RDWR)) }
    }

    /// The local port (the one the kernel chose when a listener asked for port 0); 0 once closed.
    public var localPort: UInt16 {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let result = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        // getsockname fails only on a closed descriptor (EBADF): there is no port then.
        return result == 0 ? UInt16(bigEndian: address.sin_port) : 0
    }

    /// The local IPv4 address as getsockname gives it ("0.0.0.0" for a listener on every interface); nil
    /// once closed. A listener binds only the host it was given, and this is how to see that.
    public var localHost: String? {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let result = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard result == 0 else { return nil }
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        guard inet_ntop(AF_INET, &address.sin_addr, &text, socklen_t(text.count)) != nil else { return nil }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// True when the local and the peer address are the same (a self-connect).
    private var isConnectedToItself: Bool {
        var localAddress = sockaddr_in()
        var peerAddress = sockaddr_in()
        var localLength = socklen_t(MemoryLayout<sockaddr_in>.size)
        var peerLength = socklen_t(MemoryLayout<sockaddr_in>.size)
        let localResult = withUnsafeMutablePointer(to: &localAddress) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &localLength) }
        }
        let peerResult = withUnsafeMutablePointer(to: &peerAddress) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(descriptor, $0, &peerLength) }
        }
        return localResult == 0 && peerResult == 0 && localAddress.sin_port == peerAddress.sin_port
            && localAddress.sin_addr.s_addr == peerAddress.sin_addr.s_addr
    }

    // MARK: Listening

    /// A listener bound to `host` (a dotted IPv4 address; "0.0.0.0" alone means every interface) and
    /// `port` (0: a free port the kernel picks, see `localPort`).
    public static func listen(host: String, port: UInt16, backlog: Int32 = 16) throws(SyscallError) -> TCPSocket {
        var address = try socketAddress(host: host, port: port)
        let socket = TCPSocket(descriptor: try makeDescriptor(call: "socket(listen \(host):\(port))"))
        var enabled: Int32 = 1
        // A restarted node must be able to listen again while the old connection sits in TIME_WAIT.
        try checked("setsockopt(SO_REUSEADDR)") {
            setsockopt(socket.descriptor, SOL_SOCKET, SO_REUSEADDR, &enabled, socklen_t(MemoryLayout<Int32>.size))
        }
        try checked("bind(\(host):\(port))") {
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(socket.descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        try checked("listen(\(host):\(port))") { Glibc.listen(socket.descriptor, backlog) }
        return socket
    }

    /// The next connection, or nil when none arrived within `timeoutMilliseconds` (negative: no limit).
    public func accept(timeoutMilliseconds: Int32) throws(SyscallError) -> TCPSocket? {
        let deadline = Self.deadline(afterMilliseconds: timeoutMilliseconds)
        // Bounded: a wake-up without a connection to take (the client left before we took it) is rare;
        // after this many the timeout is as good as spent.
        for _ in 0..<64 {
            guard try waitFor(events: Int16(POLLIN), until: deadline, call: "poll(accept)") else { return nil }
            let accepted = Self.acceptNonBlocking(descriptor)
            if accepted >= 0 {
                let socket = TCPSocket(descriptor: Int32(accepted))
                try socket.disableDelay()
                return socket
            }
            let error = SyscallError.current("accept4")
            switch error.errno {
            case .interrupted, .resourceTemporarilyUnavailable, .connectionAbort: continue
            default: throw error
            }
        }
        return nil
    }

    // Swift's Glibc module hides accept4 (it is _GNU_SOURCE), and accept + fcntl would leave a window in
    // which a spawn on another thread inherits the socket: so the raw syscall, flags set atomically.
    private static func acceptNonBlocking(_ listener: Int32) -> Int {
        #if arch(x86_64)
        let acceptFourNumber = 288
        #elseif arch(arm64)
        let acceptFourNumber = 242
        #endif
        let flags = Int(SOCK_NONBLOCK.rawValue) | Int(SOCK_CLOEXEC.rawValue)
        return csys_syscall6(acceptFourNumber, Int(listener), 0, 0, flags, 0, 0)
    }

    // MARK: Connecting

    /// A connection to `host:port`. A refused attempt is retried until `timeoutMilliseconds` passed,
    /// because the other node's listener may start a little after this one connects; the last refusal
    /// is thrown then. No answer at all within the timeout throws ETIMEDOUT.
    public static func connect(host: String, port: UInt16, timeoutMilliseconds: Int32) throws(SyscallError) -> TCPSocket {
        precondition(timeoutMilliseconds >= 0, "negative connect timeout")
        var address = try socketAddress(host: host, port: port)
        let call = "connect(\(host):\(port))"
        let deadline = Self.deadline(afterMilliseconds: timeoutMilliseconds)
        var lastRefusal: SyscallError?
        // Bounded: every refused attempt but the last sleeps the retry delay.
        let attemptLimit = Int(timeoutMilliseconds / connectRetryDelayMilliseconds) + 2
        for _ in 0..<attemptLimit {
            let socket = TCPSocket(descriptor: try makeDescriptor(call: "socket(\(call))"))
            let result = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(socket.descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            var outcome: SyscallError? = result == 0 ? nil : SyscallError.current(call)
            // Non-blocking: the handshake goes on in the background (also after EINTR); wait for it.
            if let pending = outcome, pending.errno == .nowInProgress || pending.errno == .interrupted {
                guard try socket.waitFor(events: Int16(POLLOUT), until: deadline, call: "poll(\(call))") else {
                    throw lastRefusal ?? SyscallError(call: call, errno: .timedOut)
                }
                outcome = try socket.pendingError(call: call)
            }
            if outcome == nil, socket.isConnectedToItself {
                // Retrying a local port in the ephemeral range with no listener can pick that very port as
                // the source and connect the socket to itself (TCP simultaneous open): that is a refusal too.
                outcome = SyscallError(call: call, errno: .connectionRefused)
            }
            guard let failure = outcome else {
                try socket.disableDelay()
                return socket
            }
            guard failure.errno == .connectionRefused else { throw failure }
            lastRefusal = failure
            socket.close()
            let remainingMilliseconds = Self.remainingMilliseconds(until: deadline)
            if remainingMilliseconds == 0 { throw failure }
            usleep(UInt32(min(remainingMilliseconds, connectRetryDelayMilliseconds)) * 1000)
        }
        throw lastRefusal ?? SyscallError(call: call, errno: .timedOut)
    }

    /// Sends segments as soon as they are written: a page request is a few bytes that a faulting thread
    /// waits on, and Nagle would hold it back for the previous segment's acknowledgement.
    private func disableDelay() throws(SyscallError) {
        var enabled: Int32 = 1
        try checked("setsockopt(TCP_NODELAY)") {
            setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &enabled, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// SO_ERROR after a non-blocking connect finished: nil when it connected.
    private func pendingError(call: String) throws(SyscallError) -> SyscallError? {
        var pending: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        try checked("getsockopt(SO_ERROR)") { getsockopt(descriptor, SOL_SOCKET, SO_ERROR, &pending, &length) }
        return pending == 0 ? nil : SyscallError(call: call, errno: Errno(rawValue: pending))
    }

    /// Kernel buffers of `byteCount` each way (SO_SNDBUFFORCE/SO_RCVBUFFORCE: past the sysctl limits, for
    /// CAP_NET_ADMIN), so that one side can send that much before the other reads.
    public func reserveBuffers(byteCount: Int32) throws(SyscallError) {
        for option in [SO_SNDBUFFORCE, SO_RCVBUFFORCE] {
            var value = byteCount
            try checked("setsockopt(\(option == SO_SNDBUFFORCE ? "SO_SNDBUFFORCE" : "SO_RCVBUFFORCE"))") {
                setsockopt(descriptor, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<Int32>.size))
            }
        }
    }

    // MARK: Sending and receiving

    /// Sends every byte. When the kernel's buffer is full it waits for room, but throws ETIMEDOUT after
    /// `stallTimeoutMilliseconds` without any progress (a peer that stopped reading; negative: no limit).
    /// EPIPE, not SIGPIPE, reports a peer that is gone.
    public func send(_ bytes: [UInt8], stallTimeoutMilliseconds: Int32 = 30_000) throws(SyscallError) {
        let call = "send(\(bytes.count) bytes)"
        var sentByteCount = 0
        // Bounded: each pass sends at least one byte, or waits at most the stall timeout and then throws.
        while sentByteCount < bytes.count {
            let result = bytes.withUnsafeBytes { buffer in
                Glibc.send(descriptor, buffer.baseAddress.map { $0 + sentByteCount }, buffer.count - sentByteCount,
                           Int32(MSG_NOSIGNAL))
            }
            if result > 0 { sentByteCount += result; continue }
            let error = SyscallError.current(call)
            switch error.errno {
            case .interrupted:
                continue
            case .resourceTemporarilyUnavailable:
                let deadline = Self.deadline(afterMilliseconds: stallTimeoutMilliseconds)
                guard try waitFor(events: Int16(POLLOUT), until: deadline, call: "poll(\(call))") else {
                    throw SyscallError(call: "\(call) after \(sentByteCount) sent", errno: .timedOut)
                }
            default:
                throw error
            }
        }
    }

    /// Reads what is available now into the start of `buffer`, at most `buffer.count` bytes, without
    /// waiting. Returns the byte count; 0 when the peer closed its side; nil when nothing is there now.
    public func receive(into buffer: inout [UInt8]) throws(SyscallError) -> Int? {
        precondition(!buffer.isEmpty, "receive into an empty buffer cannot tell data from end-of-stream")
        // Repeats only on EINTR; ends at data, end of stream, EAGAIN or an error.
        while true {
            let result = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if result >= 0 { return result }
            let error = SyscallError.current("recv")
            switch error.errno {
            case .interrupted: continue
            case .resourceTemporarilyUnavailable: return nil
            default: throw error
            }
        }
    }

    /// What is available now, at most `maximumByteCount` bytes: nil when nothing is there now, an empty
    /// array when the peer closed its side.
    public func receiveAvailable(maximumByteCount: Int) throws(SyscallError) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: maximumByteCount)
        guard let byteCount = try receive(into: &buffer) else { return nil }
        buffer.removeLast(buffer.count - byteCount)
        return buffer
    }

    /// Waits up to `timeoutMilliseconds` (negative: no limit) for something to read: data, end-of-stream
    /// or an error (so the caller's next receive reports it). False on timeout.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        do {
            return try waitFor(events: Int16(POLLIN), until: Self.deadline(afterMilliseconds: timeoutMilliseconds),
                               call: "poll(readable)")
        } catch {
            // poll itself failed (ENOMEM): say readable, and let the receive that follows report the socket.
            return true
        }
    }

    // MARK: Helpers

    /// Polls for `events` until `deadline`, across EINTR. True when any event (or an error or hang-up,
    /// which the next call reports) is pending; false when the deadline passed.
    private func waitFor(events: Int16, until deadline: ContinuousClock.Instant?, call: String) throws(SyscallError) -> Bool {
        var poller = pollfd(fd: descriptor, events: events, revents: 0)
        // Repeats only on EINTR, with the time left until the deadline.
        while true {
            let result = poll(&poller, 1, Self.remainingMilliseconds(until: deadline))
            if result > 0 { return true }
            if result == 0 { return false }
            let error = SyscallError.current(call)
            if error.errno != .interrupted { throw error }
        }
    }

    // Timeouts here are real time on purpose: this is the threaded driver's real network. Torture swaps
    // the whole transport for an in-memory one and never reaches this file.
    /// The instant `milliseconds` from now; nil (no deadline) for a negative timeout, as poll reads -1.
    private static func deadline(afterMilliseconds milliseconds: Int32) -> ContinuousClock.Instant? {
        milliseconds < 0 ? nil : ContinuousClock.now + .milliseconds(milliseconds)
    }

    /// Milliseconds left until `deadline`, for poll: -1 without a deadline, 0 once it passed.
    private static func remainingMilliseconds(until deadline: ContinuousClock.Instant?) -> Int32 {
        guard let deadline else { return -1 }
        let remaining = deadline - ContinuousClock.now
        guard remaining > .zero else { return 0 }
        let (seconds, attoseconds) = remaining.components
        // Round up, so a wait never ends just before its deadline and spins on a 0 ms poll.
        let milliseconds = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: milliseconds)
    }

    private static func makeDescriptor(call: String) throws(SyscallError) -> Int32 {
        try checked(call) {
            socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
    }

    /// `host` must be a dotted IPv4 address; anything else is EINVAL naming the host.
    private static func socketAddress(host: String, port: UInt16) throws(SyscallError) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            throw SyscallError(call: "inet_pton(\"\(host)\", not a dotted IPv4 address)", errno: .invalidArgument)
        }
        return address
    }

}
