// Why this file exists: what a campaign tells people and CI: one line per iteration, the replay command
// of every failure, a summary with iterations per second by mode, and JSON / JUnit files.
import Engine
import Foundation

public enum Report {
    public static func replayCommand(seed: UInt64, filter: ScenarioFilter) -> String {
        (["torture", "--replay", hexSeed(seed)] + filter.commandLineOptions).joined(separator: " ")
    }

    public static func hexSeed(_ seed: UInt64) -> String { "0x" + String(seed, radix: 16) }

    public static func line(_ result: IterationResult) -> String {
        let verdict = result.environmentError != nil ? "ERROR" : result.passed ? "pass" : "FAIL"
        return "\(verdict) \(hexSeed(result.scenario.seed)) \(result.scenario.summary): \(result.outcome), "
            + "\(result.stepCount) steps, trace \(result.traceHash), \(String(format: "%.0f", result.milliseconds)) ms"
    }

    public static func failureText(_ result: IterationResult, filter: ScenarioFilter) -> String {
        var lines = ["FAILED seed \(hexSeed(result.scenario.seed)): \(result.scenario.summary)"]
        if let error = result.environmentError { lines.append("  environment: \(error)") }
        for failure in result.failures { lines.append("  oracle \(failure)") }
        lines.append("  outcome: \(result.outcome); \(result.stepCount) steps; trace hash \(result.traceHash)")
        if let trace = result.trace, !trace.isEmpty {
            // Its own last steps: should the replay take another schedule, these are the failure's.
            lines.append("  last steps: " + trace.suffix(6).joined(separator: " | "))
        }
        lines.append("  replay: \(replayCommand(seed: result.scenario.seed, filter: filter))")
        return lines.joined(separator: "\n")
    }

    /// A shrunk failure's length: its whole run, and the steps up to the one where the first oracle fired
    /// (the failing schedule; what ran after it only finishes the run).
    public static func shrunkLength(_ result: IterationResult) -> String {
        "\(result.stepCount) steps, first oracle (\(result.oracleName ?? "none")) at step \(result.oracleStep.map(String.init) ?? "-")"
    }

    public static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    public static func summary(_ results: [IterationResult], elapsed: Duration) -> String {
        let seconds = seconds(elapsed)
        let passed = results.filter(\.passed).count
        let failed = results.filter { !$0.passed && $0.environmentError == nil }.count
        let errors = results.filter { $0.environmentError != nil }.count
        var lines = [String(format: "%d iterations in %.1f s (%.1f per second): %d passed, %d failed, %d environment errors",
                            results.count, seconds, Double(results.count) / max(seconds, 0.001), passed, failed, errors)]
        let refused = results.filter { $0.passed && $0.outcome.hasPrefix("refused before the freeze") }.count
        if refused > 0 { lines.append("  \(refused) refused before the freeze, untouched (a workload held what fammig does not migrate, or a program post-copy refuses by design: a process tree)") }
        for mode in MigrationMode.allCases {
            let ofMode = results.filter { $0.scenario.mode == mode }
            guard !ofMode.isEmpty else { continue }
            let busy = ofMode.reduce(0) { $0 + $1.milliseconds } / 1000
            let kills = ofMode.filter { $0.scenario.kill != nil }.count
            lines.append(String(format: "  %@ %4d iterations, %.1f per worker-second, %d with a killed source, median %d steps",
                                mode.rawValue.padding(toLength: 16, withPad: " ", startingAt: 0) as NSString, ofMode.count, Double(ofMode.count) / max(busy, 0.001), kills,
                                ofMode.map(\.stepCount).sorted()[ofMode.count / 2]))
        }
        for group in CampaignFigures(results).byStrategy {
            lines.append(String(format: "  %@ %4d iterations, %d failed, median %d steps",
                                group.name.padding(toLength: 16, withPad: " ", startingAt: 0) as NSString, group.iterations, group.failed + group.environmentErrors, group.medianSteps))
        }
        return lines.joined(separator: "\n")
    }

