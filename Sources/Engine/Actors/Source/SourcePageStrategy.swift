// Why this file exists: the source's one seam between the dumper's lifecycle (Dumper: preflight, freeze,
// capture, metadata, pages, commit, release) and what a mode does with the victim's memory. Each mode's
// strategy lives in its folder, Engine/Migration/Modes/<Mode>: nonlive batches (NonliveBatchDump), the
// post-copy FAM dump with its priority queue (PostcopyFAMDump), the socket page server (SocketPageServer).
import Sys

/// What a dump or seal step leaves the dumper's page state at.
enum DumpProgress: Equatable {
    /// Still dumping, from the same slot (the step label keeps its slot).
    case stay
    /// Still dumping, from this slot on.
    case next(Int)
    /// Every page is out: commit next.
    case done
}

/// What one mode does with the victim's pages on the source. Called by the dumper only, on its thread;
/// a strategy keeps its own state (requests, window, cursor) and uses the dumper's image writer through
/// the dumper's `copy`, `createImage` and `writer`, never flushes, fences or marks itself.
protocol SourcePageStrategy: AnyObject {
    /// Whether the mode writes an image into FAM (its backend is made before the freeze).
    var usesFAM: Bool { get }
    /// Whether the victim's whole process tree migrates (else a victim with children is refused).
    var migratesTrees: Bool { get }
    /// Whether the next batch is read from the victim while this one is sealed.
    var pipelinesCopies: Bool { get }
    /// The link to the target, if the mode has one.
    var transport: (any Transport)? { get }
    /// Publishes the captured state: into the image in FAM (`dumper.createImage`), or over the link.
    func writeMetadata(_ dumper: Dumper, state: ProcessState, metadata: [UInt8]) throws(EngineError)
    /// While dumping: why the dumper waits now (nil: it is ready).
    func waitingWhileDumping(_ dumper: Dumper) -> NextAction?
    /// One dump step with no batch left unsealed.
    func dump(_ dumper: Dumper, nextSlot: Int) throws(EngineError) -> DumpProgress
    /// After the dumper sealed `slots` (copied by an earlier `dump`).
    func sealed(_ dumper: Dumper, slots: Range<Int>) -> DumpProgress
    /// postcopy-socket, after the `complete` that hands the process over: why the dumper waits (nil: ready).
    func waitingForHandOver(_ dumper: Dumper) -> NextAction?
    /// Takes the target's words; true once it said it holds the process. Throws when it went away, or
    /// said nothing within the stall timeout.
    func handedOver(_ dumper: Dumper) throws(EngineError) -> Bool
}

extension SourcePageStrategy {
    func waitingForHandOver(_ dumper: Dumper) -> NextAction? { preconditionFailure("only postcopy-socket hands the process over") }
    func handedOver(_ dumper: Dumper) throws(EngineError) -> Bool { preconditionFailure("only postcopy-socket hands the process over") }
}
