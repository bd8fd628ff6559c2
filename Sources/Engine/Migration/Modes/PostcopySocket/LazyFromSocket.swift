// postcopy-socket's target strategy: the state and the pages the kernel touches first come over the socket.
import Logging
import Synchronization
import Sys

/// postcopy-socket: the process state comes over the socket, and so do the pages needed before the resume.
final class LazyFromSocket: LazyHandover, TargetPageStrategy {
    var stateLink: (any Transport)? { link }
    var sourceSpokeFirst: Bool { false }
    func readSourceWord() throws(EngineError) {}

    func imageAvailable(_ restorer: Restorer) -> Bool { link.waitReadable(timeoutMilliseconds: 0) }

    func waitingForPagesBeforeResume(_ restorer: Restorer) -> NextAction? {
        guard eagerRequested, !link.waitReadable(timeoutMilliseconds: 0) else { return nil }
        return .waiting(.retryAfter(.microseconds(100)))
    }

    func installPagesBeforeResume(_ restorer: Restorer) throws(EngineError) -> Bool {
        guard let memory = restorer.lazyMemory else { preconditionFailure("eager pages without lazy memory") }
        do {
            noteStrayPages(restorer, memory)
            if !eagerRequested {
                for slot in eagerSlotsLeft.sorted() { try link.send(.pageRequest(address: restorer.pageAddresses[slot])) }
                eagerRequested = true
            }
            // Only until the pages needed before the resume are in: what the source pushes after
            // that is the fault handler's, once the process runs (it must not lengthen the downtime).
            while !eagerSlotsLeft.isEmpty, let message = try link.receive() {
                switch message {
                case .pages(let address, let bytes):
                    try installReceived(restorer, address: address, bytes: bytes, memory: memory)
                    memory.noteReceivedPages(byteCount: bytes.count)
                case .abort(let reason):
                    throw EngineError.aborted("the source aborted: \(reason)")
                default:
                    continue
                }
            }
        } catch let error as EngineError {
            throw error
        } catch {
            throw .aborted("installing the pages needed before the resume: \(error)")
        }
        return eagerSlotsLeft.isEmpty
    }

    /// Any page that arrives before the resume goes in now, page by page into registered memory
    /// (UFFDIO_COPY) or not (pwrite), since one run of pages may span both.
    func installReceived(_ restorer: Restorer, address: UInt64, bytes: [UInt8], memory: LazyMemory) throws {
        guard let first = memory.slot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), not in the page table") }
        let target = restorer.target!
        for index in 0..<(bytes.count / .pageSize) {
            let pageAddress = address + UInt64(index) * .pageSize
            let page = Array(bytes[(index * .pageSize)..<((index + 1) * .pageSize)])
            guard memory.slot(for: pageAddress) == first + index else {
                throw EngineError.aborted("the source sent pages at \(hex(address)) that are not adjacent dumped pages")
            }
            if memory.isRegistered(pageAddress) && !strayPageSlots.contains(first + index) {
                try memory.installBytes(address: pageAddress, bytes: page)
            } else if !memory.isInstalled(first + index) {
                try target.writeBytes(page, to: pageAddress)
                try restorer.observer?.pagesInstalled(processID: target.processID, address: pageAddress, targetAddress: pageAddress,
                                                      byteCount: .pageSize, installedBytes: nil)
                memory.noteInstalledElsewhere(slot: first + index)
            }
            eagerSlotsLeft.remove(first + index)
        }
    }
}
