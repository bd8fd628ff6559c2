// The actor seam of DESIGN.md §4: the same Dumper and Restorer that `fammig` runs on the threaded
// driver run here, unchanged, with a real FAM file, on torture's one deterministic driver (one thread, a
// seeded scheduler, virtual time). The restored process must still end with the reference checksum.
import Engine
import Foundation
import Logging
import Oracles
import Sys
import Testing
@testable import Torture

extension ProcessTests {
    @Suite(.serialized) struct DriverSeamTests {
        @Test(arguments: [UInt64(1), 2, 3])
        func nonliveMigrationUnderASeededSingleThreadedDriver(seed: UInt64) throws {
            let program = try TestPaths.testProgram("memwalk-static")
            let arguments = ["--mib", "8", "--steps", "60000", "--pause-us", "20000"]
            let scratch = try ScratchDirectory(under: "/tmp")
            defer { scratch.remove() }

            let reference = try runCommand(program, arguments, timeout: .seconds(60))
            let referenceChecksum = try #require(reference.standardOutput.split(separator: "\n").last.map(String.init))
            #expect(referenceChecksum.hasPrefix("checksum="))

            let outputPath = scratch.path("migrated.out")
            let victim = try Spawn.program(path: program, arguments: arguments, environment: [],
                                           standardOutputPath: outputPath, standardErrorPath: "/dev/null")
            defer { Spawn.kill(victim); _ = try? Spawn.waitForExit(victim) }
            usleep(300_000)

            let famPath = "/dev/shm/fammig-seam-\(getpid())-\(seed).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let clock = VirtualClock()
            let timeline = MigrationTimeline()
            let oracles = MigrationOracles()
            let logger = Logger(label: "seam")
            let plan = MigrationPlan(mode: .nonlive, generation: seed, key: testKey, batchPageCount: 64)
            let dumper = try Migration.source(plan, victim: victim, ports: SourcePorts(
                makeBackend: { (byteCount) throws(ImageError) in try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true) },
                transport: nil, observer: oracles, clock: clock, timeline: timeline, logger: logger)).dumper
            let restorer = try Migration.target(plan, ports: TargetPorts(
                openBackend: { () throws(ImageError) -> (any FAMBackend)? in
                    ProcFS.exists(famPath) ? try RealFAM.open(path: famPath, writable: false) : nil
                },
                transport: nil, stubPath: try TestPaths.fammig(), observer: oracles, clock: clock, timeline: timeline,
                logger: logger, processIDWait: .seconds(60))).restorer
            let notes = StepNotes()
            var rng = SeededGenerator(seed: seed)
            let driver = DeterministicDriver(participants: [EngineParticipant(dumper, actor: .dumper, notes: notes),
                                                            EngineParticipant(restorer, actor: .restorer, notes: notes)],
                                             clock: clock, scheduler: Scheduler(strategy: .random, rng: &rng),
                                             stepLimit: 100_000, adversarialSteps: Int.max, keepTrace: true, traceSink: nil)
            let outcome = driver.run(rng: &rng)
            guard case .completed = outcome else {
                Issue.record("the seeded run did not complete: \(outcome)")
                return
            }
            #expect(driver.trace.first == "1 dumper: preflight")
            #expect(driver.trace.last?.hasSuffix("restorer: resume") == true || driver.trace.last?.hasSuffix("dumper: release") == true)
            let verdicts = oracles.verdicts
            let failed = verdicts.filter { !$0.passed }.map(\.detail)
            #expect(failed.isEmpty, "oracle failures: \(failed)")
            #expect(verdicts.map(\.name).contains("pages"))

            let restored = try #require(restorer.restoredProcessID)
            #expect(restored == victim)
            let status = try Spawn.waitForExit(restored)
            #expect(status == .exited(0))
            #expect(lastChecksum(inFile: outputPath).map { "checksum=" + $0 } == referenceChecksum)
        }
    }
}
