// Issue 11, item 1: a process with children is never destroyed: it migrates as a tree in every mode (here
// the post-copy commands that once refused it), and a refusal (after the freeze) leaves it running
// untouched (never stopped, never traced).
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
        /// `source` and `target` (both post-copy modes) migrate a parent with a child as a tree, where they
        /// once refused it: the victim (pid 1 of its own namespace, `fammig launch`) is restored into a
        /// fresh one, parent and child with their PIDs, and the parent still finds its child every round
        /// and reaps it with its status at the end, ending with the unmigrated run's checksum; the victim's
        /// tree is gone once the migration completed.
        @Test(arguments: ["postcopy-socket", "postcopy-fam"]) func parentWithChildMigratesBetweenTwoNodes(_ mode: String) throws {
            let program = try TestPaths.testProgram("forker-static")
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--rounds", "250", "--pause-us", "10000"]
            // The child has the same command line: a child left running is a leftover too.
            let launched = try LaunchedVictim.launch(program, arguments, directory: directory, leftovers: leftovers)
            let (victim, outputPath, referenceChecksum) = (launched.processID, launched.outputPath, launched.referenceChecksum)
            let victimHandle = try ProcessHandle(victim)  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            var children: [ProcessID] = []
            #expect(pollUntil(timeout: .seconds(5)) {
                children = (try? ProcFS.childProcessIDs(victim)) ?? []
                return !children.isEmpty
            })
            let child = try #require(children.first)
            let famPath = directory.path("image.fam")
            let port = 19000 + Int(getpid() % 2000) + (mode == "postcopy-fam" ? 1 : 0)
            let keyPath = directory.path("migration.key")
            let (sourceArguments, targetArguments) = twoNodeArguments(mode: mode, victim: victim, port: port, keyPath: keyPath, famPath: famPath)
            try requireVictimAlive(victim)
            let source = try startSource(sourceArguments, directory: directory, leftovers: leftovers)
            #expect(waitForKeyFile(keyPath), "the source wrote no key file")
            let target = try leftovers.fammig(targetArguments, timeout: .seconds(60))
            let sourceOutcome = try source.waitForExit(timeout: .seconds(30))
            #expect(target.exitStatus == 0, "target: \(target.standardOutput) \(target.standardError) source: \(sourceOutcome.standardError)")
            #expect(sourceOutcome.exitStatus == 0, "source: \(sourceOutcome.standardError)")
            // The victim's tree was killed at the release, the child (reaped by its frozen parent) first.
            #expect(pollUntil(timeout: .seconds(5)) { !ProcFS.isAlive(victim) && !ProcFS.isAlive(child) })
            #expect(launched.restoredProcessFinished(), "the restored tree never printed its checksum")
            #expect(lastChecksum(inFile: outputPath).map { "checksum=" + $0 } == referenceChecksum)
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
            try requireVictimAlive(victim.processID)
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

        /// `fammig run` migrates it in both post-copy modes with every oracle (it once refused it with "process
        /// trees migrate only in nonlive mode"): the state oracle compares parent and child, the pages of
        /// both are checked as they are installed, and the run ends with the reference checksum.
        @Test(arguments: ["postcopy-socket", "postcopy-fam"]) func runMigratesParentWithChild(_ mode: String) throws {
            try migrateProgram("forker", arguments: ["--rounds", "100", "--pause-us", "10000"],
                               runOptions: ["--mode", mode, "--after-ms", "200"], timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
            }
        }
    }
}
