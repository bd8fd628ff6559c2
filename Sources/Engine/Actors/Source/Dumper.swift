// The source node's dumper, one lifecycle for every mode: refuses what it cannot migrate while the
// victim still runs, freezes it, reads its state, hands the metadata and then the pages to its mode's
// page strategy (SourcePageStrategy: nonlive batches, post-copy FAM dump, socket page server), commits,
// and releases the victim. One step per call, so a driver can interleave it with every other actor.
import Logging
import Sys

public final class Dumper: EngineActor {
    public enum Release: Sendable { case kill, leaveRunning }

    enum State {
        case preflight, freeze, capture, writeMetadata, dumping(nextSlot: Int), commit, handingOver, release, finished, failed
        /// The step this state takes (nil once it ended).
        var step: DumperStep? {
            switch self {
            case .preflight: .preflight
            case .freeze: .freeze
            case .capture: .capture
            case .writeMetadata: .writeMetadata
            case .dumping(let nextSlot): .dump(fromSlot: nextSlot)
            case .commit: .commit
            case .handingOver: .handOver
            case .release: .release
            case .finished, .failed: nil
            }
        }
    }

    public let name = "dumper"
    public let victimProcessID: ProcessID
    let makeBackend: (Int) throws(ImageError) -> any FAMBackend
    let generation: UInt64
    let release: Release
    let batchPageCount: Int
    let observer: (any MigrationObserver)?
    let clock: any EngineClock
    let timeline: MigrationTimeline
    let logger: Logger
    /// The longest this node waits for the target once state has moved (MigrationPlan.stallTimeout).
    let stallTimeout: Duration
    /// postcopy-socket, from the `complete` that hands the process over until the target says it holds
    /// it: a source that dies (or gives up) meanwhile cannot know which copy lives, so it leaves the
    /// victim stopped rather than running or dead.
    var handOverSince: Duration?
    /// Whether the process is being handed over (a dead source leaves the victim stopped then).
    package var isHandingOver: Bool { handOverSince != nil }
    /// Authenticates the image; never stored in it.
    let key: MigrationKey
    /// Recorded in the image: this node's user and capabilities, which a restore never exceeds.
    let creator: ImageCreator

    var state = State.preflight
    var victim: FrozenTree?
    /// Freezes that found a descriptor or mapping the preflight did not see, each let go untouched and
    /// frozen again later (`freezeRetryLimit`): a program that opens a descriptor for a moment each round.
    /// Preflights that found one count too (a listener with a connection not yet accepted, a moment
    /// before its accept): the preflight is run again after the same waits.
    public internal(set) var transientRefusals = 0
    /// When a let-go victim is frozen again (the clock's time), while a retry waits.
    var refreezeAt: Duration?
    /// How often a freeze that found something the preflight did not (a descriptor or a mapping) is
    /// undone and tried again before the refusal stands, and the first wait (doubled each time:
    /// 4, 8, 16, 32, 64 ms, the victim running meanwhile).
    public static let freezeRetryLimit = 5
    static let firstRefreezeDelay = Duration.milliseconds(4)
    /// The longest the retries wait in all (4 + 8 + 16 + 32 + 64 ms) before a refusal stands or the
    /// freeze goes on: nothing is written to FAM or sent meanwhile, so a target's image wait
    /// (`TargetPorts.imageWait`) is computed from it, never shorter (a target that gave up sooner
    /// would take a source that is still looking for a moment's descriptor for a failed one).
    public static let transientRetryBudget = (0..<freezeRetryLimit).reduce(Duration.zero) { total, retry in
        total + firstRefreezeDelay * (1 << retry)
    }
    public internal(set) var checkpointedState: ProcessState?
    var pageAddresses: [UInt64] = []
    /// Read before the freeze, for the capture.
    var mappingFlags: StateReader.MappingFlags?
    /// The victim's guard (FrozenVictim.swift), started in the preflight, handed to the freeze.
    var preparedGuard: SourceGuard?
    var writer: ImageWriter?
    var backend: (any FAMBackend)?
    /// This thread on the victim's CPU from the freeze to the metadata commit: the capture's injected
    /// syscalls are ptrace round trips (TracerPin).
    var tracerPin = TracerPin()
    /// A batch copied into FAM whose seal (flush, fence, marks) is the next step (two steps per batch, so
    /// a driver can run the target while pages sit in FAM unmarked).
    var unsealed: Range<Int>?
    /// What this mode does with the pages.
    let strategy: any SourcePageStrategy
    /// Written into the image (MigrationPlan.imageIdentity).
    let imageIdentity: [UInt8]?
    /// Room for the metadata region in the pre-sized FAM (a process state is a few KiB; filters and
    /// the VMA table of a big process stay far below this).
    static let metadataAllowanceByteCount = 1 << 20

