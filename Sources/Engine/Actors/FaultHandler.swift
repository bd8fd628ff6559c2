// The target node's fault handler (post-copy): reads missing-page faults from the userfaultfd and the
// source's messages, and serves each fault by the fastest path there is: synchronously from FAM when
// the page's dumped mark is stored (postcopy-fam), else asynchronously, by asking the source and
// installing the page when the answer comes (a mark in FAM, or the page over the socket).
import Histogram
import Logging
import Sys

public final class FaultHandler: EngineActor {
    public let name = "fault-handler"
    private let lazy: () -> LazyMemory?
    private let transport: (any Transport)?
    private let clock: any EngineClock
    private let timeline: MigrationTimeline
    private let metrics: FaultMetrics
    private let logger: Logger
    private let generation: UInt64
    /// The longest a fault waits for the source's page, and the longest the target holds every page
    /// without hearing that the process is its own (MigrationPlan.stallTimeout).
    private let stallTimeout: Duration
    /// MigrationPlan.targetLease (started by the restorer's hand-over): a lapsed one fails this node.
    private let lease: Duration?

    private struct Pending {
        var address: UInt64
        var since: Duration
    }
    /// Faults waiting for the source, by slot.
    private var pending: [Int: [Pending]] = [:]
    private var sourceComplete = false
    private var sourceGone = false
    /// A frame from the source did not open or decode (forged, replayed, changed on the wire): nothing more
    /// is read from the channel, but it is not the source's end, so this node still says when it is done.
    private var channelRefused = false
    /// Why (the frame that did not open), for the error that names it.
    private var channelRefusal: TransportError?
    private var finished = false
    /// The first `complete` said: this node needs nothing more (every page in, or its process ended).
    private var toldSourceDone = false
    /// When every page was in while the source had not yet made the restored process the process: the
    /// commit record in FAM (postcopy-fam), or the source's `complete` (postcopy-socket). Until then the
    /// watchdog stays armed: a source that dies first leaves its victim running on, and this copy must
    /// die (issue 12's window of two live copies).
    private var holdingSince: Duration?
    /// postcopy-fam: pages a synchronous fault installs at most (the faulting one and marked neighbours).
    static let faultAroundPageCount = 16
    /// postcopy-socket: the page bytes last acknowledged to the source.
    private var acknowledgedPageByteCount: UInt64 = 0
    /// postcopy-socket: when this node last told the source anything. A source waits on its target
    /// only so long (its stall timeout, at least `MigrationPlan.minimumStallTimeout`), and a process that
    /// runs without faulting is no stall: an idle target repeats its acknowledgement every
    /// `heartbeatInterval`, well within any timeout the source may have.
    private var lastSentToSource: Duration = .zero
    public static let heartbeatInterval: Duration = .milliseconds(500)
    private var heartbeatDue: Bool {
        guard let memory = lazy(), !memory.usesFAM, transport != nil, !sourceGone, !channelRefused else { return false }
        return clock.now() - lastSentToSource > Self.heartbeatInterval
    }

    /// `lazy()` is nil until the restorer has built the target and handed its memory over.
    public init(lazy: @escaping () -> LazyMemory?, transport: (any Transport)?, generation: UInt64,
                stallTimeout: Duration = .seconds(MigrationPlan.defaultStallTimeoutSeconds), lease: Duration? = nil, clock: any EngineClock,
                timeline: MigrationTimeline, metrics: FaultMetrics, logger: Logger) {
        self.stallTimeout = stallTimeout
        self.lease = lease
        self.lazy = lazy
        self.transport = transport
        self.generation = generation
        self.clock = clock
        self.timeline = timeline
        self.metrics = metrics
        self.logger = logger
    }

