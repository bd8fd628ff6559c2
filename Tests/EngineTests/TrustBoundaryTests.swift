// Issue 12's trust boundaries, on real images and real processes. An image is authenticated with the
// migration's key (HMAC-SHA256 over header, metadata, page table, commit record and marks): an image
// under another key, or one whose metadata or commit record was changed and its checksums recomputed (the
// probe that used to restore as root with every capability), is refused with exit 2 and the cause named,
// and no process is created. Key files and image files that someone else could have read or written are
// refused. A restore never grants more than the image's authenticated creator had. And a restored process
// never runs on holes: killing the node that serves its faults kills it too.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

// MARK: Key files and tampering, as an attacker without the key would do it

/// Writes `key` the way `fammig checkpoint` does: one line, mode 0600.
func writeKeyFile(_ key: MigrationKey, to path: String) throws {
    let line = "fammig-migration-key-v1 " + key.bytes.map { String(format: "%02x", $0) }.joined() + "\n"
    guard FileManager.default.createFile(atPath: path, contents: Data(line.utf8), attributes: [.posixPermissions: 0o600]) else {
        throw TestSupportError.cannotCreate(path: path)
    }
    #expect(chmod(path, 0o600) == 0)
}

/// The key in a key file that `fammig` wrote.
func readKeyFile(_ path: String) throws -> MigrationKey {
    let text = try String(contentsOfFile: path, encoding: .utf8)
    let digits = Array(text.dropFirst("fammig-migration-key-v1 ".count).prefix(64))
    let bytes = stride(from: 0, to: digits.count, by: 2).compactMap { UInt8(String(digits[$0..<($0 + 2)]), radix: 16) }
    return try MigrationKey(bytes: bytes)
}

/// Polls until a key file is there whole (the source writes it right after it starts).
func waitForKeyFile(_ path: String) -> Bool {
    pollUntil(timeout: .seconds(10)) {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").hasSuffix("\n")
    }
}

/// What someone who can write the image file but does not hold the key can do: decode the metadata,
/// change it (to the same length), store it, and recompute every checksum (metadata, superblock).
func tamperMetadata(path: String, key: MigrationKey, _ change: (inout ProcessState) -> Void) throws {
    let reader = try ImageReader.open(backend: try RealFAM.open(path: path, writable: false), key: key, requireComplete: true)
    var state = try ProcessState.decode(reader.metadata)
    change(&state)
    let edited = state.encoded()
    try #require(edited.count == reader.metadata.count, "the edit changed the metadata's length")
    let layout = reader.layout
    let mapping = try SharedMapping.open(path: path, writable: true)
    let padded = edited + Array(repeating: 0, count: layout.paddedMetadataByteCount - edited.count)
    mapping.store(bytes: padded, at: layout.metadata.offset)
    // Checksums recomputed, as anyone can; not the codes (patchSuperblock would reseal them: it plays a
    // source that holds the key).
    mapping.storeUInt64(SharedMapping.digest(of: padded, seed: ImageDigestSeed.metadata(generation: reader.generation)),
                        at: ImageLayout.metadataDigestOffset)
    let digested = mapping.loadBytes(at: 0, count: ImageLayout.superblockDigestOffset)
    mapping.storeUInt64(SharedMapping.digest(of: digested, seed: ImageDigestSeed.superblock), at: ImageLayout.superblockDigestOffset)
}

/// The escalation of issue 12: uid and gid 0, every capability, no no_new_privs, no groups.
func escalate(_ state: inout ProcessState) {
    state.credentials.userIDs = [0, 0, 0, 0]
    state.credentials.groupIDs = [0, 0, 0, 0]
    state.credentials.supplementaryGroups = state.credentials.supplementaryGroups.map { _ in 0 }
    let all: UInt64 = 0x1ff_ffff_ffff
    (state.credentials.permitted, state.credentials.effective, state.credentials.inheritable) = (all, all, all)
    state.credentials.bounding = all
    state.credentials.noNewPrivileges = false
}

