// The target node's restorer. Nonlive (`eager`): waits for the commit, opens and verifies the whole
// image, starts the stub with the victim's PID, rebuilds the layout, installs every page, restores the
// rest of the state, lets the oracles look, and lets the process run. Post-copy (`lazy`): starts as soon
// as the metadata is there (in FAM, or over the socket), installs only the pages the kernel itself will
// touch before the process runs (private file pages, the rseq area), and hands the userfaultfd to the
// fault handler and the pusher when it resumes the process.
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
    let mode: RestoreMode
    let gate: any TargetGate
    let imageWait: Duration
    /// The migration's key: every image is authenticated with it before anything in it is used.
    let key: MigrationKey

    var state = State.waitingForImage
    var reader: ImageReader?
    var pageAddresses: [UInt64] = []
    public internal(set) var checkpointedState: ProcessState?
    var target: TargetTree?
    var spawnFirstTried: Duration?
    public internal(set) var restoredProcessID: ProcessID?
    public internal(set) var installedPageCount = 0
    /// Post-copy: pages that must be in before the process runs, not yet installed.
    var eagerSlotsLeft: Set<Int> = []
    var eagerRequested = false
    /// Post-copy: dumped pages found present in registered memory before anything was installed there
    /// (see `checkStrayPages`): written with their dumped bytes before the resume.
    var strayPageSlots: Set<Int> = []
    /// Whether the registered memory was checked for pages nobody of ours installed (the first step
    /// after the layout does it).
    public internal(set) var strayPagesChecked = false
    /// Nonlive: the next batch's page digests, under way while this batch is installed.
    var verificationAhead: PageVerification?
    let handedOver = Mutex<LazyMemory?>(nil)

    /// The target's memory, once the process runs (post-copy); the fault handler and pusher read it.
    public var lazyMemory: LazyMemory? { handedOver.withLock { $0 } }

    /// `openBackend()` returns the FAM holding the image, or nil while it does not exist yet.
    public init(openBackend: @escaping () throws(ImageError) -> (any FAMBackend)?, key: MigrationKey, stubPath: String, batchPageCount: Int = 512,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline,
                logger: Logger, processIDWait: Duration = .seconds(5), pidNamespace: PIDNamespace = .shared,
                mode: RestoreMode = .eager, gate: any TargetGate = ImmediateTargetGate(), imageWait: Duration = .seconds(600)) {
        self.gate = gate
        self.key = key
        self.imageWait = imageWait
        self.pidNamespace = pidNamespace
        self.openBackend = openBackend
        self.stubPath = stubPath
        self.batchPageCount = batchPageCount
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.logger = logger
        self.processIDWait = processIDWait
        self.mode = mode
    }

    var transport: (any Transport)? {
        switch mode {
        case .eager: nil
        case .lazyFromFAM(let transport), .lazyFromSocket(let transport): transport
        }
    }

    public func nextAction() -> NextAction {
        switch state {
        case .finished, .failed: return .finished
        case .waitingForImage:
            if imageAvailable() { return .ready(.restorer(.openImage)) }
            if clock.now() > imageWait { return .ready(.restorer(.giveUpWaiting)) }
            if case .lazyFromFAM(let transport) = mode, transport.waitReadable(timeoutMilliseconds: 0) {
                return .ready(.restorer(.readSourceWord))
            }
            return .waiting(.retryAfter(.microseconds(200)))
        case .spawn:
            if let spawnFirstTried, clock.now() - spawnFirstTried < .milliseconds(2) { return .waiting(.retryAfter(.microseconds(500))) }
            return readyStep
        case .eagerPages:
            guard eagerRequested, let transport, !transport.waitReadable(timeoutMilliseconds: 0) else { return readyStep }
            switch mode {
            case .lazyFromSocket:
                return .waiting(.retryAfter(.microseconds(100)))
            case .lazyFromFAM:
                // Requested and not marked yet: a step now would change nothing (seed 0x251de377e567a71d:
                // pct ran it 10,000 times in a row and starved the dumper that marks them).
                if let memory = lazyMemory, !eagerSlotsLeft.contains(where: { memory.isDumped($0) }) {
                    return .waiting(.retryAfter(.microseconds(100)))
                }
                return readyStep
            case .eager:
                return readyStep
            }
        default: return readyStep
        }
    }

    var readyStep: NextAction { state.step.map { .ready(.restorer($0)) } ?? .finished }

    public func perform() throws(EngineError) {
        do {
            try step()
        } catch {
            state = .failed
            target?.kill()
            throw error
        }
    }

    func step() throws(EngineError) {
        switch state {
        case .waitingForImage:
            if !imageAvailable(), case .lazyFromFAM(let transport) = mode, transport.waitReadable(timeoutMilliseconds: 0) {
                // A source that refused the victim (before any image existed) says so, or hangs up:
                // waiting out `imageWait` for an image that never comes would only hide its reason.
                let message: Message?
                do { message = try transport.receive() } catch {
                    throw .aborted("the source node went away before it wrote an image: \(error)")
                }
                if case .abort(let reason) = message { throw .aborted("the source aborted: \(reason)") }
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
            if case .eager = mode {} else if !checkpointedState!.members.isEmpty {
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
            timeline.record(.spawned, at: clock.now())
            state = .layout
        case .layout:
            do { try target!.buildLayout(checkpointedState!) } catch { throw .restore(error) }
            timeline.record(.layoutBuilt, at: clock.now())
            if case .eager = mode {
                state = pageAddresses.isEmpty ? .restoreState : .installing(nextSlot: 0)
            } else {
                do { try startLazy() } catch { throw .restore(error) }
                state = .eagerPages
            }
        case .installing(let nextSlot):
            try installBatch(from: nextSlot)
        case .eagerPages:
            try installEagerPages()
        case .restoreState:
            timeline.record(.pagesBeforeResumeInstalled, at: clock.now())
            if case .eager = mode {
                precondition(installedPageCount == pageAddresses.count, "\(pageAddresses.count - installedPageCount) dumped pages not installed")
                timeline.record(.lastPageInstalled, at: clock.now())
            }
            do {
                if case .eager = mode { try target!.finishInstalling() }
                try target!.restoreState(checkpointedState!)
            } catch { throw .restore(error) }
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
            lazyMemory?.markRunning()
            state = .finished
        case .finished, .failed:
            preconditionFailure("Restorer cannot step while \(state)")
        }
    }

    /// Whether what the restore starts from is there: the process state on the socket, or an image in
    /// FAM in a state this mode can restore from.
    func imageAvailable() -> Bool {
        if case .lazyFromSocket(let transport) = mode { return transport.waitReadable(timeoutMilliseconds: 0) }
        guard let backend = try? openBackend(), let imageState = ImageReader.peekState(backend: backend) else { return false }
        switch mode {
        case .eager: return imageState == .complete || imageState == .aborted
        default: return imageState != .creating
        }
    }

    func openImage() throws(EngineError) {
        if case .lazyFromSocket(let transport) = mode {
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
                try checkpointedState!.checkFileAccess(path: "the source's socket")
            } catch { throw .image(error) }
            pageAddresses = addresses
            return
        }
        do {
            guard let backend = try openBackend() else { preconditionFailure("ready without a backend") }
            let complete: Bool
            if case .eager = mode { complete = true } else { complete = false }
            let opened = try ImageReader.open(backend: backend, key: key, requireComplete: complete, deferPageChecks: true)
            checkpointedState = try opened.checkedProcessState()
            try checkpointedState!.checkFileAccess(path: opened.path)
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

    func installBatch(from nextSlot: Int) throws(EngineError) {
        let slots = nextSlot..<min(nextSlot + batchPageCount, reader!.pageCount)
        // Each page against its mark digest, just before it is installed (invariants 3 and 4: its mark
        // observed, nothing used that does not verify); a corrupted page stops the restore, and the
        // target is killed.
        do throws(ImageError) {
            let verification: PageVerification
            if let ahead = verificationAhead, ahead.slots == slots { verification = ahead } else { verification = try startVerifying(slots) }
            verificationAhead = nil
            try verification.finish()
            // The next batch is digested (on a thread of the real backend) while this one is installed.
            let next = slots.upperBound..<min(slots.upperBound + batchPageCount, reader!.pageCount)
            if !next.isEmpty { verificationAhead = try startVerifying(next) }
        } catch { throw .image(error) }
        let reader = reader!
        // Write runs of pages that are adjacent both in the victim and in FAM with one call each.
        var runStart = slots.lowerBound
        for slot in slots {
            let runEnds = slot + 1 == slots.upperBound
                || reader.pageAddresses[slot + 1] != reader.pageAddresses[slot] + UInt64(ImageLayout.pageSize)
            guard runEnds else { continue }
            do {
                let byteCount = (slot + 1 - runStart) * ImageLayout.pageSize
                let region = reader.backend.readableRegion(at: reader.pageOffset(slot: runStart), count: byteCount)
                let newlyInstalled = try target!.writePages(from: region.mapping, at: region.offset, byteCount: byteCount,
                                                            to: reader.pageAddresses[runStart])
                // Every page of the run is in: copied, or written over a page found present.
                precondition(newlyInstalled == slot + 1 - runStart, "page run at \(hex(reader.pageAddresses[runStart])) not wholly installed")
            } catch { throw .restore(error) }
            runStart = slot + 1
        }
        installedPageCount += slots.count
        state = slots.upperBound == reader.pageCount ? .restoreState : .installing(nextSlot: slots.upperBound)
    }

    /// Observes each slot's mark, then starts digesting the pages against them.
    func startVerifying(_ slots: Range<Int>) throws(ImageError) -> PageVerification {
        for slot in slots {
            guard reader!.isMarked(slot: slot) else { throw .pageNotMarked(path: reader!.path, slot: slot, address: reader!.pageAddresses[slot]) }
        }
        return try reader!.startVerifyingPages(slots: slots)
    }

    // MARK: Post-copy

    /// Hands the userfaultfd over to shared lazy memory and lists the pages needed before the resume:
    /// those outside registered memory (private file pages, written with pwrite) and the rseq area
    /// (rseq registration makes the kernel write it, and no fault handler may be needed mid-injection).
    func startLazy() throws(RestoreError) {
        let origin: PageOrigin = reader.map { .fam($0) } ?? .socket
        let memory = try target!.makeLazyMemory(pageAddresses: pageAddresses, origin: origin, observer: observer, gate: gate)
        handedOver.withLock { $0 = memory }
        var slots = Set<Int>()
        for (slot, address) in pageAddresses.enumerated() where !memory.isRegistered(address) || memory.isInstalledBeforeResume(address) {
            slots.insert(slot)
        }
        for rseq in checkpointedState!.threads.compactMap(\.rseq) {
            let firstPage = rseq.address & ~UInt64(4095)
            let lastPage = (rseq.address + UInt64(max(rseq.byteCount, 1)) - 1) & ~UInt64(4095)
            for page in stride(from: firstPage, through: lastPage, by: .pageSize) {
                if let slot = memory.slot(for: page) { slots.insert(slot) }
            }
        }
        eagerSlotsLeft = slots
    }

    func installEagerPages() throws(EngineError) {
        guard let memory = lazyMemory, let transport else { preconditionFailure("eager pages without lazy memory") }
        do {
            if !strayPagesChecked { try checkStrayPages(memory) }
            if reader != nil {
                // After the commit record FAM alone completes the migration: the source may be gone.
                let committed = memory.imageIsCommitted()
                if !eagerRequested {
                    for slot in eagerSlotsLeft.sorted() where !memory.isDumped(slot) {
                        do { try transport.send(.pageRequest(address: pageAddresses[slot])) } catch { if !committed { throw error } }
                    }
                    eagerRequested = true
                }
                for slot in eagerSlotsLeft.sorted() where memory.isDumped(slot) {
                    try installEager(slot: slot, memory: memory)
                }
                // Drain the source's messages: the marks themselves are read from FAM.
                do {
                    while let message = try transport.receive() {
                        if case .abort(let reason) = message { throw EngineError.aborted("the source aborted: \(reason)") }
                    }
                } catch let error as TransportError {
                    if !memory.imageIsCommitted() { throw error }
                }
            } else {
                if !eagerRequested {
                    for slot in eagerSlotsLeft.sorted() { try transport.send(.pageRequest(address: pageAddresses[slot])) }
                    eagerRequested = true
                }
                // Only until the pages needed before the resume are in: what the source pushes after
                // that is the fault handler's, once the process runs (it must not lengthen the downtime).
                while !eagerSlotsLeft.isEmpty, let message = try transport.receive() {
                    switch message {
                    case .pages(let address, let bytes):
                        try installReceived(address: address, bytes: bytes, memory: memory)
                        memory.noteReceivedPages(byteCount: bytes.count)
                    case .abort(let reason):
                        throw EngineError.aborted("the source aborted: \(reason)")
                    default:
                        continue
                    }
                }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("installing the pages needed before the resume: \(error)")
        }
        if eagerSlotsLeft.isEmpty { state = .restoreState }
    }

    public func abort(reason: String) {
        logger.info("restorer aborting", metadata: ["reason": "\(reason)", "state": "\(state)"])
        target?.kill()
        state = .failed
    }
}
