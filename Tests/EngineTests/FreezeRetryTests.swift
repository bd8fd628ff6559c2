// A descriptor the preflight did not see, found at the freeze (a program that opens a descriptor for a
// moment each round, stopped between the open and the close): the dumper lets the victim go
// untouched and freezes it again later, at most Dumper.freezeRetryLimit times, before the refusal stands.
// The victim (sleeper --fd-signals 1) opens and closes a UDP socket (which cannot migrate) as fd 40 on
// SIGUSR1, so the test decides when the descriptor exists: after the preflight, and (or not) before the
// next freeze. With --fd-signals 2 it is a TCP listener (fd 40) holding a connection not yet accepted
// (its client, fd 41), which the next SIGUSR1 accepts: the preflight's refusal TCPSocketTests met.
@testable import Engine
import Foundation
import Glibc
import Logging
import Testing
import Sys

extension ProcessTests {
    @Suite(.serialized) struct FreezeRetryTests {
        static let arguments = ["--rounds", "150", "--sleep-ms", "20", "--fd-signals", "1"]

        /// The preflight passes, then the victim opens its socket and the first freeze finds it: the
        /// victim runs on untouched and the dumper waits to freeze again; it closes the fd, and the next
        /// freeze reads its state (the observer then refuses it, so it runs on to its own checksum).
        @Test func aDescriptorOpenOnlyAtTheFirstFreezeIsFrozenAgain() throws {
            try withVictim { victim, dumper in
                try openedAfterThePreflight(victim, dumper)
                try expectReady(dumper, .freeze)
                try dumper.perform()
                try expectReady(dumper, .capture)
                try dumper.perform()
                #expect(untouchedProblem(victim.processID) == nil, "\(untouchedProblem(victim.processID) ?? "")")
                // The victim closes it while it runs, before the next freeze.
                try expectOneRetryThatSucceeds(victim, dumper, retrying: .freeze, "the second freeze did not read the state")
            }
        }

        /// The descriptor stays open: every freeze finds it, each is undone, and after the last retry the
        /// refusal stands, with the victim running on untouched.
        @Test func aDescriptorThatStaysOpenIsRefusedAfterTheRetries() throws {
            try withVictim { victim, dumper in
                try openedAfterThePreflight(victim, dumper)
                var refusal: EngineError?
                do { try ThreadedDriver(logger: Logger(label: "freeze-retry")).run([dumper]) } catch { refusal = error as? EngineError ?? .aborted("\(error)") }
                #expect(refusal?.description.hasSuffix("left running untouched.") == true, "\(refusal.map { "\($0)" } ?? "no refusal")")
                #expect(refusal?.description.contains("fd 40") == true, "\(refusal.map { "\($0)" } ?? "no refusal")")
                #expect(refusal?.isUsageOrEnvironment == true)
                #expect(dumper.transientRefusals == Dumper.freezeRetryLimit)
                #expect(dumper.checkpointedState == nil)
                #expect(hasSocketDescriptor(victim.processID))
                kill(victim.processID.rawValue, SIGUSR1)
            }
        }

        /// The preflight finds the descriptor (a listener with a connection not yet accepted, a moment before
        /// its accept, failed TCPSocketTests so on a loaded machine): it waits and runs again, and once the
        /// descriptor is gone the migration goes on to the freeze. `--fd-signals 1` opens a UDP socket;
        /// `2` the flake's own case, a loopback TCP listener holding a connection it has not accepted.
        @Test(arguments: [("1", "fd 40"), ("2", "connections not yet accepted")])
        func aDescriptorOpenAtThePreflightIsLookedAtAgain(_ kind: String, _ refusal: String) throws {
            try withVictim(fdSignals: kind) { victim, dumper in
                kill(victim.processID.rawValue, SIGUSR1)
                #expect(pollUntil(timeout: .seconds(10)) { hasSocketDescriptor(victim.processID) })
                // The preflight alone refuses it (the same victim, never retried).
                do {
                    try Preflight.check(victim.processID, allowingTree: false)
                    Issue.record("the preflight alone did not refuse it")
                } catch {
                    #expect("\(error)".contains(refusal), "\(error)")
                }
                try expectReady(dumper, .preflight)
                try dumper.perform()
                try expectOneRetryThatSucceeds(victim, dumper, retrying: .preflight, "the preflight was not run again")
            }
        }

