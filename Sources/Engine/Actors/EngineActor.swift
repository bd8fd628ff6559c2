// The seam between the engine and whoever drives it (DESIGN.md §4). Every concurrent part of the engine
// is an actor: a state machine that says what it would do next and does exactly one step when told.
// The threaded driver gives each actor a thread; torture's deterministic driver runs them all on one
// thread in an order its seeded scheduler picks. Actors never know which driver runs them: what differs
// is the ports they were given (FAM backend, transport, clock, observer).
import Sys

/// What an actor would do if asked now. Asking changes nothing.
public enum NextAction: Equatable, Sendable {
    /// `perform()` will take this step.
    case ready(ActorStep)
    /// Nothing to do until the condition may have changed.
    case waiting(WaitCondition)
    case finished
}

/// What a waiting actor waits for, so a threaded driver can block on it instead of spinning.
public enum WaitCondition: Equatable, Sendable {
    /// Poll again after this long (a state in FAM written by another node, a PID to be freed).
    case retryAfter(Duration)
    /// Another actor of this migration must make progress first.
    case peer(String)
    /// One of these descriptors becomes readable (a userfaultfd, a socket), or `timeout` passes.
    case readable([Int32], timeout: Duration)
}

/// One steppable part of the engine. Methods are called from one thread for the actor's whole life
/// (ptrace requires it), never concurrently.
public protocol EngineActor: AnyObject {
    var name: String { get }
    func nextAction() -> NextAction
    /// Takes exactly the step `nextAction()` announced as ready.
    func perform() throws(EngineError)
    /// The migration failed elsewhere (or here): release what this actor holds. A target that has not
    /// resumed is killed; a victim that was not yet killed is resumed untouched (or killed, if its
    /// memory already moved). Must not throw; may be called in any state, more than once.
    func abort(reason: String)
}

/// The time source actors read; the threaded driver passes the monotonic clock, torture a step counter.
public protocol EngineClock: Sendable {
    /// Time since an origin fixed for one migration.
    func now() -> Duration
}

/// Everything that can end a migration early, by area.
public enum EngineError: Error, CustomStringConvertible, Sendable {
    case checkpoint(CheckpointError)
    case restore(RestoreError)
    case image(ImageError)
    case fam(String)
    case aborted(String)
    case timedOut(String)
    /// The other node went silent once state had moved, for longer than the stall timeout.
    case stalled(String)
    /// This node did not run for longer than its lease on a restored process (MigrationPlan.targetLease).
    case leaseLapsed(String)

    public var description: String {
        switch self {
        case .checkpoint(let error): "\(error)"
        case .restore(let error): "\(error)"
        case .image(let error): "\(error)"
        case .fam(let message): "FAM: \(message)"
        case .aborted(let reason): "aborted: \(reason)"
        case .timedOut(let what): "timed out: \(what)"
        case .stalled(let what): "the other node stalled: \(what); it is stopped, overloaded or cut off: look at it, then migrate again"
        case .leaseLapsed(let what): "this node's lease ran out: \(what)"
        }
    }

    /// Bad input or environment (exit 2) versus a failed migration (exit 1).
    public var isUsageOrEnvironment: Bool {
        switch self {
        case .checkpoint(.noSuchProcess), .checkpoint(.cannotCheckpointSelf), .checkpoint(.alreadyTraced),
             .checkpoint(.multipleThreads), .checkpoint(.unsupportedDescriptor), .checkpoint(.unsupportedMapping),
             .checkpoint(.hasChildren), .checkpoint(.unsupportedTree), .checkpoint(.unsupportedContext):
            true
        case .image: true
        case .restore(.processIDInUse): true
        // The other node, not this migration's code, failed: as a refused peer is.
        case .stalled, .leaseLapsed: true
        default: false
        }
    }
}

/// Hooks the oracles use, called by actors at the two instants the oracles care about.
public protocol MigrationObserver: AnyObject, Sendable {
    /// The victim is frozen and its state read; nothing is dumped yet and it cannot change.
    /// `processID` is the victim as this node sees it (state.processID is as the victim sees itself).
    func victimFrozen(processID: ProcessID, state: ProcessState, pageAddresses: [UInt64]) throws
    /// The target is fully built and stopped before its first instruction; `restored` was read back
    /// from it the same way the victim was read at freeze.
    func targetReady(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) throws
    /// Pages were just installed in the target (woken only after this returns). `address` is where
    /// they were at the freeze, `targetAddress` where they are now (an mremap moves them). With
    /// `installedBytes` nil (only before the resume, while the target is stopped) the oracle reads them
    /// back through the target; after the resume it gets the exact bytes the installer copied, because
    /// a read-back races the target: a faulting thread whose page lands between its fault message and
    /// its check of the page never sleeps, and runs on without any wake (seen as false page-oracle
    /// failures of `fammig run` on a loaded machine). Only a driver that holds the target may read back.
    func pagesInstalled(processID: ProcessID, address: UInt64, targetAddress: UInt64, byteCount: Int, installedBytes: [UInt8]?) throws
    /// The source is about to store the commit record (every mark is durable), and has stored it.
    func imageWillCommit()
    func imageCommitted()
}

extension MigrationObserver {
    public func imageWillCommit() {}
    public func imageCommitted() {}
}
