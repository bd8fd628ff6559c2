// One measured migration of a running test program: the code `bench` and `study` share. It starts the
// workload, waits until it is ready, migrates it with the threaded driver, and turns the timeline and
// the fault metrics into a `Bench.Sample`; with `recording` on it also keeps what `study` plots: the
// program's own progress lines, the pages dumped and faults served over time, and latency distributions.
import Engine
import Foundation
import Logging
import Oracles
import Synchronization
import Sys

/// A test program run at full speed while it is migrated, sized in MiB.
struct BenchWorkload: Sendable {
    var name: String
    var program: String
    /// The program's arguments for a size in MiB; `progressMilliseconds` > 0 asks for progress lines.
    var arguments: @Sendable (_ mebibytes: Int, _ progressMilliseconds: Int) -> [String]
    /// What the program prints on stdout once its memory is filled (the migration starts after it).
    var readyMarker: String

    /// memwalk: every page verified and rewritten at random; a step is one page.
    static func memwalk(program: String) -> BenchWorkload {
        BenchWorkload(name: "memwalk", program: program, arguments: { mebibytes, progress in
            ["--mib", "\(mebibytes)", "--steps", "1000000000", "--pause-us", "0"] + (progress > 0 ? ["--report-ms", "\(progress)"] : [])
        }, readyMarker: "fill done")
    }

    /// kvstore under YCSB A (50 % reads, 50 % updates, zipfian keys), one thread. Records are 4 KiB
    /// (48-byte header and a 4,048-byte value) in a table of twice as many slots, so the slots the load
    /// fills, about half of them, take the size asked for.
    static func kvstoreYCSBA(program: String) -> BenchWorkload {
        BenchWorkload(name: "kvstore-ycsb-a", program: program, arguments: { mebibytes, progress in
            ["--records", "\(mebibytes * 256)", "--value-bytes", "4048", "--workload", "A", "--ops", "1000000000000",
             "--batch", "100000000", "--pause-us", "0", "--report-ms", "\(progress)"]
        }, readyMarker: "loaded ")
    }
}

/// What `study` plots of one migration, on the migration's own time axis: milliseconds since `started`.
struct MigrationTrace: Codable {
    struct ProgressPoint: Codable { var milliseconds: Double; var done: Double }
    struct SeriesPoint: Codable { var milliseconds: Double; var pagesDumped: Int; var famSyncFaults: Int; var sourceAsyncFaults: Int }
    struct LatencyPoint: Codable { var microseconds: Double; var fraction: Double }
    /// Each migration event that happened, in milliseconds since `started`.
    var events: [String: Double] = [:]
    /// The program's own count of work done (memwalk steps, kvstore operations), stamped by the program.
    var progress: [ProgressPoint] = []
    var series: [SeriesPoint] = []
    /// Per fault path (fam-sync, source-async), points of its latency distribution.
    var latency: [String: [LatencyPoint]] = [:]

    /// Work done per second between two instants (linear between the program's points), nil if the
    /// progress does not cover both.
    func throughput(from start: Double, to end: Double) -> Double? {
        guard end > start, let startDone = done(at: start), let endDone = done(at: end) else { return nil }
        return (endDone - startDone) / ((end - start) / 1000)
    }

    private func done(at milliseconds: Double) -> Double? {
        guard let first = progress.first, let last = progress.last, first.milliseconds <= milliseconds, milliseconds <= last.milliseconds else {
            return nil
        }
        guard let after = progress.firstIndex(where: { $0.milliseconds >= milliseconds }) else { return nil }
        if after == 0 { return progress[0].done }
        let (left, right) = (progress[after - 1], progress[after])
        // A gap much longer than the program's period is a stall (frozen, or waiting on faults): no work in it.
        if right.milliseconds - left.milliseconds > 3 * Double(MeasuredMigration.progressMilliseconds) { return left.done }
        let fraction = (milliseconds - left.milliseconds) / max(right.milliseconds - left.milliseconds, 1e-9)
        return left.done + (right.done - left.done) * fraction
    }
}

