// The target node's restorer, one lifecycle for every mode: waits for the image (or the socket's state),
// opens and verifies it, starts the stub with the victim's PID, rebuilds the layout, lets its mode's page
// strategy (TargetPageStrategy: eager install, lazy handover from FAM or the socket) put the pages in or
// hand the memory over, restores the rest of the state, lets the oracles look, and lets the process run.
import Logging
import Synchronization
import Sys

public final class Restorer: EngineActor {
    enum State {
        case waitingForImage, spawn, layout, installing(nextSlot: Int), eagerPages, restoreState, prepare, resume, finished, failed
        /// The step this state takes (nil once it ended).
        var step: RestorerStep? {
            switch self {
            case .waitingForImage: .openImage
            case .spawn: .spawn
            case .layout: .layout
            case .installing(let nextSlot): .install(fromSlot: nextSlot)
            case .eagerPages: .installKernelTouchedPages
            case .restoreState: .restoreState
            case .prepare: .prepare
            case .resume: .resume
            case .finished, .failed: nil
            }
        }
    }

    public let name = "restorer"
    let openBackend: () throws(ImageError) -> (any FAMBackend)?
    let stubPath: String
    let batchPageCount: Int
    let observer: (any MigrationObserver)?
    let clock: any EngineClock
    let timeline: MigrationTimeline
    let logger: Logger
    let processIDWait: Duration
    let pidNamespace: PIDNamespace
    /// What this mode does with the pages.
    let strategy: any TargetPageStrategy
    /// Whether the registered memory was checked for pages nobody of ours installed (the first page step
    /// after the layout does it, in every mode: TargetProcess.checkStrayPages).
    public var strayPagesChecked: Bool { target?.strayPagesChecked ?? false }
    let gate: any TargetGate
    let imageWait: Duration
    /// When this restorer was made: it looks for the image often at first, then less (`imagePollInterval`).
    let createdAt: Duration
    /// The longest the pages needed before the resume may take to come (MigrationPlan.stallTimeout).
    let stallTimeout: Duration
    /// MigrationPlan.targetLease: started on the watchdogs as lazy memory is made, before the process runs.
    let lease: Duration?
    /// When the restorer began waiting for them.
    var pagesBeforeResumeSince: Duration?
    /// The migration's key: every image is authenticated with it before anything in it is used.
    let key: MigrationKey
    /// The image must carry it (MigrationPlan.imageIdentity).
    let imageIdentity: [UInt8]?

    var state = State.waitingForImage
    var reader: ImageReader?
    var pageAddresses: [UInt64] = []
    public internal(set) var checkpointedState: ProcessState?
    /// The files the access check resolved, held until the descriptors are restored from them.
    var checkedFiles = CheckedFiles()
    var target: TargetTree?
    var spawnFirstTried: Duration?
    public internal(set) var restoredProcessID: ProcessID?
    public internal(set) var installedPageCount = 0
    let handedOver = Mutex<LazyMemory?>(nil)
    /// This thread on the target's CPU from its spawn to its resume: the layout and state are rebuilt by
    /// injected syscalls, ptrace round trips (TracerPin). Pinned only after the spawn, so the stub is not
    /// made on one CPU; its threads get the victim's masks in restoreState either way (CPUSet).
    var tracerPin = TracerPin()

    /// The target's memory, once the process runs (post-copy); the fault handler and pusher read it.
    public var lazyMemory: LazyMemory? { handedOver.withLock { $0 } }

    /// `openBackend()` returns the FAM holding the image, or nil while it does not exist yet.
    init(openBackend: @escaping () throws(ImageError) -> (any FAMBackend)?, key: MigrationKey, stubPath: String, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline,
                logger: Logger, processIDWait: Duration = .seconds(5), pidNamespace: PIDNamespace = .shared,
                strategy: any TargetPageStrategy, gate: any TargetGate = ImmediateTargetGate(), imageWait: Duration = .seconds(600),
                stallTimeout: Duration = .seconds(MigrationPlan.defaultStallTimeoutSeconds), imageIdentity: [UInt8]? = nil,
                lease: Duration? = nil) {
        self.stallTimeout = stallTimeout
        self.imageIdentity = imageIdentity
        self.lease = lease
        self.gate = gate
        self.key = key
        self.imageWait = imageWait
        self.createdAt = clock.now()
        self.pidNamespace = pidNamespace
        self.openBackend = openBackend
        self.stubPath = stubPath
        self.batchPageCount = batchPageCount
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.logger = logger
        self.processIDWait = processIDWait
        self.strategy = strategy
    }

