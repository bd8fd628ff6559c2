// Why this file exists: the target's one seam between the restorer's lifecycle (Restorer: image, spawn,
// layout, pages, state, prepare, resume) and what a mode does with the pages. Each mode's strategy lives
// in its folder, Engine/Migration/Modes/<Mode>: the eager install of a committed image (EagerInstall), or
// the lazy handover to the fault handler and the pusher (LazyHandover), from FAM (LazyFromFAM) or from
// the socket (LazyFromSocket).
import Logging
import Sys

/// What one mode does with the restored process's pages. Called by the restorer only, on its thread.
protocol TargetPageStrategy: AnyObject {
    /// The link to the source, if the mode has one.
    var transport: (any Transport)? { get }
    /// The link the process state comes over (postcopy-socket), instead of an image in FAM.
    var stateLink: (any Transport)? { get }
    /// Whether the image must be complete before the restore opens it (else the metadata commit is enough).
    var needsCompleteImage: Bool { get }
    /// Whether a process tree may be restored.
    var restoresTrees: Bool { get }
    /// While no image is there: whether the source spoke first (it refused the victim, or hung up).
    var sourceSpokeFirst: Bool { get }
    /// Reads that word: an abort names the source's reason.
    func readSourceWord() throws(EngineError)
    /// Whether what the restore starts from is there.
    func imageAvailable(_ restorer: Restorer) -> Bool
    /// Once the layout is built: the restorer's next state (pages to install, or the handover made).
    func pagesAfterLayout(_ restorer: Restorer) throws(EngineError) -> Restorer.State
    /// Eager: installs the batch from `nextSlot`; returns the next state.
    func installBatch(_ restorer: Restorer, from nextSlot: Int) throws(EngineError) -> Restorer.State
    /// Lazy: why installing the pages needed before the resume would change nothing now (nil: ready).
    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction?
    /// Lazy: installs what it can of the pages needed before the resume; true once all are in.
    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool
    /// Before the rest of the state is restored: the pages' end (eager: every page in, userfaultfd gone).
    func finishPagesBeforeState(_ restorer: Restorer) throws(RestoreError)
}
