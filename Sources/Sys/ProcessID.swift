// A process or thread ID as the kernel sees it, kept apart from other Int32s.
import Glibc

/// A Linux PID (or TID) of a live process.
public struct ProcessID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    public var description: String { String(rawValue) }
    public static func < (lhs: ProcessID, rhs: ProcessID) -> Bool { lhs.rawValue < rhs.rawValue }
    /// This process.
    public static var current: ProcessID { ProcessID(getpid()) }
}

/// Who this process is, as the kernel sees it now: its effective user and group and its permitted
/// capabilities (from /proc/self/status; 0 when that cannot be read).
public struct ProcessIdentity: Equatable, Sendable {
    public var effectiveUserID: UInt32
    public var effectiveGroupID: UInt32
    public var permittedCapabilities: UInt64

    public static func current() -> ProcessIdentity {
        let status = (try? ProcFS.status(.current)) ?? [:]
        return ProcessIdentity(effectiveUserID: geteuid(), effectiveGroupID: getegid(),
                               permittedCapabilities: UInt64(status["CapPrm"] ?? "0", radix: 16) ?? 0)
    }
}
