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
        lines.append("  replay: \(replayCommand(seed: result.scenario.seed, filter: filter))")
        return lines.joined(separator: "\n")
    }

    public static func summary(_ results: [IterationResult], elapsed: Duration) -> String {
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let passed = results.filter(\.passed).count
        let failed = results.filter { !$0.passed && $0.environmentError == nil }.count
        let errors = results.filter { $0.environmentError != nil }.count
        var lines = [String(format: "%d iterations in %.1f s (%.1f per second): %d passed, %d failed, %d environment errors",
                            results.count, seconds, Double(results.count) / max(seconds, 0.001), passed, failed, errors)]
        for mode in MigrationMode.allCases {
            let ofMode = results.filter { $0.scenario.mode == mode }
            guard !ofMode.isEmpty else { continue }
            let busy = ofMode.reduce(0) { $0 + $1.milliseconds } / 1000
            let kills = ofMode.filter { $0.scenario.kill != nil }.count
            lines.append(String(format: "  %-16@ %4d iterations, %.1f per worker-second, %d with a killed source, median %d steps",
                                mode.rawValue as NSString, ofMode.count, Double(ofMode.count) / max(busy, 0.001), kills,
                                ofMode.map(\.stepCount).sorted()[ofMode.count / 2]))
        }
        return lines.joined(separator: "\n")
    }

    public static func write(results: [IterationResult], json: String?, junit: String?, campaignSeed: UInt64?, filter: ScenarioFilter) throws {
        if let json {
            struct Document: Codable {
                var campaignSeed: String?
                var filter: ScenarioFilter
                var iterations: Int
                var failed: Int
                var results: [Entry]
            }
            struct Entry: Codable {
                var seed: String
                var replay: String
                var result: IterationResult
            }
            let document = Document(
                campaignSeed: campaignSeed.map(hexSeed), filter: filter, iterations: results.count,
                failed: results.filter { !$0.passed }.count,
                results: results.map { Entry(seed: hexSeed($0.scenario.seed), replay: replayCommand(seed: $0.scenario.seed, filter: filter), result: $0) })
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do { try encoder.encode(document).write(to: URL(fileURLWithPath: json)) } catch {
                throw ReportError.cannotWrite(json, "\(error)")
            }
        }
        if let junit {
            do { try junitXML(results, filter: filter).write(toFile: junit, atomically: true, encoding: .utf8) } catch {
                throw ReportError.cannotWrite(junit, "\(error)")
            }
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
