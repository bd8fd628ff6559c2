// Why this file exists: the kernel names what it shows in /proc/PID/maps and in /proc/PID/fd links
// with its own spellings: " (deleted)" after a file unlinked while open or mapped (a memfd and a shared
// memory object always carry it), "/memfd:NAME" for a memfd, "/SYSV%08x" for a SysV segment,
// "/dev/zero" for shared anonymous memory, "[heap]" and the like for special mappings. They are known
// here, once, and the engine asks typed questions.

/// A path as /proc shows it (a maps path column, or an fd link).
public struct KernelPath: Equatable, Sendable {
    public let text: String
    public init(_ text: String) { self.text = text }

    public static let deletedSuffix = " (deleted)"
    private static let memfdPrefix = "/memfd:"

    /// The file was unlinked while open or mapped (the kernel appended " (deleted)").
    public var isDeleted: Bool { text.hasSuffix(Self.deletedSuffix) }
    /// The path without the deleted suffix.
    public var name: String { isDeleted ? String(text.dropLast(Self.deletedSuffix.count)) : text }
    /// A memfd ("/memfd:NAME", deleted or not).
    public var isMemfd: Bool { text.hasPrefix(Self.memfdPrefix) }
    /// A memfd's own name (what memfd_create was given), or nil.
    public var memfdName: String? { isMemfd ? String(name.dropFirst(Self.memfdPrefix.count)) : nil }
    /// A SysV shared memory segment ("/SYSV" and its key in hex).
    public var isSysVSegment: Bool { text.hasPrefix("/SYSV") }
    /// Shared anonymous memory: the kernel backs it with an unlinked "/dev/zero".
    public var isSharedAnonymousObject: Bool { text == "/dev/zero" + Self.deletedSuffix }
    /// A mapping the kernel made and named in brackets ("[heap]", "[stack]", "[vdso]", ...).
    public var isSpecial: Bool { text.hasPrefix("[") }
    /// A path of the file tree that is no device, memfd or SysV segment (it may still be deleted).
    public var isFilePath: Bool { text.hasPrefix("/") && !text.hasPrefix("/dev/") && !isMemfd && !isSysVSegment }
}

extension MapsEntry {
    /// The path column, typed.
    public var kernelPath: KernelPath { KernelPath(path) }
}
