// The target node's active pusher (postcopy-fam, --push on): installs dumped pages from FAM in the
// background, in runs of adjacent pages whose marks are stored, so that faults become rare and the
// migration ends without the victim's program touching every page.
import Logging
import Sys

public final class Pusher: EngineActor {
    public let name = "pusher"
    private let lazy: () -> LazyMemory?
    private let batchPageCount: Int
    private let clock: any EngineClock
    private let metrics: FaultMetrics
    private let logger: Logger
    private var cursor = 0
    private var finished = false
    /// Pages one install takes at most (32 KiB: a few microseconds of UFFDIO_COPY). A fault waits for
    /// the install lock behind at most one piece's copy: 32 pages (128 KiB) made a fault served from FAM
    /// wait tens of microseconds while pushing (bench: fam-sync median with push on).
    static let installPiecePageCount = 8

    public init(lazy: @escaping () -> LazyMemory?, batchPageCount: Int = 512, clock: any EngineClock, metrics: FaultMetrics, logger: Logger) {
        precondition(batchPageCount > 0, "a push batch holds at least one page")
        self.lazy = lazy
        self.batchPageCount = batchPageCount
        self.clock = clock
        self.metrics = metrics
        self.logger = logger
    }

    public func nextAction() -> NextAction {
        if finished { return .finished }
        guard let memory = lazy(), memory.isRunning else { return .waiting(.peer("restorer")) }
        if memory.isComplete || Spawn.hasEnded(memory.targetProcessID) { return .ready(.pusher(.finish)) }
        guard let first = memory.firstMissing(from: 0) else { return .ready(.pusher(.finish)) }
        // Restart the scan from the first hole: faults may have filled pages behind the cursor.
        if memory.nextInstallableRun(from: min(cursor, first), limit: 1) != nil { return .ready(.pusher(.push)) }
        return .waiting(.retryAfter(.microseconds(200)))
    }

    public func perform() throws(EngineError) {
        guard let memory = lazy() else { preconditionFailure("Pusher ran before the restorer handed over") }
        if memory.isComplete || Spawn.hasEnded(memory.targetProcessID) {
            finished = true
            return
        }
        // A tree member that ended takes no more pages (an install into it would fail with ESRCH).
        memory.discardPagesOfEndedMembers()
        let first = memory.firstMissing(from: 0) ?? memory.pageCount
        guard let run = memory.nextInstallableRun(from: min(cursor, first), limit: batchPageCount) else { return }
        let start = clock.now()
        // In pieces: each takes the install lock once, so a fault waits behind at most one piece's copy.
        do {
            for first in stride(from: run.slot, to: run.slot + run.count, by: Self.installPiecePageCount) {
                try memory.installFromFAM(slot: first, count: min(Self.installPiecePageCount, run.slot + run.count - first))
            }
        } catch {
            if memory.discardPagesOfEndedMembers() > 0 { return }
            if Spawn.endsSoon(memory.targetProcessID) { finished = true; return }
            throw .aborted("pusher installing \(run.count) pages at slot \(run.slot): \(error)")
        }
        metrics.record(.push, latency: clock.now() - start)
        logger.debug("pushed", metadata: ["slot": "\(run.slot)", "count": "\(run.count)", "ms": "\(nanoseconds(clock.now()) / 1_000_000)"])
        cursor = run.slot + run.count
    }

    public func abort(reason: String) {
        finished = true
    }
}
