// `torture`: the whole engine under seeded adversarial schedules (DESIGN.md §4), the CI correctness gate.
// Exit 0: every iteration passed; 1: an oracle failed; 2: usage or environment error.
import ArgumentParser
import Engine
import Foundation
import Sys
import Torture

@main
struct TortureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "torture",
        abstract: "Migrate the test programs with the real engine under seeded adversarial schedules, and judge every run with every oracle.",
        discussion: """
            Each iteration's seed is derived from --seed and its index; a failure prints one command that replays it exactly, \
            with the same trace hash. Exit status: 0 all passed, 1 an oracle failed, 2 usage or environment error. \
            `torture merge REPORT...` combines the JSON reports of a campaign's shards into one.
            """)

    /// Usage errors exit 2, like every other bad input (argument-parser's own code is 64).
    static func main() {
        // `merge` is dispatched by hand, not as a subcommand: argument-parser gives the root's own --json and
        // --junit precedence over a subcommand's options of the same name.
        if CommandLine.arguments.dropFirst().first == "merge" {
            MergeCommand.runExitingTwoOnUsageErrors(Array(CommandLine.arguments.dropFirst(2)))
        }
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }

    @Option(help: "Iterations to run (all shards together).")
    var iterations = 100

    @Option(help: "The campaign seed (decimal or 0x hex).", transform: parseSeed)
    var seed: UInt64 = 1

    @Option(help: "Replay one iteration by its seed (printed by a failure), instead of a campaign.", transform: parseSeed)
    var replay: UInt64?

    @Flag(help: "Print the schedule step by step (with --replay).")
    var trace = false

    @Option(help: "Only these modes (comma-separated: nonlive, postcopy-socket, postcopy-fam).", transform: { try parseList($0, MigrationMode.init) })
    var mode: [MigrationMode]?

    @Option(help: "Only these programs (comma-separated: \(ProgramSpec.catalog.map(\.name).joined(separator: ", ")); never drawn unless named: \(ProgramSpec.optIn.map(\.name).joined(separator: ", "))).", transform: { try parseList($0) { ProgramSpec.named($0)?.name } })
    var program: [String]?

    @Option(help: "Only these strategies (comma-separated: \(StrategyName.allCases.map(\.rawValue).joined(separator: ", "))).", transform: { try parseList($0, StrategyName.init) })
    var strategy: [StrategyName]?

    @Option(help: "Post-copy pushing: on or off (default: drawn per seed).", transform: parseSwitch)
    var push: Bool?

    @Option(help: "Override the program size level (0 smallest, 1, 2).")
    var size: Int?

    @Option(help: "The tamperer, which changes a sealed page or mark in FAM: on or off (default: drawn per seed).", transform: parseSwitch)
    var tamper: Bool?

    @Option(help: "The racing installer, which installs sealed pages behind the engine's back (postcopy-fam): on or off (default: drawn per seed).", transform: parseSwitch)
    var racer: Bool?

    @Option(help: "The bystander, which reads the target's command line while the restorer builds it, as ps does (post-copy): on or off (default: drawn per seed).", transform: parseSwitch)
    var bystander: Bool?

    @Option(help: "A link that delivers every frame as it is sent, before the receiving node looks again, as a fast network does (post-copy): on or off (default: drawn per seed).", transform: parseSwitch)
    var instantLink: Bool?

    @Option(help: "The target-node nemesis, which kills the target node after the restored process ran (post-copy): on or off (default: drawn per seed).", transform: parseSwitch)
    var killTarget: Bool?

    @Option(help: "The attacker, a rogue peer on the link (forged, replayed or unsealed frames) or a FAM writer without the key (header code, metadata, page table, commit record), in iterations without another nemesis: on or off (default: drawn per seed).", transform: parseSwitch)
    var attacker: Bool?

    @Option(help: "The calls a test program waits in at its rendezvous, where it is frozen (comma-separated: \(RendezvousWait.allCases.map(\.rawValue).joined(separator: ", ")); default: sigwait in two seeds of three, else one of the others).", transform: { try parseList($0) { RendezvousWait(rawValue: $0) } })
    var rendezvousWait: [RendezvousWait]?

    @Flag(help: "Chaos: run under the threaded driver (real threads, FAM file, TCP) with seeded delays, yields and CPU placement at the ports; a seed names the perturbations, not the interleaving.")
    var chaos = false

    @Option(help: "Torture a program of your own instead of the test programs: 'CMD ARGS' (deterministic, single-threaded, ending by itself; stdout goes to a file). It is frozen at the exit of a system call drawn from the seed.")
    var workload: String?

    @Option(help: "With --workload: judge each migrated run with this shell command instead of comparing stdout and exit status with a reference run (it gets FAMMIG_OUTPUT, FAMMIG_REFERENCE_OUTPUT and FAMMIG_STATUS; exit 0 accepts).")
    var check: String?

    @Option(help: "With --workload: freeze at the exit of this system call (1-based, counted under ptrace) instead of one drawn from the seed.")
    var freezeAtSyscall: Int?

    @Flag(help: "Never kill the source (shrinking uses it).")
    var noKill = false

    @Option(help: "Adversarial scheduling for this many steps only, then a fixed fair order (shrinking uses it).")
    var adversarialSteps: Int?

    @Option(help: "Identical steps in a row that end a run as a liveness failure (no progress; default 10000, shrinking tries fewer).")
    var repeatLimit: Int?

    @Option(help: "Pages per dump batch instead of the drawn 16, 64 or 512 (shrinking uses it).")
    var batch: Int?

    @Option(help: "Follow this written schedule instead of the strategy, then a fixed fair order (a shrunk replay prints it): comma-separated ACTOR, ACTOR.CHOICE or ACTOR*COUNT, or none.",
            transform: parseSchedule)
    var schedule: [SchedulePick]?

    @Option(help: "Run only part K of N of the campaign's iterations (K/N, e.g. 2/4).", transform: parseShard)
    var shard: Shard = Shard(part: 1, count: 1)

    @Option(help: "Worker threads (each runs whole iterations).")
    var jobs = 2

    @Option(help: "Write a JSON report to this file.")
    var json: String?

    @Option(help: "Write a JUnit XML report to this file.")
    var junit: String?

    @Option(help: "Write an HTML page for each failing seed (timeline of every actor's steps, the step where the oracle fired, the replay and shrunk commands) into this directory (default: beside the --json report).")
    var htmlReport: String?

    @Flag(help: "Stop at the first failure and print how many iterations it took (a failing regression seed stops before the campaign).")
    var failFast = false

    @Flag(help: "Run each iteration twice and fail it when the two schedules differ, naming the first differing step.")
    var checkDeterminism = false

    @Flag(help: "On failure, minimise the failing schedule and print the shrunk replay command.")
    var shrink = false

    @Option(help: "The regression seeds a campaign replays first (default: Tests/torture/regressions.txt of the package).")
    var regressions: String?

    @Flag(help: "Do not replay the regression seeds before the campaign.")
    var noRegressions = false

    @Option(help: "Directory of the built test programs (default: TestPrograms/build here or beside the package).")
    var programs: String?

    mutating func validate() throws {
        guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1.") }
        guard jobs >= 1 && jobs <= 64 else { throw ValidationError("--jobs must be between 1 and 64.") }
        if let size, !(0...2).contains(size) { throw ValidationError("--size must be 0, 1 or 2.") }
        if let adversarialSteps, adversarialSteps < 0 { throw ValidationError("--adversarial-steps must be 0 or more.") }
        if let repeatLimit, repeatLimit < 2 { throw ValidationError("--repeat-limit must be 2 or more.") }
        if let batch, !(1...65536).contains(batch) { throw ValidationError("--batch must be between 1 and 65536 pages.") }
        if chaos && (checkDeterminism || trace || shrink) {
            throw ValidationError("--chaos runs real threads: a seed does not fix its interleaving, so --check-determinism, --trace and --shrink do not apply.")
        }
        if workload == nil && (check != nil || freezeAtSyscall != nil) {
            throw ValidationError("--check and --freeze-at-syscall go with --workload 'CMD ARGS'.")
        }
        if let freezeAtSyscall, freezeAtSyscall < 1 { throw ValidationError("--freeze-at-syscall counts from 1.") }
        if let workload {
            if program != nil || size != nil || chaos {
                throw ValidationError("--workload replaces the test programs: leave out --program, --size and --chaos.")
            }
            do { self.workload = try Workload.resolve(workload) } catch { throw ValidationError("\(error)") }
        }
        if trace && replay == nil { throw ValidationError("--trace needs --replay SEED (a campaign's schedules are not printed).") }
    }

    var filter: ScenarioFilter {
        var filter = ScenarioFilter(modes: mode, programs: program, strategies: strategy, push: push)
        filter.size = size
        filter.noKill = noKill
        filter.adversarialSteps = adversarialSteps
        filter.repeatLimit = repeatLimit
        filter.schedule = schedule
        filter.batchPageCount = batch
        filter.tamper = tamper
        filter.chaos = chaos
        filter.racer = racer
        filter.bystander = bystander
        filter.instantLink = instantLink
        filter.killTarget = killTarget
        filter.attacker = attacker
        filter.rendezvousWaits = rendezvousWait
        filter.workload = workload
        filter.check = check
        filter.freezeAtSyscall = freezeAtSyscall
        return filter
    }

    func run() throws {
        let environment = try locateEnvironment()
        var options = CampaignOptions(seed: seed, iterations: iterations, filter: filter, programDirectory: environment.programs,
                                      stubPath: environment.stub, workDirectory: environment.work)
        options.shard = (shard.part, shard.count)
        options.jobs = jobs
        options.failFast = failFast
        options.checkDeterminism = checkDeterminism
        Spawn.cleanUpOnTermination(paths: [environment.work], processes: [])
        defer { try? FileManager.default.removeItem(atPath: environment.work) }
        let campaign = Campaign(options: options)
        if let replay {
            let result = campaign.runOne(seed: replay, filter: filter, keepTrace: htmlDirectory != nil, traceSink: trace ? { print($0) } : nil)
            print(Report.line(result))
            var shrunk: Shrunk?
            if !result.passed {
                print(Report.failureText(result, filter: filter))
                if shrink && result.environmentError == nil {
                    shrunk = Shrinker(campaign: campaign, filter: filter).shrink(result)
                    print("shrunk: \(Report.replayCommand(seed: shrunk!.scenario.seed, filter: shrunk!.filter))")
                    print("        \(shrunk!.result.scenario.summary), \(Report.shrunkLength(shrunk!.result)), trace \(shrunk!.result.traceHash)")
                }
                try writeHTMLReports(campaign, failing: [result], shrunk: shrunk)
            }
            try Report.write(results: [result], json: json, junit: junit, run: nil, filter: filter)
            if result.environmentError != nil { throw ExitCode(2) }
            if !result.passed { throw ExitCode(1) }
            return
        }
        let regressionResults = try runRegressions(campaign, environment: environment)
        if failFast, regressionResults.contains(where: { !$0.passed }) {
            // The first failure is a regression seed's: the campaign would only add time to the answer.
            for result in regressionResults where !result.passed { print(Report.failureText(result, filter: filter)) }
            print("first failure at a regression seed; the campaign was not run (--fail-fast)")
            throw ExitCode(1)
        }
        let total = options.indices.count
        let progress = ProgressPrinter(total: total)
        let start = ContinuousClock.now
        let results = campaign.run { result, done in progress.show(result, done: done) }
        progress.finish()
        let elapsed = ContinuousClock.now - start
        print(Report.summary(results, elapsed: elapsed))
        for leak in campaign.leaks { print("no harm: \(leak)") }
        var failed = results.filter { !$0.passed && $0.environmentError == nil }
        if failFast, let position = Campaign.firstFailurePosition(results, options: options) {
            print("first failure at iteration \(position)")
        }
        for result in failed.prefix(10) { print(Report.failureText(result, filter: filter)) }
        // Regression seeds count for the verdict, not in the campaign's figures and reports (shards of one
        // campaign each replay them).
        let regressionFailures = regressionResults.filter { !$0.passed }
        for result in regressionFailures { print(Report.failureText(result, filter: filter)) }
        var shrunkFirst: Shrunk?
        let failing = failed
        if shrink, let first = failed.first {
            let shrunk = Shrinker(campaign: campaign, filter: filter).shrink(first)
            shrunkFirst = shrunk
            print("shrunk: \(Report.replayCommand(seed: shrunk.scenario.seed, filter: shrunk.filter))")
            print("        \(shrunk.result.scenario.summary), \(Report.shrunkLength(shrunk.result)), trace \(shrunk.result.traceHash)")
            failed[0] = shrunk.result
        }
        try writeHTMLReports(campaign, failing: Array(failing.prefix(5)), shrunk: shrunkFirst)
        let indexOfSeed = Dictionary(options.indices.map { (Scenario.iterationSeed(campaignSeed: seed, index: $0), $0) },
                                     uniquingKeysWith: { first, _ in first })
        let run = Report.RunInfo(campaignSeed: seed, campaignIterations: iterations, shard: options.shard,
                                 indices: results.map { indexOfSeed[$0.scenario.seed]! }, elapsedSeconds: Report.seconds(elapsed))
        try Report.write(results: results, json: json, junit: junit, run: run, filter: filter)
        if results.contains(where: { $0.environmentError != nil }) && failed.isEmpty { throw ExitCode(2) }
        if !failed.isEmpty || !regressionFailures.isEmpty || !campaign.leaks.isEmpty { throw ExitCode(1) }
    }
}

