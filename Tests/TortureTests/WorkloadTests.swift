// A program that knows nothing of fammig (Debian's sha256sum over a file the test writes) under torture:
// frozen at a system call drawn from the seed, judged by every oracle, and replayed by seed with one
// trace hash; and the freeze point itself, counted under ptrace.
import Foundation
import Sys
import Testing
@testable import Torture

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct WorkloadTests {
        static let directory = "/tmp/torture-workload-\(getpid())"

        /// A file with a statically known SHA-256, and the expected output line of sha256sum for it.
        static func input() throws -> (path: String, expectedLine: String) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let path = directory + "/input.txt"
            // 64 KiB of one line repeated: several read() calls, pages of the buffer touched after the freeze.
            let text = String(repeating: "fabric-attached memory migrates a live process\n", count: 1394)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            // sha256 of that text, computed once with another implementation (python3 hashlib).
            return (path, "cfd0ea399f7f290785a89c54bfe4f06f866b1984d3c0f028c9df4499c10b5fca  \(path)")
        }

        func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return (process.terminationStatus, String(decoding: data, as: UTF8.self))
        }

        func torture(_ arguments: [String]) throws -> (status: Int32, output: String) {
            try run(try TorturePaths.torture(), arguments + ["--programs", TorturePaths.programDirectory, "--no-regressions"])
        }

        @Test func theFreezePointIsTheSameSystemCallEveryRun() throws {
            let (path, _) = try Self.input()
            defer { try? FileManager.default.removeItem(atPath: Self.directory) }
            func count() throws -> SyscallStops.Count {
                try SyscallStops.countToEnd(path: "/usr/bin/sha256sum", arguments: [path], environment: ["PATH=/usr/bin:/bin"],
                                            standardOutputPath: Self.directory + "/out", standardErrorPath: Self.directory + "/err",
                                            personality: 0x0040000, limit: .seconds(30))
            }
            let first = try count()
            #expect(first.status == .exited(0))
            #expect(first.syscallCount > 10)
            #expect(try count() == first)
            // Frozen after a call: stopped (group-stop), not ended, output not yet written.
            let frozen = try SyscallStops.startFrozen(atSyscall: 3, path: "/usr/bin/sha256sum", arguments: [path],
                                                      environment: ["PATH=/usr/bin:/bin"], standardOutputPath: Self.directory + "/frozen.out",
                                                      standardErrorPath: Self.directory + "/frozen.err", personality: 0x0040000,
                                                      diesWithStarter: true, limit: .seconds(30))
            let stat = try ProcFS.readText("/proc/\(frozen.rawValue)/stat")
            let state = stat[stat.index(stat.lastIndex(of: ")")!, offsetBy: 2)]
            #expect(state == "T", "\(stat)")
            #expect(try ProcFS.readFile(Self.directory + "/frozen.out").isEmpty)
            #expect(Spawn.killAndReap(frozen) == .killed(signal: SIGKILL))
            // Past its end: refused, saying how many calls it made.
            #expect(throws: SyscallStopError.self) {
                try SyscallStops.startFrozen(atSyscall: first.syscallCount + 5, path: "/usr/bin/sha256sum", arguments: [path],
                                             environment: ["PATH=/usr/bin:/bin"], standardOutputPath: Self.directory + "/late.out",
                                             standardErrorPath: Self.directory + "/late.err", personality: 0x0040000,
                                             diesWithStarter: true, limit: .seconds(30))
            }
        }

        @Test func aProgramThatKnowsNothingOfFammigPassesEveryOracleAndReplaysBySeed() throws {
            let (path, expectedLine) = try Self.input()
            defer { try? FileManager.default.removeItem(atPath: Self.directory) }
            let report = Self.directory + "/report.json"
            let campaign = try torture(["--workload", "sha256sum \(path)", "--iterations", "12", "--seed", "8", "--json", report])
            #expect(campaign.status == 0, "\(campaign.output)")
            #expect(campaign.output.contains("12 passed"))
            let document = try Merge.read(report)
            let results = document.results.map(\.result)
            #expect(results.allSatisfy { $0.scenario.program == Workload.programName && $0.scenario.binary == "/usr/bin/sha256sum" })
            #expect(Set(results.map(\.scenario.mode)).count > 1)
            // Frozen at system calls drawn from the seed, not all at one.
            #expect(Set(results.map(\.scenario.rendezvous)).count > 3, "\(results.map(\.scenario.rendezvous))")
            #expect(results.allSatisfy { $0.scenario.rendezvous >= 1 })

            // A seed replays with one trace hash, from the printed replay command (the workload quoted in it).
            for entry in document.results.prefix(2) {
                let words = Workload.words(entry.replay)
                #expect(words.contains("--workload"))
                for _ in 0..<2 {
                    let replayed = try torture(Array(words.dropFirst()))
                    #expect(replayed.status == 0, "\(replayed.output)")
                    #expect(replayed.output.contains("trace \(entry.result.traceHash)"), "\(replayed.output)")
                    #expect(replayed.output.contains("syscall \(entry.result.scenario.rendezvous) "))
                }
            }

            // The user's check sees the migrated output, which is the statically known digest line.
            let checked = try torture(["--workload", "sha256sum \(path)", "--iterations", "3", "--seed", "9",
                                       "--check", "grep -qx '\(expectedLine)' \"$FAMMIG_OUTPUT\" && [ \"$FAMMIG_STATUS\" = 0 ]"])
            #expect(checked.status == 0, "\(checked.output)")
            let rejected = try torture(["--workload", "sha256sum \(path)", "--iterations", "1", "--seed", "9",
                                        "--check", "grep -qx 'not the digest' \"$FAMMIG_OUTPUT\""])
            #expect(rejected.status == 1)
            #expect(rejected.output.contains("end to end: the check command exited with status 1"))
            let pinned = try torture(["--workload", "sha256sum \(path)", "--iterations", "2", "--freeze-at-syscall", "7"])
            #expect(pinned.status == 0, "\(pinned.output)")
            #expect(pinned.output.contains("syscall 7 "))
            #expect(try torture(["--workload", "no-such-program-here"]).status == 2)
            #expect(try torture(["--check", "true"]).status == 2)
        }

        /// A workload holding what fammig refuses (here a directory removed while it is open; directories
        /// themselves migrate now) cannot migrate from that point on: an iteration frozen there must end in
        /// the refusal before the freeze, victim untouched, and that passes; one frozen earlier migrates.
        @Test func aWorkloadHoldingWhatFammigRefusesIsRefusedUntouched() throws {
            let report = "/tmp/torture-refused-\(getpid()).json"
            defer { try? FileManager.default.removeItem(atPath: report) }
            // mktemp: a name of its own per run (each victim is pid 1 of its namespace, so $$ is the same).
            let result = try torture(["--workload", "sh -c 'd=$(mktemp -d /tmp/fammig-refused.XXXXXX) && exec 3<$d && rmdir $d && exec sha256sum /etc/services'",
                                      "--iterations", "6", "--seed", "6", "--json", report])
            #expect(result.status == 0, "\(result.output)")
            let outcomes = try Merge.read(report).results.map(\.result.outcome)
            #expect(outcomes.count == 6)
            let refusals = outcomes.filter { $0.hasPrefix("refused before the freeze") }
            #expect(!refusals.isEmpty, "\(outcomes)")
            #expect(refusals.allSatisfy { $0.hasSuffix("left running untouched.") })
            #expect(refusals.contains { $0.contains("fd 3 is /tmp/fammig-refused.") }, "\(refusals)")
        }

        @Test func aWorkloadReplayCommandIsARegressionLine() throws {
            var filter = ScenarioFilter(modes: [.nonlive])
            filter.workload = "/usr/bin/sha256sum '/tmp/a file'"
            filter.check = "grep -q x \"$FAMMIG_OUTPUT\""
            filter.freezeAtSyscall = 9
            let line = Report.replayCommand(seed: 0x2a, filter: filter).replacingOccurrences(of: "torture --replay ", with: "") + " # why"
            let seeds = try Regressions.parse(line.replacingOccurrences(of: "0x2a ", with: "0x2a pass "), path: "regressions.txt")
            #expect(seeds.first?.filter == filter)
            #expect(Workload.words("/usr/bin/sha256sum '/tmp/a file'") == ["/usr/bin/sha256sum", "/tmp/a file"])
        }

        @Test func fammigRunFreezesAtASystemCall() throws {
            let (path, _) = try Self.input()
            defer { try? FileManager.default.removeItem(atPath: Self.directory) }
            let fammig = URL(fileURLWithPath: try TorturePaths.torture()).deletingLastPathComponent().path + "/fammig"
            let json = Self.directory + "/run.json"
            let result = try run(fammig, ["run", "--mode", "postcopy-fam", "--freeze-at-syscall", "12", "--no-reference", "--json", json,
                                          "--", "/usr/bin/sha256sum", path])
            #expect(result.status == 0, "\(result.output)")
            #expect(result.output.contains("program: PASS (exited with status 0)"))
            #expect(!result.output.contains("FAIL"))
        }
    }
}
