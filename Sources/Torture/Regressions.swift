// Why this file exists: every failing seed ever found stays found. A committed file lists them (seed,
// filters, what is expected of it, why it is there); a campaign replays them first, so a bug that comes
// back fails the gate on its own seed before any new schedule is tried (Hypothesis' example database).
import Engine

/// What a regression seed must do.
public enum RegressionExpectation: String, Sendable, Codable {
    /// Every oracle passes.
    case pass
    /// Every oracle passes, and a second run gives the same schedule step for step.
    case replays
}

/// One line of the regression file: `SEED EXPECTATION [FILTER OPTIONS] # why`.
public struct RegressionSeed: Sendable, Equatable {
    public var seed: UInt64
    public var expectation: RegressionExpectation
    public var filter: ScenarioFilter
    public var note: String
    /// 1-based line in the file, for messages.
    public var line: Int
}

public enum RegressionFileError: Error, CustomStringConvertible, Equatable {
    case malformed(path: String, line: Int, reason: String)

    public var description: String {
        switch self {
        case .malformed(let path, let line, let reason): "\(path):\(line): \(reason)"
        }
    }
}

public enum Regressions {
    /// Parses the file's text; blank lines and lines starting with `#` are ignored.
    public static func parse(_ text: String, path: String) throws(RegressionFileError) -> [RegressionSeed] {
        var seeds: [RegressionSeed] = []
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let lineNumber = index + 1
            let parts = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)
            let note = parts.count > 1 ? String(parts[1].drop { $0 == " " }) : ""
            // Split like a shell's words, so that a quoted --workload 'CMD ARGS' stays one.
            let words = Workload.words(String(parts[0]))
            guard !words.isEmpty else { continue }
            func fail(_ reason: String) -> RegressionFileError { .malformed(path: path, line: lineNumber, reason: reason) }
            guard let seed = parseSeed(words[0]) else { throw fail("\(words[0]) is not a seed (decimal or 0x hex)") }
            guard words.count >= 2, let expectation = RegressionExpectation(rawValue: words[1]) else {
                throw fail("after the seed comes what is expected: pass or replays")
            }
            let filter: ScenarioFilter
            do { filter = try parseFilter(Array(words.dropFirst(2))) } catch { throw fail(error.reason) }
            seeds.append(RegressionSeed(seed: seed, expectation: expectation, filter: filter, note: note, line: lineNumber))
        }
        return seeds
    }

    static func parseSeed(_ text: String) -> UInt64? {
        text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }

    struct FilterError: Error { var reason: String }

    /// The inverse of `ScenarioFilter.commandLineOptions`.
    static func parseFilter(_ words: [String]) throws(FilterError) -> ScenarioFilter {
        var filter = ScenarioFilter()
        var index = 0
        func value(_ option: String) throws(FilterError) -> String {
            index += 1
            guard index < words.count else { throw FilterError(reason: "\(option) needs a value") }
            return words[index]
        }
        func list<Value>(_ option: String, _ make: (String) -> Value?) throws(FilterError) -> [Value] {
            let text = try value(option)
            var values: [Value] = []
            for item in text.split(separator: ",").map(String.init) {
                guard let parsed = make(item) else { throw FilterError(reason: "\(option): unknown value \(item)") }
                values.append(parsed)
            }
            return values
        }
        func onOrOff(_ option: String) throws(FilterError) -> Bool {
            switch try value(option) {
            case "on": return true
            case "off": return false
            case let other: throw FilterError(reason: "\(option) takes on or off, not \(other)")
            }
        }
        while index < words.count {
            let option = words[index]
            switch option {
            case "--mode": filter.modes = try list(option, MigrationMode.init)
            case "--program": filter.programs = try list(option) { ProgramSpec.named($0)?.name }
            case "--strategy": filter.strategies = try list(option, StrategyName.init)
            case "--push": filter.push = try onOrOff(option)
            case "--size":
                guard let size = Int(try value(option)), (0...2).contains(size) else { throw FilterError(reason: "--size takes 0, 1 or 2") }
                filter.size = size
            case "--no-kill": filter.noKill = true
            case "--chaos": filter.chaos = true
            case "--workload": filter.workload = try value(option)
            case "--check": filter.check = try value(option)
            case "--freeze-at-syscall":
                guard let syscall = Int(try value(option)), syscall >= 1 else { throw FilterError(reason: "--freeze-at-syscall takes a count from 1") }
                filter.freezeAtSyscall = syscall
            case "--tamper": filter.tamper = try onOrOff(option)
            case "--attacker": filter.attacker = try onOrOff(option)
            case "--racer": filter.racer = try onOrOff(option)
            case "--bystander": filter.bystander = try onOrOff(option)
            case "--instant-link": filter.instantLink = try onOrOff(option)
            case "--batch":
                guard let batch = Int(try value(option)), (1...65536).contains(batch) else { throw FilterError(reason: "--batch takes 1 to 65536 pages") }
                filter.batchPageCount = batch
            case "--schedule":
                switch ScheduleScript.decode(try value(option)) {
                case .success(let picks): filter.schedule = picks
                case .failure(let error): throw FilterError(reason: "--schedule: \(error)")
                }
            case "--kill-target": filter.killTarget = try onOrOff(option)
            case "--rendezvous-wait": filter.rendezvousWaits = try RendezvousWait.list(try value(option))
            case "--repeat-limit":
                guard let limit = Int(try value(option)), limit >= 2 else { throw FilterError(reason: "--repeat-limit takes a count from 2") }
                filter.repeatLimit = limit
            case "--adversarial-steps":
                guard let steps = Int(try value(option)), steps >= 0 else { throw FilterError(reason: "--adversarial-steps takes a count") }
                filter.adversarialSteps = steps
            default: throw FilterError(reason: "unknown option \(option)")
            }
            index += 1
        }
        return filter
    }
}

extension Campaign {
    /// Replays each regression seed on the calling thread; a result fails when the seed does not do what
    /// its line expects (the failure names the line).
    public func runRegressions(_ seeds: [RegressionSeed], path: String,
                               report: (IterationResult, RegressionSeed) -> Void) -> [IterationResult] {
        defer { removeWorkDirectory(worker: 0) }
        return seeds.map { entry in
            var result = runOne(seed: entry.seed, filter: entry.filter, keepTrace: false,
                                checkDeterminism: entry.expectation == .replays)
            if !result.passed {
                result.failures.append("regression: \(path):\(entry.line) expects \(entry.expectation.rawValue)"
                                       + (entry.note.isEmpty ? "" : " (\(entry.note))")
                                       + "; replay: \(Report.replayCommand(seed: entry.seed, filter: entry.filter))")
            }
            report(result, entry)
            return result
        }
    }
}