    /// `makeBackend(byteCount)` creates the FAM the image goes to. It is called before the freeze with
    /// an estimate (pages present then, plus a margin), so that allocating and pre-faulting the FAM
    /// file is not part of the downtime. When the victim touched more pages than that before it froze,
    /// it is called once more with the exact size, and must then replace what it made the first time.
    /// `key` is the migration's key, made by the source (`MigrationKey.generate`) and handed to the
    /// target out of band.
    init(victim: ProcessID, makeBackend: @escaping (Int) throws(ImageError) -> any FAMBackend,
                generation: UInt64, key: MigrationKey, release: Release, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline, logger: Logger,
                strategy: any SourcePageStrategy, stallTimeout: Duration = .seconds(MigrationPlan.defaultStallTimeoutSeconds),
                imageIdentity: [UInt8]? = nil) {
        self.stallTimeout = stallTimeout
        self.imageIdentity = imageIdentity
        self.strategy = strategy
        self.key = key
        self.creator = ImageCreator.current()
        precondition(batchPageCount > 0, "a dump batch holds at least one page")
        self.victimProcessID = victim
        self.makeBackend = makeBackend
        self.generation = generation
        self.release = release
        self.batchPageCount = batchPageCount
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.logger = logger
    }

    var transport: (any Transport)? { strategy.transport }

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: return .finished
        case .dumping:
            if let waiting = strategy.waitingWhileDumping(self) { return waiting }
            if let unsealed { return .ready(.dumper(.seal(slots: unsealed))) }
            return state.step.map { .ready(.dumper($0)) } ?? .finished
        case .handingOver:
            return strategy.waitingForHandOver(self) ?? .ready(.dumper(.handOver))
        case .freeze, .preflight:
            if let refreezeAt, clock.now() < refreezeAt { return .waiting(.retryAfter(refreezeAt - clock.now())) }
            return state.step.map { .ready(.dumper($0)) } ?? .finished
        default: return state.step.map { .ready(.dumper($0)) } ?? .finished
        }
    }

    public func perform() throws(EngineError) {
        do {
            try step()
        } catch {
            state = .failed
            tracerPin.release()
            throw error
        }
    }

    func step() throws(EngineError) {
        switch state {
        case .preflight:
            refreezeAt = nil
            if transientRefusals == 0 { timeline.record(.started, at: clock.now()) }
            do { try Preflight.check(victimProcessID, allowingTree: strategy.migratesTrees) } catch {
                guard Self.isTransient(error), transientRefusals < Self.freezeRetryLimit else { throw .checkpoint(error) }
                waitBeforeTryingAgain(refusal: error, after: "the preflight")
                return
            }
            // Out of the downtime: smaps is slow to read and its flags do not change while the mappings do not;
            // the victim's guard (a fork: milliseconds) is started here too.
            mappingFlags = StateReader.mappingFlags(victimProcessID)
            do { try Preflight.checkAdvice(mappingFlags?.flaggedMappings ?? [], processID: victimProcessID) } catch { throw .checkpoint(error) }
            do { preparedGuard = try SourceGuard(victim: victimProcessID) } catch { throw .checkpoint(.system(victimProcessID, "starting its guard: \(error)")) }
            let estimatedPageCount: Int
            do {
                estimatedPageCount = strategy.migratesTrees ? try TreePreflight.estimatedDirtyPageCount(root: victimProcessID)
                    : try Preflight.estimatedDirtyPageCount(victimProcessID)
            } catch { throw .checkpoint(error) }
            // The victim still runs and may touch more pages before the freeze: leave a margin.
            let plannedPageCount = estimatedPageCount + estimatedPageCount / 8 + 256
            guard strategy.usesFAM else {
                state = .freeze
                return
            }
            do {
                backend = try makeBackend(ImageLayout.byteCount(metadataByteCount: Self.metadataAllowanceByteCount,
                                                                pageCount: plannedPageCount))
            } catch { throw .image(error) }
            state = .freeze
        case .freeze:
            refreezeAt = nil
            timeline.record(.freezeRequested, at: clock.now())
            tracerPin.pin(near: victimProcessID)
            do {
                victim = try FrozenTree.freeze(victimProcessID, allowingChildren: strategy.migratesTrees, rootGuard: preparedGuard)
            } catch { throw .checkpoint(error) }
            preparedGuard = nil
            timeline.record(.frozen, at: clock.now())
            logger.debug("victim frozen", metadata: ["pid": "\(victimProcessID)"])
            state = .capture
        case .capture:
            guard let victim else { preconditionFailure("capture without a frozen victim") }
            let captured: ProcessState
            do {
                captured = try victim.capture(mappingFlags: mappingFlags)
                pageAddresses = try victim.dirtyPageAddresses(state: captured)
            } catch {
                guard Self.isTransient(error), transientRefusals < Self.freezeRetryLimit else { throw .checkpoint(error) }
                letGoForAnotherFreeze(victim, refusal: error)
                return
            }
            checkpointedState = captured
            timeline.record(.captured, at: clock.now())
            let oracleStart = clock.now()
            do { try observer?.victimFrozen(processID: victimProcessID, state: captured, pageAddresses: pageAddresses) } catch {
                throw .aborted("freeze oracle: \(error)")
            }
            // The oracles' own reading is not part of the migration: reports subtract it.
            timeline.add(nanoseconds(clock.now() - oracleStart), to: MigrationTimeline.freezeOracleNanoseconds)
            state = .writeMetadata
        case .writeMetadata:
            guard let captured = checkpointedState else { preconditionFailure("metadata before capture") }
            try strategy.writeMetadata(self, state: captured, metadata: captured.encoded())
            // The dump that follows uses every CPU (and the nonlive pipeline a thread of its own).
            tracerPin.release()
            state = pageAddresses.isEmpty ? .commit : .dumping(nextSlot: 0)
        case .dumping(let nextSlot):
            let progress: DumpProgress
            if let slots = unsealed {
                seal(slots)
                progress = strategy.sealed(self, slots: slots)
            } else {
                progress = try strategy.dump(self, nextSlot: nextSlot)
            }
            switch progress {
            case .stay: break
            case .next(let slot): state = .dumping(nextSlot: slot)
            case .done: state = .commit
            }
        case .commit:
            if writer != nil {
                observer?.imageWillCommit()
                // Before the commit record a dead source leaves the victim running on; after it, dead.
                victim?.committing()
                writer!.commit()
                victim?.committed()
                observer?.imageCommitted()
            } else if let transport {
                // postcopy-socket has no commit record: the process becomes the target's when the target
                // hears this `complete` (it keeps its watchdog armed until then). From here until it says
                // it holds the process, a dead source leaves the victim stopped: which copy lives is not
                // known here.
                observer?.imageWillCommit()
                victim?.committing()
                handOverSince = clock.now()
                do { try transport.send(.complete(generation: generation)) } catch {
                    throw .aborted("handing the process over to the target: \(error)")
                }
                state = .handingOver
                return
            }
            timeline.record(.dumpCommitted, at: clock.now())
            state = .release
        case .handingOver:
            guard try strategy.handedOver(self) else { return }
            victim?.committed()
            observer?.imageCommitted()
            handOverSince = nil
            timeline.record(.dumpCommitted, at: clock.now())
            state = .release
        case .release:
            victim?.release(kill: release == .kill)
            for problem in victim?.reinstateProblems ?? [] { logger.warning("\(problem)") }
            timeline.record(.victimReleased, at: clock.now())
            // The target may already be gone (it finished): nobody needs to hear it then. (postcopy-socket
            // said it before the release.)
            if writer != nil { try? transport?.send(.complete(generation: generation)) }
            state = .finished
        case .finished, .failed:
            preconditionFailure("Dumper cannot step while \(state)")
        }
    }

    /// First step of a batch: the pages go from the victim into their FAM slots, not yet durable.
    func copy(_ slots: Range<Int>) throws(EngineError) {
        do {
            if let processIDs = victim?.processIDsByOrdinal, processIDs.count > 1 {
                // A tree's batch may hold pages of several processes: each run is read from its own.
                try copyTreePages(slots, processIDsByOrdinal: processIDs)
            } else if writer!.slotsBeingCopied == slots {
                // The nonlive pipeline began this batch while sealing the one before.
                try writer!.finishCopyingPages()
            } else {
                try writer!.copyPagesFromProcess(processID: victimProcessID, slots: slots)
            }
        } catch {
            throw .fam("dumping pages \(slots) of pid \(victimProcessID): \(error)")
        }
        unsealed = slots
    }

    /// Second step: the writer seals the batch (flush, fence, marks: `ImageWriter.seal`).
    func seal(_ slots: Range<Int>) {
        if strategy.pipelinesCopies, slots.upperBound < pageAddresses.count, writer!.slotsBeingCopied == nil,
           (victim?.processIDsByOrdinal.count ?? 1) <= 1 {
            // The next batch is read from the victim while this one is sealed: the real backend copies on
            // a thread of its own, so process_vm_readv and the flushes and digests use both cores (a model
            // copies at once). The next `copy` step waits for it.
            writer!.startCopyingPagesFromProcess(processID: victimProcessID,
                                                 slots: slots.upperBound..<min(slots.upperBound + batchPageCount, pageAddresses.count))
        }
        // Coded before the flush, while the lines are still in this CPU's cache (and the next batch is read).
        writer!.codeAhead(slots: slots)
        writer!.seal(slots: slots)
        timeline.add(slots.count, to: "pagesDumped")
        unsealed = nil
    }

    /// The image of the metadata in FAM (the FAM made again at the exact size when the victim outgrew
    /// the estimate), `beforeCommit` (pages dumped before the metadata commit), then the metadata commit.
    func createImage(metadata: [UInt8], beforeCommit: (inout ImageWriter) throws(SyscallError) -> Void) throws(EngineError) {
        var earlyFailure: SyscallError?
        do {
            guard var backend else { preconditionFailure("metadata before the FAM was created") }
            // The victim ran on between the estimate and the freeze: a program that grows fast (or
            // a slow machine) outruns any margin. The frozen size is exact; make the FAM again.
            let needed = ImageLayout.byteCount(metadataByteCount: metadata.count, pageCount: pageAddresses.count)
            if backend.byteCount < needed {
                logger.debug("FAM estimate too small", metadata: ["bytes": "\(backend.byteCount)", "needed": "\(needed)"])
                self.backend = nil
                backend = try makeBackend(needed)
                self.backend = backend
            }
            var newWriter = try ImageWriter.create(backend: backend, generation: generation, metadata: metadata,
                                                   pageAddresses: pageAddresses, key: key, imageIdentity: imageIdentity, creator: creator)
            do throws(SyscallError) { try beforeCommit(&newWriter) } catch { earlyFailure = error }
            // Kept also after a failure, so that the abort withdraws the image.
            if earlyFailure == nil { newWriter.commitMetadata() }
            writer = newWriter
        } catch { throw .image(error) }
        if let earlyFailure { throw .fam("dumping the pages the target needs before it resumes: \(earlyFailure)") }
        timeline.record(.metadataCommitted, at: clock.now())
    }

    /// What a freeze finds that the preflight did not see, and may not find a moment later: a descriptor
    /// opened and closed again each round, a mapping made for a moment.
    static func isTransient(_ error: CheckpointError) -> Bool {
        switch error {
        case .unsupportedDescriptor, .unsupportedMapping: true
        default: false
        }
    }

    /// Undoes the freeze as an abort before the commit does (nothing was written anywhere: the victim
    /// is detached, its sockets reinstated, its guard disarmed, and it runs on), then waits before the
    /// next freeze, a scheduled step (`nextAction` waits on the clock), with a fresh guard started meanwhile.
    private func letGoForAnotherFreeze(_ frozen: FrozenTree, refusal: CheckpointError) {
        frozen.release(kill: false)
        for problem in frozen.reinstateProblems { logger.warning("\(problem)") }
        victim = nil
        tracerPin.release()
        timeline.forget([.freezeRequested, .frozen])
        waitBeforeTryingAgain(refusal: refusal, after: "the freeze")
        preparedGuard = try? SourceGuard(victim: victimProcessID)
        state = .freeze
    }

    /// Counts a transient refusal and sets when the step that found it runs again (the wait doubles).
    private func waitBeforeTryingAgain(refusal: CheckpointError, after step: String) {
        transientRefusals += 1
        timeline.add(1, to: "freezeRetries")
        let delay = Self.firstRefreezeDelay * (1 << (transientRefusals - 1))
        logger.info("trying again: \(step) found what may be gone a moment later", metadata: [
            "pid": "\(victimProcessID)", "try": "\(transientRefusals)", "refusal": "\(refusal)"])
        refreezeAt = clock.now() + delay
    }

    /// The source node died (torture's nemesis): the victim is left as the kernel and the guard leave
    /// a dead tracer's victim (FrozenVictim.loseTracer): as it was before the freeze (stopped, without
    /// `resume`) before the commit record, killed after it. Nothing else of this node is cleaned up.
    package func loseTracer(resume: Bool = true) {
        victim?.loseTracer(resume: resume)
        state = .failed
    }

    /// Before the commit the victim is resumed untouched and the image withdrawn; after it the victim is
    /// released as planned (its memory already lives in FAM).
    public func abort(reason: String) {
        logger.info("dumper aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        defer { tracerPin.release() }
        if writer?.phase != .complete { writer?.abort() }
        let committed = writer?.phase == .complete
        if handOverSince != nil, let victim {
            // The target was told it holds the process and did not say it took it: it may run it, or have
            // died with it. Neither running on nor killed: stopped, for whoever knows to decide.
            victim.leaveStopped()
            logger.error("the victim is left stopped: the target was handed the process and did not confirm it", metadata: ["pid": "\(victimProcessID)"])
            handOverSince = nil
            state = .failed
            return
        }
        victim?.release(kill: committed && release == .kill)
        for problem in victim?.reinstateProblems ?? [] { logger.warning("\(problem)") }
        state = .failed
    }
}
