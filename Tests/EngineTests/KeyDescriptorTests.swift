// Issue 12: the migration key handed as a descriptor (`--key-fd N`) to the commands that read it
// (restore, inspect, target) and to those that make it (checkpoint, source), so an orchestrator need not
// write it to a file at all. The descriptor is read (or written) to its end and closed (never inherited
// by a process fammig starts later); a writer refuses a regular file that others could read.
import Foundation
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct KeyDescriptorTests {
        /// fammig with fd 3 read from `keyPath` (through sh, which opens it).
        func fammigWithKeyOnDescriptor(_ arguments: [String], keyPath: String) throws -> CommandOutcome {
            let quoted = ([try TestPaths.fammig()] + arguments).map { "'\($0)'" }.joined(separator: " ")
            return try runCommand("/bin/sh", ["-c", "exec \(quoted) 3< '\(keyPath)'"])
        }

        /// fammig with fd 3 written to `keyPath` (opened by sh, truncating; the file is made 0600 first
        /// unless `mode` says otherwise).
        func fammigWritingKeyToDescriptor(_ arguments: [String], keyPath: String, mode: mode_t = 0o600) throws -> CommandOutcome {
            try #require(FileManager.default.createFile(atPath: keyPath, contents: nil) && chmod(keyPath, mode) == 0)
            let quoted = ([try TestPaths.fammig()] + arguments).map { "'\($0)'" }.joined(separator: " ")
            return try runCommand("/bin/sh", ["-c", "exec \(quoted) 3> '\(keyPath)'"])
        }

        /// checkpoint writes its new key to a descriptor; restore reads it from one, and the process ends
        /// its run. A descriptor on a file others may read is refused by checkpoint and by source before
        /// anything is frozen (exit 2, the cause named), and the victim runs on.
        @Test func checkpointAndSourceWriteTheKeyToADescriptor() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("sleeper-static")
            let arguments = ["--rounds", "40"]
            let victim = leftovers.own(try SpawnedProgram(program, arguments, standardOutputPath: directory.path("victim.out"),
                                                          standardErrorPath: directory.path("victim.err")))
            leftovers.expectProgram([program] + arguments)
            let victimID = victim.processID
            try #require(pollUntil(timeout: .seconds(5)) {
                ((try? FileManager.default.attributesOfItem(atPath: directory.path("victim.out"))[.size] as? Int) ?? 0) > 0
            }, "the victim printed nothing")

            // Refused: a key file others may read, through a descriptor, for both writing commands.
            let leakyKeyPath = directory.path("leaky.key")
            let imagePath = directory.path("image.fam")
            try requireVictimAlive(victimID)
            let leakyCheckpoint = try fammigWritingKeyToDescriptor(["checkpoint", "--pid", "\(victimID)", "--fam", imagePath, "--key-fd", "3"],
                                                                   keyPath: leakyKeyPath, mode: 0o644)
            #expect(leakyCheckpoint.exitStatus == 2 && leakyCheckpoint.standardError.contains("others could read the key"),
                    "\(leakyCheckpoint.standardError)")
            let leakySource = try fammigWritingKeyToDescriptor(["source", "--pid", "\(victimID)", "--mode", "postcopy-socket",
                                                                "--listen", "127.0.0.1:\(27000 + Int(getpid() % 2000))", "--key-fd", "3"],
                                                               keyPath: leakyKeyPath, mode: 0o644)
            #expect(leakySource.exitStatus == 2 && leakySource.standardError.contains("others could read the key"), "\(leakySource.standardError)")
            #expect(((try? Data(contentsOf: URL(fileURLWithPath: leakyKeyPath))) ?? Data()).isEmpty, "a key went into a file others may read")
            #expect(!FileManager.default.fileExists(atPath: imagePath), "a refused checkpoint left its image")
            #expect(processLife(victimID) == .running, "a refusal touched the victim")
            #expect(try ProcFS.status(victimID)["TracerPid"] == "0")
            let neither = try leftovers.fammig(["checkpoint", "--pid", "\(victimID)", "--fam", imagePath])
            #expect(neither.exitStatus != 0 && neither.standardError.contains("--key-file PATH or --key-fd N"), "\(neither.standardError)")

            // Accepted: a 0600 file of this user; the key in it opens the image.
            let keyPath = directory.path("migration.key")
            let checkpoint = try fammigWritingKeyToDescriptor(["checkpoint", "--pid", "\(victimID)", "--fam", imagePath, "--key-fd", "3"],
                                                              keyPath: keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint --key-fd: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(5)) == .killed(signal: SIGKILL))
            #expect(try readKeyFile(keyPath).bytes.count == MigrationKey.byteCount)
            let restore = try fammigWithKeyOnDescriptor(["restore", "--fam", imagePath, "--key-fd", "3"], keyPath: keyPath)
            try #require(restore.exitStatus == 0, "restore --key-fd: \(restore.standardError)")
            #expect(pollUntil(timeout: .seconds(60)) { processLife(victimID) != .running }, "the restored process did not end")
            #expect(lastChecksum(inFile: directory.path("victim.out")) != nil, "the restored process did not finish its run")
        }

        @Test func inspectTakesTheKeyFromADescriptor() throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let source = try SourceMemory(path: files.path("source"))
            let imagePath = files.path("image")
            try writeAuthenticatedImage(path: imagePath, state: plausibleState(processID: ProcessID(4242), dataRange: dataRange(of: source)),
                                        source: source, creator: .current())
            let keyPath = files.path("key"), otherKeyPath = files.path("other"), garbagePath = files.path("garbage")
            try writeKeyFile(testKey, to: keyPath)
            try writeKeyFile(otherTestKey, to: otherKeyPath)
            try #require(FileManager.default.createFile(atPath: garbagePath, contents: Data("not a key\n".utf8)))

            let inspect = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: keyPath)
            #expect(inspect.exitStatus == 0, "inspect --key-fd: \(inspect.standardError)\(inspect.standardOutput)")
            #expect(inspect.standardOutput.contains("HMAC-SHA256 OK"), "\(inspect.standardOutput)")

            let other = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: otherKeyPath)
            #expect(other.exitStatus == 2 && other.standardError.contains("wrong key"), "\(other.standardError)")
            let garbage = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: garbagePath)
            #expect(garbage.exitStatus == 2 && garbage.standardError.contains("--key-fd 3 is not a fammig migration key"), "\(garbage.standardError)")
            let closed = try runCommand(try TestPaths.fammig(), ["inspect", "--fam", imagePath, "--key-fd", "9"])
            #expect(closed.exitStatus == 2 && closed.standardError.contains("cannot read the key from --key-fd 9"), "\(closed.standardError)")
            for arguments in [["inspect", "--fam", imagePath], ["inspect", "--fam", imagePath, "--key-file", keyPath, "--key-fd", "3"]] {
                let outcome = try fammigWithKeyOnDescriptor(arguments, keyPath: keyPath)
                #expect(outcome.exitStatus == 2 && outcome.standardError.contains("--key-file PATH or --key-fd N"), "\(outcome.standardError)")
            }
        }
    }
}
