// Shards and their merge: the union of a campaign's shards is the whole campaign with the same per-iteration
// seeds, and merging the shards' real reports gives the unsharded run's counts, figures and failures.
import Foundation
import Sys
import Testing
@testable import Torture

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct MergeTests {
        @Test(arguments: [1, 2, 3, 4, 7])
        func theShardsPartitionTheCampaign(count: Int) throws {
            var options = CampaignOptions(seed: 42, iterations: 40, filter: ScenarioFilter(), programDirectory: "/", stubPath: "/", workDirectory: "/")
            var union: [Int] = []
            for part in 1...count {
                options.shard = (part, count)
                #expect(options.indices.allSatisfy { $0 % count == part - 1 })
                union += options.indices
            }
            #expect(union.sorted() == Array(0..<40))
            // A seed depends on the campaign seed and index only, not on the shard that runs it.
            let seeds = union.sorted().map { Scenario.iterationSeed(campaignSeed: 42, index: $0) }
            #expect(Set(seeds).count == 40)
        }

        /// Four real shards (with a FAM whose fences do nothing in some iterations, so that the merge has
        /// failures to carry) against the same campaign unsharded.
        @Test func fourShardReportsMergeIntoTheUnshardedRun() throws {
            let directory = "/tmp/torture-merge-\(getpid())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            // Single-threaded programs: their trace hashes are one per seed.
            let filter = ScenarioFilter(programs: ["memwalk", "signals", "sleeper", "seccomp", "caps"])
            func campaign(shard: (Int, Int)) throws -> (results: [IterationResult], indices: [Int]) {
                var options = try TorturePaths.campaignOptions(seed: 23, iterations: 24, filter: filter)
                options.shard = shard
                options.sourceFAMWrapper = { CampaignTests.FencelessFAM($0) }
                let campaign = Campaign(options: options)
                let results = campaign.run { _, _ in }
                return (results, options.indices)
            }
            let whole = try campaign(shard: (1, 1))
            var shardReports: [(path: String, report: CampaignReport)] = []
            for part in 1...4 {
                let shard = try campaign(shard: (part, 4))
                let run = Report.RunInfo(campaignSeed: 23, campaignIterations: 24, shard: (part, 4), indices: shard.indices, elapsedSeconds: 1)
                let path = directory + "/shard-\(part).json"
                try Report.write(results: shard.results, json: path, junit: nil, run: run, filter: filter)
                shardReports.append((path, try Merge.read(path)))
            }
            // Out of order on purpose: the merge sorts by campaign index.
            let merged = try Merge.merge(shardReports.reversed())
            let wholeReport = Report.document(results: whole.results,
                                              run: .init(campaignSeed: 23, campaignIterations: 24, shard: (1, 1), indices: whole.indices, elapsedSeconds: 1),
                                              filter: filter)
            #expect(merged.iterations == 24)
            #expect(merged.results.map(\.index) == Array(0..<24))
            #expect(merged.results.map(\.seed) == wholeReport.results.map(\.seed))
            #expect(merged.results.map(\.result.traceHash) == wholeReport.results.map(\.result.traceHash))
            #expect(merged.results.map(\.replay) == wholeReport.results.map(\.replay))
            #expect(merged.figures == wholeReport.figures)
            #expect(merged.failed == wholeReport.failed)
            #expect(merged.figures?.failingSeeds == wholeReport.figures?.failingSeeds)
            let failing = try #require(merged.figures?.failingSeeds)
            #expect(!failing.isEmpty, "the fenceless FAM must fail some iterations")
            #expect(merged.results.filter { !$0.result.passed }.map(\.result.failures) == wholeReport.results.filter { !$0.result.passed }.map(\.result.failures))
            #expect((merged.figures?.byStrategy.count ?? 0) > 1 && merged.figures?.byMode.count == 3)

            // What does not make one campaign is refused, naming why.
            #expect(throws: MergeError.gap(missingParts: [3], count: 4)) {
                try Merge.merge(shardReports.enumerated().filter { $0.offset != 2 }.map(\.element))
            }
            #expect(throws: MergeError.overlap(part: 2, first: shardReports[1].path, second: shardReports[1].path)) {
                try Merge.merge(shardReports + [shardReports[1]])
            }
            var otherSeed = shardReports[3]
            otherSeed.report.campaignSeed = "0x18"
            #expect(throws: MergeError.differentCampaigns(path: otherSeed.path, field: "campaign seed", expected: "0x17", found: "0x18")) {
                try Merge.merge(Array(shardReports.dropLast()) + [otherSeed])
            }
            var otherFilter = shardReports[3]
            otherFilter.report.filter.push = true
            #expect(throws: MergeError.self) { try Merge.merge(Array(shardReports.dropLast()) + [otherFilter]) }
            var otherSize = shardReports[3]
            otherSize.report.campaignIterations = 28
            #expect(throws: MergeError.self) { try Merge.merge(Array(shardReports.dropLast()) + [otherSize]) }
            var cut = shardReports[0]
            cut.report.results.removeLast()
            #expect(throws: MergeError.self) { try Merge.merge([cut] + Array(shardReports.dropFirst())) }
            var swapped = shardReports[0]
            swapped.report.results[0].result.scenario.seed ^= 1
            #expect(throws: MergeError.self) { try Merge.merge([swapped] + Array(shardReports.dropFirst())) }

            // The command: exit 1 with the failures' replay commands, 2 on a gap, and a merged report that reads back.
            let mergedPath = directory + "/merged.json"
            let command = try runMerge(shardReports.map(\.path) + ["--json", mergedPath, "--junit", directory + "/merged.xml"])
            #expect(command.status == 1, "\(command.output)")
            #expect(command.output.contains("merged 4 shards of campaign 0x17"))
            #expect(command.output.contains("replay: torture --replay \(failing[0])"))
            #expect(try Merge.read(mergedPath).figures == wholeReport.figures)
            let gap = try runMerge(Array(shardReports.map(\.path).dropLast()))
            #expect(gap.status == 2)
            #expect(gap.output.contains("part 4 of 4 missing"))
            #expect(try runMerge([directory + "/nothing.json"]).status == 2)
        }

        func runMerge(_ arguments: [String]) throws -> (status: Int32, output: String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try TorturePaths.torture())
            process.arguments = ["merge"] + arguments
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return (process.terminationStatus, String(decoding: data, as: UTF8.self))
        }
    }
}
