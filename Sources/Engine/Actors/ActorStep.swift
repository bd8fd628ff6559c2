// The steps an actor can announce, typed: a driver or a torture strategy matches cases, never text, so
// renaming a step's words cannot silently disable a strategy or a kill plan. `description` is the text
// torture's trace prints (and hashes), so the words stay what they were.

/// One step some engine actor announced as ready.
public enum ActorStep: Equatable, Sendable, CustomStringConvertible {
    case dumper(DumperStep)
    case restorer(RestorerStep)
    case faultHandler(FaultHandlerStep)
    case pusher(PusherStep)

    public var description: String {
        switch self {
        case .dumper(let step): step.description
        case .restorer(let step): step.description
        case .faultHandler(let step): step.description
        case .pusher(let step): step.description
        }
    }
}

/// The source's dumper, in the order a migration takes them.
public enum DumperStep: Equatable, Sendable, CustomStringConvertible {
    case preflight, freeze, capture, writeMetadata
    /// Copy (or, on a socket, send) the next batch, starting at this slot's background candidate.
    case dump(fromSlot: Int)
    /// Flush, fence and mark a batch already copied into FAM.
    case seal(slots: Range<Int>)
    case commit
    /// postcopy-socket: wait for the target to say it holds the process (after the `complete`).
    case handOver
    case release

    public var description: String {
        switch self {
        case .preflight: "preflight"
        case .freeze: "freeze"
        case .capture: "capture"
        case .writeMetadata: "writeMetadata"
        case .dump(let slot): "dump from slot \(slot)"
        case .seal(let slots): "seal slots \(slots)"
        case .commit: "commit"
        case .handOver: "hand over"
        case .release: "release"
        }
    }
}

/// The target's restorer.
public enum RestorerStep: Equatable, Sendable, CustomStringConvertible {
    /// The image (or the socket's state) is there: open and verify it.
    case openImage
    case giveUpWaiting
    /// The source spoke before any image existed (it refused the victim, or hung up).
    case readSourceWord
    case spawn, layout
    case install(fromSlot: Int)
    /// Post-copy: the pages the kernel itself touches before the process runs.
    case installKernelTouchedPages
    case restoreState, prepare, resume

    public var description: String {
        switch self {
        case .openImage: "wait for image"
        case .giveUpWaiting: "give up waiting for the image"
        case .readSourceWord: "read the source's word before its image"
        case .spawn: "spawn"
        case .layout: "layout"
        case .install(let slot): "install from slot \(slot)"
        case .installKernelTouchedPages: "install pages the kernel touches"
        case .restoreState: "restore state"
        case .prepare: "prepare"
        case .resume: "resume"
        }
    }
}

public enum FaultHandlerStep: Equatable, Sendable, CustomStringConvertible {
    case serve, finish
    public var description: String { self == .serve ? "serve" : "finish" }
}

public enum PusherStep: Equatable, Sendable, CustomStringConvertible {
    case push, finish
    public var description: String { self == .push ? "push" : "finish" }
}
