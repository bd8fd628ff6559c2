// Why this file exists: the engine writes and reads FAM only through this protocol, so the torture
// framework can put a model FAM (write-back caches, partial persistence, a store/flush/fence log) under
// the same engine code. Its methods mirror the hardware: stores land in the writer's cache, `flush`
// writes lines back, `fence` orders them; what a reader on another node sees is only what was fenced.
import Sys

/// Fabric-attached memory as one node sees it. Offsets are bytes from the start of the FAM file; an
/// offset outside `byteCount` is a programmer error (precondition), never input.
public protocol FAMBackend: AnyObject, Sendable {
    /// Size of the FAM region in bytes.
    var byteCount: Int { get }
    /// The file behind it, for messages; nil for a model that has none.
    var path: String? { get }
    // Writer side.
    func store(_ bytes: [UInt8], at byteOffset: Int)
    /// One 8-byte store; at an 8-aligned offset a reader sees either the old or the new value.
    func storeUInt64(_ value: UInt64, at byteOffset: Int)
    /// The dump path: process_vm_readv from `processID` straight into FAM. Returns the bytes copied.
    @discardableResult
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int
    /// The same copy, begun now and finished by `PendingStore.finish()`: a backend may run it on a thread
    /// of its own (the real one does) while the caller seals the batch before it. The caller touches none
    /// of those bytes (no flush, no load) before `finish()`. A model does the copy at once.
    func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore
    /// One private copy of `pageCount` pages of `pageByteCount` bytes from `byteOffset`, and
    /// `code(index, page)` of each page of that copy (its keyed mark code), begun now and finished by
    /// `PendingPages.finish()`: the real backend loads and codes them on a thread of its own while the caller
    /// installs the batch before (the nonlive restore's pipeline); a model does it at once. The caller
    /// installs the very bytes the codes were computed over, never a second read of FAM.
    func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                       code: @escaping @Sendable (Int, [UInt8]) -> UInt64) -> PendingPages
    /// Writes back (clwb) every cache line overlapping the range; not ordered until `fence()`.
    func flush(at byteOffset: Int, count: Int)
    /// Orders every earlier flush before any later store (sfence).
    func fence()

    // Reader side.
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8]
    func loadUInt64(at byteOffset: Int) -> UInt64
    /// csys_digest64 of `count` bytes (a multiple of 8) as this node sees them.
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64
}

extension FAMBackend {
    /// At once, on the caller's thread: every backend whose stores must stay in the caller's order.
    public func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore {
        PendingStore(outcome: Result { () throws(SyscallError) in try storeFromProcess(processID: processID, ranges: ranges) })
    }
}

extension FAMBackend {
    /// At once, on the caller's thread.
    public func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                              code: @escaping @Sendable (Int, [UInt8]) -> UInt64) -> PendingPages {
        PendingPages(PendingPages.loadAndCode(loadBytes(at: byteOffset, count: pageCount * pageByteCount), pageByteCount: pageByteCount, code: code))
    }
}

/// Pages loaded and coded (see `FAMBackend.startPageLoad`); `finish()` waits for them, once.
public final class PendingPages: @unchecked Sendable {
    public typealias Loaded = (bytes: [UInt8], codes: [UInt64])
    private final class Box: @unchecked Sendable { var loaded: Loaded? }
    private var loaded: Loaded?
    private var thread: OSThread?
    private var box: Box?

    init(_ loaded: Loaded) { self.loaded = loaded }

    /// Runs `load` on a new thread; if no thread can be made, runs it here.
    init(running load: @escaping @Sendable () -> Loaded) {
        let box = Box()
        do {
            thread = try OSThread(name: "fammig-verify", stackByteCount: 256 << 10) { box.loaded = load() }
            self.box = box
        } catch {
            loaded = load()
        }
    }

    /// The codes of each page of `bytes`.
    static func loadAndCode(_ bytes: [UInt8], pageByteCount: Int, code: (Int, [UInt8]) -> UInt64) -> Loaded {
        let codes = (0..<(bytes.count / pageByteCount)).map { index in
            code(index, Array(bytes[(index * pageByteCount)..<((index + 1) * pageByteCount)]))
        }
        return (bytes, codes)
    }

    /// Dropped unfinished (its owner failed): still wait, so no thread reads FAM after this.
    deinit { thread?.join() }

    public func finish() -> Loaded {
        if let thread {
            thread.join()
            self.thread = nil
            loaded = box?.loaded
        }
        guard let loaded else { preconditionFailure("pending pages finished twice") }
        self.loaded = nil
        return loaded
    }
}

/// A `storeFromProcess` under way: done already, or running on a thread of its own. `finish()` waits for
/// it (joining the thread) and gives its outcome; it must be called once, before anything reads, flushes
/// or frees the bytes it writes.
public final class PendingStore: @unchecked Sendable {
    private var outcome: Result<Int, SyscallError>?
    private var thread: OSThread?

    init(outcome: Result<Int, SyscallError>) { self.outcome = outcome }

    /// Runs `copy` on a new thread; if no thread can be made, runs it here.
    init(running copy: @escaping @Sendable () throws(SyscallError) -> Int) {
        let box = OutcomeBox()
        do {
            thread = try OSThread(name: "fammig-dump-copy", stackByteCount: 256 << 10) {
                box.outcome = Result { () throws(SyscallError) in try copy() }
            }
            self.box = box
        } catch {
            outcome = Result { () throws(SyscallError) in try copy() }
        }
    }

    private final class OutcomeBox: @unchecked Sendable { var outcome: Result<Int, SyscallError>? }
    private var box: OutcomeBox?

    /// Dropped unfinished (its owner failed): still wait, so no thread writes into FAM after this.
    deinit { thread?.join() }

    /// Waits for the copy; returns the bytes copied or throws its error.
    @discardableResult
    public func finish() throws(SyscallError) -> Int {
        if let thread {
            thread.join()
            self.thread = nil
            outcome = box?.outcome
        }
        guard let outcome else { preconditionFailure("a pending FAM store finished twice") }
        self.outcome = nil
        return try outcome.get()
    }
}
