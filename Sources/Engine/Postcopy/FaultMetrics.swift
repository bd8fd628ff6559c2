// Fault counts and latency histograms per install path (HdrHistogram), shared by the target's actors.
import Atomics
import Histogram
import Sys

public final class FaultMetrics: @unchecked Sendable {
    public let faultCount = ManagedAtomic<Int>(0)
    public let zeroPageCount = ManagedAtomic<Int>(0)
    private let lock = Lock()
    private var histograms: [InstallPath: Histogram<UInt64>] = [:]

    public init() {}

    /// Records one served fault (or, for `.push`, one installed batch) taking `latency`.
    public func record(_ path: InstallPath, latency: Duration, zero: Bool = false) {
        if zero { zeroPageCount.wrappingIncrement(ordering: .relaxed); return }
        let nanoseconds = UInt64(max(1, Engine.nanoseconds(latency)))
        lock.withLock {
            // In place: a copy taken out of the dictionary and stored back copied the whole histogram (some
            // 220 KB of counts) at every fault, on the fault handler's thread.
            _ = histograms[path, default: Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)]
                .record(nanoseconds)
        }
    }

    /// Count, median, 99th percentile and maximum in microseconds, per path that saw any.
    public struct PathSummary: Codable, Sendable {
        public var path: String
        public var count: Int
        public var medianMicroseconds: Double
        public var p99Microseconds: Double
        public var maxMicroseconds: Double
        /// The sum of every latency: for a fault path, how long faulting threads stalled in all.
        public var totalMilliseconds: Double
    }

    public var summaries: [PathSummary] {
        lock.withLock {
            InstallPath.allCases.compactMap { path in
                guard let histogram = histograms[path], histogram.totalCount > 0 else { return nil }
                return PathSummary(path: path.rawValue, count: Int(histogram.totalCount),
                                   medianMicroseconds: Double(histogram.valueAtPercentile(50)) / 1000,
                                   p99Microseconds: Double(histogram.valueAtPercentile(99)) / 1000,
                                   maxMicroseconds: Double(histogram.max) / 1000,
                                   totalMilliseconds: histogram.mean * Double(histogram.totalCount) / 1e6)
            }
        }
    }

    /// Faults (for `.push`, batches) recorded so far per path: a sampler's reading while the migration runs.
    public var counts: [InstallPath: Int] {
        lock.withLock { histograms.mapValues { Int($0.totalCount) } }
    }

    /// The latency distribution of one path as (microseconds, fraction of faults at or below) points, at
    /// the given percentiles (0...100); empty when the path saw nothing.
    public func distribution(_ path: InstallPath, percentiles: [Double]) -> [(microseconds: Double, fraction: Double)] {
        lock.withLock {
            guard let histogram = histograms[path], histogram.totalCount > 0 else { return [] }
            return percentiles.map { (Double(histogram.valueAtPercentile($0)) / 1000, $0 / 100) }
        }
    }
}
