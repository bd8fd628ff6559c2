// A process or thread ID as the kernel sees it, kept apart from other Int32s.
/// A Linux PID (or TID) of a live process.
public struct ProcessID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    public var description: String { String(rawValue) }
    public static func < (lhs: ProcessID, rhs: ProcessID) -> Bool { lhs.rawValue < rhs.rawValue }
}
