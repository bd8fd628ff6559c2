// Torture end to end: real programs, real ptrace and userfaultfd, the model FAM and the in-memory
// transport under the deterministic driver. These tests run after the engine's (scripts/test runs the two
// test targets one after the other), so their processes never meet the engine tests' leak checks.
import Engine
import Foundation
import Sys
import Testing
@testable import Torture

/// Suites that start real processes and check, process-wide, that nothing was left behind: they run one
/// after the other, or one would count the other's children and descriptors as leaks.
@Suite(.serialized) struct ProcessSpawningTortureTests {}

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct CampaignTests {
        @Test func aShortCampaignPassesInEveryModeWithEveryOracle() throws {
            let options = try TorturePaths.campaignOptions(seed: 11, iterations: 36, filter: ScenarioFilter())
            let campaign = Campaign(options: options)
            let results = campaign.run { _, _ in }
            #expect(results.count == 36)
            for result in results where !result.passed {
                Issue.record("\(Report.failureText(result, filter: options.filter))")
            }
            #expect(Set(results.map(\.scenario.mode)) == Set(MigrationMode.allCases))
            // The target really ran under the driver: post-copy iterations took faults and steps.
            #expect(results.filter { $0.scenario.mode != .nonlive && $0.killedAt == nil }.allSatisfy { $0.stepCount > 10 })
            #expect(campaign.ledger.liveModelCount == 0)
            #expect(campaign.leaks.isEmpty, "\(campaign.leaks)")
            #expect(campaign.ledger.createdModelCount > 0)
        }

        @Test func replayingASeedGivesTheSameScheduleAndTraceHash() throws {
            let options = try TorturePaths.campaignOptions(seed: 5, iterations: 1, filter: ScenarioFilter())
            let campaign = Campaign(options: options)
            for mode in MigrationMode.allCases {
                // Single-threaded programs: the threads of a multi-threaded one race each other in the kernel.
                let filter = ScenarioFilter(modes: [mode], programs: ["memwalk", "signals", "sleeper", "seccomp", "caps"],
                                            strategies: [.racingFaults])
                let first = campaign.runOne(seed: 0xF00D + UInt64(MigrationMode.allCases.firstIndex(of: mode)!), filter: filter, keepTrace: true)
                let second = campaign.runOne(seed: first.scenario.seed, filter: filter, keepTrace: true)
                #expect(first.passed, "\(Report.failureText(first, filter: filter))")
                #expect(first.traceHash == second.traceHash)
                #expect(first.trace == second.trace)
                #expect((first.trace?.count ?? 0) == first.stepCount)
            }
        }

        /// A schedule written down (the picks of a run with its adversarial steps) replays that run step
        /// for step; a script cut short hands over to the fair order and still completes. What the
        /// shrinker's cuts stand on.
        @Test func aWrittenScheduleReplaysTheRunItWasTakenFrom() throws {
            let options = try TorturePaths.campaignOptions(seed: 5, iterations: 1, filter: ScenarioFilter())
            let campaign = Campaign(options: options)
            for mode in MigrationMode.allCases {
                var filter = ScenarioFilter(modes: [mode], programs: ["memwalk", "signals"], strategies: [.random])
                filter.noKill = true
                filter.adversarialSteps = 30
                let first = campaign.runOne(seed: 0xBEEF + UInt64(MigrationMode.allCases.firstIndex(of: mode)!), filter: filter, keepTrace: true)
                #expect(first.passed, "\(Report.failureText(first, filter: filter))")
                let picks = try #require(first.picks)
                #expect(picks.count == first.stepCount)
                var scripted = filter
                scripted.schedule = try ScheduleScript.decode(ScheduleScript.encode(picks)).get()
                let replayed = campaign.runOne(seed: first.scenario.seed, filter: scripted, keepTrace: true)
                #expect(replayed.traceHash == first.traceHash)
                #expect(replayed.trace == first.trace)
                scripted.schedule = Array(picks.prefix(12))
                let cut = campaign.runOne(seed: first.scenario.seed, filter: scripted, keepTrace: true)
                #expect(cut.passed, "\(Report.failureText(cut, filter: scripted))")
                #expect(cut.picks.map { Array($0.prefix(12)) } == Array(picks.prefix(12)))
            }
        }

        /// The target node dies after the restored process ran: its watchdog kills the restored process
        /// before it reads a hole (unless every page was in), in both post-copy modes, and a replay
        /// gives the same schedule. The nemesis found, on its first run, that a held wake of the dead
        /// fault handler still ran (EBADF), and that a node dying before it let its process go left
        /// traced zombie threads behind (the nemesis now fires only after the resume).
        @Test func aTargetNodeDeathNeverLetsTheRestoredProcessRunOnHoles() throws {
            var filter = ScenarioFilter(modes: [.postcopyFAM, .postcopySocket])
            filter.killTarget = true
            let options = try TorturePaths.campaignOptions(seed: 44, iterations: 24, filter: filter)
            let campaign = Campaign(options: options)
            var watchdogKills = 0
            for index in 0..<24 {
                let seed = Scenario.iterationSeed(campaignSeed: 44, index: index)
                let result = campaign.runOne(seed: seed, filter: filter, keepTrace: true)
                #expect(result.passed, "\(Report.failureText(result, filter: filter))")
                guard result.scenario.targetKill != nil else { continue }
                if result.trace?.contains(where: { $0.hasSuffix("the watchdog killed the restored process") }) == true {
                    watchdogKills += 1
                    #expect(campaign.runOne(seed: seed, filter: filter, keepTrace: false).traceHash == result.traceHash)
                }
            }
            #expect(watchdogKills >= 5, "the target node died with pages missing \(watchdogKills) times")
        }

        @Test func sourceKillsEndCleanlyBeforeTheCommitAndCompleteAfterIt() throws {
            var filter = ScenarioFilter(modes: [.postcopyFAM, .nonlive], strategies: [.killedSource])
            filter.size = 0
            let options = try TorturePaths.campaignOptions(seed: 3, iterations: 30, filter: filter)
            let results = Campaign(options: options).run { _, _ in }
            for result in results where !result.passed {
                Issue.record("\(Report.failureText(result, filter: filter))")
            }
            let kills = results.compactMap(\.killedAt)
            #expect(kills.count >= 10, "the nemesis fired \(kills.count) times")
            // Both sides of the commit record were hit, and each ended as it must (the oracle checks it).
            #expect(kills.contains("complete"))
            #expect(kills.contains { $0 != "complete" })
            #expect(results.contains { $0.killedAt == "complete" && $0.outcome == "completed" })
            #expect(results.contains { $0.killedAt != nil && $0.killedAt != "complete" && $0.outcome != "completed" })
        }

        /// A FAM backend whose fences do nothing: flushed lines never become durable, and marks and the
        /// commit record are stored over pages that are not. The model's checker must name it.
        final class FencelessFAM: ForwardingFAM, @unchecked Sendable {
            override func fence() {}
        }

        @Test func aFAMThatNeverFencesIsCaughtByTheChecker() throws {
            var filter = ScenarioFilter(modes: [.postcopyFAM, .nonlive])
            filter.noKill = true
            var options = try TorturePaths.campaignOptions(seed: 21, iterations: 4, filter: filter)
            options.sourceFAMWrapper = { FencelessFAM($0) }
            let results = Campaign(options: options).run { _, _ in }
            #expect(results.count == 4)
            for result in results {
                #expect(!result.passed)
                #expect(result.failures.contains { $0.hasPrefix("FAM: ") }, "\(result.failures)")
            }
        }
    }

    @Suite(.serialized) struct TortureCommandTests {
        func runTorture(_ arguments: [String]) throws -> (status: Int32, output: String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try TorturePaths.torture())
            process.arguments = arguments + ["--programs", TorturePaths.programDirectory]
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return (process.terminationStatus, String(decoding: data, as: UTF8.self))
        }

        /// A torture binary replaced while its campaign runs (a rebuild: the linker writes a new file) must
        /// not break the campaign: each restore's stub is this very executable, not whatever file now has
        /// its path. Before, a half-written file there failed every later iteration ("the stub failed").
        @Test func aCampaignSurvivesItsBinaryBeingReplaced() throws {
            #expect(TorturePaths.programsBuilt)
            let directory = "/tmp/torture-replaced-\(getpid())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let binary = directory + "/torture"
            try FileManager.default.copyItem(atPath: try TorturePaths.torture(), toPath: binary)
            let outputPath = directory + "/output"
            #expect(FileManager.default.createFile(atPath: outputPath, contents: nil))
            let output = try #require(FileHandle(forWritingAtPath: outputPath))
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["--iterations", "12", "--seed", "5", "--no-regressions", "--programs", TorturePaths.programDirectory]
            process.standardOutput = output
            process.standardError = output
            try process.run()
            try output.close()
            func printed() -> String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
            // Replaced as soon as it runs (Foundation spawns with vfork semantics: run() returns after the
            // exec), so every iteration's stub starts after the path names a half-written file.
            let halfWritten = Array(try Data(contentsOf: URL(fileURLWithPath: binary)).prefix(1000))
            #expect(FileManager.default.createFile(atPath: binary + ".new", contents: Data(halfWritten), attributes: [.posixPermissions: 0o755]))
            #expect(rename(binary + ".new", binary) == 0)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "\(printed())")
            #expect(printed().contains("12 passed"), "\(printed())")
        }

        /// With --fail-fast, a failing regression seed is the first failure: the campaign is not run.
        @Test func failFastStopsAtAFailingRegressionSeed() throws {
            #expect(TorturePaths.programsBuilt)
            let path = "/tmp/torture-regressions-\(getpid()).txt"
            defer { unlink(path) }
            let line = "0x1 pass --workload 'sha256sum /etc/services' --check 'false' --mode nonlive --no-kill # always judged wrong\n"
            #expect(FileManager.default.createFile(atPath: path, contents: Data(line.utf8)))
            let run = try runTorture(["--iterations", "200", "--seed", "3", "--regressions", path, "--fail-fast"])
            #expect(run.status == 1, "\(run.output)")
            #expect(run.output.contains("first failure at a regression seed; the campaign was not run"), "\(run.output)")
            #expect(!run.output.contains("iterations in"), "the campaign ran: \(run.output)")
        }

        @Test func helpAndUsageErrors() throws {
            let help = try runTorture(["--help"])
            #expect(help.status == 0)
            #expect(help.output.contains("--replay"))
            #expect(try runTorture(["--shard", "3/2"]).status == 2)
            #expect(try runTorture(["--mode", "sideways"]).status == 2)
            #expect(try runTorture(["--iterations", "0"]).status == 2)
            let noPrograms = Process()
            noPrograms.executableURL = URL(fileURLWithPath: try TorturePaths.torture())
            noPrograms.arguments = ["--programs", "/nonexistent", "--iterations", "1"]
            noPrograms.standardOutput = FileHandle.nullDevice
            noPrograms.standardError = FileHandle.nullDevice
            try noPrograms.run()
            noPrograms.waitUntilExit()
            #expect(noPrograms.terminationStatus == 2)
        }

        @Test func aCampaignLineReplaysWithTheSameTraceHashAndReportsAreWritten() throws {
            #expect(TorturePaths.programsBuilt)
            let directory = "/tmp/torture-cli-\(getpid())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let campaign = try runTorture(["--iterations", "6", "--seed", "77", "--json", directory + "/report.json",
                                           "--junit", directory + "/report.xml", "--shard", "1/2"])
            #expect(campaign.status == 0, "\(campaign.output)")
            #expect(campaign.output.contains("3 iterations"))
            let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: directory + "/report.json"))) as? [String: Any]
            let entries = try #require(json?["results"] as? [[String: Any]])
            #expect(entries.count == 3)
            let first = try #require(entries.first)
            let replay = try #require(first["replay"] as? String)
            let result = try #require(first["result"] as? [String: Any])
            let hash = try #require(result["traceHash"] as? String)
            let replayed = try runTorture(Array(replay.split(separator: " ").dropFirst().map(String.init)))
            #expect(replayed.status == 0)
            #expect(replayed.output.contains("trace \(hash)"), "\(replayed.output)")
            let xml = try String(contentsOfFile: directory + "/report.xml", encoding: .utf8)
            #expect(xml.contains("<testsuite name=\"torture\""))
        }
    }
}

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct ChaosTests {
        @Test func chaosIterationsPassUnderEveryModeAndLeaveNothing() throws {
            var filter = ScenarioFilter()
            filter.chaos = true
            let campaign = Campaign(options: try TorturePaths.campaignOptions(seed: 3, iterations: 9, filter: filter))
            let results = campaign.run { _, _ in }
            #expect(results.count == 9)
            #expect(Set(results.map(\.scenario.mode)).count > 1)
            for result in results {
                #expect(result.passed, "\(Report.failureText(result, filter: filter))")
                #expect(result.scenario.kill == nil && result.scenario.tamper == nil)
            }
            #expect(campaign.leaks.isEmpty, "\(campaign.leaks)")
        }
    }
}
