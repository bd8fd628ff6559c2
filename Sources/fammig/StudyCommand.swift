// `fammig study`: the matrix behind issue 13's claims. Migrates each workload at each size in each mode
// (the same measured migration as `bench`), keeps what happened over time, and writes one
// self-contained HTML page of SVG plots, every figure beside its goal, plus the JSON of everything.
import ArgumentParser
import Engine
import Foundation
import Sys

struct Study: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the migration matrix (workloads x sizes x modes) and write an HTML report of plots and goals, plus JSON.")

    @Option(help: "Comma-separated sizes in MiB.")
    var sizes: String = "64,256,512"

    @Option(help: "Comma-separated workloads: memwalk, kvstore (YCSB A, one thread; neither program takes a thread count).")
    var workloads: String = "memwalk,kvstore"

    @Option(help: "Comma-separated modes (nonlive, postcopy-socket, postcopy-fam).")
    var modes: String = "nonlive,postcopy-socket,postcopy-fam"

    @Option(help: "Comma-separated push settings for the post-copy modes (on, off); the claims compare push on.")
    var push: String = "on"

    @Option(help: "Repetitions per configuration (figures are medians; plots over time show the first).")
    var repetitions: Int = 3

    @Flag(help: "A small matrix: 16 MiB, one repetition (unless --sizes or --repetitions say otherwise).")
    var quick = false

    @Option(help: "The HTML report to write.")
    var html: String = "study.html"

    @Option(help: "Also write every measurement, trace and goal as JSON to this file.")
    var json: String?

    @Option(help: "The memwalk executable.")
    var memwalk: String = "TestPrograms/build/memwalk-static"

    @Option(help: "The kvstore executable.")
    var kvstore: String = "TestPrograms/build/kvstore-static"

    @Option(help: "The FAM pool images go to (default: a pool made under /dev/shm for this run, before any measurement, and removed after).")
    var pool: String?

    @Flag(help: "Post-copy: put each node's socket in its own network namespace, joined by a veth pair (made once for the run).")
    var netns = false

    @Option(help: "With --netns: shape the veth pair to this rate with tc tbf, e.g. 10gbit (netem is not in this kernel).", transform: parseLinkRate)
    var link: LinkRate?

    @Option(help: "Milliseconds the workload runs before each migration and after its end (its throughput before and after).")
    var windowMs: Int?

    @Option(help: "Redraw the HTML report (and its goals) from the JSON of an earlier study instead of running the matrix.")
    var replot: String?

    @OptionGroup var common: CommonOptions

    static let workloadNames = ["memwalk", "kvstore"]

    var parsedSizes: [Int] { quick && !sizesGiven ? [16] : sizes.split(separator: ",").compactMap { Int($0) } }
    var parsedRepetitions: Int { quick && repetitions == 3 ? 1 : repetitions }
    var parsedWorkloads: [String] { workloads.split(separator: ",").map(String.init) }
    var parsedModes: [MigrationMode] { modes.split(separator: ",").compactMap { MigrationMode(rawValue: String($0)) } }
    var parsedPush: [Bool] { push.split(separator: ",").compactMap { $0 == "on" ? true : $0 == "off" ? false : nil } }
    private var sizesGiven: Bool { sizes != "64,256,512" }
    var window: Duration { .milliseconds(windowMs ?? (quick ? 150 : 300)) }

    func validate() throws {
        guard repetitions >= 1 && repetitions <= 50 else { throw ValidationError("--repetitions must be 1...50.") }
        guard !parsedSizes.isEmpty, parsedSizes.allSatisfy({ $0 >= 1 && $0 <= 8192 }) else {
            throw ValidationError("--sizes takes MiB counts from 1 to 8192, e.g. 64,256,512.")
        }
        guard !parsedWorkloads.isEmpty, parsedWorkloads.allSatisfy(Self.workloadNames.contains) else {
            throw ValidationError("--workloads takes memwalk and kvstore, comma-separated.")
        }
        guard parsedModes.count == modes.split(separator: ",").count, !parsedModes.isEmpty else {
            throw ValidationError("--modes takes nonlive, postcopy-socket and postcopy-fam, comma-separated.")
        }
        guard parsedPush.count == push.split(separator: ",").count, !parsedPush.isEmpty else { throw ValidationError("--push takes on, off or on,off.") }
        for (name, program) in [("memwalk", memwalk), ("kvstore", kvstore)] where parsedWorkloads.contains(name) && replot == nil {
            guard access(program, X_OK) == 0 else { throw ValidationError("\(program) is not executable; run ./scripts/setup first.") }
        }
        if let windowMs, windowMs < 0 || windowMs > 10_000 { throw ValidationError("--window-ms must be 0...10000.") }
        if link != nil && !netns { throw ValidationError("--link shapes the veth pair between the nodes: add --netns.") }
        if let replot, !ProcFS.exists(replot) { throw ValidationError("\(replot): no such file; pass the JSON `fammig study --json` wrote.") }
        if let pool, !ProcFS.exists(pool) { throw ValidationError("\(pool): no such pool; make it with `fammig pool create --pool \(pool) --mib N`.") }
        let directory = URL(fileURLWithPath: absolutePath(html)).deletingLastPathComponent().path
        guard access(directory, W_OK) == 0 else { throw ValidationError("cannot write \(html): \(directory) is not a writable directory.") }
    }

    /// What `--json` writes and `--replot` reads.
    struct Output: Codable {
        var link: String
        var baselines: Bench.BaselineFigures
        var goals: [StudyGoal]
        var runs: [StudyRun]
    }

    func run() throws {
        if let replot {
            let output: Output
            do {
                let decoder = JSONDecoder()
                decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
                output = try decoder.decode(Output.self, from: Data(contentsOf: URL(fileURLWithPath: replot)))
            } catch { throw fail("\(replot) is not the JSON of a study (\(error)); pass the file `fammig study --json` wrote.", code: 2) }
            let sizes = output.runs.map(\.sample.mebibytes).reduce(into: [Int]()) { if !$0.contains($1) { $0.append($1) } }.sorted()
            try write(StudyResults(link: output.link, baselines: output.baselines, runs: output.runs, sizes: sizes))
            return
        }
        let logger = common.bootstrapLogging()
        let setup = try BenchSetup(largestMebibytes: parsedSizes.max() ?? 64, pool: pool, famFiles: false, netns: netns, link: link)
        defer { setup.close() }
        print("oracles: \(common.oracles ?? .off); images: \(setup.poolDescription)")
        var baselines = try setup.measureBaselines()
        var runs: [StudyRun] = []
        for workloadName in parsedWorkloads {
            let workload: BenchWorkload = workloadName == "memwalk" ? .memwalk(program: memwalk) : .kvstoreYCSBA(program: kvstore)
            for mebibytes in parsedSizes {
                for mode in parsedModes {
                    for pushing in (mode == .nonlive ? [true] : parsedPush) {
                        for repetition in 0..<parsedRepetitions {
                            let measured = try MeasuredMigration(workload: workload, mebibytes: mebibytes, mode: mode, push: pushing,
                                                                 pool: setup.pool, network: setup.network, workDirectory: setup.workDirectory,
                                                                 makeOracles: { common.makeOracles(byDefault: .off) }, logger: logger,
                                                                 recordingWindow: window).run()
                            if mode == .nonlive && workloadName == "memwalk" {
                                baselines.processVMReadvGigabytesPerSecond[mebibytes] = measured.processVMReadvGigabytesPerSecond
                            }
                            let run = StudyRun(workload: workload.name, repetition: repetition, sample: measured.sample,
                                               trace: measured.trace ?? MigrationTrace())
                            print(String(format: "  %@ %4d MiB %@%@: busy %7.1f ms, downtime %6.1f ms, total %7.1f ms, throughput %@",
                                         workload.name as NSString, mebibytes, mode.rawValue as NSString,
                                         (mode == .nonlive ? "" : pushing ? " push on" : " push off") as NSString,
                                         run.sample.busyMilliseconds, run.sample.downtimeMilliseconds, run.sample.totalMilliseconds,
                                         (run.migrationThroughput(window: nil).map { String(format: "%.0f/s", $0) } ?? "-") as NSString))
                            runs.append(run)
                            fflush(nil)  // a long matrix shows each run as it ends, also into a file
                        }
                    }
                }
            }
        }
        try write(StudyResults(link: setup.linkDescription, baselines: baselines, runs: runs, sizes: parsedSizes))
    }

    private func write(_ study: StudyResults) throws {
        let goals = study.goals()
        for goal in goals { print(goal.line) }
        do {
            try StudyReport(study: study, goals: goals).page().write(toFile: html, atomically: true, encoding: .utf8)
            print("report: \(html)")
            if let json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
                try encoder.encode(Output(link: study.link, baselines: study.baselines, goals: goals, runs: study.runs))
                    .write(to: URL(fileURLWithPath: json))
            }
        } catch { throw fail("cannot write the report: \(error)", code: 2) }
    }
}

