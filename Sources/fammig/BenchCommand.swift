// `fammig bench`: figures, not tests. Migrates memwalk at several sizes and prints, from one run, the
// dump throughput into FAM against a process_vm_readv baseline into the same kind of mapping, the
// downtime and the restore time, as medians with their spread.
import ArgumentParser
import Engine
import Foundation
import Logging
import Sys

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure migrations of memwalk at several sizes against raw baselines (figures, not a test).")

    @Option(help: "Comma-separated memwalk sizes in MiB.")
    var sizes: String = "64,256,512"

    @Option(help: "Repetitions per size (the table shows the median and the spread).")
    var repetitions: Int = 3

    @Option(help: "The memwalk executable.")
    var program: String = "TestPrograms/build/memwalk-static"

    @Option(help: "Also write every measurement as JSON to this file.")
    var json: String?

    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard repetitions >= 1 && repetitions <= 50 else { throw ValidationError("--repetitions must be 1...50.") }
        guard !parsedSizes.isEmpty, parsedSizes.allSatisfy({ $0 >= 1 && $0 <= 8192 }) else {
            throw ValidationError("--sizes takes MiB counts from 1 to 8192, e.g. 64,256,512.")
        }
        guard access(program, X_OK) == 0 else { throw ValidationError("\(program) is not executable; run ./scripts/setup first.") }
    }

    var parsedSizes: [Int] { sizes.split(separator: ",").compactMap { Int($0) } }

    struct Sample: Codable {
        var mebibytes: Int
        var pageCount: Int
        var baselineGigabytesPerSecond: Double
        var dumpGigabytesPerSecond: Double
        var dumpRatio: Double
        var downtimeMilliseconds: Double
        var copyMilliseconds: Double
        var restoreMilliseconds: Double
        var pageDumpMilliseconds: Double
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let workDirectory = try makeWorkDirectory()
        defer { removeWorkDirectory(workDirectory) }
        var samples: [Sample] = []
        print("flush instruction: \(FlushInstruction.best())")
        for mebibytes in parsedSizes {
            for repetition in 0..<repetitions {
                let sample = try measure(mebibytes: mebibytes, workDirectory: workDirectory, logger: logger)
                samples.append(sample)
                print(String(format: "  %4d MiB #%d: baseline %.2f GB/s, dump %.2f GB/s (%.2fx), downtime %.1f ms, restore %.1f ms",
                             mebibytes, repetition + 1, sample.baselineGigabytesPerSecond, sample.dumpGigabytesPerSecond,
                             sample.dumpRatio, sample.downtimeMilliseconds, sample.restoreMilliseconds))
            }
        }
        print("")
        print("size     pages   pvm_readv GB/s   dump GB/s   dump/pvm (goal>=0.8)   downtime ms (goal<=20+copy)   copy ms   restore ms")
        for mebibytes in parsedSizes {
            let group = samples.filter { $0.mebibytes == mebibytes }
            func stat(_ values: [Double], _ format: String) -> String {
                let sorted = values.sorted()
                return String(format: format, sorted[sorted.count / 2], sorted.first!, sorted.last!)
            }
            print(String(format: "%4d MiB %7d   ", mebibytes, group[0].pageCount)
                  + stat(group.map(\.baselineGigabytesPerSecond), "%.2f [%.2f-%.2f]") + "   "
                  + stat(group.map(\.dumpGigabytesPerSecond), "%.2f [%.2f-%.2f]") + "   "
                  + stat(group.map(\.dumpRatio), "%.2f [%.2f-%.2f]") + "        "
                  + stat(group.map(\.downtimeMilliseconds), "%.1f [%.1f-%.1f]") + "        "
                  + stat(group.map(\.copyMilliseconds), "%.1f") .components(separatedBy: " ")[0] + "   "
                  + stat(group.map(\.restoreMilliseconds), "%.1f [%.1f-%.1f]"))
        }
        print("copy = page dump + page install (the part of the downtime that grows with memory size)")
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(samples).write(to: URL(fileURLWithPath: json))
        }
    }

    private func measure(mebibytes: Int, workDirectory: String, logger: Logger) throws -> Sample {
        let outputPath = workDirectory + "/bench-\(mebibytes).out"
        let victim = try Spawn.program(path: absolutePath(program),
                                       arguments: ["--mib", "\(mebibytes)", "--steps", "100000000", "--pause-us", "20000"],
                                       environment: [], standardOutputPath: outputPath, standardErrorPath: "/dev/null")
        var restored: ProcessID?
        defer {
            Spawn.kill(victim)
            _ = try? Spawn.waitForExit(victim)
            if let restored { Spawn.kill(restored); _ = try? Spawn.waitForExit(restored) }
        }
        // Wait until memwalk has filled its memory (it prints "fill done"), at most 60 s.
        for _ in 0..<6000 {
            if let text = try? String(contentsOfFile: outputPath, encoding: .utf8), text.contains("fill done") { break }
            usleep(10_000)
        }
        let baseline = try processVMReadvBandwidth(victim: victim, workDirectory: workDirectory)

        let famPath = "/dev/shm/fammig-bench-\(getpid())-\(mebibytes).img"
        defer { _ = try? SharedMapping.remove(path: famPath) }
        let timeline = MigrationTimeline()
        let clock = MonotonicClock()
        let dumper = Dumper(victim: victim, makeBackend: makeRealBackend(path: famPath), generation: 1, release: .kill,
                            observer: nil, clock: clock, timeline: timeline, logger: logger)
        let restorer = Restorer(openBackend: openRealBackend(path: famPath), stubPath: try stubPath(), observer: nil,
                                clock: clock, timeline: timeline, logger: logger)
        do { try ThreadedDriver(logger: logger, pinToCPU: 0).run([dumper, restorer]) } catch { throw engineFailure(error) }
        restored = restorer.restoredProcessID
        let pageCount = timeline.counter("pagesDumped")
        let byteCount = Double(pageCount * 4096)
        let pageDump = milliseconds(timeline.span(from: .metadataCommitted, to: .dumpCommitted)) ?? .nan
        let install = milliseconds(timeline.span(from: .restoreStarted, to: .lastPageInstalled)) ?? .nan
        let dumpRate = byteCount / (pageDump / 1000) / 1e9
        return Sample(mebibytes: mebibytes, pageCount: pageCount, baselineGigabytesPerSecond: baseline,
                      dumpGigabytesPerSecond: dumpRate, dumpRatio: dumpRate / baseline,
                      downtimeMilliseconds: milliseconds(timeline.span(from: .frozen, to: .targetResumed)) ?? .nan,
                      copyMilliseconds: pageDump + install,
                      restoreMilliseconds: milliseconds(timeline.span(from: .restoreStarted, to: .targetResumed)) ?? .nan,
                      pageDumpMilliseconds: pageDump)
    }

    /// process_vm_readv of every page a dump would take, into a pre-faulted /dev/shm mapping of the
    /// same size (the second of two passes, so both sides are warm like the dumper's).
    private func processVMReadvBandwidth(victim: ProcessID, workDirectory: String) throws -> Double {
        let addresses = try dumpablePageAddresses(of: victim)
        let path = "/dev/shm/fammig-bench-baseline-\(getpid()).img"
        let mapping = try SharedMapping.create(path: path, byteCount: max(addresses.count, 1) * 4096, prefault: true)
        defer { mapping.close(); _ = try? SharedMapping.remove(path: path) }
        var ranges: [ProcessReadRange] = []
        for (slot, address) in addresses.enumerated() {
            if let last = ranges.last, last.remoteAddress + UInt64(last.byteCount) == address {
                ranges[ranges.count - 1].byteCount += 4096
            } else {
                ranges.append((remoteAddress: address, byteCount: 4096, mappingOffset: slot * 4096))
            }
        }
        var seconds = Double.nan
        for _ in 0..<2 {
            let start = ContinuousClock.now
            _ = try mapping.readFromProcess(processID: victim, ranges: ranges)
            let elapsed = ContinuousClock.now - start
            seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        }
        return Double(addresses.count * 4096) / seconds / 1e9
    }
}
