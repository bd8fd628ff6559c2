// Why this file exists: a post-copy process tree has one userfaultfd per process (a userfaultfd belongs
// to one mm), and lazy memory serves them all with one page table whose addresses carry each process's
// ordinal above the 47 bits of user space (TreePageAddress). This is that tree's userfaultfd: it speaks
// in tagged addresses, sends each copy, zero page, wake and registration to the process the ordinal
// names, and tags every fault and event it reads with the ordinal of the userfaultfd it came from. A
// single process is a tree of one (ordinal 0, addresses untagged): exactly its own userfaultfd.
import Sys

public final class TreeUserfaultfd: @unchecked Sendable {
    /// By ordinal; nil for a zombie (it has no memory and no pages).
    private let byOrdinal: [Userfaultfd?]

    init(byOrdinal: [Userfaultfd?]) {
        precondition(byOrdinal.first.map { $0 != nil } ?? false, "a tree's root has a userfaultfd")
        self.byOrdinal = byOrdinal
    }

    convenience init(_ single: Userfaultfd) { self.init(byOrdinal: [single]) }

    /// Every process's descriptor (to wait on all of them at once).
    public var descriptors: [Int32] { byOrdinal.compactMap { $0?.descriptor } }

    /// A copy of every process's userfaultfd, held elsewhere (torture holds them through a run).
    public func copies() throws(SyscallError) -> [Userfaultfd] {
        var copies: [Userfaultfd] = []
        for userfaultfd in byOrdinal.compactMap({ $0 }) { copies.append(try userfaultfd.copy()) }
        return copies
    }

    private func userfaultfd(for taggedAddress: UInt64, _ call: String) throws(SyscallError) -> (Userfaultfd, UInt64) {
        let ordinal = TreePageAddress.ordinal(of: taggedAddress)
        guard ordinal < byOrdinal.count, let userfaultfd = byOrdinal[ordinal] else {
            throw SyscallError(call: "\(call) at \(hex(taggedAddress)): no process of ordinal \(ordinal) in the tree", errno: .noSuchProcess)
        }
        return (userfaultfd, TreePageAddress.address(of: taggedAddress))
    }

    public func copy(bytes: [UInt8], to address: UInt64, dontWake: Bool) throws -> CopyOutcome {
        let (userfaultfd, own) = try userfaultfd(for: address, "UFFDIO_COPY")
        return try userfaultfd.copy(bytes: bytes, to: own, dontWake: dontWake)
    }

    public func copy(bytes: [UInt8], offset: Int, byteCount: Int, to address: UInt64, dontWake: Bool) throws -> CopyOutcome {
        let (userfaultfd, own) = try userfaultfd(for: address, "UFFDIO_COPY")
        return try userfaultfd.copy(bytes: bytes, offset: offset, byteCount: byteCount, to: own, dontWake: dontWake)
    }

    public func zeroPage(at address: UInt64, dontWake: Bool) throws(SyscallError) -> CopyOutcome {
        let (userfaultfd, own) = try userfaultfd(for: address, "UFFDIO_ZEROPAGE")
        return try userfaultfd.zeroPage(at: own, dontWake: dontWake)
    }

    public func wake(address: UInt64, byteCount: Int) throws(SyscallError) {
        let (userfaultfd, own) = try userfaultfd(for: address, "UFFDIO_WAKE")
        try userfaultfd.wake(address: own, byteCount: byteCount)
    }

    public func registerMissing(start: UInt64, byteCount: UInt64) throws(SyscallError) {
        let (userfaultfd, own) = try userfaultfd(for: start, "UFFDIO_REGISTER")
        try userfaultfd.registerMissing(start: own, byteCount: byteCount)
    }

    public func unregister(start: UInt64, byteCount: UInt64) throws(SyscallError) {
        let (userfaultfd, own) = try userfaultfd(for: start, "UFFDIO_UNREGISTER")
        try userfaultfd.unregister(start: own, byteCount: byteCount)
    }

