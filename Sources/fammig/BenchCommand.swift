// `fammig bench`: figures, not tests. Migrates memwalk at several sizes in every mode (push on and off)
// and prints one table of medians with their spread, next to baselines measured in the same run:
// process_vm_readv bandwidth into a FAM-like mapping, a raw UFFDIO_COPY-from-FAM loop, a TCP round trip.
import ArgumentParser
import Engine
import Foundation
import Logging
import Synchronization
import Sys

/// Hands the actors to the one driver thread that owns them from then on.
final class UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure migrations of memwalk in every mode against raw baselines (figures, not a test).")

    @Option(help: "Comma-separated memwalk sizes in MiB.")
    var sizes: String = "64,256,512"

    @Option(help: "Comma-separated modes (nonlive, postcopy-socket, postcopy-fam).")
    var modes: String = "nonlive,postcopy-socket,postcopy-fam"

    @Option(help: "Comma-separated push settings for the post-copy modes (on, off).")
    var push: String = "on,off"

    @Option(help: "Repetitions per configuration (the table shows the median and the spread).")
    var repetitions: Int = 3

    @Option(help: "The memwalk executable.")
    var program: String = "TestPrograms/build/memwalk-static"

    @Option(help: "Also write every measurement as JSON to this file.")
    var json: String?

    @Option(help: "The FAM pool images go to (default: a pool made under /dev/shm for this run, before any measurement, and removed after).")
    var pool: String?

    @Flag(help: "Give each migration a FAM file of its own, made and pre-faulted before the freeze (no pool: the old way).")
    var famFiles = false

    @Flag(help: "Post-copy: put each node's socket in its own network namespace, joined by a veth pair (made once for the run).")
    var netns = false

    @Option(help: "With --netns: shape the veth pair to this rate with tc tbf, e.g. 10gbit (netem is not in this kernel).", transform: parseLinkRate)
    var link: LinkRate?

    @OptionGroup var common: CommonOptions

    var parsedSizes: [Int] { sizes.split(separator: ",").compactMap { Int($0) } }
    var parsedModes: [MigrationMode] { modes.split(separator: ",").compactMap { MigrationMode(rawValue: String($0)) } }
    var parsedPush: [Bool] { push.split(separator: ",").compactMap { $0 == "on" ? true : $0 == "off" ? false : nil } }

    func validate() throws {
        guard repetitions >= 1 && repetitions <= 50 else { throw ValidationError("--repetitions must be 1...50.") }
        guard !parsedSizes.isEmpty, parsedSizes.allSatisfy({ $0 >= 1 && $0 <= 8192 }) else {
            throw ValidationError("--sizes takes MiB counts from 1 to 8192, e.g. 64,256,512.")
        }
        guard parsedModes.count == modes.split(separator: ",").count, !parsedModes.isEmpty else {
            throw ValidationError("--modes takes nonlive, postcopy-socket and postcopy-fam, comma-separated.")
        }
        guard parsedPush.count == push.split(separator: ",").count, !parsedPush.isEmpty else { throw ValidationError("--push takes on, off or on,off.") }
        guard access(program, X_OK) == 0 else { throw ValidationError("\(program) is not executable; run ./scripts/setup first.") }
        if famFiles && pool != nil { throw ValidationError("--fam-files and --pool are two places for the images: pass one.") }
        if link != nil && !netns { throw ValidationError("--link shapes the veth pair between the nodes: add --netns.") }
        if let pool, !ProcFS.exists(pool) { throw ValidationError("\(pool): no such pool; make it with `fammig pool create --pool \(pool) --mib N`.") }
    }

    struct Sample: Codable {
        var mebibytes: Int
        var mode: String
        var push: Bool
        var pageCount: Int
        var busyMilliseconds: Double
        var downtimeMilliseconds: Double
        var totalMilliseconds: Double
        /// Faults' stall time after the resume, summed over the fault paths (fam-sync, source-async).
        var stallMilliseconds: Double
        var restoreMilliseconds: Double
        var pageDumpMilliseconds: Double
        var dumpGigabytesPerSecond: Double
        var famSyncMedianMicroseconds: Double?
        var sourceAsyncMedianMicroseconds: Double?
        var tcpByteCount: Int
        /// The downtime step by step: each event from the freeze to the resume, with the milliseconds since
        /// the one before it, in the order they happened.
        var downtimeSteps: [DowntimeStep] = []
    }

    struct DowntimeStep: Codable {
        var event: String
        var milliseconds: Double
    }

    struct BaselineFigures: Codable {
        var processVMReadvGigabytesPerSecond: [Int: Double] = [:]
        var userfaultfdCopyMicroseconds: Double = .nan
        /// One page's mark code (HMAC-SHA256 of 4 KiB): the floor a checked fault adds to the copy.
        var pageCodeMicroseconds: Double = .nan
        var tcpRoundTripMicroseconds: Double = .nan
        var tcpGigabitsPerSecond: Double = .nan
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let setup = try BenchSetup(largestMebibytes: parsedSizes.max() ?? 64, pool: pool, famFiles: famFiles, netns: netns, link: link)
        defer { setup.close() }
        let storagePool = setup.pool, network = setup.network, workDirectory = setup.workDirectory
        print("oracles: \(common.oracles ?? .off) (on: the figures include their read-back on the target's path, as run's do not)")
        print("images: \(setup.poolDescription)")
        var baselines = try setup.measureBaselines()
        var samples: [Sample] = []
        for mebibytes in parsedSizes {
            for mode in parsedModes {
                for pushing in (mode == .nonlive ? [true] : parsedPush) {
                    for _ in 0..<repetitions {
                        let (sample, bandwidth) = try measure(mebibytes: mebibytes, mode: mode, push: pushing, pool: storagePool,
                                                              network: network, workDirectory: workDirectory, logger: logger)
                        if mode == .nonlive { baselines.processVMReadvGigabytesPerSecond[mebibytes] = bandwidth }
                        samples.append(sample)
                        print(String(format: "  %4d MiB %@ push %@: busy %7.1f ms, downtime %6.1f ms, stalls %6.1f ms, total %7.1f ms, fam-sync %@, async %@",
                                     mebibytes, mode.rawValue as NSString, (pushing ? "on " : "off") as NSString, sample.busyMilliseconds,
                                     sample.downtimeMilliseconds, sample.stallMilliseconds, sample.totalMilliseconds,
                                     (sample.famSyncMedianMicroseconds.map { String(format: "%.1f us", $0) } ?? "-") as NSString,
                                     (sample.sourceAsyncMedianMicroseconds.map { String(format: "%.1f us", $0) } ?? "-") as NSString))
                    }
                }
            }
        }
        printTable(samples, baselines: baselines)
        if let json {
            struct Output: Codable { var baselines: BaselineFigures; var samples: [Sample] }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            // A figure that does not exist (total time without pushing) is "nan" in the JSON too.
            encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            try writeReport(try encoder.encode(Output(baselines: baselines, samples: samples)), to: json)
        }
    }

    private func printTable(_ samples: [Sample], baselines: BaselineFigures) {
        func median(_ values: [Double]) -> String {
            let sorted = values.filter { !$0.isNaN }.sorted()
            guard let first = sorted.first, let last = sorted.last else { return "-" }
            return String(format: "%.1f [%.1f-%.1f]", sorted[sorted.count / 2], first, last).padding(toLength: 26, withPad: " ", startingAt: 0)
        }
        print("")
        print(["size", "mode", "push"].enumerated().map { $0.element.padding(toLength: [6, 17, 6][$0.offset], withPad: " ", startingAt: 0) }.joined()
              + ["busy ms", "downtime ms", "stalls ms", "total ms", "fam-sync us", "async us", "dump GB/s"].map { $0.padding(toLength: 26, withPad: " ", startingAt: 0) }.joined())
        for mebibytes in parsedSizes {
            for mode in parsedModes {
                for pushing in (mode == .nonlive ? [true] : parsedPush) {
                    let group = samples.filter { $0.mebibytes == mebibytes && $0.mode == mode.rawValue && $0.push == pushing }
                    guard !group.isEmpty else { continue }
                    let columns = [median(group.map(\.busyMilliseconds)), median(group.map(\.downtimeMilliseconds)),
                                   median(group.map(\.stallMilliseconds)), median(group.map(\.totalMilliseconds)), median(group.compactMap(\.famSyncMedianMicroseconds)),
                                   median(group.compactMap(\.sourceAsyncMedianMicroseconds)), median(group.map(\.dumpGigabytesPerSecond))]
                    print("\(mebibytes)".padding(toLength: 6, withPad: " ", startingAt: 0) + mode.rawValue.padding(toLength: 17, withPad: " ", startingAt: 0)
                          + (mode == .nonlive ? "-" : pushing ? "on" : "off").padding(toLength: 6, withPad: " ", startingAt: 0)
                          + columns.map { $0.padding(toLength: 26, withPad: " ", startingAt: 0) }.joined())
                }
            }
            for mode in parsedModes {
                for pushing in (mode == .nonlive ? [true] : parsedPush) {
                    let group = samples.filter { $0.mebibytes == mebibytes && $0.mode == mode.rawValue && $0.push == pushing }
                    guard let first = group.first, !first.downtimeSteps.isEmpty else { continue }
                    // Medians per step, in the order the first repetition saw them.
                    let steps = first.downtimeSteps.map { step in
                        let values = group.compactMap { $0.downtimeSteps.first { $0.event == step.event }?.milliseconds }.sorted()
                        return String(format: "%@ +%.1f", step.event as NSString, values[values.count / 2])
                    }
                    print("      downtime of \(mode.rawValue)\(mode == .nonlive ? "" : pushing ? " push on" : " push off") (ms from the freeze, step by step): "
                          + steps.joined(separator: ", "))
                }
            }
            if let bandwidth = baselines.processVMReadvGigabytesPerSecond[mebibytes] {
                print(String(format: "      process_vm_readv into a FAM-like mapping: %.2f GB/s", bandwidth))
            }
        }
        print(String(format: "goals: busy postcopy-fam <= 1.15x nonlive and <= 0.3x postcopy-socket; fam-sync median <= 2x UFFDIO_COPY (%.2f us) "
                     + "and <= 0.5x the socket path; downtime <= 20 ms at 512 MiB; nonlive dump >= 0.8x process_vm_readv.",
                     baselines.userfaultfdCopyMicroseconds))
    }

    private func measure(mebibytes: Int, mode: MigrationMode, push: Bool, pool: FAMPool?, network: NodeNetwork?, workDirectory: String,
                         logger: Logger) throws -> (Sample, Double) {
        let measured = try MeasuredMigration(workload: .memwalk(program: program), mebibytes: mebibytes, mode: mode, push: push, pool: pool,
                                             network: network, workDirectory: workDirectory,
                                             makeOracles: { common.makeOracles(byDefault: .off) }, logger: logger, recordingWindow: nil).run()
        return (measured.sample, measured.processVMReadvGigabytesPerSecond)
    }
}
