// The failure page of a deliberately failing iteration (a FAM whose fences do nothing, through the test-only
// source FAM seam; and the user's check command rejecting a workload's run, through the command line): it
// parses as XML, and holds the timeline, the step where the oracle fired, the replay and shrunk commands.
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing
@testable import Torture

/// Collects the elements of a page (local names, with their attributes) and its text.
final class PageElements: NSObject, XMLParserDelegate {
    var elements: [(name: String, attributes: [String: String])] = []
    var text = ""
    func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        elements.append((elementName, attributes))
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    static func parse(_ page: String) throws -> PageElements {
        let collector = PageElements()
        let parser = XMLParser(data: Data(page.utf8))
        parser.delegate = collector
        guard parser.parse() else { throw TortureTestError.missing("well-formed XML: \(parser.parserError.map { "\($0)" } ?? "?")") }
        return collector
    }

    func count(_ name: String, where predicate: ([String: String]) -> Bool = { _ in true }) -> Int {
        elements.filter { $0.name == name && predicate($0.attributes) }.count
    }
}

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct HTMLReportTests {
        @Test func aFailingIterationsPageShowsItsTimelineAndWhereTheOracleFired() throws {
            var filter = ScenarioFilter(modes: [.postcopyFAM], programs: ["memwalk"])
            filter.noKill = true
            var options = try TorturePaths.campaignOptions(seed: 21, iterations: 1, filter: filter)
            options.sourceFAMWrapper = { CampaignTests.FencelessFAM($0) }
            let campaign = Campaign(options: options)
            let failing = campaign.runOne(seed: 0xBAD, filter: filter, keepTrace: true)
            #expect(!failing.passed)
            let step = try #require(failing.oracleStep)
            #expect(failing.oracleName == "FAM")
            #expect(step >= 1 && step <= failing.stepCount)
            let trace = try #require(failing.trace)
            let replay = Report.replayCommand(seed: failing.scenario.seed, filter: filter)
            let page = HTMLReport.page(failing: .init(title: "Schedule", replay: replay, result: failing, trace: trace), shrunk: nil)
            let parsed = try PageElements.parse(page)
            #expect(parsed.count("html") == 1 && parsed.count("svg") == 1)
            // A mark per step, or per column of steps when there are more steps than the plot's 1100 columns
            // (one per actor that stepped in that column), in the lane of the actor that took it; every lane
            // labelled. The trace's length follows the victim's non-zero cache lines, so it is not the same on
            // every machine (CI's was a few steps shorter): the count is checked against the trace, not a bound.
            let marks = parsed.count("rect", where: { $0["class"] == "step" })
            let stepsPerColumn = (max(trace.count, failing.stepCount) + 1099) / 1100
            let columns = Set(trace.compactMap { HTMLReport.parse($0).map { "\(($0.number - 1) / stepsPerColumn) \($0.actor)" } })
            #expect(marks == columns.count, "\(trace.count) steps, \(stepsPerColumn) per column")
            if trace.count <= 1100 { #expect(marks == trace.count) } else { #expect(marks < trace.count) }
            let lanes = Set(trace.compactMap { HTMLReport.parse($0)?.actor })
            #expect(lanes.isSuperset(of: ["dumper", "restorer"]))
            for lane in lanes { #expect(parsed.text.contains(lane)) }
            #expect(parsed.count("line", where: { $0["class"] == "oracle-step" }) == 1)
            #expect(parsed.text.contains("FAM fired at step \(step)"))
            #expect(parsed.text.contains(replay))
            #expect(parsed.count("pre", where: { $0["id"] == "shrunk-replay" }) == 0)
            // No external asset: nothing is fetched to show it.
            #expect(!page.contains("src=") && !page.contains("href=") && !page.contains("<script"))
        }

        @Test func theCommandWritesOnePageBesideTheJSONWithTheShrunkSchedule() throws {
            let directory = "/tmp/torture-html-\(getpid())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try TorturePaths.torture())
            process.arguments = ["--workload", "sha256sum /etc/services", "--check", "false", "--iterations", "1", "--seed", "4",
                                 "--shrink", "--json", directory + "/report.json", "--no-regressions", "--programs", TorturePaths.programDirectory]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            #expect(process.terminationStatus == 1)
            let pages = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".html") }
            #expect(pages.count == 1, "\(pages)")
            let page = try String(contentsOfFile: directory + "/" + (pages.first ?? ""), encoding: .utf8)
            let parsed = try PageElements.parse(page)
            #expect(parsed.count("svg", where: { $0["id"] == "timeline" }) == 1)
            #expect(parsed.count("svg", where: { $0["id"] == "shrunk-timeline" }) == 1)
            #expect(parsed.count("pre", where: { $0["id"] == "shrunk-replay" }) == 1)
            #expect(parsed.text.contains("end to end: the check command exited with status 1"))
            #expect(parsed.text.contains("torture --replay 0x"))
            // A check that judges the end fires after the last step.
            #expect(parsed.text.contains("end to end fired at step"))
            // The failure keeps its own schedule in the JSON report (a failure that does not replay still
            // shows what it did): every step, as many as it took.
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: directory + "/report.json"))) as? [String: Any]
            let failed = try #require((report?["results"] as? [[String: Any]])?.first?["result"] as? [String: Any])
            let steps = try #require(failed["stepCount"] as? Int)
            #expect((failed["trace"] as? [String])?.count == steps && steps > 0)
            try renderedInChromium(directory + "/" + pages[0])
        }

        /// Where Debian's chromium is installed (scripts/test installs it), the page's SVG must render: a
        /// screenshot is taken and must hold the timeline's red oracle line (not a blank or an error page).
        func renderedInChromium(_ path: String) throws {
            let candidates: [String] = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            guard let chromium = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else { return }
            let shot = path + ".png"
            let process = Process()
            process.executableURL = URL(fileURLWithPath: chromium)
            process.arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--screenshot=\(shot)", "--window-size=1400,900",
                                 "file://" + path]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
            let check = Process()
            check.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            check.arguments = [TorturePaths.packageRoot + "/scripts/png-has-colour", shot, "221,0,0"]
            try check.run()
            check.waitUntilExit()
            #expect(check.terminationStatus == 0, "the screenshot of \(path) shows no rendered oracle line")
        }
    }
}