    public func nextAction() -> NextAction {
        if finished { return .finished }
        guard let memory = lazy(), memory.isRunning else { return .waiting(.peer("restorer")) }
        if Spawn.hasEnded(memory.targetProcessID) || (memory.isComplete && processIsOurs(memory)) { return .ready(.faultHandler(.finish)) }
        var descriptors = memory.userfaultfd.descriptors
        if let transport, !sourceGone, !channelRefused, let descriptor = transport.readableDescriptor { descriptors.append(descriptor) }
        // A pending fault is servable once its page's mark is stored; until then serving it would be a
        // step that changes nothing (a scheduler that favours this actor then starves the dumper).
        if memory.userfaultfd.waitReadable(timeoutMilliseconds: 0) || transportHasData() || hasPendingDumped(memory)
            || (!sourceGone && memory.receivedPageByteCount > acknowledgedPageByteCount)
            || (memory.isComplete && (!toldSourceDone || sourceGone || (channelRefused && !memory.usesFAM))) || stalled(memory) != nil || heartbeatDue {
            return .ready(.faultHandler(.serve))
        }
        return .waiting(.readable(descriptors, timeout: .milliseconds(1)))
    }

    /// Whether the source made the restored process the process: the image's commit record is durable
    /// (postcopy-fam: the victim dies with its source from then on), or the source said `complete`
    /// (postcopy-socket: it told this node before it let go of the victim).
    private func processIsOurs(_ memory: LazyMemory) -> Bool {
        sourceComplete || memory.imageIsCommitted()
    }

    /// What this node has waited on for longer than the stall timeout, or nil.
    private func stalled(_ memory: LazyMemory) -> String? {
        let now = clock.now()
        if let holdingSince, now - holdingSince > stallTimeout {
            return "every page was in, but the source did not make the process this node's (its commit record or its last word) within \(stallTimeout)"
        }
        if let oldest = pending.values.lazy.flatMap({ $0 }).min(by: { $0.since < $1.since }), now - oldest.since > stallTimeout {
            return "the restored process waited \(stallTimeout) for page \(hex(oldest.address)), which the source never delivered"
        }
        return nil
    }

    private func hasPendingDumped(_ memory: LazyMemory) -> Bool {
        // In slot order: whether a mark is stored is read from FAM (the model records each load), so the
        // order must not be the Dictionary's, which changes with the per-process hash seed.
        memory.usesFAM && pending.keys.sorted().contains { memory.isDumped($0) }
    }

    private func transportHasData() -> Bool {
        guard let transport, !sourceGone, !channelRefused else { return false }
        return transport.waitReadable(timeoutMilliseconds: 0)
    }

    public func perform() throws(EngineError) {
        guard let memory = lazy() else { preconditionFailure("FaultHandler ran before the restorer handed over") }
        // Before the look at the process: a lapsed lease's watchdog kills it, which is not its end.
        try checkLease(memory)
        do {
            if Spawn.hasEnded(memory.targetProcessID) || (memory.isComplete && processIsOurs(memory)) {
                try finish(memory)
                return
            }
            if memory.isComplete { try hold(memory); return }
            // A tree member that ended takes no more pages (nor can it: its memory is gone).
            memory.discardPagesOfEndedMembers()
            try receiveMessages(memory)
            try serveFaults(memory)
            if memory.usesFAM { try servePendingFromFAM(memory) }
            if heartbeatDue, let transport {
                try? transport.send(.received(pageByteCount: acknowledgedPageByteCount))
                lastSentToSource = clock.now()
            }
            if let stall = stalled(memory) { throw EngineError.stalled("\(stall); the restored process was killed") }
        } catch {
            // A target that ended meanwhile (it exited, or was killed) makes installs fail with ESRCH:
            // nothing is left to serve, which is an end, not a failure.
            // A tree member that ended meanwhile: its pages are discarded, and the next step goes on.
            if memory.discardPagesOfEndedMembers() > 0 { return }
            // A step the node's stop caught half-way goes on after the watchdog killed the process for
            // the lapsed lease: that death is the lease's, not the process's end.
            try checkLease(memory)
            if Spawn.endsSoon(memory.targetProcessID) {
                // Still tell the source: a socket-mode source waits for this before it lets go of the victim.
                try? finish(memory)
                return
            }
            if let error = error as? EngineError { throw error }
            throw .aborted("fault handler: \(error)")
        }
    }

    /// A lapsed lease (MigrationPlan.targetLease) fails the migration: the watchdog killed the process.
    private func checkLease(_ memory: LazyMemory) throws(EngineError) {
        guard let lease, memory.leaseLapsed else { return }
        throw .leaseLapsed("it did not run for longer than its lease (\(lease), half the stall timeout: it was stopped or starved), "
                           + "so its source may have let the victim run on; its watchdog killed the restored process, so that only one copy lives")
    }

