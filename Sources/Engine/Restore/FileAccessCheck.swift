// Why this file exists: the restorer reopens every path of the image as root (injected openat before
// the credentials drop; file mappings too). An image authenticated by the key can still have been
// written by an insider who holds the key but not root, asking for /etc/shadow on behalf of an
// unprivileged victim. So before any process is created, every path the restore would open is checked
// as the victim would open it (its filesystem IDs, groups and effective capabilities, from the
// authenticated credentials), and a path the victim could not open refuses the restore, naming it.
//
// The kernel does not say with whose credentials a descriptor was opened: one inherited from a more
// privileged opener (stdout redirected by root into a root-owned 0644 file, then setuid) is refused
// too. That is the safe side: make such a file the victim's, or open it in the victim.
import Sys

extension ProcessState {
    /// What the restore of this state opens by path, and what each open needs.
    func fileAccessRequests() -> [(what: String, request: FileAccessRequest)] {
        var requests: [(String, FileAccessRequest)] = []
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
                requests.append((what, FileAccessRequest(path: file.path, need: need(forFlags: file.flags))))
            case .pipe(let end) where !file.path.isEmpty:
                requests.append((what + " (FIFO)", FileAccessRequest(path: file.path, need: end.isReadEnd ? .read : .write)))
            case .deletedFile:
                // Recreated under its old name, then unlinked: the victim must be able to do that there.
                requests.append((what + " (deleted file, recreated in its directory)",
                                 FileAccessRequest(path: Self.directoryPath(of: file.path), need: [.write, .search])))
            default:
                break
            }
        }
        // The executable needs only execute permission (exec maps it for a process that may not read
        // it); every other file mapping was mapped from an open for reading (and writing, if shared
        // and writable).
        if !executablePath.isEmpty { requests.append(("the executable", FileAccessRequest(path: executablePath, need: .search))) }
        for mapping in mappings {
            guard case .file(let path) = mapping.kind, path != executablePath else { continue }
            let writesBack = mapping.shared && mapping.writable
            requests.append(("the mapping at 0x\(String(mapping.start, radix: 16))",
                             FileAccessRequest(path: path, need: writesBack ? [.read, .write] : .read)))
        }
        if !context.workingDirectory.isEmpty {
            requests.append(("the working directory", FileAccessRequest(path: context.workingDirectory, need: .search)))
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
    /// file (deleted file, memfd) an owner the victim could not give it. Call after `validate` (it
    /// needs four IDs of each kind) and before any process is created.
    public func checkFileAccess(path: String) throws(ImageError) {
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
                throw .fileAccessDenied(path: path, reason: "fd \(file.descriptor) is a file owned by uid \(carried.userID) gid \(carried.groupID), "
                                        + "which the victim (uid \(identity.fileSystemUserID)) could not have made without CAP_CHOWN")
            }
        }
        let requests = fileAccessRequests()
        if requests.isEmpty { return }
        let outcomes = Result { () throws(SyscallError) in try FileAccess.check(requests.map(\.request), as: identity) }
        guard case .success(let outcomes) = outcomes else {
            throw .fileAccessDenied(path: path, reason: "its files cannot be checked as the victim would open them: \(outcomes)")
        }
        for ((what, request), outcome) in zip(requests, outcomes) {
            guard let errno = outcome else { continue }
            let needs = [(FileAccessRequest.Need.read, "reading"), (.write, "writing"), (.search, "search")]
                .filter { request.need.contains($0.0) }.map(\.1).joined(separator: " and ")
            throw .fileAccessDenied(path: path, reason: "\(what) opens \(request.path) for \(needs), which the victim (fsuid \(identity.fileSystemUserID), "
                                    + "fsgid \(identity.fileSystemGroupID)) may not on this node: \(errno)")
        }
    }
}