struct MigrationMeasurement {
    var sample: Bench.Sample
    /// process_vm_readv into a FAM-like mapping, measured on the same victim (nonlive only, else NaN).
    var processVMReadvGigabytesPerSecond: Double
    var trace: MigrationTrace?
}

/// The settings of one measured migration.
struct MeasuredMigration {
    var workload: BenchWorkload
    var mebibytes: Int
    var mode: MigrationMode
    var push: Bool
    var pool: FAMPool?
    var network: NodeNetwork?
    var workDirectory: String
    var makeOracles: () -> MigrationOracles?
    var logger: Logger
    /// Keep a `MigrationTrace`: the program runs this long before the migration and after its end.
    var recordingWindow: Duration?

    /// Sampling period of the pages-dumped and faults series, and the bound on its length (100 s).
    static let samplePeriodMilliseconds = 5
    static let sampleLimit = 20_000
    static let progressMilliseconds = 10
    static let latencyPercentiles: [Double] = (0...99).map(Double.init) + [99.5, 99.9, 100]

    func run() throws -> MigrationMeasurement {
        // A new file per run: waiting for the ready line must never read an earlier run's output.
        let tag = "\(mebibytes)-\(mode.rawValue)-\(push)-\(UInt32.random(in: 0...UInt32.max))"
        let outputPath = workDirectory + "/bench-\(tag).out"
        let errorPath = recordingWindow == nil ? "/dev/null" : workDirectory + "/bench-\(tag).err"
        // Full speed: with pushing off, the migration ends when the window after the resume does.
        let victim = try Spawn.programInNewPIDNamespace(
            path: absolutePath(workload.program),
            arguments: workload.arguments(mebibytes, recordingWindow == nil ? 0 : Self.progressMilliseconds),
            environment: [], standardOutputPath: outputPath, standardErrorPath: errorPath)
        var restored: ProcessID?
        defer {
            Spawn.kill(victim)
            _ = try? Spawn.waitForExit(victim)
            if let restored { Spawn.kill(restored); _ = try? Spawn.waitForExit(restored) }
        }
        for _ in 0..<6000 {
            if let text = try? String(contentsOfFile: outputPath, encoding: .utf8), text.contains(workload.readyMarker) { break }
            usleep(10_000)
        }
        if let recordingWindow { Thread.sleep(forTimeInterval: seconds(recordingWindow)) }
        let bandwidth = mode == .nonlive ? try processVMReadvBandwidth(victim: victim) : .nan
        let famPath = "/dev/shm/fammig-bench-\(getpid())-\(mebibytes).img"
        defer { _ = try? SharedMapping.remove(path: famPath) }
        let timeline = MigrationTimeline()
        let metrics = FaultMetrics()
        let clock = MonotonicClock()
        // The programs stamp progress with CLOCK_MONOTONIC; the engine's clock starts here.
        let monotonicOrigin = MonotonicTime.now() - clock.now()
        let nodes = try Nodes.make(mode: mode, push: push, victim: victim, storage: pool.map { .pool($0) } ?? .file(famPath),
                                   stubPath: try stubPath(), separateNodes: true, oracles: makeOracles(), clock: clock,
                                   timeline: timeline, metrics: metrics, logger: logger, network: network)
        defer { nodes.close() }
        // Demand paging alone never ends while the program skips some dumped pages (stack, libc data):
        // without pushing, the program runs for a fixed window after its resume, then is killed, which
        // ends the target's fault handler and releases a socket source.
        let driverResult = Mutex<EngineError?>(nil)
        let finished = DispatchSemaphore(value: 0)
        let actors = UncheckedSendable(nodes.actors)
        let driver = Thread { [logger, mode] in
            do { try ThreadedDriver(logger: logger).run(actors.value) } catch {
                driverResult.withLock { $0 = error as? EngineError ?? .aborted("\(error)") }
            }
            finished.signal()
        }
        let sampler = recordingWindow.map { _ in SeriesSampler(clock: clock, timeline: timeline, metrics: metrics) }
        sampler?.start()
        driver.start()
        if mode != .nonlive && !push {
            while timeline.instant(.targetResumed) == nil && finished.wait(timeout: .now() + .milliseconds(10)) == .timedOut {}
            if timeline.instant(.targetResumed) != nil, finished.wait(timeout: .now() + .seconds(2)) == .timedOut,
               let target = nodes.restorer.restoredProcessID {
                Spawn.kill(target)
            }
        }
        finished.wait()
        if let error = driverResult.withLock({ $0 }) { sampler?.stop(); throw engineFailure(error) }
        restored = nodes.restorer.restoredProcessID
        if let recordingWindow { Thread.sleep(forTimeInterval: seconds(recordingWindow)) }
        let series = sampler?.stop() ?? []
        let sample = Self.sample(mebibytes: mebibytes, mode: mode, push: push, timeline: timeline, metrics: metrics,
                                 tcpByteCount: nodes.transportByteCount)
        var trace: MigrationTrace?
        if recordingWindow != nil {
            trace = Self.trace(timeline: timeline, metrics: metrics, series: series, errorPath: errorPath,
                               monotonicOrigin: monotonicOrigin)
        }
        return MigrationMeasurement(sample: sample, processVMReadvGigabytesPerSecond: bandwidth, trace: trace)
    }

