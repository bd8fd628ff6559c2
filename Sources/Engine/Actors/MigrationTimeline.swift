// The instants and counts of one migration, written by actors (each on its own thread) and read by the
// report. Times come from the actors' EngineClock.
import Synchronization

public enum MigrationEvent: String, CaseIterable, Sendable, Codable {
    case started, freezeRequested, frozen, metadataCommitted, dumpCommitted, victimReleased
    case restoreStarted, targetResumed, lastPageInstalled
    /// Finer instants of the downtime, in their order (a report's breakdown of freeze → resume).
    case captured, imageFound, spawned, layoutBuilt, pagesBeforeResumeInstalled, stateRestored, prepared
}

public final class MigrationTimeline: Sendable {
    private struct Contents {
        var instants: [MigrationEvent: Duration] = [:]
        var counters: [String: Int] = [:]
    }
    private let contents = Mutex(Contents())

    /// Counters of time spent in oracles (the report subtracts them from the migration's figures).
    public static let freezeOracleNanoseconds = "freezeOracleNanoseconds"
    public static let targetOracleNanoseconds = "targetOracleNanoseconds"

    public init() {}

    public func record(_ event: MigrationEvent, at instant: Duration) {
        contents.withLock { if $0.instants[event] == nil { $0.instants[event] = instant } }
    }

    /// A freeze undone and tried again (Dumper): its instants are the next freeze's, not this one's.
    func forget(_ events: [MigrationEvent]) {
        contents.withLock { for event in events { $0.instants[event] = nil } }
    }

    public func add(_ amount: Int, to counter: String) {
        contents.withLock { $0.counters[counter, default: 0] += amount }
    }

    public func instant(_ event: MigrationEvent) -> Duration? { contents.withLock { $0.instants[event] } }
    public func counter(_ name: String) -> Int { contents.withLock { $0.counters[name] ?? 0 } }

    /// Time between two events, if both happened.
    public func span(from start: MigrationEvent, to end: MigrationEvent) -> Duration? {
        guard let startInstant = instant(start), let endInstant = instant(end) else { return nil }
        return endInstant - startInstant
    }
}

/// Whole nanoseconds of a duration.
public func nanoseconds(_ duration: Duration) -> Int {
    Int(duration.components.seconds) * 1_000_000_000 + Int(duration.components.attoseconds / 1_000_000_000)
}
