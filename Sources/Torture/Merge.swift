// Why this file exists: a campaign too big for one machine runs as N shards (`--shard K/N`), each writing
// its own report. `torture merge` turns those reports back into the one campaign report the unsharded run
// would have written, after proving they belong together: one campaign seed, one filter, one iteration
// count, one shard count, every part present once, and every part holding exactly its iterations with the
// seeds the campaign derives for them. A report that does not fit is refused, naming what is wrong.
import Engine
import Foundation

/// The JSON report a campaign (or one shard of it, or a merge of its shards) writes.
public struct CampaignReport: Codable, Sendable {
    public struct Entry: Codable, Sendable {
        /// The iteration's index in the whole campaign (nil in a `--replay` report).
        public var index: Int?
        public var seed: String
        public var replay: String
        public var result: IterationResult
    }

    public struct ShardPart: Codable, Sendable, Equatable {
        public var part: Int
        public var count: Int
    }

    /// nil in a `--replay` report.
    public var campaignSeed: String?
    public var filter: ScenarioFilter
    /// Iterations in this report.
    public var iterations: Int
    public var failed: Int
    /// Iterations of the whole campaign (all shards together); nil in reports of older versions.
    public var campaignIterations: Int?
    /// The part this report covers; 1/1 for an unsharded campaign or a merge.
    public var shard: ShardPart?
    /// Wall time of the run that wrote it (a merge: of the slowest shard).
    public var elapsedSeconds: Double?
    /// A merge: the wall time of every shard, in part order.
    public var shardElapsedSeconds: [Double]?
    public var figures: CampaignFigures?
    public var results: [Entry]
}

/// What a campaign's results amount to, without timings: equal for a campaign and the merge of its shards.
public struct CampaignFigures: Codable, Sendable, Equatable {
    public struct Group: Codable, Sendable, Equatable {
        public var name: String
        public var iterations: Int
        public var failed: Int
        public var environmentErrors: Int
        public var killedSource: Int
        public var medianSteps: Int
        public var totalSteps: Int
    }

    public var iterations: Int
    public var passed: Int
    public var failed: Int
    public var environmentErrors: Int
    public var byMode: [Group]
    public var byStrategy: [Group]
    /// Seeds of the failing iterations, in campaign order.
    public var failingSeeds: [String]

    public init(_ results: [IterationResult]) {
        func group(_ name: String, _ members: [IterationResult]) -> Group {
            Group(name: name, iterations: members.count,
                  failed: members.filter { !$0.passed && $0.environmentError == nil }.count,
                  environmentErrors: members.filter { $0.environmentError != nil }.count,
                  killedSource: members.filter { $0.scenario.kill != nil }.count,
                  medianSteps: members.isEmpty ? 0 : members.map(\.stepCount).sorted()[members.count / 2],
                  totalSteps: members.reduce(0) { $0 + $1.stepCount })
        }
        iterations = results.count
        passed = results.filter(\.passed).count
        failed = results.filter { !$0.passed && $0.environmentError == nil }.count
        environmentErrors = results.filter { $0.environmentError != nil }.count
        byMode = MigrationMode.allCases.compactMap { mode in
            let members = results.filter { $0.scenario.mode == mode }
            return members.isEmpty ? nil : group(mode.rawValue, members)
        }
        byStrategy = StrategyName.allCases.compactMap { strategy in
            let members = results.filter { $0.scenario.strategy == strategy }
            return members.isEmpty ? nil : group(strategy.rawValue, members)
        }
        failingSeeds = results.filter { !$0.passed }.map { Report.hexSeed($0.scenario.seed) }
    }
}

public enum MergeError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, reason: String)
    case notACampaign(path: String, reason: String)
    case differentCampaigns(path: String, field: String, expected: String, found: String)
    case overlap(part: Int, first: String, second: String)
    case gap(missingParts: [Int], count: Int)
    case wrongIterations(path: String, reason: String)

    public var description: String {
        switch self {
        case .unreadable(let path, let reason): "cannot read \(path) as a torture JSON report: \(reason)"
        case .notACampaign(let path, let reason): "\(path) is not the report of a campaign shard: \(reason)"
        case .differentCampaigns(let path, let field, let expected, let found):
            "\(path) is of another campaign: its \(field) is \(found), the first report's is \(expected); merge only the shards of one run"
        case .overlap(let part, let first, let second):
            "shard \(part) is given twice (\(first) and \(second)); give each part once"
        case .gap(let missing, let count):
            "the shards do not cover the campaign: part\(missing.count == 1 ? "" : "s") \(missing.map(String.init).joined(separator: ", ")) of \(count) missing; run them (--shard K/\(count)) and merge all \(count)"
        case .wrongIterations(let path, let reason): "\(path) does not hold its shard's iterations: \(reason)"
        }
    }
}