/// A complete image of `state` over `source`'s dumped pages, written under `key` by `creator`.
func writeAuthenticatedImage(path: String, state: ProcessState, source: SourceMemory, key: MigrationKey = testKey,
                             creator: ImageCreator, commit: Bool = true) throws {
    let metadata = state.encoded()
    let addresses = dumpedPageIndexes.map { source.address(pageIndex: $0) }
    let fam = try RealFAM.create(path: path, byteCount: ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: addresses.count),
                                 prefault: false)
    var writer = try ImageWriter.create(backend: fam, generation: testGeneration, metadata: metadata, pageAddresses: addresses,
                                        key: key, creator: creator)
    writer.commitMetadata()
    try writer.dumpPages(processID: selfProcessID, slots: 0..<addresses.count)
    if commit { writer.commit() }
}

/// What the restorer checks before it creates a process; nil when all of it passes.
func restoreRejection(_ path: String, key: MigrationKey = testKey) -> ImageError? {
    do throws(ImageError) {
        let reader = try ImageReader.open(backend: try RealFAM.openTrusted(path: path), key: key, requireComplete: true, deferPageChecks: true)
        _ = try reader.checkedProcessState()
        return nil
    } catch {
        return error
    }
}

@Suite struct ImageAuthenticationTests {
    @Test func imageUnderAnotherKeyIsRefusedAsWrongKey() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeImage(path: imagePath, source: source)
        #expect(openError(imagePath) == nil)
        let error = try #require(restoreRejection(imagePath, key: otherTestKey))
        #expect(error == .wrongKey(path: imagePath))
        #expect("\(error)".contains("wrong key"))
    }

    @Test func metadataEditedWithChecksumsRecomputedIsRefusedAsTampered() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeAuthenticatedImage(path: imagePath, state: plausibleState(processID: ProcessID(4242), dataRange: dataRange(of: source)),
                                    source: source, creator: .current())
        #expect(restoreRejection(imagePath) == nil, "the unedited image must restore")
        try tamperMetadata(path: imagePath, key: testKey, escalate)
        // Every checksum verifies (the error is not "corrupted"): only the code says it was changed.
        let error = try #require(restoreRejection(imagePath))
        #expect(error == .headerNotAuthentic(path: imagePath))
        #expect("\(error)".contains("tampered metadata"))
    }

    @Test func creatorRecordEditedIsRefusedAsTampered() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeAuthenticatedImage(path: imagePath, state: plausibleState(processID: ProcessID(4242), dataRange: dataRange(of: source)),
                                    source: source, creator: ImageCreator(userID: 1000, groupID: 1000, permittedCapabilities: 0x3))
        let mapping = try SharedMapping.open(path: imagePath, writable: true)
        mapping.store(bytes: [0, 0, 0, 0], at: ImageLayout.creatorOffset)  // "uid 0"
        #expect(restoreRejection(imagePath) == .headerNotAuthentic(path: imagePath))
    }

    /// A page replaced together with its mark, the marks checksum and the commit record's checksum
    /// recomputed: only the commit code catches it.
    @Test func pageAndMarkReplacedWithChecksumsRecomputedIsRefusedAsTamperedCommitRecord() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let writer = try writeImage(path: imagePath, source: source)
        let layout = writer.layout
        let mapping = try SharedMapping.open(path: imagePath, writable: true)
        let forged = [UInt8](repeating: 0xCC, count: ImageLayout.pageSize)
        mapping.store(bytes: forged, at: layout.pageOffset(slot: 0))
        let address = writer.pageAddresses[0]
        mapping.storeUInt64(SharedMapping.digest(of: forged, seed: ImageDigestSeed.page(generation: testGeneration, address: address)),
                            at: layout.markOffset(slot: 0))
        let marksDigest = mapping.digest(at: layout.marks.offset, count: layout.marksByteCount, seed: ImageDigestSeed.marks(generation: testGeneration))
        let record = ImageWriter.encodedCommitRecord(generation: testGeneration, pageCount: layout.pageCount, marksDigest: marksDigest)
        mapping.store(bytes: record, at: layout.commitRecord.offset)
        #expect(openError(imagePath) == .commitRecordNotAuthentic(path: imagePath))
        #expect("\(ImageError.commitRecordNotAuthentic(path: imagePath))".contains("tampered commit record"))
    }

    @Test func commitCodeFlippedIsRefused() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        let writer = try writeImage(path: imagePath, source: source)
        try flipByte(path: imagePath, at: writer.layout.commitRecord.offset + ImageLayout.commitRecordCodeOffset + 5)
        #expect(openError(imagePath) == .commitRecordNotAuthentic(path: imagePath))
        // Post-copy opens before the commit: the header alone is checked then, and it is intact.
        #expect(openError(imagePath, requireComplete: false) == nil)
    }

    /// There is no unauthenticated format: a version-1 image (no codes) is refused, not read.
    @Test func unauthenticatedFormatIsRefused() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeImage(path: imagePath, source: source)
        try patchSuperblock(path: imagePath, [(ImageLayout.versionOffset, 1 | UInt64(ImageLayout.pageSize) << 32)])
        #expect(openError(imagePath) == .unsupportedVersion(path: imagePath, version: 1))
    }

    /// The creator's record bounds what a restore grants, even for an image the key authenticates.
    @Test func credentialsBeyondTheAuthenticatedCreatorAreRefused() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let unprivileged = ImageCreator(userID: 1000, groupID: 1000, permittedCapabilities: 0)
        var own = plausibleState(processID: ProcessID(4242), dataRange: dataRange(of: source))
        own.credentials.userIDs = [1000, 1000, 1000, 1000]
        own.credentials.groupIDs = [1000, 1000, 1000, 1000]
        own.credentials.supplementaryGroups = [1000]
        (own.credentials.permitted, own.credentials.effective, own.credentials.inheritable, own.credentials.ambient) = (0, 0, 0, 0)
        let ownPath = files.path("own")
        try writeAuthenticatedImage(path: ownPath, state: own, source: source, creator: unprivileged)
        #expect(restoreRejection(ownPath) == nil, "a creator's own process must restore")

        var cases: [(String, (inout ProcessState) -> Void, String)] = []
        cases.append(("root", escalate, "capabilities"))
        cases.append(("uid 0", { $0.credentials.userIDs[1] = 0 }, "user ID 0"))
        cases.append(("gid 0", { $0.credentials.groupIDs[2] = 0 }, "group ID 0"))
        cases.append(("group 0", { $0.credentials.supplementaryGroups = [0] }, "group ID 0"))
        cases.append(("CAP_SYS_ADMIN", { $0.credentials.permitted = 1 << 21 }, "capabilities 0x200000"))
        for (name, change, fragment) in cases {
            var state = own
            change(&state)
            let path = files.path("beyond-\(name.replacingOccurrences(of: " ", with: "-"))")
            try writeAuthenticatedImage(path: path, state: state, source: source, creator: unprivileged)
            let error = restoreRejection(path)
            guard case .exceedsCreator(path, let reason)? = error else {
                Issue.record("\(name): \(String(describing: error))")
                continue
            }
            #expect(reason.contains(fragment), "\(name): \(reason)")
        }
    }

    @Test func imageFileSomeoneElseCouldWriteIsRefused() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeImage(path: imagePath, source: source)
        func rejection() -> ImageError? {
            do throws(ImageError) {
                _ = try ImageReader.open(backend: try RealFAM.openTrusted(path: imagePath), key: testKey, requireComplete: true)
                return nil
            } catch { return error }
        }
        #expect(rejection() == nil)
        try #require(chmod(imagePath, 0o620) == 0)
        guard case .untrustedFile(imagePath, let reason)? = rejection() else {
            Issue.record("a group-writable image was not refused")
            return
        }
        #expect(reason.contains("writable by group or others"))
        try #require(chmod(imagePath, 0o600) == 0 && chown(imagePath, 65534, 65534) == 0)
        guard case .untrustedFile(imagePath, let ownerReason)? = rejection() else {
            Issue.record("an image of another user was not refused")
            return
        }
        #expect(ownerReason.contains("belongs to uid 65534"))
    }

    /// The key never goes into FAM, and its identifier gives nothing of it away.
    @Test func keyIsNotInTheImage() throws {
        let files = ScratchFiles()
        defer { files.removeAll() }
        let source = try SourceMemory(path: files.path("source"))
        let imagePath = files.path("image")
        try writeImage(path: imagePath, source: source)
        let image = [UInt8](try Data(contentsOf: URL(fileURLWithPath: imagePath)))
        #expect(!contains(image, testKey.bytes))
        #expect(!contains(image, Array(testKey.bytes.prefix(8))))
        #expect(testKey.identifier != Array(testKey.bytes.prefix(ImageLayout.keyIdentifierByteCount)))
    }
}

