// Issue 12 item 2: descriptors (and file mappings, the executable, the working directory) are reopened
// only where the victim itself could open them. The restorer is root; the check runs on a thread that
// takes on the victim's filesystem IDs, groups and effective capabilities, before any process exists.
import Foundation
import Glibc
import Logging
import Testing
@testable import Engine
import Sys

/// plausibleState's victim as `userID`, with only paths that exist on every node.
func victimState(userID: UInt32, groupID: UInt32, effective: UInt64 = 0, files: [OpenFile]) -> ProcessState {
    var state = plausibleState(processID: ProcessID(4242), dataRange: 0x7f00_0000_0000..<0x7f00_0000_8000)
    state.credentials.userIDs = Array(repeating: userID, count: 4)
    state.credentials.groupIDs = Array(repeating: groupID, count: 4)
    state.credentials.supplementaryGroups = []
    (state.credentials.permitted, state.credentials.effective) = (effective, effective)
    state.files = files
    return state
}

func fileAccessRejection(_ state: ProcessState) -> String? {
    do throws(ImageError) {
        try state.checkFileAccess(path: "/dev/shm/test-image")
        return nil
    } catch {
        return "\(error)"
    }
}

/// Rewrites a complete image with its metadata changed (any length): what an insider who holds the key
/// but not root can do. Pages, generation and creator are kept; every code is made under `key`.
func rewriteImage(path: String, to newPath: String, key: MigrationKey, _ change: (inout ProcessState) -> Void) throws {
    let reader = try ImageReader.open(backend: try RealFAM.open(path: path, writable: false), key: key, requireComplete: true)
    var state = try ProcessState.decode(reader.metadata)
    change(&state)
    let metadata = state.encoded()
    let fam = try RealFAM.create(path: newPath, byteCount: ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: reader.pageCount),
                                 prefault: false)
    var writer = try ImageWriter.create(backend: fam, generation: reader.generation, metadata: metadata, pageAddresses: reader.pageAddresses,
                                        key: key, creator: reader.creator)
    writer.commitMetadata()
    for slot in 0..<reader.pageCount { fam.store(reader.loadPage(slot: slot), at: writer.layout.pageOffset(slot: slot)) }
    writer.flushPages(slots: 0..<reader.pageCount)
    writer.fence()
    for slot in 0..<reader.pageCount { writer.storeMark(slot: slot) }
    writer.commit()
}

@Suite struct FileAccessTests {
    static let nobody: UInt32 = 65534

