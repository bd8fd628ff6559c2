// postcopy-fam's target strategy: the handover to lazy memory, pages from FAM once marked.
import Logging
import Synchronization
import Sys

/// postcopy-fam: the image's metadata commit is enough to start; the pages needed before the resume go
/// in from FAM once their marks are stored (asked of the source first).
final class LazyFromFAM: LazyHandover, TargetPageStrategy {
    var stateLink: (any Transport)? { nil }
    var sourceSpokeFirst: Bool { link.waitReadable(timeoutMilliseconds: 0) }

    /// A source that refused the victim (before any image existed) says so, or hangs up: waiting out the
    /// image wait for an image that never comes would only hide its reason.
    func readSourceWord() throws(EngineError) {
        let message: Message?
        do { message = try link.receive() } catch {
            throw .aborted("the source node went away before it wrote an image: \(error)")
        }
        if case .abort(let reason) = message { throw .aborted("the source aborted: \(reason)") }
    }

    func imageAvailable(_ restorer: Restorer) -> Bool {
        guard let backend = try? restorer.openBackend(), let imageState = ImageReader.peekState(backend: backend) else { return false }
        return imageState != .creating
    }

    /// Requested and not marked yet: a step now would change nothing (seed 0x251de377e567a71d: pct ran
    /// it 10,000 times in a row and starved the dumper that marks them).
    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction? {
        guard eagerRequested, !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        if let memory = restorer.lazyMemory, !eagerSlotsLeft.contains(where: { memory.isDumped($0) }) {
            return .waiting(.retryAfter(.microseconds(100)))
        }
        return nil
    }

    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool {
        guard let memory = restorer.lazyMemory else { preconditionFailure("eager pages without lazy memory") }
        do {
            noteStrayPages(restorer, memory)
            // After the commit record FAM alone completes the migration: the source may be gone.
            let committed = memory.imageIsCommitted()
            if !eagerRequested {
                for slot in eagerSlotsLeft.sorted() where !memory.isDumped(slot) {
                    do { try link.send(.pageRequest(address: restorer.pageAddresses[slot])) } catch { if !committed { throw error } }
                }
                eagerRequested = true
            }
            for slot in eagerSlotsLeft.sorted() where memory.isDumped(slot) {
                try install(restorer, slot: slot, memory: memory)
            }
            // Drain the source's messages: the marks themselves are read from FAM.
            do {
                while let message = try link.receive() {
                    if case .abort(let reason) = message { throw EngineError.aborted("the source aborted: \(reason)") }
                }
            } catch let error as TransportError {
                if !memory.imageIsCommitted() { throw error }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("installing the pages needed before the resume: \(error)")
        }
        return eagerSlotsLeft.isEmpty
    }

    func install(_ restorer: Restorer, slot: Int, memory: LazyMemory) throws {
        let address = restorer.pageAddresses[slot]
        if memory.isRegistered(address) && !strayPageSlots.contains(slot) {
            try memory.installFromFAM(slot: slot, count: 1)
        } else {
            precondition(memory.isDumped(slot), "page slot \(slot) read before its mark was seen")
            // Checked and written from one copy: nothing read from FAM after the check.
            let page = try memory.verifiedPages(slot: slot, count: 1)
            let target = restorer.target!
            try target.writePages(page, offset: 0, byteCount: .pageSize, to: address)
            try restorer.observer?.pagesInstalled(processID: target.processID, address: address, targetAddress: address, byteCount: .pageSize,
                                                  installedBytes: nil)
            memory.noteInstalledElsewhere(slot: slot)
        }
        eagerSlotsLeft.remove(slot)
    }
}
