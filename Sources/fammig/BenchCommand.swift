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
        var tcpRoundTripMicroseconds: Double = .nan
        var tcpGigabitsPerSecond: Double = .nan
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let workDirectory = try makeWorkDirectory()
        defer { removeWorkDirectory(workDirectory) }
        // The pool is made and mapped once, as a node would: no migration pays for FAM allocation.
        let temporaryPoolPath = famFiles || pool != nil ? nil : "/dev/shm/fammig-bench-pool-\(getpid())"
        defer { if let temporaryPoolPath { _ = try? SharedMapping.remove(path: temporaryPoolPath) } }
        let storagePool: FAMPool?
        if let temporaryPoolPath {
            let largest = parsedSizes.max() ?? 64
            _ = try PoolFile.create(path: temporaryPoolPath, byteCount: (largest * 3 / 2 + 64) << 20, slotCount: 16)
            storagePool = try PoolFile.open(path: temporaryPoolPath, prefault: true)
        } else {
            storagePool = try pool.map { try PoolFile.open(path: $0, prefault: true) }
        }
        print("oracles: \(common.oracles ?? .off) (on: the figures include their read-back on the target's path, as run's do not)")
        print("images: \(storagePool.map { "extents of the pool \($0.backend.path ?? "")" } ?? "a FAM file per migration, made before the freeze")")
        let network = netns ? try NodeNetwork(tag: getpid(), link: link) : nil
        defer { network?.remove() }
        var baselines = BaselineFigures()
        baselines.userfaultfdCopyMicroseconds = try userfaultfdBaseline()
        baselines.tcpRoundTripMicroseconds = try tcpRoundTripBaseline(network: network)
        baselines.tcpGigabitsPerSecond = try tcpBandwidthBaseline(network: network)
        let linkName = network.map { "veth between two network namespaces" + ($0.link.map { ", tbf \($0)" } ?? "") } ?? "loopback"
        print(String(format: "baselines: UFFDIO_COPY from FAM %.2f us per 4 KiB, TCP (%@) round trip %.1f us and %.2f Gb/s, flush %@",
                     baselines.userfaultfdCopyMicroseconds, linkName as NSString, baselines.tcpRoundTripMicroseconds,
                     baselines.tcpGigabitsPerSecond, "\(FlushInstruction.best())" as NSString))
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
        // A new file per run: waiting for "fill done" must never read an earlier run's output.
        let outputPath = workDirectory + "/bench-\(mebibytes)-\(mode.rawValue)-\(push)-\(UInt32.random(in: 0...UInt32.max)).out"
        // Full speed: with pushing off, the migration ends when the walk has touched every page.
        let victim = try Spawn.programInNewPIDNamespace(path: absolutePath(program),
                                                        arguments: ["--mib", "\(mebibytes)", "--steps", "1000000000", "--pause-us", "0"],
                                                        environment: [], standardOutputPath: outputPath, standardErrorPath: "/dev/null")
        var restored: ProcessID?
        defer {
            Spawn.kill(victim)
            _ = try? Spawn.waitForExit(victim)
            if let restored { Spawn.kill(restored); _ = try? Spawn.waitForExit(restored) }
        }
        for _ in 0..<6000 {
            if let text = try? String(contentsOfFile: outputPath, encoding: .utf8), text.contains("fill done") { break }
            usleep(10_000)
        }
        let bandwidth = mode == .nonlive ? try processVMReadvBandwidth(victim: victim) : .nan
        let famPath = "/dev/shm/fammig-bench-\(getpid())-\(mebibytes).img"
        defer { _ = try? SharedMapping.remove(path: famPath) }
        let timeline = MigrationTimeline()
        let metrics = FaultMetrics()
        let nodes = try Nodes.make(mode: mode, push: push, victim: victim, storage: pool.map { .pool($0) } ?? .file(famPath),
                                   stubPath: try stubPath(), separateNodes: true,
                                   oracles: common.makeOracles(byDefault: .off), clock: MonotonicClock(), timeline: timeline, metrics: metrics, logger: logger,
                                   network: network)
        defer { nodes.close() }
        // Demand paging alone never ends while the program skips some dumped pages (stack, libc data):
        // without pushing, the program runs for a fixed window after its resume, then is killed, which
        // ends the target's fault handler and releases a socket source.
        let driverResult = Mutex<EngineError?>(nil)
        let finished = DispatchSemaphore(value: 0)
        let actors = UncheckedSendable(nodes.actors)
        let driver = Thread {
            do { try ThreadedDriver(logger: logger, pinToCPU: mode == .nonlive ? 0 : nil).run(actors.value) } catch {
                driverResult.withLock { $0 = error as? EngineError ?? .aborted("\(error)") }
            }
            finished.signal()
        }
        driver.start()
        if mode != .nonlive && !push {
            while timeline.instant(.targetResumed) == nil && finished.wait(timeout: .now() + .milliseconds(10)) == .timedOut {}
            if timeline.instant(.targetResumed) != nil, finished.wait(timeout: .now() + .seconds(2)) == .timedOut,
               let target = nodes.restorer.restoredProcessID {
                Spawn.kill(target)
            }
        }
        finished.wait()
        if let error = driverResult.withLock({ $0 }) { throw engineFailure(error) }
        restored = nodes.restorer.restoredProcessID
        let pageCount = timeline.counter("pagesDumped")
        let pageDump = milliseconds(timeline.span(from: .metadataCommitted, to: .dumpCommitted)) ?? .nan
        let summaries = metrics.summaries
        let paths = Dictionary(uniqueKeysWithValues: summaries.map { ($0.path, $0.medianMicroseconds) })
        let faultPaths: Set<String> = [InstallPath.famSync.rawValue, InstallPath.sourceAsync.rawValue]
        let sample = Sample(
            mebibytes: mebibytes, mode: mode.rawValue, push: push, pageCount: pageCount,
            busyMilliseconds: milliseconds(timeline.span(from: .started, to: .victimReleased)) ?? .nan,
            downtimeMilliseconds: milliseconds(timeline.span(from: .frozen, to: .targetResumed)) ?? .nan,
            totalMilliseconds: milliseconds(timeline.span(from: .started, to: .lastPageInstalled)) ?? .nan,
            stallMilliseconds: summaries.filter { faultPaths.contains($0.path) }.reduce(0) { $0 + $1.totalMilliseconds },
            restoreMilliseconds: milliseconds(timeline.span(from: .restoreStarted, to: .targetResumed)) ?? .nan,
            pageDumpMilliseconds: pageDump,
            dumpGigabytesPerSecond: Double(pageCount * .pageSize) / (pageDump / 1000) / 1e9,
            famSyncMedianMicroseconds: paths[InstallPath.famSync.rawValue],
            sourceAsyncMedianMicroseconds: paths[InstallPath.sourceAsync.rawValue],
            tcpByteCount: nodes.transportByteCount,
            downtimeSteps: downtimeSteps(timeline))
        return (sample, bandwidth)
    }

    /// Every event between the freeze and the resume, in order, with the time since the previous one.
    private func downtimeSteps(_ timeline: MigrationTimeline) -> [DowntimeStep] {
        guard let frozen = timeline.instant(.frozen), let resumed = timeline.instant(.targetResumed) else { return [] }
        let events = MigrationEvent.allCases.compactMap { event in timeline.instant(event).map { (event, $0) } }
            .filter { $0.1 >= frozen && $0.1 <= resumed && $0.0 != .frozen }
            .sorted { $0.1 < $1.1 }
        var previous = frozen
        return events.map { event, instant in
            defer { previous = instant }
            return DowntimeStep(event: event.rawValue, milliseconds: milliseconds(instant - previous) ?? .nan)
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
        var seconds = Double.nan
        for _ in 0..<2 {
            let start = ContinuousClock.now
            _ = try mapping.readFromProcess(processID: victim, ranges: ranges)
            let elapsed = ContinuousClock.now - start
            seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        }
        return Double(addresses.count * .pageSize) / seconds / 1e9
    }

    private func userfaultfdBaseline() throws -> Double {
        let path = "/dev/shm/fammig-bench-uffd-\(getpid()).img"
        let pageCount = 1 << 12
        let mapping = try SharedMapping.create(path: path, byteCount: pageCount * .pageSize, prefault: true)
        defer { mapping.close(); _ = try? SharedMapping.remove(path: path) }
        return try Baselines.userfaultfdCopyMicroseconds(from: mapping, pageCount: pageCount)
    }

    /// A connection from the target's side (client) to the source's (server), across the node network if any.
    private func connectedPair(network: NodeNetwork?) throws -> (client: TCPTransport, server: TCPTransport) {
        let listener = try network.map { network in
            try network.inside(network.sourceNamespace) { try TCPTransport.listen(on: Endpoint(host: network.sourceAddress, port: 0)) }
        } ?? TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let client = try network.map { network in
            try network.inside(network.targetNamespace) { try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000) }
        } ?? TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
        guard let server = try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000) else { throw EngineError.timedOut("baseline accept") }
        return (client, server)
    }

    /// Source to target: 512 MiB as 2 MiB `pages` messages, timed at the receiver.
    private func tcpBandwidthBaseline(network: NodeNetwork?) throws -> Double {
        let (client, server) = try connectedPair(network: network)
        defer { client.close(); server.close() }
        let chunk = [UInt8](repeating: 5, count: 2 << 20)
        let messageCount = 256
        let sender = Thread {
            for index in 0..<messageCount { try? server.send(.pages(address: UInt64(index) << 21, bytes: chunk)) }
        }
        let start = ContinuousClock.now
        sender.start()
        var received = 0
        while received < messageCount {
            // False also when only part of a frame is in: wait again, within the whole run's limit.
            guard ContinuousClock.now - start < .seconds(60) else { throw EngineError.timedOut("bandwidth baseline") }
            guard client.waitReadable(timeoutMilliseconds: 100) else { continue }
            if case .pages? = try client.receive() { received += 1 }
        }
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return Double(messageCount * chunk.count * 8) / seconds / 1e9
    }

    /// Median of 2,000 round trips of a page request and a 4 KiB answer over TCP (loopback, or the node network).
    private func tcpRoundTripBaseline(network: NodeNetwork?) throws -> Double {
        let (client, server) = try connectedPair(network: network)
        defer { client.close(); server.close() }
        let page = [UInt8](repeating: 7, count: .pageSize)
        let echo = Thread {
            for _ in 0..<2000 {
                while !server.waitReadable(timeoutMilliseconds: 1000) {}
                guard case .pageRequest(let address)? = try? server.receive() else { return }
                try? server.send(.pages(address: address, bytes: page))
            }
        }
        echo.start()
        var samples: [Double] = []
        let clock = ContinuousClock()
        for index in 0..<2000 {
            let before = clock.now
            try client.send(.pageRequest(address: UInt64(index) * .pageSize))
            while !client.waitReadable(timeoutMilliseconds: 1000) {}
            _ = try client.receive()
            let elapsed = clock.now - before
            samples.append(Double(elapsed.components.attoseconds) / 1e12 + Double(elapsed.components.seconds) * 1e6)
        }
        samples.sort()
        return samples[samples.count / 2]
    }
}
