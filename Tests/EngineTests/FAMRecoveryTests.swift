// Issue 12, item 4's second half: once the commit record is in FAM, the image holds the whole process,
// so the migration no longer needs either node that took part in it. Both may die (the source right
// after the commit, the first target while its process still lacks pages) and a new `fammig restore`
// from the FAM image, with the key, finishes it: the process restarts from the image and ends with the
// checksum of an unmigrated run, through its own self-check and the state oracle.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct FAMRecoveryTests {
        @Test func aCommittedImageRestoresAfterTheSourceAndTheFirstTargetDied() throws {
            let program = try TestPaths.testProgram("memwalk-static")
            // 200 pauses of 50 ms: the walk lasts about 10 s, far longer than the dump of 64 MiB.
            let arguments = ["--mib", "64", "--steps", "100000", "--pause-us", "50000"]
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            leftovers.expectProgram([program] + arguments)
            let reference = try runCommand(program, arguments, timeout: .seconds(90))
            let referenceChecksum = try #require(reference.standardOutput.split(separator: "\n").last.map(String.init))

            let outputPath = directory.path("victim.out")
            let famPath = "/dev/shm/fammig-recovery-\(getpid()).img"
            defer { try? FileManager.default.removeItem(atPath: famPath) }
            let launched = try leftovers.fammig(["launch", "--output", outputPath, "--", program] + arguments)
            let victim = try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)))
            let victimHandle = try ProcessHandle(ProcessID(victim))  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            usleep(500_000)

            let port = 25000 + Int(getpid() % 2000)
            let keyPath = directory.path("migration.key")
            try requireVictimAlive(victim)
            let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["source", "--pid", "\(victim)", "--mode", "postcopy-fam", "--fam", famPath,
                                                           "--key-file", keyPath, "--listen", "127.0.0.1:\(port)", "--die-at", "after-commit"],
                                                          standardOutputPath: directory.path("source.out"),
                                                          standardErrorPath: directory.path("source.err")))
            try #require(waitForKeyFile(keyPath), "the source wrote no key file")
            // Pages only on faults: the first target still lacks pages when it is killed.
            let target = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["target", "--mode", "postcopy-fam", "--fam", famPath, "--key-file", keyPath,
                                                           "--push", "off", "--connect", "127.0.0.1:\(port)", "--pid-namespace", "fresh"],
                                                          standardOutputPath: directory.path("target.out"),
                                                          standardErrorPath: directory.path("target.err")))
            let targetErrors = { (try? String(contentsOfFile: directory.path("target.err"), encoding: .utf8)) ?? "" }
            let sourceOutcome = try source.waitForExit(timeout: .seconds(60))
            #expect(sourceOutcome.killedBySignal, "the source did not die after the commit record: \(sourceOutcome.standardError)")
            // After the commit record the source's death takes the victim with it (EXITKILL, and its guard); only the image is left of it.
            #expect(pollUntil(timeout: .seconds(5)) { processLife(ProcessID(victim)) != .running }, "the victim outlived its source")

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
            let firstRestored = try #require(restored, "no restored process; target: \(targetErrors())")
            try #require(resumed, "the first restored process never ran; target: \(targetErrors())")
            try #require(target.process.isRunning, "the first target finished before it could be killed: \(targetErrors())")
            target.kill()
            #expect(pollUntil(timeout: .seconds(5)) { processLife(firstRestored) != .running }, "the first restored process outlived its target")
            #expect(lastChecksum(inFile: outputPath) == nil, "the first restored process finished after all")
            try #require(FileManager.default.fileExists(atPath: famPath), "the committed image is gone with its nodes")

            // A new node, from FAM alone: the committed image and the key.
            let restore = try leftovers.fammig(["restore", "--fam", famPath, "--key-file", keyPath, "--pid-namespace", "fresh"],
                                               timeout: .seconds(60))
            try #require(restore.exitStatus == 0, "restore from the committed image: \(restore.standardError)")
            #expect(restore.standardOutput.contains("restored pid"), "\(restore.standardOutput)")
            let finished = pollUntil(timeout: .seconds(90)) { lastChecksum(inFile: outputPath) != nil }
            #expect(finished, "the process restored from FAM never finished")
            let errors = (try? String(contentsOfFile: outputPath + ".err", encoding: .utf8)) ?? ""
            #expect(!errors.contains("selfcheck FAILED"), "\(errors)")
            #expect(lastChecksum(inFile: outputPath).map { "checksum=" + $0 } == referenceChecksum)
        }

        /// An image without its commit record (its source died before it) is never restored: exit 2,
        /// naming it, and no process is created.
        @Test func anUncommittedImageIsNotRestored() throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let source = try SourceMemory(path: files.path("source"))
            let imagePath = files.path("image")
            try writeAuthenticatedImage(path: imagePath, state: plausibleState(processID: ProcessID(4243), dataRange: dataRange(of: source)),
                                        source: source, creator: .current(), commit: false)
            let keyPath = files.path("key")
            try writeKeyFile(testKey, to: keyPath)
            let restore = try leftovers.fammig(["restore", "--fam", imagePath, "--key-file", keyPath])
            #expect(restore.exitStatus == 2 && !restore.killedBySignal, "\(restore.standardError)")
            #expect(restore.standardError.contains("image is not complete"), "\(restore.standardError)")
            #expect(processLife(ProcessID(4243)) == .gone)
        }
    }
}
