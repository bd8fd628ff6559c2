// The study's HTML page: self-contained (no script, no fetched asset), every plot an inline SVG inside a
// <figure class="plot">, each data mark tagged (rect.bar, path.series, line.marker) so a test can count
// what rendered. Bar charts of busy, downtime and total per mode and size (the seed's charts);
// application throughput over time with the migration's instants marked; fault-latency CDFs per path;
// pages dumped against faults by path over time; the goals table.
import Engine
import Foundation

struct StudyReport {
    var study: StudyResults
    var goals: [StudyGoal]

    static let palette = ["#1f6fb4", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#e67700", "#0b7285", "#495057"]
    static let markerColours: [(event: MigrationEvent, label: String, colour: String)] = [
        (.frozen, "freeze", "#c92a2a"), (.targetResumed, "resume", "#2f9e44"),
        (.dumpCommitted, "dump complete", "#1971c2"), (.victimReleased, "victim killed", "#000000"),
    ]

    func page() -> String {
        var body = "<h1>fammig study</h1>\n<p>Link: \(escape(study.link)). Baselines: UFFDIO_COPY "
            + String(format: "%.2f us per 4 KiB, TCP round trip %.1f us, %.2f Gb/s.", study.baselines.userfaultfdCopyMicroseconds,
                     study.baselines.tcpRoundTripMicroseconds, study.baselines.tcpGigabitsPerSecond)
            + " Figures are medians over the repetitions; plots over time show the first repetition. Times in ms since the"
            + " migration started. Taken on a shared machine: CPU-sensitive figures move with its load.</p>\n"
        body += goalsTable()
        for workload in study.workloads {
            body += "<h2>\(escape(workload))</h2>\n"
            for (title, figure) in [("busy", { (run: StudyRun) in run.sample.busyMilliseconds }),
                                    ("downtime", { (run: StudyRun) in run.sample.downtimeMilliseconds }),
                                    ("total", { (run: StudyRun) in run.sample.totalMilliseconds })] {
                let groups = study.sizes.map { size in
                    (label: "\(size) MiB", bars: study.configurations.map { (name: $0, value: study.median(workload, size, $0, figure)) })
                }
                body += barChart(title: "\(workload): \(title) time per mode and size (ms)", groups: groups)
            }
            for size in study.sizes {
                body += "<h3>\(escape(workload)), \(size) MiB</h3>\n"
                let firsts = study.configurations.compactMap { study.runs(workload, size, $0).first }
                for run in firsts { body += throughputPlot(run) }
                body += latencyPlot(title: "\(workload) \(size) MiB: fault latency CDF per path", runs: firsts)
                for run in firsts where run.sample.mode != MigrationMode.nonlive.rawValue { body += seriesPlot(run) }
            }
        }
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"/><title>fammig study</title>
            <style>body{font-family:sans-serif;margin:1em 2em;max-width:1100px}figure{margin:1em 0}figcaption{font-size:90%;color:#333}
            table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px;font-size:90%}.met{background:#d3f9d8}
            .missed{background:#ffe3e3}.none{background:#f1f3f5}svg text{font-size:11px}</style></head>
            <body>
            \(body)</body></html>

            """
    }

    private func goalsTable() -> String {
        var rows = "<table id=\"goals\"><tr><th>figure</th><th>workload</th><th>MiB</th><th>value</th><th>goal</th><th>verdict</th><th>what</th></tr>\n"
        for goal in goals {
            let value = goal.value.map { String(format: "%.3g%@", $0, goal.unit as NSString) } ?? "-"
            let limit = String(format: "%@ %.3g%@", (goal.atMost ? "&le;" : "&ge;") as NSString, goal.limit, goal.unit as NSString)
            let style = goal.met.map { $0 ? "met" : "missed" } ?? "none"
            rows += "<tr class=\"\(style)\"><td>\(escape(goal.figure))</td><td>\(escape(goal.workload))</td><td>\(goal.mebibytes)</td>"
                + "<td>\(value)</td><td>\(limit)</td><td>\(goal.verdict)</td><td>\(escape(goal.detail))</td></tr>\n"
        }
        return "<h2>Goals (issue 13)</h2>\n" + rows + "</table>\n"
            + "<p>Not measured here: the comparisons with CRIU (no CRIU on this machine), and 4-thread runs (neither memwalk nor kvstore takes a thread count).</p>\n"
    }

    // MARK: Plots

    private static let width = 960.0, height = 280.0, left = 70.0, right = 250.0, top = 30.0, bottom = 40.0
    private var plotWidth: Double { Self.width - Self.left - Self.right }
    private var plotHeight: Double { Self.height - Self.top - Self.bottom }

    private func figure(_ kind: String, title: String, svg: String, caption: String) -> String {
        "<figure class=\"plot\" data-kind=\"\(kind)\"><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(Self.width))\" height=\"\(Int(Self.height))\" "
            + "viewBox=\"0 0 \(Int(Self.width)) \(Int(Self.height))\"><text x=\"\(Self.left)\" y=\"16\" font-weight=\"bold\">\(escape(title))</text>\n"
            + svg + "</svg><figcaption>\(escape(caption))</figcaption></figure>\n"
    }

    private func barChart(title: String, groups: [(label: String, bars: [(name: String, value: Double?)])]) -> String {
        let maximum = max(groups.flatMap { $0.bars.compactMap(\.value) }.filter { $0.isFinite }.max() ?? 1, 1e-9)
        var svg = axes(yMaximum: maximum, yLabel: "ms")
        let groupWidth = plotWidth / Double(max(groups.count, 1))
        for (groupIndex, group) in groups.enumerated() {
            let barWidth = groupWidth * 0.8 / Double(max(group.bars.count, 1))
            let groupLeft = Self.left + Double(groupIndex) * groupWidth + groupWidth * 0.1
            for (barIndex, bar) in group.bars.enumerated() {
                guard let value = bar.value, value.isFinite else { continue }
                let barHeight = value / maximum * plotHeight
                svg += String(format: "<rect class=\"bar\" data-value=\"%.3f\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%@\"><title>%@ %@: %.1f ms</title></rect>\n",
                              value, groupLeft + Double(barIndex) * barWidth, Self.top + plotHeight - barHeight, barWidth * 0.9, barHeight,
                              Self.palette[barIndex % Self.palette.count] as NSString, escape(bar.name) as NSString, group.label as NSString, value)
            }
            svg += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%@</text>\n", groupLeft + groupWidth * 0.4,
                          Self.height - Self.bottom + 15, escape(group.label) as NSString)
        }
        svg += legend(study.configurations.enumerated().map { ($0.element, Self.palette[$0.offset % Self.palette.count]) })
        return figure("bars", title: title, svg: svg, caption: "Median per mode at each size; a missing bar is a figure that does not exist "
                      + "(busy and total of a post-copy run without push end with the window, not the migration).")
    }

    private func throughputPlot(_ run: StudyRun) -> String {
        // Work per second between consecutive progress lines of the program.
        let points = zip(run.trace.progress, run.trace.progress.dropFirst()).compactMap { before, after -> (Double, Double)? in
            let elapsed = (after.milliseconds - before.milliseconds) / 1000
            return elapsed > 0 ? ((before.milliseconds + after.milliseconds) / 2, (after.done - before.done) / elapsed) : nil
        }
        let markers = Self.markerColours.compactMap { marker in
            run.trace.events[marker.event.rawValue].map { (x: $0, label: marker.label, colour: marker.colour) }
        }
        let unit = run.workload == "memwalk" ? "pages/s" : "ops/s"
        return linePlot(kind: "throughput", title: "\(run.workload) \(run.sample.mebibytes) MiB \(run.configuration): application throughput (\(unit))",
                        series: [(run.configuration, colour(run.configuration), points)], markers: markers, yLabel: unit,
                        caption: "The program's own progress lines (every 10 ms while it runs; a gap is a stall): freeze, resume, "
                            + "dump complete and victim killed marked.")
    }

    private func latencyPlot(title: String, runs: [StudyRun]) -> String {
        var series: [(String, String, [(Double, Double)])] = []
        var index = 0
        for run in runs {
            for (path, points) in run.trace.latency.sorted(by: { $0.key < $1.key }) {
                // Log-scaled x: microseconds from 1 to 10^6.
                series.append(("\(run.configuration) \(path)", Self.palette[index % Self.palette.count],
                               points.map { (log10(max($0.microseconds, 1)), $0.fraction) }))
                index += 1
            }
        }
        return linePlot(kind: "cdf", title: title, series: series, markers: [], yLabel: "fraction", xLabel: "log10 us",
                        caption: "Share of faults served within a latency, per install path (fam-sync: straight from FAM; "
                            + "source-async: asked of the source). Empty when no mode served faults.")
    }

    private func seriesPlot(_ run: StudyRun) -> String {
        let points = run.trace.series
        let series: [(String, String, [(Double, Double)])] = [
            ("pages dumped", "#1f6fb4", points.map { ($0.milliseconds, Double($0.pagesDumped)) }),
            ("fam-sync faults", "#2b8a3e", points.map { ($0.milliseconds, Double($0.famSyncFaults)) }),
            ("source-async faults", "#d9480f", points.map { ($0.milliseconds, Double($0.sourceAsyncFaults)) }),
        ]
        let markers = Self.markerColours.compactMap { marker in
            run.trace.events[marker.event.rawValue].map { (x: $0, label: marker.label, colour: marker.colour) }
        }
        return linePlot(kind: "series", title: "\(run.workload) \(run.sample.mebibytes) MiB \(run.configuration): pages dumped and faults by path",
                        series: series, markers: markers, yLabel: "count",
                        caption: "Cumulative, sampled every 5 ms: pages in FAM (or sent) against faults served on each path.")
    }

    private func colour(_ configuration: String) -> String {
        Self.palette[(study.configurations.firstIndex(of: configuration) ?? 0) % Self.palette.count]
    }

    private func linePlot(kind: String, title: String, series: [(name: String, colour: String, points: [(Double, Double)])],
                          markers: [(x: Double, label: String, colour: String)], yLabel: String, xLabel: String = "ms", caption: String) -> String {
        let xs = series.flatMap { $0.points.map(\.0) }.filter(\.isFinite) + markers.map(\.x).filter(\.isFinite)
        let ys = series.flatMap { $0.points.map(\.1) }.filter(\.isFinite)
        let xMinimum = xs.min() ?? 0, xMaximum = max(xs.max() ?? 1, (xs.min() ?? 0) + 1e-9)
        let yMaximum = max(ys.max() ?? 1, 1e-9)
        func x(_ value: Double) -> Double { Self.left + (value - xMinimum) / (xMaximum - xMinimum) * plotWidth }
        func y(_ value: Double) -> Double { Self.top + plotHeight - value / yMaximum * plotHeight }
        var svg = axes(yMaximum: yMaximum, yLabel: yLabel)
        svg += String(format: "<text x=\"%.1f\" y=\"%.1f\">%.3g</text><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.3g %@</text>\n",
                      Self.left, Self.height - Self.bottom + 15, xMinimum, Self.left + plotWidth, Self.height - Self.bottom + 15, xMaximum,
                      escape(xLabel) as NSString)
        for line in series where !line.points.isEmpty {
            let path = line.points.filter { $0.0.isFinite && $0.1.isFinite }.enumerated()
                .map { String(format: "%@%.1f %.1f", $0.offset == 0 ? "M" : " L", x($0.element.0), y($0.element.1)) }.joined()
            svg += "<path class=\"series\" data-points=\"\(line.points.count)\" d=\"\(path)\" fill=\"none\" stroke=\"\(line.colour)\" stroke-width=\"1.5\"/>\n"
        }
        for (index, marker) in markers.enumerated() where marker.x.isFinite {
            svg += String(format: "<line class=\"marker\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%@\" stroke-dasharray=\"4 3\"/>"
                          + "<text x=\"%.1f\" y=\"%.1f\" fill=\"%@\">%@</text>\n",
                          x(marker.x), Self.top, x(marker.x), Self.top + plotHeight, marker.colour as NSString, x(marker.x) + 2,
                          Self.top + 10 + Double(index) * 11, marker.colour as NSString, escape(marker.label) as NSString)
        }
        svg += legend(series.map { ($0.name, $0.colour) })
        return figure(kind, title: title, svg: svg, caption: caption)
    }

    private func axes(yMaximum: Double, yLabel: String) -> String {
        String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/><line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>"
               + "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.4g</text><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">0</text>"
               + "<text x=\"12\" y=\"%.1f\" transform=\"rotate(-90 12 %.1f)\" text-anchor=\"middle\">%@</text>\n",
               Self.left, Self.top, Self.left, Self.top + plotHeight, Self.left, Self.top + plotHeight, Self.left + plotWidth, Self.top + plotHeight,
               Self.left - 4, Self.top + 4, yMaximum, Self.left - 4, Self.top + plotHeight, Self.top + plotHeight / 2, Self.top + plotHeight / 2,
               escape(yLabel) as NSString)
    }

    private func legend(_ entries: [(String, String)]) -> String {
        entries.enumerated().map { index, entry in
            String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"10\" height=\"10\" fill=\"%@\"/><text x=\"%.1f\" y=\"%.1f\">%@</text>\n",
                   Self.width - Self.right + 10, Self.top + Double(index) * 16, entry.1 as NSString, Self.width - Self.right + 24,
                   Self.top + Double(index) * 16 + 9, escape(entry.0) as NSString)
        }.joined()
    }

    private func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "\"", with: "&quot;")
    }
}