    private static func sample(mebibytes: Int, mode: MigrationMode, push: Bool, timeline: MigrationTimeline, metrics: FaultMetrics,
                               tcpByteCount: Int) -> Bench.Sample {
        let pageCount = timeline.counter("pagesDumped")
        let pageDump = milliseconds(timeline.span(from: .metadataCommitted, to: .dumpCommitted)) ?? .nan
        let summaries = metrics.summaries
        let paths = Dictionary(uniqueKeysWithValues: summaries.map { ($0.path, $0.medianMicroseconds) })
        let faultPaths: Set<String> = [InstallPath.famSync.rawValue, InstallPath.sourceAsync.rawValue]
        return Bench.Sample(
            mebibytes: mebibytes, mode: mode.rawValue, push: push, pageCount: pageCount,
            busyMilliseconds: milliseconds(timeline.span(from: .started, to: .victimReleased)) ?? .nan,
            downtimeMilliseconds: milliseconds(timeline.span(from: .frozen, to: .targetResumed)) ?? .nan,
            // Nonlive is complete at the resume; post-copy when its last page is in.
            totalMilliseconds: milliseconds(timeline.span(from: .started, to: mode == .nonlive ? .targetResumed : .lastPageInstalled)) ?? .nan,
            stallMilliseconds: summaries.filter { faultPaths.contains($0.path) }.reduce(0) { $0 + $1.totalMilliseconds },
            restoreMilliseconds: milliseconds(timeline.span(from: .restoreStarted, to: .targetResumed)) ?? .nan,
            pageDumpMilliseconds: pageDump,
            dumpGigabytesPerSecond: Double(pageCount * .pageSize) / (pageDump / 1000) / 1e9,
            famSyncMedianMicroseconds: paths[InstallPath.famSync.rawValue],
            sourceAsyncMedianMicroseconds: paths[InstallPath.sourceAsync.rawValue],
            tcpByteCount: tcpByteCount,
            downtimeSteps: downtimeSteps(timeline))
    }

    private static func trace(timeline: MigrationTimeline, metrics: FaultMetrics, series: [MigrationTrace.SeriesPoint], errorPath: String,
                              monotonicOrigin: Duration) -> MigrationTrace {
        let started = timeline.instant(.started) ?? .zero
        func sinceStart(_ instant: Duration) -> Double { milliseconds(instant - started) ?? .nan }
        var trace = MigrationTrace()
        for event in MigrationEvent.allCases { if let instant = timeline.instant(event) { trace.events[event.rawValue] = sinceStart(instant) } }
        trace.series = series.map { point in
            var shifted = point
            shifted.milliseconds -= milliseconds(started) ?? 0
            return shifted
        }
        for path in [InstallPath.famSync, .sourceAsync] {
            let points = metrics.distribution(path, percentiles: latencyPercentiles)
            if !points.isEmpty { trace.latency[path.rawValue] = points.map { .init(microseconds: $0.microseconds, fraction: $0.fraction) } }
        }
        // "… progress SECONDS DONE": the program's CLOCK_MONOTONIC stamp and its count of work done.
        let text = (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? ""
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ")
            guard let index = words.firstIndex(of: "progress"), index + 2 < words.count,
                  let stamp = Double(words[index + 1]), let done = Double(words[index + 2]) else { continue }
            let engineInstant = Duration.nanoseconds(Int64(stamp * 1e9)) - monotonicOrigin
            trace.progress.append(.init(milliseconds: sinceStart(engineInstant), done: done))
        }
        trace.progress.sort { $0.milliseconds < $1.milliseconds }
        return trace
    }

