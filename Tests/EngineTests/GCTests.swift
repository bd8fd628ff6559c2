// Issue 12 item 5: a `fammig run` killed with SIGKILL at any moment leaves nothing that the next
// `fammig gc` does not find and remove: the programs it started, its FAM file, its work directory, its
// node namespaces, its owner record. The victim is never left frozen. And gc never touches what a live
// fammig uses.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct GCTests {
        enum Moment: String, CaseIterable, CustomTestStringConvertible {
            /// The victim runs; the migration has not started (run waits --after-ms).
            case beforeTheFreeze
            /// The image is being written and served (postcopy-fam, the target already runs).
            case duringTheMigration
            /// The migration is done; the restored program runs on under run's watch.
            case afterTheRestore
            var testDescription: String { rawValue }
        }

        static let ownerDirectory = "/dev/shm/fammig-owners"

        static func recordedProcessCount(_ owner: ProcessID) -> Int {
            ((try? String(contentsOfFile: "\(ownerDirectory)/\(owner.rawValue).processes", encoding: .utf8)) ?? "")
                .split(separator: "\n").count
        }

        static func famFiles(of owner: ProcessID) -> [String] {
            ((try? ProcFS.directoryEntries("/dev/shm")) ?? []).filter { $0.hasPrefix("fammig-\(owner.rawValue)-") && $0.hasSuffix(".img") }
        }

        static func leftovers(of owner: ProcessID) -> [String] {
            var names = famFiles(of: owner).map { "/dev/shm/" + $0 }
            names += ((try? ProcFS.directoryEntries("/tmp")) ?? []).filter { $0.hasPrefix("fammig-run-\(owner.rawValue)-") }.map { "/tmp/" + $0 }
            names += NodeNetwork.namedNamespaces().filter { $0 == "fammig-source-\(owner.rawValue)" || $0 == "fammig-target-\(owner.rawValue)" }
            names += ((try? ProcFS.directoryEntries(ownerDirectory)) ?? []).filter { $0.hasPrefix("\(owner.rawValue).") }
            return names
        }

        @Test(arguments: Moment.allCases) func killedRunLeavesNothingAfterGC(moment: Moment) throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let program = try TestPaths.testProgram("memwalk-static")
            let run = try StartedProcess(try TestPaths.fammig(), [
                "run", "--mode", "postcopy-fam", "--netns", "--no-reference", "--after-ms", "1500", "--", program,
                "--mib", "64", "--steps", "4000000", "--pause-us", "2000",
            ], standardOutputPath: directory.path("run.out"), standardErrorPath: directory.path("run.err"))
            defer { run.kill() }
            let owner = run.processID

            let reached = pollUntil(timeout: .seconds(60)) {
                switch moment {
                case .beforeTheFreeze: Self.recordedProcessCount(owner) == 1 && Self.famFiles(of: owner).isEmpty
                case .duringTheMigration: Self.recordedProcessCount(owner) == 1 && !Self.famFiles(of: owner).isEmpty
                case .afterTheRestore: Self.recordedProcessCount(owner) == 2
                }
            }
            try #require(reached, "\(moment) never came: \((try? String(contentsOfFile: directory.path("run.err"), encoding: .utf8)) ?? "")")
            let recorded = ((try? String(contentsOfFile: "\(Self.ownerDirectory)/\(owner.rawValue).processes", encoding: .utf8)) ?? "")
                .split(separator: "\n").compactMap { Int32($0.split(separator: " ").first ?? "") }.map { ProcessID($0) }
            _ = Glibc.kill(owner.rawValue, SIGKILL)
            #expect(pollUntil(timeout: .seconds(5)) { !run.process.isRunning })

            // Its tracer gone, no program it started is left stopped (frozen).
            for processID in recorded where ProcFS.isAlive(processID) {
                let unfrozen = pollUntil(timeout: .seconds(5)) {
                    let state = (try? ProcFS.status(processID))?["State"] ?? "X"
                    return !state.hasPrefix("T") && !state.hasPrefix("t")
                }
                #expect(unfrozen, "\(moment): pid \(processID) is left stopped")
            }
            #expect(!Self.leftovers(of: owner).isEmpty, "\(moment): the killed run left nothing to collect")

            let dryRun = try runCommand(try TestPaths.fammig(), ["gc", "--dry-run"])
            #expect(dryRun.exitStatus == 0 && dryRun.standardOutput.contains("would remove"), "\(dryRun.standardOutput)")
            #expect(!Self.leftovers(of: owner).isEmpty, "--dry-run removed something")
            let gc = try runCommand(try TestPaths.fammig(), ["gc"])
            #expect(gc.exitStatus == 0, "gc: \(gc.standardError)")
            #expect(Self.leftovers(of: owner).isEmpty, "\(moment): left after gc: \(Self.leftovers(of: owner)); gc said \(gc.standardOutput)")
            for processID in recorded {
                #expect(pollUntil(timeout: .seconds(5)) { !ProcFS.isAlive(processID) }, "\(moment): pid \(processID) still runs after gc")
            }
        }

        /// A live run's files, namespaces and programs are not touched by gc.
        @Test func gcLeavesALiveRunAlone() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let program = try TestPaths.testProgram("memwalk-static")
            let run = try StartedProcess(try TestPaths.fammig(), [
                "run", "--mode", "postcopy-fam", "--netns", "--no-reference", "--after-ms", "300", "--", program,
                // About 8 s of life after the restore (4000 pauses of 2 ms): gc and the checks below must
                // run while the run is still live (a 1.6 s victim had ended first under load).
                "--mib", "16", "--steps", "2000000", "--pause-us", "2000",
            ], standardOutputPath: directory.path("run.out"), standardErrorPath: directory.path("run.err"))
            defer { run.kill() }
            let owner = run.processID
            try #require(pollUntil(timeout: .seconds(60)) { Self.recordedProcessCount(owner) == 2 }, "the run never restored")
            let before = Self.leftovers(of: owner)
            let gc = try runCommand(try TestPaths.fammig(), ["gc"])
            #expect(gc.exitStatus == 0, "gc: \(gc.standardError)")
            #expect(!gc.standardOutput.contains("fammig pid \(owner.rawValue),"), "gc touched the live run: \(gc.standardOutput)")
            let after = Self.leftovers(of: owner)
            // Judged only while the run is still live: one that ended on its own meanwhile removed its own.
            if processLife(owner) == .running { #expect(after == before) }
            let outcome = try run.waitForExit(timeout: .seconds(120))
            #expect(outcome.exitStatus == 0, "the live run failed after gc: \(outcome.standardError)")
            #expect(Self.leftovers(of: owner).isEmpty, "a run that ended well left \(Self.leftovers(of: owner))")
        }
    }
}
