// The source node's dumper: refuses what it cannot migrate while the victim still runs, freezes it,
// reads its state, writes metadata and then pages into the FAM image in batches, commits, and releases
// the victim. One step per call, so a driver can interleave it with every other actor.
import Logging
import Sys

public final class Dumper: EngineActor {
    public enum Release: Sendable { case kill, leaveRunning }

    private enum State: CustomStringConvertible {
        case preflight, freeze, capture, writeMetadata, dumping(nextSlot: Int), commit, release, finished, failed
        var description: String {
            switch self {
            case .preflight: "preflight"
            case .freeze: "freeze"
            case .capture: "capture"
            case .writeMetadata: "writeMetadata"
            case .dumping(let nextSlot): "dump from slot \(nextSlot)"
            case .commit: "commit"
            case .release: "release"
            case .finished: "finished"
            case .failed: "failed"
            }
        }
    }

    public let name = "dumper"
    public let victimProcessID: ProcessID
    private let makeBackend: (Int) throws(ImageError) -> any FAMBackend
    private let generation: UInt64
    private let release: Release
    private let batchPageCount: Int
    private let observer: (any MigrationObserver)?
    private let clock: any EngineClock
    private let timeline: MigrationTimeline
    private let logger: Logger

    private var state = State.preflight
    private var victim: FrozenVictim?
    public private(set) var checkpointedState: ProcessState?
    private var pageAddresses: [UInt64] = []
    private var writer: ImageWriter?
    private var backend: (any FAMBackend)?
    /// Room for the metadata region in the pre-sized FAM (a process state is a few KiB; filters and
    /// the VMA table of a big process stay far below this).
    static let metadataAllowanceByteCount = 1 << 20

    /// `makeBackend(byteCount)` creates the FAM the image goes to. It is called before the freeze with
    /// an estimate (pages present then, plus a margin), so that allocating and pre-faulting the FAM
    /// file is not part of the downtime.
    public init(victim: ProcessID, makeBackend: @escaping (Int) throws(ImageError) -> any FAMBackend,
                generation: UInt64, release: Release, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline, logger: Logger) {
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

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: .finished
        default: .ready(state.description)
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

    private func step() throws(EngineError) {
        switch state {
        case .preflight:
            timeline.record(.started, at: clock.now())
            do { try Preflight.check(victimProcessID) } catch { throw .checkpoint(error) }
            let estimatedPageCount: Int
            do {
                estimatedPageCount = try Preflight.estimatedDirtyPageCount(victimProcessID)
            } catch { throw .checkpoint(error) }
            // The victim still runs and may touch more pages before the freeze: leave a margin.
            let plannedPageCount = estimatedPageCount + estimatedPageCount / 8 + 256
            do {
                backend = try makeBackend(ImageLayout.byteCount(metadataByteCount: Self.metadataAllowanceByteCount,
                                                                pageCount: plannedPageCount))
            } catch { throw .image(error) }
            state = .freeze
        case .freeze:
            timeline.record(.freezeRequested, at: clock.now())
            do { victim = try FrozenVictim.freeze(victimProcessID) } catch { throw .checkpoint(error) }
            timeline.record(.frozen, at: clock.now())
            logger.debug("victim frozen", metadata: ["pid": "\(victimProcessID)"])
            state = .capture
        case .capture:
            guard let victim else { preconditionFailure("capture without a frozen victim") }
            let captured: ProcessState
            do {
                captured = try victim.capture()
                pageAddresses = try victim.dirtyPageAddresses(mappings: captured.mappings)
            } catch { throw .checkpoint(error) }
            checkpointedState = captured
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
            do {
                guard let backend else { preconditionFailure("metadata before the FAM was created") }
                var newWriter = try ImageWriter.create(backend: backend, generation: generation, metadata: metadata,
                                                       pageAddresses: pageAddresses)
                newWriter.commitMetadata()
                writer = newWriter
            } catch { throw .image(error) }
            timeline.record(.metadataCommitted, at: clock.now())
            state = pageAddresses.isEmpty ? .commit : .dumping(nextSlot: 0)
        case .dumping(let nextSlot):
            let slots = nextSlot..<min(nextSlot + batchPageCount, pageAddresses.count)
            do { try writer!.dumpPages(processID: victimProcessID, slots: slots) } catch {
                throw .fam("dumping pages \(slots) of pid \(victimProcessID): \(error)")
            }
            timeline.add(slots.count, to: "pagesDumped")
            state = slots.upperBound == pageAddresses.count ? .commit : .dumping(nextSlot: slots.upperBound)
        case .commit:
            writer!.commit()
            timeline.record(.dumpCommitted, at: clock.now())
            state = .release
        case .release:
            victim?.release(kill: release == .kill)
            timeline.record(.victimReleased, at: clock.now())
            state = .finished
        case .finished, .failed:
            preconditionFailure("Dumper cannot step while \(state)")
        }
    }

    /// Before the commit the victim is resumed untouched and the image withdrawn; after it the victim is
    /// released as planned (its memory already lives in FAM).
    public func abort(reason: String) {
        logger.info("dumper aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        if writer?.phase != .complete { writer?.abort() }
        let committed = writer?.phase == .complete
        victim?.release(kill: committed && release == .kill)
        state = .failed
    }
}