    /// Every event between the freeze and the resume, in order, with the time since the previous one.
    private static func downtimeSteps(_ timeline: MigrationTimeline) -> [Bench.DowntimeStep] {
        guard let frozen = timeline.instant(.frozen), let resumed = timeline.instant(.targetResumed) else { return [] }
        let events = MigrationEvent.allCases.compactMap { event in timeline.instant(event).map { (event, $0) } }
            .filter { $0.1 >= frozen && $0.1 <= resumed && $0.0 != .frozen }
            .sorted { $0.1 < $1.1 }
        var previous = frozen
        return events.map { event, instant in
            defer { previous = instant }
            return Bench.DowntimeStep(event: event.rawValue, milliseconds: milliseconds(instant - previous) ?? .nan)
        }
    }

    /// process_vm_readv of every page a dump would take, into a pre-faulted /dev/shm mapping of the
    /// same size (the second of two passes, so both sides are warm like the dumper's).
    private func processVMReadvBandwidth(victim: ProcessID) throws -> Double {
        let addresses = try dumpablePageAddresses(of: victim)
        let path = "/dev/shm/fammig-bench-baseline-\(getpid()).img"
        let mapping = try SharedMapping.create(path: path, byteCount: max(addresses.count, 1) * .pageSize, prefault: true)
        defer { mapping.close(); _ = try? SharedMapping.remove(path: path) }
        var ranges: [ProcessReadRange] = []
        for (slot, address) in addresses.enumerated() {
            if let last = ranges.last, last.remoteAddress + UInt64(last.byteCount) == address {
                ranges[ranges.count - 1].byteCount += .pageSize
            } else {
                ranges.append((remoteAddress: address, byteCount: .pageSize, mappingOffset: slot * .pageSize))
            }
        }
        var elapsedSeconds = Double.nan
        for _ in 0..<2 {
            let start = ContinuousClock.now
            _ = try mapping.readFromProcess(processID: victim, ranges: ranges)
            elapsedSeconds = seconds(ContinuousClock.now - start)
        }
        return Double(addresses.count * .pageSize) / elapsedSeconds / 1e9
    }
}

/// Reads the pages-dumped counter and the fault counts every few milliseconds on a thread of its own,
/// while the migration runs (the actors are not asked: they only count).
final class SeriesSampler: @unchecked Sendable {
    private let clock: MonotonicClock
    private let timeline: MigrationTimeline
    private let metrics: FaultMetrics
    private let points = Mutex<[MigrationTrace.SeriesPoint]>([])
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)

    init(clock: MonotonicClock, timeline: MigrationTimeline, metrics: FaultMetrics) {
        self.clock = clock
        self.timeline = timeline
        self.metrics = metrics
    }

    func start() {
        Thread { [self] in
            while !stopping.load(ordering: .acquiring) {
                let counts = metrics.counts
                let point = MigrationTrace.SeriesPoint(milliseconds: milliseconds(clock.now()) ?? 0, pagesDumped: timeline.counter("pagesDumped"),
                                                       famSyncFaults: counts[.famSync] ?? 0, sourceAsyncFaults: counts[.sourceAsync] ?? 0)
                let full = points.withLock { points -> Bool in
                    points.append(point)
                    return points.count >= MeasuredMigration.sampleLimit
                }
                if full { break }
                usleep(UInt32(MeasuredMigration.samplePeriodMilliseconds * 1000))
            }
            done.signal()
        }.start()
    }

    /// Stops the thread and hands over what it sampled.
    @discardableResult func stop() -> [MigrationTrace.SeriesPoint] {
        stopping.store(true, ordering: .releasing)
        done.wait()
        return points.withLock { $0 }
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}