    /// The next pending fault or event of any process, lowest ordinal first, its addresses tagged.
    public func nextMessage() throws(SyscallError) -> UserfaultMessage? {
        for (ordinal, userfaultfd) in byOrdinal.enumerated() {
            guard let userfaultfd, let message = try userfaultfd.nextMessage() else { continue }
            return Self.tagged(message, ordinal: ordinal)
        }
        return nil
    }

    static func tagged(_ message: UserfaultMessage, ordinal: Int) -> UserfaultMessage {
        guard ordinal > 0 else { return message }
        func tag(_ address: UInt64) -> UInt64 { TreePageAddress.tagged(address, ordinal: ordinal) }
        switch message {
        case .fault(var fault):
            fault.address = tag(fault.address)
            return .fault(fault)
        case .event(.remapped(let from, let to, let length)):
            return .event(.remapped(from: tag(from), to: tag(to), length: length))
        case .event(.removed(let start, let end)):
            return .event(.removed(start: tag(start), end: tag(end)))
        case .event(.unmapped(let start, let end)):
            return .event(.unmapped(start: tag(start), end: tag(end)))
        }
    }

    /// Whether any process's userfaultfd has a message, waiting up to `timeoutMilliseconds`.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        let all = byOrdinal.compactMap { $0 }
        if all.count == 1 { return all[0].waitReadable(timeoutMilliseconds: timeoutMilliseconds) }
        if all.contains(where: { $0.waitReadable(timeoutMilliseconds: 0) }) { return true }
        guard timeoutMilliseconds != 0 else { return false }
        Spawn.waitReadable(all.map(\.descriptor), timeoutMilliseconds: timeoutMilliseconds)
        return all.contains { $0.waitReadable(timeoutMilliseconds: 0) }
    }

    /// Unregisters every mapping of every process, as /proc shows them now, before the userfaultfds are
    /// let go (LazyMemory.unregisterAll says why). A mapping that cannot be registered (a file, the vDSO)
    /// or is gone meanwhile refuses, which is fine: nothing of it is registered. The process keeps
    /// running: when its mappings changed during a pass (an mremap moves a registration with it), the
    /// pass is made again, at most `passLimit` times.
    func unregisterEveryMapping(processIDsByOrdinal: [ProcessID?], passLimit: Int = 4) {
        for (ordinal, processID) in processIDsByOrdinal.enumerated() {
            guard let processID, ordinal < byOrdinal.count, let userfaultfd = byOrdinal[ordinal] else { continue }
            var before = (try? ProcFS.maps(processID)) ?? []
            for _ in 0..<passLimit {
                for mapping in before {
                    try? userfaultfd.unregister(start: mapping.start, byteCount: mapping.byteCount)
                }
                let after = (try? ProcFS.maps(processID)) ?? []
                if after == before { break }
                before = after
            }
        }
    }

    /// Reads (and so completes) every memory event still on its way once nothing is registered: an
    /// munmap, mremap or MADV_DONTNEED that met a registered range before the unregistration waits until
    /// its event is read or the userfaultfd released, and a copy of the userfaultfd held elsewhere keeps
    /// the release from happening (heapchurn asleep in userfaultfd_event_wait_completion for good). Such
    /// an event is queued only after its system call let go of the mmap lock, so it may come after a
    /// read found the queue empty: the queues are read until the kernel counts no event in flight
    /// (Userfaultfd.hasEventInFlight); none can begin once nothing is registered. What is read is not
    /// applied: the kernel serves the process's memory from now on. Bounded: `roundLimit` times 10 ms.
    func completeQueuedEvents(roundLimit: Int = 500) {
        let all = byOrdinal.compactMap { $0 }
        for _ in 0..<roundLimit {
            var inFlight = false
            for userfaultfd in all {
                while case .some = try? userfaultfd.nextMessage() {}
                if userfaultfd.hasEventInFlight() { inFlight = true }
            }
            guard inFlight else { return }
            _ = waitReadable(timeoutMilliseconds: 10)
        }
    }

    /// Lets every process's userfaultfd go (LazyMemory.unregisterAll says why closing is what is safe).
    public func close() {
        for userfaultfd in byOrdinal { userfaultfd?.close() }
    }
}