    /// The gap between the check and the open, closed: the victim's own file passes the check, then
    /// someone who can write its directory swaps the path for a symlink to /etc/shadow. By the path, the
    /// root restorer would now open /etc/shadow; through the checked file it opens the victim's file.
    @Test func aPathSwappedAfterTheCheckStillOpensTheCheckedFile() throws {
        let directory = try ScratchDirectory(under: "/tmp")
        defer { directory.remove() }
        try #require(chmod(directory.path, 0o1777) == 0)
        let path = directory.path("notes")
        try #require(FileManager.default.createFile(atPath: path, contents: Data("the victim's own\n".utf8)))
        try #require(chown(path, Self.nobody, Self.nobody) == 0 && chmod(path, 0o600) == 0)
        let state = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 3, path: path, flags: OpenFlag.readOnly, position: 0)])
        let checked = try state.checkFileAccess(path: "/dev/shm/test-image")
        let reopenPath = try #require(checked.reopenPaths[state.processID]?[3], "no checked file for fd 3")

        try #require(unlink(path) == 0 && symlink("/etc/shadow", path) == 0)
        #expect(fileAccessRejection(state)?.contains("fd 3 opens \(path) for reading") == true, "a check now refuses the planted path")
        let shadow = try String(contentsOfFile: "/etc/shadow", encoding: .utf8)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == shadow, "the path, opened as root, is /etc/shadow now")
        #expect(try String(contentsOfFile: reopenPath, encoding: .utf8) == "the victim's own\n", "the checked file is not what opens")
        checked.close()
        // Closed: nothing names a checked file any more (the number itself may be reused at once by
        // another test of this process, so the path is not what to look at).
        #expect(checked.paths.allSatisfy { $0?.reopenPath(0) == nil }, "a checked file stays open after close")
    }

    /// The same gap for what the restorer opens besides descriptors: a file mapping, the executable, the
    /// working directory and the directory a deleted file is recreated in are each kept open by the
    /// check, so each path swapped afterwards (a file for a symlink to /etc/shadow, a directory for one
    /// to /root or /etc) still opens the one checked.
    @Test func aMappingExecutableAndWorkingDirectorySwappedAfterTheCheckStillOpenTheCheckedFiles() throws {
        let directory = try ScratchDirectory(under: "/tmp")
        defer { directory.remove() }
        try #require(chmod(directory.path, 0o1777) == 0)
        let (mapped, executable, working) = (directory.path("mapped"), directory.path("program"), directory.path("work"))
        try #require(FileManager.default.createFile(atPath: mapped, contents: Data("the victim's mapped file\n".utf8)))
        try #require(FileManager.default.createFile(atPath: executable, contents: Data("#!/bin/true\n".utf8)))
        try #require(mkdir(working, 0o700) == 0)
        let deletedIn = directory.path("deleted-in")
        try #require(mkdir(deletedIn, 0o700) == 0)
        for path in [mapped, executable, working, deletedIn] { try #require(chown(path, Self.nobody, Self.nobody) == 0) }
        try #require(chmod(mapped, 0o600) == 0 && chmod(executable, 0o700) == 0)
        let carried = CarriedFile(contents: Array("gone\n".utf8), mode: 0o600, userID: Self.nobody, groupID: Self.nobody)
        var state = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 4, path: deletedIn + "/old", flags: OpenFlag.readWrite, position: 0, kind: .deletedFile(carried))])
        state.executablePath = executable
        state.context.workingDirectory = working
        state.mappings.insert(Mapping(start: 0x50_0000, end: 0x50_1000, readable: true, writable: false, executable: false, shared: false,
                                      fileOffset: 0, kind: .file(path: mapped)), at: 1)
        state.mappings.insert(Mapping(start: 0x40_0000, end: 0x40_1000, readable: true, writable: false, executable: true, shared: false,
                                      fileOffset: 0, kind: .file(path: executable)), at: 0)
        let checked = try state.checkFileAccess(path: "/dev/shm/test-image")
        defer { checked.close() }
        let reopens = try #require(checked.reopenPaths[state.processID])
        let mappingPath = try #require(reopens[.mapping(path: mapped, writable: false)], "no checked file for the mapping")
        let executableOpen = try #require(reopens[.executable], "no checked file for the executable")
        let workingOpen = try #require(reopens[.workingDirectory], "no checked file for the working directory")
        let deletedInOpen = try #require(reopens[.deletedFileDirectory(4)], "no checked directory for the deleted file")

        for path in [mapped, executable] { try #require(unlink(path) == 0 && symlink("/etc/shadow", path) == 0) }
        try #require(rename(working, directory.path("work.moved")) == 0 && symlink("/root", working) == 0)
        try #require(rename(deletedIn, directory.path("deleted-in.moved")) == 0 && symlink("/etc", deletedIn) == 0)
        let shadow = try String(contentsOfFile: "/etc/shadow", encoding: .utf8)
        #expect(try String(contentsOfFile: mapped, encoding: .utf8) == shadow, "the mapping's path, opened as root, is /etc/shadow now")
        #expect(fileAccessRejection(state)?.contains("fd 4 (deleted file, recreated in its directory) opens \(deletedIn) for writing and search") == true,
                "a check now refuses the planted files: \(fileAccessRejection(state) ?? "nothing")")
        #expect(try String(contentsOfFile: mappingPath, encoding: .utf8) == "the victim's mapped file\n", "the mapping opens another file")
        #expect(try String(contentsOfFile: executableOpen, encoding: .utf8) == "#!/bin/true\n", "the executable opens another file")
        #expect(try ProcFS.readLink(workingOpen) == directory.path("work.moved"), "the working directory is another one")
        #expect(try ProcFS.readLink(deletedInOpen) == directory.path("deleted-in.moved"), "the deleted file would be made elsewhere")
    }

    /// Each process of a tree is checked with its own credentials: a member asking for /etc/shadow as
    /// nobody refuses the whole restore, naming the member.
    @Test func everyProcessOfATreeIsChecked() throws {
        var member = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 5, path: "/etc/shadow", flags: OpenFlag.readOnly, position: 0)])
        member.processID = ProcessID(4243)
        var root = victimState(userID: Self.nobody, groupID: Self.nobody, files: [])
        root.members = [.live(member)]
        let reason = try #require(fileAccessRejection(root))
        #expect(reason.contains("tree member pid 4243: fd 5 opens /etc/shadow for reading"), "\(reason)")
    }

    @Test func aPathTheVictimCanOpenPasses() {
        let state = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 0, path: "/dev/null", flags: OpenFlag.readWrite, position: 0),
            OpenFile(descriptor: 3, path: "/etc/passwd", flags: OpenFlag.readOnly, position: 12),
        ])
        #expect(fileAccessRejection(state) == nil)
    }

    @Test func rootOnlyFileForAnUnprivilegedVictimIsRefusedNamingIt() throws {
        let state = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 0, path: "/dev/null", flags: OpenFlag.readWrite, position: 0),
            OpenFile(descriptor: 5, path: "/etc/shadow", flags: OpenFlag.readOnly, position: 0),
        ])
        let reason = try #require(fileAccessRejection(state))
        #expect(reason.contains("fd 5 opens /etc/shadow for reading"), "\(reason)")
        #expect(reason.contains("fsuid 65534"), "\(reason)")
        #expect(reason.contains("could not open"), "\(reason)")
        // Writing a world-readable root file is refused too; reading it is not.
        let writing = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 4, path: "/etc/passwd", flags: OpenFlag.writeOnly | OpenFlag.closeOnExec, position: 0)])
        #expect(fileAccessRejection(writing)?.contains("fd 4 opens /etc/passwd for writing") == true)
    }

    /// Root is not enough: what counts is the victim's effective capabilities. uid 0 without
    /// CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH may not read another user's 0600 file; with them it may.
    @Test func capabilitiesDecideForRootToo() throws {
        let directory = try ScratchDirectory(under: "/dev/shm")
        defer { directory.remove() }
        try #require(chmod(directory.path, 0o755) == 0)
        let foreign = directory.path("foreign")
        try #require(FileManager.default.createFile(atPath: foreign, contents: Data("x".utf8)))
        try #require(chown(foreign, Self.nobody, Self.nobody) == 0 && chmod(foreign, 0o600) == 0)
        let file = [OpenFile(descriptor: 3, path: foreign, flags: OpenFlag.readOnly, position: 0)]
        let capDACOverride: UInt64 = 1 << 1, capDACReadSearch: UInt64 = 1 << 2
        #expect(fileAccessRejection(victimState(userID: 0, groupID: 0, effective: capDACOverride | capDACReadSearch, files: file)) == nil)
        #expect(fileAccessRejection(victimState(userID: 0, groupID: 0, effective: 0, files: file))?.contains("fd 3 opens \(foreign)") == true)
        #expect(fileAccessRejection(victimState(userID: Self.nobody, groupID: Self.nobody, files: file)) == nil, "its owner may")
    }

    @Test func mappingsExecutableAndWorkingDirectoryAreCheckedToo() throws {
        var mapped = victimState(userID: Self.nobody, groupID: Self.nobody, files: [])
        mapped.mappings.insert(Mapping(start: 0x50_0000, end: 0x50_1000, readable: true, writable: false, executable: false, shared: false,
                                       fileOffset: 0, kind: .file(path: "/etc/shadow")), at: 1)
        #expect(fileAccessRejection(mapped)?.contains("the mapping at 0x500000 opens /etc/shadow for reading") == true)
        var shared = victimState(userID: Self.nobody, groupID: Self.nobody, files: [])
        shared.mappings.insert(Mapping(start: 0x50_0000, end: 0x50_1000, readable: true, writable: true, executable: false, shared: true,
                                       fileOffset: 0, kind: .file(path: "/etc/passwd")), at: 1)
        #expect(fileAccessRejection(shared)?.contains("opens /etc/passwd for reading and writing") == true)
        var directory = victimState(userID: Self.nobody, groupID: Self.nobody, files: [])
        directory.context.workingDirectory = "/root"
        try #require(access("/root", F_OK) == 0)
        var rootMode = stat()
        try #require(stat("/root", &rootMode) == 0)
        if rootMode.st_mode & 0o001 == 0 {
            #expect(fileAccessRejection(directory)?.contains("the working directory opens /root for search") == true)
        }
    }

    @Test func carriedFileOwnedBySomeoneElseIsRefused() throws {
        let carried = CarriedFile(contents: Array("#!/bin/sh\n".utf8), mode: 0o4755, userID: 0, groupID: 0)
        let state = victimState(userID: Self.nobody, groupID: Self.nobody, files: [
            OpenFile(descriptor: 3, path: "/dev/shm/fammig-deleted", flags: OpenFlag.readWrite, position: 0, kind: .deletedFile(carried))])
        let reason = try #require(fileAccessRejection(state))
        #expect(reason.contains("fd 3 is a file owned by uid 0"), "\(reason)")
    }
}

