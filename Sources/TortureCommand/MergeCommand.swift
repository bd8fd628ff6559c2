// `torture merge`: the shards of one campaign (`--shard K/N`, each with its own --json report) become one
// campaign report, as if one machine had run it. Exit 0: merged and every iteration passed; 1: merged, and
// some iteration failed (its replay command is printed); 2: the reports are not the shards of one campaign.
import ArgumentParser
import Foundation
import Torture

struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "torture merge",
        abstract: "Combine the JSON reports of a campaign's shards into one campaign report.",
        discussion: """
            The reports must be of one campaign (one --seed, one filter, one --iterations, one shard count), and cover it: \
            every part K of N once, each with all of its iterations. Exit status: 0 all passed, 1 an iteration failed, \
            2 the reports do not make one campaign (the message says which and why).
            """)

    static func runExitingTwoOnUsageErrors(_ arguments: [String]) -> Never {
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
            Foundation.exit(0)
        } catch {
            if exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data(("torture merge: " + fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }

    @Argument(help: "The shards' JSON reports (torture --shard K/N --json FILE).")
    var reports: [String]

    @Option(help: "Write the merged JSON report to this file.")
    var json: String?

    @Option(help: "Write a JUnit XML report of the merged campaign to this file.")
    var junit: String?

    func validate() throws {
        guard !reports.isEmpty else { throw ValidationError("give the shards' JSON reports, e.g. torture merge shard-1.json shard-2.json.") }
    }

    func run() throws {
        let merged: CampaignReport
        do {
            merged = try Merge.merge(reports.map { path throws(MergeError) in (path, try Merge.read(path)) })
        } catch {
            FileHandle.standardError.write(Data("torture merge: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let results = merged.results.map(\.result)
        let shardSeconds = merged.shardElapsedSeconds ?? []
        print("merged \(reports.count) shards of campaign \(merged.campaignSeed ?? "?") (\(merged.campaignIterations ?? 0) iterations"
              + (Merge.describeFilter(merged.filter).map { ", \($0)" } ?? "") + ")")
        print(String(format: "shards' wall time: slowest %.1f s, all together %.1f s", shardSeconds.max() ?? 0, shardSeconds.reduce(0, +)))
        print(Report.summary(results, elapsed: .milliseconds(Int64((merged.elapsedSeconds ?? 0) * 1000))))
        let failing = merged.results.filter { !$0.result.passed }
        for entry in failing.prefix(20) { print(Report.failureText(entry.result, filter: merged.filter)) }
        if failing.count > 20 { print("... and \(failing.count - 20) more failures (see the JSON report)") }
        if let json { try Report.write(merged, to: json) }
        if let junit { try Report.writeJUnit(results, filter: merged.filter, to: junit) }
        if !failing.isEmpty { throw ExitCode(1) }
    }
}
