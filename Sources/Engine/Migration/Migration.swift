// Why this file exists: a migration is assembled here and nowhere else. `fammig` (its one-process run,
// its node commands, checkpoint and restore), torture's iterations and the tests only build ports (a
// FAM backend, a transport, a clock, an observer) and call `Migration.source` and `Migration.target`;
// which actors a mode needs, and how they are wired to each other, is this file's business. A new mode
// is a case of `MigrationMode` (and its `wireCode`), a branch in the two functions below, its cases of
// `DumpMode` and `RestoreMode` with their strategies (NodeModes.swift), and those two strategies, one
// in Actors/Source and one in Actors/Target. Torture draws only `Scenario.drawnModes`: a new mode joins
// the mix through a generator of its own, so that no existing seed changes its scenario.
import Logging
import Sys

/// How a process moves. The raw values are what every command line and report spells.
public enum MigrationMode: String, Sendable, CaseIterable, Codable {
    /// Everything into FAM while the victim is frozen; the target starts after the commit.
    case nonlive
    /// No FAM: state and pages over the socket; the frozen victim lives until every page was sent.
    case postcopySocket = "postcopy-socket"
    /// Metadata into FAM first (the target starts then), pages in the background, faults served from
    /// FAM once marked, the rest asked of the source; the victim is killed at the commit.
    case postcopyFAM = "postcopy-fam"

    public var isPostcopy: Bool { self != .nonlive }
    /// Whether the source writes an image into FAM.
    public var usesFAM: Bool { self != .postcopySocket }

    /// The mode's number in the handshake's frames and its proof (SecureChannel): fixed per mode, so
    /// that a mode added later changes no other mode's number.
    public var wireCode: UInt8 {
        switch self {
        case .nonlive: 0
        case .postcopySocket: 1
        case .postcopyFAM: 2
        }
    }
}

/// What both nodes of one migration agree on.
public struct MigrationPlan: Sendable {
    public var mode: MigrationMode
    /// postcopy-fam: the target installs the remaining pages from FAM in the background; postcopy-socket:
    /// the source sends pages nobody asked for. Ignored by nonlive.
    public var push: Bool
    /// Written into the image and the protocol's frames; a reader refuses another generation's.
    public var generation: UInt64
    public var key: MigrationKey
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
                batchPageCount: Int = 512, stallTimeout: Duration = .seconds(MigrationPlan.defaultStallTimeoutSeconds)) {
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
    /// How long the restorer waits for the victim's PID to be free, and for the image to appear.
    public var processIDWait: Duration
    public var imageWait: Duration

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
        self.imageWait = imageWait
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
        let mode: DumpMode
        switch (plan.mode, ports.transport) {
        case (.nonlive, _): mode = .nonlive
        case (.postcopyFAM, let transport?): mode = .postcopyFAM(transport: transport)
        case (.postcopySocket, let transport?): mode = .postcopySocket(transport: transport, push: plan.push)
        case (let missing, nil): throw .transportMissing(missing)
        }
        return SourceNode(dumper: Dumper(victim: victim, makeBackend: ports.makeBackend, generation: plan.generation, key: plan.key,
                                         release: ports.release, batchPageCount: plan.batchPageCount, observer: ports.observer,
                                         clock: ports.clock, timeline: ports.timeline, logger: ports.logger, mode: mode,
                                         stallTimeout: plan.stallTimeout))
    }

    /// The target of a migration.
    public static func target(_ plan: MigrationPlan, ports: TargetPorts) throws(MigrationSetupError) -> TargetNode {
        let mode: RestoreMode
        switch (plan.mode, ports.transport) {
        case (.nonlive, _): mode = .eager
        case (.postcopyFAM, let transport?): mode = .lazyFromFAM(transport: transport)
        case (.postcopySocket, let transport?): mode = .lazyFromSocket(transport: transport)
        case (let missing, nil): throw .transportMissing(missing)
        }
        let restorer = Restorer(openBackend: ports.openBackend, key: plan.key, stubPath: ports.stubPath, batchPageCount: plan.batchPageCount,
                                observer: ports.observer, clock: ports.clock, timeline: ports.timeline, logger: ports.logger,
                                processIDWait: ports.processIDWait, pidNamespace: ports.pidNamespace, mode: mode, gate: ports.gate,
                                imageWait: ports.imageWait, stallTimeout: plan.stallTimeout, lease: plan.targetLease)
        guard plan.mode.isPostcopy else { return TargetNode(restorer: restorer, faultHandler: nil, pusher: nil) }
        let faultHandler = FaultHandler(lazy: { restorer.lazyMemory }, transport: ports.transport, generation: plan.generation,
                                        stallTimeout: plan.stallTimeout, lease: plan.targetLease, clock: ports.clock, timeline: ports.timeline, metrics: ports.metrics, logger: ports.logger)
        let pusher = plan.mode == .postcopyFAM && plan.push
            ? Pusher(lazy: { restorer.lazyMemory }, batchPageCount: plan.batchPageCount, clock: ports.clock, metrics: ports.metrics,
                     logger: ports.logger)
            : nil
        return TargetNode(restorer: restorer, faultHandler: faultHandler, pusher: pusher)
    }
}