extension ProcessTests {
    @Suite(.serialized) struct FileAccessCLITests {
        /// A victim that runs as nobody is checkpointed by root. The image, rewritten with the key (an
        /// insider who holds it but not root) to add a descriptor on /etc/shadow, is refused by
        /// `fammig restore` with exit 2 naming the path, and creates no process; the image as the
        /// source wrote it restores, as nobody, and the process runs to its end.
        @Test func restoreRefusesADescriptorTheVictimCouldNotOpen() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("sleeper-static")
            let arguments = ["--rounds", "60"]
            // The victim's output files are its own (in a directory it may search): it reopens them as itself.
            try #require(chmod(directory.path, 0o755) == 0)
            for name in ["victim.out", "victim.err"] {
                try #require(FileManager.default.createFile(atPath: directory.path(name), contents: nil))
                try #require(chown(directory.path(name), Self.nobody, Self.nobody) == 0)
            }
            let victim = leftovers.own(try SpawnedProgram("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--", program] + arguments,
                                                          standardOutputPath: directory.path("victim.out"),
                                                          standardErrorPath: directory.path("victim.err")))
            leftovers.expectProgram([program] + arguments)
            let victimID = victim.processID
            let started = pollUntil(timeout: .seconds(5)) {
                ((try? FileManager.default.attributesOfItem(atPath: directory.path("victim.out"))[.size] as? Int) ?? 0) > 0
            }
            try #require(started, "the victim printed nothing")

