// The source node's dumper: refuses what it cannot migrate while the victim still runs, freezes it,
// reads its state, writes metadata and then pages into the FAM image in batches, commits, and releases
// the victim. One step per call, so a driver can interleave it with every other actor.
import Logging
import Sys

public final class Dumper: EngineActor {
    public enum Release: Sendable { case kill, leaveRunning }

    enum State {
        case preflight, freeze, capture, writeMetadata, dumping(nextSlot: Int), commit, release, finished, failed
        /// The step this state takes (nil once it ended).
        var step: DumperStep? {
            switch self {
            case .preflight: .preflight
            case .freeze: .freeze
            case .capture: .capture
            case .writeMetadata: .writeMetadata
            case .dumping(let nextSlot): .dump(fromSlot: nextSlot)
            case .commit: .commit
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
    let mode: DumpMode
    /// Authenticates the image; never stored in it.
    let key: MigrationKey
    /// Recorded in the image: this node's user and capabilities, which a restore never exceeds.
    let creator: ImageCreator

    var state = State.preflight
    var victim: FrozenTree?
    public internal(set) var checkpointedState: ProcessState?
    var pageAddresses: [UInt64] = []
    /// Read before the freeze, for the capture.
    var mappingFlags: StateReader.MappingFlags?
    var writer: ImageWriter?
    var backend: (any FAMBackend)?
    /// Post-copy: slots the target asked for, served before the background order.
    var prioritySlots: [Int] = []
    /// Post-copy: the background order's next candidate slot.
    var backgroundCursor = 0
    /// A batch copied into FAM whose flush, fence and marks are the next step (two steps per batch, so a
    /// driver can run the target while pages sit in FAM unmarked).
    var unsealed: Range<Int>?
    /// postcopy-socket: which pages went over the socket.
    var sent: [Bool] = []
    var sentPageCount = 0
    var targetDone = false
    /// postcopy-socket flow: bytes of `pages` sent, and how many of them the target says it took in.
    /// Pushing stops while more than `pushWindowByteCount` are unacknowledged, so an answer to a fault
    /// never waits behind more than that in the connection.
    var sentPageByteCount: UInt64 = 0
    var acknowledgedPageByteCount: UInt64 = 0
    /// Pages per push message: doubles with every acknowledgement that comes while no request does, and
    /// halves with every step that brings requests (while the target faults, its answers must not queue
    /// behind big pushes; under a steady stream of faults it settles where the two balance, instead of
    /// starving the push); growing only on acknowledgements keeps it at what the target takes in.
    lazy var pushChunkPageCount = minimumPushChunkPageCount
    var minimumPushChunkPageCount: Int { min(32, batchPageCount) }
    /// Three chunks in flight: one being installed, one on the wire, one being read from the victim.
    var pushWindowByteCount: UInt64 { UInt64(3 * pushChunkPageCount * .pageSize) }
    /// Full when one more chunk would not fit.
    var pushWindowIsFull: Bool {
        sentPageByteCount - acknowledgedPageByteCount + UInt64(pushChunkPageCount * .pageSize) > pushWindowByteCount
    }
    /// Room for the metadata region in the pre-sized FAM (a process state is a few KiB; filters and
    /// the VMA table of a big process stay far below this).
    static let metadataAllowanceByteCount = 1 << 20

    /// `makeBackend(byteCount)` creates the FAM the image goes to. It is called before the freeze with
    /// an estimate (pages present then, plus a margin), so that allocating and pre-faulting the FAM
    /// file is not part of the downtime. When the victim touched more pages than that before it froze,
    /// it is called once more with the exact size, and must then replace what it made the first time.
    /// `key` is the migration's key, made by the source (`MigrationKey.generate`) and handed to the
    /// target out of band.
    public init(victim: ProcessID, makeBackend: @escaping (Int) throws(ImageError) -> any FAMBackend,
                generation: UInt64, key: MigrationKey, release: Release, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline, logger: Logger,
                mode: DumpMode = .nonlive) {
        self.mode = mode
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

    /// Nonlive migrates the victim's whole process tree; post-copy refuses a victim with children.
    var migratesTrees: Bool {
        if case .nonlive = mode { true } else { false }
    }

    var transport: (any Transport)? {
        switch mode {
        case .nonlive: nil
        case .postcopyFAM(let transport), .postcopySocket(let transport, _): transport
        }
    }

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: return .finished
        case .dumping:
            // Without pushing (or with every page pushed), a socket source only answers: wait for the
            // target's next request, or its word that it needs nothing more.
            if case .postcopySocket(let transport, let push) = mode, prioritySlots.isEmpty, !everyPageAcknowledged,
               !push || sentPageCount == pageAddresses.count || pushWindowIsFull, !transport.waitReadable(timeoutMilliseconds: 0) {
                guard let descriptor = transport.readableDescriptor else { return .waiting(.retryAfter(.microseconds(100))) }
                return .waiting(.readable([descriptor], timeout: .milliseconds(5)))
            }
            if let unsealed { return .ready(.dumper(.seal(slots: unsealed))) }
            return state.step.map { .ready(.dumper($0)) } ?? .finished
        default: return state.step.map { .ready(.dumper($0)) } ?? .finished
        }
    }

    public func perform() throws(EngineError) {
        do {
            try step()
        } catch {
            state = .failed
            throw error
        }
    }

    func step() throws(EngineError) {
        switch state {
        case .preflight:
            timeline.record(.started, at: clock.now())
            do { try Preflight.check(victimProcessID, allowingTree: migratesTrees) } catch { throw .checkpoint(error) }
            // Out of the downtime: smaps is slow to read and its flags do not change while the mappings do not.
            mappingFlags = StateReader.mappingFlags(victimProcessID)
            let estimatedPageCount: Int
            do {
                estimatedPageCount = migratesTrees ? try TreePreflight.estimatedDirtyPageCount(root: victimProcessID)
                    : try Preflight.estimatedDirtyPageCount(victimProcessID)
            } catch { throw .checkpoint(error) }
            // The victim still runs and may touch more pages before the freeze: leave a margin.
            let plannedPageCount = estimatedPageCount + estimatedPageCount / 8 + 256
            if case .postcopySocket = mode {
                state = .freeze
                return
            }
            do {
                backend = try makeBackend(ImageLayout.byteCount(metadataByteCount: Self.metadataAllowanceByteCount,
                                                                pageCount: plannedPageCount))
            } catch { throw .image(error) }
            state = .freeze
        case .freeze:
            timeline.record(.freezeRequested, at: clock.now())
            do { victim = try FrozenTree.freeze(victimProcessID, allowingChildren: migratesTrees) } catch { throw .checkpoint(error) }
            timeline.record(.frozen, at: clock.now())
            logger.debug("victim frozen", metadata: ["pid": "\(victimProcessID)"])
            state = .capture
        case .capture:
            guard let victim else { preconditionFailure("capture without a frozen victim") }
            let captured: ProcessState
            do {
                captured = try victim.capture(mappingFlags: mappingFlags)
                pageAddresses = try victim.dirtyPageAddresses(state: captured)
            } catch { throw .checkpoint(error) }
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
            let metadata = captured.encoded()
            if case .postcopySocket(let transport, _) = mode {
                do { try transport.send(.metadata(state: metadata, pageAddresses: pageAddresses)) } catch {
                    throw .aborted("sending the process state to the target: \(error)")
                }
                sent = [Bool](repeating: false, count: pageAddresses.count)
                timeline.record(.metadataCommitted, at: clock.now())
                state = pageAddresses.isEmpty ? .commit : .dumping(nextSlot: 0)
                return
            }
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
                                                       pageAddresses: pageAddresses, key: key, creator: creator)
                if case .postcopyFAM = mode {
                    // Marked before the metadata commit, so a target finds them there at once instead of
                    // asking for them and waiting for this node within its downtime.
                    let early = Self.slotsNeededBeforeResume(captured, pageAddresses: pageAddresses)
                    do throws(SyscallError) {
                        for run in early { try newWriter.dumpPages(processID: victimProcessID, slots: run) }
                        timeline.add(early.reduce(0) { $0 + $1.count }, to: "pagesDumped")
                    } catch { earlyFailure = error }
                }
                // Kept also after a failure, so that the abort withdraws the image.
                if earlyFailure == nil { newWriter.commitMetadata() }
                writer = newWriter
            } catch { throw .image(error) }
            if let earlyFailure { throw .fam("dumping the pages the target needs before it resumes: \(earlyFailure)") }
            timeline.record(.metadataCommitted, at: clock.now())
            if case .postcopyFAM(let transport) = mode {
                do { try transport.send(.metadataCommitted(generation: generation)) } catch {
                    throw .aborted("telling the target the metadata is committed: \(error)")
                }
            }
            state = pageAddresses.isEmpty ? .commit : .dumping(nextSlot: 0)
        case .dumping(let nextSlot):
            if let slots = unsealed {
                try seal(slots)
                if case .nonlive = mode {
                    state = slots.upperBound == pageAddresses.count ? .commit : .dumping(nextSlot: slots.upperBound)
                } else if writer!.markedPageCount == pageAddresses.count {
                    state = .commit
                }
                return
            }
            switch mode {
            case .nonlive: break
            case .postcopyFAM(let transport):
                try dumpPostcopy(transport: transport, backgroundBatchPageCount: min(batchPageCount, 64))
                return
            case .postcopySocket(let transport, let push):
                try servePages(transport: transport, push: push)
                return
            }
            try copy(nextSlot..<min(nextSlot + batchPageCount, pageAddresses.count))
        case .commit:
            if writer != nil { observer?.imageWillCommit() }
            writer?.commit()
            if writer != nil { observer?.imageCommitted() }
            timeline.record(.dumpCommitted, at: clock.now())
            state = .release
        case .release:
            victim?.release(kill: release == .kill)
            for problem in victim?.reinstateProblems ?? [] { logger.warning("\(problem)") }
            timeline.record(.victimReleased, at: clock.now())
            // The target may already be gone (it finished): nobody needs to hear it then.
            try? transport?.send(.complete(generation: generation))
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
    func seal(_ slots: Range<Int>) throws(EngineError) {
        if case .nonlive = mode, slots.upperBound < pageAddresses.count, writer!.slotsBeingCopied == nil,
           (victim?.processIDsByOrdinal.count ?? 1) <= 1 {
            // The next batch is read from the victim while this one is sealed: the real backend copies on
            // a thread of its own, so process_vm_readv and the flushes and digests use both cores (a model
            // copies at once). The next `copy` step waits for it.
            writer!.startCopyingPagesFromProcess(processID: victimProcessID,
                                                 slots: slots.upperBound..<min(slots.upperBound + batchPageCount, pageAddresses.count))
        }
        writer!.seal(slots: slots)
        timeline.add(slots.count, to: "pagesDumped")
        unsealed = nil
    }

    /// postcopy-socket: every page went out and the target took in every byte sent: nothing it could
    /// still ask for (a page it lost is asked for before it acknowledges the message that brought it).
    var everyPageAcknowledged: Bool {
        sentPageCount == pageAddresses.count && acknowledgedPageByteCount == sentPageByteCount && prioritySlots.isEmpty
    }

    /// Before the commit the victim is resumed untouched and the image withdrawn; after it the victim is
    /// released as planned (its memory already lives in FAM).
    public func abort(reason: String) {
        logger.info("dumper aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        if writer?.phase != .complete { writer?.abort() }
        let committed = writer?.phase == .complete
        victim?.release(kill: committed && release == .kill)
        for problem in victim?.reinstateProblems ?? [] { logger.warning("\(problem)") }
        state = .failed
    }
}
