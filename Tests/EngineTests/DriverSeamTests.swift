// The actor seam of DESIGN.md §4: the same Dumper and Restorer that `fammig` runs on the threaded
// driver run here, unchanged, on one thread in an order a seeded generator picks, with a step counter as
// the clock. The restored process must still end with the reference checksum.
import Engine
import Foundation
import Logging
import Oracles
import Synchronization
import Sys
import Testing

/// The clock of a stepped run: one millisecond per step, whatever the wall time.
final class StepClock: EngineClock {
    private let steps = Mutex(0)
    func now() -> Duration { .milliseconds(steps.withLock { $0 }) }
    func tick() { steps.withLock { $0 += 1 } }
}

/// A minimal single-threaded driver: at each step a seeded generator picks one ready actor.
struct SeededDriver {
    var state: UInt64

    mutating func nextRandom() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }

    /// Runs the actors to the end; returns the names of the steps taken, in order.
    mutating func run(_ actors: [any EngineActor], clock: StepClock, stepLimit: Int = 100_000) throws -> [String] {
        var trace: [String] = []
        for _ in 0..<stepLimit {
            clock.tick()
            var ready: [(any EngineActor, String)] = []
            var unfinished = 0
            for actor in actors {
                switch actor.nextAction() {
                case .ready(let step): ready.append((actor, step)); unfinished += 1
                case .waiting: unfinished += 1
                case .finished: break
                }
            }
            if unfinished == 0 { return trace }
            // Nobody ready: the waiters poll FAM or a PID; give the other node real time to move.
            guard !ready.isEmpty else { usleep(200); continue }
            let (actor, step) = ready[Int(nextRandom() % UInt64(ready.count))]
            trace.append("\(actor.name): \(step)")
            do {
                try actor.perform()
            } catch {
                for other in actors { other.abort(reason: "\(error)") }
                throw error
            }
        }
        for actor in actors { actor.abort(reason: "step limit") }
        throw EngineError.timedOut("seeded run exceeded \(stepLimit) steps")
    }
}

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
            let clock = StepClock()
            let timeline = MigrationTimeline()
            let oracles = MigrationOracles()
            let logger = Logger(label: "seam")
            let dumper = Dumper(
                victim: victim,
                makeBackend: { (byteCount) throws(ImageError) in try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true) },
                generation: seed, key: testKey, release: .kill, batchPageCount: 64, observer: oracles, clock: clock, timeline: timeline, logger: logger)
            let restorer = Restorer(
                openBackend: { () throws(ImageError) -> (any FAMBackend)? in
                    ProcFS.exists(famPath) ? try RealFAM.open(path: famPath, writable: false) : nil
                },
                key: testKey, stubPath: try TestPaths.fammig(), batchPageCount: 64, observer: oracles, clock: clock, timeline: timeline,
                logger: logger, processIDWait: .seconds(60))
            var driver = SeededDriver(state: seed)
            let trace = try driver.run([dumper, restorer], clock: clock)

            #expect(trace.first == "dumper: preflight")
            #expect(trace.last == "restorer: resume" || trace.last == "dumper: release")
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