    /// What a campaign run was, for its report: which part of which campaign, and how long it took.
    public struct RunInfo: Sendable {
        public var campaignSeed: UInt64
        public var campaignIterations: Int
        public var shard: (part: Int, count: Int)
        /// The campaign index of each result, in the results' order.
        public var indices: [Int]
        public var elapsedSeconds: Double

        public init(campaignSeed: UInt64, campaignIterations: Int, shard: (part: Int, count: Int), indices: [Int], elapsedSeconds: Double) {
            self.campaignSeed = campaignSeed
            self.campaignIterations = campaignIterations
            self.shard = shard
            self.indices = indices
            self.elapsedSeconds = elapsedSeconds
        }
    }

    /// The JSON report of `results` (`run` nil: a replay).
    public static func document(results: [IterationResult], run: RunInfo?, filter: ScenarioFilter) -> CampaignReport {
        precondition(run.map { $0.indices.count == results.count } ?? true, "one index per result")
        let entries = results.enumerated().map { position, result in
            CampaignReport.Entry(index: run?.indices[position], seed: hexSeed(result.scenario.seed),
                                 replay: replayCommand(seed: result.scenario.seed, filter: filter), result: result)
        }
        return CampaignReport(campaignSeed: run.map { hexSeed($0.campaignSeed) }, filter: filter, iterations: results.count,
                              failed: results.filter { !$0.passed }.count, campaignIterations: run?.campaignIterations,
                              shard: run.map { .init(part: $0.shard.part, count: $0.shard.count) }, elapsedSeconds: run?.elapsedSeconds,
                              figures: CampaignFigures(results), results: entries)
    }

    public static func write(results: [IterationResult], json: String?, junit: String?, run: RunInfo?, filter: ScenarioFilter) throws {
        if let json { try write(document(results: results, run: run, filter: filter), to: json) }
        if let junit { try writeJUnit(results, filter: filter, to: junit) }
    }

    public static func write(_ document: CampaignReport, to json: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do { try encoder.encode(document).write(to: URL(fileURLWithPath: json)) } catch {
            throw ReportError.cannotWrite(json, "\(error)")
        }
    }

    public static func writeJUnit(_ results: [IterationResult], filter: ScenarioFilter, to junit: String) throws {
        do { try junitXML(results, filter: filter).write(toFile: junit, atomically: true, encoding: .utf8) } catch {
            throw ReportError.cannotWrite(junit, "\(error)")
        }
    }

    /// One test case per failing seed (schedule and oracle messages in the failure), and one for the rest.
    static func junitXML(_ results: [IterationResult], filter: ScenarioFilter) -> String {
        func escape(_ text: String) -> String {
            text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
                .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
        }
        let failing = results.filter { !$0.passed }
        let seconds = results.reduce(0) { $0 + $1.milliseconds } / 1000
        var xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        xml += "<testsuites><testsuite name=\"torture\" tests=\"\(failing.count + 1)\" failures=\"\(failing.filter { $0.environmentError == nil }.count)\" "
        xml += "errors=\"\(failing.filter { $0.environmentError != nil }.count)\" time=\"\(seconds)\">\n"
        for result in failing {
            let name = "seed \(hexSeed(result.scenario.seed)) \(result.scenario.summary)"
            xml += "  <testcase classname=\"torture.\(result.scenario.mode.rawValue)\" name=\"\(escape(name))\" time=\"\(result.milliseconds / 1000)\">\n"
            let tag = result.environmentError != nil ? "error" : "failure"
            let message = result.environmentError ?? result.failures.first ?? result.outcome
            xml += "    <\(tag) message=\"\(escape(message))\">\(escape(failureText(result, filter: filter)))</\(tag)>\n"
            xml += "  </testcase>\n"
        }
        xml += "  <testcase classname=\"torture\" name=\"\(results.count - failing.count) passing iterations\"/>\n"
        xml += "</testsuite></testsuites>\n"
        return xml
    }
}

public enum ReportError: Error, CustomStringConvertible {
    case cannotWrite(String, String)
    public var description: String {
        switch self {
        case .cannotWrite(let path, let reason): "cannot write \(path): \(reason)"
        }
    }
}