            let imagePath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            try requireVictimAlive(victimID)
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(victimID)", "--fam", imagePath, "--key-file", keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint failed: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(5)) == .killed(signal: SIGKILL))
            let key = try readKeyFile(keyPath)

            let shadowPath = directory.path("shadow.fam")
            try rewriteImage(path: imagePath, to: shadowPath, key: key) { state in
                let free = (state.files.map(\.descriptor).max() ?? 2) + 1
                state.files.append(OpenFile(descriptor: free, path: "/etc/shadow", flags: OpenFlag.readOnly, position: 0))
            }
            // The key vouches for every byte: only the access check stands in the way.
            let inspect = try leftovers.fammig("inspect", "--fam", shadowPath, "--key-file", keyPath)
            #expect(inspect.exitStatus == 0, "inspect: \(inspect.standardError)")
            let refused = try leftovers.fammig("restore", "--fam", shadowPath, "--key-file", keyPath)
            #expect(refused.exitStatus == 2 && !refused.killedBySignal, "restore: exit \(refused.exitStatus): \(refused.standardError)")
            #expect(refused.standardError.contains("opens /etc/shadow for reading"), "\(refused.standardError)")
            #expect(refused.standardError.contains("could not open"), "\(refused.standardError)")
            #expect(!refused.standardOutput.contains("restored pid"), "\(refused.standardOutput)")
            #expect(processLife(victimID) == .gone, "the refused restore left pid \(victimID)")

