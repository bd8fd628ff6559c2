// Why this file exists: an inotify watch is known to the kernel by its inode, and /proc/PID/fdinfo shows
// it only as a file handle (name_to_handle_at's opaque bytes) and a device: open_by_handle_at, from a
// mount of that device, gives the file back, and its /proc/self/fd link the path this node reaches it by.
// open_by_handle_at needs CAP_DAC_READ_SEARCH (fammig runs as root).
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum FileHandles {
    /// The path of the file `handle` (of `handleType`) names on the filesystem whose kernel device number
    /// (s_dev: major << 20 | minor, as fdinfo prints it) is `kernelDevice`; nil when no mount of it is
    /// visible here, or the file is gone or unreachable by a path.
    public static func path(kernelDevice: UInt64, handleType: Int32, handle: [UInt8]) -> String? {
        guard !handle.isEmpty, handle.count <= maximumHandleByteCount else { return nil }
        let major = kernelDevice >> 20, minor = kernelDevice & 0xfffff
        for mountPoint in mountPoints(major: major, minor: minor) {
            let mount = open(mountPoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC)  // an O_PATH one is refused (EBADF)
            guard mount >= 0 else { continue }
            defer { close(mount) }
            var record: [UInt8] = []
            LittleEndian.append(UInt32(handle.count), to: &record)
            LittleEndian.append(handleType, to: &record)
            record += handle
            let opened = record.withUnsafeMutableBytes { bytes in
                Int32(truncatingIfNeeded: csys_syscall6(openByHandleAt, Int(mount), Int(bitPattern: bytes.baseAddress), Int(pathOnly | O_CLOEXEC), 0, 0, 0))
            }
            guard opened >= 0 else { continue }
            defer { close(opened) }
            guard let path = try? ProcFS.readLink("/proc/self/fd/\(opened)"), path.hasPrefix("/"), !path.hasSuffix(" (deleted)") else { continue }
            return path
        }
        return nil
    }

    /// MAX_HANDLE_SZ.
    public static let maximumHandleByteCount = 128
    private static let openByHandleAt = 304
    /// O_PATH (Glibc's Swift module does not export it).
    private static let pathOnly: Int32 = 0o10000000

    /// Where a filesystem of that device is mounted, its whole-filesystem mounts (root "/") first.
    static func mountPoints(major: UInt64, minor: UInt64) -> [String] {
        guard let text = try? ProcFS.readText("/proc/self/mountinfo") else { return [] }
        var whole: [String] = [], parts: [String] = []
        for line in text.split(separator: "\n") {
            // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...
            let fields = line.split(separator: " ")
            guard fields.count >= 5 else { continue }
            let numbers = fields[2].split(separator: ":")
            guard numbers.count == 2, UInt64(numbers[0]) == major, UInt64(numbers[1]) == minor else { continue }
            let mountPoint = unescapeMountField(String(fields[4]))
            if fields[3] == "/" { whole.append(mountPoint) } else { parts.append(mountPoint) }
        }
        return whole + parts
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo.
    static func unescapeMountField(_ field: String) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(field.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "\\"), utf8.count >= 3, let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                utf8 = utf8.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