struct Shard: Sendable {
    var part: Int
    var count: Int
}

func parseShard(_ text: String) throws -> Shard {
    let parts = text.split(separator: "/")
    guard parts.count == 2, let part = Int(parts[0]), let count = Int(parts[1]), count >= 1, (1...count).contains(part) else {
        throw ValidationError("--shard takes K/N with 1 <= K <= N, e.g. 1/4; got \(text).")
    }
    return Shard(part: part, count: count)
}

func parseSeed(_ text: String) throws -> UInt64 {
    let value = text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    guard let value else { throw ValidationError("\(text) is not a seed; give a decimal or 0x-hex 64-bit number.") }
    return value
}

func parseSwitch(_ text: String) throws -> Bool {
    switch text {
    case "on": return true
    case "off": return false
    default: throw ValidationError("give on or off, not \(text).")
    }
}

func parseList<Value>(_ text: String, _ make: (String) -> Value?) throws -> [Value] {
    let values = text.split(separator: ",").map(String.init)
    return try values.map { value in
        guard let parsed = make(value) else { throw ValidationError("unknown value \(value).") }
        return parsed
    }
}

/// A progress bar on a terminal, plain lines otherwise (one per failure, and every 50 iterations).
final class ProgressPrinter: @unchecked Sendable {
    private let total: Int
    private let isTerminal = isatty(STDOUT_FILENO) != 0
    private var failed = 0

    init(total: Int) { self.total = total }

    func show(_ result: IterationResult, done: Int) {
        if !result.passed { failed += 1 }
        if isTerminal {
            let width = 40
            let filled = total == 0 ? width : done * width / total
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            print("\r[\(bar)] \(done)/\(total) failed \(failed)", terminator: "")
            if !result.passed { print("\n" + Report.line(result)) }
            fflush(nil)
        } else {
            if !result.passed || done % 50 == 0 || done == total { print("\(done)/\(total) " + Report.line(result)) }
        }
    }

    func finish() {
        if isTerminal { print("") }
    }
}