    /// Every page is in, and the process is not yet this node's: say that nothing more is needed, keep
    /// serving (a page the process drops and touches again, its memory events) with the watchdog armed,
    /// and wait for the commit record or the source's last word. A source that goes first leaves its
    /// victim running on: this copy is killed (the abort), never left beside it.
    private func hold(_ memory: LazyMemory) throws {
        if holdingSince == nil { holdingSince = clock.now() }
        if !toldSourceDone, let transport, !sourceGone {
            // The source may release the victim now (postcopy-socket), or commit and kill it (postcopy-fam).
            try? transport.send(.complete(generation: generation))
            toldSourceDone = true
        }
        try receiveMessages(memory)
        try serveFaults(memory)
        if processIsOurs(memory) { return }
        if sourceGone {
            throw EngineError.aborted("the source node went away after every page was in but before it made the process this node's "
                                      + "(no commit record, no last word): its victim runs on there, so the restored process was killed")
        }
        // postcopy-fam still sees the commit record in FAM; postcopy-socket can no longer hear the hand-over.
        if channelRefused && !memory.usesFAM {
            throw EngineError.aborted("the channel from the source was refused (\(channelRefusal.map { "\($0)" } ?? "a frame did not open")) after every page was in: "
                                      + "this node cannot hear the source hand the process over, so the restored process was killed")
        }
        if let stall = stalled(memory) { throw EngineError.stalled("\(stall); the restored process was killed (the victim is the process)") }
    }

    private func finish(_ memory: LazyMemory) throws {
        logger.debug("fault handler finishing", metadata: ["ms": "\(nanoseconds(clock.now()) / 1_000_000)", "installed": "\(memory.installedPageCount)", "pages": "\(memory.pageCount)",
                                                          "missing": "\(memory.firstMissing(from: 0).map { hex(memory.pageAddresses[$0]) } ?? "none")"])
        if memory.isComplete {
            try memory.unregisterAll()
            timeline.record(.lastPageInstalled, at: clock.now())
        }
        if let transport, !sourceGone {
            // The first `complete`: nothing more is needed (if `hold` did not say it); the second: the
            // watchdog is disarmed, this node holds the process (a postcopy-socket source kills its
            // victim only once it heard this).
            if !toldSourceDone { try? transport.send(.complete(generation: generation)) }
            try? transport.send(.complete(generation: generation))
            toldSourceDone = true
        }
        finished = true
    }

    private func receiveMessages(_ memory: LazyMemory) throws {
        guard let transport, !sourceGone, !channelRefused else { return }
        // Taken in, then acknowledged (after any request for a page that came too late, so a source
        // that sees every byte acknowledged knows nothing more will be asked for); pages the restorer
        // took in before the resume are acknowledged here too.
        defer { acknowledgeReceivedPages(memory, transport: transport) }
        for _ in 0..<64 {
            let message: Message?
            do { message = try transport.receive() } catch {
                if case .malformed = error { channelRefused = true; channelRefusal = error } else { sourceGone = true }
                // After the commit record the image alone completes the migration; before it, pages
                // the target still needs are lost with the source: fail (the target gets killed). With
                // every page in, `hold` decides (the source's victim may run on: this copy must not).
                if memory.isComplete || processIsOurs(memory) { return }
                if channelRefused {
                    throw EngineError.aborted("the channel from the source was refused before the migration completed (\(error)); the target was killed")
                }
                throw EngineError.aborted("the source node went away before the migration completed (\(error)); the target was killed")
            }
            guard let message else { return }
            switch message {
            case .pages(let address, let bytes):
                let start = clock.now()
                logger.trace("received", metadata: ["address": "\(hex(address))", "us": "\(nanoseconds(start) / 1000)"])
                let newly = try memory.installBytes(address: address, bytes: bytes)
                if pending[memory.frozenSlot(for: address) ?? -1] == nil && newly > 0 { metrics.record(.push, latency: clock.now() - start) }
                let range = slotRange(memory, address: address, count: bytes.count / .pageSize)
                wakePending(memory, slots: range.filter { memory.isInstalled($0) }, path: .sourceAsync)
                // Pages the process was moving while they arrived: ask for them again.
                for slot in range where !memory.isInstalled(slot) {
                    memory.clearRequested(slot)
                    if memory.noteRequested(slot) { try transport.send(.pageRequest(address: memory.pageAddresses[slot])) }
                }
                memory.noteReceivedPages(byteCount: bytes.count)
                // At once, not after the batch: the source's next chunk then overlaps this install.
                acknowledgeReceivedPages(memory, transport: transport)
            case .marked:
                continue  // servePendingFromFAM checks the marks themselves.
            case .complete:
                sourceComplete = true
            case .abort(let reason):
                throw EngineError.aborted("the source aborted: \(reason)")
            default:
                logger.debug("fault handler ignores \(message)")
            }
        }
    }

