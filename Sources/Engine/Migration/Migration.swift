// Why this file exists: a migration is assembled here and nowhere else. `fammig` (its one-process run,
// its node commands, checkpoint and restore), torture's iterations and the tests only build ports (a
// FAM backend, a transport, a clock, an observer) and call `Migration.source` and `Migration.target`;
// how a node's actors are wired to each other is this file's business; what differs by mode is asked of
// the mode's definition (Modes/: a folder per mode, registered in Modes/MigrationMode.swift). Torture
// draws only `Scenario.drawnModes`: a new mode joins the mix through a generator of its own, so that no
// existing seed changes its scenario.
import Logging
import Sys

/// What both nodes of one migration agree on.
public struct MigrationPlan: Sendable {
    public var mode: MigrationMode
    /// postcopy-fam: the target installs the remaining pages from FAM in the background; postcopy-socket:
    /// the source sends pages nobody asked for. Ignored by nonlive.
    public var push: Bool
    /// Written into the image and the protocol's frames; a reader refuses another generation's.
    public var generation: UInt64
    public var key: MigrationKey
    /// Which migration the image is of (FAM modes): the source writes it into the image and the target
    /// refuses an image without it. It comes out of the nodes' handshake (`SecureTransport.imageIdentity`);
    /// nil where there is none (a checkpoint, torture's one-thread driver): any image of the key.
    public var imageIdentity: [UInt8]?
    /// Pages per dump, install and push batch.
    public var batchPageCount: Int
    /// The longest either node waits for the other once state has moved (a page asked for, an
    /// acknowledgement, the other node's last word): then it gives up, keeping the victim running
    /// (or stopped, when it cannot know which copy lives) and killing a restored process that is not
    /// yet the process.
    public var stallTimeout: Duration
    /// A post-copy target's lease on its restored process until the process is its own (nil: none): a
    /// target node that does not run for this long (stopped, starved) has its process killed by its
    /// watchdog, before a source that heard nothing from it for its stall timeout lets the victim run
    /// on. `fammig target` takes half its stall timeout.
    public var targetLease: Duration? = nil

    /// `fammig source`/`target --stall-timeout`'s default, and its least (a few of the target's
    /// heartbeats, FaultHandler.heartbeatInterval), in seconds.
    public static let defaultStallTimeoutSeconds: Int64 = 30
    public static let minimumStallTimeoutSeconds: Int64 = 2

    /// The generation of a migration that is not one of many (the CLI's): torture gives each iteration its own.
    public static let singleGeneration: UInt64 = 1

    public init(mode: MigrationMode, push: Bool = true, generation: UInt64 = MigrationPlan.singleGeneration, key: MigrationKey,
                batchPageCount: Int = 512, stallTimeout: Duration = .seconds(MigrationPlan.defaultStallTimeoutSeconds),
                imageIdentity: [UInt8]? = nil) {
        self.imageIdentity = imageIdentity
        self.stallTimeout = stallTimeout
        self.mode = mode
        self.push = push
        self.generation = generation
        self.key = key
        self.batchPageCount = batchPageCount
    }
}

/// What the source node is given: the FAM it writes (`makeBackend(byteCount)`, see `Dumper`), the
/// transport to the target (post-copy), and the clock, timeline, observer and logger it reports to.
public struct SourcePorts {
    public var makeBackend: (Int) throws(ImageError) -> any FAMBackend
    public var transport: (any Transport)?
    public var observer: (any MigrationObserver)?
    public var clock: any EngineClock
    public var timeline: MigrationTimeline
    public var logger: Logger
    /// What becomes of the victim once its memory moved (a checkpoint may leave it running).
    public var release: Dumper.Release

    public init(makeBackend: @escaping (Int) throws(ImageError) -> any FAMBackend, transport: (any Transport)?,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline, logger: Logger,
                release: Dumper.Release = .kill) {
        self.makeBackend = makeBackend
        self.transport = transport
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.logger = logger
        self.release = release
    }
}

/// What the target node is given: the FAM it reads (`openBackend()`, nil while no image exists), the
/// transport to the source (post-copy), the restore stub, and how it waits, reports and is held.
public struct TargetPorts {
    public var openBackend: () throws(ImageError) -> (any FAMBackend)?
    public var transport: (any Transport)?
    public var stubPath: String
    public var observer: (any MigrationObserver)?
    public var clock: any EngineClock
    public var timeline: MigrationTimeline
    public var metrics: FaultMetrics
    public var logger: Logger
    public var pidNamespace: PIDNamespace
    /// Who lets the restored process run (torture holds it; everyone else lets it go at once).
    public var gate: any TargetGate
    /// How long the restorer waits for the victim's PID to be free, and for the image to appear. The
    /// image wait is never shorter than `shortestImageWait`: a wait given shorter is raised to it.
    public var processIDWait: Duration
    public var imageWait: Duration

