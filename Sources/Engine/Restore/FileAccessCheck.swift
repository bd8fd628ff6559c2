// Why this file exists: the restorer reopens every path of the image as root (injected openat before
// the credentials drop; file mappings too). An image authenticated by the key can still have been
// written by an insider who holds the key but not root, asking for /etc/shadow on behalf of an
// unprivileged victim. So before any process is created, every path the restore would open is checked
// as the victim would open it (its filesystem IDs, groups and effective capabilities, from the
// authenticated credentials), and a path the victim could not open refuses the restore, naming it.
//
// One resolution serves the check and the open: the checking thread keeps each descriptor's file,
// directory or FIFO, each mapped file, the executable and the working directory open (O_PATH, resolved
// as the victim resolves it), and the restorer opens (or chdirs to) /proc/PID/fd/N instead of the path,
// so a path swapped between the check and the open (a symlink to /etc/shadow planted by someone who can
// write its directory) opens the file that was checked, not the one planted. Every process of a tree is
// checked, each with its own credentials.
//
// The kernel does not say with whose credentials a descriptor was opened: one inherited from a more
// privileged opener (stdout redirected by root into a root-owned 0644 file, then setuid) is refused
// too. That is the safe side: make such a file the victim's, or open it in the victim.
import Sys

extension ProcessState {
    /// What the restore of this state opens by path, what each open needs, and what the restorer opens
    /// through the checked file instead of the path (every one).
    func fileAccessRequests() -> [(what: String, request: FileAccessRequest, reopens: ReopenPaths.Opened?)] {
        var requests: [(String, FileAccessRequest, ReopenPaths.Opened?)] = []
        func need(forFlags flags: Int32) -> FileAccessRequest.Need {
            switch flags & OpenFlag.accessModeMask {
            case OpenFlag.writeOnly: .write
            case OpenFlag.readWrite: [.read, .write]
            default: .read
            }
        }
        for file in files.sorted(by: { $0.descriptor < $1.descriptor }) {
            let what = "fd \(file.descriptor)"
            switch file.kind {
            case .regular, .directory:
                requests.append((what, FileAccessRequest(path: file.path, need: need(forFlags: file.flags)), .descriptor(file.descriptor)))
            case .pipe(let end) where !file.path.isEmpty:
                requests.append((what + " (FIFO)", FileAccessRequest(path: file.path, need: end.isReadEnd ? .read : .write),
                                 .descriptor(file.descriptor)))
            case .deletedFile:
                // Recreated under its old name, then unlinked: the victim must be able to do that there.
                requests.append((what + " (deleted file, recreated in its directory)",
                                 FileAccessRequest(path: Self.directoryPath(of: file.path), need: [.write, .search]),
                                 .deletedFileDirectory(file.descriptor)))
            default:
                break
            }
        }
        // The executable needs only execute permission (exec maps it for a process that may not read
        // it), and its read-only mappings open through it; every other file mapping was mapped from an
        // open for reading (and writing, if shared and writable, or allowed to be made so by mprotect).
        if !executablePath.isEmpty {
            requests.append(("the executable", FileAccessRequest(path: executablePath, need: .search), .executable))
        }
        for mapping in mappings {
            guard case .file(let path) = mapping.kind else { continue }
            let writesBack = mapping.writesBack
            if path == executablePath && !writesBack { continue }
            requests.append(("the mapping at 0x\(String(mapping.start, radix: 16))",
                             FileAccessRequest(path: path, need: writesBack ? [.read, .write] : .read), .mapping(path: path, writable: writesBack)))
        }
        if !context.workingDirectory.isEmpty {
            requests.append(("the working directory", FileAccessRequest(path: context.workingDirectory, need: .search), .workingDirectory))
        }
        if context.rootDirectory != "/" {
            requests.append(("the root directory", FileAccessRequest(path: context.rootDirectory, need: .search), .rootDirectory))
        }
        return requests
    }