        /// After one refusal that `step` met: nothing read yet, the dumper waits to run `step` again; the
        /// victim closes its descriptor (SIGUSR1), and the retry goes on to read the state (the observer
        /// then refuses it: the run ends in an error), with that one refusal counted.
        private func expectOneRetryThatSucceeds(_ victim: SpawnedProgram, _ dumper: Dumper, retrying step: DumperStep, _ notRetried: String,
                                                sourceLocation: SourceLocation = #_sourceLocation) throws {
            #expect(dumper.transientRefusals == 1, sourceLocation: sourceLocation)
            #expect(dumper.checkpointedState == nil, sourceLocation: sourceLocation)
            switch dumper.nextAction() {
            case .waiting(.retryAfter): break
            case .ready(.dumper(let next)) where next == step: break
            case let other: Issue.record("after a refusal at \(step): \(other)", sourceLocation: sourceLocation)
            }
            kill(victim.processID.rawValue, SIGUSR1)
            #expect(pollUntil(timeout: .seconds(10)) { !hasSocketDescriptor(victim.processID) }, sourceLocation: sourceLocation)
            #expect(throws: EngineError.self, sourceLocation: sourceLocation) { try ThreadedDriver(logger: Logger(label: "freeze-retry")).run([dumper]) }
            #expect(dumper.checkpointedState != nil, "\(notRetried)", sourceLocation: sourceLocation)
            #expect(dumper.transientRefusals == 1, sourceLocation: sourceLocation)
        }

        /// A target waits for the image at least as long as the source's retries may take before it writes
        /// anything (torture's target, 0.05 s of virtual time, gave up first and took a refusal for a
        /// failed source): the image wait is computed from the retry budget, and a shorter one is raised.
        @Test func aTargetWaitsForTheImageLongerThanTheSourceRetries() {
            var retries = Duration.zero
            var delay = Duration.milliseconds(4)
            for _ in 0..<Dumper.freezeRetryLimit { retries += delay; delay *= 2 }
            #expect(Dumper.transientRetryBudget == retries)
            #expect(TargetPorts.shortestImageWait > retries)
            let ports = TargetPorts(openBackend: { nil }, transport: nil, stubPath: "/nonexistent", observer: nil, clock: MonotonicClock(),
                                    timeline: MigrationTimeline(), logger: Logger(label: "freeze-retry"), imageWait: .milliseconds(50))
            #expect(ports.imageWait == TargetPorts.shortestImageWait)
            let patient = TargetPorts(openBackend: { nil }, transport: nil, stubPath: "/nonexistent", observer: nil, clock: MonotonicClock(),
                                      timeline: MigrationTimeline(), logger: Logger(label: "freeze-retry"), imageWait: .seconds(30))
            #expect(patient.imageWait == .seconds(30))
        }

        /// A sleeper with a dumper (nonlive, an observer that refuses any state it is shown), checked after
        /// `body` to be running untouched and to end as an unmigrated run does.
        private func withVictim(fdSignals: String = "1", _ body: (SpawnedProgram, Dumper) throws -> Void) throws {
            let arguments = Array(Self.arguments.dropLast()) + [fdSignals]
            let program = try TestPaths.testProgram("sleeper")
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let reference = try runCommand(program, arguments, timeout: .seconds(60))
            let victim = leftovers.own(try SpawnedProgram(program, arguments, standardOutputPath: directory.path("out"),
                                                          standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(10)) { lastChecksum(inFile: directory.path("out")) != nil
                || ((try? String(contentsOfFile: directory.path("out"), encoding: .utf8)) ?? "").contains("round 1/") })
            try requireVictimAlive(victim.processID)
            let famPath = "/dev/shm/fammig-freeze-retry-\(getpid()).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let dumper = try Migration.source(MigrationPlan(mode: .nonlive, key: testKey), victim: victim.processID, ports: SourcePorts(
                makeBackend: { (byteCount) throws(ImageError) in try RealFAM.create(path: famPath, byteCount: byteCount, prefault: false) },
                transport: nil, observer: RefusingObserver(), clock: MonotonicClock(), timeline: MigrationTimeline(),
                logger: Logger(label: "freeze-retry"))).dumper
            try body(victim, dumper)
            #expect(untouchedProblem(victim.processID) == nil, "\(untouchedProblem(victim.processID) ?? "")")
            let status = try victim.waitForExit(timeout: .seconds(30))
            #expect(status == .exited(0), "\((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
            #expect(lastChecksum(inFile: directory.path("out")).map { "checksum=" + $0 }
                    == reference.standardOutput.split(separator: "\n").last.map(String.init))
        }

        /// The preflight step, then SIGUSR1: the victim opens a UDP socket as fd 40.
        private func openedAfterThePreflight(_ victim: SpawnedProgram, _ dumper: Dumper) throws {
            try expectReady(dumper, .preflight)
            try dumper.perform()
            kill(victim.processID.rawValue, SIGUSR1)
            #expect(pollUntil(timeout: .seconds(10)) { hasSocketDescriptor(victim.processID) })
        }

        private func expectReady(_ dumper: Dumper, _ step: DumperStep, sourceLocation: SourceLocation = #_sourceLocation) throws {
            try #require(dumper.nextAction() == .ready(.dumper(step)), sourceLocation: sourceLocation)
        }
    }
}

private func hasSocketDescriptor(_ processID: ProcessID) -> Bool {
    ((try? ProcFS.readLink("/proc/\(processID)/fd/40")) ?? "").hasPrefix("socket:")
}
