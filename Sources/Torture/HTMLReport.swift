// Why this file exists: a failing seed is read by a person before it is fixed. Beside the JSON, one
// self-contained page per failing seed (no script, no external asset; well-formed XHTML, so any XML parser
// reads it) shows the scenario, the oracles that fired, the replay command, an SVG timeline with one lane
// per actor and one mark per step, the step where the first oracle fired, and the shrunk schedule when
// there is one.

public enum HTMLReport {
    /// A schedule to draw: its trace lines ("STEP actor: label → outcome") and where the oracle fired.
    public struct Schedule: Sendable {
        public var title: String
        public var replay: String
        public var result: IterationResult
        public var trace: [String]

        public init(title: String, replay: String, result: IterationResult, trace: [String]) {
            self.title = title
            self.replay = replay
            self.result = result
            self.trace = trace
        }
    }

    /// The page for one failing seed: its schedule, and the shrunk one if shrinking found one.
    public static func page(failing: Schedule, shrunk: Schedule?) -> String {
        let result = failing.result
        var html = """
            <?xml version="1.0" encoding="UTF-8"?>
            <!DOCTYPE html>
            <html xmlns="http://www.w3.org/1999/xhtml" lang="en">
            <head>
            <meta charset="utf-8"/>
            <title>torture: seed \(escape(Report.hexSeed(result.scenario.seed))) failed</title>
            <style>
            body { font-family: sans-serif; margin: 1.5em; color: #222; }
            pre, code { font-family: monospace; background: #f4f4f4; padding: 0.3em 0.5em; }
            pre { white-space: pre-wrap; }
            dt { font-weight: bold; float: left; width: 9em; }
            dd { margin-left: 10em; }
            .failure { color: #a00; }
            svg text { font-family: monospace; font-size: 11px; }
            table.steps td { font-family: monospace; font-size: 12px; padding: 0 0.6em; }
            tr.fired { background: #fdd; }
            </style>
            </head>
            <body>
            <h1>Seed \(escape(Report.hexSeed(result.scenario.seed))) failed</h1>

            """
        html += "<dl id=\"scenario\">\n"
        html += "<dt>scenario</dt><dd>\(escape(result.scenario.summary))</dd>\n"
        html += "<dt>outcome</dt><dd>\(escape(result.outcome))</dd>\n"
        html += "<dt>steps</dt><dd>\(result.stepCount)</dd>\n"
        html += "<dt>trace hash</dt><dd><code>\(escape(result.traceHash))</code></dd>\n"
        if let step = result.oracleStep {
            html += "<dt>oracle fired</dt><dd id=\"oracle-fired\">\(escape(result.oracleName ?? "oracle")) at step \(step)</dd>\n"
        }
        html += "</dl>\n<h2>Oracles that fired</h2>\n<ul id=\"failures\">\n"
        if let error = result.environmentError { html += "<li class=\"failure\">environment: \(escape(error))</li>\n" }
        for failure in result.failures { html += "<li class=\"failure\">\(escape(failure))</li>\n" }
        html += "</ul>\n<h2>Replay</h2>\n<pre id=\"replay\">\(escape(failing.replay))</pre>\n"
        if let shrunk {
            html += "<h2>Shrunk</h2>\n<p>The smallest failing variant found: \(escape(shrunk.result.scenario.summary)), "
                + "\(shrunk.result.stepCount) steps, trace \(escape(shrunk.result.traceHash)).</p>\n"
            html += "<pre id=\"shrunk-replay\">\(escape(shrunk.replay))</pre>\n"
        }
        html += "<h2>\(escape(failing.title))</h2>\n" + timeline(failing, id: "timeline") + "\n"
        if let shrunk { html += "<h2>\(escape(shrunk.title))</h2>\n" + timeline(shrunk, id: "shrunk-timeline") + "\n" }
        html += steps(failing)
        html += "</body>\n</html>\n"
        return html
    }

    /// One parsed trace line.
    struct Step {
        var number: Int
        var actor: String
        var text: String
    }

    static func parse(_ line: String) -> Step? {
        let parts = line.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, let number = Int(parts[0]) else { return nil }
        let rest = String(parts[1])
        let actor = rest.prefix { $0 != ":" }
        return Step(number: number, actor: String(actor), text: rest)
    }

    static let colours: [String: String] = [
        "dumper": "#1f77b4", "restorer": "#ff7f0e", "fault-handler": "#2ca02c", "pusher": "#9467bd", "target": "#d62728",
        "link": "#8c564b", "fabric": "#7f7f7f", "nemesis": "#000000", "tamperer": "#e377c2", "racer": "#bcbd22",
        "attacker": "#ff1493", "bystander": "#17becf",
    ]

    /// Lanes in ActorName order (then any actor the trace names that this version does not know).
    static func lanes(_ steps: [Step]) -> [String] {
        let present = Set(steps.map(\.actor))
        let known = ActorName.allCases.map(\.rawValue).filter(present.contains)
        return known + present.subtracting(known).sorted()
    }