/// One measured migration of the matrix.
struct StudyRun: Codable {
    var workload: String
    var repetition: Int
    var sample: Bench.Sample
    var trace: MigrationTrace

    /// "nonlive", "postcopy-fam push on", …
    var configuration: String { sample.mode + (sample.mode == MigrationMode.nonlive.rawValue ? "" : sample.push ? " push on" : " push off") }

    /// When the migration's work ended: the last page in, or the victim let go, whichever came later.
    var endMilliseconds: Double? {
        [trace.events[MigrationEvent.lastPageInstalled.rawValue], trace.events[MigrationEvent.victimReleased.rawValue]].compactMap { $0 }.max()
    }

    /// The application's work per second from the freeze over `window` ms (default: to this run's end).
    func migrationThroughput(window: Double?) -> Double? {
        guard let frozen = trace.events[MigrationEvent.frozen.rawValue] else { return nil }
        guard let length = window ?? endMilliseconds.map({ $0 - frozen }) else { return nil }
        return trace.throughput(from: frozen, to: frozen + length)
    }
}

/// A figure beside its goal: `value` ≤ (or ≥) `limit`; nil value when the matrix did not measure it.
struct StudyGoal: Codable {
    var figure: String
    var workload: String
    var mebibytes: Int
    var value: Double?
    var limit: Double
    var atMost: Bool
    var unit: String
    var detail: String