    var transport: (any Transport)? { strategy.transport }

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: return .finished
        case .waitingForImage:
            if imageAvailable() { return .ready(.restorer(.openImage)) }
            if clock.now() > imageWait { return .ready(.restorer(.giveUpWaiting)) }
            if strategy.sourceSpokeFirst { return .ready(.restorer(.readSourceWord)) }
            // The source's word (metadataCommitted, the process state, an abort, its hang-up) wakes this
            // thread at once; FAM is looked at again when it does, or after the timeout (a mode without
            // a link, or a peer whose word never comes: the image may still be committed in FAM).
            if let descriptor = strategy.transport?.readableDescriptor {
                return .waiting(.readable([descriptor], timeout: .milliseconds(2)))
            }
            return .waiting(.retryAfter(imagePollInterval))
        case .spawn:
            if let spawnFirstTried, clock.now() - spawnFirstTried < .milliseconds(2) { return .waiting(.retryAfter(.microseconds(500))) }
            return readyStep
        case .eagerPages:
            if let since = pagesBeforeResumeSince, clock.now() - since > stallTimeout { return readyStep }
            return strategy.waitingForPagesBeforeResume(self) ?? readyStep
        default: return readyStep
        }
    }

    /// How long a restorer without a link waits before it looks at FAM again: 200 us for the first 10 ms,
    /// then 1 ms. A nonlive target waits out the whole dump, and on a machine it shares with the source
    /// (two cores here) waking 5,000 times a second took 13 % of a core from the dump (perf, 512 MiB);
    /// the commit is then seen at most 1 ms late.
    var imagePollInterval: Duration {
        clock.now() - createdAt < .milliseconds(10) ? .microseconds(200) : .milliseconds(1)
    }

    var readyStep: NextAction { state.step.map { .ready(.restorer($0)) } ?? .finished }

    public func perform() throws(EngineError) {
        do {
            try step()
        } catch {
            state = .failed
            tracerPin.release()
            target?.kill()
            throw error
        }
    }

    func step() throws(EngineError) {
        switch state {
        case .waitingForImage:
            if !imageAvailable(), strategy.sourceSpokeFirst {
                try strategy.readSourceWord()
                return
            }
            guard imageAvailable() else {
                throw .timedOut("no usable image or process state from the source within \(imageWait); the source failed or is too slow")
            }
            timeline.record(.imageFound, at: clock.now())
            try openImage()
            timeline.record(.restoreStarted, at: clock.now())
            state = .spawn
        case .spawn:
            if !strategy.restoresTrees, !checkpointedState!.members.isEmpty {
                throw .restore(.layout("the image holds a process tree of \(checkpointedState!.members.count + 1) processes, which restores only nonlive"))
            }
            do {
                target = try TargetTree.spawn(state: checkpointedState!, stubPath: stubPath, pidNamespace: pidNamespace)
            } catch .processIDInUse(let processID) {
                // The victim may not be reaped yet: retry for a while before giving up.
                let now = clock.now()
                if spawnFirstTried == nil { spawnFirstTried = now }
                if now - spawnFirstTried! > processIDWait { throw .restore(.processIDInUse(processID)) }
                return
            } catch { throw .restore(error) }
            restoredProcessID = target!.processID
            tracerPin.pin(near: target!.processID)
            target!.openThrough(checkedFiles, rootProcessID: checkpointedState!.processID)
            timeline.record(.spawned, at: clock.now())
            state = .layout
        case .layout:
            do { try target!.buildLayout(checkpointedState!) } catch { throw .restore(error) }
            timeline.record(.layoutBuilt, at: clock.now())
            state = try strategy.pagesAfterLayout(self)
        case .installing(let nextSlot):
            do { try target!.checkStrayPages() } catch { throw .restore(error) }
            // The nonlive install checks pages on a thread of its own, made from this one: on every CPU.
            tracerPin.release()
            state = try strategy.installBatch(self, from: nextSlot)
        case .eagerPages:
            do { try target!.checkStrayPages() } catch { throw .restore(error) }
            if pagesBeforeResumeSince == nil { pagesBeforeResumeSince = clock.now() }
            if try strategy.installPagesBeforeResume(self) {
                state = .restoreState
            } else if clock.now() - pagesBeforeResumeSince! > stallTimeout {
                throw .stalled("the source did not deliver the pages needed before the resume within \(stallTimeout); no process ran")
            }
        case .restoreState:
            timeline.record(.pagesBeforeResumeInstalled, at: clock.now())
            tracerPin.pin(near: target!.processID)
            do {
                try strategy.finishPagesBeforeState(self)
                try target!.restoreState(checkpointedState!)
            } catch { throw .restore(error) }
            checkedFiles.close()
            timeline.record(.stateRestored, at: clock.now())
            state = .prepare
        case .prepare:
            do {
                let restored = try target!.prepareToResume(checkpointedState!, readBack: observer != nil)
                let oracleStart = clock.now()
                defer { timeline.add(nanoseconds(clock.now() - oracleStart), to: MigrationTimeline.targetOracleNanoseconds) }
                if let observer, let restored {
                    try observer.targetReady(processID: target!.processID, checkpointed: checkpointedState!, restored: restored)
                }
            } catch let error as RestoreError {
                throw .restore(error)
            } catch {
                throw .restore(.oracle("\(error)"))
            }
            timeline.record(.prepared, at: clock.now())
            state = .resume
        case .resume:
            let target = target!
            do { try gate.resume(processID: target.processID) { () throws(RestoreError) in try target.resume() } } catch { throw .restore(error) }
            timeline.record(.targetResumed, at: clock.now())
            tracerPin.release()
            lazyMemory?.markRunning()
            state = .finished
        case .finished, .failed:
            preconditionFailure("Restorer cannot step while \(state)")
        }
    }

    /// Whether what the restore starts from is there: the process state on the socket, or an image in
    /// FAM in a state this mode can restore from.
    func imageAvailable() -> Bool { strategy.imageAvailable(self) }

    func openImage() throws(EngineError) {
        if let transport = strategy.stateLink {
            let message: Message?
            do { message = try transport.receive() } catch { throw .aborted("waiting for the process state from the source: \(error)") }
            guard let message else { return }
            guard case .metadata(let stateBytes, let addresses) = message else {
                throw .aborted("the source sent \(message) before the process state")
            }
            do {
                checkpointedState = try ProcessState.decode(stateBytes)
                try checkpointedState!.validate(pageAddresses: addresses, path: "the source's socket")
                try Self.checkPageTable(addresses)
                checkedFiles = try checkpointedState!.checkFileAccess(path: "the source's socket")
            } catch { throw .image(error) }
            pageAddresses = addresses
            return
        }
        do {
            guard let backend = try openBackend() else { preconditionFailure("ready without a backend") }
            let opened = try ImageReader.open(backend: backend, key: key, requireComplete: strategy.needsCompleteImage, deferPageChecks: true,
                                              imageIdentity: imageIdentity)
            checkpointedState = try opened.checkedProcessState()
            checkedFiles = try checkpointedState!.checkFileAccess(path: opened.path)
            reader = opened
            pageAddresses = opened.pageAddresses
        } catch { throw .image(error) }
    }

    /// Page addresses from a peer: page-aligned and strictly increasing (the image reader checks its own).
    static func checkPageTable(_ addresses: [UInt64]) throws(ImageError) {
        for (index, address) in addresses.enumerated() where address % .pageSize != 0 || (index > 0 && addresses[index - 1] >= address) {
            throw .badPageAddress(path: "the source's socket", slot: index, address: address, reason: "not page-aligned and increasing")
        }
    }

    public func abort(reason: String) {
        logger.info("restorer aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        defer { tracerPin.release() }
        target?.kill()
        state = .failed
    }
}
