// Why this file exists: a TCP socket is rebuilt (on the target, or in the victim when a checkpoint is
// abandoned) by one sequence of calls, and the same sequence must also be runnable by the source guard
// after its owner died (Sys/SourceGuard.swift), a C child that cannot run Swift. So the rebuild is
// written once against `TCPSocketCalls`: `ForeignDescriptor` makes each call at once, and
// `TCPSocketRecipe` writes it down as a csys_source_guard_operation for the guard to make later.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// The calls a TCP socket's rebuild makes, each named as on `ForeignDescriptor`.
public protocol TCPSocketCalls {
    func setSocketOption(level: Int32, name: Int32, value: Int32) throws(SyscallError)
    /// setsockopt only when getsockopt answers another value (IPV6_V6ONLY may be set only before bind).
    func setSocketOptionIfChanged(level: Int32, name: Int32, value: Int32) throws(SyscallError)
    func setRepair(_ on: Bool, windowProbe: Bool) throws(SyscallError)
    func setQueueSequence(_ queue: Int32, _ sequence: UInt32) throws(SyscallError)
    func bindOrConnect(_ address: InetAddress, connect: Bool) throws(SyscallError)
    /// bind, where EINVAL (the socket is bound already: a victim's own disconnected socket that was
    /// bound to a port explicitly) counts as done. getsockname cannot tell: it still shows a released port.
    func bindUnlessBound(_ address: InetAddress) throws(SyscallError)
    func setRepairOptions(_ options: [(code: UInt32, value: UInt32)]) throws(SyscallError)
    func fillRepairQueue(_ queue: Int32, _ bytes: [UInt8]) throws(SyscallError)
    func setRepairWindow(_ window: TCPRepairWindow) throws(SyscallError)
    func listen(backlog: Int32) throws(SyscallError)
}

extension ForeignDescriptor: TCPSocketCalls {
    public func setSocketOptionIfChanged(level: Int32, name: Int32, value: Int32) throws(SyscallError) {
        if try socketOption(level: level, name: name) != value { try setSocketOption(level: level, name: name, value: value) }
    }

    public func bindUnlessBound(_ address: InetAddress) throws(SyscallError) {
        do {
            try bindOrConnect(address, connect: false)
        } catch {
            guard error.errno == .invalidArgument else { throw error }
        }
    }
}

/// The calls of one rebuild, written down (in order) instead of made: csys_source_guard_operation
/// records the guard runs on the victim's socket if its owner dies (csys_source_guard_run_recipe).
public final class TCPSocketRecipe: TCPSocketCalls {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    private func append(_ kind: Int32, level: Int32 = 0, name: Int32 = 0, toleratedErrno: Int32 = 0, _ payload: [UInt8] = []) {
        var operation = csys_source_guard_operation(kind: UInt32(kind), toleratedErrno: toleratedErrno, level: level, name: name,
                                                    byteCount: UInt32(payload.count))
        withUnsafeBytes(of: &operation) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: payload)
    }

    private static func word(_ value: Int32) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }

    public func setSocketOption(level: Int32, name: Int32, value: Int32) throws(SyscallError) {
        append(Int32(CSYS_GUARD_SETSOCKOPT), level: level, name: name, Self.word(value))
    }

    public func setSocketOptionIfChanged(level: Int32, name: Int32, value: Int32) throws(SyscallError) {
        append(Int32(CSYS_GUARD_SETSOCKOPT_IF_CHANGED), level: level, name: name, Self.word(value))
    }

    public func setRepair(_ on: Bool, windowProbe: Bool) throws(SyscallError) {
        try setSocketOption(level: TCPOption.level, name: TCPOption.repair, value: on ? 1 : (windowProbe ? 0 : -1))
    }

    public func setQueueSequence(_ queue: Int32, _ sequence: UInt32) throws(SyscallError) {
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        try setSocketOption(level: TCPOption.level, name: TCPOption.queueSequence, value: Int32(bitPattern: sequence))
    }

    public func bindOrConnect(_ address: InetAddress, connect: Bool) throws(SyscallError) {
        append(Int32(connect ? CSYS_GUARD_CONNECT : CSYS_GUARD_BIND), address.socketAddressBytes)
    }

    public func bindUnlessBound(_ address: InetAddress) throws(SyscallError) {
        append(Int32(CSYS_GUARD_BIND), toleratedErrno: EINVAL, address.socketAddressBytes)
    }

    public func setRepairOptions(_ options: [(code: UInt32, value: UInt32)]) throws(SyscallError) {
        guard !options.isEmpty else { return }
        let words = options.flatMap { [$0.code, $0.value] }
        append(Int32(CSYS_GUARD_SETSOCKOPT), level: TCPOption.level, name: TCPOption.repairOptions, words.withUnsafeBytes { Array($0) })
    }

    public func fillRepairQueue(_ queue: Int32, _ bytes: [UInt8]) throws(SyscallError) {
        guard !bytes.isEmpty else { return }
        try setSocketOption(level: TCPOption.level, name: TCPOption.repairQueue, value: queue)
        append(Int32(CSYS_GUARD_SEND), bytes)
    }

    public func setRepairWindow(_ window: TCPRepairWindow) throws(SyscallError) {
        let words = [window.sendWindowLastUpdate, window.sendWindow, window.maximumWindow, window.receiveWindow, window.receiveWindowUpdate]
        append(Int32(CSYS_GUARD_SETSOCKOPT), level: TCPOption.level, name: TCPOption.repairWindow, words.withUnsafeBytes { Array($0) })
    }

    public func listen(backlog: Int32) throws(SyscallError) {
        append(Int32(CSYS_GUARD_LISTEN), level: backlog)
    }
}