    /// The source's preflight and freeze may find a descriptor open for a moment and look again
    /// (`Dumper.transientRetryBudget` of waits in all) before anything is written or sent; a target
    /// waits at least that long, plus `imageWaitBeyondRetries` for the dump's first steps, before it
    /// takes the source for failed.
    public static let imageWaitBeyondRetries = Duration.milliseconds(50)
    public static let shortestImageWait = Dumper.transientRetryBudget + imageWaitBeyondRetries

    public init(openBackend: @escaping () throws(ImageError) -> (any FAMBackend)?, transport: (any Transport)?, stubPath: String,
                observer: (any MigrationObserver)?, clock: any EngineClock, timeline: MigrationTimeline,
                metrics: FaultMetrics = FaultMetrics(), logger: Logger, pidNamespace: PIDNamespace = .shared,
                gate: any TargetGate = ImmediateTargetGate(), processIDWait: Duration = .seconds(5), imageWait: Duration = .seconds(600)) {
        self.openBackend = openBackend
        self.transport = transport
        self.stubPath = stubPath
        self.observer = observer
        self.clock = clock
        self.timeline = timeline
        self.metrics = metrics
        self.logger = logger
        self.pidNamespace = pidNamespace
        self.gate = gate
        self.processIDWait = processIDWait
        self.imageWait = max(imageWait, Self.shortestImageWait)
    }
}

/// The source node's actors.
public struct SourceNode {
    public let dumper: Dumper
    public var actors: [any EngineActor] { [dumper] }
}

/// The target node's actors: the restorer, and in post-copy the fault handler and (postcopy-fam with
/// push) the pusher, which take over the restored process's memory when the restorer lets it run.
public struct TargetNode {
    public let restorer: Restorer
    public let faultHandler: FaultHandler?
    public let pusher: Pusher?
    public var actors: [any EngineActor] {
        var actors: [any EngineActor] = [restorer]
        if let faultHandler { actors.append(faultHandler) }
        if let pusher { actors.append(pusher) }
        return actors
    }
}

public enum MigrationSetupError: Error, CustomStringConvertible, Sendable {
    case transportMissing(MigrationMode)
    public var description: String {
        switch self {
        case .transportMissing(let mode): "\(mode.rawValue) needs a transport between the nodes"
        }
    }
}

public enum Migration {
    /// The source of `victim`'s migration.
    public static func source(_ plan: MigrationPlan, victim: ProcessID, ports: SourcePorts) throws(MigrationSetupError) -> SourceNode {
        let strategy = try plan.mode.definition.sourceStrategy(plan, transport: ports.transport)
        return SourceNode(dumper: Dumper(victim: victim, makeBackend: ports.makeBackend, generation: plan.generation, key: plan.key,
                                         release: ports.release, batchPageCount: plan.batchPageCount, observer: ports.observer,
                                         clock: ports.clock, timeline: ports.timeline, logger: ports.logger, strategy: strategy,
                                         stallTimeout: plan.stallTimeout, imageIdentity: plan.imageIdentity))
    }

    /// The target of a migration.
    public static func target(_ plan: MigrationPlan, ports: TargetPorts) throws(MigrationSetupError) -> TargetNode {
        let definition = plan.mode.definition
        let strategy = try definition.targetStrategy(plan, transport: ports.transport)
        let restorer = Restorer(openBackend: ports.openBackend, key: plan.key, stubPath: ports.stubPath, batchPageCount: plan.batchPageCount,
                                observer: ports.observer, clock: ports.clock, timeline: ports.timeline, logger: ports.logger,
                                processIDWait: ports.processIDWait, pidNamespace: ports.pidNamespace, strategy: strategy, gate: ports.gate,
                                imageWait: ports.imageWait, stallTimeout: plan.stallTimeout, imageIdentity: plan.imageIdentity,
                                lease: plan.targetLease)
        guard definition.isPostcopy else { return TargetNode(restorer: restorer, faultHandler: nil, pusher: nil) }
        let faultHandler = FaultHandler(lazy: { restorer.lazyMemory }, transport: ports.transport, generation: plan.generation,
                                        stallTimeout: plan.stallTimeout, lease: plan.targetLease, clock: ports.clock, timeline: ports.timeline, metrics: ports.metrics, logger: ports.logger)
        let pusher = definition.runsPusher(plan)
            ? Pusher(lazy: { restorer.lazyMemory }, batchPageCount: plan.batchPageCount, clock: ports.clock, metrics: ports.metrics,
                     logger: ports.logger)
            : nil
        return TargetNode(restorer: restorer, faultHandler: faultHandler, pusher: pusher)
    }
}
