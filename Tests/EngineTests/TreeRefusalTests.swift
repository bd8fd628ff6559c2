// Issue 11, item 1: a process with children is refused before anything is done to it, in every mode and
// every command, and both parent and child run on untouched (never stopped, never traced).
import Engine
import Foundation
import Glibc
import Logging
import Testing
import Sys

/// Refuses every victim once it is frozen and its state read: the path of every refusal found only after
/// the freeze (a child forked meanwhile, dumpable 2), through the real dumper and threaded driver.
final class RefusingObserver: MigrationObserver, @unchecked Sendable {
    struct Refusal: Error {}
    func victimFrozen(processID: ProcessID, state: ProcessState, pageAddresses: [UInt64]) throws { throw Refusal() }
    func targetReady(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) throws {}
    func pagesInstalled(processID: ProcessID, address: UInt64, targetAddress: UInt64, byteCount: Int, installedBytes: [UInt8]?) throws {}
}

/// The state of a running, not stopped, not traced process (for "left running untouched").
func untouchedProblem(_ processID: ProcessID) -> String? {
    guard processLife(processID) == .running, let status = try? ProcFS.status(processID) else { return "pid \(processID) is not running" }
    if status["TracerPid"] != "0" { return "pid \(processID) is traced by \(status["TracerPid"] ?? "?")" }
    if let state = status["State"], state.hasPrefix("T") || state.hasPrefix("t") { return "pid \(processID) is stopped (\(state))" }
    return nil
}

extension ProcessTests {
    @Suite(.serialized) struct TreeRefusalTests {
        /// `source` (both post-copy modes: trees migrate only nonlive, ProcessTreeTests) refuses a parent
        /// with a child before the freeze; both processes run on, never stopped or traced, and the parent
        /// still finishes with its child (it checks the child every round, and reaps it at the end).
        @Test(arguments: ["postcopy-socket", "postcopy-fam"]) func parentWithChildIsRefusedAndKeepsRunning(_ mode: String) throws {
            let program = try TestPaths.testProgram("forker-static")
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--rounds", "150", "--pause-us", "10000"]
            let parent = leftovers.own(try SpawnedProgram(program, arguments, standardOutputPath: directory.path("out"),
                                                          standardErrorPath: directory.path("err")))
            // The child has the same command line: a child left running is a leftover too.
            leftovers.expectProgram(parent.argumentVector)
            var children: [ProcessID] = []
            #expect(pollUntil(timeout: .seconds(5)) {
                children = (try? ProcFS.childProcessIDs(parent.processID)) ?? []
                return !children.isEmpty
            })
            let child = try #require(children.first)
            let famPath = directory.path("image.fam")

            let outcome: CommandOutcome
            if mode == "nonlive" {
                outcome = try leftovers.fammig("checkpoint", "--pid", "\(parent.processID)", "--fam", famPath,
                                               "--key-file", directory.path("migration.key"))
            } else {
                let port = 19000 + Int(getpid() % 2000) + (mode == "postcopy-fam" ? 1 : 0)
                var sourceArguments = ["source", "--pid", "\(parent.processID)", "--mode", mode, "--listen", "127.0.0.1:\(port)"]
                var targetArguments = ["target", "--mode", mode, "--connect", "127.0.0.1:\(port)"]
                let keyPath = directory.path("migration.key")
                sourceArguments += ["--key-file", keyPath]
                targetArguments += ["--key-file", keyPath]
                if mode == "postcopy-fam" {
                    sourceArguments += ["--fam", famPath]
                    targetArguments += ["--fam", famPath]
                }
                let source = leftovers.own(try StartedProcess(try TestPaths.fammig(), sourceArguments,
                                                              standardOutputPath: directory.path("source.out"),
                                                              standardErrorPath: directory.path("source.err")))
                #expect(waitForKeyFile(keyPath), "the source wrote no key file")
                let target = try leftovers.fammig(targetArguments, timeout: .seconds(60))
                #expect(target.exitStatus != 0, "the target restored something: \(target.standardOutput)")
                outcome = try source.waitForExit(timeout: .seconds(30))
            }
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("has 1 child process (\(child))"), "\(outcome.standardError)")
            #expect(outcome.standardError.contains("left running untouched"), "\(outcome.standardError)")
            #expect(!FileManager.default.fileExists(atPath: famPath))
            #expect(untouchedProblem(parent.processID) == nil, "\(untouchedProblem(parent.processID) ?? "")")
            #expect(untouchedProblem(child) == nil, "\(untouchedProblem(child) ?? "")")

            // The parent goes on to its end: every round it found its child, and reaped it at the end.
            let status = try parent.waitForExit(timeout: .seconds(30))
            #expect(status == .exited(0), "forker \(status): \((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
            #expect(lastChecksum(inFile: directory.path("out")) != nil)
        }

        /// A refusal after the freeze (state read, nothing dumped) detaches the victim: it runs on, neither
        /// stopped nor traced, and ends exactly as an untouched run (signals checks its mask and handlers
        /// every round, so an injected query that changed them would fail it).
        @Test func refusalAfterTheFreezeLeavesTheVictimRunningUntouched() throws {
            let program = try TestPaths.testProgram("signals-static")
            let arguments = ["--rounds", "250", "--pause-us", "5000"]
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let reference = try runCommand(program, arguments, timeout: .seconds(60))
            let victim = leftovers.own(try SpawnedProgram(program, arguments, standardOutputPath: directory.path("out"),
                                                          standardErrorPath: directory.path("err")))
            usleep(200_000)
            let famPath = "/dev/shm/fammig-refusal-\(getpid()).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let dumper = try Migration.source(MigrationPlan(mode: .nonlive, key: testKey), victim: victim.processID, ports: SourcePorts(
                makeBackend: { (byteCount) throws(ImageError) in try RealFAM.create(path: famPath, byteCount: byteCount, prefault: false) },
                transport: nil, observer: RefusingObserver(), clock: MonotonicClock(), timeline: MigrationTimeline(),
                logger: Logger(label: "refusal"))).dumper
            #expect(throws: EngineError.self) { try ThreadedDriver(logger: Logger(label: "refusal")).run([dumper]) }
            #expect(dumper.checkpointedState != nil, "the refusal came before the freeze")
            #expect(untouchedProblem(victim.processID) == nil, "\(untouchedProblem(victim.processID) ?? "")")
            let status = try victim.waitForExit(timeout: .seconds(30))
            #expect(status == .exited(0), "\((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
            #expect(lastChecksum(inFile: directory.path("out")).map { "checksum=" + $0 }
                    == reference.standardOutput.split(separator: "\n").last.map(String.init))
        }

        /// `fammig run` refuses it in both post-copy modes with the same message (and, as always after a
        /// refusal, ends the program it started: the child dies with its parent).
        @Test(arguments: ["postcopy-socket", "postcopy-fam"]) func runRefusesParentWithChild(_ mode: String) throws {
            let program = try TestPaths.testProgram("forker")
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--rounds", "100", "--pause-us", "10000"]
            leftovers.expectProgram([program] + arguments)
            let outcome = try leftovers.fammig(["run", "--mode", mode, "--no-reference", "--after-ms", "200", "--", program] + arguments)
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("has 1 child process"), "\(outcome.standardError)")
            #expect(outcome.standardError.contains("process trees migrate only in nonlive mode"), "\(outcome.standardError)")
        }
    }
}