func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return false }
    return (0...(haystack.count - needle.count)).contains { haystack[$0..<($0 + needle.count)].elementsEqual(needle) }
}

// MARK: The commands

extension ProcessTests {
    @Suite(.serialized) struct TrustBoundaryCLITests {
        /// A victim that runs as nobody (uid 65534, no capabilities) is checkpointed by root; then every
        /// kind of refusal: another key, a key file others may read or that another user owns, an image
        /// others may write or that another user owns, and issue 12's probe (uid 0, every capability, no
        /// no_new_privs, checksums recomputed). Each is exit 2 with the cause named and creates no
        /// process; the image itself then still restores, as nobody.
        @Test func restoreAndInspectRefuseWhatTheKeyDoesNotVouchFor() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("sleeper-static")
            let arguments = ["--rounds", "60"]
            // The victim's output files are its own: a restore reopens them as the victim (item 2).
            try #require(chmod(directory.path, 0o755) == 0)
            for name in ["victim.out", "victim.err"] {
                try #require(FileManager.default.createFile(atPath: directory.path(name), contents: nil))
                try #require(chown(directory.path(name), 65534, 65534) == 0)
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
            #expect(try ProcFS.status(victimID)["Uid"]?.hasPrefix("65534") == true)

            let imagePath = directory.path("image.fam")
            let keyPath = directory.path("migration.key")
            try requireVictimAlive(victimID)
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(victimID)", "--fam", imagePath, "--key-file", keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint failed: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(5)) == .killed(signal: SIGKILL))
            let keyAttributes = try FileManager.default.attributesOfItem(atPath: keyPath)
            #expect((keyAttributes[.posixPermissions] as? Int) == 0o600, "key file mode \(String(describing: keyAttributes[.posixPermissions]))")
            let key = try readKeyFile(keyPath)
            let image = try Data(contentsOf: URL(fileURLWithPath: imagePath))
            #expect(!contains([UInt8](image), key.bytes), "the key is in the FAM image")

            let inspect = try leftovers.fammig("inspect", "--fam", imagePath, "--key-file", keyPath)
            try #require(inspect.exitStatus == 0, "inspect: \(inspect.standardError)")
            #expect(inspect.standardOutput.contains("HMAC-SHA256 OK"))
            #expect(inspect.standardOutput.contains("creator         uid 0"))

            // Each refusal: (what, the arguments after the command, what stderr must say).
            var refusals: [(String, [String], String)] = []
            let otherKeyPath = directory.path("other.key")
            try writeKeyFile(MigrationKey.generate(), to: otherKeyPath)
            refusals.append(("another key", ["--fam", imagePath, "--key-file", otherKeyPath], "wrong key"))
            let readableKeyPath = directory.path("readable.key")
            try FileManager.default.copyItem(atPath: keyPath, toPath: readableKeyPath)
            try #require(chmod(readableKeyPath, 0o644) == 0)
            refusals.append(("a key others may read", ["--fam", imagePath, "--key-file", readableKeyPath], "mode 644"))
            let foreignKeyPath = directory.path("foreign.key")
            try FileManager.default.copyItem(atPath: keyPath, toPath: foreignKeyPath)
            try #require(chmod(foreignKeyPath, 0o600) == 0 && chown(foreignKeyPath, 65534, 65534) == 0)
            refusals.append(("a key of another user", ["--fam", imagePath, "--key-file", foreignKeyPath], "belongs to uid 65534"))
            let linkedKeyPath = directory.path("linked.key")
            try #require(symlink(keyPath, linkedKeyPath) == 0)
            refusals.append(("a symlinked key", ["--fam", imagePath, "--key-file", linkedKeyPath], "symbolic link"))
            refusals.append(("no key file", ["--fam", imagePath, "--key-file", directory.path("missing.key")], "cannot read the key file"))
            let writableImagePath = directory.path("writable.fam")
            try image.write(to: URL(fileURLWithPath: writableImagePath))
            try #require(chmod(writableImagePath, 0o666) == 0)
            refusals.append(("an image others may write", ["--fam", writableImagePath, "--key-file", keyPath], "writable by group or others"))
            let foreignImagePath = directory.path("foreign.fam")
            try image.write(to: URL(fileURLWithPath: foreignImagePath))
            try #require(chmod(foreignImagePath, 0o600) == 0 && chown(foreignImagePath, 65534, 65534) == 0)
            refusals.append(("an image of another user", ["--fam", foreignImagePath, "--key-file", keyPath], "belongs to uid 65534"))
            let tamperedImagePath = directory.path("tampered.fam")
            try image.write(to: URL(fileURLWithPath: tamperedImagePath))
            try tamperMetadata(path: tamperedImagePath, key: key, escalate)
            refusals.append(("uid 0 and every capability", ["--fam", tamperedImagePath, "--key-file", keyPath], "tampered metadata"))

            for (what, arguments, fragment) in refusals {
                for command in ["restore", "inspect"] {
                    let outcome = try leftovers.fammig([command] + arguments)
                    #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "\(command) of \(what): exit \(outcome.exitStatus): \(outcome.standardError)")
                    #expect(outcome.standardError.contains(fragment), "\(command) of \(what): \(outcome.standardError)")
                    #expect(!outcome.standardOutput.contains("restored pid"), "\(command) of \(what): \(outcome.standardOutput)")
                    #expect(processLife(victimID) == .gone, "\(command) of \(what) left pid \(victimID) running")
                }
            }

            // The image itself is intact and restores, with the victim's own credentials.
            let restore = try leftovers.fammig("restore", "--fam", imagePath, "--key-file", keyPath)
            try #require(restore.exitStatus == 0, "restore failed: \(restore.standardError)")
            let status = try ProcFS.status(victimID)
            #expect(status["Uid"]?.split(whereSeparator: \.isWhitespace) == ["65534", "65534", "65534", "65534"], "Uid: \(status["Uid"] ?? "?")")
            #expect(status["CapEff"] == "0000000000000000" && status["CapPrm"] == "0000000000000000", "\(status)")
            #expect(pollUntil(timeout: .seconds(30)) { processLife(victimID) != .running }, "the restored process did not end")
            #expect(lastChecksum(inFile: directory.path("victim.out")) != nil, "the restored process did not finish its run")
        }

