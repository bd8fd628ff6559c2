// Why this file exists: the restorer is root, and the paths it reopens for a restored process (its
// descriptors, its file mappings) come from an image. Opened as root they would open anything, so a
// restore first asks the kernel whether the *victim* could open each one: on a thread of its own that
// takes on the victim's filesystem user and group, its groups and its effective capabilities (Linux
// credentials are per thread at the syscall level; the thread ends with its checks, so no other thread
// ever runs as the victim), each path is checked with faccessat2(AT_EACCESS) as open(2) would check it.
// The check and the open must be about one file: the thread resolves each path once (O_PATH, as the
// victim resolves it), checks that inode, and keeps the descriptor; the restore then opens the file
// through /proc/PID/fd/N, which names that inode, not the path. Someone who swaps the path for a
// symlink to /etc/shadow between the check and the open changes nothing the restore opens.
internal import CSys
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Whom an access check is made for: what the kernel uses when a process opens a file.
public struct FileAccessIdentity: Equatable, Sendable {
    public var fileSystemUserID: UInt32
    public var fileSystemGroupID: UInt32
    public var supplementaryGroups: [UInt32]
    public var effectiveCapabilities: UInt64

    public init(fileSystemUserID: UInt32, fileSystemGroupID: UInt32, supplementaryGroups: [UInt32], effectiveCapabilities: UInt64) {
        (self.fileSystemUserID, self.fileSystemGroupID, self.supplementaryGroups, self.effectiveCapabilities) =
            (fileSystemUserID, fileSystemGroupID, supplementaryGroups, effectiveCapabilities)
    }
}

/// One path and what an open of it needs.
public struct FileAccessRequest: Equatable, Sendable {
    public struct Need: OptionSet, Equatable, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let read = Need(rawValue: 4)     // R_OK
        public static let write = Need(rawValue: 2)    // W_OK
        public static let search = Need(rawValue: 1)   // X_OK
    }
    public var path: String
    public var need: Need

    public init(path: String, need: Need) { (self.path, self.need) = (path, need) }
}

/// The files an access check resolved, held open (O_PATH) until the restore has reopened them.
/// Invariant: each descriptor is this process's, O_PATH|O_CLOEXEC, and closed exactly once (by `close`
/// or deinit); no process started later inherits one.
public final class CheckedPaths: @unchecked Sendable {
    private let lock = Lock()
    private var descriptors: [Int32?]

    init(descriptors: [Int32?]) { self.descriptors = descriptors }

    /// Where request `index`'s file opens again as the very inode checked (nil: it was refused, or closed).
    public func reopenPath(_ index: Int) -> String? {
        lock.withLock { descriptors[index].map { "/proc/\(getpid())/fd/\($0)" } }
    }

    public func close() {
        lock.withLock {
            for case let descriptor? in descriptors { _ = Glibc.close(descriptor) }
            descriptors = descriptors.map { _ in nil }
        }
    }

    deinit { close() }
}

public enum FileAccess {
    /// For each request, nil when `identity` may access the path as asked, else the errno the kernel
    /// gave (EACCES, ENOENT, ...). Throws when the checking thread cannot take on the identity.
    public static func check(_ requests: [FileAccessRequest], as identity: FileAccessIdentity) throws(SyscallError) -> [Errno?] {
        let (outcomes, paths) = try resolve(requests, as: identity)
        paths.close()
        return outcomes
    }

    /// `check`, keeping each admitted path's file open (O_PATH) for the restore to reopen.
    public static func resolve(_ requests: [FileAccessRequest], as identity: FileAccessIdentity) throws(SyscallError)
        -> (outcomes: [Errno?], paths: CheckedPaths) {
        final class Outcome: @unchecked Sendable { var result: Result<[Int32?], SyscallError> = .success([]); var errnos: [Errno?] = [] }
        let outcome = Outcome()
        let thread = try OSThread(name: "fammig-access", stackByteCount: 256 << 10) {
            var groups = identity.supplementaryGroups.map { gid_t($0) }
            let taken = groups.withUnsafeMutableBufferPointer { buffer in
                csys_thread_take_file_identity(uid_t(identity.fileSystemUserID), gid_t(identity.fileSystemGroupID),
                                               buffer.baseAddress, buffer.count, identity.effectiveCapabilities)
            }
            guard taken == 0 else {
                outcome.result = .failure(.current("taking on uid \(identity.fileSystemUserID) gid \(identity.fileSystemGroupID) to check file access"))
                return
            }
            var descriptors: [Int32?] = []
            for request in requests {
                let descriptor = csys_open_checked(request.path, request.need.rawValue)
                descriptors.append(descriptor >= 0 ? descriptor : nil)
                outcome.errnos.append(descriptor >= 0 ? nil : Errno(rawValue: Glibc.errno))
            }
            outcome.result = .success(descriptors)
        }
        thread.join()
        return (outcome.errnos, CheckedPaths(descriptors: try outcome.result.get()))
    }
}