public enum Merge {
    /// Reads one report file.
    public static func read(_ path: String) throws(MergeError) -> CampaignReport {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw .unreadable(path: path, reason: (error as NSError).localizedDescription)
        }
        guard data.count <= 1 << 30 else { throw .unreadable(path: path, reason: "larger than 1 GiB") }
        do { return try JSONDecoder().decode(CampaignReport.self, from: data) } catch {
            throw .unreadable(path: path, reason: "\(error)")
        }
    }

    /// Merges the shard reports (each with the path it came from, for messages) into the campaign's report.
    public static func merge(_ reports: [(path: String, report: CampaignReport)]) throws(MergeError) -> CampaignReport {
        guard let (firstPath, first) = reports.first else { throw .gap(missingParts: [1], count: 1) }
        func campaignFields(_ path: String, _ report: CampaignReport) throws(MergeError) -> (seed: UInt64, iterations: Int, shard: CampaignReport.ShardPart) {
            guard let seedText = report.campaignSeed, let seed = Regressions.parseSeed(seedText) else {
                throw .notACampaign(path: path, reason: "it has no campaign seed (a --replay report?)")
            }
            guard let iterations = report.campaignIterations, let shard = report.shard else {
                throw .notACampaign(path: path, reason: "it names no shard or campaign size (written by an older torture?)")
            }
            guard iterations >= 1, shard.count >= 1, (1...shard.count).contains(shard.part) else {
                throw .notACampaign(path: path, reason: "shard \(shard.part)/\(shard.count) of \(iterations) iterations is not a shard")
            }
            return (seed, iterations, shard)
        }
        let campaign = try campaignFields(firstPath, first)
        var byPart: [Int: (path: String, report: CampaignReport)] = [:]
        for (path, report) in reports {
            let fields = try campaignFields(path, report)
            guard fields.seed == campaign.seed else {
                throw .differentCampaigns(path: path, field: "campaign seed", expected: Report.hexSeed(campaign.seed), found: Report.hexSeed(fields.seed))
            }
            guard report.filter == first.filter else {
                throw .differentCampaigns(path: path, field: "filter", expected: describe(first.filter), found: describe(report.filter))
            }
            guard fields.iterations == campaign.iterations else {
                throw .differentCampaigns(path: path, field: "iteration count", expected: "\(campaign.iterations)", found: "\(fields.iterations)")
            }
            guard fields.shard.count == campaign.shard.count else {
                throw .differentCampaigns(path: path, field: "shard count", expected: "\(campaign.shard.count)", found: "\(fields.shard.count)")
            }
            if let earlier = byPart[fields.shard.part] { throw .overlap(part: fields.shard.part, first: earlier.path, second: path) }
            try checkIterations(path: path, report: report, seed: campaign.seed, iterations: campaign.iterations, shard: fields.shard)
            byPart[fields.shard.part] = (path, report)
        }
        let missing = (1...campaign.shard.count).filter { byPart[$0] == nil }
        guard missing.isEmpty else { throw .gap(missingParts: missing, count: campaign.shard.count) }

        let parts = (1...campaign.shard.count).map { byPart[$0]!.report }
        let entries = parts.flatMap(\.results).sorted { $0.index! < $1.index! }
        let results = entries.map(\.result)
        let shardSeconds = parts.map { $0.elapsedSeconds ?? 0 }
        return CampaignReport(campaignSeed: first.campaignSeed, filter: first.filter, iterations: entries.count,
                              failed: results.filter { !$0.passed }.count, campaignIterations: campaign.iterations,
                              shard: .init(part: 1, count: 1), elapsedSeconds: shardSeconds.max(),
                              shardElapsedSeconds: shardSeconds, figures: CampaignFigures(results), results: entries)
    }

    /// A shard holds exactly the indices `index % count == part - 1`, each once, each with its derived seed.
    static func checkIterations(path: String, report: CampaignReport, seed: UInt64, iterations: Int,
                                shard: CampaignReport.ShardPart) throws(MergeError) {
        let expected = (0..<iterations).filter { $0 % shard.count == shard.part - 1 }
        var seen = Set<Int>()
        for entry in report.results {
            guard let index = entry.index else { throw .wrongIterations(path: path, reason: "an entry has no iteration index") }
            guard index >= 0, index < iterations, index % shard.count == shard.part - 1 else {
                throw .wrongIterations(path: path, reason: "iteration \(index) is not part \(shard.part) of \(shard.count)'s")
            }
            guard seen.insert(index).inserted else { throw .wrongIterations(path: path, reason: "iteration \(index) appears twice") }
            let derived = Scenario.iterationSeed(campaignSeed: seed, index: index)
            guard entry.result.scenario.seed == derived else {
                throw .wrongIterations(path: path, reason: "iteration \(index) ran seed \(Report.hexSeed(entry.result.scenario.seed)), "
                                       + "the campaign derives \(Report.hexSeed(derived))")
            }
        }
        guard seen.count == expected.count else {
            throw .wrongIterations(path: path, reason: "it holds \(seen.count) of its \(expected.count) iterations "
                                   + "(stopped early by --fail-fast or interrupted?); run the shard again in full")
        }
    }

    static func describe(_ filter: ScenarioFilter) -> String {
        let options = filter.commandLineOptions
        return options.isEmpty ? "(none)" : "'" + options.joined(separator: " ") + "'"
    }
}

extension Merge {
    /// The filter as command-line options, or nil when the campaign had none.
    public static func describeFilter(_ filter: ScenarioFilter) -> String? {
        filter.commandLineOptions.isEmpty ? nil : filter.commandLineOptions.joined(separator: " ")
    }
}