            let restore = try leftovers.fammig("restore", "--fam", imagePath, "--key-file", keyPath)
            try #require(restore.exitStatus == 0, "restore failed: \(restore.standardError)")
            #expect(try ProcFS.status(victimID)["Uid"]?.split(whereSeparator: \.isWhitespace) == ["65534", "65534", "65534", "65534"])
            #expect(pollUntil(timeout: .seconds(30)) { processLife(victimID) != .running }, "the restored process did not end")
            #expect(lastChecksum(inFile: directory.path("victim.out")) != nil, "the restored process did not finish its run")
        }

        /// On a real process: filemaps runs from a copy of its binary, in a working directory of its own,
        /// with its two mapped files in a directory of its own. It is checkpointed; the restorer opens the
        /// image (the access check runs there), and only then are the executable, both mapped files and
        /// the working directory swapped for symlinks to /etc/shadow and /root. The restore goes on and
        /// the restored process has the files that were checked (now under their moved names), none of
        /// the planted ones.
        @Test func aRestoreOpensTheCheckedFilesWhenPathsAreSwappedAfterTheCheck() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            try #require(chmod(directory.path, 0o755) == 0)
            let (program, work, data) = (directory.path("filemaps"), directory.path("work"), directory.path("data"))
            try #require(mkdir(work, 0o755) == 0 && mkdir(data, 0o755) == 0)
            try FileManager.default.copyItem(atPath: try TestPaths.testProgram("filemaps-static"), toPath: program)
            let arguments = ["--dir", data, "--rounds", "100000", "--pause-us", "20000"]
            let victim = leftovers.own(try SpawnedProgram("/bin/sh", ["-c", "cd \(work) && exec \(program) " + arguments.joined(separator: " ")],
                                                          standardOutputPath: directory.path("victim.out"),
                                                          standardErrorPath: directory.path("victim.err")))
            defer { victim.kill() }
            let victimID = victim.processID
            let started = pollUntil(timeout: .seconds(10)) {
                ((try? ProcFS.maps(victimID)) ?? []).filter { $0.path.hasPrefix(data + "/") }.count == 2
            }
            try #require(started, "filemaps did not map its files")
            let mappedFiles = Set(try ProcFS.maps(victimID).map(\.path).filter { $0.hasPrefix(data + "/") }).sorted()
            let imagePath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            try requireVictimAlive(victimID)
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(victimID)", "--fam", imagePath, "--key-file", keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint failed: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(5)) == .killed(signal: SIGKILL))

            let restorer = try Migration.target(MigrationPlan(mode: .nonlive, key: try readKeyFile(keyPath)), ports: TargetPorts(
                openBackend: { () throws(ImageError) in try RealFAM.openTrusted(path: imagePath) }, transport: nil,
                stubPath: try TestPaths.fammig(), observer: nil, clock: MonotonicClock(), timeline: MigrationTimeline(),
                logger: Logger(label: "swap-test"))).restorer
            try restorer.perform()
            guard case .spawn = restorer.state else { Issue.record("the restorer did not open the image first: \(restorer.state)"); return }
            for path in [program] + mappedFiles {
                try #require(rename(path, path + ".moved") == 0 && symlink("/etc/shadow", path) == 0)
            }
            try #require(rename(work, work + ".moved") == 0 && symlink("/root", work) == 0)
            for _ in 0..<100_000 {
                if case .finished = restorer.nextAction() { break }
                try restorer.perform()
            }
            let restoredID = try #require(restorer.restoredProcessID)
            defer { _ = Spawn.killAndReap(restoredID) }
            #expect(try ProcFS.readLink("/proc/\(restoredID)/exe") == program + ".moved")
            #expect(try ProcFS.readLink("/proc/\(restoredID)/cwd") == work + ".moved")
            let restoredPaths = Set(try ProcFS.maps(restoredID).map(\.path))
            for path in mappedFiles { #expect(restoredPaths.contains(path + ".moved"), "\(path) is not mapped from the checked file") }
            #expect(!restoredPaths.contains { $0.contains("shadow") || mappedFiles.contains($0) || $0 == program }, "\(restoredPaths.sorted())")
            #expect(ProcFS.isAlive(restoredID), "the restored process did not run on")
        }

        static let nobody: UInt32 = 65534
    }
}
