// Issue 13 item 7: `fammig study --quick` runs its matrix (memwalk and kvstore, every mode) and writes one
// HTML page whose every plot renders in headless Chromium with data in it, beside a JSON of the runs with
// the traces the plots are drawn from. No figure is judged here (speed goals are `study` figures, not tests).
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct StudyTests {
        @Test func aQuickStudysPageRendersEveryPlotWithData() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let page = directory.path("study.html"), json = directory.path("study.json")
            let outcome = try leftovers.fammig(["study", "--quick", "--sizes", "8", "--html", page, "--json", json,
                                                "--memwalk", try TestPaths.testProgram("memwalk-static"),
                                                "--kvstore", try TestPaths.testProgram("kvstore-static")], timeout: .seconds(300))
            try #require(outcome.exitStatus == 0, "study failed: \(outcome.standardError)")
            #expect(outcome.standardOutput.contains("goal busy fam / socket (memwalk, 8 MiB)"))

            // Two workloads times three modes, each with its program's progress through the migration.
            let report = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
            let runs = try #require(report["runs"] as? [[String: Any]])
            #expect(runs.count == 6)
            for run in runs {
                let trace = try #require(run["trace"] as? [String: Any])
                let events = try #require(trace["events"] as? [String: Any])
                #expect(events["frozen"] != nil && events["targetResumed"] != nil)
                let progress = try #require(trace["progress"] as? [[String: Any]])
                #expect(progress.count >= 4, "\(run["workload"] ?? "?") \((run["sample"] as? [String: Any])?["mode"] ?? "?"): \(progress.count) progress points")
            }

            // Chromium parses the page and every <figure class="plot"> holds an SVG with its data marks.
            let chromium = try #require(["/usr/bin/chromium", "/usr/bin/chromium-browser"].first { FileManager.default.isExecutableFile(atPath: $0) },
                                        "Debian's chromium (scripts/setup installs it)")
            let dump = try runCommand(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "file://" + page], timeout: .seconds(120))
            try #require(dump.exitStatus == 0, "chromium: \(dump.standardError)")
            let figures = dump.standardOutput.components(separatedBy: "<figure class=\"plot\"").dropFirst()
            // Per workload: three bar charts; per size, a throughput plot per mode, one CDF, one series plot per post-copy mode.
            #expect(figures.count == 2 * (3 + 3 + 1 + 2))
            for figure in figures {
                let body = figure.components(separatedBy: "</figure>")[0]
                let kind = body.split(separator: "\"").dropFirst().first.map(String.init) ?? "?"
                #expect(body.contains("<svg"), "a \(kind) figure without an SVG")
                let bars = body.components(separatedBy: "class=\"bar\"").count - 1
                let pointCounts = body.components(separatedBy: "data-points=\"").dropFirst().compactMap { Int($0.prefix { $0.isNumber }) }
                switch kind {
                case "bars": #expect(bars == 3, "a bar chart with \(bars) bars")
                case "throughput": #expect(pointCounts.count == 1 && pointCounts[0] >= 3, "throughput points \(pointCounts)")
                case "cdf": #expect(!pointCounts.isEmpty && pointCounts.allSatisfy { $0 > 10 }, "CDF points \(pointCounts)")
                case "series": #expect(pointCounts.count == 3 && pointCounts.allSatisfy { $0 >= 3 }, "series points \(pointCounts)")
                default: Issue.record("a figure of unknown kind \(kind)")
                }
                if kind == "throughput" || kind == "series" {
                    #expect(body.contains("class=\"marker\""), "a \(kind) plot without the migration's instants")
                }
            }
            #expect(dump.standardOutput.contains("<table id=\"goals\""))
        }
    }
}