    static func timeline(_ schedule: Schedule, id: String) -> String {
        let steps = schedule.trace.compactMap(parse)
        let lanes = lanes(steps)
        let laneHeight = 22
        let left = 110
        let plotWidth = 1100
        let stepCount = max(steps.count, schedule.result.stepCount, 1)
        // One column per step, or per bucket of steps when there are more steps than pixels.
        let columns = min(stepCount, plotWidth)
        let stepsPerColumn = (stepCount + columns - 1) / columns
        let columnWidth = Double(plotWidth) / Double((stepCount + stepsPerColumn - 1) / stepsPerColumn)
        let height = laneHeight * lanes.count + 40
        var svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"\(id)\" width=\"\(left + plotWidth + 20)\" height=\"\(height)\" "
            + "viewBox=\"0 0 \(left + plotWidth + 20) \(height)\">\n"
        for (index, lane) in lanes.enumerated() {
            let y = index * laneHeight + 4
            svg += "<text x=\"4\" y=\"\(y + 15)\">\(escape(lane))</text>\n"
            svg += "<line x1=\"\(left)\" y1=\"\(y + laneHeight - 2)\" x2=\"\(left + plotWidth)\" y2=\"\(y + laneHeight - 2)\" stroke=\"#eee\"/>\n"
        }
        var buckets: [String: (first: Step, count: Int)] = [:]
        var order: [String] = []
        for step in steps {
            let key = "\((step.number - 1) / stepsPerColumn) \(step.actor)"
            if let existing = buckets[key] { buckets[key] = (existing.first, existing.count + 1) } else {
                buckets[key] = (step, 1)
                order.append(key)
            }
        }
        for key in order {
            guard let (first, count) = buckets[key], let lane = lanes.firstIndex(of: first.actor) else { continue }
            let x = Double(left) + Double((first.number - 1) / stepsPerColumn) * columnWidth
            let y = lane * laneHeight + 4
            let title = count == 1 ? "\(first.number) \(first.text)" : "\(first.number)… \(first.text) (and \(count - 1) more steps of \(first.actor))"
            svg += "<rect class=\"step\" x=\"\(format(x))\" y=\"\(y + 2)\" width=\"\(format(max(columnWidth - (columnWidth > 3 ? 1 : 0), 0.5)))\" "
                + "height=\"\(laneHeight - 6)\" fill=\"\(colours[first.actor] ?? "#17becf")\"><title>\(escape(title))</title></rect>\n"
        }
        if let fired = schedule.result.oracleStep {
            let x = Double(left) + (Double(max(fired, 1) - 1) / Double(stepsPerColumn)) * columnWidth + columnWidth / 2
            let bottom = laneHeight * lanes.count + 6
            svg += "<line class=\"oracle-step\" x1=\"\(format(x))\" y1=\"0\" x2=\"\(format(x))\" y2=\"\(bottom)\" stroke=\"#d00\" stroke-width=\"2\"/>\n"
            svg += "<text class=\"oracle-step\" x=\"\(format(min(x + 4, Double(left + plotWidth - 200))))\" y=\"\(bottom + 14)\" fill=\"#d00\">"
                + "\(escape(schedule.result.oracleName ?? "oracle")) fired at step \(fired)</text>\n"
        }
        svg += "</svg>"
        return svg
    }

    /// The schedule as a table, around the step where the oracle fired (the first 400 and the 200 before it).
    static func steps(_ schedule: Schedule) -> String {
        let steps = schedule.trace.compactMap(parse)
        let fired = schedule.result.oracleStep ?? 0
        var html = "<h2>Steps</h2>\n<details open=\"open\"><summary>\(steps.count) steps</summary>\n<table class=\"steps\">\n"
        var skipped = false
        for step in steps {
            guard step.number <= 400 || abs(step.number - fired) <= 200 else {
                if !skipped { html += "<tr><td>…</td><td></td></tr>\n" }
                skipped = true
                continue
            }
            skipped = false
            html += "<tr\(step.number == fired ? " class=\"fired\"" : "")><td>\(step.number)</td><td>\(escape(step.text))</td></tr>\n"
        }
        return html + "</table>\n</details>\n"
    }

    static func format(_ value: Double) -> String {
        String(Double(Int(value * 100)) / 100)
    }

    static func escape(_ text: String) -> String {
        var escaped = ""
        for character in text {
            switch character {
            case "&": escaped += "&amp;"
            case "<": escaped += "&lt;"
            case ">": escaped += "&gt;"
            case "\"": escaped += "&quot;"
            case "'": escaped += "&#39;"
            default:
                // XML 1.0 forbids most control characters, even escaped.
                if let scalar = character.unicodeScalars.first, scalar.value < 0x20, scalar != "\n", scalar != "\t" { escaped += "?" } else {
                    escaped.append(character)
                }
            }
        }
        return escaped
    }
}