        /// An authenticated image whose creator was an unprivileged user, of a process that claims root:
        /// `fammig restore` refuses it although the key vouches for every byte.
        @Test func restoreRefusesCredentialsBeyondTheCreator() throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let source = try SourceMemory(path: files.path("source"))
            let imagePath = files.path("image")
            let claimedProcessID = try UntrustedInputCLITests.freeProcessID()
            var state = plausibleState(processID: claimedProcessID, dataRange: dataRange(of: source))
            escalate(&state)
            try writeAuthenticatedImage(path: imagePath, state: state, source: source,
                                        creator: ImageCreator(userID: 1000, groupID: 1000, permittedCapabilities: 0))
            let keyPath = files.path("key")
            try writeKeyFile(testKey, to: keyPath)
            for command in ["restore", "inspect"] {
                let outcome = try leftovers.fammig(command, "--fam", imagePath, "--key-file", keyPath)
                #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "\(command): exit \(outcome.exitStatus): \(outcome.standardError)")
                #expect(outcome.standardError.contains("exceeds what the image's creator had"), "\(command): \(outcome.standardError)")
            }
            #expect(processLife(claimedProcessID) == .gone)
        }

        /// postcopy-fam, the target given a key file of another migration: the handshake fails both ways
        /// (exit 2, the peer "did not prove" the key) before anything moves; the target creates no process,
        /// the source refuses the connection and, no other target coming, gives up before it froze anything,
        /// so the victim runs on untouched, and neither the FAM file nor the key file is left behind.
        @Test func targetWithAnotherKeyRefusesAndTheVictimRunsOn() throws {
            let program = try TestPaths.testProgram("memwalk-static")
            let arguments = ["--mib", "16", "--steps", "400000", "--pause-us", "20000"]
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let outputPath = directory.path("victim.out")
            let famPath = "/dev/shm/fammig-wrongkey-\(getpid()).img"
            defer { try? FileManager.default.removeItem(atPath: famPath) }
            let launched = try leftovers.fammig(["launch", "--output", outputPath, "--", program] + arguments)
            let victim = try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)))
            let victimHandle = try ProcessHandle(ProcessID(victim))  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            usleep(300_000)

            let port = 21000 + Int(getpid() % 2000)
            let keyPath = directory.path("migration.key")
            try requireVictimAlive(victim)
            let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["source", "--pid", "\(victim)", "--mode", "postcopy-fam", "--fam", famPath,
                                                           "--key-file", keyPath, "--listen", "127.0.0.1:\(port)", "--accept-timeout", "5"],
                                                          standardOutputPath: directory.path("source.out"),
                                                          standardErrorPath: directory.path("source.err")))
            try #require(waitForKeyFile(keyPath), "the source wrote no key file")
            let wrongKeyPath = directory.path("wrong.key")
            try writeKeyFile(MigrationKey.generate(), to: wrongKeyPath)
            let target = try leftovers.fammig(["target", "--mode", "postcopy-fam", "--fam", famPath, "--key-file", wrongKeyPath,
                                               "--connect", "127.0.0.1:\(port)", "--pid-namespace", "fresh"])
            #expect(target.exitStatus == 2 && !target.killedBySignal, "target: exit \(target.exitStatus): \(target.standardError)")
            #expect(target.standardError.contains("did not accept this node's proof of the key"), "target: \(target.standardError)")
            #expect(!target.standardOutput.contains("restored pid"))
            let sourceOutcome = try source.waitForExit(timeout: .seconds(30))
            #expect(sourceOutcome.exitStatus != 0 && !sourceOutcome.killedBySignal, "source: \(sourceOutcome.standardError)")

            #expect(processLife(ProcessID(victim)) == .running, "the victim was lost")
            #expect(try ProcFS.status(ProcessID(victim))["TracerPid"] == "0", "the victim is still frozen")
            let printedBefore = (try? String(contentsOfFile: outputPath, encoding: .utf8))?.count ?? 0
            #expect(pollUntil(timeout: .seconds(10)) { ((try? String(contentsOfFile: outputPath, encoding: .utf8))?.count ?? 0) > printedBefore },
                    "the victim does not run on")
            #expect(!FileManager.default.fileExists(atPath: famPath), "the FAM file was left behind")
            #expect(!FileManager.default.fileExists(atPath: keyPath), "the failed migration's key file was left behind")
        }

        /// postcopy-fam across two processes: once the restored process runs, the target-side fammig (its
        /// fault server) is killed with SIGKILL while pages are still missing. The restored process must
        /// die with it, killed, never reading a missing page as zeros (memwalk checks every page it reads
        /// and would report a self-check failure); the watchdog must be gone too.
        @Test func restoredProcessDiesWithItsFaultServer() throws {
            let program = try TestPaths.testProgram("memwalk-static")
            // 2500 steps a second over 16384 pages: pages the walk has not yet touched remain for a minute.
            let arguments = ["--mib", "64", "--steps", "4000000", "--pause-us", "200000"]
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            leftovers.expectProgram([program] + arguments)
            let outputPath = directory.path("victim.out")
            let famPath = "/dev/shm/fammig-holes-\(getpid()).img"
            defer { try? FileManager.default.removeItem(atPath: famPath) }
            let launched = try leftovers.fammig(["launch", "--output", outputPath, "--", program] + arguments)
            let victim = try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)))
            let victimHandle = try ProcessHandle(ProcessID(victim))  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            usleep(500_000)

            let port = 19000 + Int(getpid() % 2000)
            let keyPath = directory.path("migration.key")
            try requireVictimAlive(victim)
            let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["source", "--pid", "\(victim)", "--mode", "postcopy-fam", "--fam", famPath,
                                                           "--key-file", keyPath, "--listen", "127.0.0.1:\(port)"],
                                                          standardOutputPath: directory.path("source.out"),
                                                          standardErrorPath: directory.path("source.err")))
            try #require(waitForKeyFile(keyPath), "the source wrote no key file")
            // Pages only on faults (no push): the target keeps missing pages for as long as the walk runs.
            let targetArguments = ["target", "--mode", "postcopy-fam", "--fam", famPath, "--key-file", keyPath, "--push", "off",
                                   "--connect", "127.0.0.1:\(port)", "--pid-namespace", "fresh"]
            let target = leftovers.own(try StartedProcess(try TestPaths.fammig(), targetArguments,
                                                          standardOutputPath: directory.path("target.out"),
                                                          standardErrorPath: directory.path("target.err")))
            // The source is done once the image is complete; the restored process runs on faults.
            let sourceOutcome = try source.waitForExit(timeout: .seconds(60))
            #expect(sourceOutcome.exitStatus == 0, "source: \(sourceOutcome.standardError)")
            // The target's child by its name (its command line lives in pages that may not be in yet).
            func children(named name: String) -> [ProcessID] {
                allProcessIDs().filter { candidate in
                    guard let status = try? ProcFS.status(candidate) else { return false }
                    return status["Name"] == name && status["PPid"] == "\(target.processID)"
                }
            }
            var restored: ProcessID?
            let resumed = pollUntil(timeout: .seconds(20)) {
                restored = children(named: "memwalk-static").first
                guard let restored, let status = try? ProcFS.status(restored) else { return false }
                return status["TracerPid"] == "0" && processLife(restored) == .running
            }
            let targetErrors = { (try? String(contentsOfFile: directory.path("target.err"), encoding: .utf8)) ?? "" }
            let restoredID = try #require(restored, "no restored process; target: \(targetErrors())")
            try #require(resumed, "the restored process never ran; target: \(targetErrors())")
            usleep(300_000)
            try #require(target.process.isRunning, "the target finished before it could be killed: \(targetErrors())")
            let watchdogs = children(named: "fammig-watchdog")

            target.kill()
            let ended = pollUntil(timeout: .seconds(5)) { processLife(restoredID) != .running }
            #expect(ended, "the restored process runs on without its fault server")
            let life = processLife(restoredID)
            #expect(life == .gone || life == .zombie(exitCode: nil), "the restored process ended by itself (\(life)), not killed")
            let errors = (try? String(contentsOfFile: outputPath + ".err", encoding: .utf8)) ?? ""
            let output = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
            #expect(!errors.contains("selfcheck FAILED") && !output.contains("checksum="), "the restored process read missing pages: \(errors)")
            #expect(!watchdogs.isEmpty, "no watchdog was running")
            #expect(pollUntil(timeout: .seconds(10)) { watchdogs.allSatisfy { processLife($0) != .running } }, "a watchdog is left running")
        }

        /// The first connection no longer wins: a local process connects to `fammig source` before the
        /// target and sends the `complete` frame that used to make the source exit "migrated" and kill
        /// the victim. It is refused (it cannot prove the key); the real target then connects and the
        /// migration completes, the process ending with the checksum of an unmigrated run.
        @Test func aRoguePeerConnectingFirstIsRefusedAndTheTargetStillMigrates() throws {
            let program = try TestPaths.testProgram("memwalk-static")
            // 6 s of work: the source keeps it running through the rogue's refusal and the target's start
            // (1.2 s was too short at load 14: it ended by itself, and the source found no such process).
            let arguments = ["--mib", "8", "--steps", "150000", "--pause-us", "20000"]
            let reference = try runCommand(program, arguments, timeout: .seconds(60))
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let outputPath = directory.path("victim.out")
            let launched = try leftovers.fammig(["launch", "--output", outputPath, "--", program] + arguments)
            let victim = try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)))
            let victimHandle = try ProcessHandle(ProcessID(victim))  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            usleep(300_000)

            let port = 23000 + Int(getpid() % 2000)
            let keyPath = directory.path("migration.key")
            try requireVictimAlive(victim)
            let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["source", "--pid", "\(victim)", "--mode", "postcopy-socket", "--key-file", keyPath,
                                                           "--listen", "127.0.0.1:\(port)"],
                                                          standardOutputPath: directory.path("source.out"),
                                                          standardErrorPath: directory.path("source.err")))
            try #require(waitForKeyFile(keyPath), "the source wrote no key file")
            let rogue = try TCPTransport.connect(to: Endpoint(host: "127.0.0.1", port: UInt16(port)), timeoutMilliseconds: 5000)
            try rogue.send(.complete(generation: 1))
            let sourceErrors = { (try? String(contentsOfFile: directory.path("source.err"), encoding: .utf8)) ?? "" }
            #expect(pollUntil(timeout: .seconds(15)) { sourceErrors().contains("refused a connection") }, "source: \(sourceErrors())")
            rogue.close()
            #expect(processLife(ProcessID(victim)) == .running, "the rogue's frame ended the victim")

            let target = try leftovers.fammig(["target", "--mode", "postcopy-socket", "--key-file", keyPath,
                                               "--connect", "127.0.0.1:\(port)", "--pid-namespace", "fresh"], timeout: .seconds(60))
            #expect(target.exitStatus == 0, "target: \(target.standardError)")
            let sourceOutcome = try source.waitForExit(timeout: .seconds(30))
            #expect(sourceOutcome.exitStatus == 0, "source: \(sourceOutcome.standardError)")
            #expect(pollUntil(timeout: .seconds(30)) { lastChecksum(inFile: outputPath) != nil }, "the migrated process never finished")
            #expect(lastChecksum(inFile: outputPath).map { "checksum=" + $0 } == reference.standardOutput.split(separator: "\n").last.map(String.init))
        }
    }
}