    static func directoryPath(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// Who opens the files: the victim's filesystem IDs, groups and effective capabilities.
    var fileAccessIdentity: FileAccessIdentity {
        FileAccessIdentity(fileSystemUserID: credentials.userIDs[3], fileSystemGroupID: credentials.groupIDs[3],
                           supplementaryGroups: credentials.supplementaryGroups, effectiveCapabilities: credentials.effective)
    }

    /// Refuses a state that would have the restorer open a path its victim could not, or give a carried
    /// file (deleted file, memfd) an owner the victim could not give it, in any process of its tree.
    /// Call after `validate` (it needs four IDs of each kind) and before any process is created. The
    /// files it checked stay open until the result is closed (or goes), for the restorer to reopen.
    @discardableResult
    public func checkFileAccess(path: String) throws(ImageError) -> CheckedFiles {
        var checked = CheckedFiles()
        do throws(ImageError) {
            for (ordinal, state) in liveProcesses {
                let (paths, reopened) = try state.checkOwnFileAccess(path: path, who: ordinal == 0 ? "" : "tree member pid \(state.processID): ")
                checked.paths.append(paths)
                checked.reopenPaths[state.processID] = reopened
            }
        } catch {
            checked.close()
            throw error
        }
        return checked
    }

    private func checkOwnFileAccess(path: String, who: String) throws(ImageError) -> (CheckedPaths?, ReopenPaths) {
        let identity = fileAccessIdentity
        let changesOwners = credentials.effective & (1 << 0) != 0  // CAP_CHOWN
        for file in files {
            let carried: CarriedFile
            switch file.kind {
            case .deletedFile(let file), .memfd(_, let file, _): carried = file
            default: continue
            }
            if !changesOwners && (carried.userID != identity.fileSystemUserID
                || (carried.groupID != identity.fileSystemGroupID && !identity.supplementaryGroups.contains(carried.groupID))) {
                throw .fileAccessDenied(path: path, reason: "\(who)fd \(file.descriptor) is a file owned by uid \(carried.userID) gid \(carried.groupID), "
                                        + "which the victim (uid \(identity.fileSystemUserID)) could not have made without CAP_CHOWN")
            }
        }
        let requests = fileAccessRequests()
        if requests.isEmpty { return (nil, ReopenPaths()) }
        let resolved = Result { () throws(SyscallError) in try FileAccess.resolve(requests.map(\.request), as: identity) }
        guard case .success(let (outcomes, paths)) = resolved else {
            throw .fileAccessDenied(path: path, reason: "\(who)its files cannot be checked as the victim would open them: \(resolved)")
        }
        var reopenPaths = ReopenPaths()
        for (index, ((what, request, reopens), outcome)) in zip(requests, outcomes).enumerated() {
            guard let errno = outcome else {
                if let reopens, let reopenPath = paths.reopenPath(index) { reopenPaths.record(reopens, at: reopenPath) }
                continue
            }
            paths.close()
            let needs = [(FileAccessRequest.Need.read, "reading"), (.write, "writing"), (.search, "search")]
                .filter { request.need.contains($0.0) }.map(\.1).joined(separator: " and ")
            throw .fileAccessDenied(path: path, reason: "\(who)\(what) opens \(request.path) for \(needs), which the victim (fsuid \(identity.fileSystemUserID), "
                                    + "fsgid \(identity.fileSystemGroupID)) may not on this node: \(errno)")
        }
        return (paths, reopenPaths)
    }
}

/// Where one process's checked files open again: /proc/PID/fd paths of the files its access check
/// resolved and holds, for its descriptors (by number), its file mappings (by path and whether they
/// write back), its executable and its working directory.
public struct ReopenPaths: Sendable {
    public enum Opened: Hashable, Sendable {
        case descriptor(Int32)
        /// The directory a deleted-but-open file (this descriptor's) is recreated in.
        case deletedFileDirectory(Int32)
        case mapping(path: String, writable: Bool)
        case executable
        case workingDirectory
        case rootDirectory
    }
    public private(set) var opened: [Opened: String] = [:]

    public init() {}

    /// A descriptor's checked file (nil: it has none, and opens as its kind says).
    public subscript(descriptor: Int32) -> String? { opened[.descriptor(descriptor)] }
    public subscript(opened: Opened) -> String? { self.opened[opened] }

    /// The first resolution of a path counts: several mappings of one file open the one file checked.
    mutating func record(_ what: Opened, at reopenPath: String) {
        if opened[what] == nil { opened[what] = reopenPath }
    }
}

/// The files a restore's access check resolved, held open for the restorer to reopen as the very files
/// checked: for each process (by its own PID), where each of its checked files opens again.
public struct CheckedFiles: Sendable {
    fileprivate(set) var paths: [CheckedPaths?] = []
    public fileprivate(set) var reopenPaths: [ProcessID: ReopenPaths] = [:]

    public init() {}

    /// Closes the held files (once the descriptors are restored, or the restore failed).
    public func close() { for case let held? in paths { held.close() } }
}

extension TargetProcess {
    /// Where the file the access check resolved for `opened` opens again: never the image's path, which
    /// may lead elsewhere by now (a symlink planted after the check).
    func checkedPath(_ opened: ReopenPaths.Opened, _ what: String) throws(RestoreError) -> String {
        guard let path = reopenPaths[opened] else { throw .layout("\(what) was not checked as the victim would open it") }
        return path
    }
}