    var met: Bool? { value.map { atMost ? $0 <= limit : $0 >= limit } }
    var verdict: String { met.map { $0 ? "met" : "NOT met" } ?? "not measured" }
    var line: String {
        String(format: "goal %@ (%@, %d MiB): %@ %@ %.3g%@ - %@ (%@)", figure as NSString, workload as NSString, mebibytes,
               (value.map { String(format: "%.3g", $0) } ?? "-") as NSString, (atMost ? "<=" : ">=") as NSString, limit,
               unit as NSString, verdict as NSString, detail as NSString)
    }
}

struct StudyResults {
    var link: String
    var baselines: Bench.BaselineFigures
    var runs: [StudyRun]
    var sizes: [Int]

    var workloads: [String] { runs.map(\.workload).reduce(into: []) { if !$0.contains($1) { $0.append($1) } } }
    var configurations: [String] { runs.map(\.configuration).reduce(into: []) { if !$0.contains($1) { $0.append($1) } } }

    func runs(_ workload: String, _ mebibytes: Int, _ configuration: String) -> [StudyRun] {
        runs.filter { $0.workload == workload && $0.sample.mebibytes == mebibytes && $0.configuration == configuration }
    }

    func median(_ workload: String, _ mebibytes: Int, _ configuration: String, _ figure: (StudyRun) -> Double?) -> Double? {
        let values = runs(workload, mebibytes, configuration).compactMap(figure).filter { !$0.isNaN }.sorted()
        guard !values.isEmpty else { return nil }
        // An even count: the mean of the middle two (two repetitions must not pick the larger).
        return values.count % 2 == 1 ? values[values.count / 2] : (values[values.count / 2 - 1] + values[values.count / 2]) / 2
    }

    /// Issue 13's figures at each workload and size, with their goals.
    func goals() -> [StudyGoal] {
        let fam = "postcopy-fam push on", socket = "postcopy-socket push on", nonlive = "nonlive"
        var goals: [StudyGoal] = []
        func ratio(_ top: Double?, _ bottom: Double?) -> Double? { top.flatMap { top in bottom.map { top / $0 } } }
        for workload in workloads {
            for mebibytes in sizes {
                func figure(_ configuration: String, _ value: (StudyRun) -> Double?) -> Double? { median(workload, mebibytes, configuration, value) }
                func add(_ name: String, _ value: Double?, _ limit: Double, atMost: Bool = true, unit: String = "x", _ detail: String) {
                    goals.append(StudyGoal(figure: name, workload: workload, mebibytes: mebibytes, value: value, limit: limit, atMost: atMost,
                                           unit: unit, detail: detail))
                }
                add("busy fam / socket", ratio(figure(fam) { $0.sample.busyMilliseconds }, figure(socket) { $0.sample.busyMilliseconds }), 0.67,
                    "seed claim 1: busy time, start to victim killed, push on")
                add("total fam / socket", ratio(figure(fam) { $0.sample.totalMilliseconds }, figure(socket) { $0.sample.totalMilliseconds }), 0.85,
                    "seed claim 2: total time, start to last page installed")
                // Each mode over its own migration: from the freeze until its last page is in and its victim is gone.
                add("app throughput fam / socket", ratio(figure(fam) { $0.migrationThroughput(window: nil) },
                                                         figure(socket) { $0.migrationThroughput(window: nil) }), 1.12, atMost: false,
                    "seed claim 3: the application's work per second from the freeze to the end of its migration")
                add("busy fam / nonlive", ratio(figure(fam) { $0.sample.busyMilliseconds }, figure(nonlive) { $0.sample.busyMilliseconds }), 1.15,
                    "busy postcopy-fam against nonlive")
                for configuration in [fam, socket] {
                    add("downtime \(configuration)", figure(configuration) { $0.sample.downtimeMilliseconds }, 20, unit: " ms",
                        mebibytes >= 512 ? "goal at 512 MiB" : "goal is for 512 MiB; shown for scale")
                }
                add("fam-sync median / UFFDIO_COPY", ratio(figure(fam) { $0.sample.famSyncMedianMicroseconds }, baselines.userfaultfdCopyMicroseconds),
                    2.5, String(format: "raw UFFDIO_COPY %.2f us", baselines.userfaultfdCopyMicroseconds))
                let asyncLimit = baselines.tcpRoundTripMicroseconds + baselines.userfaultfdCopyMicroseconds
                add("source-async median", figure(fam) { $0.sample.sourceAsyncMedianMicroseconds }, asyncLimit, unit: " us",
                    "one round trip plus one page copy")
                if workload == "memwalk" {
                    add("nonlive dump / process_vm_readv", ratio(figure(nonlive) { $0.sample.dumpGigabytesPerSecond },
                                                                 baselines.processVMReadvGigabytesPerSecond[mebibytes]), 0.85, atMost: false,
                        "dump bandwidth against process_vm_readv into FAM")
                }
            }
        }
        return goals
    }
}