    private func acknowledgeReceivedPages(_ memory: LazyMemory, transport: any Transport) {
        let total = memory.receivedPageByteCount
        guard total > acknowledgedPageByteCount else { return }
        try? transport.send(.received(pageByteCount: total))
        acknowledgedPageByteCount = total
        lastSentToSource = clock.now()
    }

    private func slotRange(_ memory: LazyMemory, address: UInt64, count: Int) -> Range<Int> {
        guard let first = memory.frozenSlot(for: address) else { return 0..<0 }
        return first..<(first + count)
    }

    private func serveFaults(_ memory: LazyMemory) throws {
        for _ in 0..<256 {
            guard let fault = try memory.nextFault() else { return }
            let start = clock.now()
            metrics.faultCount.wrappingIncrement(ordering: .relaxed)
            // One look under the lock: which slot, installed or not, marked or not.
            let target = memory.faultTarget(address: fault.address)
            let slot: Int
            switch target {
            case .neverDumped:
                // Never dumped: the victim never touched it, so it reads as zeros.
                try memory.installZeroPage(address: fault.address)
                metrics.record(.famSync, latency: clock.now() - start, zero: true)
                continue
            case .installed:
                try memory.refault(address: fault.address)
                continue
            case .dumped(let dumpedSlot), .missing(let dumpedSlot):
                slot = dumpedSlot
            }
            if case .dumped = target {
                try memory.installFromFAM(slot: slot, count: 1)
                if memory.isInstalled(slot) {
                    metrics.record(.famSync, latency: clock.now() - start)
                    // Fault-around, once the faulting thread is on its way: the marked, missing pages
                    // right after it go in too, in one copy (the next faults nearby never come).
                    if let around = memory.nextInstallableRun(from: slot + 1, limit: Self.faultAroundPageCount - 1), around.slot == slot + 1 {
                        try memory.installFromFAM(slot: around.slot, count: around.count)
                    }
                } else {
                    // The process was moving its memory: served from FAM on the next step instead.
                    pending[slot, default: []].append(Pending(address: fault.address, since: start))
                }
                continue
            }
            pending[slot, default: []].append(Pending(address: fault.address, since: start))
            if memory.noteRequested(slot) {
                try transport?.send(.pageRequest(address: memory.pageAddresses[slot]))
                logger.trace("requested", metadata: ["slot": "\(slot)", "us": "\(nanoseconds(clock.now()) / 1000)", "faultUs": "\(nanoseconds(start) / 1000)"])
            }
        }
    }

    private func servePendingFromFAM(_ memory: LazyMemory) throws {
        for slot in pending.keys.sorted() where memory.isDumped(slot) {
            if !memory.isInstalled(slot) { try memory.installFromFAM(slot: slot, count: 1) } else { try memory.wake(address: memory.currentAddress(slot)) }
            if memory.isInstalled(slot) { wakePending(memory, slots: slot..<(slot + 1), path: .sourceAsync) }
        }
    }

    /// Faults on these slots are served: record their latency from the fault to now.
    private func wakePending(_ memory: LazyMemory, slots: some Sequence<Int>, path: InstallPath) {
        let now = clock.now()
        for slot in slots {
            guard let waiting = pending.removeValue(forKey: slot) else { continue }
            for fault in waiting { metrics.record(path, latency: now - fault.since) }
        }
    }

    public func abort(reason: String) {
        logger.info("fault handler aborting", metadata: ["reason": "\(reason)"])
        // Until the watchdog is disarmed (every page in and the process this node's) the restored process
        // is not the process: killed, also when it holds every page.
        if let memory = lazy(), !memory.isReleased { memory.killTarget() }
        finished = true
    }
}