// MARK: Hostile images from a key holder

/// Recomputes the header code (and, when the commit record is there, the commit code) of the image at
/// `path` under `key`: what a hostile *source*, which holds the key, can do. Tests of what the reader does
/// with an image that says something hostile use it, so that the content is judged, not the code. An
/// image whose superblock does not describe a layout is left alone (it is refused before any code).
func resealCodes(path: String, key: MigrationKey = testKey) throws {
    let mapping = try SharedMapping.open(path: path, writable: true)
    guard mapping.byteCount >= ImageLayout.pageSize,
          let (_, layout) = ImageLayout.decodeIgnoringState(mapping.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount),
                                                            fileByteCount: mapping.byteCount) else { return }
    let authenticator = ImageAuthenticator(key: key)
    let snapshot = mapping.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount)
    let headerCode = Array(authenticator.headerCode(
        superblock: Array(snapshot[0..<ImageLayout.stateWordOffset]),
        extensionFields: Array(snapshot[ImageLayout.keyIdentifierOffset..<ImageLayout.headerCodeOffset]),
        paddedMetadata: mapping.loadBytes(at: layout.metadata.offset, count: layout.paddedMetadataByteCount),
        pageTable: mapping.loadBytes(at: layout.pageTable.offset, count: layout.pageTableByteCount)))
    mapping.store(bytes: headerCode, at: ImageLayout.headerCodeOffset)
    let record = mapping.loadBytes(at: layout.commitRecord.offset, count: ImageLayout.commitRecordCodeOffset)
    guard record.prefix(8).elementsEqual(littleEndianBytes(ImageLayout.commitRecordMagic)) else { return }
    let commitCode = Array(authenticator.commitCode(headerCode: headerCode, commitRecord: record,
                                                    marks: mapping.loadBytes(at: layout.marks.offset, count: layout.marksByteCount)))
    mapping.store(bytes: commitCode, at: layout.commitRecord.offset + ImageLayout.commitRecordCodeOffset)
}
