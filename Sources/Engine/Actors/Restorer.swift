// The target node's restorer for a complete image (nonlive): waits for the commit, opens and verifies
// the image, starts the stub with the victim's PID, rebuilds the layout, installs every page from FAM,
// restores the rest of the state, lets the oracles look, and lets the process run.
import Logging
import Sys

public final class Restorer: EngineActor {
    private enum State: CustomStringConvertible {
        case waitingForImage, spawn, layout, installing(nextSlot: Int), restoreState, prepare, resume, finished, failed
        var description: String {
            switch self {
            case .waitingForImage: "wait for image"
            case .spawn: "spawn"
            case .layout: "layout"
            case .installing(let nextSlot): "install from slot \(nextSlot)"
            case .restoreState: "restore state"
            case .prepare: "prepare"
            case .resume: "resume"
            case .finished: "finished"
            case .failed: "failed"
            }
        }
    }

    public let name = "restorer"
    private let openBackend: () throws(ImageError) -> (any FAMBackend)?
    private let stubPath: String
    private let batchPageCount: Int
    private let observer: (any MigrationObserver)?
    private let clock: any EngineClock
    private let timeline: MigrationTimeline
    private let logger: Logger
    private let processIDWait: Duration
    private let pidNamespace: PIDNamespace

    private var state = State.waitingForImage
    private var reader: ImageReader?
    public private(set) var checkpointedState: ProcessState?
    private var target: TargetProcess?
    private var spawnFirstTried: Duration?
    public private(set) var restoredProcessID: ProcessID?
    public private(set) var installedPageCount = 0

    /// `openBackend()` returns the FAM holding the image, or nil while it does not exist yet.
    public init(openBackend: @escaping () throws(ImageError) -> (any FAMBackend)?, stubPath: String, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline,
                logger: Logger, processIDWait: Duration = .seconds(5), pidNamespace: PIDNamespace = .shared) {
        self.pidNamespace = pidNamespace
        self.openBackend = openBackend
        self.stubPath = stubPath
        self.batchPageCount = batchPageCount
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.logger = logger
        self.processIDWait = processIDWait
    }

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: return .finished
        case .waitingForImage:
            guard let backend = try? openBackend() else { return .waiting(.retryAfter(.microseconds(200))) }
            guard let imageState = ImageReader.peekState(backend: backend), imageState != .creating,
                  imageState != .metadataCommitted else {
                return .waiting(.retryAfter(.microseconds(200)))
            }
            return .ready(state.description)
        case .spawn:
            if let spawnFirstTried, clock.now() - spawnFirstTried < .milliseconds(2) { return .waiting(.retryAfter(.microseconds(500))) }
            return .ready(state.description)
        default: return .ready(state.description)
        }
    }

    public func perform() throws(EngineError) {
        do {
            try step()
        } catch {
            state = .failed
            target?.kill()
            throw error
        }
    }

    private func step() throws(EngineError) {
        switch state {
        case .waitingForImage:
            do {
                guard let backend = try openBackend() else { preconditionFailure("ready without a backend") }
                let opened = try ImageReader.open(backend: backend, requireComplete: true)
                checkpointedState = try ProcessState.decode(opened.metadata)
                try checkpointedState!.validate(pageAddresses: opened.pageAddresses, path: opened.path)
                reader = opened
            } catch { throw .image(error) }
            timeline.record(.restoreStarted, at: clock.now())
            state = .spawn
        case .spawn:
            do {
                target = try TargetProcess.spawn(state: checkpointedState!, stubPath: stubPath, pidNamespace: pidNamespace)
            } catch .processIDInUse(let processID) {
                // The victim may not be reaped yet: retry for a while before giving up.
                let now = clock.now()
                if spawnFirstTried == nil { spawnFirstTried = now }
                if now - spawnFirstTried! > processIDWait { throw .restore(.processIDInUse(processID)) }
                spawnFirstTried = spawnFirstTried ?? now
                return
            } catch { throw .restore(error) }
            restoredProcessID = target!.processID
            state = .layout
        case .layout:
            do { try target!.buildLayout(checkpointedState!) } catch { throw .restore(error) }
            state = reader!.pageCount == 0 ? .restoreState : .installing(nextSlot: 0)
        case .installing(let nextSlot):
            let reader = reader!
            let slots = nextSlot..<min(nextSlot + batchPageCount, reader.pageCount)
            // Write runs of pages that are adjacent both in the victim and in FAM with one pwrite each.
            var runStart = slots.lowerBound
            for slot in slots {
                let runEnds = slot + 1 == slots.upperBound
                    || reader.pageAddresses[slot + 1] != reader.pageAddresses[slot] + UInt64(ImageLayout.pageSize)
                guard runEnds else { continue }
                do {
                    let newlyInstalled = try target!.writePages(from: reader.backend.readableMapping, at: reader.pageOffset(slot: runStart),
                                           byteCount: (slot + 1 - runStart) * ImageLayout.pageSize,
                                           to: reader.pageAddresses[runStart])
                    // In a nonlive restore nothing else installs pages: every page must be new.
                    precondition(newlyInstalled == slot + 1 - runStart, "page run at \(hex(reader.pageAddresses[runStart])) was partly present already")
                } catch { throw .restore(error) }
                runStart = slot + 1
            }
            installedPageCount += slots.count
            state = slots.upperBound == reader.pageCount ? .restoreState : .installing(nextSlot: slots.upperBound)
        case .restoreState:
            precondition(installedPageCount == reader!.pageCount,
                         "\(reader!.pageCount - installedPageCount) dumped pages not installed")
            timeline.record(.lastPageInstalled, at: clock.now())
            do {
                try target!.finishInstalling()
                try target!.restoreState(checkpointedState!)
            } catch { throw .restore(error) }
            state = .prepare
        case .prepare:
            do {
                let restored = try target!.prepareToResume(checkpointedState!)
                let oracleStart = clock.now()
                defer { timeline.add(nanoseconds(clock.now() - oracleStart), to: MigrationTimeline.targetOracleNanoseconds) }
                try observer?.targetReady(processID: target!.processID, checkpointed: checkpointedState!, restored: restored)
            } catch let error as RestoreError {
                throw .restore(error)
            } catch {
                throw .restore(.oracle("\(error)"))
            }
            state = .resume
        case .resume:
            do { try target!.resume() } catch { throw .restore(error) }
            timeline.record(.targetResumed, at: clock.now())
            state = .finished
        case .finished, .failed:
            preconditionFailure("Restorer cannot step while \(state)")
        }
    }

    public func abort(reason: String) {
        logger.info("restorer aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        target?.kill()
        state = .failed
    }
}
