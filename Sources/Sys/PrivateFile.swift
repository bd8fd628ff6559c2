// Why this file exists: a migration key is handed from node to node as a small file that only its owner
// may read. Creating one must never follow a planted symlink or widen its mode through the umask, and
// reading one must report who owns it and who else may read it, from the descriptor that was read (not
// from a second look at the path). The policy (which owner, which modes) is the caller's.
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A small file read whole, with what fstat said about the very descriptor it was read through.
public struct PrivateFileContents: Sendable {
    public var bytes: [UInt8]
    public var ownerUserID: UInt32
    /// st_mode & 0o7777.
    public var permissionBits: UInt32
    public var isRegularFile: Bool
}

public enum PrivateFile {
    /// Creates `path` (it must not exist; a symlink there is refused by O_EXCL) with mode 0600 whatever
    /// the umask, writes `bytes` and syncs them. A file that could not be completed is removed.
    public static func create(path: String, bytes: [UInt8]) throws(SyscallError) {
        let descriptor = try retryingInterrupts("open(\(path), O_CREAT|O_EXCL)") {
            Glibc.open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, mode_t(0o600))
        }
        defer { _ = Glibc.close(descriptor) }
        do throws(SyscallError) {
            try checked("fchmod(\(path), 0600)") { fchmod(descriptor, 0o600) }
            var written = 0
            while written < bytes.count {
                let count = try retryingInterrupts("write(\(path))") {
                    bytes[written...].withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
                }
                written += count
            }
            try retryingInterrupts("fsync(\(path))") { fsync(descriptor) }
        } catch {
            _ = unlink(path)
            throw error
        }
    }

    /// Writes `bytes` to `path` (created, or truncated), with exactly `mode` whatever the umask, from
    /// its first byte on (fchmod before the write), never following a symlink at the last component.
    public static func write(path: String, bytes: [UInt8], mode: UInt32) throws(SyscallError) {
        let descriptor = try retryingInterrupts("open(\(path), O_CREAT|O_TRUNC)") {
            Glibc.open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, mode_t(mode))
        }
        defer { _ = Glibc.close(descriptor) }
        try checked("fchmod(\(path), \(String(mode, radix: 8)))") { fchmod(descriptor, mode_t(mode)) }
        var written = 0
        while written < bytes.count {
            let count = try retryingInterrupts("write(\(path))") {
                bytes[written...].withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
            }
            written += count
        }
    }

    /// What fstat says of a descriptor handed to this process (`--key-fd` of a writing command), so the
    /// caller can refuse a regular file that others may read before a key goes into it.
    public static func describe(descriptor: Int32) throws(SyscallError) -> PrivateFileContents {
        var status = stat()
        try checked("fstat(fd \(descriptor))") { fstat(descriptor, &status) }
        return PrivateFileContents(bytes: [], ownerUserID: status.st_uid, permissionBits: UInt32(status.st_mode) & 0o7777,
                                   isRegularFile: status.st_mode & S_IFMT == S_IFREG)
    }

    /// Removes a key file made by `create` (a failed migration's key is worth nothing); a file already
    /// gone is not an error.
    public static func remove(path: String) {
        _ = unlink(path)
    }

    /// Closes a descriptor handed to this process that is refused (it must not stay open for a process
    /// started later to inherit).
    public static func close(descriptor: Int32) {
        _ = Glibc.close(descriptor)
    }

    /// Writes `bytes` whole to a descriptor handed to this process, then closes it (a key written this way
    /// must not stay open for a process started later to inherit). EPIPE is an error like any other.
    public static func writeAndClose(descriptor: Int32, bytes: [UInt8]) throws(SyscallError) {
        defer { _ = Glibc.close(descriptor) }
        var written = 0
        while written < bytes.count {
            let count = try retryingInterrupts("write(fd \(descriptor))") {
                bytes[written...].withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
            }
            written += count
        }
    }

    /// Reads at most `maxByteCount` bytes of `path` without following a symlink at its last component
    /// and without blocking on a FIFO; the caller judges the owner and mode it reports.
    /// Reads a descriptor handed to this process (a pipe, a file) to its end, at most `maxByteCount + 1`
    /// bytes, then closes it: a key passed this way must not stay open for a process started later
    /// (the restorer's stub is this executable, exec'd) to inherit.
    public static func readAndClose(descriptor: Int32, maxByteCount: Int) throws(SyscallError) -> [UInt8] {
        defer { _ = Glibc.close(descriptor) }
        var buffer = [UInt8](repeating: 0, count: maxByteCount + 1)
        var total = 0
        while total < buffer.count {
            let count = try retryingInterrupts("read(fd \(descriptor))") {
                buffer.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress! + total, $0.count - total) }
            }
            if count == 0 { break }
            total += count
        }
        return Array(buffer[0..<total])
    }

    public static func read(path: String, maxByteCount: Int) throws(SyscallError) -> PrivateFileContents {
        let descriptor = try retryingInterrupts("open(\(path))") {
            Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        }
        defer { _ = Glibc.close(descriptor) }
        var status = stat()
        try checked("fstat(\(path))") { fstat(descriptor, &status) }
        var contents = PrivateFileContents(bytes: [], ownerUserID: status.st_uid, permissionBits: UInt32(status.st_mode) & 0o7777,
                                           isRegularFile: status.st_mode & S_IFMT == S_IFREG)
        guard contents.isRegularFile else { return contents }
        var buffer = [UInt8](repeating: 0, count: maxByteCount + 1)
        var total = 0
        while total < buffer.count {
            let count = try retryingInterrupts("read(\(path))") {
                buffer.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress! + total, $0.count - total) }
            }
            if count == 0 { break }
            total += count
        }
        // One byte more than allowed says "too long" without reading a huge file whole.
        contents.bytes = Array(buffer[0..<total])
        return contents
    }
}
