// Issue 12, the last gaps of post-copy between two live nodes, on real processes (`fammig source` and
// `fammig target`, the victim in a PID namespace of its own so that a restored copy can live beside it):
// * one live copy: a target that holds every page is not the process until the source made it so (the
//   commit record, or postcopy-socket's hand-over); a source that dies first leaves its victim running
//   on, and the target's copy dies (its watchdog stays armed until then);
// * a deadline on every wait once state has moved (`--stall-timeout`): a stopped source is given up on by
//   its target (exit 2, the restored process killed), a stopped target by its source (exit 2, the victim
//   runs on).
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct HandOverTests {
        enum Mode: String, CaseIterable, CustomTestStringConvertible {
            case fam = "postcopy-fam", socket = "postcopy-socket"
            var testDescription: String { rawValue }
        }

        /// Both nodes of one migration and the victim, with what the tests look at.
        final class TwoNodes {
            let directory: ScratchDirectory
            let leftovers: LeftoverCheck
            let victim: ProcessID
            let victimHandle: ProcessHandle
            let reference: String
            let source: StartedProcess
            let target: StartedProcess
            /// Every process before this migration: its helpers are among the others (other clones and
            /// suites run guards and watchdogs of their own at the same time).
            let processIDsBefore = allProcessIDs()
            var output: String { directory.path("victim.out") }

            /// A memwalk victim at its rendezvous (it touches no page until released: a restored copy then
            /// faults on none, and a pushing node installs every page), a source with `sourceArguments`
            /// and a target with `targetArguments`, connected.
            /// The victim's program (`programName`, its own arguments) may be another that waits at a rendezvous.
            let programName: String

            init(mode: Mode, sourceArguments: [String], targetArguments: [String], programName: String = "memwalk-static",
                 arguments: [String] = ["--mib", "16", "--steps", "40000", "--pause-us", "100"]) throws {
                let directory = try ScratchDirectory(under: "/dev/shm")
                let leftovers = LeftoverCheck()
                self.directory = directory
                self.leftovers = leftovers
                self.programName = programName
                let program = try TestPaths.testProgram(programName)
                reference = try SourceDeathTests.referenceChecksum(arguments, program: programName)
                leftovers.expectProgram([program] + arguments + ["--rendezvous", "2"])
                let launched = try leftovers.fammig(["launch", "--output", directory.path("victim.out"), "--", program] + arguments + ["--rendezvous", "2"])
                let victim = ProcessID(try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines))))
                self.victim = victim
                victimHandle = try ProcessHandle(victim)
                try #require(pollUntil(timeout: .seconds(60)) { SourceDeathTests.waitsAtRendezvous(victim) }, "the victim never reached its rendezvous")
                let keyPath = directory.path("migration.key"), famPath = directory.path("image.fam")
                let famArguments = mode == .fam ? ["--fam", famPath] : []
                // A port that was free a moment ago (fammig wants one named): other suites and clones run at once.
                let probe = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
                let endpoint = "\(probe.endpoint)"
                probe.close()
                source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["source", "--pid", "\(victim)", "--mode", mode.rawValue, "--key-file", keyPath,
                                                           "--listen", endpoint] + famArguments + sourceArguments,
                                                          standardOutputPath: directory.path("source.out"), standardErrorPath: directory.path("source.err")))
                let listening = pollUntil(timeout: .seconds(30)) { Self.text(directory.path("source.err")).contains("listening on") }
                try #require(listening && waitForKeyFile(keyPath), "the source never listened: \(Self.text(directory.path("source.err")))")
                target = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                          ["target", "--mode", mode.rawValue, "--key-file", keyPath, "--connect", endpoint,
                                                           "--pid-namespace", "fresh"] + famArguments + targetArguments,
                                                          standardOutputPath: directory.path("target.out"), standardErrorPath: directory.path("target.err")))
            }

            static func text(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
            var sourceErrors: String { Self.text(directory.path("source.err")) }
            var targetErrors: String { Self.text(directory.path("target.err")) }

            /// The target's restored process (its child named as the victim), once it ran.
            func restoredProcess() -> ProcessID? {
                allProcessIDs().first { candidate in
                    guard let status = try? ProcFS.status(candidate) else { return false }
                    // A zombie (killed, its stopped parent not reaping it) is no live copy.
                    return status["Name"] == String(programName.prefix(15)) && status["PPid"] == "\(target.processID)" && status["TracerPid"] == "0"
                        && !(status["State"] ?? "").hasPrefix("Z")
                }
            }

            /// Nothing of either node is left: no guard, no watchdog, no restored process.
            func expectNothingLeft(_ what: String) {
                let fammig = (try? TestPaths.fammig()).map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path } ?? ""
                let helpers = {
                    allProcessIDs().subtracting(self.processIDsBefore).sorted().filter {
                        ["fammig-guard", "fammig-watchdog"].contains((try? ProcFS.status($0))?["Name"] ?? "")
                            && (try? ProcFS.readLink("/proc/\($0)/exe")) == fammig
                    }
                }
                #expect(pollUntil(timeout: .seconds(10)) { helpers().isEmpty }, "\(what): left behind: \(helpers())")
            }

            func finish() {
                victimHandle.kill()
                leftovers.finish()
                directory.remove()
            }
        }

        /// The victim runs on intact once the source is gone: untraced, not stopped, and released from its
        /// rendezvous it ends with the unmigrated checksum.
        static func expectVictimRunsOn(_ migration: TwoNodes, _ what: String) throws {
            let victim = migration.victim
            let unfrozen = pollUntil(timeout: .seconds(10)) {
                guard let status = try? ProcFS.status(victim) else { return false }
                return status["TracerPid"] == "0" && !(status["State"] ?? "T").hasPrefix("T")
            }
            try #require(unfrozen, "\(what): the victim was left \((try? ProcFS.status(victim))?["State"] ?? "gone")")
            _ = Glibc.kill(victim.rawValue, SIGUSR2)
            #expect(pollUntil(timeout: .seconds(120)) { processLife(victim) != .running }, "\(what): the victim did not run to its end")
            #expect(lastChecksum(inFile: migration.output) == migration.reference, "\(what): the victim's run differs from the unmigrated one")
        }

        /// Item 2 of the last gaps: the source dies once the target said it holds every page, before the
        /// commit record (postcopy-fam) or the hand-over (postcopy-socket). Its victim runs on; the
        /// target's copy must not: it exits non-zero naming the source, and its restored process is gone.
        /// (On main before this, the target disarmed its watchdog at its last page: two live copies.)
        @Test(arguments: Mode.allCases) func aSourceKilledOnceTheTargetHoldsEveryPageLeavesOneLiveCopy(mode: Mode) throws {
            let migration = try TwoNodes(mode: mode, sourceArguments: ["--die-at", "target-done"], targetArguments: [])
            defer { migration.finish() }
            let sourceOutcome = try migration.source.waitForExit(timeout: .seconds(90))
            #expect(sourceOutcome.killedBySignal, "the source did not die at target-done: \(migration.sourceErrors)")
            let targetOutcome = try migration.target.waitForExit(timeout: .seconds(60))
            #expect(targetOutcome.exitStatus != 0 && !targetOutcome.killedBySignal,
                    "the target finished with the process while its source's victim runs on: \(migration.targetErrors)")
            #expect(migration.targetErrors.contains("before it made the process this node's"), "\(migration.targetErrors)")
            #expect(pollUntil(timeout: .seconds(10)) { migration.restoredProcess() == nil }, "the restored copy runs beside the victim")
            try Self.expectVictimRunsOn(migration, "source killed at target-done")
            migration.expectNothingLeft("source killed at target-done")
        }

        /// Item 1: the source stops (SIGSTOP: alive, connected, silent) with every page marked or
        /// acknowledged and the target holding them, before it made the process the target's. The
        /// target waits `--stall-timeout` (3 s), then exits 2 naming the stall, its copy killed; the
        /// stopped source, killed then, leaves its victim to run on intact.
        @Test(arguments: Mode.allCases) func aSourceStoppedMidPostcopyIsGivenUpOnByItsTarget(mode: Mode) throws {
            let migration = try TwoNodes(mode: mode, sourceArguments: ["--stall-at", "before-commit"], targetArguments: ["--stall-timeout", "3"])
            defer { migration.finish() }
            let targetOutcome = try migration.target.waitForExit(timeout: .seconds(90))
            #expect(targetOutcome.exitStatus == 2, "target: exit \(targetOutcome.exitStatus): \(migration.targetErrors)")
            #expect(migration.targetErrors.contains("stalled") && migration.targetErrors.contains("3.0 seconds"), "\(migration.targetErrors)")
            #expect(pollUntil(timeout: .seconds(10)) { migration.restoredProcess() == nil }, "the restored process outlived its target")
            let stopped = (try? ProcFS.status(migration.source.processID))?["State"] ?? ""
            #expect(stopped.hasPrefix("T"), "the source was not stopped at before-commit: \(stopped) \(migration.sourceErrors)")
            migration.source.kill()
            try Self.expectVictimRunsOn(migration, "source stopped before its commit")
            migration.expectNothingLeft("source stopped before its commit")
        }

        /// Item 1, the other way: postcopy-socket without push, the target stops once its process runs. The
        /// source hears nothing (no request, no heartbeat) for `--stall-timeout` (3 s): it exits 2 and
        /// lets its victim run on. The target, continued, finds its source gone and kills its copy.
        @Test func aTargetStoppedMidPostcopyIsGivenUpOnByItsSource() throws {
            let migration = try TwoNodes(mode: .socket, sourceArguments: ["--push", "off", "--stall-timeout", "3"], targetArguments: [])
            defer { migration.finish() }
            try #require(pollUntil(timeout: .seconds(60)) { migration.restoredProcess() != nil }, "the target never ran its process: \(migration.targetErrors)")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGSTOP)
            let sourceOutcome = try migration.source.waitForExit(timeout: .seconds(60))
            #expect(sourceOutcome.exitStatus == 2, "source: exit \(sourceOutcome.exitStatus): \(migration.sourceErrors)")
            #expect(migration.sourceErrors.contains("stalled") && migration.sourceErrors.contains("3.0 seconds"), "\(migration.sourceErrors)")
            try Self.expectVictimRunsOn(migration, "target stopped mid-post-copy")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGCONT)
            let targetOutcome = try migration.target.waitForExit(timeout: .seconds(60))
            #expect(targetOutcome.exitStatus != 0, "the continued target finished without its source: \(migration.targetErrors)")
            #expect(pollUntil(timeout: .seconds(10)) { migration.restoredProcess() == nil }, "the restored copy outlived the failed migration")
            migration.expectNothingLeft("target stopped mid-post-copy")
        }

        /// Item 2 of what was left: the target's lease. postcopy-socket without push, both nodes with a
        /// 4 s stall timeout (the target's lease: 2 s). The target node stops once its process runs; its
        /// watchdog hears no renewal for 2 s and kills the copy, so that by the time the source gives up
        /// (4 s) and lets its victim run on, no second copy lives. Continued, the target says its lease ran
        /// out and exits 2. (Without the lease, the copy lived until the target was continued.)
        @Test func aTargetStoppedPastItsLeaseLosesItsCopyBeforeItsSourceLetsTheVictimGo() throws {
            let migration = try TwoNodes(mode: .socket, sourceArguments: ["--push", "off", "--stall-timeout", "4"],
                                         targetArguments: ["--stall-timeout", "4"])
            defer { migration.finish() }
            try #require(pollUntil(timeout: .seconds(60)) { migration.restoredProcess() != nil }, "the target never ran its process: \(migration.targetErrors)")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGSTOP)
            let sourceOutcome = try migration.source.waitForExit(timeout: .seconds(60))
            #expect(sourceOutcome.exitStatus == 2, "source: exit \(sourceOutcome.exitStatus): \(migration.sourceErrors)")
            #expect(migration.restoredProcess() == nil, "the stopped target's copy outlived its lease: two live copies once the source let go")
            try Self.expectVictimRunsOn(migration, "target stopped past its lease")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGCONT)
            let targetOutcome = try migration.target.waitForExit(timeout: .seconds(60))
            #expect(targetOutcome.exitStatus == 2 && !targetOutcome.killedBySignal, "target: exit \(targetOutcome.exitStatus): \(migration.targetErrors)")
            #expect(migration.targetErrors.contains("lease"), "\(migration.targetErrors)")
            #expect(pollUntil(timeout: .seconds(10)) { migration.restoredProcess() == nil }, "the restored copy outlived the failed migration")
            migration.expectNothingLeft("target stopped past its lease")
        }

        /// The same stop in postcopy-fam: its source waits for no word from the target, it commits the
        /// image and kills its victim, so the target's copy is the process and has no lease to lose.
        /// Continued, the target finds the commit record and lets its process go on: released from its
        /// rendezvous, it ends with the unmigrated checksum. One live copy at the end either way.
        @Test func aTargetStoppedInPostcopyFAMKeepsTheProcessItsSourceCommitted() throws {
            let migration = try TwoNodes(mode: .fam, sourceArguments: ["--stall-timeout", "4"], targetArguments: ["--stall-timeout", "4"])
            defer { migration.finish() }
            try #require(pollUntil(timeout: .seconds(60)) { migration.restoredProcess() != nil }, "the target never ran its process: \(migration.targetErrors)")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGSTOP)
            let sourceOutcome = try migration.source.waitForExit(timeout: .seconds(60))
            #expect(sourceOutcome.exitStatus == 0, "source: exit \(sourceOutcome.exitStatus): \(migration.sourceErrors)")
            #expect(pollUntil(timeout: .seconds(10)) { processLife(migration.victim) != .running }, "the source's victim lives beside the committed copy")
            Thread.sleep(forTimeInterval: 3)  // past the lease a postcopy-socket target would have
            let restored = try #require(migration.restoredProcess(), "the committed copy died while its target was stopped: no live copy")
            _ = Glibc.kill(migration.target.processID.rawValue, SIGCONT)
            _ = Glibc.kill(restored.rawValue, SIGUSR2)
            let targetOutcome = try migration.target.waitForExit(timeout: .seconds(120))
            #expect(targetOutcome.exitStatus == 0, "target: exit \(targetOutcome.exitStatus): \(migration.targetErrors)")
            #expect(pollUntil(timeout: .seconds(120)) { processLife(restored) != .running }, "the committed copy did not run to its end")
            #expect(lastChecksum(inFile: migration.output) == migration.reference, "the committed copy's run differs from the unmigrated one")
            migration.expectNothingLeft("target stopped in postcopy-fam")
        }
    }
}
